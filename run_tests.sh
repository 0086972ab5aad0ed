#!/usr/bin/env bash
# The test command: installs what is missing, then runs the whole suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/install.sh
exec python3 -m pytest -q -p no:cacheprovider "$@"
