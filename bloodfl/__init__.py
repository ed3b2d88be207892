"""bloodfl: blood-cell image classification, centralized and federated, with differential privacy."""

__version__ = "0.1.0"
