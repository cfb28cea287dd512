"""The fusion registry: every fusion's name, what it reads and how it is built, in one place.

Callers never compare fusion names: the model builder, config validation, the ONNX graph's inputs, the
artifact checks and permutation importance all ask `fusion_spec(name)`. The built-in fusions are declared
below with their classes named as "module:attribute" and imported on first build, so listing or checking
fusion names imports no torch. A new fusion is one class plus one registration:

    @register_fusion("mean", text=True, tabular=True)
    class MeanFusion(nn.Module):
        def __init__(self, hidden_dim, num_heads, num_classes, dropout): ...
        def forward(self, text, tab, text_mask=None): ...   # B x H each (tab_tokens: B x L x H, B x F x H)
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Union

TEXT_INPUTS = ("input_ids", "attention_mask")
NUMERIC_INPUTS = ("numeric", "missing")
CATEGORICAL_INPUTS = ("categorical",)
TEXT, TABULAR = "text", "tabular"  # the two sides a fusion may read


@dataclass(frozen=True)
class FusionSpec:
    """What a fusion reads and how to build it.

    text: it reads the text encoder's output (the model has a text encoder and input_ids/attention_mask).
    tabular: it reads the tabular columns (numeric/missing/categorical inputs).
    tab_tokens: token level: the text side is every token's state (all chunks, with a mask) instead of one
        pooled vector, and the tabular side one token per feature (TabTokens) instead of TabAE's vector.
    needs_tabular: the model cannot be built without tabular columns. (Whatever reads tabular columns falls
        back to text_only when a run configures none: models.classifier.effective_fusion.)
    factory: the class (or any callable) taking (hidden_dim, num_heads, num_classes, dropout, **options);
        a "module:attribute" string is imported on first build.
    """
    name: str
    factory: Union[str, Callable[..., Any]]
    text: bool = True
    tabular: bool = True
    tab_tokens: bool = False
    needs_tabular: bool = False
    options: dict = field(default_factory=dict)
    description: str = ""

    def sides(self) -> frozenset[str]:
        return frozenset(s for s, on in ((TEXT, self.text), (TABULAR, self.tabular)) if on)

    def input_names(self, num_numeric: int, num_categorical: int) -> list[str]:
        """The model inputs this fusion reads, in serving.INPUTS order, given the model's tabular columns."""
        names = list(TEXT_INPUTS) if self.text else []
        if self.tabular:
            names += list(NUMERIC_INPUTS) if num_numeric > 0 else []
            names += list(CATEGORICAL_INPUTS) if num_categorical > 0 else []
        return names

    def resolve(self) -> Callable[..., Any]:
        if not isinstance(self.factory, str):
            return self.factory
        module, _, attr = self.factory.partition(":")
        return getattr(importlib.import_module(module), attr)

    def build(self, hidden_dim: int, num_heads: int, num_classes: int, dropout: float):
        return self.resolve()(hidden_dim, num_heads, num_classes, dropout, **self.options)


_REGISTRY: dict[str, FusionSpec] = {}


class UnknownFusion(KeyError, ValueError):
    """A name no fusion is registered under (a KeyError for lookups, a ValueError for model builders)."""

    def __str__(self):
        return self.args[0]


def register_fusion(name: str, factory: Union[str, Callable[..., Any], None] = None, *, replace: bool = False,
                    **fields):
    """Registers a fusion: register_fusion(name, cls_or_factory, text=..., tabular=..., ...), or as a class
    decorator @register_fusion(name, text=..., ...). A taken name is refused unless replace=True.
    Returns the factory (so the decorator leaves the class as it is)."""
    if not name or not isinstance(name, str):
        raise ValueError(f"a fusion name must be a non-empty string, got {name!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"fusion '{name}' is already registered")
    if factory is None:
        return lambda f: register_fusion(name, f, replace=replace, **fields)
    spec = FusionSpec(name, factory, **fields)
    if not (spec.text or spec.tabular):
        raise ValueError(f"fusion '{name}' must read text, tabular columns or both")
    _REGISTRY[name] = spec
    return factory


def unregister_fusion(name: str):
    """Removes a fusion registered by register_fusion (tests, plugins that replace one)."""
    _REGISTRY.pop(name, None)


def fusion_names() -> tuple[str, ...]:
    """Every registered fusion's name, in registration order (the built-ins first)."""
    return tuple(_REGISTRY)


def fusion_spec(name: str) -> FusionSpec:
    """The spec of a registered fusion; UnknownFusion naming the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownFusion(f"unknown fusion {name!r} (one of {', '.join(_REGISTRY)})") from None


def sides_read(names: Iterable[str]) -> frozenset[str]:
    """The sides ("text", "tabular") that any of these fusions reads (an ensemble reads the union)."""
    return frozenset().union(*(fusion_spec(n).sides() for n in names))


# ----------------------------------------------------------------------------- the built-in fusions
_F = "mmbert.models.fusion:"
register_fusion("cross_attn", _F + "CrossAttnFusion", needs_tabular=True,
                description="text and tabular vectors attend to each other (one token each)")
register_fusion("cross_attn_tokens", _F + "TokenCrossAttnFusion", tab_tokens=True,
                description="every text token and one token per tabular feature attend to each other")
register_fusion("concat", _F + "ConcatFusion", needs_tabular=True, description="head on [text; tabular]")
register_fusion("gated", _F + "GatedFusion", needs_tabular=True,
                description="per-dimension sigmoid gate between text and tabular")
register_fusion("text_only", _F + "SingleFusion", tabular=False, options={"use": TEXT},
                description="head on the text vector (tabular columns unused)")
register_fusion("tab_only", _F + "SingleFusion", text=False, needs_tabular=True, options={"use": TABULAR},
                description="head on the tabular vector (no text encoder)")
