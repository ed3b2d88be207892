"""A model no better than always answering the largest class is called out, not passed off as a result."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from bloodfl.evaluation.learned import MARGIN, majority_share, no_better_than_majority
from bloodfl.runner import Outcome, RunContext, run
from tests.conftest import compose_cfg


def test_majority_share_is_the_largest_class_share() -> None:
    assert majority_share([10, 30, 60]) == (2, 0.6)
    with pytest.raises(ValueError, match="empty split"):
        majority_share([0, 0])


@pytest.mark.parametrize("acc, flagged", [(0.25, True), (0.25 + MARGIN, True), (0.25 + 2 * MARGIN, False),
                                          (0.10, True), (0.9, False)])
def test_only_accuracy_above_the_majority_share_passes(acc: float, flagged: bool) -> None:
    msg = no_better_than_majority(acc, [25, 25, 25, 25], ["a", "b", "c", "d"])
    assert (msg is not None) is flagged
    if flagged:
        assert "did not learn" in msg and "'a' (0.2500" in msg and "optim.lr=1e-4" in msg and "\n" not in msg


class FixedOutcome:
    """A task that 'trains' to a given validation accuracy: the runner's check, without a fit."""

    def __init__(self, val_acc: float) -> None:
        self.val_acc = val_acc

    def prepare(self, root, out: Path) -> None:  # noqa: ANN001
        pass

    def run(self, ctx: RunContext) -> Outcome:
        counts = ctx.dm.class_counts("val")
        self.share = float(counts.max() / counts.sum())
        return Outcome({"val/acc": self.val_acc if self.val_acc >= 0 else self.share})


@pytest.mark.parametrize("at_chance", [True, False])
def test_a_run_at_chance_warns_in_the_log_and_the_done_line(at_chance: bool, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    cfg = compose_cfg(["dataset.source.n_per_class=10", "logger=none"], tmp_path)
    task = FixedOutcome(-1.0 if at_chance else 1.0)
    with caplog.at_level(logging.WARNING, logger="bloodfl"):
        run(cfg, task)
    done = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Done:")]
    warned = [r.getMessage() for r in caplog.records if "did not learn" in r.getMessage()]
    assert len(done) == 1
    assert ("no better than the majority class" in done[0]) is at_chance
    assert bool(warned) is at_chance
    if at_chance:
        assert f"{task.share:.4f} of the validation images" in warned[0]
