#!/usr/bin/env bash
# The cluster path on one accelerator, in one table (about 8 minutes on one H100 / H200):
#   1. bf16 training-step throughput of DiT-XL/2 and MaskDiT-XL/2 (r=0.5) on 4x32x32 latents
#      (256 px), eager and compiled, at the largest batch up to 256 that fits; MFU against the bf16
#      matmul peak measured in the same run (benchmarks/bench_train_step.py; attention is torch's
#      scaled_dot_product_attention, which picks flash attention for bf16 on such GPUs).
#   2. a 200-step MaskDiT-XL/2 (skip branches) trainer run through the deepspeed launcher on
#      synthetic latent shards (ZeRO-2, bf16, EMA, in-loop evaluation off): its logged images/s
#      against the bare step of the same network at the same batch.
#   3. sampling 8 images from that run's EMA (Heun, 50 steps, guidance 1.5) without and with
#      Skip-Cache (interval 2).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          (default OUT_DIR: gpu_check_out)
#   GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh   rehearsal on a CPU: small models and sizes
#
# Part 1 needs python3 with torch, numpy and einops (and an accelerator, unless tiny); parts 2 and
# 3 also need deepspeed, webdataset, braceexpand, pyyaml, safetensors, Pillow and scikit-learn
# (pip install them, or PYTHONPATH to where they were installed). It names what is missing and
# runs the parts it can. Everything it writes goes under OUT_DIR; the table is OUT_DIR/table.md.
set -uo pipefail
mkdir -p "${1:-gpu_check_out}" && OUT=$(cd "${1:-gpu_check_out}" && pwd)  # relative to where it was called
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "${GPU_CHECK_TINY:-0}" = 1 ]; then
  MODELS=(DiT-S/2 MaskDiT-S/2); MASKED=MaskDiT-S/2; BATCH=8; SIZE=8; RES=8; STEPS=20; LOG=5; WORKERS=1
  STEP_ARGS=(--rounds 1 --steps 2 --compile no --threads 2); SAMPLE_STEPS=4; RANKS=1
else
  MODELS=(DiT-XL/2 MaskDiT-XL/2); MASKED=MaskDiT-XL/2; BATCH=256; SIZE=32; RES=32; STEPS=200; LOG=20; WORKERS=4
  STEP_ARGS=(--rounds 3 --steps 5 --compile both --fit-batch); SAMPLE_STEPS=50; RANKS=1
fi

absent() {  # the import names among "$@" that this python cannot find
  "$PY" -c 'import importlib.util, sys; print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))' "$@"
}
missing1=$(absent torch numpy einops)
[ -z "$missing1" ] || { echo "gpu_check: part 1 needs these python packages: $missing1"; exit 2; }
missing=$(absent deepspeed webdataset braceexpand yaml safetensors PIL sklearn)
"$PY" -c "import torch, sys; sys.exit(0 if torch.accelerator.is_available() or '${GPU_CHECK_TINY:-0}' == '1' else 1)" \
  || { echo "gpu_check: torch sees no accelerator (GPU_CHECK_TINY=1 rehearses on the CPU)"; exit 2; }

echo "== 1. training-step throughput (bare step: forward, loss, backward, fused AdamW)"
"$PY" benchmarks/bench_train_step.py --models "${MODELS[@]}" --batch $BATCH --input-size $SIZE --mask-ratio 0.5 \
  --dtype bf16 "${STEP_ARGS[@]}" | tee "$OUT/step.txt"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "gpu_check: part 1 failed"; exit 1; }

table() { "$PY" benchmarks/gpu_check_table.py "$OUT" | tee "$OUT/table.md"; }
if [ -n "$missing" ]; then
  echo "gpu_check: parts 2 and 3 skipped: missing python packages (import names): $missing"
  table
  exit 0
fi

# the masked model's batch as part 1 fitted it (eager row), fitted again with the skip branches
B=$(awk -v m="$MASKED r=" -F'|' 'index($2, m) && $2 !~ /compiled/ {gsub(/ /, "", $3); print $3; exit}' "$OUT/step.txt")
"$PY" benchmarks/bench_train_step.py --models "$MASKED" --skip --batch "${B:-$BATCH}" --fit-batch --input-size $SIZE \
  --mask-ratio 0.5 --dtype bf16 --rounds 3 --steps 5 --compile no | tee "$OUT/step_skip.txt"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "gpu_check: the bare step of the skip model failed"; table; exit 1; }
B=$(awk -F'|' '$2 ~ / skip r=/ {gsub(/ /, "", $3); print $3; exit}' "$OUT/step_skip.txt")
echo "== 2. trainer run: $MASKED with skip branches, batch $B, $STEPS steps, ZeRO-2 bf16 through the deepspeed launcher"
"$PY" -m data_tools.cli encode --source digits --out "$OUT/shards" --resolution $RES --encoder pixels \
  --shard-size 200 --quiet || { echo "gpu_check: writing the synthetic shards failed"; table; exit 1; }
cat > "$OUT/run.yaml" <<EOF
run: {name: gpu_check, output_dir: '$OUT/runs', total_steps: $STEPS, seed: 0}
model: {name: $MASKED, skip: true}
data: {shards: '$OUT/shards', batch_size: $B, micro_batch_size: $B, num_workers: $WORKERS, shuffle_buffer: 500}
optim: {lr: 1.0e-4, torch_adam: true, warmup_steps: 10}
phases: {mask_ratio: 0.5}
checkpoint: {every: 100000}
monitor: {log_every: $LOG, sample_count: 4, sample_steps: 4, tensorboard: false}
deepspeed: {zero_stage: 2, precision: bf16}
eval: {every: 0}
EOF
rm -rf "$OUT/runs"
"$PY" -m deepspeed.launcher.runner --num_gpus $RANKS --module trainer.cli --config "$OUT/run.yaml" 2>&1 \
  | grep -v "^\[20" | tee "$OUT/train.txt"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "gpu_check: the trainer run failed"; table; exit 1; }

echo "== 3. sampling without and with Skip-Cache"
for cache in none 2; do
  extra=(--seed 0); [ "$cache" = none ] || extra+=(--skip-cache "$cache")
  "$PY" -m trainer.sample "$OUT/runs/gpu_check" --out "$OUT/samples_$cache" --num-images 8 --steps $SAMPLE_STEPS \
    --guidance-scale 1.5 --no-png --quiet "${extra[@]}" 2>&1 | grep -v "^\[20" | tee "$OUT/sample_$cache.txt"
done
table
