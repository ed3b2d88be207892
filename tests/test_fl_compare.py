"""Central vs federated: overrides routed to the right run, the same epochs, a side-by-side table."""

from __future__ import annotations

import json
from pathlib import Path

from bloodfl.fl.compare import compare, split_overrides


def test_fl_overrides_go_to_the_federated_run_only() -> None:
    central, fed = split_overrides(["dataset=all_pbs", "fl.rounds=3", "fl=dipto2023", "+fl.x=1", "seed=3"])
    assert central == ["dataset=all_pbs", "seed=3"]
    assert fed == ["dataset=all_pbs", "fl.rounds=3", "fl=dipto2023", "+fl.x=1", "seed=3"]


def test_compare_writes_both_runs_and_the_table(tmp_path: Path) -> None:
    rows = compare(["dataset.image_size=32", "dataset.source.n_per_class=12", "loader.batch_size=8",
                    "fl.num_clients=2", "fl.rounds=2", "callbacks=none", f"paths.cache_dir={tmp_path / 'cache'}"],
                   tmp_path)
    central = json.loads((tmp_path / "central" / "metrics.json").read_text())
    federated = json.loads((tmp_path / "federated" / "metrics.json").read_text())
    assert central["epochs"] == 2  # fl.rounds x fl.local_epochs
    assert federated["rounds"] == 2 and federated["select"] == "last"
    table = {r[0]: r[1:] for r in rows[1:]}
    assert float(table["test/acc"][0]) == round(central["test/acc"], 4)
    assert float(table["test/acc"][1]) == round(federated["test/acc"], 4)
    md = (tmp_path / "compare.md").read_text()
    assert md.startswith("| metric | central | federated |") and "test/f1_macro" in md
    assert (tmp_path / "compare.csv").exists()
