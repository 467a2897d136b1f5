#!/usr/bin/env bash
# The main job on the embedded default data, from a fresh clone:
#   set up .venv, generate the synthetic dataset, pack it into shards/synth, train with DDP
#   (2 CPU processes, or one per GPU), leaving checkpoints, TensorBoard logs and overlays.
# Extra arguments are config overrides, e.g. `bash launch/demo.sh train.epochs=3`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. launch/setup.sh

if [ ! -f shards/synth/manifest.json ]; then
    python -m seg_dist.pack --synthetic --out shards/synth
fi
python -m seg_dist.preview --config configs/default.yaml --out shards/synth/preview.png --overwrite

# One process per GPU where there are GPUs, else 2 CPU processes.
nproc=$(python -c "import torch; print(torch.cuda.device_count() or 2)")
run_dir="runs/demo-$(date +%Y%m%d-%H%M%S)"   # a new folder each time: nothing earlier is overwritten
torchrun --standalone --nproc_per_node="$nproc" -m seg_dist.train \
    --config configs/default.yaml run.dir="$run_dir" "$@"

# Predictions on images the model never saw, through the same command users run on theirs.
python -m seg_dist.synth --out "$run_dir/examples" --n 6 --seed 12345
python -m seg_dist.predict --checkpoint "$run_dir/checkpoints/best.pt" --input "$run_dir/examples/images" \
    --out "$run_dir/predictions" --overlay

echo
echo "checkpoints: $run_dir/checkpoints/{last,best}.pt"
echo "metrics:     $run_dir/metrics.jsonl"
echo "overlays:    $run_dir/overlays/ (validation: image | ground truth | prediction)"
echo "predictions: $run_dir/predictions/ (masks as palette PNGs; *_overlay.png: image | prediction | blend)"
echo "TensorBoard: tensorboard --logdir $run_dir/tb"
echo "augmentation preview: shards/synth/preview.png"
