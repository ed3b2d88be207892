"""What does federation cost in time? ``federate.py`` (5 clients x 10 rounds x 1 local epoch, iid) against
``train.py`` for 10 epochs: the same data set (default all_pbs at 64 px), model, batch size and training images.

Both are run as a user runs them (separate processes, same overrides, warm decoded-image cache) and alternate
within every repeat, so the ratios compare runs made under the same machine load. Reported per run: wall time
and CPU time (user + system of the child process: less sensitive to other load on the machine), and for the
federated run the per-round split from rounds.csv (local fits vs aggregation + global evaluation).
Target (issue 4): federated wall time <= 1.15 x centralized.

``--fed-args`` adds federated-only settings; the default ``fl.val_fraction=0`` makes the clients train on
exactly the centralized training images (with the default 0.1 each client validates on a tenth of its shard).

    python bench/bench_federated.py --data-dir ../shared/data                 # the figures in docs/federated.md
    python bench/bench_federated.py --repeats 1 --rounds 2 --image-size 32      # a quick look
    python bench/bench_federated.py --against flower --repeats 1              # in-process vs Flower simulation

``--against flower`` compares the same federated run on the two backends (``fl.backend=inprocess`` vs
``fl.backend=flower``, Flower's simulation runtime) instead of federated vs centralized.

Other processes on the machine distort both numbers; the load average before each run is recorded.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, args: list[str], env: dict[str, str], out: Path) -> dict[str, Any]:
    """Wall and CPU seconds of one run of ``script`` writing into ``out``."""
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, str(ROOT / script), *args, f"hydra.run.dir={out}"], env=env,
                         capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        raise SystemExit(f"{script} failed:\n{res.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "load_before": load, "test/acc": metrics.get("test/acc"), "out": str(out)}


def round_split(out: Path) -> dict[str, float]:
    with open(out / "rounds.csv") as fh:
        rows = list(csv.DictReader(fh))
    total = sum(float(r["seconds"]) for r in rows)
    fit = sum(float(r["fit_seconds"]) for r in rows)
    ev = sum(float(r["eval_seconds"]) for r in rows)
    return {"rounds_s": total, "fit_s": fit, "eval_s": ev, "aggregate_s": total - fit - ev}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--dataset", default="all_pbs")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--model", default="simple_cnn")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--fed-args", nargs="*", default=["fl.val_fraction=0"])
    p.add_argument("--against", choices=["central", "flower"], default="central",
                   help="what the in-process federated run is compared with")
    p.add_argument("--workdir", type=Path, default=None, help="outputs and cache (default: a temporary dir)")
    p.add_argument("extra", nargs="*", help="overrides for both runs (after --)")
    a = p.parse_args()

    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench_federated_"))
    env = {**os.environ, "BLOODFL_DATA": str(Path(a.data_dir).resolve()), "BLOODFL_CACHE": str(work / "cache"),
           "BLOODFL_LOGS": str(work / "logs")}
    common = [f"dataset={a.dataset}", f"dataset.image_size={a.image_size}", f"model={a.model}",
              f"loader.batch_size={a.batch_size}", "logger=csv", *a.extra]
    central_args = [*common, f"trainer.max_epochs={a.rounds}"]
    fed_args = [*common, f"fl.num_clients={a.clients}", f"fl.rounds={a.rounds}", "fl.local_epochs=1",
                "fl.partition=iid", *a.fed_args]
    # warm the decoded-image cache so neither run pays for decoding
    run("train.py", [*common, "trainer.fast_dev_run=true"], env, work / "warmup")

    runs = {"central": ("train.py", central_args), "federated": ("federate.py", fed_args),
             "flower": ("federate.py", [*fed_args, "fl.backend=flower"])}
    kinds = ["federated", a.against]
    results: list[dict[str, Any]] = []
    for rep in range(a.repeats):
        pair: dict[str, Any] = {}
        for kind in kinds if rep % 2 == 0 else kinds[::-1]:
            out = work / f"{kind}_{rep}"
            script, args = runs[kind]
            pair[kind] = run(script, args, env, out)
            if script == "federate.py":
                pair[kind].update(round_split(out))
            r = pair[kind]
            print(f"repeat {rep} {kind}: wall {r['wall']:.1f} s, cpu {r['cpu']:.1f} s, test/acc {r['test/acc']:.4f} "
                  f"(load average before: {r['load_before']:.1f})", flush=True)
        # federated / central, or flower / in-process
        num, den = ("federated", "central") if a.against == "central" else ("flower", "federated")
        pair["ratio_wall"] = pair[num]["wall"] / pair[den]["wall"]
        pair["ratio_cpu"] = pair[num]["cpu"] / pair[den]["cpu"]
        results.append(pair)

    summary = {
        "command": " ".join(sys.argv), "ratio": f"{num} / {den}",
        "central_args": central_args, "federated_args": fed_args,
        "median_ratio_wall": statistics.median(r["ratio_wall"] for r in results),
        "median_ratio_cpu": statistics.median(r["ratio_cpu"] for r in results),
        "repeats": results,
    }
    (work / "bench_federated.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "repeats"}, indent=2))
    for r in results:
        for kind in ("federated", "flower"):
            if kind in r:
                f = r[kind]
                print(f"{kind} rounds: {f['rounds_s']:.1f} s = local fits {f['fit_s']:.1f} + global test "
                      f"{f['eval_s']:.1f} + aggregation {f['aggregate_s']:.1f} (checkpoints not included)")
    target = " (target <= 1.15)" if a.against == "central" else ""
    print(f"median wall ratio {num}/{den} = {summary['median_ratio_wall']:.3f}{target}; "
          f"details in {work / 'bench_federated.json'}")


if __name__ == "__main__":
    main()
