"""python -m bloodfl.predict: a tiny run's model on images it never saw, checked against the run's own evaluation."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf, open_dict
from PIL import Image

from bloodfl.compose import Root
from bloodfl.data.datamodule import ArrayDataModule
from bloodfl.data.decode import decode_image
from bloodfl.data.synthetic import render_synthetic
from bloodfl.errors import BloodflError
from bloodfl.predict import main
from bloodfl.training.module import ClassifierModule
from bloodfl.training.run import train
from tests.conftest import FAST, compose_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

# normalize=train: the statistics exist only in the run's record, so a predict that guessed them would fail
RUN = [*FAST, "callbacks=default", "callbacks.progress_bar=null", "callbacks.early_stopping=null",
       "trainer.max_epochs=1", "+trainer.enable_progress_bar=false", "dataset.source.n_per_class=10",
       "logger=none", "dataset.normalize=train"]
UNSEEN_SEED = 2027  # the run rendered its images from seed 42


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A finished 1-epoch run with the directory layout train.py leaves (``.hydra/config.yaml`` as Hydra saves it)."""
    out = tmp_path_factory.mktemp("run")
    cfg = compose_cfg(RUN, out)
    metrics = train(cfg)
    saved = cfg.copy()
    with open_dict(saved):
        saved.paths.output_dir = "${hydra:runtime.output_dir}"  # unresolvable outside Hydra, as in a real run
    (out / ".hydra").mkdir()
    OmegaConf.save(saved, out / ".hydra" / "config.yaml")
    return out, metrics


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """Unseen images: 32 px PNGs (one in a sub-folder), a 48x40 JPEG, a corrupt PNG and a text file."""
    folder = tmp_path_factory.mktemp("images")
    rendered, _ = render_synthetic(1, 32, seed=UNSEEN_SEED)
    (folder / "sub").mkdir()
    names = [f"cell{i}.png" for i in range(4)] + ["sub/cell4.png"]
    for name, img in zip(names, rendered):
        Image.fromarray(img).save(folder / name)
    Image.fromarray(rendered[5]).resize((48, 40)).save(folder / "wide.jpg", quality=90)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (folder / "notes.txt").write_text("not an image")
    pixels = {str(folder / n): img for n, img in zip(names, rendered)}
    pixels[str(folder / "wide.jpg")] = decode_image((folder / "wide.jpg").read_bytes(), 32, "stretch")
    return folder, pixels


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def reference_probs(run_dir: Path, metrics: dict, pixels: np.ndarray) -> torch.Tensor:
    """The run's own evaluation path: its DataModule's normalization, its best checkpoint restored by Lightning,
    ClassifierModule.test_step's softmax."""
    cfg = compose_cfg(RUN, run_dir)
    root = Root(cfg)
    data = root.datamodule()
    data.setup("fit")  # recomputes the training split's statistics, as the run did
    held_out = ArrayDataModule(pixels, np.zeros(len(pixels), dtype=np.int64), test_idx=np.arange(len(pixels)),
                               batch_size=4, normalize=data.normalization, classes=data.classes)
    module = ClassifierModule(root.network(data.num_classes), data.num_classes)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False)
    trainer.test(module, datamodule=held_out, ckpt_path=metrics["best_checkpoint"], verbose=False)
    assert module.test_probs is not None
    return module.test_probs


def test_one_row_per_image_matching_the_runs_evaluation(run, images, tmp_path: Path, capsys) -> None:
    run_dir, metrics = run
    folder, pixels = images
    out = tmp_path / "pred.csv"
    assert main([f"run={run_dir}", f"images={folder}", f"out={out}", "batch_size=4"]) == 0
    printed = capsys.readouterr().out

    recorded = json.loads((run_dir / "preprocessing.json").read_text())
    classes = recorded["classes"]
    assert classes == list(compose_cfg(RUN).dataset.classes)
    rows = read_rows(out)
    assert sorted(r["path"] for r in rows) == sorted(pixels)  # every readable image once; no text file, no corrupt
    for row in rows:
        probs = np.array([float(row[f"p_{c}"]) for c in classes])
        assert probs.sum() == pytest.approx(1.0, abs=1e-5)
        assert row["predicted"] in classes and row["predicted"] == classes[int(probs.argmax())]
        assert float(row["confidence"]) == pytest.approx(probs.max())

    expected = reference_probs(run_dir, metrics, np.stack(list(pixels.values())))
    got = torch.tensor([[float(next(r for r in rows if r["path"] == p)[f"p_{c}"]) for c in classes] for p in pixels])
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=0)

    unreadable = read_rows(tmp_path / "pred_unreadable.csv")
    assert [Path(r["path"]).name for r in unreadable] == ["broken.png"] and unreadable[0]["error"]
    assert "1 unreadable file(s) left out (broken.png)" in printed and "the best checkpoint by val/loss" in printed


def test_cam_writes_an_overlay_per_image(run, images, tmp_path: Path) -> None:
    run_dir, _ = run
    folder, pixels = images
    assert main([f"run={run_dir}", f"images={folder}", "--cam"]) == 0
    # the default place: <run>/predictions/<timestamp>.csv, beside <timestamp>_unreadable.csv
    (csv_path,) = [p for p in (run_dir / "predictions").glob("*.csv") if not p.stem.endswith("_unreadable")]
    rows = read_rows(csv_path)
    cams = sorted(p.name for p in (csv_path.parent / f"{csv_path.stem}_cam").iterdir())
    assert cams == sorted(["cell0_cam.png", "cell1_cam.png", "cell2_cam.png", "cell3_cam.png", "sub__cell4_cam.png",
                           "wide_cam.png"])
    assert len(rows) == len(pixels) == len(cams)
    for row in rows:
        with Image.open(row["cam"]) as img:
            w, h = img.size
            arr = np.asarray(img.convert("RGB"))
        sw, sh = Image.open(row["path"]).size
        scale = 256 / max(sw, sh)  # small images are scaled up so the longer side is 256 px
        assert (w, h) == (2 * round(sw * scale), round(sh * scale))  # original | overlay
        assert not np.array_equal(arr[:, : w // 2], arr[:, w // 2:])  # the right half carries the heat map


def test_bad_arguments_are_one_line_errors(run, images, tmp_path: Path, capsys) -> None:
    run_dir, _ = run
    folder, _ = images
    old_run = tmp_path / "old_run"  # normalize=train without its record: the statistics are gone
    shutil.copytree(run_dir, old_run, ignore=shutil.ignore_patterns("preprocessing.json", "predictions"))
    no_ckpt = tmp_path / "no_ckpt"
    shutil.copytree(run_dir, no_ckpt, ignore=shutil.ignore_patterns("checkpoints", "predictions"))
    cases = [
        ([f"run={old_run}", f"images={folder}"], "used normalize=train, whose statistics it did not record"),
        ([f"run={no_ckpt}", f"images={folder}"], "is missing from the run directory"),
        ([f"run={tmp_path / 'nope'}", f"images={folder}"], "no such directory"),
        ([f"run={folder}", f"images={folder}"], "not a bloodfl run directory"),
        ([f"run={run_dir}", f"imgs={folder}"], "valid keys: run, images, out, batch_size"),
        ([f"run={run_dir}", f"images={tmp_path / 'none'}"], "no such file or folder"),
        ([f"run={run_dir}", f"images={folder}", f"out={folder / 'cell0.png'}"], "never overwrite"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("bloodfl: error: ") and message in err and "\n" not in err, err


def test_federated_dp_run_predicts_with_its_final_global_model(images, tmp_path: Path, capsys) -> None:
    """federate.py's round checkpoint, and a DP network (BatchNorm replaced by GroupNorm) that loads strictly."""
    from bloodfl.fl.evaluator import GlobalEvaluator
    from bloodfl.fl.loop import load_checkpoint
    from bloodfl.fl.run import federate

    folder, pixels = images
    args = ["dataset=synthetic", "dataset.image_size=32", "dataset.source.n_per_class=10", "loader.batch_size=8",
            "logger=none", "fl.num_clients=2", "fl.rounds=1", "dp='true'", "dp.target_epsilon=null",
            "dp.noise_multiplier=1.0", "model=simple_cnn", "optim.lr=1e-3"]  # a BatchNorm CNN, converted
    run_dir = tmp_path / "fl"
    cfg = compose_cfg(args, run_dir, "federate")
    metrics = federate(cfg)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    (run_dir / "preprocessing.json").unlink()  # as in runs older than it: constants and classes from the config
    out = tmp_path / "fl.csv"
    assert main([f"run={run_dir}", f"images={folder}", f"out={out}", "--cam"]) == 0
    assert "the global model the run tested (round_001.pt)" in capsys.readouterr().out
    rows = {r["path"]: r for r in read_rows(out)}
    assert set(rows) == set(pixels) and all(Path(r["cam"]).is_file() for r in rows.values())

    root = Root(cfg)
    classes = list(cfg.dataset.classes)
    net = root.network(len(classes))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    held_out = ArrayDataModule(np.stack(list(pixels.values())), np.zeros(len(pixels), dtype=np.int64),
                               test_idx=np.arange(len(pixels)), normalize=cfg.dataset.normalize, classes=classes)
    evaluator = GlobalEvaluator(root.module(net, len(classes)), held_out,
                                lambda **kw: pl.Trainer(logger=False, enable_checkpointing=False, **kw))
    evaluator.evaluate(load_checkpoint(Path(metrics["final_checkpoint"]))["weights"], "test")
    got = torch.tensor([[float(rows[p][f"p_{c}"]) for c in classes] for p in pixels])
    torch.testing.assert_close(got, evaluator.module.test_probs, atol=2e-6, rtol=0)


def test_run_without_a_best_checkpoint_uses_the_final_weights_it_tested(run, images, tmp_path: Path, capsys) -> None:
    """dp=true runs save only last.ckpt (best_checkpoint: null) and test their final weights: predict uses those."""
    run_dir, _ = run
    folder, _ = images
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("best-*.ckpt", "predictions"))
    metrics = json.loads((copy / "metrics.json").read_text())
    (copy / "metrics.json").write_text(json.dumps({**metrics, "best_checkpoint": None}))
    assert main([f"run={copy}", f"images={folder / 'cell0.png'}", f"out={tmp_path / 'p.csv'}"]) == 0
    assert "the final weights the run tested (last.ckpt" in capsys.readouterr().out
    assert len(read_rows(tmp_path / "p.csv")) == 1


def test_cam_refuses_fixed_features_in_one_line() -> None:
    """color_hist's histograms carry no gradient: Grad-CAM would fail deep inside the library, so it is refused."""
    from bloodfl.inference.cam import CamMaker
    from bloodfl.models import build_classifier

    with pytest.raises(BloodflError, match="'color_hist' computes its features without gradients.*without --cam"):
        CamMaker(build_classifier("color_hist", 4, 32).eval(), 32)
    with CamMaker(build_classifier("simple_cnn", 4, 32).eval(), 32) as cams:  # a CNN's map still works
        assert cams.maps(torch.rand(2, 3, 32, 32), [0, 1]).shape == (2, 32, 32)
