"""README.md of a saved model folder (final/, best/): what the model reads and predicts, how well the
selected evaluation scored, how it was trained and how to load it. Documentation only: integrity.json covers
the parts that opening the folder reads, not this card."""
from __future__ import annotations

from typing import Optional

CARD = "README.md"
TRAIN_KEYS = ("epochs", "max_steps", "batch_size", "grad_accum", "lr", "head_lr", "schedule", "warmup_ratio",
              "weight_decay", "seed", "metric", "select_best")


def _data_files(dc) -> str:
    split = dc.split
    files = [f for f in (split.train_file, split.val_file, split.test_file) if f]
    return ", ".join(f"`{f}`" for f in ([dc.path] if dc.path else []) + files) or "(none recorded)"


def _metric_rows(metrics: Optional[dict]) -> list[str]:
    rows = [f"| {k} | {v:.4f} |" for k, v in (metrics or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch", "n")]
    return ["| metric | value |", "|---|---|", *rows] if rows else ["No validation evaluation of these weights."]


def model_card(cfg, pre, fusion: str, evaluation: Optional[dict], world_size: int, strategy: str) -> str:
    """The card's markdown. `evaluation`: the val metrics of these weights ({"step": ..., metric: value})."""
    dc, tc, mc = cfg.data, cfg.train, cfg.model
    roles = [("text", pre.text_columns), ("numeric", pre.numeric_columns), ("categorical", pre.categorical_columns)]
    columns = [f"- {role}: " + (", ".join(f"`{c}`" for c in cols) if cols else "(none)") for role, cols in roles]
    classes = ", ".join(f"`{c}`" for c in pre.classes) if pre.classes else "(regression target)"
    step = (evaluation or {}).get("step")
    settings = [f"- {k}: {getattr(tc, k)!r}" for k in TRAIN_KEYS if hasattr(tc, k)]
    lines = [
        "# mmbert model", "",
        f"Task: {pre.task}. Label column `{dc.label_column}`; classes: {classes}.", "",
        f"Data: {_data_files(dc)}", "", "Columns by role:", *columns, "",
        f"Encoder: `{mc.encoder}` (pooling {mc.pooling}); fusion: `{fusion}`.", "",
        "## Validation" + (f" (step {step}, the selected evaluation)" if step is not None else ""), "",
        *_metric_rows(evaluation), "",
        "## Load", "", "```python", "import mmbert", "", 'model = mmbert.load("PATH")  # this folder',
        "predictions = model.predict(df)  # a DataFrame with the columns above", "```", "",
        "## Training", "", f"World size {world_size}, strategy {strategy}; every setting is in config.yaml "
        "(`python train.py --config config.yaml` trains it again).", "", *settings, "",
    ]
    return "\n".join(lines)
