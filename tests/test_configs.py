"""Every option of every config group can be chosen on the command line and composes."""

from __future__ import annotations

import pytest

from tests.conftest import CONF_DIR, compose_cfg

GROUPS = ["dataset", "model", "split", "augment", "trainer", "logger", "callbacks"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]


@pytest.mark.parametrize(("group", "option"), OPTIONS)
def test_every_group_option_composes_from_the_command_line(group: str, option: str) -> None:
    overrides = [f"{group}={option}"]
    if (group, option) == ("dataset", "imagefolder"):
        overrides.append("dataset.root=/some/folder")
    cfg = compose_cfg(overrides)
    if group in ("dataset", "model", "split"):
        assert cfg[group].name == option


def test_unknown_option_lists_the_valid_ones() -> None:
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as info:
        compose_cfg(["model=vgg17"])
    assert "vgg16" in str(info.value.options)
