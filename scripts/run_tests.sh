#!/usr/bin/env bash
# The test command: installs the package and everything the tests need into .venv, then runs the
# suite on CPU. The browser test (tests/web) runs when the demo extra and Debian's chromium +
# chromium-driver are installed (.ci/run installs them as root) and is skipped otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh --test
exec .venv/bin/python -m pytest -q tests "$@"
