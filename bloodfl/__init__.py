"""bloodfl: blood-cell image classification, centralized and federated, with differential privacy."""

import bloodfl.config  # noqa: F401  (registers the config resolvers before any config is read)

__version__ = "0.1.0"
