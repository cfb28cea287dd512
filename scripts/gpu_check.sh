#!/usr/bin/env bash
# The GPU check: the CUDA end-to-end tests (tests/test_gpu.py, marker `gpu`) and short throughput runs of the
# real encoder (the shipped config: all-MiniLM-L6-v2, bf16): none (eager and compiled) and FSDP2 on one GPU and,
# with 2+ GPUs, DDP (eager and compiled) and FSDP2 on all of them.
#
#   scripts/gpu_check.sh                    # from anywhere; uses .venv/bin/python when present
#   STEPS=100 BATCH=64 scripts/gpu_check.sh # a longer throughput run
#
# Safe without a GPU: it says so, shows the GPU tests skipping, and exits 0.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
STEPS="${STEPS:-60}"
BATCH="${BATCH:-64}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

NGPU="$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')"
if [ "$NGPU" = "0" ]; then
  echo "gpu_check: no CUDA GPU (torch.cuda.is_available() is False): the GPU tests skip, no throughput run"
  "$PY" -m pytest -m gpu tests/test_gpu.py -v -rs
  rc=$?
  [ $rc -eq 0 ] || [ $rc -eq 5 ] || exit $rc
  echo "gpu_check: skipped (no GPU)"
  exit 0
fi

echo "== cards"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
else
  "$PY" -c 'import torch; [print(i, torch.cuda.get_device_name(i)) for i in range(torch.cuda.device_count())]'
fi
CARD="$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')"

echo "== tests/test_gpu.py ($NGPU GPU(s))"
"$PY" -m pytest -m gpu tests/test_gpu.py -v -rs -s
tests_rc=$?

throughput() {  # $1 = processes, $2 = strategy, $3 = label, then extra train.py arguments
  local n="$1" strategy="$2" label="$3" out
  shift 3
  out="$(mktemp -d)/run"
  local cmd=("$PY")
  [ "$n" -gt 1 ] && cmd=("$PY" -m torch.distributed.run --nproc_per_node "$n" --rdzv-backend c10d
                         --rdzv-endpoint localhost:0 --max-restarts 0)
  if ! "${cmd[@]}" train.py --config configs/womens_clothing.yaml --output-dir "$out" --strategy "$strategy" \
      --set dist.mixed_precision=bf16 --max-steps "$STEPS" --batch-size "$BATCH" --log-every 5 \
      --max-train-rows $((STEPS * BATCH * n)) --max-eval-rows 64 "$@" >"$out.log" 2>&1; then
    tail -30 "$out.log"; echo "gpu_check: throughput run ($label) on $n GPU(s) failed"; return 1
  fi
  "$PY" - "$out/metrics.jsonl" "$n" "$CARD" "$BATCH" "$label" <<'PYEOF'
import json, os, statistics, sys
sys.path.insert(0, "benchmarks")
from common import encoder_shapes
recs = [r for r in map(json.loads, open(sys.argv[1])) if "samples_per_s" in r][2:]  # warm-up (and compile) windows
sps = statistics.median(r["samples_per_s"] for r in recs)
tps = statistics.median(r["tokens_per_s"] for r in recs)
mem = max(r.get("peak_mem_gib", 0) for r in recs)
# MFU: 6 x non-embedding parameters per real token (forward + backward; attention's T^2 term left out, so a
# lower bound) against the card's dense bf16 peak; PEAK_TFLOPS overrides the table
PEAKS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L4": 121, "A10": 125, "A6000": 155}
card, n = sys.argv[3], int(sys.argv[2])
peak = float(os.environ.get("PEAK_TFLOPS") or next((v for k, v in PEAKS.items() if k in card), 0))
flops = 6 * encoder_shapes("sentence-transformers/all-MiniLM-L6-v2")["non_embedding_params"] * tps
mfu = f"MFU {100 * flops / (peak * 1e12 * n):.2f}% of {peak:g} TFLOPS bf16 per GPU" if peak else "MFU n/a (set PEAK_TFLOPS)"
print(f"throughput: all-MiniLM-L6-v2, {sys.argv[5]}, {n} x {card}, batch {sys.argv[4]}/GPU: "
      f"{sps:.1f} samples/s, {tps:.0f} real tokens/s, {mfu}, peak {mem:.2f} GiB allocated "
      f"(median of {len(recs)} logged windows)")
PYEOF
  local rc=$?
  rm -rf "$(dirname "$out")"
  return $rc
}

echo "== real-encoder throughput ($STEPS steps)"
tp_rc=0
throughput 1 none "none bf16" || tp_rc=1
throughput 1 none "none bf16 compile" --set train.compile=true || tp_rc=1
throughput 1 fsdp "FSDP2 bf16" || tp_rc=1
if [ "$NGPU" -gt 1 ]; then
  throughput "$NGPU" ddp "DDP bf16" || tp_rc=1
  throughput "$NGPU" ddp "DDP bf16 compile" --set train.compile=true || tp_rc=1
  throughput "$NGPU" fsdp "FSDP2 bf16" || tp_rc=1
fi
[ $tests_rc -eq 0 ] && [ $tp_rc -eq 0 ] && echo "gpu_check: OK on $CARD" && exit 0
echo "gpu_check: FAILED (tests rc=$tests_rc, throughput rc=$tp_rc)"
exit 1
