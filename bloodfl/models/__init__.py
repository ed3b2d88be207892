from bloodfl.models.registry import BloodCellClassifier, build_classifier, get_spec, list_models

__all__ = ["BloodCellClassifier", "build_classifier", "get_spec", "list_models"]
