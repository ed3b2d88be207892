"""The simulation engine: rounds of sample -> local fits -> aggregate -> evaluate -> checkpoint.

The loop is the only place where both sides meet, and all that passes between them is weights, counts and
metrics: clients get ``(global weights, round, config)`` and return a :class:`FitResult`; the strategy gets
the FitResults. A network backend replaces this module and keeps clients and strategies as they are.

Outputs in ``out_dir`` after every round: ``checkpoints/round_NNN.pt`` (global weights, strategy and client
state, the rounds so far, RNG states; written atomically), ``rounds.csv`` (rewritten from the checkpointed
history, so it always matches the last checkpoint; the run's end draws it as ``figures/learning_curves.png``,
papers/000 Fig. 13). A run killed at any point resumes from the newest checkpoint; since every client fit is seeded from
(seed, round, client), the resumed run ends with exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import csv
import logging
import os
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bloodfl.errors import BloodflError
from bloodfl.fl import batchnorm
from bloodfl.fl.client import LOCAL_METRICS, FLClient
from bloodfl.fl.evaluator import GlobalEvaluator
from bloodfl.fl.strategy import FitResult, Strategy, Weights

log = logging.getLogger("bloodfl")

CHECKPOINT_DIR = "checkpoints"
_CKPT_RE = re.compile(r"round_(\d+)\.pt$")
GLOBAL_METRICS = ("loss", "acc", "f1_macro", "precision_macro", "recall_macro")  # of the global model, per round


@dataclass
class RoundSettings:
    rounds: int
    local_epochs: int = 1
    fraction_fit: float = 1.0
    seed: int = 0
    keep_checkpoints: int | None = None  # None: keep every round's checkpoint
    eval_every: int = 1  # evaluate the global model after every n-th round (and always after the last)
    select: str = "last"  # which round's global model the run tests: "last", or "best" by ``monitor`` on val
    monitor: str = "val/loss"
    mode: str = "min"
    bn_stats: str = "recompute"  # the global model's BatchNorm statistics: "recompute" by the clients | "average"
    bn_batches: int = 2  # training batches per client for bn_stats="recompute"

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.local_epochs < 1:
            raise BloodflError(f"fl.rounds and fl.local_epochs must be >= 1, got {self.rounds} and "
                               f"{self.local_epochs}")
        if not 0 < self.fraction_fit <= 1:
            raise BloodflError(f"fl.fraction_fit must be in (0, 1], got {self.fraction_fit}")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise BloodflError("fl.keep_checkpoints must be null (keep all) or >= 1")
        if self.eval_every < 1:
            raise BloodflError(f"fl.eval_every must be >= 1 (1: evaluate after every round), got {self.eval_every}")
        if self.select not in ("last", "best"):
            raise BloodflError(f"fl.select must be last or best, got {self.select!r}")
        monitors = [f"val/{m}" for m in GLOBAL_METRICS]
        if self.monitor not in monitors:
            raise BloodflError(f"fl.monitor must be one of {', '.join(monitors)}, got {self.monitor!r}")
        if self.mode not in ("min", "max"):
            raise BloodflError(f"fl.mode must be min or max, got {self.mode!r}")
        if self.bn_stats not in ("recompute", "average"):
            raise BloodflError(f"fl.bn_stats must be recompute or average, got {self.bn_stats!r}")
        if self.bn_batches < 1:
            raise BloodflError(f"fl.bn_batches must be >= 1 (training batches per client), got {self.bn_batches}")

    def evaluates(self, server_round: int) -> bool:
        """Whether the global model is evaluated after ``server_round``: every ``eval_every``-th and the last."""
        return server_round % self.eval_every == 0 or server_round == self.rounds

    def improves(self, score: float, best: float | None) -> bool:
        """Whether ``score`` of ``monitor`` beats ``best`` (strictly, as ModelCheckpoint: ties keep the earlier
        round)."""
        return best is None or (score < best if self.mode == "min" else score > best)


def round_config(strategy: Strategy, settings: RoundSettings, server_round: int) -> dict[str, Any]:
    """What every client sampled in ``server_round`` gets besides the weights (the same for every backend)."""
    return {**strategy.configure_fit(server_round), "local_epochs": settings.local_epochs, "seed": settings.seed}


def bn_config(settings: RoundSettings) -> dict[str, Any]:
    """What a client gets with the new global weights to measure their BatchNorm statistics."""
    return {"seed": settings.seed, "bn_batches": settings.bn_batches}


def sample_clients(seed: int, server_round: int, num_clients: int, fraction: float) -> list[int]:
    """The clients that train in ``server_round``: a seeded draw that depends only on its arguments."""
    m = max(1, int(fraction * num_clients + 0.5))
    if m >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, server_round, 1])
    return sorted(int(c) for c in rng.choice(num_clients, size=m, replace=False))


# ---- checkpoints -------------------------------------------------------------------------------------------

def _rng_states() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:])}


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    name, key, *rest = states["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), *rest))


def checkpoint_path(out_dir: Path, server_round: int) -> Path:
    return out_dir / CHECKPOINT_DIR / f"round_{server_round:03d}.pt"


def list_checkpoints(out_dir: Path, subdir: str = CHECKPOINT_DIR) -> list[tuple[int, Path]]:
    """(round, path) of every round checkpoint in ``out_dir/subdir``, oldest first."""
    found = []
    for p in (out_dir / subdir).glob("round_*.pt"):
        m = _CKPT_RE.search(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a kill leaves either the old set of files or the complete new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A round checkpoint; plain tensors and Python containers only, so ``weights_only=True`` suffices."""
    return torch.load(path, map_location="cpu", weights_only=True)


# ---- rounds.csv and the plot ------------------------------------------------------------------------------

def rounds_columns(num_clients: int, private: bool = False, split: str = "test") -> list[str]:
    """rounds.csv's header: what the server knows. ``private``: each client's cumulative DP epsilon (a function
    of its public DP plan) instead of its examples and local metrics, which private clients do not release."""
    cols = ["round", *(f"{split}/{m}" for m in GLOBAL_METRICS),
            "clients", "seconds", "fit_seconds", "bn_seconds", "eval_seconds"]
    for c in range(num_clients):
        cols += [f"client{c}/epsilon"] if private else [f"client{c}/examples",
                                                        *(f"client{c}/{k}" for k in LOCAL_METRICS)]
    return cols


def write_rounds_csv(path: Path, history: Sequence[dict[str, Any]], num_clients: int,
                     private: bool = False, split: str = "test") -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=rounds_columns(num_clients, private, split), extrasaction="ignore")
        w.writeheader()
        w.writerows(history)
    os.replace(tmp, path)


# ---- the loop -------------------------------------------------------------------------------------------

class Simulation:
    """Run federated rounds in one process.

    meta: anything the caller wants stored in every checkpoint (e.g. a config fingerprint to check on resume).
    loggers: Lightning loggers that get each round's global metrics (step = round).
    eval_split: where the global model is evaluated after every round: "test" (papers/000 Fig. 13) or "val"
        (while tuning, so no decision looks at the test set).
    private: whether the clients train with DP (rounds.csv's columns); default: whether any client has an
        accountant. A network backend (bloodfl.fl.flower) passes it, since its clients live elsewhere.

    With ``settings.select="best"`` (eval_split "val") the loop keeps the evaluated round with the best
    ``settings.monitor``, the counterpart of train.py's ModelCheckpoint: :meth:`selected` gives its weights, and its
    round checkpoint is never pruned by ``keep_checkpoints``.

    A network backend keeps the bookkeeping (evaluation, rounds.csv, checkpoints, plot, loggers) and replaces
    only the client fits: it calls :meth:`record_round` with the results it received.
    """

    def __init__(self, clients: Sequence[FLClient], strategy: Strategy, evaluator: GlobalEvaluator,
                 settings: RoundSettings, out_dir: str | Path, initial_weights: Weights,
                 meta: dict[str, Any] | None = None, loggers: Sequence[Any] = (),
                 on_round_end: Callable[[dict[str, Any]], None] | None = None, eval_split: str = "test",
                 private: bool | None = None) -> None:
        self.clients = list(clients)
        self.strategy = strategy
        self.evaluator = evaluator
        self.settings = settings
        self.out_dir = Path(out_dir)
        self.weights = initial_weights
        self.meta = dict(meta or {})
        self.loggers = list(loggers)
        self.on_round_end = on_round_end
        self.eval_split = eval_split
        self.history: list[dict[str, Any]] = []
        self.completed = 0
        self._private = private
        if settings.select == "best" and eval_split != "val":
            raise BloodflError("fl.select=best selects on the validation split: evaluate the rounds on val")
        self.best: dict[str, Any] | None = None  # {"round", "score"} of the selected round so far (select=best)
        self._best_weights: Weights | None = None

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a round checkpoint (see ``load_checkpoint``)."""
        self.weights = state["weights"]
        self.strategy.load_state_dict(state["strategy"])
        for client in self.clients:
            client.load_state_dict(state["clients"].get(str(client.cid), {}))
        self.history = list(state["history"])
        self.completed = int(state["round"])
        self.best = state.get("best")
        self._best_weights = None  # read from the selected round's checkpoint when asked for
        _set_rng_states(state["rng"])
        self._write_csv()

    def replay_to_loggers(self) -> None:
        """Log the restored rounds again (a resumed CSVLogger starts a fresh metrics.csv)."""
        for row in self.history:
            self._log(row)

    def run(self) -> Weights:
        """Rounds ``completed + 1 .. settings.rounds``; returns the final global weights."""
        for r in range(self.completed + 1, self.settings.rounds + 1):
            self.run_round(r)
        return self.weights

    def run_round(self, r: int) -> dict[str, Any]:
        s = self.settings
        t0 = time.perf_counter()
        sampled = sample_clients(s.seed, r, len(self.clients), s.fraction_fit)
        config = round_config(self.strategy, s, r)
        # ---- client side: each sampled client trains on its own data and returns only a FitResult ----
        results: list[FitResult] = [self.clients[c].fit(self.weights, r, config) for c in sampled]
        # ---- server side: weights and counts in, new global weights out ----
        t_fit = time.perf_counter()
        self.weights = self.strategy.aggregate_fit(r, self.weights, results)

        def bn_statistics() -> list[FitResult]:  # client side, as the fits
            return [self.clients[c].bn_statistics(self.weights, r, bn_config(s)) for c in sampled]

        return self.record_round(r, sampled, results, t0, t_fit, bn_statistics)

    @property
    def recomputes_bn(self) -> bool:
        """Whether the global model's BatchNorm statistics are recomputed after each aggregation (fl.bn_stats)."""
        return self.settings.bn_stats == "recompute" and batchnorm.has_batchnorm(self.evaluator.module.net)

    def record_round(self, r: int, sampled: Sequence[int], results: Sequence[FitResult], t0: float,
                     t_fit: float, bn_statistics: Callable[[], Sequence[FitResult]]) -> dict[str, Any]:
        """After round ``r``'s aggregation (``self.weights`` is the new global model): with ``fl.bn_stats=recompute``
        put the pooled ``bn_statistics()`` of the round's clients into it, evaluate it, add the row to the history,
        checkpoint, rewrite rounds.csv and the plot, log. ``t0``/``t_fit``: perf_counter at the round's start and
        when the last client result arrived."""
        s = self.settings
        t_bn = time.perf_counter()
        if self.recomputes_bn:  # the round's clients measure the new global weights' BatchNorm statistics
            self.weights = batchnorm.with_statistics(self.weights, batchnorm.pool(bn_statistics()))
        t_agg = time.perf_counter()
        split = self.eval_split
        metrics = self.evaluator.evaluate(self.weights, split) if s.evaluates(r) else {}
        t_eval = time.perf_counter()
        row: dict[str, Any] = {"round": r, **{f"{split}/{m}": metrics[f"{split}/{m}"] for m in GLOBAL_METRICS
                                              if f"{split}/{m}" in metrics},
                               "clients": " ".join(map(str, sampled)),
                               "seconds": round(t_eval - t0, 3), "fit_seconds": round(t_fit - t0, 3),
                               "bn_seconds": round(t_agg - t_bn, 3), "eval_seconds": round(t_eval - t_agg, 3)}
        for c, res in zip(sampled, results):
            row[f"client{c}/examples"] = res.num_examples
            row.update({f"client{c}/{k}": v for k, v in res.metrics.items()})
        for client in self.clients:
            if client.privacy is not None:  # cumulative over all rounds, also for clients not sampled
                row[f"client{client.cid}/epsilon"] = client.privacy.epsilon()
        self.history.append(row)
        self.completed = r
        self._track_best(r, metrics)
        self._checkpoint(r)
        self._write_csv()
        self._log(row)
        if metrics:
            best = " - the best round so far (fl.select=best)" if self.best and self.best["round"] == r else ""
            log.info("round %d/%d: %s/loss=%.4f %s/acc=%.4f (%d clients, %.1f s)%s", r, s.rounds, split,
                     row.get(f"{split}/loss", float("nan")), split, row.get(f"{split}/acc", float("nan")),
                     len(sampled), row["seconds"], best)
        else:
            log.info("round %d/%d: not evaluated (fl.eval_every=%d) (%d clients, %.1f s)", r, s.rounds,
                     s.eval_every, len(sampled), row["seconds"])
        if self.on_round_end is not None:
            self.on_round_end(row)
        return row

    def _track_best(self, r: int, metrics: dict[str, float]) -> None:
        s = self.settings
        if s.select != "best" or s.monitor not in metrics:
            return
        score = float(metrics[s.monitor])
        if s.improves(score, None if self.best is None else float(self.best["score"])):
            self.best = {"round": r, "score": score}
            self._best_weights = self.weights

    def selected(self) -> tuple[int, Weights]:
        """The round the run tests and its global weights: the last round (select=last) or the best evaluated
        one by ``settings.monitor`` (select=best)."""
        if self.settings.select == "last" or self.best is None:
            return self.completed, self.weights
        r = int(self.best["round"])
        if self._best_weights is None:  # resumed: the selected round's checkpoint holds its weights
            self._best_weights = load_checkpoint(checkpoint_path(self.out_dir, r))["weights"]
        return r, self._best_weights

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    @property
    def private(self) -> bool:
        if self._private is not None:
            return self._private
        return any(c.privacy is not None for c in self.clients)

    def _write_csv(self) -> None:
        write_rounds_csv(self.out_dir / "rounds.csv", self.history, self.num_clients, self.private,
                         self.eval_split)

    def _checkpoint(self, r: int) -> None:
        state = {"round": r, "weights": self.weights, "strategy": self.strategy.state_dict(),
                 "clients": {str(c.cid): c.state_dict() for c in self.clients},
                 "history": self.history, "rng": _rng_states(), "meta": self.meta, "best": self.best}
        save_checkpoint(checkpoint_path(self.out_dir, r), state)
        keep = self.settings.keep_checkpoints
        if keep is not None:
            selected = None if self.best is None else int(self.best["round"])
            for n, old in list_checkpoints(self.out_dir)[:-keep]:
                if n != selected:
                    old.unlink()

    def _log(self, row: dict[str, Any]) -> None:
        values = {k: float(v) for k, v in row.items() if k != "round" and isinstance(v, (int, float))}
        for lg in self.loggers:
            lg.log_metrics(values, step=int(row["round"]))
