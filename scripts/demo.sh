#!/usr/bin/env bash
# One command: set up (if needed) and run the default build on the embedded MRI data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/medkd-build recipe=rd target=jetson-orin "$@"
