"""Federated learning: clients, strategies, the in-process round loop and the Flower backend."""

import os

# Flower reads these when it is imported: no usage telemetry to Flower's servers and no update check from a
# federated run of bloodfl unless the user sets them (the SuperLink/SuperNode processes: README, "Running across
# sites", exports them too)
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
