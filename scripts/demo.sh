#!/usr/bin/env bash
# The main job on the built-in default: encode scikit-learn's digits into shards, then train a
# small MaskDiT (Min-SNR, periodic + final unmask tuning) on 2 CPU ranks with the deepspeed
# launcher. Extra args go to the trainer, e.g. --set run.total_steps=100.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
DATA=data/digits16
if [ ! -f "$DATA/manifest.json" ]; then
  mdt-data encode --source digits --out "$DATA" --resolution 16 --encoder pixels --shard-size 200
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PORT=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
deepspeed --num_gpus "${NUM_RANKS:-2}" --master_port "$PORT" --module trainer.cli \
  --config launch_configs/digits_demo.yaml --set "data.shards=$DATA" "$@"
echo "TensorBoard logs: runs/digits_demo/tb   (tensorboard --logdir runs)"
echo "Sample grid:      $(ls -t runs/digits_demo/samples/*.png 2>/dev/null | head -n 1)"
