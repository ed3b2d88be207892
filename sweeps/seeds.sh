#!/usr/bin/env bash
# The same configuration over five seeds (split, initialisation and shuffling all follow the seed).
set -euo pipefail
cd "$(dirname "$0")/.."
python train.py -m seed=1,2,3,4,5 "$@"
