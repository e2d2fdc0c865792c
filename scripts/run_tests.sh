#!/usr/bin/env bash
# The test command: installs everything the tests need into .venv, then runs the suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh --test
exec .venv/bin/python -m pytest -q tests "$@"
