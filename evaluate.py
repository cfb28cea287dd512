#!/usr/bin/env python
"""Evaluate a trained model on labelled data (metrics, predictions, curves) or predict unlabelled data (the
same as `mmbert evaluate`). Works under torchrun, accelerate launch, srun, or alone:

    python evaluate.py --model-dir runs/womens_clothing/final --split test --output-dir runs/womens_clothing/eval
    torchrun --nproc_per_node 4 evaluate.py --model-dir RUN/final --data new.csv --id-column id --output-dir OUT
    python evaluate.py --onnx exported/model.onnx --split test --output-dir OUT     # through onnxruntime
"""
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from mmbert.cli import evaluate_command  # noqa: E402
from mmbert.errors import run_main  # noqa: E402

main = run_main(evaluate_command)

if __name__ == "__main__":
    main()
