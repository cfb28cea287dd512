"""The documentation a user reads first: the README's quick starts run as written (with tiny limits added,
listed in TINY below), the README stays short, and no relative link in README.md or docs/ is broken."""
from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys

import pandas as pd
import pytest
from conftest import ROOT

README = os.path.join(ROOT, "README.md")
BIN = os.path.dirname(sys.executable)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
BLOCK = re.compile(r"<!-- quickstart: ([\w-]+) -->\n```(\w+)\n(.*?)```", re.S)
# What the test adds to the quick starts' commands so that they take seconds: a 400-row table, two steps,
# 16 scored rows; everything else (the real encoder, inference of the columns, the launchers) runs as written.
TABLE_ROWS = 400
TINY = {"mmbert train": "--max-steps 2 --batch-size 4 --max-eval-rows 16",
        "mmbert evaluate": "--max-eval-rows 16"}
TINY_PY = "max_steps=2, batch_size=4, max_eval_rows=16, "


def quickstarts() -> list[tuple[str, str, str]]:
    with open(README, encoding="utf-8") as f:
        return BLOCK.findall(f.read())


def doc_files() -> list[str]:
    return [README, *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]


def test_readme_is_short_and_has_the_three_quick_starts():
    assert os.path.getsize(README) <= 16 * 1024
    names = [name for name, _, _ in quickstarts()]
    assert names == ["own-table", "own-table-python", "distributed", "predict", "export"], names


@pytest.mark.parametrize("path", doc_files(), ids=os.path.basename)
def test_relative_links_point_at_files(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # web links and in-page anchors
        file = target.split("#")[0]
        if not os.path.exists(os.path.normpath(os.path.join(os.path.dirname(path), file))):
            broken.append(target)
    assert not broken, f"{os.path.relpath(path, ROOT)}: broken links {broken}"


def test_no_issue_numbers_or_history_in_user_docs():
    pattern = re.compile(r"\bissue #?\d+|\bcommit [0-9a-f]{7,40}\b|before this change|this project's machine", re.I)
    hits = [(os.path.relpath(p, ROOT), m.group(0)) for p in doc_files()
            for m in pattern.finditer(open(p, encoding="utf-8").read())]
    assert not hits, hits


# ----------------------------------------------------------------------------- the quick starts, run

def _slurm_up() -> bool:
    if shutil.which("sbatch") is None:
        return False
    r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, check=False, timeout=30)
    return r.returncode == 0 and any(s.rstrip("*~#").startswith(("idle", "mix")) for s in r.stdout.split())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder that looks like a clone's root to the commands: data/ and launch/ of this repository."""
    d = tmp_path_factory.mktemp("quickstart")
    for name in ("data", "launch"):
        os.symlink(os.path.join(ROOT, name), d / name)
    return d


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_", "ACCELERATE_", "FSDP_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PATH=BIN + os.pathsep + env.get("PATH", ""), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def _tiny(line: str) -> str:
    for command, extra in TINY.items():
        if command in line:
            return f"{line} {extra}"
    return line


def _run(cmd: str, cwd, timeout: int = 600) -> str:
    r = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout,
                       check=False)
    assert r.returncode == 0, f"$ {cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def _run_block(lang: str, code: str, cwd) -> str:
    if lang == "python":
        return _run(f"python -c {shlex.quote(code.replace('mmbert.train(', 'mmbert.train(' + TINY_PY))}", cwd)
    out = []
    for line in code.strip().splitlines():
        if line.startswith("sbatch") and not _slurm_up():
            out.append(f"(skipped, no SLURM cluster: {line})")
            continue
        out.append(_run(_tiny(line), cwd))
        if "reviews.csv" in line and line.startswith("python -c"):  # the table the user brings: made small
            path = os.path.join(cwd, "reviews.csv")
            pd.read_csv(path).head(TABLE_ROWS).to_csv(path, index=False)
    return "\n".join(out)


BLOCKS = {name: (lang, code) for name, lang, code in quickstarts()}


@pytest.mark.slow
def test_quickstart_own_table(workdir):
    out = _run_block(*BLOCKS["own-table"], workdir)
    assert re.search(r"Review Text\s.*\btext\b", out), out[-3000:]  # the inferred roles, printed
    final = workdir / "runs" / "reviews" / "final"
    assert (final / "model.safetensors").is_file() and (final / "README.md").is_file()
    config = open(workdir / "runs" / "reviews" / "config.yaml").read()
    assert "Review Text" in config and os.path.join(str(workdir), "reviews.csv") in config  # roles and path kept
    metrics = pd.read_json(workdir / "runs" / "reviews" / "eval" / "metrics.json", typ="series")
    assert 0 <= metrics["roc_auc"] <= 1


@pytest.mark.slow
def test_quickstart_own_table_python(workdir):
    out = _run_block(*BLOCKS["own-table-python"], workdir)
    assert "runs/reviews_py/final" in out, out[-2000:]


@pytest.mark.slow
def test_quickstart_predict(workdir):
    out = _run_block(*BLOCKS["predict"], workdir)
    assert re.search(r"\[[01](, [01]){4}\]", out), out[-2000:]  # five predicted labels


@pytest.mark.slow
def test_quickstart_export(workdir):
    _run_block(*BLOCKS["export"], workdir)
    torch_p = pd.read_csv(workdir / "predictions.csv")
    onnx_p = pd.read_csv(workdir / "predictions_onnx.csv")
    assert list(torch_p.columns) == ["row", "prob_0", "prob_1", "pred"], list(torch_p.columns)
    assert len(torch_p) == TABLE_ROWS and (torch_p["pred"] == onnx_p["pred"]).mean() > 0.95
    assert (torch_p["prob_1"] - onnx_p["prob_1"]).abs().max() < 1e-3  # model.onnx is the fp32 graph


@pytest.mark.slow
def test_quickstart_distributed(workdir):
    out = _run_block(*BLOCKS["distributed"], workdir)
    assert "strategy=fsdp (auto: 8 processes)" in out, out[-3000:]
    for run in ("r8", "acc"):
        assert (workdir / "runs" / run / "final" / "model.safetensors").is_file()
