"""Reading image bytes from plain files or from members of zip archives (decoding: bloodfl.data.decode)."""

from __future__ import annotations

import zipfile
from functools import lru_cache

from bloodfl.data.table import ZIP_SEP


@lru_cache(maxsize=32)
def _open_zip(path: str) -> zipfile.ZipFile:
    return zipfile.ZipFile(path)


def read_bytes(ref: str) -> bytes:
    """The raw bytes of an image reference (a path, or '<zip>::<member>')."""
    if ZIP_SEP in ref:
        archive, member = ref.split(ZIP_SEP, 1)
        return _open_zip(archive).read(member)
    with open(ref, "rb") as fh:
        return fh.read()
