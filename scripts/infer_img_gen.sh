#!/usr/bin/env bash
# Text-to-image with Emu3-Gen. Without --model/--vq it runs tiny RANDOM demo weights (noise images).
# Options: see `bash scripts/infer_img_gen.sh --help` or docs/inference.md.
set -euo pipefail
# Paths given as options stay relative to the caller's directory: no cd, the package goes on PYTHONPATH.
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY=python3
[ -x "$ROOT/.venv/bin/python" ] && PY="$ROOT/.venv/bin/python"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export GLOG_v=${GLOG_v:-3}
exec "$PY" -m emu3.cli.generate_image "$@"
