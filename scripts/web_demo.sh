#!/usr/bin/env bash
# The web demo (gradio): text-to-image and chat about an image in the browser. Prints the URL.
# Without --model/--vq it runs tiny RANDOM demo weights (noise pictures, gibberish answers):
#   bash scripts/web_demo.sh
#   bash scripts/web_demo.sh --model /data/Emu3-Gen --vq /data/Emu3-VisionTokenizer --chat-model /data/Emu3-Chat \
#        --device Ascend --mode graph
# Needs the demo extra: bash scripts/setup_env.sh --demo. Options: --help, or docs/inference.md.
set -euo pipefail
source "$(dirname "$0")/env.sh"
exec "$PY" -m emu3.web.app "$@"
