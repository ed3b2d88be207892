"""Reading image bytes and decoding them to RGB, from plain files or from members of zip archives."""

from __future__ import annotations

import io
import zipfile
from functools import lru_cache

from PIL import Image

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


def decode_rgb(data: bytes) -> Image.Image:
    """Decode image bytes to an RGB PIL image (grayscale, palette and RGBA become RGB).

    Raises OSError (PIL's UnidentifiedImageError is one) when the bytes are not a readable image.
    """
    img = Image.open(io.BytesIO(data))
    img.load()
    if img.mode == "RGBA" or (img.mode == "P" and "transparency" in img.info):
        # composite on white: microscope backgrounds are light, black would invent dark borders
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def load_rgb(ref: str) -> Image.Image:
    return decode_rgb(read_bytes(ref))
