"""The images a user points predict at: one file, a folder (searched recursively), or a zip archive."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

from bloodfl.data.sources import _walk_images, _zip_members
from bloodfl.data.table import ZIP_SEP
from bloodfl.errors import BloodflError


@dataclass(frozen=True)
class InputImage:
    ref: str   # what bloodfl.data.io.read_bytes reads: a path, or "<zip>::<member>"
    name: str  # relative to what the user gave ('/'-separated): names the CAM file, stays unique


def list_images(path: str | Path) -> tuple[list[InputImage], list[str]]:
    """The images under ``path`` in a stable (sorted) order, and one line per file skipped as no image (hidden or
    junk files, other extensions) — the same rules as the data sets' sources. A single file is always tried."""
    path = Path(path).expanduser()
    skipped: list[str] = []
    if path.is_dir():
        # the data sets' own walker: a folder that trains also predicts, with the same junk-file rules
        files = _walk_images(path, path, skipped)
        return [InputImage(str(f), f.relative_to(path).as_posix()) for f in files], skipped
    if path.is_file() and path.suffix.lower() == ".zip" and zipfile.is_zipfile(path):
        members = _zip_members(path, skipped)
        return [InputImage(f"{path}{ZIP_SEP}{m}", m) for m in members], skipped
    if path.is_file():
        return [InputImage(str(path), path.name)], skipped
    raise BloodflError(f"images={path}: no such file or folder; give an image file, a folder of images or a zip")
