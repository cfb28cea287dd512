"""The consolidated model directory (`RUN/final`): safetensors + JSON only, loadable without executing code.

    model.safetensors      weights (full state dict)
    model_spec.json        architecture of the multimodal classifier
    encoder/config.json    the text encoder's HF config (architecture only, no weights download)
    tokenizer/             tokenizer files (tokenizer.json, vocab ...)
    preprocessing.json     column roles, numeric statistics, vocabularies, label map
    config.yaml            the resolved training config (its data section re-selects splits)
    README.md              the model card (training/model_card.py): documentation, not read when opened
    integrity.json         one digest over the parts above (each part's sha256), written last when the folder
                           is saved and verified whenever it is opened: a folder whose parts come from
                           different runs (a model.safetensors copied in from another run) is refused
                           naming the part. A folder saved before digests loads with one warning.

Nothing is read through a symbolic link that leaves the folder, and every file follows the umask.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from typing import Optional

import torch

from . import fsutil
from .config import POOLINGS, Config, config_from_dict
from .data.preprocess import Preprocessor, is_int
from .errors import ArtifactError, ConfigError, read_json_object
from .models.classifier import ModelSpec, MultimodalClassifier, load_encoder
from .models.registry import fusion_names, fusion_spec
from .models.text_encoder import position_limit
from .task import CLASSIFICATION, REGRESSION

WEIGHTS = "model.safetensors"
SPEC = "model_spec.json"
PREPROCESSING = "preprocessing.json"
INTEGRITY = "integrity.json"
# what opening a model folder reads, in the order a mismatch is named (the label map first)
PARTS = (PREPROCESSING, SPEC, WEIGHTS, "tokenizer", "encoder", "config.yaml")
LAYER_KEYS = ("num_hidden_layers", "num_layers", "n_layers", "n_layer")  # config keys that count built layers
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def build_model(spec: ModelSpec, encoder_source: Optional[str], pretrained: bool, trust_remote_code: bool = False,
                encoder_config_dir: Optional[str] = None,
                attention_dropout: Optional[float] = None) -> MultimodalClassifier:
    encoder = None
    if fusion_spec(spec.fusion).text:
        encoder = load_encoder(encoder_source or spec.encoder, pretrained, trust_remote_code, encoder_config_dir,
                               attention_dropout=attention_dropout)
    return MultimodalClassifier(spec, encoder)


def save_artifact(out_dir: str, state_dict: dict, spec: ModelSpec, model: MultimodalClassifier, pre: Preprocessor,
                  tokenizer, config_dict: Optional[dict] = None, extra_files: Optional[dict[str, str]] = None):
    """Writes into `out_dir.tmp` then renames, so a crash never leaves a half-written final/. `extra_files`:
    {name: text} written beside the parts (the README.md model card; not a part of the digest)."""
    from safetensors.torch import save_file

    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": "pt", "producer": "mmbert"})
    fsutil.follow_umask(os.path.join(tmp, WEIGHTS))  # safetensors writes 0600: unreadable to anyone else
    with open(os.path.join(tmp, SPEC), "w") as f:
        json.dump(spec.to_dict(), f, indent=1)
    if model.text_encoder is not None:
        model.text_encoder.encoder.config.save_pretrained(os.path.join(tmp, "encoder"))
    if tokenizer is not None:
        tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
    pre.save(os.path.join(tmp, PREPROCESSING))
    if config_dict is not None:
        import yaml

        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            yaml.safe_dump(config_dict, f, sort_keys=False)
    for name, text in (extra_files or {}).items():
        with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
            f.write(text)
    seal_model_dir(tmp)
    if os.path.isdir(out_dir):
        old = out_dir.rstrip("/") + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


# ----------------------------------------------------------------------------- one digest per folder

def seal_model_dir(model_dir: str) -> str:
    """Record the digest of the folder's parts in integrity.json (the weights are hashed this once, while
    they are still in the page cache) and return it."""
    parts = fsutil.part_digests(model_dir, PARTS)
    digest = fsutil.combine(parts)
    with open(os.path.join(model_dir, INTEGRITY), "w", encoding="utf-8") as f:
        json.dump({"format": 1, "digest": digest, "parts": parts}, f, indent=1)
    return digest


def read_integrity(model_dir: str) -> Optional[dict]:
    """integrity.json, its parts checked to add up to its digest; None when the folder has none (saved
    before digests)."""
    path = os.path.join(model_dir, INTEGRITY)
    if not os.path.lexists(path):
        return None
    fsutil.inside(model_dir, path)
    raw = read_json_object(path, f"{path} not found")
    fsutil.recorded_parts(raw, path)
    return raw


def verify_model_dir(model_dir: str, current: dict) -> str:
    """The folder's digest, after checking its parts' `current` digests against integrity.json (a folder
    without one: one warning, and the digest of what it holds now)."""
    raw = read_integrity(model_dir)
    if raw is None:
        fsutil.warn_unverified(model_dir, f"has no {INTEGRITY} (saved by an older mmbert)")
        return fsutil.combine(current)
    part = fsutil.first_difference(raw["parts"], current)
    if part is not None:
        state = "is missing" if current[part] is None else "is not the one saved with it"
        raise ArtifactError(f"model folder {model_dir}: {part} {state} (its digest differs from {INTEGRITY}): the "
                            f"folder mixes files of different runs, or {part} was changed after saving; use the "
                            f"run's own folder")
    return raw["digest"]


def model_dir_digest(model_dir: str) -> str:
    """The digest a model folder records (or, saved before digests, of what it holds now)."""
    raw = read_integrity(model_dir)
    return raw["digest"] if raw is not None else fsutil.combine(fsutil.part_digests(model_dir, PARTS))


def load_weights(path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise ArtifactError(f"model weights not found: {path}")
    try:
        return load_file(path)
    except PermissionError as e:
        raise fsutil.read_error(path, e) from None
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{path} is not a readable safetensors file (truncated or corrupted?): {e}") from None


def read_weights_header(path: str) -> dict[str, tuple[list[int], str]]:
    """name -> (shape, dtype) from the safetensors header only: nothing is allocated. safetensors checks
    that the header's offsets fit the file, so these shapes are bounded by the file's real size."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise ArtifactError(f"model weights not found: {path}")
    try:
        with safe_open(path, "pt") as f:
            return {k: (list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except PermissionError as e:
        raise fsutil.read_error(path, e) from None
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{path} is not a readable safetensors file (truncated or corrupted?): {e}") from None


def require_model_dir(model_dir: str):
    if not os.path.isdir(model_dir):
        raise ArtifactError(f"model directory not found: {model_dir}")


# model_spec.json field -> (check, what it must be; a callable for what can grow, e.g. registered fusions)
SPEC_FIELDS = {
    "fusion": (lambda v: isinstance(v, str) and v in fusion_names(), lambda: f"one of {', '.join(fusion_names())}"),
    "hidden_dim": (lambda v: is_int(v, 1), "an integer >= 1"),
    "num_heads": (lambda v: is_int(v, 1), "an integer >= 1"),
    "dropout": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1, "a number in [0, 1)"),
    "pooling": (lambda v: v in POOLINGS, f"one of {', '.join(POOLINGS)}"),
    "num_numeric": (lambda v: is_int(v, 0), "an integer >= 0"),
    "cardinalities": (lambda v: isinstance(v, list) and all(is_int(n, 0) for n in v), "a list of integers >= 0"),
    "cat_embedding_dim": (lambda v: is_int(v, 1), "an integer >= 1"),
    "num_classes": (lambda v: is_int(v, 1), "an integer >= 1"),
    "encoder": (lambda v: isinstance(v, str), "a string"),
}
# fields a model_spec.json written before regression existed does not have (it is a classifier)
OPTIONAL_SPEC_FIELDS = {
    "task": (lambda v: v in (CLASSIFICATION, REGRESSION), f"'{CLASSIFICATION}' or '{REGRESSION}'"),
    "target_mean": (lambda v: v is None or _finite(v), "a finite number or null"),
    "target_std": (lambda v: v is None or (_finite(v) and v > 0), "a finite number > 0 or null"),
}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_spec(model_dir: str) -> ModelSpec:
    """model_spec.json with every field's type and range checked (one error naming the field)."""
    spec_path = os.path.join(model_dir, SPEC)
    hint = " (a finished run's model is its final/ folder)" if os.path.isdir(os.path.join(model_dir, "final")) else ""
    raw = read_json_object(spec_path, f"{model_dir} is not an mmbert model directory: {SPEC} is missing{hint}")
    if not set(SPEC_FIELDS) <= set(raw) <= set(SPEC_FIELDS) | set(OPTIONAL_SPEC_FIELDS):
        raise ArtifactError(f"{spec_path} is corrupted: expected the fields {', '.join(SPEC_FIELDS)} (and "
                            f"{', '.join(OPTIONAL_SPEC_FIELDS)})")
    for name, (ok, want) in {**SPEC_FIELDS, **OPTIONAL_SPEC_FIELDS}.items():
        if name in raw and not ok(raw[name]):
            want = want() if callable(want) else want
            raise ArtifactError(f"{spec_path}: field '{name}' must be {want}, got {raw[name]!r:.80}")
    if raw["hidden_dim"] % raw["num_heads"]:
        raise ArtifactError(f"{spec_path}: field 'num_heads' ({raw['num_heads']}) must divide hidden_dim "
                            f"({raw['hidden_dim']})")
    return ModelSpec(**raw)


def check_spec_against_preprocessing(spec: ModelSpec, pre: Preprocessor, model_dir: str):
    implied = {"num_numeric": len(pre.numeric_columns), "num_classes": pre.num_outputs,
               "cardinalities": [len(pre.vocabularies[c]) for c in pre.categorical_columns], "task": pre.task,
               "target_mean": pre.target_mean, "target_std": pre.target_std}
    for name, value in implied.items():
        if getattr(spec, name) != value:
            raise ArtifactError(f"{os.path.join(model_dir, SPEC)}: field '{name}' is {getattr(spec, name)!r:.80} but "
                                f"{PREPROCESSING} implies {value!r:.80}")


def _check_encoder_config(model_dir: str, n_tensors: int):
    """Counts that drive how many modules get built must be bounded before building, even on the meta
    device: each layer holds >= 1 tensor of model.safetensors."""
    path = os.path.join(model_dir, "encoder", "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return  # load_encoder reports a missing or unreadable config
    for key in LAYER_KEYS:
        v = raw.get(key) if isinstance(raw, dict) else None
        if v is not None and not (is_int(v, 0) and v <= n_tensors):
            raise ArtifactError(f"{path}: field '{key}' must be an integer <= the {n_tensors} tensors of {WEIGHTS}, "
                                f"got {v!r:.80}")



def _meta_model(spec: ModelSpec, model_dir: str, trust_remote_code: bool) -> MultimodalClassifier:
    """The model the spec and encoder config describe, on the meta device: shapes, no memory."""
    enc_dir = os.path.join(model_dir, "encoder")
    with torch.device("meta"):
        encoder = None
        if fusion_spec(spec.fusion).text:
            try:
                encoder = load_encoder(spec.encoder, False, trust_remote_code, enc_dir)
            except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
                raise ArtifactError(f"{enc_dir}/config.json does not describe an encoder: "
                                    f"{str(e).splitlines()[0]}") from None
        try:
            return MultimodalClassifier(spec, encoder)
        except (ValueError, TypeError, RuntimeError, AssertionError) as e:
            raise ArtifactError(f"{os.path.join(model_dir, SPEC)} does not describe a model: {e}") from None


def _blame(key: str, expected: list[int], actual: list[int], spec: ModelSpec, model: MultimodalClassifier) -> str:
    """The file (and the fields with a dimension the weights do not have) behind a shape mismatch."""
    if key.startswith("text_encoder.encoder.") and model.text_encoder is not None:
        source, fields = "encoder/config.json", model.text_encoder.encoder.config.to_dict()
    else:
        source, fields = SPEC, spec.to_dict()
    suspects = [k for k, v in fields.items() if is_int(v, 0) and v in expected and v not in actual]
    return source + (f" (field {', '.join(repr(k) for k in suspects)})" if suspects else "")


def check_weights_match(model: MultimodalClassifier, spec: ModelSpec, header: dict, model_dir: str):
    """Compare the meta model's tensors with the safetensors header: names, shapes, floating dtypes."""
    weights = os.path.join(model_dir, WEIGHTS)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    if missing or unexpected:
        raise ArtifactError(f"{weights} does not match {SPEC}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for key, t in expected.items():
        shape, dtype = header[key]
        if list(t.shape) != shape:
            source = _blame(key, list(t.shape), shape, spec, model)
            raise ArtifactError(f"{weights}: tensor '{key}' has shape {shape} but {source} implies {list(t.shape)}")
        if t.is_floating_point() and dtype not in FLOAT_DTYPES:
            raise ArtifactError(f"{weights}: tensor '{key}' is {dtype}, not a floating-point type")



def check_max_tokens(pre: Preprocessor, model: MultimodalClassifier, model_dir: str):
    positions = position_limit(model.text_encoder.encoder.config) if model.text_encoder is not None else None
    if positions is not None and pre.max_tokens > positions:
        raise ArtifactError(f"{os.path.join(model_dir, PREPROCESSING)}: field 'max_tokens' ({pre.max_tokens}) exceeds "
                            f"the {positions} positions (max_position_embeddings) of encoder/config.json")


def validate_model_dir(model_dir: str, trust_remote_code: bool = False) -> tuple[ModelSpec, Preprocessor, str]:
    """Every file of a model directory checked against the others before any weight is allocated: a
    tampered file is one error naming it (and the field), never a traceback or a multi-GB allocation; then
    the parts against the digest recorded when the folder was saved. Returns (spec, preprocessing, digest)."""
    require_model_dir(model_dir)
    # first: every part is hashed (a link out of the folder or an unreadable file is refused here, before
    # anything reads through it); compared last, so a damaged file is named by the precise checks below
    current = fsutil.part_digests(model_dir, PARTS)
    spec = read_spec(model_dir)
    pre = Preprocessor.load(os.path.join(model_dir, PREPROCESSING))
    check_spec_against_preprocessing(spec, pre, model_dir)
    header = read_weights_header(os.path.join(model_dir, WEIGHTS))
    _check_encoder_config(model_dir, len(header))
    meta = _meta_model(spec, model_dir, trust_remote_code)
    check_weights_match(meta, spec, header, model_dir)
    check_max_tokens(pre, meta, model_dir)
    return spec, pre, verify_model_dir(model_dir, current)


@dataclass
class ModelDir:
    """A re-opened model directory: everything scoring raw rows needs, and the run's typed config."""
    path: str
    spec: ModelSpec
    pre: Preprocessor
    tokenizer: object
    model: MultimodalClassifier  # float weights, eval mode, on the CPU (an EnsembleModel for an ensemble)
    members: Optional[list[str]] = None  # an ensemble's member directories (mmbert/ensemble.py)
    digest: Optional[str] = None  # integrity.json's digest (an ensemble: its first member's)

    @property
    def pad_id(self) -> int:
        from .data.tokenize import pad_id

        return pad_id(self.tokenizer)

    def config(self) -> Config:
        return read_run_config(self.path)


def open_model_dir(model_dir: str, trust_remote_code: bool = False) -> ModelDir:
    """Rebuild a model directory: every file checked against the others first (validate_model_dir), then
    the weights. Only JSON, YAML (safe_load) and safetensors are read: a pickle placed in the directory is
    never loaded, and no remote code runs unless trust_remote_code."""
    from .data.tokenize import load_tokenizer

    spec, pre, digest = validate_model_dir(model_dir, trust_remote_code)
    weights = load_weights(os.path.join(model_dir, WEIGHTS))
    model = build_model(spec, None, pretrained=False, trust_remote_code=trust_remote_code,
                        encoder_config_dir=os.path.join(model_dir, "encoder"))
    model.load_state_dict(weights, strict=True)  # names and shapes were checked against the header
    model.eval()
    tok_dir = os.path.join(model_dir, "tokenizer")
    tokenizer = load_tokenizer(tok_dir if os.path.isdir(tok_dir) else pre.tokenizer, trust_remote_code)
    return ModelDir(model_dir, spec, pre, tokenizer, model, digest=digest)


def read_run_config(model_dir: str) -> Config:
    """MODEL_DIR/config.yaml (the config training ran with) through the typed config: the same keys and
    defaults training saw, so its splits are re-selected by the same function. No cross-key validation: a
    recorded resume path may be gone. A missing or tampered file is one ArtifactError naming it."""
    import yaml

    path = os.path.join(model_dir, "config.yaml")
    if not os.path.isfile(path):
        raise ArtifactError(f"{path} not found: give the data (--data, and --indices) explicitly")
    fsutil.inside(model_dir, path)
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    except PermissionError as e:
        raise fsutil.read_error(path, e) from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ArtifactError(f"{path} does not hold a training config (sections data, model, train, dist)")
    try:
        return config_from_dict(raw, check=False)
    except ConfigError as e:
        raise ArtifactError(f"{path}: {e}") from None
