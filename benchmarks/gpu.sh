#!/usr/bin/env bash
# The GPU half of the benchmarks, for one H100/H200, in under 10 minutes:
#   grounding    Grounding DINO-T size (random weights, class logits damped to ~30 candidates per image), web-like
#                aspect-ratio mix, bf16, call/batch/padding sweep, queued stream, fused Triton deformable attention,
#                compile probe, box fidelity vs fp32 eager, vs the model-card loop
#   kosmos_step  Kosmos-2 1.6B training step (2 accumulated micro-batches of 16 x 512, one optimizer step), HF vs
#                ours eager, whole forward+loss compiled, and FSDP2 bf16 compute weights + selective checkpointing;
#                MFU on the positions computed; top-level device, tokens_per_s, mfu, speedup_vs_hf, date
#   trainer_gpu  the trainer's CUDA paths: bf16 + accumulation + skip of a poisoned step (tiny), FSDP + compile +
#                fused AdamW + checkpoint and resume (kosmos2-base; TRAINER_GPU_SIZE=kosmos2-1.6b for the paper's)
# Imports only torch, transformers, numpy, pillow (triton where present) and this repository's modules.
# Usage: [BENCHES="grounding"] benchmarks/gpu.sh [OUT_DIR]   (default: $OUT if set, else benchmarks/results)
# Each benchmark has its own time limit (seconds; BUDGET_<name> overrides), 580 s in all.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# kosmos_step stops starting new variants before its own limit, so its JSON is always written.
export KOSMOS_STEP_BUDGET_S="${KOSMOS_STEP_BUDGET_S:-80}"
PY="${PYTHON:-python3}"
BENCHES="${BENCHES:-grounding kosmos_step trainer_gpu}"
declare -A BUDGET=([grounding]="${BUDGET_grounding:-330}" [kosmos_step]="${BUDGET_kosmos_step:-100}" \
  [trainer_gpu]="${BUDGET_trainer_gpu:-150}")

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT_DIR/gpu_info.txt"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$OUT_DIR/gpu_info.txt"
"$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1 | tee -a "$OUT_DIR/gpu_info.txt"

status=0
for name in $BENCHES; do
  timeout --signal=INT "${BUDGET[$name]:-270}" "$PY" -m benchmarks run --device cuda --only "$name" --out "$OUT_DIR" \
    2>&1 | tee "$OUT_DIR/${name}_cuda.log" || status=1
done
if [ -f "$OUT_DIR/grounding_cuda.json" ]; then
  "$PY" - "$OUT_DIR/grounding_cuda.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
keys = ("device", "images_per_s_realistic", "speedup_vs_naive", "gpu_utilisation", "box_max_abs_diff_vs_fp32", "date")
print("grounding:", json.dumps({k: r.get(k) for k in keys}))
PYEOF
fi
exit $status
