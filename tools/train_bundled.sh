#!/usr/bin/env bash
# Train the two bundled CamVid models from scratch, one after the other, on the CPU.
#
# These are the exact commands and hyper-parameters used for the bundled weights.
# Both runs are resumable: re-running this script continues each run from
# runs/<model>/last.pt (a finished run just reports "done").  Start it detached:
#
#   nohup tools/train_bundled.sh > runs/train_bundled.log 2>&1 &
#
# Per-run output: runs/<model>/{last.pt,best.pt,log.jsonl} and runs/<model>.log.
# Measured on 2 shared AMD EPYC (Zen 4) cores, bf16 autocast, 2 threads:
#   deeplabv3plus ~15 s train + ~4 s val per epoch; unet ~37 s + ~13 s.
# Serving/validation size is CamVid's native 360x480 (H x W): both networks accept
# any size, so frames need no resizing.  Normalisation: RGB / 255, ImageNet mean/std.
# Data: CamVid (CC BY-NC 4.0, Brostow et al. 2009); the weights inherit its terms.
set -u
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/camvid}
PY=${PY:-.venv/bin/python}
THREADS=${THREADS:-2}
export PYTHONPATH=server${PYTHONPATH:+:$PYTHONPATH}
mkdir -p runs

# Common recipe: AdamW (lr 2e-3, weight decay 1e-2 on conv weights only), 3 warm-up
# epochs then cosine to zero, batch 8, random scale 0.6-1.6 + 256x320 crops +
# h-flip + brightness/contrast/saturation jitter +-25%, cross-entropy weighted by
# sqrt(median-frequency), void (11) ignored; val mIoU every epoch, best.pt kept.
common=(--data "$DATA" --batch-size 8 --lr 2e-3 --weight-decay 1e-2 --warmup-epochs 3
        --crop 256 320 --scale 0.6 1.6 --size 360 480 --class-weight sqrt-median
        --threads "$THREADS" --resume)

train() {  # train <model> <epochs>
    echo "$(date -Is) start $1" | tee -a "runs/$1.log"
    nice -n 19 "$PY" -m segserve_server.training.train --model "$1" --epochs "$2" \
        --out "runs/$1" "${common[@]}" >> "runs/$1.log" 2>&1
    echo "$(date -Is) end $1 (exit $?)" | tee -a "runs/$1.log"
}

# What the bundled models got (2026-11-23): deeplabv3plus ran epochs 1-62 of this 150-epoch
# schedule and was stopped there to fit the session; its best val mIoU, 0.6207 at epoch 55, is
# the bundled deeplabv3plus_camvid. unet was then trained with a 45-epoch schedule, stopped
# after epoch 38; its best, 0.6232 at epoch 35, is the bundled unet_camvid.
# Resuming continues each run from runs/<model>/last.pt.
train deeplabv3plus 150   # the cheap one: ~25 ms/frame in onnxruntime on 2 threads
train unet 45             # ~110 ms/frame
