#!/usr/bin/env bash
# The GPU half of the benchmarks, for one H100/H200, in under 10 minutes:
#   grounding    Grounding DINO-T size (random weights), bf16, batch sweep, vs the model-card loop
#   kosmos_step  Kosmos-2 1.6B training step (2 accumulated micro-batches of 16 x 512, one optimizer step), HF vs
#                ours eager, whole forward+loss compiled, and FSDP2 bf16 compute weights + selective checkpointing;
#                MFU on the positions computed; top-level device, tokens_per_s, mfu, speedup_vs_hf, date
#   trainer_gpu  the trainer's CUDA paths: bf16 + accumulation + skip of a poisoned step (tiny), FSDP + compile +
#                fused AdamW + checkpoint and resume (kosmos2-base; TRAINER_GPU_SIZE=kosmos2-1.6b for the paper's)
# Imports only torch, transformers, numpy, pillow and this repository's modules.
# Usage: benchmarks/gpu.sh [OUT_DIR]   (default: $OUT if set, else benchmarks/results)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python3}"

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT_DIR/gpu_info.txt"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$OUT_DIR/gpu_info.txt"

status=0
for name in grounding kosmos_step trainer_gpu; do
  budget="${BENCH_BUDGET_S:-270}"
  timeout --signal=INT "$budget" "$PY" -m benchmarks run --device cuda --only "$name" --out "$OUT_DIR" \
    2>&1 | tee "$OUT_DIR/${name}_cuda.log" || status=1
done
exit $status
