"""Turn a sharded DCP checkpoint (OUTPUT/checkpoints/step_N) into one safetensors file of model weights.

    python -m mmbert.tools.consolidate OUTPUT/checkpoints/step_N model.safetensors

Runs on one process with no model code: DCP's metadata knows every tensor's full shape.
"""
from __future__ import annotations

import argparse
import os

from ..errors import ArtifactError, run_main


@run_main
def main(argv):
    p = argparse.ArgumentParser(prog="python -m mmbert.tools.consolidate", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint_dir")
    p.add_argument("output")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    from ..distributed.checkpoint import COMPLETE, consolidate

    if not os.path.isfile(os.path.join(args.checkpoint_dir, COMPLETE)):
        raise ArtifactError(f"{args.checkpoint_dir} is not a complete checkpoint (no {COMPLETE} marker)")
    n = consolidate(args.checkpoint_dir, args.output)
    print(f"wrote {n} tensors to {args.output}")


if __name__ == "__main__":
    main()
