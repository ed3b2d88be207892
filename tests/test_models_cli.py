"""``python -m bloodfl.models list``: the zoo table (tiny models only: every model builds in test_configs)."""

from __future__ import annotations

import pytest

from bloodfl.models.__main__ import main, model_rows


def test_list_filters_and_reports_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "paper00*"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:6] == ["model", "params", "native", "min", "source", "arch"]
    assert [line.split()[0] for line in lines[1:3]] == ["paper002_cnn", "paper003_cnn"]
    assert lines[2].split()[2:5] == ["100", "8", "bloodfl"]
    assert "dp-sgd" not in out


def test_list_dp_check_and_torchvision_source() -> None:
    rows = {r["name"]: r for r in model_rows("s*", num_classes=8, dp=True)}
    assert rows["squeezenet"]["source"] == "torchvision" and rows["squeezenet"]["min_size"] == 17
    assert rows["simple_cnn"]["dp"].startswith("yes")
    assert rows["shufflenetv2"]["params"] > rows["squeezenet"]["params"] > rows["simple_cnn"]["params"] > 0


def test_list_no_match(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "nothing*"]) == 1
