#!/usr/bin/env python
"""Export a trained model directory to ONNX (probabilities out), verified against PyTorch with onnxruntime:

    python export.py --model-dir runs/womens_clothing/final --output exported/model.onnx
    python export.py --model-dir runs/womens_clothing/final --output exported/model.onnx --quantize int8
"""
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from mmbert.errors import run_main  # noqa: E402


@run_main
def main(argv):
    import json
    import logging

    from mmbert.cli import _Parser
    from mmbert.export.onnx import EXPORTERS, INT8_TOLERANCE, export_onnx

    p = _Parser(prog="export.py", description="Export a consolidated model directory (RUN/final) to ONNX.")
    p.add_argument("--model-dir", required=True, help="consolidated model directory, e.g. runs/NAME/final")
    p.add_argument("--output", required=True, help="the .onnx file to write (or a folder: FOLDER/model.onnx); "
                   "preprocessing.json, model_spec.json and tokenizer/ are written beside it. The folder must be "
                   "new, empty or an earlier export (which is replaced)")
    p.add_argument("--quantize", choices=["int8"], help="also write a dynamic int8 copy (NAME.int8.onnx) for CPU")
    p.add_argument("--int8-tolerance", type=float, default=INT8_TOLERANCE, metavar="DP",
                   help=f"refuse the int8 copy when its probabilities differ from fp32 by more than this on the "
                   f"verification rows (default {INT8_TOLERANCE:g})")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's default)")
    p.add_argument("--exporter", choices=EXPORTERS, default="auto",
                   help="auto: torch.export (dynamo), falling back to TorchScript if that fails or does not verify")
    p.add_argument("--data", help="rows to verify on (default: the run's val/test split from its config.yaml)")
    p.add_argument("--rows", type=int, default=48, help="how many rows to verify on (default 48)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |p_onnx - p_torch| allowed (default 1e-4)")
    p.add_argument("--report", help="also write the export report (JSON) to this file")
    p.add_argument("--debug", action="store_true", help="show tracebacks and exporter output")
    args = p.parse_args(argv)
    if not args.int8_tolerance >= 0:
        p.error(f"--int8-tolerance must be >= 0, got {args.int8_tolerance:g}")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    report = export_onnx(args.model_dir, args.output, quantize=args.quantize, opset=args.opset, exporter=args.exporter,
                         data=args.data, atol=args.tolerance, rows=args.rows, debug=args.debug,
                         int8_tolerance=args.int8_tolerance)
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=1)
    print(f"wrote {', '.join(report['files'])} + preprocessing.json, model_spec.json, tokenizer/ in {report['folder']}")


if __name__ == "__main__":
    main()
