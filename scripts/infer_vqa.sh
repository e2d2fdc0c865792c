#!/usr/bin/env bash
# Visual question answering with Emu3-Chat: answers printed and saved as JSON lines.
# Without --model/--vq it runs tiny RANDOM demo weights (gibberish answers).
# Options: see `bash scripts/infer_vqa.sh --help` or docs/inference.md.
set -euo pipefail
# Paths given as options stay relative to the caller's directory: no cd, the package goes on PYTHONPATH.
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY=python3
[ -x "$ROOT/.venv/bin/python" ] && PY="$ROOT/.venv/bin/python"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export GLOG_v=${GLOG_v:-3}
exec "$PY" -m emu3.cli.vqa "$@"
