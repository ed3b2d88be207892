"""Builders that list a data set's images in their published layout (Hydra ``dataset.source`` targets).

Each returns a SampleTable: refs (paths, or "<zip>::<member>"), labels in the config's fixed class order,
the natural group key where the data set has one, its published split where it has one, and the list of
files it skipped (hidden or junk files, non-image files). No image is opened here.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from bloodfl.data.table import ZIP_SEP, SampleTable
from bloodfl.errors import BloodflError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"})
# files operating systems leave behind; never images even when their extension says so
JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini", "__macosx"})


def _is_junk(name: str) -> bool:
    return name.startswith(".") or name.lower() in JUNK_NAMES


def skip_reason(relpath: str) -> str | None:
    """Why a file (path relative to the data set root, '/'-separated) is not an image to use, or None."""
    parts = relpath.split("/")
    if any(_is_junk(p) for p in parts):
        return "hidden or junk file"
    if os.path.splitext(parts[-1])[1].lower() not in IMAGE_EXTENSIONS:
        return "not an image file"
    return None


def build_table(dataset_cfg: DictConfig) -> SampleTable:
    """Instantiate ``dataset.source`` with the user's mistakes as one-line BloodflErrors.

    Hydra wraps an exception raised by the target in InstantiationException; unwrap ours, and turn a
    missing mandatory value (imagefolder's ``root: ???``) into a message naming the override to add.
    """
    try:
        return instantiate(dataset_cfg.source, _convert_="all")
    except InstantiationException as exc:
        if isinstance(exc.__cause__, BloodflError):
            raise exc.__cause__ from None
        raise
    except MissingMandatoryValue as exc:
        key = "dataset.root" if "root" in str(exc) else str(getattr(exc, "full_key", "a value"))
        raise BloodflError(f"data set {dataset_cfg.get('name')!r} needs {key}: add {key}=/path/to/images") from None


def _missing_root(root: Path, name: str, what: str = "folder") -> BloodflError:
    return BloodflError(
        f"data set {name!r}: {what} {root} not found; put the data there, or point to it with "
        f"paths.data_dir=DIR (or the environment variable BLOODFL_DATA=DIR), or dataset.root=DIR"
    )


def _abs(path: str | os.PathLike) -> Path:
    # absolute but not symlink-resolved: refs stay valid if the working directory changes later
    return Path(os.path.abspath(os.path.expanduser(str(path))))


def _walk_images(folder: Path, base: Path, problems: list[str]) -> list[Path]:
    """Image files under ``folder`` (recursively, sorted); skipped files are noted in ``problems``."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        for d in sorted(d for d in dirnames if _is_junk(d)):  # e.g. __MACOSX, .ipynb_checkpoints: one line
            problems.append(f"skipped hidden or junk folder: {Path(dirpath) / d}")
        dirnames[:] = sorted(d for d in dirnames if not _is_junk(d))
        for fname in sorted(filenames):
            path = Path(dirpath) / fname
            rel = path.relative_to(base).as_posix()
            reason = skip_reason(rel)
            if reason is None:
                found.append(path)
            else:
                problems.append(f"skipped {reason}: {path}")
    return found


def _active_classes(classes: Sequence[str], drop_classes: Iterable[str] | None, name: str) -> list[str]:
    drop = list(drop_classes or [])
    unknown = [c for c in drop if c not in classes]
    if unknown:
        raise BloodflError(
            f"data set {name!r}: dataset.drop_classes names unknown classes {unknown}; valid: {list(classes)}"
        )
    kept = [c for c in classes if c not in drop]
    if len(kept) < 2:
        raise BloodflError(f"data set {name!r}: fewer than 2 classes left after dropping {drop}")
    return kept


def _match_folder(cls: str, folder: str | None, available: dict[str, Path], root: Path, name: str) -> Path:
    """The sub-folder of ``root`` holding class ``cls``: exact name first, else a unique case-insensitive one."""
    want = folder or cls
    if want in available:
        return available[want]
    folded = [p for n, p in available.items() if n.lower() == want.lower()]
    if len(folded) == 1:
        return folded[0]
    raise BloodflError(
        f"data set {name!r}: no folder {want!r} for class {cls!r} in {root} "
        f"(found: {sorted(available) or 'no sub-folders'}); fix dataset.classes or dataset.root"
    )


def folder_per_class(
    root: str,
    classes: Sequence[str] | None = None,
    name: str = "",
    drop_classes: Iterable[str] | None = None,
    folders: dict[str, str] | None = None,
) -> SampleTable:
    """One sub-folder of ``root`` per class, images anywhere below it.

    classes: class names in their fixed order; None discovers the sorted (non-hidden) sub-folders.
    folders: optional class -> folder name, where they differ (matching is otherwise case-insensitive).
    Sub-folders that are not a listed class are ignored (wbc5 reads 5 of PBC's 8 folders).
    """
    base = _abs(root)
    name = name or base.name
    if not base.is_dir():
        raise _missing_root(base, name)
    available = {p.name: p for p in sorted(base.iterdir()) if p.is_dir() and not _is_junk(p.name)}
    if classes is None:
        classes = sorted(available)
        if not classes:
            raise BloodflError(f"data set {name!r}: {base} has no class sub-folders (one folder per class)")
    classes = _active_classes(list(classes), drop_classes, name)
    refs: list[str] = []
    labels: list[int] = []
    problems: list[str] = []
    for label, cls in enumerate(classes):
        folder = _match_folder(cls, (folders or {}).get(cls), available, base, name)
        files = _walk_images(folder, base, problems)
        if not files:
            raise BloodflError(f"data set {name!r}: no images in {folder} (class {cls!r})")
        refs += [str(p) for p in files]
        labels += [label] * len(files)
    return SampleTable(refs=refs, labels=np.asarray(labels), classes=classes, name=name, problems=problems)


# ---------------------------------------------------------------------------------------------- rbc (papers/000)

# the published folder names, "<n> <name as published> <count>", to class names (papers/000 Table 1 terms)
RBC_FOLDER_CLASSES = {
    "elliptocyte": "elliptocyte",
    "pencil": "pencil",
    "teardrop": "dacrocyte",
    "normal": "normal",
    "stomatocyte": "stomatocyte",
    "targetsel": "codocyte",
    "hypochromic": "hypochromic",
    "spero bulat": "spherocyte",
    "acantocyte": "acanthocyte",
}
_RBC_FOLDER = re.compile(r"^\d+\s+(.+?)\s+\d+$")


def rbc_folder_class(folder: str, mapping: dict[str, str] | None = None) -> str | None:
    """'6 TARGETSEL 851' -> 'codocyte'; None for a name that is not one of the published folders."""
    m = _RBC_FOLDER.match(folder.strip())
    key = (m.group(1) if m else folder).strip().lower()
    return (mapping or RBC_FOLDER_CLASSES).get(key)


def smear_id(filename: str) -> str:
    """The smear image a crop was cut from: 'ADB2-K1-0002 objek#14.png' -> 'ADB2-K1-0002'."""
    stem = os.path.splitext(os.path.basename(filename))[0]
    return stem.split(" objek")[0].strip()


def _zip_members(archive: Path, problems: list[str]) -> list[str]:
    """Image members of a zip (sorted); skipped members are noted in ``problems``."""
    try:
        with zipfile.ZipFile(archive) as zf:
            names = sorted(i.filename for i in zf.infolist() if not i.is_dir())
    except zipfile.BadZipFile as exc:
        raise BloodflError(f"{archive} is not a readable zip file ({exc}); download it again") from exc
    members = []
    junk_dirs: dict[str, int] = {}
    for member in names:
        junk_dir = next((p for p in member.split("/")[:-1] if _is_junk(p)), None)
        reason = skip_reason(member)
        if reason is None:
            members.append(member)
        elif junk_dir is not None:  # a macOS-made zip has a __MACOSX/ twin of every file: one line for all
            junk_dirs[junk_dir] = junk_dirs.get(junk_dir, 0) + 1
        else:
            problems.append(f"skipped {reason}: {archive}{ZIP_SEP}{member}")
    problems += [f"skipped {n} files in hidden or junk folder {d}/: {archive}" for d, n in junk_dirs.items()]
    return members


def _rbc_units(base: Path, mapping: dict[str, str] | None, problems: list[str]) -> dict[str, Path]:
    """class -> the zip (preferred: read as published) or the extracted folder holding it."""
    units: dict[str, Path] = {}
    entries = sorted(base.iterdir(), key=lambda p: (p.suffix.lower() != ".zip", p.name))
    for entry in entries:
        if entry.name.startswith("."):
            continue
        is_zip = entry.is_file() and entry.suffix.lower() == ".zip"
        if not (is_zip or entry.is_dir()):
            continue
        cls = rbc_folder_class(entry.stem if is_zip else entry.name, mapping)
        if cls is None:
            problems.append(f"skipped {'zip' if is_zip else 'folder'} that is no rbc class: {entry}")
        elif cls not in units:  # a zip and its extracted folder hold the same images: read one
            units[cls] = entry
    return units


def rbc_zips(
    root: str,
    classes: Sequence[str],
    name: str = "rbc",
    drop_classes: Iterable[str] | None = ("pencil",),
    folder_classes: dict[str, str] | None = None,
) -> SampleTable:
    """Tyas et al. erythrocytes: the nine published zips read directly, or the same folders extracted.

    groups: the smear image id (file-name prefix before ' objek'); cells cut from one image share it.
    """
    base = _abs(root)
    if not base.is_dir():
        raise _missing_root(base, name)
    problems: list[str] = []
    units = _rbc_units(base, folder_classes, problems)
    kept = _active_classes(list(classes), drop_classes, name)
    missing = [c for c in kept if c not in units]
    if missing:
        raise BloodflError(
            f"data set {name!r}: no zip or folder for classes {missing} in {base} (expected the nine published "
            f"zips such as '1 Elliptocyte 1211.zip'); fix paths.data_dir or drop them with dataset.drop_classes"
        )
    refs: list[str] = []
    labels: list[int] = []
    for label, cls in enumerate(kept):
        unit = units[cls]
        if unit.is_dir():
            cls_refs = [str(p) for p in _walk_images(unit, base, problems)]
        else:
            cls_refs = [f"{unit}{ZIP_SEP}{m}" for m in _zip_members(unit, problems)]
        if not cls_refs:
            raise BloodflError(f"data set {name!r}: no images in {unit} (class {cls!r})")
        refs += cls_refs
        labels += [label] * len(cls_refs)
    groups = [smear_id(r.split(ZIP_SEP)[-1]) for r in refs]
    return SampleTable(refs=refs, labels=np.asarray(labels), classes=kept, name=name, groups=groups,
                       problems=problems)


# -------------------------------------------------------------------------------- wbc4 (papers/002)

_WBC4_SOURCE = re.compile(r"^_(\d+)_\d+$")


def wbc4_source(filename: str) -> str:
    """'_12_345.jpeg' -> '12' (the source image within its class and split); the stem when not that form."""
    stem = os.path.splitext(os.path.basename(filename))[0]
    m = _WBC4_SOURCE.match(stem)
    return m.group(1) if m else stem


def wbc4(
    root: str,
    classes: Sequence[str] = ("eosinophil", "lymphocyte", "monocyte", "neutrophil"),
    name: str = "wbc4",
    drop_classes: Iterable[str] | None = None,
    split_folders: dict[str, str] | None = None,
) -> SampleTable:
    """Blood Cell Images (Kaggle dataset2-master): ``root``/{TRAIN,TEST}/<CLASS>/_<source>_<k>.jpeg.

    published_split: "train"/"test" from the TRAIN/TEST folders (disjoint source images). TEST_SIMPLE (the
    71 source images of TEST) is not read unless ``split_folders`` names it.
    groups: "<class>/<split>/<source>", so validation can be carved out of train by source image.
    """
    base = _abs(root)
    if not base.is_dir():
        raise _missing_root(base, name)
    split_folders = dict(split_folders or {"train": "TRAIN", "test": "TEST"})
    parts = [folder_per_class(str(_split_dir(base, folder, name)), classes, name, drop_classes)
             for folder in split_folders.values()]
    refs = [r for p in parts for r in p.refs]
    labels = np.concatenate([p.labels for p in parts])
    published = [s for s, p in zip(split_folders, parts) for _ in p.refs]
    kept = parts[0].classes
    groups = [f"{kept[y]}/{s}/{wbc4_source(r)}" for r, y, s in zip(refs, labels, published)]
    problems = [line for p in parts for line in p.problems]
    return SampleTable(refs=refs, labels=labels, classes=kept, name=name, groups=groups,
                       published_split=published, problems=problems)


def _split_dir(base: Path, folder: str, name: str) -> Path:
    path = base / folder
    if not path.is_dir():
        raise _missing_root(path, name, what="split folder")
    return path
