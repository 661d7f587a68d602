#!/usr/bin/env bash
# The GPU acceptance check of the kernel seam (docs/kernels.md), for the first GPU the project gets:
#   bash scripts/gpu_check.sh [output folder]
# 1. the CUDA tests (pytest -m cuda): Flex and fla forward and backward against the references,
#    fp32 and bf16; auto against the torch kernel in a training step; no host sync (CUDA's sync
#    debug mode); compile: true with Flex's backward;
# 2. a train_step bench at 8K and 32K for every backend: tokens/s, peak memory, MFU (bf16);
# 3. full against sliding_window, linear and moba at 32K (the mixing kernel, forward + backward).
# Prints one compact table and exits non-zero on any failed test or errored bench row. Sized for
# about 8 minutes on one H100: each bench part stops at its time budget and records the rest
# as skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

python - <<'PY'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device: this check needs a GPU (torch sees none here)")
print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
PY

OUT="${1:-outputs/gpu_check/$(date +%Y-%m-%d_%H-%M-%S)}"
mkdir -p "$OUT"
export WANDB_MODE=offline WANDB_SILENT=true

status=0
python -m pytest -q -m cuda -p no:cacheprovider --junitxml="$OUT/cuda_tests.xml" tests \
  > "$OUT/cuda_tests.txt" 2>&1 || status=1
tail -n 3 "$OUT/cuda_tests.txt"

BENCH=(anchors=[] dtypes=[bf16] batch=1 model_size=small warmup=1 repeats=3 memory_cap_mib=null)
python -m longctx.bench modes=[train_step] lengths=[8192,32768] "${BENCH[@]}" \
  config_budget_s=40 total_budget_s=210 hydra.run.dir="$OUT/train_step" \
  > "$OUT/train_step.log" 2>&1 || status=1
python -m longctx.bench modes=[fwd_bwd] lengths=[32768] backends=[full,sliding_window,linear,moba] \
  "${BENCH[@]}" config_budget_s=40 total_budget_s=60 hydra.run.dir="$OUT/at_32k" \
  > "$OUT/at_32k.log" 2>&1 || status=1

python - "$OUT" "$status" <<'PY'
import json
import sys
from pathlib import Path

out, status = Path(sys.argv[1]), int(sys.argv[2])
print(f"\n{'part':<10} {'backend':<18} {'N':>6} {'tokens/s':>11} {'peak MiB':>9} {'MFU':>6}  status")
for part in ("train_step", "at_32k"):
    path = out / part / "bench.json"
    if not path.exists():
        print(f"{part:<10} no bench.json (see {part}.log)")
        status = 1
        continue
    for row in json.loads(path.read_text())["rows"]:
        if row["status"] == "error":
            status = 1
        rate = f"{row['tokens_per_s']:,.0f}" if row["tokens_per_s"] else "-"
        memory = f"{row['memory_mib']:,.0f}" if row["memory_mib"] is not None else "-"
        mfu = f"{row['mfu']:.1%}" if row.get("mfu") is not None else "-"
        note = row["status"] if row["status"] == "ok" else f"{row['status']}: {row['reason'][:60]}"
        print(f"{part:<10} {row['subject']:<18} {row['seq_len']:>6} {rate:>11} {memory:>9} {mfu:>6}  {note}")
print(f"\ngpu_check: {'FAILED' if status else 'passed'} (outputs in {out})")
sys.exit(status)
PY
