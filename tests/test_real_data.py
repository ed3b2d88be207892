"""The five real data sets in their published layouts (../shared/data or $BLOODFL_DATA): counts, junk files,
duplicates, groups, eq. 1 weights, decoding, the cache and `python -m bloodfl.data verify`.

Every number below is from ../shared/data/README.md (or papers/000 Table 1), not from the configs: the
configs are checked against them.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from bloodfl.data import decode
from bloodfl.data.checks import check_table, class_weights
from bloodfl.data.decode import load_images
from bloodfl.data.sources import build_table
from bloodfl.data.table import SampleTable
from bloodfl.data.verify import VerifyResult, compose_config, verify_dataset
from tests.conftest import ROOT, shared_data_dir

DATA = shared_data_dir()
pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(DATA is None, reason="real data sets not found: put them in ../shared/data or set BLOODFL_DATA"),
]

README_COUNTS = {
    "rbc": {"elliptocyte": 1211, "codocyte": 851, "dacrocyte": 2076, "hypochromic": 222, "spherocyte": 562,
            "stomatocyte": 382, "acanthocyte": 354, "normal": 1426},  # pencil (24) dropped
    "all_pbs": {"Benign": 504, "Early": 985, "Pre": 963, "Pro": 804},
    # TRAIN 9,957 + TEST 2,487 (per class: the folder listings; the README gives the split totals)
    "wbc4": {"eosinophil": 2497 + 623, "lymphocyte": 2483 + 620, "monocyte": 2478 + 620, "neutrophil": 2499 + 624},
    "pbc": {"basophil": 1218, "eosinophil": 3117, "erythroblast": 1551, "ig": 2895, "lymphocyte": 1214,
            "monocyte": 1420, "neutrophil": 3329, "platelet": 2348},
    "wbc5": {"basophil": 1218, "eosinophil": 3117, "lymphocyte": 1214, "monocyte": 1420, "neutrophil": 3329},
}
DATASETS = list(README_COUNTS)

_tables: dict[str, SampleTable] = {}
_verified: dict[str, VerifyResult] = {}


def table(name: str) -> SampleTable:
    if name not in _tables:
        _tables[name] = build_table(compose_config(name, str(DATA)).dataset)
    return _tables[name]


def verified(name: str) -> VerifyResult:
    """verify's result for a data set, run once per session; its printout goes to a string."""
    if name not in _verified:
        console = Console(file=io.StringIO(), width=200)
        _verified[name] = verify_dataset(compose_config(name, str(DATA)).dataset, console=console)
    return _verified[name]


@pytest.mark.parametrize("name", DATASETS)
def test_counts_per_class_as_published(name: str) -> None:
    t = table(name)
    assert t.class_counts() == README_COUNTS[name]
    assert list(t.classes) == list(README_COUNTS[name])  # the fixed order of the config
    cfg = compose_config(name, str(DATA)).dataset
    assert check_table(t, dict(cfg.expected_counts)) == []


def test_wbc4_published_split_and_sources() -> None:
    t = table("wbc4")
    split = np.array(t.published_split)
    assert (split == "train").sum() == 9957 and (split == "test").sum() == 2487
    sources = {(s, c): len({g for g, gs, y in zip(t.groups, split, t.labels) if gs == s and y == k})
               for s in ("train", "test") for k, c in enumerate(t.classes)}
    assert [sources["train", c] for c in t.classes] == [75, 27, 16, 159]
    assert [sources["test", c] for c in t.classes] == [13, 6, 4, 48]
    assert not any("TEST_SIMPLE" in r for r in t.refs)


def test_rbc_smear_groups_and_pencil() -> None:
    t = table("rbc")
    assert len(set(t.groups)) == 1768
    i = next(i for i, r in enumerate(t.refs) if r.endswith("ADB2-K1-0002 objek#14.png"))
    assert t.groups[i] == "ADB2-K1-0002" and "1 Elliptocyte 1211.zip::" in t.refs[i]  # read from the zip
    assert any(p.endswith("dataciri_dyah_spero.xls") for p in t.problems)
    with_pencil = build_table(compose_config("rbc", str(DATA), ["dataset.drop_classes=[]"]).dataset)
    assert with_pencil.class_counts()["pencil"] == 24 and len(with_pencil) == 7108


def test_rbc_eq1_weights_proportional_to_paper_table1() -> None:
    paper = {"elliptocyte": 0.5118, "codocyte": 0.7283, "dacrocyte": 0.2985, "hypochromic": 2.7917,
             "spherocyte": 1.1008, "stomatocyte": 1.6224, "acanthocyte": 1.7507, "normal": 0.4346}
    counts = table("rbc").class_counts()
    ours = np.array(class_weights([counts[c] for c in paper]))
    ratio = np.array(list(paper.values())) / ours
    assert np.abs(ratio / ratio.mean() - 1).max() < 0.01, ratio
    assert ratio.mean() == pytest.approx(0.7, abs=0.005)  # training images / all images, as the issue says


def test_pbc_junk_file_reported_and_skipped() -> None:
    t = table("pbc")
    assert any(".DS_169665.jpg" in p and "junk" in p for p in t.problems)
    assert not any(".DS_" in r for r in t.refs)


def test_pbc_duplicates_reported() -> None:
    v = verified("pbc")
    assert v.exit_code == 0 and v.n_within == 16 and v.n_across == 1
    across = [line for line in v.duplicate_lines if "different classes" in line]
    assert len(across) == 1 and "eosinophil/EO_225902.jpg" in across[0] and "neutrophil/BNE_191112.jpg" in across[0]
    # drop: one copy of each within-class pair, both copies of the conflict
    assert v.after_dedupe == 17092 - 16 - 2
    assert any(".DS_169665.jpg" in s for s in v.skipped) and v.unreadable == []


def test_all_pbs_40_pro_duplicate_pairs() -> None:
    v = verified("all_pbs")
    assert v.exit_code == 0 and v.n_within == 40 and v.n_across == 0
    pairs = [re.findall(r"Pro-(\d+)\.jpg", line) for line in v.duplicate_lines]
    assert all(len(p) == 2 and abs(int(p[0]) - int(p[1])) == 1 for p in pairs)  # consecutive numbers
    assert v.after_dedupe == 3256 - 40


def test_rbc_3_spherocyte_duplicates() -> None:
    v = verified("rbc")
    assert v.exit_code == 0 and v.n_within == 3 and v.n_across == 0
    assert all("within class spherocyte" in line for line in v.duplicate_lines)
    assert v.after_dedupe == 7084 - 3


@pytest.mark.parametrize("name", ["wbc4", "wbc5"])
def test_verify_passes(name: str) -> None:
    v = verified(name)
    assert v.exit_code == 0 and v.problems == [] and v.unreadable == []
    assert v.counts == README_COUNTS[name]


def test_verify_cli_fails_on_a_tampered_count(tmp_path: Path) -> None:
    args = ["verify", "all_pbs", "--data-dir", str(DATA), "dataset.expected_counts.Pro=803"]
    r = subprocess.run([sys.executable, "-m", "bloodfl.data", *args], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 1, r.stderr
    assert "problem: class Pro: 804 images, expected 803" in r.stdout.splitlines()


@pytest.mark.parametrize("name", DATASETS)
def test_a_sample_decodes_to_rgb(name: str) -> None:
    t = table(name)
    sample = t.subset(np.arange(0, len(t), 97))
    cfg = compose_config(name, str(DATA)).dataset
    images, bad = load_images(sample, 32, resize=cfg.resize)
    assert bad == [] and images.shape == (len(sample), 32, 32, 3) and images.dtype == np.uint8
    assert images.std() > 10  # real pictures, not blank rows
    if name == "rbc":  # grayscale crops on black, padded with black: three equal channels, black corners
        assert (images[..., 0] == images[..., 2]).all() and (images[:, 0, 0] == 0).all()


def test_cache_on_real_images(tmp_path: Path, monkeypatch) -> None:
    sample = table("pbc").subset(np.arange(0, 17092, 50))
    direct, _ = load_images(sample, 32)
    cached, _ = load_images(sample, 32, cache_dir=tmp_path)
    assert np.array_equal(cached, direct)

    def no_reads(ref: str) -> bytes:
        raise AssertionError(f"read {ref} despite the cache")

    monkeypatch.setattr(decode, "read_bytes", no_reads)
    again, _ = load_images(sample, 32, cache_dir=tmp_path)
    assert np.array_equal(again, direct)
    monkeypatch.undo()
    bigger, _ = load_images(sample, 48, cache_dir=tmp_path)
    assert bigger.shape[1:] == (48, 48, 3) and len(list(tmp_path.glob("*.npy"))) == 2
