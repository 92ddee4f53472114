#!/usr/bin/env bash
# From final weights to the bundled repository entry: export (FP32, version 1), INT8 static
# quantization calibrated on 32 CamVid train frames (version 2, served by default), and the
# offline evaluation of both versions on CamVid val, into a staging repository.
#
#   tools/bundle_models.sh deeplabv3plus [unet ...]     # reads runs/final_<model>/final.pt
#
# Staging: $STAGE (default runs/bundle)/<model>_camvid/, evaluations in $STAGE/<model>_v<N>.txt.
# Then copy the entry into model_repository/ (config.pbtxt, labels.txt, 1/, 2/) and commit.
# Final weights are trained on train + val, so the val figures printed here are figures on
# frames the weights have seen: they check that nothing broke, they do not estimate accuracy.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/camvid}
RUNS=${RUNS:-runs}
STAGE=${STAGE:-$RUNS/bundle}
THREADS=${THREADS:-2}
[ "$#" -gt 0 ] || { echo "usage: $0 deeplabv3plus|unet ..." >&2; exit 2; }
mkdir -p "$STAGE"
segserve() { "${SEGSERVE:-.venv/bin/segserve}" "$@"; }

for model in "$@"; do
    name=${model}_camvid
    checkpoint=$RUNS/final_$model/final.pt
    [ -f "$checkpoint" ] || { echo "$checkpoint is missing (tools/train_bundled.sh)" >&2; exit 1; }
    rm -rf "${STAGE:?}/$name"
    segserve export --checkpoint "$checkpoint" --repository "$STAGE" --name "$name" \
        --data "$DATA" --threads "$THREADS"
    segserve quantize "$name" --model-repository "$STAGE" --calibration "$DATA/train"
    for version in 1 2; do
        segserve eval "$DATA/val" --model "$name" --offline --model-repository "$STAGE" \
            --model-version "$version" | tee "$STAGE/${model}_v$version.txt"
    done
done
