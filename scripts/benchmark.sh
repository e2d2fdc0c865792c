#!/usr/bin/env bash
# The benchmark tables (vision tokenizer, text-to-image, decode cost, VQA, SFT), printed as markdown
# and written to --output. Examples:
#   bash scripts/benchmark.sh --config small --mode graph --dtype fp32 --compare-reference   # CPU vs PyTorch
#   bash scripts/benchmark.sh --config /path/to/Emu3-Gen --vq /path/to/Emu3-VisionTokenizer \
#        --device Ascend --mode graph --dtype bf16 --attn flash_attention_2 --image-tokens 90x90
# Options: bash scripts/benchmark.sh --help, or docs/generation.md.
set -euo pipefail
source "$(dirname "$0")/env.sh"
exec "$PY" -m emu3.cli.benchmark "$@"
