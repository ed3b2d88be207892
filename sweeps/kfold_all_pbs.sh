#!/usr/bin/env bash
# papers/001 (Alam et al.): stratified 5-fold cross-validation on ALL (4 classes), flip augmentation.
set -euo pipefail
cd "$(dirname "$0")/.."
python train.py -m experiment=alam2025_all split=kfold split.k=5 split.fold=0,1,2,3,4 "$@"
