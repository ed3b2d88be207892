"""What a run reports about privacy: ``privacy.json`` and the closing ``DP:`` line (the worst client's ε).

The DP objects themselves are built by the composition root (``Root.client_privacy``) and used by the
LightningModule (``ClassifierModule(privacy=...)``); this module only writes down what they spent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bloodfl.privacy.engine import ClientPrivacy


def worst(privacies: Sequence[ClientPrivacy]) -> ClientPrivacy:
    return max(privacies, key=lambda p: p.epsilon())


def privacy_summary(privacies: Sequence[ClientPrivacy]) -> str:
    """One line for the end of a run: the worst client's (ε, δ)."""
    w = worst(privacies)
    who = "" if len(privacies) == 1 else f" (worst client: {w.name})"
    return f"DP: epsilon={w.epsilon():.3f} at delta={w.delta:.2g}{who}"


def write_privacy_json(path: str | Path, privacies: Sequence[ClientPrivacy],
                       settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """privacy.json: final (ε, δ) and σ, sample rate, steps per client, the worst client, the dp settings."""
    reports = [p.report() for p in privacies]
    w = max(reports, key=lambda r: r["epsilon"])
    doc = {"worst": {"client": w["client"], "epsilon": w["epsilon"], "delta": w["delta"]},
           "clients": reports, "settings": dict(settings or {})}
    Path(path).write_text(json.dumps(doc, indent=2))
    return doc
