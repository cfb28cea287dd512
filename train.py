#!/usr/bin/env python
"""Train a text + tabular cross-attention classifier. Works under torchrun, accelerate launch, srun, or alone:

    python train.py --config configs/womens_clothing.yaml
    torchrun --nproc_per_node 2 train.py --config configs/womens_clothing.yaml --strategy fsdp
"""
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from mmbert.errors import run_main  # noqa: E402


@run_main
def main(argv):
    from mmbert.cli import parse_train_args
    from mmbert.training.loop import train

    cfg, _ = parse_train_args(argv)
    train(cfg)


if __name__ == "__main__":
    main()
