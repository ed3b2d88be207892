"""Decode a table's images once into one uint8 (N, S, S, 3) RGB array, cached on disk as a memory-mappable .npy.

The cache is keyed by everything that decides the pixels: the refs, each file's size and modification time
(for zip members: the zip's), the image size, the resize mode and CACHE_VERSION. Any change gives a new key
and a rebuild, so a cache is never stale; it is written to a temporary file and renamed, so a killed run
leaves no half-written cache behind. A cache hit reads no image files.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from bloodfl.data.io import read_bytes
from bloodfl.data.table import ZIP_SEP, SampleTable
from bloodfl.errors import BloodflError

log = logging.getLogger(__name__)

# bump whenever decoding or resizing changes the pixels it produces: old caches then stop matching
CACHE_VERSION = 1
RESIZE_MODES = ("stretch", "pad")
DEFAULT_WORKERS = 2
CHUNK = 256  # images per task of the decoding threads
_RESAMPLE = Image.Resampling.BICUBIC


# ------------------------------------------------------------------------------------------ one image

def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: transparency composited on white, 16-bit grayscale scaled to 8 bits."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        # convert() would clip 16-bit values at 255 (a white image); scale the full range instead
        arr = (np.asarray(img, dtype=np.uint32) // 257).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # white, not black: microscope backgrounds are light, black would invent dark borders
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def border_colour(img: Image.Image) -> tuple[int, int, int]:
    """Median colour of the outermost pixel ring: the background a crop is padded with."""
    a = np.asarray(img)
    ring = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    return tuple(int(v) for v in np.median(ring, axis=0))  # type: ignore[return-value]


def _fit_size(w: int, h: int, size: int) -> tuple[int, int]:
    """(w, h) scaled so the longer side is ``size``."""
    scale = size / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def decode_image(data: bytes, image_size: int, resize: str = "stretch") -> np.ndarray:
    """Image bytes -> uint8 (S, S, 3) RGB.

    stretch: resize to S x S, ignoring the aspect ratio. pad: keep the aspect ratio (longer side S) and
    pad to a square with the image's border colour (for variable-size cell crops, rbc).
    Raises OSError (PIL's UnidentifiedImageError is one) for bytes that are no readable image.
    """
    img = Image.open(io.BytesIO(data))
    w, h = img.size
    target = (image_size, image_size) if resize == "stretch" else _fit_size(w, h, image_size)
    if img.format == "JPEG":
        # let libjpeg decode at 1/2, 1/4 or 1/8 scale when the target is that much smaller (much faster);
        # draft never goes below the target size, the resize below does the rest
        img.draft(None, target)
    img.load()
    img = to_rgb(img)
    # the fill comes from the image as stored: resizing would blend the border into the cell
    fill = border_colour(img) if resize == "pad" and target != (image_size, image_size) else None
    if img.size != target:
        img = img.resize(target, _RESAMPLE)
    if fill is not None:
        canvas = Image.new("RGB", (image_size, image_size), fill)
        canvas.paste(img, ((image_size - target[0]) // 2, (image_size - target[1]) // 2))
        img = canvas
    return np.asarray(img, dtype=np.uint8)


# ---------------------------------------------------------------------------------------- the cache key

def fingerprints(refs: Sequence[str]) -> list[str]:
    """Per ref, what changes when its file changes: size and mtime (of the zip, for a zip member)."""
    stats: dict[str, str] = {}

    def stat(path: str) -> str:
        if path not in stats:
            try:
                st = os.stat(path)
                stats[path] = f"{st.st_size}:{st.st_mtime_ns}"
            except OSError:
                stats[path] = "missing"
        return stats[path]

    return [stat(r.split(ZIP_SEP, 1)[0]) for r in refs]


def cache_key(refs: Sequence[str], image_size: int, resize: str) -> str:
    h = hashlib.sha256(f"bloodfl-decode v{CACHE_VERSION} {image_size} {resize}\n".encode())
    for ref, fp in zip(refs, fingerprints(refs)):
        h.update(f"{ref}\t{fp}\n".encode())
    return h.hexdigest()


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in (name or "data"))


def cache_path(cache_dir: str | os.PathLike, name: str, image_size: int, resize: str, key: str) -> Path:
    return Path(cache_dir) / f"{safe_name(name)}-{image_size}px-{resize}-{key[:20]}.npy"


# -------------------------------------------------------------------------------------------- decoding

def _decode_chunk(refs: Sequence[str], image_size: int, resize: str) -> tuple[np.ndarray, list[int]]:
    """Decode ``refs`` into one array; positions that failed are returned (their rows stay zero)."""
    out = np.zeros((len(refs), image_size, image_size, 3), dtype=np.uint8)
    bad: list[int] = []
    for i, ref in enumerate(refs):
        try:
            out[i] = decode_image(read_bytes(ref), image_size, resize)
        except Exception as exc:  # noqa: BLE001 - any broken file is reported, never ends a run
            log.debug("cannot decode %s: %s", ref, exc)
            bad.append(i)
    return out, bad


def _decode_all(refs: Sequence[str], image_size: int, resize: str, num_workers: int) -> tuple[np.ndarray, list[str]]:
    if num_workers <= 1 or len(refs) < 2 * CHUNK:
        images, bad = _decode_chunk(refs, image_size, resize)
        return images, [refs[i] for i in bad]
    # threads: PIL releases the GIL while decoding and resizing. Processes would gain a little more but
    # must re-import the caller's __main__ (forkserver/spawn) or copy a threaded parent (fork)
    starts = list(range(0, len(refs), CHUNK))
    images = np.empty((len(refs), image_size, image_size, 3), dtype=np.uint8)
    unreadable: list[str] = []
    with ThreadPoolExecutor(num_workers) as pool:
        parts = pool.map(lambda s: _decode_chunk(refs[s:s + CHUNK], image_size, resize), starts)
        for s, (part, bad) in zip(starts, parts):
            images[s:s + len(part)] = part
            unreadable += [refs[s + i] for i in bad]
    return images, unreadable


def _read_cache(path: Path, key: str, shape: tuple[int, ...]) -> tuple[np.ndarray, list[str]] | None:
    meta_path = path.with_suffix(".json")
    if not (path.exists() and meta_path.exists()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        images = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable cache %s (%s); rebuilding it", path, exc)
        return None
    if meta.get("key") != key or images.shape != shape or images.dtype != np.uint8:
        return None
    return images, list(meta.get("unreadable", []))


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` through a temporary file and a rename: readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_cache(path: Path, key: str, images: np.ndarray, unreadable: list[str], refs: Sequence[str]) -> None:
    meta = {"key": key, "version": CACHE_VERSION, "n": len(refs), "shape": list(images.shape),
            "unreadable": unreadable, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # the .npy last: a cache counts only when both files exist and the key matches
        write_atomic(path.with_suffix(".json"), lambda fh: fh.write(json.dumps(meta).encode()))
        write_atomic(path, lambda fh: np.save(fh, images, allow_pickle=False))
    except OSError as exc:
        log.warning("could not write the decoded-image cache %s (%s); continuing without it", path, exc)


def load_images(
    table: SampleTable,
    image_size: int,
    resize: str = "stretch",
    cache_dir: str | os.PathLike | None = None,
    num_workers: int = DEFAULT_WORKERS,
) -> tuple[np.ndarray, list[str]]:
    """All images of ``table`` as uint8 (N, S, S, 3) RGB, and the refs that could not be decoded.

    Unreadable images are reported, never raised: their rows are zeros and the caller drops them. With
    ``cache_dir`` the array is read from (memory-mapped) or written to the decoded-image cache.
    """
    if resize not in RESIZE_MODES:
        raise BloodflError(f"unknown dataset.resize={resize!r}; valid: {', '.join(RESIZE_MODES)}")
    if image_size < 1:
        raise BloodflError(f"dataset.image_size must be positive, got {image_size}")
    if table.images is not None:  # rendered in memory (synthetic): nothing to decode
        if table.images.shape[1:3] != (image_size, image_size):
            raise BloodflError(f"data set {table.name!r} holds {table.images.shape[1]} px images, not {image_size}")
        return table.images, []
    shape = (len(table), image_size, image_size, 3)
    path = key = None
    if cache_dir is not None:
        key = cache_key(table.refs, image_size, resize)
        path = cache_path(cache_dir, table.name, image_size, resize, key)
        hit = _read_cache(path, key, shape)
        if hit is not None:
            log.info("decoded images from cache %s", path)
            return hit
    start = time.perf_counter()
    images, unreadable = _decode_all(table.refs, image_size, resize, num_workers)
    log.info("decoded %d images at %d px in %.1f s", len(table), image_size, time.perf_counter() - start)
    if path is not None and key is not None:
        _write_cache(path, key, images, unreadable, table.refs)
    return images, unreadable
