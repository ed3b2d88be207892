"""Using a finished run's model: load it with its preprocessing (``load.py``), list input images (``images.py``),
explain its decisions with Grad-CAM (``cam.py``). ``python -m bloodfl.predict`` is the command line."""

from bloodfl.inference.load import LoadedRun, find_checkpoint, load_run_model

__all__ = ["LoadedRun", "find_checkpoint", "load_run_model"]
