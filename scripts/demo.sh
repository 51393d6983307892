#!/usr/bin/env bash
# The main job on the built-in default: encode the train split of scikit-learn's digits into
# shards, train a small MaskDiT (Min-SNR, periodic + final unmask tuning) on 2 CPU ranks with the
# deepspeed launcher, sample with guidance, and judge the samples with a classifier trained on the
# held-out digits. Extra args go to the trainer, e.g. --set run.total_steps=500.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
DATA=data/digits8
HELDOUT=data/digits8_heldout
RUN=runs/digits_demo
if [ ! -f "$DATA/manifest.json" ]; then
  mdt-data encode --source digits:train --out "$DATA" --resolution 8 --encoder pixels --shard-size 50 --quiet
fi
if [ ! -f "$HELDOUT/manifest.json" ]; then  # the validation loss's held-out samples
  mdt-data encode --source digits:heldout --out "$HELDOUT" --resolution 8 --encoder pixels --shard-size 50 --quiet
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PORT=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
deepspeed --num_gpus "${NUM_RANKS:-2}" --master_port "$PORT" --module trainer.cli \
  --config launch_configs/digits_demo.yaml --set "data.shards=$DATA" "data.val_shards=$HELDOUT" "$@"
mdt-sample "$RUN" --out "$RUN/eval" --per-class 20 --guidance-scale 4 --steps 18 --quiet
mdt-eval "$RUN/eval/samples.npz" --metrics digits_acc,digits_fd
echo "quality while training (in-loop evaluations, $RUN/metrics.jsonl):"
mdt-eval --history "$RUN"
echo "sample grid:      $RUN/eval/grid.png"
echo "TensorBoard logs: $RUN/tb   (tensorboard --logdir runs)"
