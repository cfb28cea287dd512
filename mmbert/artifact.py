"""The consolidated model directory (`RUN/final`): safetensors + JSON only, loadable without executing code.

    model.safetensors      weights (full state dict)
    model_spec.json        architecture of the multimodal classifier
    encoder/config.json    the text encoder's HF config (architecture only, no weights download)
    tokenizer/             tokenizer files (tokenizer.json, vocab ...)
    preprocessing.json     column roles, numeric statistics, vocabularies, label map
    config.yaml            the resolved training config (informational)
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch

from .data.preprocess import Preprocessor
from .errors import ArtifactError
from .models.classifier import ModelSpec, MultimodalClassifier, load_encoder

WEIGHTS = "model.safetensors"
SPEC = "model_spec.json"
PREPROCESSING = "preprocessing.json"


def build_model(spec: ModelSpec, encoder_source: Optional[str], pretrained: bool, trust_remote_code: bool = False,
                encoder_config_dir: Optional[str] = None,
                attention_dropout: Optional[float] = None) -> MultimodalClassifier:
    encoder = None
    if spec.fusion != "tab_only":
        encoder = load_encoder(encoder_source or spec.encoder, pretrained, trust_remote_code, encoder_config_dir,
                               attention_dropout=attention_dropout)
    return MultimodalClassifier(spec, encoder)


def save_artifact(out_dir: str, state_dict: dict, spec: ModelSpec, model: MultimodalClassifier, pre: Preprocessor,
                  tokenizer, config_dict: Optional[dict] = None):
    """Writes into `out_dir.tmp` then renames, so a crash never leaves a half-written final/."""
    from safetensors.torch import save_file

    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": "pt", "producer": "mmbert"})
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
    if os.path.isdir(out_dir):
        old = out_dir.rstrip("/") + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def load_weights(path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise ArtifactError(f"model weights not found: {path}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{path} is not a readable safetensors file (truncated or corrupted?): {e}") from None


def require_model_dir(model_dir: str):
    if not os.path.isdir(model_dir):
        raise ArtifactError(f"model directory not found: {model_dir}")


def load_artifact(model_dir: str, trust_remote_code: bool = False):
    """Rebuild (model in eval mode, preprocessor, tokenizer) from a model directory. Only JSON and
    safetensors are read: a pickle placed in the directory is never loaded."""
    require_model_dir(model_dir)
    spec_path = os.path.join(model_dir, SPEC)
    if not os.path.isfile(spec_path):
        raise ArtifactError(f"{model_dir} is not an mmbert model directory: {SPEC} is missing")
    try:
        with open(spec_path) as f:
            spec = ModelSpec(**json.load(f))
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{spec_path} is corrupted: {e}") from None
    pre = Preprocessor.load(os.path.join(model_dir, PREPROCESSING))
    weights = load_weights(os.path.join(model_dir, WEIGHTS))
    model = build_model(spec, None, pretrained=False, trust_remote_code=trust_remote_code,
                        encoder_config_dir=os.path.join(model_dir, "encoder"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ArtifactError(f"{model_dir}/{WEIGHTS} does not match {SPEC}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.eval()
    from .data.tokenize import load_tokenizer

    tok_dir = os.path.join(model_dir, "tokenizer")
    tokenizer = load_tokenizer(tok_dir if os.path.isdir(tok_dir) else pre.tokenizer, trust_remote_code)
    return model, pre, tokenizer
