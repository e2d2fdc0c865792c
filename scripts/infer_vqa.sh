#!/usr/bin/env bash
# Visual question answering with Emu3-Chat: answers printed and saved as JSON lines.
# Without --model/--vq it runs tiny RANDOM demo weights (gibberish answers).
# Options: see `bash scripts/infer_vqa.sh --help` or docs/inference.md.
set -euo pipefail
source "$(dirname "$0")/env.sh"
exec "$PY" -m emu3.cli.vqa "$@"
