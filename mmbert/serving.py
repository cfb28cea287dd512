"""Serving an exported model with onnxruntime: no PyTorch model is built (and importing this module imports
no torch). Used by `evaluate.py --onnx`, `mmbert.load(export_folder)` and `mmbert predict`.

An export folder (written by export.py) holds the ONNX file(s) and what serving raw rows needs:
preprocessing.json, model_spec.json, tokenizer/ and onnx_manifest.json (checksums, graph inputs,
verification report). The manifest records one digest over the graph file(s) and every file beside them that
serving reads (EXPORT_PARTS: the label map, preprocessing, tokenizer, spec, config): OnnxScorer verifies each
part before it scores, so a graph copied in from another export (or an edited label map) is refused naming
the part. The graph maps collated tensors to scores, named by the model's task:

    input_ids       int64   batch x chunks x tokens     (absent when the fusion reads no text, e.g. tab_only)
    attention_mask  int64   batch x chunks x tokens     (idem)
    numeric         float32 batch x N                   (absent without numeric columns or when the fusion
                                                        reads no tabular columns, e.g. text_only)
    missing         float32 batch x N                   (idem; 1.0 where the value was missing)
    categorical     int64   batch x K                   (absent without categorical columns or for text_only)

(which inputs a fusion reads: models/registry.py, FusionSpec.input_names)
    -> probabilities float32 batch x num_classes       (classification: softmax included)
    -> prediction    float32 batch x 1                 (regression: in the target's original units, the
                                                        train standardisation undone in the graph)

A reader takes the graph's one output, `probabilities` or `prediction` (OUTPUTS), and tells the task by its name.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Optional

import numpy as np

from . import fsutil
from .errors import ArtifactError, read_json_object
from .fsutil import sha256
from .models.registry import CATEGORICAL_INPUTS, NUMERIC_INPUTS, TEXT_INPUTS

INPUTS = (*TEXT_INPUTS, *NUMERIC_INPUTS, *CATEGORICAL_INPUTS)  # every graph input, in the graph's order
OUTPUT = "probabilities"
REGRESSION_OUTPUT = "prediction"
OUTPUTS = (OUTPUT, REGRESSION_OUTPUT)


def output_name(task: str) -> str:
    return REGRESSION_OUTPUT if task == "regression" else OUTPUT

MANIFEST = "onnx_manifest.json"
# what serving reads beside the graph, in the order a mismatch is named (the label map first)
EXPORT_PARTS = ("preprocessing.json", "model_spec.json", "tokenizer", "config.yaml")
_DTYPES = {"tensor(int64)": np.int64, "tensor(float)": np.float32, "tensor(int32)": np.int32,
           "tensor(double)": np.float64}


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def session(path: str, threads: Optional[int] = None):
    """An onnxruntime CPU session; a file that is not a loadable model is one ArtifactError line."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    if threads:
        so.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own pybind types (InvalidProtobuf, Fail, InvalidGraph ...)
        raise ArtifactError(f"{path} is not a loadable ONNX model (truncated or corrupted?): {first_line(e)}") \
            from None


def feeds(sess, batch: dict) -> dict:
    """The graph's inputs from a collated batch (torch tensors or numpy arrays), in the graph's dtypes."""
    out = {}
    for i in sess.get_inputs():
        if i.name not in batch:
            raise ArtifactError(f"the ONNX model needs input '{i.name}', which the batch does not have")
        v = batch[i.name]
        v = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
        out[i.name] = np.ascontiguousarray(v, dtype=_DTYPES.get(i.type, v.dtype))
    return out


def score_dataset(score: Callable[[dict], object], ds, pad_id: int, num_classes: int,
                  batch_size: int = 32) -> np.ndarray:
    """Scores (float32, len(ds) x num_classes, dataset order; num_classes = 1 for a regression's prediction) of
    every row of a TableDataset, scored in length order (similar lengths batched together: less padding).
    `score` maps a collated host batch to scores (numpy or torch). One process: distributed scoring is
    mmbert.scoring.predict."""
    from .data.dataset import collate

    order = np.argsort(ds.lengths, kind="stable")
    out = np.zeros((len(ds), num_classes), dtype=np.float32)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        got = score(collate(ds, idx, pad_id))
        out[idx] = got.detach().float().cpu().numpy() if hasattr(got, "detach") else got
    return out


def read_manifest(folder: str) -> dict:
    """onnx_manifest.json of an export folder ({} when it has none)."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.lexists(path):
        return {}
    fsutil.inside(folder, path)
    return read_json_object(path, "")


def export_parts(folder: str, graph_files) -> dict:
    """{part: sha256} of an export folder: what serving reads beside the graph, then the graph file(s) (and
    their external data). Links out of the folder are refused."""
    return fsutil.part_digests(folder, [*EXPORT_PARTS, *sorted(graph_files)])


def verify_export(path: str, folder: str, manifest: dict) -> Optional[str]:
    """The export's digest, after checking every part of the folder against the manifest (one line naming
    the part that differs). An export from before digests is served with one warning; a folder with
    preprocessing beside the graph but no manifest at all is refused (nothing ties them together)."""
    if not manifest:
        held = [n for n in EXPORT_PARTS if os.path.lexists(os.path.join(folder, n))]
        if held:
            raise ArtifactError(f"export folder {folder} has no {MANIFEST}: nothing ties {os.path.basename(path)} to "
                                f"the {', '.join(held)} beside it; export the model again")
        return None  # a bare graph: scores() only, nothing read beside it
    if manifest.get("parts") is None:
        _check_graph_checksum(path, manifest)
        fsutil.warn_unverified(folder, f"has an {MANIFEST} without a digest (exported by an older mmbert)")
        return None
    recorded = fsutil.recorded_parts(manifest, os.path.join(folder, MANIFEST))
    graphs = [n for n in recorded if n not in EXPORT_PARTS]
    part = fsutil.first_difference(recorded, export_parts(folder, graphs))
    if part in graphs:
        raise ArtifactError(f"{os.path.join(folder, part)} does not match the checksum in {MANIFEST}: the file was "
                            f"modified, truncated or corrupted after export, or copied from another export; re-export")
    if part is not None:
        raise ArtifactError(f"export folder {folder}: {part} is not the one exported with {', '.join(graphs)} (its "
                            f"digest differs from {MANIFEST}): the folder mixes files of different exports, or {part} "
                            f"was changed after export; export the model again")
    if os.path.basename(path) not in graphs:
        raise ArtifactError(f"{path} is not listed in {MANIFEST} beside it: it is not this folder's export")
    return manifest["digest"]


def _check_graph_checksum(path: str, manifest: dict):
    """An export from before digests: its graph file against the manifest's checksum."""
    entry = manifest.get("files", {}).get(os.path.basename(path))
    if entry and entry.get("sha256") and sha256(path) != entry["sha256"]:
        raise ArtifactError(f"{path} does not match the checksum in {MANIFEST}: the file was modified, truncated "
                            f"or corrupted after export; re-export it")


class OnnxScorer:
    """onnxruntime scorer for an exported model; no PyTorch model is built.

    OnnxScorer(path, threads=None, check_integrity=True)
        path: an exported .onnx file (fp32 `model.onnx` or `model.int8.onnx`), or the export folder
        (then `model.onnx` in it). Every part of the folder (graph files, preprocessing.json, tokenizer/,
        model_spec.json, config.yaml) is checked against the digests onnx_manifest.json recorded at export
        (check_integrity=False skips it); a missing, truncated, tampered, mixed-in or non-ONNX file raises
        ArtifactError with one clear line.

    scores(batch) -> np.ndarray float32, shape (B, num_classes), rows in batch order: the graph's output
        (class probabilities, or for a regression (B, 1) predictions in original units)
        batch: a dict as returned by mmbert.data.dataset.collate (torch tensors or numpy arrays). Only
        the keys the graph declares (`input_names`) are read; `chunk_index`, `labels`, `index` ... are
        ignored. Same scores as mmbert.models.classifier.scores(model(...)) in PyTorch to ~1e-6 (verified at
        export).
    probabilities(batch)     scores(batch) of a classifier; ArtifactError for a regression model

    input_names: list[str]   graph inputs, a subset of INPUTS
    output: str              the graph's output, one of OUTPUTS
    task: str                classification or regression (by the output's name)
    num_classes: int         scores per row (1 for a regression)
    folder: str              the export folder
    manifest: dict           onnx_manifest.json (empty when the folder has none)
    digest: str | None       the export's verified digest (None: not verified, or exported before digests)
    preprocessor, tokenizer  loaded lazily from the folder (preprocessing.json, tokenizer/): the same
                             preprocessing as training, for serving raw rows
    pad_id: int              the tokenizer's pad id, for collate(ds, idx, scorer.pad_id)
    dataset(df, file="<rows>", with_labels=None) -> TableDataset   preprocess + tokenize raw rows
    predict_dataset(ds, batch_size=32) -> np.ndarray   all rows of a TableDataset, in dataset order
    predict_frame(df, batch_size=32) -> np.ndarray     raw rows (pandas DataFrame with the training columns)
    """

    def __init__(self, path: str, threads: Optional[int] = None, check_integrity: bool = True):
        if os.path.isdir(path):
            path = os.path.join(path, "model.onnx")
        if not os.path.isfile(path):
            raise ArtifactError(f"ONNX model not found: {path}")
        self.path = path
        self.folder = os.path.dirname(os.path.abspath(path))
        self.manifest = read_manifest(self.folder)
        self.digest = verify_export(path, self.folder, self.manifest) if check_integrity else None
        self.session = session(path, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        unknown = [n for n in self.input_names if n not in INPUTS]
        outs = [o.name for o in self.session.get_outputs()]
        if unknown or len(outs) != 1 or outs[0] not in OUTPUTS:
            raise ArtifactError(f"{path} is not an mmbert export: inputs {self.input_names}, outputs {outs}")
        self.output = outs[0]
        self.task = "regression" if self.output == REGRESSION_OUTPUT else "classification"
        shape = self.session.get_outputs()[0].shape
        self.num_classes = int(shape[-1]) if isinstance(shape[-1], int) else None
        self._pre = self._tok = None

    def scores(self, batch: dict) -> np.ndarray:
        return self.session.run([self.output], feeds(self.session, batch))[0]

    def probabilities(self, batch: dict) -> np.ndarray:
        if self.task == "regression":
            raise ArtifactError(f"{self.path} is a regression model: it has no class probabilities (use scores)")
        return self.scores(batch)

    @property
    def preprocessor(self):
        if self._pre is None:
            from .data.preprocess import Preprocessor

            path = os.path.join(self.folder, "preprocessing.json")
            fsutil.inside(self.folder, path)  # checked by the digest too, unless check_integrity=False
            self._pre = Preprocessor.load(path)
        return self._pre

    @property
    def tokenizer(self):
        if self._tok is None:
            from .data.tokenize import load_tokenizer

            tok_dir = os.path.join(self.folder, "tokenizer")
            fsutil.part_files(self.folder, "tokenizer")  # no link out of the folder, whatever check_integrity
            self._tok = load_tokenizer(tok_dir if os.path.isdir(tok_dir) else self.preprocessor.tokenizer)
        return self._tok

    @property
    def pad_id(self) -> int:
        from .data.tokenize import pad_id

        return pad_id(self.tokenizer)

    def dataset(self, df, file: str = "<rows>", with_labels: Optional[bool] = None):
        from .data.pipeline import build_dataset

        return build_dataset(self.preprocessor, self.tokenizer, df, file, with_labels=with_labels, name="serve")

    def predict_dataset(self, ds, batch_size: int = 32) -> np.ndarray:
        k = self.num_classes or self.preprocessor.num_outputs
        return score_dataset(self.scores, ds, self.pad_id, k, batch_size)

    def predict_frame(self, df, batch_size: int = 32) -> np.ndarray:
        return self.predict_dataset(self.dataset(df, with_labels=False), batch_size)
