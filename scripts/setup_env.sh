#!/usr/bin/env bash
# Create .venv (if absent) and install this package into it, editable (the checkout is what runs),
# with its pinned requirements (requirements.txt, read by pyproject.toml). Options add extras:
#   --test  the PyTorch reference (torch CPU, transformers), pytest, selenium
#   --demo  the web demo (gradio)
# Safe to re-run: pip skips what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=()
for arg in "$@"; do
  case "$arg" in
    --test) extras+=(test) ;;
    --demo) extras+=(demo) ;;
    *) echo "setup_env.sh: unknown option $arg (use --test and/or --demo)" >&2; exit 2 ;;
  esac
done
spec=.
if [ ${#extras[@]} -gt 0 ]; then spec=".[$(IFS=,; echo "${extras[*]}")]"; fi
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e "$spec"
