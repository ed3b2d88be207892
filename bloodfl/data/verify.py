"""``python -m bloodfl.data verify <dataset>``: everything a data set holds that could spoil a result.

Prints counts per class against the published ones, image sizes and modes, unreadable files, skipped
hidden/junk files, exact duplicates within and across classes, and the eq. 1 class weights. The exit status
is 1 when a count differs or a file is unreadable (one line per problem), 2 for a user error, else 0.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from rich.console import Console
from rich.table import Table

from bloodfl.data.checks import (
    DUPLICATE_POLICIES,
    check_table,
    class_weights,
    content_hashes,
    dedupe,
    describe_duplicates,
    find_duplicates,
)
from bloodfl.data.io import read_bytes
from bloodfl.data.sources import build_table
from bloodfl.data.table import SampleTable
from bloodfl.errors import BloodflError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def available_datasets(conf_dir: Path = CONF_DIR) -> list[str]:
    return sorted(p.stem for p in (conf_dir / "dataset").glob("*.yaml"))


def compose_config(dataset: str, data_dir: str | None = None, overrides: Sequence[str] = (),
                   conf_dir: Path = CONF_DIR) -> DictConfig:
    """conf/dataset/<dataset>.yaml with conf/paths/default.yaml, composed by Hydra as training composes them.

    Only the groups a data set needs (dataset, paths, seed): verifying data must not depend on the model,
    logger or trainer settings. ``overrides`` are Hydra overrides such as ``dataset.root=/my/images``.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if dataset not in available_datasets(conf_dir):
        raise BloodflError(f"unknown data set {dataset!r}; available: {', '.join(available_datasets(conf_dir))}")
    args = [f"+dataset={dataset}", "+paths=default", "+seed=0",
            *([f"paths.data_dir={data_dir}"] if data_dir else []), *overrides]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            return compose(config_name=None, overrides=args)
    except HydraException as exc:  # a mistyped override: Hydra's own message, without the traceback
        raise BloodflError(" ".join(line.strip() for line in str(exc).splitlines() if line.strip())) from None
    finally:
        GlobalHydra.instance().clear()


# ---------------------------------------------------------------------------------- image inspection

@dataclass
class ImageInfo:
    mode: str = ""
    size: tuple[int, int] = (0, 0)
    format: str = ""
    error: str = ""  # non-empty: the file could not be decoded


def inspect_image(ref: str) -> ImageInfo:
    """Mode, size and format from the header, and a full decode to prove the file is readable."""
    try:
        img = Image.open(io.BytesIO(read_bytes(ref)))
        info = ImageInfo(img.mode, img.size, img.format or "")
        # a JPEG decoded at 1/8 scale still reads every byte of it, in a fraction of the time
        img.draft(None, (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
        img.load()
        return info
    except Exception as exc:  # noqa: BLE001 - any failure means "unreadable", reported with its reason
        return ImageInfo(error=f"{type(exc).__name__}: {exc}")


def inspect_images(refs: Sequence[str], num_workers: int = 2) -> list[ImageInfo]:
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        return list(pool.map(inspect_image, refs, chunksize=128))


def size_summary(infos: Sequence[ImageInfo]) -> list[str]:
    ok = [i for i in infos if not i.error]
    if not ok:
        return ["no readable images"]
    w = np.array([i.size[0] for i in ok])
    h = np.array([i.size[1] for i in ok])
    common = Counter(i.size for i in ok).most_common(3)
    modes = Counter(f"{i.format} {i.mode}" for i in ok).most_common()
    return [
        "formats and modes: " + ", ".join(f"{k} x{n}" for k, n in modes),
        f"width {w.min()}-{w.max()} (median {int(np.median(w))}), height {h.min()}-{h.max()} "
        f"(median {int(np.median(h))}), {len(set(zip(w, h)))} distinct sizes",
        "most common sizes: " + ", ".join(f"{a}x{b} x{n}" for (a, b), n in common),
    ]


# ---------------------------------------------------------------------------------------------- report

@dataclass
class VerifyResult:
    problems: list[str]
    counts: dict[str, int]
    weights: list[float]
    unreadable: list[str]
    skipped: list[str]
    duplicate_lines: list[str]
    n_within: int
    n_across: int
    after_dedupe: int

    @property
    def exit_code(self) -> int:
        return 1 if self.problems else 0


def verify_dataset(dataset_cfg: DictConfig, num_workers: int = 2, console: Console | None = None) -> VerifyResult:
    """Run every check on a composed ``dataset`` config and print the report."""
    out = console or Console(highlight=False, soft_wrap=True)  # one line per finding, even in a pipe
    table = build_table(dataset_cfg)
    expected = dataset_cfg.get("expected_counts")
    expected = OmegaConf.to_container(expected) if isinstance(expected, DictConfig) else expected
    out.print(f"[bold]{dataset_cfg.name}[/bold]: {len(table)} images in {table.num_classes} classes")
    if dataset_cfg.get("citation"):
        out.print(f"[dim]{dataset_cfg.citation}[/dim]")
    dropped = list(dataset_cfg.get("drop_classes") or [])
    if dropped:
        out.print(f"dropped by dataset.drop_classes: {', '.join(dropped)}")

    if table.images is None:
        infos = inspect_images(table.refs, num_workers)
        unreadable = [r for r, i in zip(table.refs, infos) if i.error]
        reasons = {r: i.error for r, i in zip(table.refs, infos) if i.error}
    else:  # rendered in memory (synthetic): nothing to read
        infos, unreadable, reasons = [], [], {}
    hashes = content_hashes(table, num_workers=num_workers)
    dups = find_duplicates(table, hashes)
    policy = dataset_cfg.get("duplicates", "drop")
    after = len(dedupe(table, hashes, policy)) if policy in DUPLICATE_POLICIES else len(table)
    counts = table.class_counts()
    weights = class_weights(list(counts.values()))
    skipped = list(table.problems)

    _print_counts(out, counts, expected, weights)
    _print_structure(out, table, dataset_cfg.get("group_key"))
    if infos:
        out.print("[bold]images[/bold]")
        for line in size_summary(infos):
            out.print(f"  {line}")
    out.print(f"[bold]unreadable files[/bold]: {len(unreadable)}")
    for ref in unreadable:
        out.print(f"  {ref}  ({reasons.get(ref, '')})")
    out.print(f"[bold]skipped files[/bold] (hidden, junk, not images): {len(skipped)}")
    for line in skipped:
        out.print(f"  {line}")
    lines = describe_duplicates(table, dups)
    out.print(f"[bold]exact duplicates[/bold] (sha256 of the file): {len(dups.within)} sets within classes "
              f"({dups.extra_copies} surplus copies), {len(dups.across)} across classes")
    for line in lines:
        out.print(f"  {line}")
    out.print(f"with dataset.duplicates={policy}: {after} images go to the split")

    problems = check_table(table, expected, unreadable)
    if problems:
        out.print(f"[bold red]FAILED[/bold red]: {len(problems)} problem(s)")
        for p in problems:
            out.print(f"[red]problem:[/red] {p}")
    else:
        out.print("[bold green]OK[/bold green]: counts as expected, every image readable")
    return VerifyResult(problems, counts, weights, unreadable, skipped, lines, len(dups.within),
                        len(dups.across), after)


def _print_structure(out: Console, table: SampleTable, group_key: str | None) -> None:
    if table.published_split is not None:
        split = Counter(table.published_split)
        out.print("published split: " + ", ".join(f"{k} {n}" for k, n in split.items()))
    if table.groups is not None:
        sizes = Counter(table.groups)
        out.print(f"groups ({group_key or 'group'}): {len(sizes)}, {min(sizes.values())}-{max(sizes.values())} "
                  f"images each; a group-aware split keeps each whole")


def _print_counts(out: Console, counts: dict[str, int], expected: dict | None, weights: list[float]) -> None:
    t = Table(title="images per class", title_justify="left")
    for col in ("class", "images", "expected", "", "eq. 1 weight"):
        t.add_column(col, justify="left" if col == "class" else "right")
    for (cls, n), w in zip(counts.items(), weights):
        exp = None if not expected or cls not in expected else int(expected[cls])
        status = "" if exp is None else ("ok" if exp == n else "[red]DIFFERS[/red]")
        t.add_row(cls, str(n), "-" if exp is None else str(exp), status, f"{w:.4f}")
    t.add_row("total", str(sum(counts.values())), "", "", "")
    out.print(t)
    out.print("[dim]eq. 1 (papers/000): w_c = N / (n_c * C), here on all images; training uses the train split[/dim]")
