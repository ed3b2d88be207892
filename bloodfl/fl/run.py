"""Federated training (``federate.py``): the middle of a run — data -> shards -> clients -> rounds.

Everything centralized training configures (data set, model, split, augmentation, loader, optimizer, trainer,
logger) means the same here; ``fl.*`` adds the federation. The skeleton (``bloodfl.runner``) writes what every
run writes; this task adds ``partition.csv`` (images per client and class), ``rounds.csv`` (the learning
curves; drawn at the end as ``figures/learning_curves.png``),
``checkpoints/round_NNN.pt`` and, under DP, each client's own ``clients/clientN.csv`` (its local metrics, which
it does not release).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from bloodfl.compose import Root, TrainerFactory
from bloodfl.data.datamodule import BloodDataModule
from bloodfl.errors import BloodflError
from bloodfl.fl.client import FLClient
from bloodfl.fl.evaluator import GlobalEvaluator
from bloodfl.fl.loop import Simulation, checkpoint_path, list_checkpoints, load_checkpoint
from bloodfl.fl.partition import class_count_table, print_partition, save_partition_csv
from bloodfl.fl.strategy import weights_of
from bloodfl.runner import Outcome, RunContext, run

log = logging.getLogger("bloodfl")

ClientHook = Callable[[FLClient], None]


def _check_same_config(saved: dict[str, str], now: dict[str, str]) -> None:
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        shown = "; ".join(f"{k}: {saved.get(k, '<unset>')} -> {now.get(k, '<unset>')}" for k in changed[:5])
        raise BloodflError(f"fl.resume=true with settings that differ from the interrupted run ({shown}); "
                           "resume with the same command line plus fl.resume=true")


def build_client(root: Root, dm: BloodDataModule, shard: np.ndarray, cid: int, net: torch.nn.Module,
                 make_trainer: TrainerFactory, out: Path, normalize: dict[str, list[float]] | None = None) -> FLClient:
    """Client ``cid`` over its ``shard`` of ``dm``: its own data (train + local validation share), a copy of ``net``,
    its accountant under DP and its local log; every backend builds its clients here. ``normalize``: the
    federation's normalisation constants where they differ from ``dm``'s (a deployed site's own folder)."""
    epochs = int(root.fl.rounds) * int(root.fl.local_epochs)
    private = root.dp_settings() is not None
    train, val = root.client_split(dm, shard, cid)
    data = root.client_datamodule(dm, train, val, normalize)
    privacy = root.client_privacy(f"client{cid}", len(train), len(data.train_dataloader()), epochs)
    if privacy is not None:
        data.use_poisson_sampling(privacy.sample_rate, privacy.steps_per_epoch, privacy.sampling_generator())
    module = root.module(copy.deepcopy(net), dm.num_classes, data.class_counts("train"), privacy)
    return FLClient(cid, module, data, make_trainer, release_count=root.release_counts(),
                    local_log=out / "clients" / f"client{cid}.csv" if private else None)


class FederatedTask:
    """Simulated clients, a server strategy and the round loop that connects them (``bloodfl.fl.loop``).

    client_hook(client): called once per client after it is built (e.g. to instrument a client in a test). It
    cannot switch privacy off: with dp=true a client without its accountant stops the run.
    ``fl.backend=flower`` runs the same clients and strategy on Flower (``bloodfl.fl.flower``): in Flower's
    simulation runtime, or, given a Flower ``grid``, as a deployment's ServerApp whose clients are the sites.
    """

    def __init__(self, client_hook: ClientHook | None = None, grid: Any = None) -> None:
        self.client_hook = client_hook
        self.grid = grid  # a Flower Grid: this process is a deployment's ServerApp (bloodfl.fl.flower_app)
        self.state: dict[str, Any] | None = None

    def prepare(self, root: Root, out: Path) -> None:
        """The newest round checkpoint to resume from (fl.resume=true), or a refusal to overwrite one."""
        root.check_federated()
        if root.fl_backend == "flower" and self.client_hook is not None:
            raise BloodflError("client hooks instrument in-process clients; with fl.backend=flower the clients run "
                               "in Flower's ClientApps (use fl.backend=inprocess)")
        if root.fl_backend == "flower" and root.fl.resume:
            raise BloodflError("fl.resume=true is not supported with fl.backend=flower yet (a SuperNode restart "
                               "resumes its client; a restarted server does not); use fl.backend=inprocess")
        ckpts = list_checkpoints(out)
        resume = bool(root.fl.resume)
        if not resume:
            if ckpts:
                raise BloodflError(f"{out} holds an unfinished federated run (round {ckpts[-1][0]} done); continue "
                                   "it with fl.resume=true or choose another hydra.run.dir")
        elif ckpts:
            self.state = load_checkpoint(ckpts[-1][1])
            _check_same_config(self.state["meta"]["fingerprint"], root.fingerprint())
            rounds = int(root.fl.rounds)
            if self.state["round"] > rounds:
                raise BloodflError(f"the run already finished round {self.state['round']} > fl.rounds={rounds}; "
                                   f"set fl.rounds >= {self.state['round']}")
            log.info("resuming after round %d from %s", self.state["round"], out)
        elif not (out / "partition.csv").exists():
            raise BloodflError(f"fl.resume=true but {out} holds no federated run; pass the interrupted run's "
                               "directory as hydra.run.dir=<dir>")
        else:
            log.warning("fl.resume=true: no round was finished in %s, starting at round 1", out)
        command = root.resume_command(out)
        if command:
            log.info("if this run is interrupted, continue it with: %s", command)

    def build_clients(self, root: Root, dm: BloodDataModule, out: Path) -> tuple[list[FLClient], Any]:
        """One client per shard, each with its own data, local validation share, model copy and accountant;
        returns them and the server's evaluator model (the initial network every client starts from)."""
        shards = root.shards(dm)
        counts = class_count_table(dm.labels, shards, dm.num_classes)
        print_partition(counts, dm.classes, title=f"fl.partition={root.fl.partition}: images per client and class")
        save_partition_csv(out / "partition.csv", counts, dm.classes)

        net = root.network(dm.num_classes)
        make_trainer = root.trainer_factory()
        clients = [build_client(root, dm, shard, cid, net, make_trainer, out) for cid, shard in enumerate(shards)]
        private = root.dp_settings() is not None
        for client in clients:
            if self.client_hook is not None:
                self.client_hook(client)
                if private and client.privacy is None:
                    raise BloodflError(f"dp=true but the client hook left client {client.cid} without its privacy "
                                       "accountant; a hook may add to a client, not switch DP off")
        return clients, root.module(net, dm.num_classes, dm.class_counts("train"))

    def run(self, ctx: RunContext) -> Outcome:
        root, dm, out = ctx.root, ctx.dm, ctx.out
        settings = root.round_settings()
        if self.grid is None:
            clients, global_module = self.build_clients(root, dm, out)
        else:  # a deployment's server: the clients are the sites, their data and state stay there
            clients = []
            global_module = root.module(root.network(dm.num_classes), dm.num_classes, dm.class_counts("train"))
        evaluator = GlobalEvaluator(global_module, root.held_out_datamodule(dm), root.trainer_factory())
        initial = weights_of(global_module.net)
        strategy = root.strategy()
        strategy.initialize(initial, param_names=[n for n, p in global_module.net.named_parameters()
                                                  if p.requires_grad])
        # select=best: the rounds are validated and one selected round is tested at the end, as in train.py
        eval_split = "test" if root.evaluate_test and settings.select == "last" else "val"
        if settings.select == "best" and not evaluator.has("val"):
            raise BloodflError("fl.select=best needs a validation split to select on, and this split has none; "
                               "use fl.select=last or a split with validation (e.g. split.val_from_train=0.1)")
        meta = {"fingerprint": root.fingerprint()}
        if root.fl_backend == "flower":
            from bloodfl.fl.flower import run_flower

            sim = run_flower(root, dm, out, clients, strategy, evaluator, initial, meta, ctx.loggers, eval_split,
                             self.grid)
        else:
            sim = Simulation(clients, strategy, evaluator, settings, out, initial, meta=meta, loggers=ctx.loggers,
                             eval_split=eval_split)
            if self.state is not None:
                sim.restore(self.state)
            sim.replay_to_loggers()
            sim.run()
        selected_round, selected = sim.selected()

        metrics: dict[str, Any] = {}
        probs = targets = None
        module = evaluator.module
        if eval_split == "val":  # the selected round's validation values were computed when it ran
            row = next(h for h in sim.history if int(h["round"]) == selected_round)
            metrics.update({k: float(v) for k, v in row.items() if k.startswith("val/") and v not in (None, "")})
        elif evaluator.has("val"):  # for sweeps: an optimised metric that is not a test value
            metrics.update(evaluator.evaluate(selected, "val"))
        if root.evaluate_test:
            if eval_split == "test":  # select=last: the last round was tested when it ran
                metrics.update({k: float(v) for k, v in sim.history[-1].items() if k.startswith("test/")})
            if eval_split == "val" or module.test_probs is None:  # or resumed after the last round
                metrics.update(evaluator.evaluate(selected, "test"))
            probs, targets = module.test_probs, module.test_targets
        metrics.update({"rounds": settings.rounds, "local_epochs": settings.local_epochs,
                        "num_clients": sim.num_clients, "strategy": strategy.name, "backend": root.fl_backend,
                        "select": settings.select, "selected_round": selected_round,
                        # the global model the run tested (and predict.py loads); the last round's may differ
                        "selected_checkpoint": str(checkpoint_path(out, selected_round)),
                        "final_checkpoint": str(checkpoint_path(out, settings.rounds)),
                        "model/params": sum(p.numel() for p in global_module.net.parameters()),
                        # rounds of an interrupted run count with the time they took then
                        "time/fit_s": sum(float(h["seconds"]) for h in sim.history)})
        privacies = [c.privacy for c in clients if c.privacy is not None]
        return Outcome(metrics, probs, targets, privacies, history=sim.history, history_x="round")


def federate(cfg: DictConfig, client_hook: ClientHook | None = None) -> dict[str, Any]:
    """Run (or resume) a federated simulation; returns the final metrics written to metrics.json."""
    return run(cfg, FederatedTask(client_hook))
