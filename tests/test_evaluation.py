"""The evaluation every run writes: metrics against hand-computed values, bootstrap CIs against the libraries,
figures, W&B offline contents; the study report (best by validation, k-fold) and the soft-voting ensemble."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from bloodfl.errors import BloodflError
from bloodfl.evaluation.metrics import _weighted_auc, bootstrap_ci, evaluate, read_predictions
from bloodfl.training.run import train
from tests.conftest import FAST, compose_cfg, run_cli

PNG = b"\x89PNG\r\n\x1a\n"


def test_metrics_equal_hand_computed_values() -> None:
    target = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 0])
    probs = torch.nn.functional.one_hot(pred, 3).float() * 0.8 + 0.2 / 3
    ev = evaluate(probs, target, ["a", "b", "c"], resamples=0)
    assert ev.confusion == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # a: TP=1 FN=1 FP=1 TN=3; b: TP=2 FN=0 FP=1 TN=3; c: TP=1 FN=1 FP=0 TN=4
    assert ev.per_class["sensitivity"] == pytest.approx([0.5, 1.0, 0.5])
    assert ev.per_class["specificity"] == pytest.approx([0.75, 0.75, 1.0])
    assert ev.per_class["precision"] == pytest.approx([0.5, 2 / 3, 1.0])
    assert ev.per_class["f1"] == pytest.approx([0.5, 0.8, 2 / 3])
    assert ev.per_class["support"] == [2.0, 2.0, 2.0]
    assert ev.scalars["acc"] == pytest.approx(4 / 6)
    assert ev.scalars["f1_macro"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert ev.scalars["f1_weighted"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)  # equal supports
    assert "macro avg" in ev.text and "acc_ci95_low" not in ev.scalars  # resamples=0: no CI

    separable = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.4, 0.6]])
    ev = evaluate(separable, torch.tensor([0, 0, 1, 1]), ["x", "y"], resamples=200)
    assert ev.scalars["auroc_macro"] == 1.0 and ev.per_class["auroc"] == [1.0, 1.0]
    assert ev.scalars["auroc_macro_ci95_low"] == 1.0


def _scores(n: int, seed: int, classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    target = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes))
    logits[np.arange(n), target] += 1.2
    logits[: n // 10] = 0.0  # tied scores, as saturated softmax outputs give
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return probs.round(3), target


def test_vectorised_bootstrap_equals_the_libraries_on_each_resample() -> None:
    probs, target = _scores(200, 0)
    rng = np.random.default_rng(5)
    weights = rng.multinomial(200, np.full(200, 1 / 200), size=4).astype(float)
    for w in weights:
        idx = np.repeat(np.arange(200), w.astype(int))
        for k in range(4):
            ours = _weighted_auc(probs[:, k], target == k, w[None])[0]
            assert ours == pytest.approx(roc_auc_score(target[idx] == k, probs[idx, k]), abs=1e-12)
    # the whole CI machinery against a slow loop over the same resamples (same seed -> same multiplicities)
    fast = bootstrap_ci(probs, target, 4, resamples=50, seed=3)
    rng = np.random.default_rng(3)
    weights = rng.multinomial(200, np.full(200, 1 / 200), size=50)
    slow = {"acc": [], "f1_macro": [], "auroc_macro": []}
    for w in weights:
        idx = np.repeat(np.arange(200), w)
        slow["acc"].append(accuracy_score(target[idx], probs[idx].argmax(1)))
        slow["f1_macro"].append(f1_score(target[idx], probs[idx].argmax(1), average="macro"))
        # one-vs-rest macro AUC: the mean of the classes' binary AUCs (as torchmetrics and scikit-learn define it)
        slow["auroc_macro"].append(np.mean([roc_auc_score(target[idx] == k, probs[idx, k]) for k in range(4)]))
    for name, values in slow.items():
        assert fast[name] == pytest.approx((np.percentile(values, 2.5), np.percentile(values, 97.5)), abs=1e-9)


def test_bootstrap_ci_contains_the_estimate_narrows_with_more_images_and_is_seeded() -> None:
    widths = []
    for n in (100, 1600):
        probs, target = _scores(n, 1)
        ev = evaluate(torch.from_numpy(probs), torch.from_numpy(target), list("abcd"), resamples=1000, seed=0)
        for m in ("acc", "f1_macro", "auroc_macro"):
            assert ev.scalars[f"{m}_ci95_low"] <= ev.scalars[m] <= ev.scalars[f"{m}_ci95_high"], m
        widths.append(ev.scalars["acc_ci95_high"] - ev.scalars["acc_ci95_low"])
    assert widths[1] < widths[0] / 2  # 16x the images: about a quarter of the width
    probs, target = _scores(100, 1)
    assert bootstrap_ci(probs, target, 4, 300, seed=7) == bootstrap_ci(probs, target, 4, 300, seed=7)


def test_grouped_bootstrap_resamples_sources_not_their_copies() -> None:
    """A test set of 20 identical copies of 50 source images carries the information of 50 images: resampling the
    sources gives exactly the CI of the 50 originals, while resampling the 1,000 copies gives a CI far too narrow."""
    probs, target = _scores(50, 2)
    copies_p, copies_t = np.repeat(probs, 20, axis=0), np.repeat(target, 20)
    sources = [f"src{i:03d}" for i in np.repeat(np.arange(50), 20)]
    grouped = bootstrap_ci(copies_p, copies_t, 4, 400, seed=1, groups=sources)
    originals = bootstrap_ci(probs, target, 4, 400, seed=1)
    for m in originals:
        assert grouped[m] == pytest.approx(originals[m], abs=1e-12), m
    naive = bootstrap_ci(copies_p, copies_t, 4, 400, seed=1)
    assert naive["acc"][1] - naive["acc"][0] < (grouped["acc"][1] - grouped["acc"][0]) / 3
    # one group per image is the ordinary bootstrap, resample for resample
    ones = [f"{i:04d}" for i in range(50)]
    assert bootstrap_ci(probs, target, 4, 400, seed=1, groups=ones) == bootstrap_ci(probs, target, 4, 400, seed=1)
    with pytest.raises(ValueError, match="groups has 3 labels for 50 images"):
        bootstrap_ci(probs, target, 4, 10, groups=["a", "b", "c"])


def test_a_run_writes_figures_predictions_and_a_wandb_run_holding_them(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_cfg([*FAST, "logger=wandb", "trainer.max_epochs=2", "evaluation.bootstrap=200"], tmp_path)
    metrics = train(cfg)
    for name in ("confusion_matrix", "roc", "learning_curves"):
        png = (tmp_path / "figures" / f"{name}.png").read_bytes()
        assert png.startswith(PNG) and len(png) > 10_000, name
    with open(tmp_path / "history.csv") as fh:
        history = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in history] == [1, 2] and all(r["val/acc"] and r["train/loss"] for r in history)
    refs, labels, classes, probs = read_predictions(tmp_path / "test_predictions.csv")
    with open(tmp_path / "splits.csv") as fh:
        test_refs = [r["path"] for r in csv.DictReader(fh) if r["split"] == "test"]
    assert refs == test_refs and np.allclose(probs.sum(1), 1.0, atol=1e-4)
    acc = np.mean([classes[i] == y for i, y in zip(probs.argmax(1), labels)])
    assert acc == pytest.approx(metrics["test/acc"], abs=1e-6)  # the module's accuracy, from the saved file
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("test/precision_weighted", "test/f1_weighted", "test/acc_ci95_low", "test/f1_macro_ci95_high",
                "test/auroc_macro_ci95_low", f"test/specificity/{classes[0]}", "model/params", "time/fit_s"):
        assert key in saved, key
    assert saved["test/acc_ci95_low"] <= saved["test/acc"] <= saved["test/acc_ci95_high"]
    assert "(95% CI" in (tmp_path / "test_report.txt").read_text()

    import wandb

    wandb.teardown()  # as at process exit: the W&B service writes the rest of the run's record
    run = next((tmp_path / "wandb").glob("offline-run-*"))
    media = run / "files" / "media"
    assert {p.name.split("_")[0] for p in (media / "images" / "figures").glob("*.png")} >= {"roc", "learning"}
    assert any(p.name.startswith("confusion_matrix") for p in (media / "images" / "figures").glob("*.png"))
    table = json.loads(next((media / "table" / "test").glob("per_class_*.table.json")).read_text())
    assert table["columns"][0] == "class" and [r[0] for r in table["data"]] == classes
    assert any((media / "table" / "test").glob("confusion_matrix_table_*.table.json"))  # the W&B plot's data
    assert b"test/acc_ci95_low" in next(run.glob("*.wandb")).read_bytes()  # the scalars are in the run's record


def test_evaluation_on_training_images_is_the_training_accuracy_under_its_own_keys(tmp_path: Path) -> None:
    """papers/003's flaw, measured on purpose: train_eval/* is the selected model's accuracy on exactly its training
    images (recomputed here from its checkpoint); test/* is the same as without the option."""
    from bloodfl.compose import Root

    args = [*FAST, "callbacks=default", "trainer.max_epochs=2", "evaluation.bootstrap=50"]
    clean = train(compose_cfg(args, tmp_path / "clean"))
    cfg = compose_cfg([*args, "evaluation.on_training_images=true"], tmp_path / "leaky")
    leaky = train(cfg)
    for key in [k for k in clean if k.startswith("test/")]:
        assert leaky[key] == (pytest.approx(clean[key], abs=1e-6) if isinstance(clean[key], float) else clean[key])
    assert not any(k.startswith("test/") for k in set(leaky) - set(clean))
    # recompute: the selected checkpoint on the training split, as the test evaluation feeds images
    root = Root(cfg)
    dm = root.datamodule()
    dm.setup("fit")
    module = root.module(root.network(dm.num_classes), dm.num_classes, dm.class_counts("train"))
    state = torch.load(leaky["best_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    module.eval()
    train_idx = dm.idx["train"]
    with torch.no_grad():
        x = dm.to_float(torch.from_numpy(np.ascontiguousarray(dm.images[train_idx])), train=False)
        pred = module(x).argmax(1).numpy()
    assert leaky["train_eval/acc"] == pytest.approx(np.mean(pred == dm.labels[train_idx]), abs=1e-6)
    support = sum(v for k, v in leaky.items() if k.startswith("train_eval/support/"))
    assert support == len(train_idx) and "train_eval/acc_ci95_low" in leaky
    saved = json.loads((tmp_path / "leaky" / "metrics.json").read_text())
    assert saved["train_eval/acc"] == leaky["train_eval/acc"] and "train_eval/confusion_matrix" in saved
    for name in ("per_class.csv", "confusion_matrix.csv", "report.txt"):
        assert (tmp_path / "leaky" / f"train_eval_{name}").exists()
        assert not (tmp_path / "clean" / f"train_eval_{name}").exists()
    assert "of the train_eval set" in (tmp_path / "leaky" / "train_eval_report.txt").read_text()


def test_federated_runs_refuse_evaluation_on_training_images() -> None:
    from bloodfl.compose import Root

    cfg = compose_cfg([*FAST, "evaluation.on_training_images=true"], config_name="federate")
    with pytest.raises(BloodflError, match="evaluation.on_training_images=true .* train.py only"):
        Root(cfg).check_federated()


def test_report_marks_leaky_jobs_and_never_selects_a_leaked_validation(tmp_path: Path) -> None:
    from bloodfl.report import report

    base = {"task_name": "train", "optimized_metric": "val/acc_best", "model": {"name": "resnet18"},
            "split": {"name": "7-2-1", "kind": "ratio"}}
    _fake_job(tmp_path, "0", [], {**base, "dataset": {"name": "pbc"}}, {"val/acc_best": 0.90, "test/acc": 0.9})
    _fake_job(tmp_path, "1", ["dataset.copies_before_split=[hflip]"],
              {**base, "dataset": {"name": "pbc", "copies_before_split": ["hflip"]}},
              {"val/acc_best": 0.99, "test/acc": 0.99})
    _fake_job(tmp_path, "2", ["evaluation.on_training_images=true"],
              {**base, "dataset": {"name": "pbc"}, "evaluation": {"on_training_images": True}},
              {"val/acc_best": 0.91, "test/acc": 0.9, "train_eval/acc": 1.0})
    result = report(tmp_path)
    assert result["best"].job.dir.name == "2"  # job 1's validation leaked: it is never the best
    _, (header, rows) = result["tables"][0]
    leak, on_train = header.index("leaky protocol, on purpose"), header.index(
        "accuracy on its training images (not a test result)")
    assert [r[leak] for r in rows] == ["-", "dataset.copies_before_split=[hflip]", "evaluation.on_training_images=true"]
    assert [r[on_train] for r in rows] == ["-", "-", "1.0000"]
    assert "evaluation.on_training_images" not in result["lines"][1]  # federate.py has no such option


def _fake_job(root: Path, name: str, overrides: list[str], config: dict, metrics: dict) -> Path:
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (job / "metrics.json").write_text(json.dumps(metrics))
    return job


def test_report_picks_the_best_job_by_validation_never_by_test(tmp_path: Path) -> None:
    from bloodfl.report import report

    base = {"task_name": "train", "optimized_metric": "val/acc_best", "dataset": {"name": "pbc"},
            "split": {"name": "7-2-1", "kind": "ratio"}}
    # resnet18 is best on validation, vgg16 on test: the report must choose resnet18
    _fake_job(tmp_path, "0", ["model=vgg16", "trainer.max_epochs=30"], {**base, "model": {"name": "vgg16"}},
              {"val/acc_best": 0.90, "test/acc": 0.97, "test/acc_ci95_low": 0.95, "test/acc_ci95_high": 0.98})
    _fake_job(tmp_path, "1", ["model=resnet18", "trainer.max_epochs=30", "optim.lr=0.0003"],
              {**base, "model": {"name": "resnet18"}}, {"val/acc_best": 0.95, "test/acc": 0.93})
    result = report(tmp_path)
    assert result["best"].job.model == "resnet18"
    _, (header, rows) = result["tables"][0]
    assert rows[1][0] == "1 ★" and not rows[0][0].endswith("★")
    assert rows[0][header.index("accuracy")] == "0.9700 (0.950–0.980)"
    assert result["lines"][1].endswith("python federate.py dataset=pbc model=resnet18 optim.lr=0.0003")
    for ext in ("md", "csv", "html"):
        assert "resnet18" in (tmp_path / f"report.{ext}").read_text()
    with pytest.raises(BloodflError, match="never by a test metric"):
        report(tmp_path, select="test/acc")


def test_kfold_multirun_report_gives_mean_and_std_across_folds(tmp_path: Path) -> None:
    res = run_cli("train.py", ["-m", *FAST, "dataset.source.n_per_class=24", "split=kfold", "split.k=3",
                               "split.fold=0,1,2", "trainer.fast_dev_run=true", "evaluation.bootstrap=100"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    sweep = next((tmp_path / "logs" / "train" / "multiruns").iterdir())
    from bloodfl.report import main

    assert main([str(sweep)]) == 0
    md = (sweep / "report.md").read_text()
    jobs = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/metrics.json"))]
    assert len(jobs) == 3
    accs = [j["test/acc"] for j in jobs]
    assert f"{statistics.mean(accs):.4f} ± {statistics.stdev(accs):.4f}" in md
    assert "3 (0,1,2)" in md and "7-2-1" not in md
    # folds are different splits: an ensemble of them would vote on its own training images
    from bloodfl.ensemble import ensemble

    with pytest.raises(BloodflError, match="different split"):
        ensemble([sweep / "0", sweep / "1"], tmp_path / "ens")


def test_report_and_ensemble_refuse_bad_input_with_one_line(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from bloodfl import ensemble, report

    for main, argv, message in ((report.main, [str(tmp_path / "missing")], "is not a directory"),
                                (report.main, [str(tmp_path)], "no finished job"),
                                (ensemble.main, [str(tmp_path)], "at least two run directories"),
                                (ensemble.main, [str(tmp_path), str(tmp_path)], "holds no finished, tested run")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and err.startswith("bloodfl: error:") and message in err
        assert len(err.splitlines()) == 1
