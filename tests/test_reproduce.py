"""The reproduction study (python -m bloodfl.reproduce, python -m bloodfl.reproduce.results): every paper's plan
composes with the real configs at both scales; a tiny synthetic study runs end to end into a CSV and a
regenerated page; every number in docs/results.md's generated tables is a cell of a committed CSV; bad input
is one line. One subprocess trains (three fast_dev_run jobs); the rest composes configs."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bloodfl.config import dp_default_model
from bloodfl.reproduce.__main__ import main as reproduce_main
from bloodfl.reproduce.plan import expand_jobs, plan
from bloodfl.reproduce.protocols import PAPERS, SCALES, TARGETS, Target
from bloodfl.reproduce.results import main as results_main
from bloodfl.reproduce.results import markers, read_csv, regenerate_page, results, target_row, targets_table
from tests.conftest import FAST, ROOT, compose_cfg

DOCS = ROOT / "docs"
NUMBER = re.compile(r"\d+(?:\.\d+)?")


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("paper_id", sorted(PAPERS))
def test_every_command_of_the_plan_composes(paper_id: str, scale: str, tmp_path: Path) -> None:
    """Each job of each command (as Hydra's sweeper expands it) composes with the real configs, on the paper's
    data set, into the study's own directory."""
    paper = PAPERS[paper_id]
    commands = plan(paper, scale, tmp_path / "study", ["paths.data_dir=/data"])
    assert [c.step.name for c in commands] == [s.name for s in paper.steps if scale in s.scales]
    for command in commands:
        assert command.args[-1] == f"hydra.sweep.dir={tmp_path / 'study' / command.step.name}"
        jobs = expand_jobs(command)
        assert jobs
        for job in jobs:
            cfg = compose_cfg(job, config_name=Path(command.script).stem)
            assert cfg.dataset.name == paper.dataset
            assert cfg.paths.data_dir == "/data"
            if scale == "cpu":
                assert cfg.dataset.image_size == 64
                if command.step.name == "federated_dp":  # dp=true's recipe, not the paper experiment's choice
                    assert cfg.model.name == dp_default_model() and cfg.optim.lr == cfg.dp.lr == 0.1
                    assert (cfg.fl.rounds, cfg.fl.local_epochs) == (10, 5)  # the paper's schedule: cheap enough
                elif command.step.name == "paper_cnn":  # papers/002 trained its CNN from scratch: its own lr
                    assert cfg.model.name == "paper002_cnn" and cfg.optim.lr == 1e-4
                else:
                    assert cfg.model.name == "resnet18" and cfg.optim.lr == 1e-3
            if command.step.name == "random_split":
                assert cfg.split.group_by == "none"
            # the options that measure a paper's flaw are on in that step only (and off by default)
            leaky_copies = command.step.name == "augment_before_split"
            assert list(cfg.dataset.copies_before_split) == (["hflip", "vflip", "hvflip"] if leaky_copies else [])
            if leaky_copies:
                assert cfg.augment.name == "none"  # the paper's copies replace bloodfl's on-the-fly flips
            # papers/003 at the cpu scale: one resnet18 gives the held-out and the training-image numbers
            both = paper_id == "003" and scale == "cpu"
            assert cfg.evaluation.on_training_images is (command.step.name == "test_on_training_images" or both)
        if command.step.name == "federated_dp":
            eps = {compose_cfg(j, config_name="federate").dp.target_epsilon for j in jobs}
            assert eps == {1.0, 3.0, 8.0}


def test_dry_run_prints_the_commands_and_the_scale(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert reproduce_main(["001", "--dry-run", "--out", str(tmp_path / "s"), "paths.data_dir=/data"]) == 0
    out = capsys.readouterr().out.splitlines()
    commands = [line for line in out if not line.startswith("#")]
    assert "train.py sweep=alam2025_all " in commands[0]
    assert any("federate.py" in c and "dp=true" in c and "dp.target_epsilon=1,3,8" in c for c in commands)
    assert commands[-1] == f"python -m bloodfl.report {tmp_path / 's'}"
    assert any(line.startswith("# cpu scale: 64 px") for line in out)
    # the paper's leaky protocol runs beside the leakage-free one (no gap left)
    assert any("dataset.copies_before_split=[hflip,vflip,hvflip]" in c and "augment=none" in c for c in commands)
    assert any(line.startswith("# augment_before_split: ") for line in out)
    assert not any(line.startswith("# not run") for line in out)
    assert out[-1] == "# 6 job(s) in 4 command(s)"
    assert not (tmp_path / "s").exists()  # a dry run writes nothing


@pytest.mark.parametrize("argv, message", [
    (["999", "--dry-run"], "unknown paper '999'; valid: 000 (dipto2023_rbc)"),
    (["000", "--dry-run", "--steps", "nope"], "unknown step 'nope' of papers/000; valid: models"),
    (["003", "--dry-run", "--scale", "cpu", "--steps", "kfold"], "unknown step 'kfold'"),
    (["001", "--steps", "models", "dp.target_epsilon=3"], "step models (train.py) does not compose: Could not "
                                                          "override 'dp.target_epsilon'"),
])
def test_bad_input_is_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        reproduce_main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and message in err


def test_results_refuse_a_study_without_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = tmp_path / "study"
    study.mkdir()
    (study / "study.json").write_text(json.dumps({"paper": "000", "scale": "cpu", "command": "python -m x"}))
    with pytest.raises(SystemExit) as exc:
        results_main([str(study), "--docs", str(DOCS)])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1
    assert "no finished run (metrics.json)" in err and "python -m x" in err
    with pytest.raises(SystemExit):
        results_main([str(tmp_path), "--docs", str(DOCS)])  # no study.json at all
    assert "not a study" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    """papers/000's three steps on synthetic data: one batch per stage, one round of two clients."""
    tmp = tmp_path_factory.mktemp("reproduce")
    study = tmp / "study"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "BLOODFL_LOGS": str(tmp / "logs"),
           "BLOODFL_CACHE": str(tmp / "cache")}
    args = [*FAST, "model=simple_cnn", "trainer.fast_dev_run=true", "evaluation.bootstrap=50", "fl.rounds=1",
            "fl.num_clients=2"]
    res = subprocess.run([sys.executable, "-m", "bloodfl.reproduce", "000", "--out", str(study), *args], cwd=tmp,
                         env=env, capture_output=True, text=True, timeout=600)
    return res, study


def test_tiny_study_runs_every_step_and_ends_in_the_report(tiny_study) -> None:  # noqa: ANN001
    res, study = tiny_study
    assert res.returncode == 0, res.stderr[-3000:]
    for step in ("models", "random_split", "federated"):
        assert (study / step / "0" / "metrics.json").exists(), step
    assert (study / "report.md").exists() and (study / "report.csv").exists()
    record = json.loads((study / "study.json").read_text())
    assert [s["status"] for s in record["steps"]] == ["done"] * 3
    assert all(s["wall_s"] > 0 for s in record["steps"])
    with pytest.raises(SystemExit):  # never into a study that already holds runs
        reproduce_main(["000", "--out", str(study), *FAST])


def test_results_write_the_csv_and_regenerate_only_the_marked_tables(tiny_study, tmp_path: Path) -> None:  # noqa: ANN001
    res, study = tiny_study
    assert res.returncode == 0, res.stderr[-3000:]
    docs = tmp_path / "docs"
    (docs / "results").mkdir(parents=True)
    shutil.copy(DOCS / "results" / "published.csv", docs / "results")
    page = (DOCS / "results.md").read_text()
    (docs / "results.md").write_text(page.replace(markers("000")[0], "Prose a user wrote.\n\n" + markers("000")[0]))
    assert results([study], docs) == [docs / "results" / "000.csv"]
    with open(docs / "results" / "000.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["variant"] for r in rows] == ["models", "random_split", "federated"]
    metrics = json.loads((study / "models" / "0" / "metrics.json").read_text())
    assert rows[0]["test_acc"] == f"{100 * metrics['test/acc']:.2f}"
    assert rows[0]["test_f1_macro_ci95_high"] == f"{100 * metrics['test/f1_macro_ci95_high']:.2f}"
    assert rows[0]["command"].startswith("python train.py ") and rows[2]["command"].startswith("python federate.py ")
    assert rows[1]["split"] == "7-2-1, random" and rows[0]["sensitivity"].count("=") == 8
    text = (docs / "results.md").read_text()
    assert "Prose a user wrote." in text
    assert "not run yet: `python -m bloodfl.reproduce 000`" not in text
    assert "not run yet: `python -m bloodfl.reproduce 001`" in text
    assert_page_backed_by_csvs(docs)
    # a second study of the same scale replaces the rows; the page follows
    results([study], docs)
    with open(docs / "results" / "000.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 3
    # a study of one step (--steps federated) replaces that step's rows and keeps the others, in step order
    partial = tmp_path / "partial"
    shutil.copytree(study, partial, ignore=shutil.ignore_patterns("models", "random_split"))
    record = json.loads((partial / "study.json").read_text())
    (partial / "study.json").write_text(json.dumps({**record, "steps": [s for s in record.get("steps", [])
                                                                         if s.get("name") == "federated"]}))
    results([partial], docs)
    rows = read_csv(docs / "results" / "000.csv")
    assert [(r["variant"], r["run_id"].split("/")[0]) for r in rows] == [
        ("models", study.name), ("random_split", study.name), ("federated", partial.name)]
    assert_page_backed_by_csvs(docs)


@pytest.mark.parametrize("paper_id, step, option", [
    ("001", "augment_before_split", "dataset.copies_before_split=[hflip,vflip,hvflip]"),
    ("003", "test_on_training_images", "evaluation.on_training_images=true"),
])
def test_leaky_protocols_are_steps_beside_the_clean_one(paper_id: str, step: str, option: str, tmp_path: Path) -> None:
    paper = PAPERS[paper_id]
    assert not paper.gaps and [s.name for s in paper.steps][:2] == ["models", step]
    for scale in SCALES:
        by_step = {c.step.name: c for c in plan(paper, scale, tmp_path)}
        if step in by_step:
            assert option in by_step[step].args and option not in by_step["models"].args
        else:  # papers/003 at the cpu scale: its one resnet18 run measures the held-out and the leaky number
            assert (paper_id, scale) == ("003", "cpu") and option in by_step["models"].args


def _fake_run(study: Path, step: str, config: dict, metrics: dict) -> None:
    job = study / step / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    (job / ".hydra" / "overrides.yaml").write_text("[]")
    (job / "metrics.json").write_text(json.dumps(metrics))


def test_flaws_measured_on_purpose_get_their_own_columns_never_test_ones(tmp_path: Path) -> None:
    """papers/003's train_eval/* and papers/001's leaked share go into their own CSV columns and page columns;
    the test_* columns keep the held-out test values."""
    docs = tmp_path / "docs"
    (docs / "results").mkdir(parents=True)
    shutil.copy(DOCS / "results" / "published.csv", docs / "results")
    shutil.copy(DOCS / "results.md", docs / "results.md")
    base = {"task_name": "train", "model": {"name": "resnet18"}, "dataset": {"name": "pbc"},
            "split": {"name": "7-2-1", "kind": "ratio"}, "trainer": {"max_epochs": 10}}
    test = {"test/acc": 0.9, "test/acc_ci95_low": 0.88, "test/acc_ci95_high": 0.92, "epochs": 10}
    study = tmp_path / "study"
    _fake_run(study, "models", base, test)
    _fake_run(study, "test_on_training_images", {**base, "evaluation": {"on_training_images": True}},
              {**test, "train_eval/acc": 0.995, "train_eval/acc_ci95_low": 0.99, "train_eval/acc_ci95_high": 0.999})
    (study / "study.json").write_text(json.dumps({"paper": "003", "scale": "cpu", "command": "python -m x",
                                                  "steps": [{"name": "models"}, {"name": "test_on_training_images"}]}))
    results([study], docs)
    rows = read_csv(docs / "results" / "003.csv")
    assert [r["variant"] for r in rows] == ["models", "test_on_training_images"]
    assert [r["test_acc"] for r in rows] == ["90.00", "90.00"]
    assert [r["train_eval_acc"] for r in rows] == ["", "99.50"] and rows[1]["train_eval_acc_ci95_high"] == "99.90"
    region = _region((docs / "results.md").read_text(), "003")
    assert "accuracy % on its own training images (not a test result)" in region
    assert "99.50 (99.00–99.90)" in region and "| 90.00 (88.00–92.00) |" in region
    assert "flipped copy" not in region and "on its own training images" not in _region(
        (docs / "results.md").read_text(), "000")
    # papers/001: the share of test images with a flipped twin in train
    study1 = tmp_path / "study1"
    _fake_run(study1, "augment_before_split", {**base, "dataset": {"name": "all_pbs",
                                                                   "copies_before_split": ["hflip", "vflip"]}},
              {**test, "data/copies_before_split": "hflip,vflip", "data/leaked_test_fraction": 0.97})
    (study1 / "study.json").write_text(json.dumps({"paper": "001", "scale": "cpu", "command": "python -m y"}))
    results([study1], docs)
    assert read_csv(docs / "results" / "001.csv")[0]["leaked_test"] == "97.00"
    assert "test images with a flipped copy in train %" in _region((docs / "results.md").read_text(), "001")
    assert_page_backed_by_csvs(docs)


def _region(text: str, paper_id: str) -> str:
    start, end = markers(paper_id)
    return text[text.index(start) + len(start):text.index(end)]


def _table_body(region: str) -> list[str]:
    """Table rows of a region without their header and separator lines."""
    out, previous = [], ""
    for line in region.splitlines():
        if line.startswith("|") and not line.startswith("|---") and previous.startswith("|"):
            out.append(line)
        previous = line if line.startswith("|") else ""
    return [line for line in out if not line.startswith("|---")]


def assert_page_backed_by_csvs(docs: Path) -> None:
    text = (docs / "results.md").read_text()
    published = read_csv(docs / "results" / "published.csv")
    for paper_id in PAPERS:
        region = _region(text, paper_id)
        path = docs / "results" / f"{paper_id}.csv"
        measured = read_csv(path)
        mine = [r for r in published if r["paper"] == paper_id] + measured
        cells = {n for r in mine for v in r.values() for n in NUMBER.findall(v or "")}
        for line in _table_body(region):
            missing = set(NUMBER.findall(line)) - cells
            assert not missing, f"papers/{paper_id}: {sorted(missing)} in {line!r} is in no docs/results CSV row"
        for r in measured:
            assert f"`{r['run_id']}`" in region, f"papers/{paper_id}: run {r['run_id']} is not on the page"
        for r in mine[:len(mine) - len(measured)]:
            # a per-class value sits on its class's line, any other on its model's
            label = r["metric"].split("/", 1)[1] if r["metric"].startswith("sensitivity/") else r["model"]
            assert any(f"| {label} |" in line and r["value"] in line for line in region.splitlines()), r
        if not measured:
            assert f"not run yet: `python -m bloodfl.reproduce {paper_id}`" in region


def test_committed_page_is_generated_from_committed_csvs(tmp_path: Path) -> None:
    """docs/results.md's tables are exactly what the CSVs generate, and each number in them is a CSV cell."""
    docs = tmp_path / "docs"
    shutil.copytree(DOCS / "results", docs / "results")
    shutil.copy(DOCS / "results.md", docs / "results.md")
    regenerate_page(docs)
    assert (docs / "results.md").read_text() == (DOCS / "results.md").read_text(), \
        "docs/results.md differs from its CSVs: run python -m bloodfl.reproduce.results --page-only"
    assert_page_backed_by_csvs(DOCS)
    assert "docs/results.md" in (ROOT / "README.md").read_text()


def _row(variant: str, model: str, val: str, test: str, run: str, scale: str = "cpu") -> dict[str, str]:
    return {"scale": scale, "variant": variant, "model": model, "val_acc": val, "test_acc": test,
            "test_acc_ci95_low": "", "test_acc_ci95_high": "", "run_id": run}


def test_a_target_reads_the_model_chosen_by_validation_never_by_test() -> None:
    level = Target("002", "wbc4", "models", 90.0)
    rows = [_row("models", "resnet18", "95.0", "88.0", "s/models/0"),
            _row("models", "paper002_cnn", "90.0", "91.0", "s/models/1"),  # better on test, worse on validation
            _row("models", "xception", "99.0", "99.9", "p/models/0", scale="paper")]  # the paper scale: not a target
    assert target_row(level, rows)[2:] == ["88.0", "missed by 2.00", "`s/models/0`"]
    assert target_row(level, [])[2] == "not run yet"
    gap = Target("001", "fed - central", "federated", -1.0, against="models")
    rows = [_row("models", "resnet18", "97.0", "97.20", "s/models/0"),
            _row("federated", "resnet18", "96.0", "96.50", "s/federated/0")]
    assert target_row(gap, rows)[2:4] == ["-0.70 (96.50 − 97.20, resnet18)", "met"]
    assert target_row(gap, rows[1:])[2] == "not run yet"  # nothing to compare with


def test_the_targets_table_on_the_page_is_generated_from_the_committed_csvs() -> None:
    assert _region((DOCS / "results.md").read_text(), "targets").strip() == targets_table(DOCS)
    assert [line.split(" | ")[0].lstrip("| ") for line in targets_table(DOCS).splitlines()[2:]] == \
        [f"papers/{t.paper}: {t.label}" for t in TARGETS]
