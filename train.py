#!/usr/bin/env python
"""Train a text + tabular cross-attention classifier (the same as `mmbert train`). Works under torchrun,
accelerate launch, srun, or alone:

    python train.py --config configs/womens_clothing.yaml
    torchrun --nproc_per_node 2 train.py --config configs/womens_clothing.yaml --strategy fsdp
"""
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from mmbert.cli import train_command  # noqa: E402
from mmbert.errors import run_main  # noqa: E402

main = run_main(train_command)

if __name__ == "__main__":
    main()
