"""Soft-voting ensemble of trained runs (papers/004): the mean of the members' test-set probabilities, evaluated
with the same metrics and figures as a single run.

    python -m bloodfl.ensemble RUN_DIR RUN_DIR [RUN_DIR ...] [--out DIR]

Each member's probabilities are those its run saved for its selected model (the best checkpoint by validation
for ``train.py``, the final global model for ``federate.py``): ``test_predictions.csv``. Members must have
been trained and tested on the same split (identical ``splits.csv``), or the vote would mix test images with
a member's training images.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from bloodfl.console import cli_errors
from bloodfl.errors import BloodflError
from bloodfl.evaluation.collect import load_job
from bloodfl.evaluation.figures import write_figures
from bloodfl.evaluation.metrics import Evaluation, evaluate, read_predictions, write_predictions

PREDICTIONS = "test_predictions.csv"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def soft_vote(members: list[Path]) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """(refs, classes, targets, mean probabilities) of ``members``; refuses members that do not share a split."""
    if len(members) < 2:
        raise BloodflError("an ensemble needs at least two run directories")
    first = None
    probs = []
    for run in members:
        pred, splits = run / PREDICTIONS, run / "splits.csv"
        if not pred.exists() or not splits.exists():
            raise BloodflError(f"{run} holds no finished, tested run ({PREDICTIONS} and splits.csv); pass run "
                               "directories of train.py or federate.py runs that evaluated on test")
        refs, labels, classes, p = read_predictions(pred)
        key = (_digest(splits), refs, classes)
        if first is None:
            first = (run, key, labels)
        elif key != first[1]:
            raise BloodflError(f"{run} was trained on a different split or class list than {first[0]} "
                               "(splits.csv or test images differ); ensemble members must share one split: same "
                               "dataset, split and seed")
        probs.append(p)
    assert first is not None
    _, (_, refs, classes), labels = first
    index = {c: i for i, c in enumerate(classes)}
    return refs, classes, np.array([index[y] for y in labels]), np.mean(probs, axis=0)


def ensemble(members: list[str | Path], out: str | Path, resamples: int = 1000, seed: int = 0) -> Evaluation:
    runs = [Path(m) for m in members]
    refs, classes, target, probs = soft_vote(runs)
    out_dir = Path(out)
    if (out_dir / "metrics.json").exists():
        raise BloodflError(f"{out_dir} already holds an ensemble's results; choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    ev = evaluate(torch.from_numpy(probs), torch.from_numpy(target), classes, resamples, seed)
    ev.write(out_dir)
    write_predictions(out_dir / PREDICTIONS, ev, refs)
    jobs = [load_job(r) for r in runs if (r / "metrics.json").exists()]  # each member's own run, not nested ones
    names = [j.model for j in jobs] or [r.name for r in runs]
    dataset = jobs[0].dataset if jobs else "?"
    write_figures(out_dir, ev, [], "epoch", f"{dataset}, soft-voting ensemble of {', '.join(names)}")
    metrics = {**ev.flat("test"), "test/confusion_matrix": ev.confusion, "members": [str(r) for r in runs]}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return ev


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bloodfl.ensemble", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories (each with test_predictions.csv)")
    parser.add_argument("--out", help="output directory (default: ./ensemble-<first run's name>)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs")
    args = parser.parse_args(argv)
    out = args.out or f"ensemble-{Path(args.runs[0]).resolve().name}"
    with cli_errors():
        ev = ensemble(args.runs, out, args.bootstrap)
    s = ev.scalars
    print(f"ensemble of {len(args.runs)}: test/acc={s['acc']:.4f} (95% CI {s.get('acc_ci95_low', float('nan')):.3f}-"
          f"{s.get('acc_ci95_high', float('nan')):.3f}) test/f1_macro={s['f1_macro']:.4f} "
          f"test/auroc_macro={s['auroc_macro']:.4f}")
    print(f"outputs in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
