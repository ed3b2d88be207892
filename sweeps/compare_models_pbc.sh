#!/usr/bin/env bash
# papers/003 (Asghar et al.): compare backbones on PBC (8 classes) with one shared, seeded 7:2:1 split.
set -euo pipefail
cd "$(dirname "$0")/.."
python train.py -m experiment=asghar2024_pbc \
  model=vgg16,vgg19,resnet50,resnet101,inception_v3,mobilenetv2,densenet201 \
  dataset.image_size=96 "$@"
