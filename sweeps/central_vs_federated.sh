#!/usr/bin/env bash
# Central vs federated on the same model, data, split, seed and total epochs; writes compare.md/compare.csv.
#   sweeps/central_vs_federated.sh dataset=all_pbs fl.rounds=10 fl.local_epochs=1
#   sweeps/central_vs_federated.sh experiment=dipto2023_rbc fl=dipto2023     # papers/000: 96% vs 94%
# Overrides go to both runs, except fl.* (federated only). See docs/federated.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
exec "$PY" -m bloodfl.fl.compare "$@"
