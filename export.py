#!/usr/bin/env python
"""Export a trained model directory to ONNX (probabilities out), verified against PyTorch with onnxruntime
(the same as `mmbert export`):

    python export.py --model-dir runs/womens_clothing/final --output-dir exported
    python export.py --model-dir runs/womens_clothing/final --output-dir exported --quantize int8
"""
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from mmbert.cli import export_command  # noqa: E402
from mmbert.errors import run_main  # noqa: E402

main = run_main(export_command)

if __name__ == "__main__":
    main()
