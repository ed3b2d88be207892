"""Federated runs end to end on synthetic data: outputs, learning, FedAvg = local training, exact resume."""

from __future__ import annotations

import copy
import csv
import functools
import gc
import json
import weakref
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from bloodfl.data.datamodule import ArrayDataModule
from bloodfl.errors import BloodflError
from bloodfl.fl.client import FLClient, ProximalTerm, client_seed
from bloodfl.fl.evaluator import GlobalEvaluator
from bloodfl.fl.loop import list_checkpoints, load_checkpoint, sample_clients
from bloodfl.fl.run import federate
from bloodfl.inference.load import find_checkpoint
from bloodfl.models.registry import build_classifier
from bloodfl.training.module import ClassifierModule
from tests.conftest import compose_cfg, run_cli

FL_FAST = ["dataset=synthetic", "dataset.image_size=32", "dataset.source.n_per_class=16", "loader.batch_size=8",
           "logger=csv", "fl.num_clients=2", "fl.rounds=2"]


def rounds(out: Path) -> list[dict[str, str]]:
    with open(out / "rounds.csv") as fh:
        return list(csv.DictReader(fh))


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(list_checkpoints(out)[-1][1])["weights"]


def test_two_clients_two_rounds_outputs_and_learning(tmp_path: Path) -> None:
    cfg = compose_cfg([*FL_FAST, "dataset.source.n_per_class=20", "fl.local_epochs=2"], tmp_path, "federate")
    metrics = federate(cfg)
    rows = rounds(tmp_path)
    assert [int(r["round"]) for r in rows] == [1, 2]
    assert rows[0]["clients"] == "0 1" and int(rows[0]["client0/examples"]) > 0
    assert float(rows[0]["client1/train/loss"]) > 0 and "client1/val/acc" in rows[0]
    # the Flower end-to-end idiom: the global model improves. Drop of test/loss from round 1 to 2 measured
    # with this config at seeds 1, 2, 3, 42: 0.105, 0.079, 0.037, 0.106 (before the normalisation fix of
    # issue #8 it was about 0.005); the bound is half the smallest
    assert float(rows[-1]["test/loss"]) < float(rows[0]["test/loss"]) - 0.018, rows
    assert [r for r, _ in list_checkpoints(tmp_path)] == [1, 2]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("test/acc", "test/f1_macro", "test/loss", "val/acc"):
        assert saved[key] == pytest.approx(metrics[key])
    assert saved["test/acc"] == pytest.approx(float(rows[-1]["test/acc"]))
    assert (tmp_path / "figures" / "learning_curves.png").stat().st_size > 0
    assert 0.0 <= saved["test/auroc_macro"] <= 1.0 and (tmp_path / "test_confusion_matrix.csv").exists()
    assert (tmp_path / "csv" / "metrics.csv").exists()
    part = (tmp_path / "partition.csv").read_text().splitlines()
    assert part[0].startswith("client,n,elliptocyte") and len(part) == 3
    # the clients' shards cover the training split
    n_train = sum(line.endswith(",train") for line in (tmp_path / "splits.csv").read_text().splitlines())
    assert sum(int(line.split(",")[1]) for line in part[1:]) == n_train


def test_one_client_one_round_equals_local_training(tmp_path: Path) -> None:
    # FedAvg's weights; fl.bn_stats=recompute replaces the BatchNorm statistics (test_fl_batchnorm.py)
    cfg = compose_cfg([*FL_FAST, "fl.num_clients=1", "fl.rounds=1", "fl.val_fraction=0", "fl.bn_stats=average"],
                      tmp_path, "federate")
    federate(cfg)
    fed = final_weights(tmp_path)
    init = load_checkpoint(list_checkpoints(tmp_path)[0][1])  # the one round
    assert init["round"] == 1

    # plain Lightning training of the same initial model on the same training images with the same seed
    from bloodfl.compose import Root

    root = Root(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = root.datamodule()
    dm.setup("fit")
    module = root.module(root.network(dm.num_classes), dm.num_classes)
    seed = client_seed(cfg.seed, 1, 0)
    pl.seed_everything(seed, workers=True, verbose=False)
    local = ArrayDataModule(dm.images, dm.labels, train_idx=dm.idx["train"], batch_size=8, seed=seed,
                            normalize=dm.normalization, classes=dm.classes)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         limit_val_batches=0, accelerator="cpu")
    trainer.fit(module, datamodule=local)
    plain = module.net.state_dict()
    assert fed.keys() == plain.keys()
    for k in fed:
        assert torch.equal(fed[k], plain[k]), k


def test_resume_after_interruption_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = [*FL_FAST, "fl.num_clients=3", "fl.fraction_fit=0.67"]
    whole = tmp_path / "whole"
    federate(compose_cfg(args, whole, "federate"))

    broken = tmp_path / "broken"
    real_fit = FLClient.fit

    fits_in_round_2: list[int] = []

    def fit_then_die(self: FLClient, weights: dict, server_round: int, config: dict) -> object:
        if server_round == 2:
            fits_in_round_2.append(self.cid)
            if len(fits_in_round_2) == 2:
                raise KeyboardInterrupt  # killed in the middle of round 2, after one client's local fit
        return real_fit(self, weights, server_round, config)

    monkeypatch.setattr(FLClient, "fit", fit_then_die)
    with pytest.raises(KeyboardInterrupt):
        federate(compose_cfg(args, broken, "federate"))
    assert [r for r, _ in list_checkpoints(broken)] == [1] and not (broken / "metrics.json").exists()
    monkeypatch.setattr(FLClient, "fit", real_fit)

    with pytest.raises(BloodflError, match="fl.resume=true"):  # a plain restart refuses to overwrite it
        federate(compose_cfg(args, broken, "federate"))
    with pytest.raises(BloodflError, match="differ"):
        federate(compose_cfg([*args, "fl.resume=true", "optim.lr=0.01"], broken, "federate"))
    federate(compose_cfg([*args, "fl.resume=true"], broken, "federate"))

    a, b = final_weights(whole), final_weights(broken)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma = json.loads((whole / "metrics.json").read_text())
    mb = json.loads((broken / "metrics.json").read_text())
    for k in ma:
        if k.startswith(("test/", "val/")):
            assert ma[k] == mb[k], k
    drop = {"seconds", "fit_seconds", "bn_seconds", "eval_seconds"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in rounds(whole)] == \
        [{k: v for k, v in r.items() if k not in drop} for r in rounds(broken)]
    with pytest.raises(BloodflError, match="finished run"):  # never overwrite a finished run
        federate(compose_cfg([*args, "fl.resume=true"], broken, "federate"))


def test_tuning_mode_evaluates_rounds_on_validation(tmp_path: Path) -> None:
    metrics = federate(compose_cfg([*FL_FAST, "fl.rounds=1", "test=false"], tmp_path, "federate"))
    assert "val/acc" in rounds(tmp_path)[0] and "test/acc" not in rounds(tmp_path)[0]
    assert not any(k.startswith("test/") for k in metrics)


def test_eval_every_skips_evaluation_between_rounds_and_changes_no_weights(tmp_path: Path) -> None:
    """fl.eval_every=2 over 3 rounds evaluates after rounds 2 and 3 (the last), and trains exactly as every round."""
    every, sparse = tmp_path / "every", tmp_path / "sparse"
    args = [*FL_FAST, "fl.rounds=3"]
    federate(compose_cfg(args, every, "federate"))
    metrics = federate(compose_cfg([*args, "fl.eval_every=2"], sparse, "federate"))
    rows = rounds(sparse)
    assert [r["test/acc"] != "" for r in rows] == [False, True, True]
    assert float(rows[0]["eval_seconds"]) == 0.0 and float(rows[1]["eval_seconds"]) > 0
    a, b = final_weights(every), final_weights(sparse)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metrics["test/acc"] == pytest.approx(float(rounds(every)[-1]["test/acc"]))
    assert (sparse / "figures" / "learning_curves.png").stat().st_size > 0
    with pytest.raises(BloodflError, match="fl.eval_every must be >= 1"):
        federate(compose_cfg([*args, "fl.eval_every=0"], tmp_path / "zero", "federate"))


def test_select_best_tests_the_best_validation_round_and_survives_resume(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """fl.select=best validates every round and tests the round with the best fl.monitor once (train.py's
    ModelCheckpoint). fl.mode=max on val/loss selects the worst round, so the selected round is not the last."""
    args = [*FL_FAST, "fl.rounds=3", "fl.select=best", "fl.mode=max", "fl.keep_checkpoints=1"]
    whole = tmp_path / "whole"
    metrics = federate(compose_cfg(args, whole, "federate"))
    rows = rounds(whole)
    assert "test/acc" not in rows[0]  # the rounds are validated, never tested
    losses = [float(r["val/loss"]) for r in rows]
    chosen = 1 + losses.index(max(losses))
    assert metrics["selected_round"] == chosen and chosen < 3, losses  # the global model learns: round 1 is worst
    assert metrics["val/loss"] == pytest.approx(max(losses))
    assert [r for r, _ in list_checkpoints(whole)] == [chosen, 3]  # pruning keeps the selected round
    assert find_checkpoint(whole).path.name == f"round_{chosen:03d}.pt"  # what predict.py loads
    # the test values are the selected round's: a run that stops after that round tests the same weights
    upto = federate(compose_cfg([*FL_FAST, f"fl.rounds={chosen}"], tmp_path / "upto", "federate"))
    for k in ("test/acc", "test/loss", "test/f1_macro"):
        assert metrics[k] == pytest.approx(upto[k]), k

    # killed in round 3 (round 1's and 2's checkpoints are on disk), resumed: the same selection and test values
    broken = tmp_path / "broken"
    real_fit = FLClient.fit

    def fit_then_die(self: FLClient, weights: dict, server_round: int, config: dict) -> object:
        if server_round == 3:
            raise KeyboardInterrupt
        return real_fit(self, weights, server_round, config)

    monkeypatch.setattr(FLClient, "fit", fit_then_die)
    with pytest.raises(KeyboardInterrupt):
        federate(compose_cfg(args, broken, "federate"))
    monkeypatch.setattr(FLClient, "fit", real_fit)
    resumed = federate(compose_cfg([*args, "fl.resume=true"], broken, "federate"))
    for k in ("selected_round", "val/loss", "test/acc", "test/loss"):
        assert resumed[k] == metrics[k], k

    for bad, msg in (("fl.select=first", "fl.select must be last or best"),
                     ("fl.monitor=test/acc", "fl.monitor must be one of val/loss")):
        with pytest.raises(BloodflError, match=msg):
            federate(compose_cfg([*args, bad], tmp_path / bad.split("=")[0], "federate"))


def test_global_evaluation_in_channels_last_equals_the_nchw_model() -> None:
    """The evaluator runs its model channels-last (faster on CPU); its predictions are the NCHW model's, and the
    weights it is given are not changed."""
    torch.manual_seed(0)
    images = np.random.default_rng(0).integers(0, 255, (24, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(24) % 4
    dm = ArrayDataModule(images, labels, train_idx=np.arange(8), test_idx=np.arange(8, 24), batch_size=8,
                         classes=list("abcd"))
    net = build_classifier("simple_cnn", 4, 32)
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    trainer = functools.partial(pl.Trainer, accelerator="cpu", logger=False, enable_checkpointing=False)
    evaluator = GlobalEvaluator(ClassifierModule(copy.deepcopy(net), 4), dm, trainer)
    got = evaluator.evaluate(weights, "test")
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in evaluator.module.net.parameters()
               if p.dim() == 4)
    assert all(v.is_contiguous() and torch.equal(v, net.state_dict()[k]) for k, v in weights.items())
    nchw = ClassifierModule(net, 4)
    want = trainer(enable_progress_bar=False).test(nchw, datamodule=dm, verbose=False)[0]
    torch.testing.assert_close(evaluator.module.test_probs, nchw.test_probs, atol=1e-5, rtol=0)
    assert got["test/acc"] == pytest.approx(float(want["test/acc"]))


def test_client_sampling_is_seeded() -> None:
    a = [sample_clients(7, r, 10, 0.3) for r in range(1, 6)]
    assert a == [sample_clients(7, r, 10, 0.3) for r in range(1, 6)]
    assert all(len(s) == 3 and s == sorted(set(s)) for s in a)
    assert len({tuple(s) for s in a}) > 1  # rounds differ
    assert sample_clients(7, 1, 10, 1.0) == list(range(10))
    assert sample_clients(7, 1, 10, 0.01) and len(sample_clients(7, 1, 10, 0.01)) == 1


def _toy_client(mu: float) -> tuple[float, float]:
    """Distance of a client's update from the global weights after one local epoch, with FedProx' mu."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    images = np.random.default_rng(0).integers(0, 255, (64, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(64) % 4
    dm = ArrayDataModule(images, labels, train_idx=np.arange(64), batch_size=8, classes=list("abcd"))
    module = ClassifierModule(net, 4, optimizer=functools.partial(torch.optim.Adam, lr=0.05))
    client = FLClient(0, module, dm, functools.partial(pl.Trainer, accelerator="cpu", logger=False,
                                                       enable_checkpointing=False, enable_progress_bar=False))
    start = client.get_weights()
    config = {"seed": 1, "local_epochs": 3, **({"proximal_mu": mu} if mu else {})}
    res = client.fit(start, 1, config)
    dist = sum(float((res.weights[k] - start[k]).norm() ** 2) for k in start) ** 0.5
    return dist, res.metrics["train/loss"]


def test_a_local_fit_frees_its_optimizer_without_waiting_for_the_garbage_collector() -> None:
    """Lightning's trainers are reference cycles; the client must not leave each round's optimizer state to them
    (it grew a 20-round resnet18 run to 11.5 GB)."""
    seen: list[weakref.ref] = []

    class Watch(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            seen.append(weakref.ref(trainer.optimizers[0]))

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    images = np.random.default_rng(0).integers(0, 255, (32, 8, 8, 3), dtype=np.uint8)
    dm = ArrayDataModule(images, np.arange(32) % 4, train_idx=np.arange(32), batch_size=8, classes=list("abcd"))

    def make_trainer(callbacks: list[pl.Callback], **kwargs: object) -> pl.Trainer:
        return pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          callbacks=[*callbacks, Watch()], **kwargs)

    client = FLClient(0, ClassifierModule(net, 4), dm, make_trainer)
    gc.collect()
    gc.disable()  # only reference counting frees anything now
    try:
        for r in (1, 2):
            client.fit(client.get_weights(), r, {"seed": 1, "local_epochs": 1})
        assert len(seen) == 2 and all(ref() is None for ref in seen)
    finally:
        gc.enable()


def test_fedprox_keeps_clients_near_the_global_model() -> None:
    free, _ = _toy_client(0.0)
    prox, _ = _toy_client(5.0)
    assert prox < 0.5 * free, (prox, free)  # measured 0.64 vs 6.74


def test_proximal_gradient_is_mu_times_distance() -> None:
    net = torch.nn.Linear(3, 2)
    glob = {k: v.detach().clone() - 1.0 for k, v in net.state_dict().items()}
    term = ProximalTerm(0.25, glob)
    term._pairs = [(p, glob[n]) for n, p in net.named_parameters()]
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    term.add_gradient()
    for p in net.parameters():
        assert torch.allclose(p.grad, torch.full_like(p, 0.25))  # mu * (w - (w - 1))


def test_cli_run_and_resume_hint(tmp_path: Path) -> None:
    res = run_cli("federate.py", [*FL_FAST, "fl.rounds=1", "fl.partition=dirichlet", "fl.alpha=0.3"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = list((tmp_path / "logs" / "federate" / "runs").glob("*/metrics.json"))
    assert len(runs) == 1
    log = (runs[0].parent / "federate.log").read_text()
    assert "fl.resume=true hydra.run.dir=" in log
    bad = run_cli("federate.py", [*FL_FAST, "fl.partition=by_group"], tmp_path)
    assert bad.returncode == 2 and "group key" in bad.stderr and "Traceback" not in bad.stderr



@pytest.mark.parametrize("strategy", ["fedadam", "fedyogi"])
def test_server_optimizers_run_through_federate(strategy: str, tmp_path: Path) -> None:
    """FedAdam/FedYogi end to end: the server keeps moments for every trainable parameter across rounds (in the
    round checkpoint) and its global model is not FedAvg's."""
    args = [*FL_FAST, "fl.server_lr=0.01"]
    metrics = federate(compose_cfg([*args, f"fl.strategy={strategy}"], tmp_path / strategy, "federate"))
    assert metrics["strategy"] == strategy
    state = load_checkpoint(list_checkpoints(tmp_path / strategy)[-1][1])["strategy"]
    trainable = {k for k, v in final_weights(tmp_path / strategy).items() if v.is_floating_point()
                 and "running" not in k}
    assert set(state["m"]) == set(state["v"]) and set(state["m"]) <= trainable and len(state["m"]) > 4
    federate(compose_cfg(args, tmp_path / "fedavg", "federate"))
    a, b = final_weights(tmp_path / strategy), final_weights(tmp_path / "fedavg")
    assert any(not torch.equal(a[k], b[k]) for k in state["m"])


def test_fedprox_under_dp_pulls_updates_toward_the_global_model(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """FedProx with dp=true runs end to end, and its proximal term (added after clipping and noise) keeps the
    clients' updates closer to the global model than without it — the same secrets, so the same noise."""
    import itertools

    def distance(mu: float, out: Path) -> float:
        counter = itertools.count(1)
        monkeypatch.setattr("bloodfl.privacy.engine.new_secret", lambda: next(counter))
        moved: list[float] = []

        def spy(client: FLClient) -> None:
            real = client.fit

            def fit(weights: dict, server_round: int, config: dict) -> object:
                res = real(weights, server_round, config)
                moved.append(sum(float((res.weights[k] - weights[k]).float().norm() ** 2) for k in weights) ** 0.5)
                return res

            client.fit = fit  # type: ignore[method-assign]

        args = [*FL_FAST, "fl.rounds=1", "fl.local_epochs=2", "fl.strategy=fedprox", f"fl.mu={mu}", "dp='true'",
                "dp.target_epsilon=null", "dp.noise_multiplier=0.3", "optim.lr=0.01"]
        metrics = federate(compose_cfg(args, out, "federate"), client_hook=spy)
        assert metrics["strategy"] == "fedprox" and metrics["dp/epsilon"] > 0
        return sum(moved)

    free = distance(0.0, tmp_path / "free")
    prox = distance(100.0, tmp_path / "prox")
    assert prox < free, (prox, free)
