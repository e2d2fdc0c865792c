#!/usr/bin/env bash
# Reconstruct an image, a folder of video frames or a video file through Emu3's vision tokenizer
# and print PSNR. All options go to `python -m emu3.cli.reconstruct` (see --help), e.g.
#   bash scripts/infer_img_rec.sh photo.jpg --weights /models/Emu3-VisionTokenizer --output-dir out
#   bash scripts/infer_img_rec.sh clip.gif --weights /models/Emu3-VisionTokenizer --mode graph --dtype bf16
#   bash scripts/infer_img_rec.sh photo.jpg --random-weights      # pipeline check, output is noise
set -euo pipefail
source "$(dirname "$0")/env.sh"
exec "$PY" -m emu3.cli.reconstruct "$@"
