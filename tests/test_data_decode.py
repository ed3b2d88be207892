"""Reading files robustly (modes, junk, broken files), the decoded-image cache, sources and checks, on
tiny images written to tmp_path (no real data needed)."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bloodfl.data import decode, sources
from bloodfl.data.checks import check_table, class_weights, content_hashes, dedupe, find_duplicates
from bloodfl.data.decode import decode_image, load_images
from bloodfl.data.table import ZIP_SEP, SampleTable
from bloodfl.errors import BloodflError


def _png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _cell(size: tuple[int, int] = (20, 12), value: int = 200) -> np.ndarray:
    """A light rectangle on black, like an rbc crop."""
    a = np.zeros((size[1], size[0]), np.uint8)
    a[2:-2, 2:-2] = value
    return a


# ---------------------------------------------------------------------------------------- modes -> RGB

@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "I;16", "CMYK", "1", "PA"])
def test_every_mode_becomes_rgb(mode: str) -> None:
    rgb = Image.fromarray(np.dstack([_cell(), _cell(value=100), _cell(value=50)]), "RGB")
    img = {
        "L": lambda: rgb.convert("L"),
        "P": lambda: rgb.convert("P"),
        "RGBA": lambda: rgb.convert("RGBA"),
        "LA": lambda: rgb.convert("LA"),
        "I;16": lambda: Image.fromarray(_cell().astype(np.uint16) * 257),
        "CMYK": lambda: rgb.convert("CMYK"),
        "1": lambda: rgb.convert("1"),
        "PA": lambda: rgb.convert("PA"),
    }[mode]()
    fmt = "JPEG" if mode == "CMYK" else "TIFF" if mode in ("I;16", "PA") else "PNG"
    out = decode_image(_png_bytes(img, fmt), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    if mode == "I;16":  # 16-bit values scaled, not clipped at 255: 200*257 -> 200, background stays 0
        assert abs(int(out[8, 8, 0]) - 200) <= 3 and out[0, 0, 0] == 0


def test_transparent_pixels_become_white() -> None:
    a = np.zeros((8, 8, 4), np.uint8)
    a[..., 3] = 0  # fully transparent black
    out = decode_image(_png_bytes(Image.fromarray(a, "RGBA")), 8)
    assert (out == 255).all()
    pal = Image.fromarray(np.zeros((8, 8), np.uint8), "P")
    pal.info["transparency"] = 0
    assert (decode_image(_png_bytes(pal, transparency=0), 8) == 255).all()


def test_pad_keeps_aspect_and_pads_with_border_colour() -> None:
    a = _cell((40, 20))  # wide crop on black
    out = decode_image(_png_bytes(Image.fromarray(a, "L")), 20, resize="pad")
    assert out.shape == (20, 20, 3)
    assert (out[:4] == 0).all() and (out[-4:] == 0).all()  # 5 padded rows top and bottom, black like the border
    assert out[10, 10, 0] == 200  # the cell itself, centred
    stretched = decode_image(_png_bytes(Image.fromarray(a, "L")), 20, resize="stretch")
    assert stretched[2, 10, 0] > 150  # stretch fills the square with the cell instead


def test_jpeg_draft_decoding_matches_full_decoding_closely() -> None:
    import io

    rng = np.random.default_rng(0)
    smooth = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((256, 256), Image.BICUBIC)
    data = _png_bytes(smooth, "JPEG", quality=95)
    for size in (32, 64):
        fast = decode_image(data, size).astype(int)  # libjpeg decodes at 1/8 and 1/4 scale here
        full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.BICUBIC))
        diff = np.abs(fast - full.astype(int))
        # the same picture up to rounding (measured: mean 0.75 / 0.50, max 4 / 3 grey levels)
        assert diff.mean() < 1.5 and diff.max() <= 8


# ----------------------------------------------------------------------------------------- sources

def _write_folder(root: Path, spec: dict[str, int], junk: bool = True) -> None:
    for k, (cls, n) in enumerate(spec.items()):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(_cell(value=50 + 10 * k + i), "L").save(root / cls / f"img_{i}.png")
    if junk:
        (root / spec.__iter__().__next__() / ".DS_123.jpg").write_bytes(b"\x00\x01junk")
        (root / ".hidden").mkdir()
        (root / "a" / "__MACOSX").mkdir()
        for i in range(3):
            (root / "a" / "__MACOSX" / f"._img_{i}.png").write_bytes(b"resource fork")
        (root / "a" / "notes.txt").write_text("not an image")


def test_folder_per_class_discovers_classes_and_skips_junk(tmp_path: Path) -> None:
    _write_folder(tmp_path, {"a": 3, "b": 2})
    t = sources.folder_per_class(str(tmp_path), None, "mine")
    assert t.classes == ["a", "b"] and t.class_counts() == {"a": 3, "b": 2}
    assert any(".DS_123.jpg" in p and "hidden or junk" in p for p in t.problems)
    assert any("notes.txt" in p and "not an image" in p for p in t.problems)
    macosx = [p for p in t.problems if "__MACOSX" in p]
    assert macosx == [f"skipped hidden or junk folder: {tmp_path / 'a' / '__MACOSX'}"]  # one line, not 3
    assert not any(".DS_" in r for r in t.refs)
    # fixed order from the config, case-insensitive folder match, dropped classes
    t2 = sources.folder_per_class(str(tmp_path), ["B", "A"], "mine")
    assert t2.classes == ["B", "A"] and t2.class_counts() == {"B": 2, "A": 3}
    with pytest.raises(BloodflError, match="fewer than 2 classes"):
        sources.folder_per_class(str(tmp_path), ["a", "b"], "mine", drop_classes=["b"])


def test_folder_per_class_errors_name_the_path_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(BloodflError, match=r"nope.*paths\.data_dir.*BLOODFL_DATA.*dataset\.root"):
        sources.folder_per_class(str(tmp_path / "nope"), None, "x")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.fromarray(_cell(), "L").save(tmp_path / "a" / "1.png")
    with pytest.raises(BloodflError, match=r"no images in .*b"):
        sources.folder_per_class(str(tmp_path), None, "x")
    with pytest.raises(BloodflError, match="no folder 'c'"):
        sources.folder_per_class(str(tmp_path), ["a", "c"], "x")


RBC_CLASSES = ["elliptocyte", "codocyte", "pencil"]


def _write_rbc(root: Path, extracted: bool) -> None:
    root.mkdir(parents=True, exist_ok=True)
    layout = {"1 Elliptocyte 12": ["S1-K1-0001 objek#1", "S1-K1-0001 objek#2", "S2_B1_0003 objek#7"],
              "6 TARGETSEL 2": ["S1-K1-0001 objek#3", "T4-K1-0001 coba objek#13"],
              "2 pencil 1": ["S9 objek#1"]}
    for folder, names in layout.items():
        files = {f"{folder}/{n}.png": _png_bytes(Image.fromarray(_cell(value=90 + i), "L"))
                 for i, n in enumerate(names)}
        files[f"{folder}/features.xls"] = b"xls"
        if extracted:
            for rel, data in files.items():
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(data)
        else:
            with zipfile.ZipFile(root / f"{folder}.zip", "w") as zf:
                for rel, data in files.items():
                    zf.writestr(rel, data)
                    zf.writestr(f"__MACOSX/{rel}", b"resource fork")  # as macOS's Archive Utility adds


@pytest.mark.parametrize("extracted", [False, True])
def test_rbc_reads_zips_or_extracted_folders(tmp_path: Path, extracted: bool) -> None:
    _write_rbc(tmp_path, extracted)
    t = sources.rbc_zips(str(tmp_path), RBC_CLASSES)
    assert t.classes == ["elliptocyte", "codocyte"]  # pencil dropped by default
    assert t.class_counts() == {"elliptocyte": 3, "codocyte": 2}
    assert t.groups == ["S1-K1-0001", "S1-K1-0001", "S2_B1_0003", "S1-K1-0001", "T4-K1-0001 coba"]
    assert all((ZIP_SEP in r) != extracted for r in t.refs)
    assert sum("features.xls" in p for p in t.problems) == 2  # the xls of the two classes read
    assert sum("__MACOSX" in p for p in t.problems) == (0 if extracted else 2)  # one line per zip
    images, bad = load_images(t, 16, resize="pad")
    assert images.shape == (5, 16, 16, 3) and bad == []
    assert sources.rbc_zips(str(tmp_path), RBC_CLASSES, drop_classes=[]).num_classes == 3


def test_rbc_zip_preferred_over_its_extracted_copy(tmp_path: Path) -> None:
    _write_rbc(tmp_path / "z", extracted=False)
    _write_rbc(tmp_path / "z", extracted=True)
    t = sources.rbc_zips(str(tmp_path / "z"), RBC_CLASSES)
    assert len(t) == 5 and all(ZIP_SEP in r for r in t.refs)


def test_rbc_folder_names_map_to_classes() -> None:
    f = sources.rbc_folder_class
    assert [f(n) for n in ["1 Elliptocyte 1211", "6 TARGETSEL 851", "8 SPERO bulat 562", "9 acantocyte 354",
                           "3 teardrop 2076", "2 pencil 24", "something else"]] == [
        "elliptocyte", "codocyte", "spherocyte", "acanthocyte", "dacrocyte", "pencil", None]
    assert sources.smear_id("ADB2-K1-0002 objek#14.png") == "ADB2-K1-0002"


def test_wbc4_published_split_and_source_groups(tmp_path: Path) -> None:
    for split, names in {"TRAIN": ["_0_1", "_0_2", "_1_5"], "TEST": ["_0_9"], "TEST_SIMPLE": ["_0_0"]}.items():
        for cls in ("EOSINOPHIL", "LYMPHOCYTE"):
            (tmp_path / split / cls).mkdir(parents=True)
            for n in names:
                Image.fromarray(_cell(), "L").convert("RGB").save(tmp_path / split / cls / f"{n}.jpeg")
    t = sources.wbc4(str(tmp_path), ["eosinophil", "lymphocyte"])
    assert len(t) == 8 and t.published_split.count("test") == 2
    assert t.groups[:4] == ["eosinophil/train/0", "eosinophil/train/0", "eosinophil/train/1", "lymphocyte/train/0"]
    assert "eosinophil/test/0" in t.groups  # source 0 of TEST is another image than source 0 of TRAIN


# ---------------------------------------------------------------------------------- unreadable files

def test_unreadable_files_are_reported_not_raised(tmp_path: Path) -> None:
    _write_folder(tmp_path, {"a": 3, "b": 3}, junk=False)
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    good = tmp_path / "b" / "img_0.png"
    (tmp_path / "b" / "truncated.png").write_bytes(good.read_bytes()[:40])
    t = sources.folder_per_class(str(tmp_path), None, "x")
    images, bad = load_images(t, 8)
    assert sorted(Path(b).name for b in bad) == ["broken.png", "truncated.png"]
    assert images.shape == (8, 8, 8, 3)
    assert check_table(t, {"a": 4, "b": 4}, bad) == [f"unreadable image: {b}" for b in bad]


# ------------------------------------------------------------------------------------------- the cache

def _table(tmp_path: Path, n: int = 40) -> SampleTable:
    rng = np.random.default_rng(1)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(n // 2):
            Image.fromarray(rng.integers(0, 255, (20 + i % 5, 24, 3), dtype=np.uint8)).save(
                tmp_path / "imgs" / cls / f"{i}.png")
    return sources.folder_per_class(str(tmp_path / "imgs"), None, "tiny")


def test_cache_same_pixels_no_file_reads_and_rebuilt_on_change(tmp_path: Path, monkeypatch) -> None:
    t = _table(tmp_path)
    cache = tmp_path / "cache"
    direct, _ = load_images(t, 16)
    first, _ = load_images(t, 16, cache_dir=cache)
    files = sorted(cache.glob("*.npy"))
    assert len(files) == 1 and np.array_equal(first, direct)

    def no_reads(ref: str) -> bytes:
        raise AssertionError(f"read {ref} despite the cache")

    monkeypatch.setattr(decode, "read_bytes", no_reads)
    second, bad = load_images(t, 16, cache_dir=cache)
    assert isinstance(second, np.memmap) and np.array_equal(second, direct) and bad == []
    monkeypatch.undo()

    # a new image size or resize mode is a new cache, never the old one
    bigger, _ = load_images(t, 24, cache_dir=cache)
    assert bigger.shape == (len(t), 24, 24, 3) and len(list(cache.glob("*.npy"))) == 2
    padded, _ = load_images(t, 16, resize="pad", cache_dir=cache)
    assert not np.array_equal(padded, direct) and len(list(cache.glob("*.npy"))) == 3

    # an image rewritten in place (new content, new mtime) invalidates the cache
    target = Path(t.refs[0])
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(target)
    os.utime(target, ns=(1, 1))  # a different mtime even on a coarse-clock file system
    changed, _ = load_images(t, 16, cache_dir=cache)
    assert (changed[0] == 0).all() and not (first[0] == 0).all()
    # a subset (other refs) is another cache too
    sub, _ = load_images(t.subset([1, 2, 3]), 16, cache_dir=cache)
    assert np.array_equal(sub, direct[1:4])


def test_cache_write_is_atomic(tmp_path: Path, monkeypatch) -> None:
    """A run killed while writing leaves no cache (only a temporary file is ever partial)."""
    t = _table(tmp_path)
    cache = tmp_path / "cache"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if the run were stopped mid-write

    monkeypatch.setattr(np, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        load_images(t, 16, cache_dir=cache)
    monkeypatch.undo()
    assert list(cache.glob("*.npy")) == [] and list(cache.glob(".*tmp")) == []
    images, _ = load_images(t, 16, cache_dir=cache)  # rebuilt from the images, then used
    assert len(list(cache.glob("*.npy"))) == 1 and images.shape[0] == len(t)


def test_corrupt_cache_file_is_rebuilt(tmp_path: Path) -> None:
    t = _table(tmp_path)
    cache = tmp_path / "cache"
    good, _ = load_images(t, 16, cache_dir=cache)
    npy = next(cache.glob("*.npy"))
    npy.write_bytes(npy.read_bytes()[:200])  # e.g. a disk that filled up under another tool
    again, _ = load_images(t, 16, cache_dir=cache)
    assert np.array_equal(again, good)


def test_unwritable_cache_dir_falls_back_to_memory(tmp_path: Path) -> None:
    t = _table(tmp_path, n=6)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    images, bad = load_images(t, 8, cache_dir=blocker / "cache")
    assert images.shape == (6, 8, 8, 3) and bad == []


# ---------------------------------------------------------------------------------------- checks

def _dup_table(tmp_path: Path) -> tuple[SampleTable, list[str]]:
    """a: x, x, y, z    b: z, w   (x twice within a; z in both classes)."""
    pics = {k: _png_bytes(Image.fromarray(_cell(value=v), "L")) for k, v in zip("xyzw", (10, 20, 30, 40))}
    layout = {"a": "xxyz", "b": "zw"}
    for cls, keys in layout.items():
        (tmp_path / cls).mkdir(parents=True)
        for i, k in enumerate(keys):
            (tmp_path / cls / f"{i}.png").write_bytes(pics[k])
    t = sources.folder_per_class(str(tmp_path), None, "d")
    return t, content_hashes(t)


def test_duplicates_within_and_across_classes(tmp_path: Path) -> None:
    t, h = _dup_table(tmp_path)
    assert h == content_hashes(t, num_workers=1)
    d = find_duplicates(t, h)
    assert d.within == [[0, 1]] and d.across == [[3, 4]]
    dropped = dedupe(t, h, "drop")
    assert [Path(r).parent.name + "/" + Path(r).name for r in dropped.refs] == ["a/0.png", "a/2.png", "b/1.png"]
    assert any("different classes" in p for p in dropped.problems)
    grouped = dedupe(t, h, "group")
    assert len(grouped) == 6 and grouped.groups[0] == grouped.groups[1] and grouped.groups[3] == grouped.groups[4]
    assert len(set(grouped.groups)) == 4
    assert dedupe(t, h, "keep") is t
    with pytest.raises(BloodflError, match="duplicates"):
        dedupe(t, h, "nonsense")


def test_group_policy_merges_existing_groups(tmp_path: Path) -> None:
    t, h = _dup_table(tmp_path)
    t.groups = ["g1", "g2", "g3", "g4", "g5", "g6"]  # the x copies sit in g1 and g2, the z copies in g4, g5
    g = dedupe(t, h, "group").groups
    assert g[0] == g[1] and g[3] == g[4] and len(set(g)) == 4


def test_check_table_and_class_weights(tmp_path: Path) -> None:
    t, _ = _dup_table(tmp_path)
    assert check_table(t, {"a": 4, "b": 2}) == []
    assert check_table(t, {"a": 4, "b": 3, "gone": 1}) == ["class b: 2 images, expected 3"]
    assert check_table(t, {"a": 4}) == ["class b: 2 images, but dataset.expected_counts has no entry for it"]
    assert class_weights([30, 10]) == pytest.approx([40 / 60, 40 / 20])
    assert class_weights([5, 0]) == [0.5, 0.0]  # N=5, C=2: 5 / (5 * 2)


def test_hash_cache_reads_no_files_and_follows_changes(tmp_path: Path, monkeypatch) -> None:
    from bloodfl.data import checks

    t, direct = _dup_table(tmp_path / "d")
    cache = tmp_path / "cache"
    assert content_hashes(t, cache_dir=cache) == direct and len(list(cache.glob("*-sha256-*.json"))) == 1

    def no_reads(ref: str) -> bytes:
        raise AssertionError(f"read {ref} despite the cache")

    monkeypatch.setattr(checks, "read_bytes", no_reads)
    assert content_hashes(t, cache_dir=cache) == direct
    monkeypatch.undo()
    Path(t.refs[0]).write_bytes(Path(t.refs[5]).read_bytes())  # x becomes w: a new cross-class duplicate
    os.utime(t.refs[0], ns=(1, 1))
    changed = content_hashes(t, cache_dir=cache)
    assert changed[0] == direct[5] and find_duplicates(t, changed).across == [[0, 5], [3, 4]]
