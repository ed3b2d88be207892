from bloodfl.models import attention, color_hist, dp_cnn, paper_cnns, scatternet, simple_cnn, unet  # noqa: F401  (registers the architectures written here)
from bloodfl.models.registry import (
    BloodCellClassifier,
    build_classifier,
    create_classifier,
    format_params,
    list_models,
    model_config,
    register_model,
)

__all__ = ["BloodCellClassifier", "build_classifier", "create_classifier", "format_params", "list_models",
           "model_config", "register_model"]
