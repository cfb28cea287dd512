"""The export folder: where the .onnx file goes, what an earlier export there wrote, the companions serving
needs beside the graph, the manifest, and the install that moves a staged export into place."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Callable

from .. import fsutil, serving
from ..errors import ArtifactError
from ..serving import MANIFEST

# what an export writes beside its ONNX file(s); the manifest's "files" lists those
COMPANIONS = ("preprocessing.json", "model_spec.json", "config.yaml", "tokenizer", MANIFEST)
STAGING_PREFIX = ".export-"


def resolve_output(model_dirs: list[str], output_dir: str) -> tuple[str, str]:
    """(the .onnx path, its folder) for --output-dir: a folder (the graph is its model.onnx), or a path ending
    in .onnx that names the file. It must not be a model directory exported from."""
    path = output_dir
    if os.path.isdir(path) or not path.endswith(".onnx"):
        path = os.path.join(path, "model.onnx")
    out_dir = os.path.dirname(os.path.abspath(path))
    if any(os.path.abspath(out_dir) == os.path.abspath(d) for d in model_dirs):
        raise ArtifactError("--output-dir must not be inside the model directory: export to a new folder")
    return path, out_dir


def previous_export(out_dir: str) -> set[str]:
    """The names in out_dir that an earlier export wrote (this export replaces them); empty for a new or empty
    folder. Any other non-empty folder is refused: exporting into it would overwrite files of the same names
    (a user's config.yaml, model_spec.json, tokenizer/) with nothing to tell them apart from ours."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ArtifactError(f"--output-dir {out_dir} is a file")
    held = sorted(n for n in os.listdir(out_dir) if not n.startswith(STAGING_PREFIX)) \
        if os.path.isdir(out_dir) else []  # staging folders of an interrupted export are ours
    if not held:
        return set()
    manifest = None
    with contextlib.suppress(OSError, ValueError), open(os.path.join(out_dir, MANIFEST)) as f:
        manifest = json.load(f)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("exports"), dict):
        shown = [n + "/" if os.path.isdir(os.path.join(out_dir, n)) else n for n in held]
        more = f" and {len(shown) - 8} more" if len(shown) > 8 else ""
        raise ArtifactError(f"--output-dir {out_dir} is not empty and is not an earlier export (no readable "
                            f"{MANIFEST}): it holds {', '.join(shown[:8])}{more}; export to a new or empty folder")
    ours = [*COMPANIONS, *(f for f in manifest.get("files", {}) if f == os.path.basename(f))]
    return {n for n in ours if n in held}


def stage_companions(model_dir: str, tokenizer, staged: str):
    """What serving needs beside the ONNX file: preprocessing, spec, the training config (data columns and
    splits, read by evaluate.py --onnx) when the run has one, and the tokenizer. Copies never follow a link
    (fsutil.copy_part; the model folder was checked to have none leading out of it)."""
    from ..artifact import PREPROCESSING, SPEC

    for name in (PREPROCESSING, SPEC, "config.yaml"):
        if name != "config.yaml" or os.path.lexists(os.path.join(model_dir, name)):
            fsutil.copy_part(model_dir, name, staged)
    if tokenizer is not None:
        if os.path.isdir(os.path.join(model_dir, "tokenizer")):
            fsutil.copy_part(model_dir, "tokenizer", staged)
        else:
            tokenizer.save_pretrained(os.path.join(staged, "tokenizer"))


def write_manifest(staged: str, files: dict, output: str, report: dict):
    """onnx_manifest.json: the graph files' checksums, the export report, and one digest over every part
    serving reads (serving.export_parts), so a graph or label map from another export is refused there."""
    parts = serving.export_parts(staged, files)
    with open(os.path.join(staged, MANIFEST), "w") as f:
        json.dump({"files": files, "digest": fsutil.combine(parts), "parts": parts,
                   "exports": {os.path.basename(output): report}}, f, indent=1)


def install(staged: str, out_dir: str, previous: set[str], say: Callable[[str], None]):
    """Move the staged export into out_dir. What the earlier export wrote and this one does not (its int8 copy,
    config.yaml, a model of another name) is removed so that nothing stale is mixed with the new export; the
    manifest moves last, so an interrupted install still leaves a folder recognised as an export."""
    new = sorted(os.listdir(staged), key=lambda n: n == MANIFEST)
    stale = sorted(previous - set(new))
    for name in stale + [n for n in new if os.path.isdir(os.path.join(out_dir, n))]:  # os.replace can't overwrite a dir
        path = os.path.join(out_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    for name in new:
        os.replace(os.path.join(staged, name), os.path.join(out_dir, name))
    if previous:
        say(f"replaced the earlier export in {out_dir}" + (f" (removed {', '.join(stale)})" if stale else ""))
