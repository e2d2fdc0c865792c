# Sourced by the scripts: the project's interpreter (.venv if present) and the package on
# PYTHONPATH, without changing directory, so paths given as options stay relative to the caller.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY=python3
[ -x "$ROOT/.venv/bin/python" ] && PY="$ROOT/.venv/bin/python"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export GLOG_v=${GLOG_v:-3}  # MindSpore's C++ logging: errors only
