"""Every artifact is tied to what it was built from (issue 26, cases 2, 6 and 7): an export folder and a
model folder carry one digest over their parts, checked before scoring; nothing is read or copied through a
link out of a folder; written files follow the umask and an unreadable one is called a permission problem.

Two real trainings (tiny BERT, 2 steps) that differ only in the label order ([0, 1] and [1, 0]): the files of
one copied into the other's folder score with the wrong label map, the bug this guards against."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
from conftest import LABEL, ROOT, assert_one_line_error, run_cli, write_config

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.slow  # trains and exports through the real entry points

UMASKS = {"A": 0o022, "B": 0o002}  # run A is trained and exported under 022, run B under 002


def _with_umask(mask: int, args: list[str]):
    old = os.umask(mask)
    try:
        return run_cli(args)
    finally:
        os.umask(old)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, reviews, tiny_bert):
    """name -> (model folder, export folder): A trained with data.labels [0, 1], B with [1, 0]."""
    work = tmp_path_factory.mktemp("integrity")
    reviews.iloc[:160].to_csv(work / "data.csv", index=False)
    reviews.iloc[160:200].drop(columns=[LABEL]).to_csv(work / "rows.csv", index=False)
    out = {}
    for name, labels in (("A", [0, 1]), ("B", [1, 0])):
        cfg = write_config(work / f"{name}.yaml", tiny_bert, str(work / "data.csv"),
                           data={"labels": labels}, dist={"strategy": "none"})
        run, export = work / f"run_{name}", work / f"export_{name}"
        _with_umask(UMASKS[name], ["train.py", "--config", cfg, "--output-dir", str(run), "--max-steps", "2",
                                   "--max-eval-rows", "16"])
        _with_umask(UMASKS[name], ["export.py", "--model-dir", str(run / "final"), "--output-dir", str(export)])
        out[name] = (run / "final", export)
    return work, out


def _predict(model, work, out: str, *extra: str, env=None):
    return run_cli(["-m", "mmbert", "predict", str(model), *extra, "--data", str(work / "rows.csv"),
                    "--output", str(work / out)], check=False, env=env)


# ----------------------------------------------------------------------------- case 2: one digest per folder

def test_export_with_another_exports_graph_is_refused(runs, tmp_path):
    """model.onnx + onnx_manifest.json of export B copied into export A: A's label map would flip every
    prediction (exit 0 before); now one line naming the folder and the part that differs, exit 2."""
    work, r = runs
    (_, export_a), (_, export_b) = r["A"], r["B"]
    ok_a, ok_b = _predict(export_a, work, "a.tsv"), _predict(export_b, work, "b.tsv")
    assert ok_a.returncode == ok_b.returncode == 0, ok_a.stderr + ok_b.stderr
    a, b = pd.read_csv(work / "a.tsv", sep="\t"), pd.read_csv(work / "b.tsv", sep="\t")
    assert (a["pred"] != b["pred"]).any(), "the two runs predict alike: the swap would prove nothing"

    mixed = tmp_path / "mixed"
    shutil.copytree(export_a, mixed)
    for name in ("model.onnx", "onnx_manifest.json"):
        shutil.copy2(export_b / name, mixed / name)
    r2 = _predict(mixed, work, "mixed.tsv")
    assert_one_line_error(r2, str(mixed), "preprocessing.json", "different exports")
    assert not (work / "mixed.tsv").exists()

    import mmbert
    from mmbert.errors import ArtifactError

    with pytest.raises(ArtifactError, match="preprocessing.json is not the one exported"):
        mmbert.load(str(mixed))


def test_export_records_the_model_folder_it_was_built_from(runs):
    from mmbert.artifact import INTEGRITY
    from mmbert.serving import OnnxScorer

    _, r = runs
    model_a, export_a = r["A"]
    manifest = json.loads((export_a / "onnx_manifest.json").read_text())
    recorded = json.loads((model_a / INTEGRITY).read_text())["digest"]
    assert manifest["exports"]["model.onnx"]["built_from"] == [{"dir": str(model_a), "digest": recorded}]
    assert set(manifest["parts"]) == {"model.onnx", "preprocessing.json", "model_spec.json", "tokenizer",
                                      "config.yaml"}
    assert OnnxScorer(str(export_a)).digest == manifest["digest"]


def test_evaluate_onnx_with_another_model_folder_is_refused(runs, tmp_path):
    """evaluate.py --onnx EXPORT --model-dir DIR: DIR's config picks the rows to score, so DIR must be the folder
    the export was built from (its digest in built_from); the folder it came from is accepted."""
    work, r = runs
    (model_a, export_a), (model_b, _) = r["A"], r["B"]
    common = ["evaluate.py", "--onnx", str(export_a), "--data", str(work / "data.csv"), "--no-plots",
              "--no-progress"]
    ok = run_cli([*common, "--model-dir", str(model_a), "--output-dir", str(tmp_path / "a")], check=False)
    assert ok.returncode == 0, ok.stderr[-2000:]
    bad = run_cli([*common, "--model-dir", str(model_b), "--output-dir", str(tmp_path / "b")], check=False)
    assert_one_line_error(bad, f"--model-dir {model_b} is not the model", "built_from")


def test_model_folder_with_another_runs_weights_is_refused(runs, tmp_path):
    """model.safetensors of run B (same architecture: it loads) copied into run A's final/."""
    work, r = runs
    (model_a, _), (model_b, _) = r["A"], r["B"]
    assert _predict(model_a, work, "ma.tsv").returncode == 0
    mixed = tmp_path / "final"
    shutil.copytree(model_a, mixed)
    shutil.copy2(model_b / "model.safetensors", mixed / "model.safetensors")
    assert_one_line_error(_predict(mixed, work, "mm.tsv"), str(mixed), "model.safetensors", "different runs")
    shutil.copy2(model_a / "model.safetensors", mixed / "model.safetensors")
    shutil.copy2(model_b / "preprocessing.json", mixed / "preprocessing.json")  # B's label map, A's weights
    assert_one_line_error(_predict(mixed, work, "mm.tsv"), str(mixed), "preprocessing.json")


def test_ensemble_member_replaced_since_is_refused(runs, tmp_path):
    """ensemble.json records each member's digest: a member retrained (here: other weights, sealed anew as
    a retraining would) is refused; the unchanged ensemble resolves."""
    from mmbert.artifact import seal_model_dir
    from mmbert.ensemble import resolve_model_dirs, write_ensemble
    from mmbert.errors import ArtifactError

    _, r = runs
    (model_a, _), (model_b, _) = r["A"], r["B"]
    for m in ("m1", "m2"):
        shutil.copytree(model_a, tmp_path / m)
    write_ensemble(str(tmp_path), [{"dir": "m1"}, {"dir": "m2"}])
    assert resolve_model_dirs(str(tmp_path)) == [str(tmp_path / "m1"), str(tmp_path / "m2")]
    shutil.copy2(model_b / "model.safetensors", tmp_path / "m2" / "model.safetensors")
    seal_model_dir(str(tmp_path / "m2"))
    with pytest.raises(ArtifactError, match=r"member 1 \(m2\) is not the model this ensemble was written with"):
        resolve_model_dirs(str(tmp_path))


def test_folders_written_before_digests_load_with_one_warning(runs, tmp_path, caplog):
    """Existing users are not broken: a model folder without integrity.json and an export whose manifest
    has no digest still load, with one warning per folder; an export without any manifest but with a
    preprocessing.json beside the graph is refused (nothing ties them together)."""
    import mmbert
    from mmbert.errors import ArtifactError
    from mmbert.serving import OnnxScorer

    _, r = runs
    model_a, export_a = r["A"]
    old_model, old_export = tmp_path / "old_final", tmp_path / "old_export"
    shutil.copytree(model_a, old_model)
    shutil.copytree(export_a, old_export)
    os.remove(old_model / "integrity.json")
    manifest = json.loads((old_export / "onnx_manifest.json").read_text())
    for key in ("parts", "digest"):
        del manifest[key]
    (old_export / "onnx_manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="mmbert"):
        for _ in range(2):
            mmbert.load(str(old_model))
            mmbert.load(str(old_export))
    warned = [rec.getMessage() for rec in caplog.records if "cannot be verified" in rec.getMessage()]
    assert len(warned) == 2 and str(old_model) in warned[0] and str(old_export) in warned[1], warned
    os.remove(old_export / "onnx_manifest.json")
    with pytest.raises(ArtifactError, match="has no onnx_manifest.json: nothing ties model.onnx"):
        OnnxScorer(str(old_export))


# ----------------------------------------------------------------------------- case 6: links out of a folder

def _linked_model(model_dir, tmp_path, secret_target: bool, passwd: bool):
    d = tmp_path / "linked"
    shutil.copytree(model_dir, d)
    if secret_target:
        (tmp_path / "secrets.yaml").write_text("aws_secret_access_key: SECRET-123\n")
        os.remove(d / "config.yaml")
        os.symlink(tmp_path / "secrets.yaml", d / "config.yaml")
    if passwd:
        os.symlink("/etc/passwd", d / "tokenizer" / "passwd")
    return d


@pytest.mark.parametrize("link", ["config.yaml", "tokenizer/passwd"])
def test_export_refuses_a_link_out_of_the_model_folder(runs, tmp_path, link):
    """config.yaml linked to a secrets file, or tokenizer/ holding a link to /etc/passwd: shipped inside the
    export before; now export, predict and evaluate refuse in one line naming the link, nothing written."""
    work, r = runs
    model_a, _ = r["A"]
    d = _linked_model(model_a, tmp_path, link == "config.yaml", link == "tokenizer/passwd")
    out = tmp_path / "exported"
    res = run_cli(["export.py", "--model-dir", str(d), "--output-dir", str(out)], check=False)
    assert_one_line_error(res, f"{d}/{link} is a symbolic link", "outside")
    assert not out.exists() or os.listdir(out) == []
    assert_one_line_error(_predict(d, work, "linked.tsv"), f"{d}/{link} is a symbolic link")


def test_export_folder_with_a_link_out_is_refused(runs, tmp_path):
    """The same rule for an export folder (a preprocessing.json linked to another export's file)."""
    from mmbert.errors import ArtifactError
    from mmbert.serving import OnnxScorer

    _, r = runs
    (_, export_a), (_, export_b) = r["A"], r["B"]
    d = tmp_path / "served"
    shutil.copytree(export_a, d)
    os.remove(d / "preprocessing.json")
    os.symlink(export_b / "preprocessing.json", d / "preprocessing.json")
    for check in (True, False):
        with pytest.raises(ArtifactError, match=f"{d}/preprocessing.json is a symbolic link"):
            _ = OnnxScorer(str(d), check_integrity=check).preprocessor


def test_export_copies_a_link_inside_the_folder_as_a_link(runs, tmp_path):
    """A link that stays inside the model folder is allowed, and the export copies it as a link (it was
    dereferenced into a copy of its target before); the export serves."""
    from mmbert.artifact import seal_model_dir

    work, r = runs
    model_a, _ = r["A"]
    src = tmp_path / "src"
    shutil.copytree(model_a, src)
    os.symlink("tokenizer.json", src / "tokenizer" / "alias.json")
    seal_model_dir(str(src))  # as if saved with the link
    run_cli(["export.py", "--model-dir", str(src), "--output-dir", str(tmp_path / "exported")])
    assert os.readlink(tmp_path / "exported" / "tokenizer" / "alias.json") == "tokenizer.json"
    assert _predict(tmp_path / "exported", work, "inside.tsv").returncode == 0


# ----------------------------------------------------------------------------- case 7: shared use

def _modes(folder) -> dict[str, int]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, folder)] = os.lstat(p).st_mode & 0o777
    return out


@pytest.mark.parametrize("name", ["A", "B"])
def test_written_files_follow_the_umask(runs, name):
    """model.safetensors was written 0600 (safetensors' private temp file): every file of final/, best/, the
    checkpoints (their RNG files too) and the export now has the mode a plain open()/mkdir() gives under the run's
    umask (022 and 002)."""
    _, r = runs
    model, export = r[name]
    mask = UMASKS[name]
    for folder in (model, model.parent / "best", export, model.parent / "checkpoints"):
        if not folder.is_dir():
            continue
        modes = _modes(folder)
        assert modes, folder
        for rel, mode in modes.items():
            want = (0o777 if os.path.isdir(os.path.join(folder, rel)) else 0o666) & ~mask
            assert mode == want, f"{folder}/{rel}: {oct(mode)} != {oct(want)} under umask {oct(mask)}"
    assert os.stat(model / "model.safetensors").st_mode & 0o777 == 0o666 & ~mask


NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search",
          "--"]


def _as_other_user_or_skip(tmp_path):
    """Tests run as root, whom permission bits do not stop: the reader runs without the capabilities that
    bypass them (files owned by another uid are then read through their 'other' bits)."""
    if os.getuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root with setpriv to read as a user whom permission bits apply to")
    probe = tmp_path / "probe"
    probe.write_text("x")
    probe.chmod(0)
    r = subprocess.run([*NO_DAC, "cat", str(probe)], capture_output=True, check=False)
    if r.returncode == 0:
        pytest.skip("setpriv cannot drop the capabilities that bypass permission bits here")


def _chown_tree(folder, uid: int):
    for dirpath, dirnames, filenames in os.walk(folder):
        os.chown(dirpath, uid, uid)
        for n in filenames:
            os.chown(os.path.join(dirpath, n), uid, uid)


def test_another_user_can_serve_the_model_and_unreadable_is_a_permission_error(runs, tmp_path):
    """A model folder written by one user (here uid 65534, its modes as written under umask 022) is served
    by another: it loads (was: 'not a readable safetensors file (truncated or corrupted?)'); a file its
    owner made unreadable is reported as a permission problem naming it."""
    _as_other_user_or_skip(tmp_path)
    work, r = runs
    model_a, _ = r["A"]
    shared = tmp_path / "shared"
    shutil.copytree(model_a, shared)  # copy2 keeps the modes the run wrote
    _chown_tree(shared, 65534)
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [*NO_DAC, sys.executable, "-m", "mmbert", "predict", str(shared), "--data", str(work / "rows.csv"),
           "--output", str(tmp_path / "p.tsv")]
    ok = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert len(pd.read_csv(tmp_path / "p.tsv", sep="\t")) == 40
    os.chmod(shared / "model.safetensors", 0)
    bad = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    line = assert_one_line_error(bad, f"cannot read {shared}/model.safetensors: permission denied", "uid 65534")
    assert "corrupted" not in line
