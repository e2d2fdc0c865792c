#!/usr/bin/env bash
# Text-to-image with Emu3-Gen. Without --model/--vq it runs tiny RANDOM demo weights (noise images).
# Options: see `bash scripts/infer_img_gen.sh --help` or docs/inference.md.
set -euo pipefail
source "$(dirname "$0")/env.sh"
exec "$PY" -m emu3.cli.generate_image "$@"
