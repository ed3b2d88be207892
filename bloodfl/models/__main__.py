"""The model zoo. ``python -m bloodfl.models list [PATTERN] [--dp] [--classes N]``.

Lists every ``model=<name>`` option: its parameters (built at its minimum input size), native and minimum input
size, source library and description (the config's first comment line); with ``--dp``, also whether DP-SGD can
train it (``bloodfl.privacy.engine.prepare_model`` succeeds on a dry run; slow: it runs every model privately).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from bloodfl.config import CONF_DIR
from bloodfl.console import task_wrapper


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bloodfl.models", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["list"], help="list: the models and their sizes")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter on the names (default: all)")
    p.add_argument("--classes", type=int, default=8, help="number of classes the head is built for (default 8)")
    p.add_argument("--dp", action="store_true", help="also check that DP-SGD can train each model (slow)")
    return p


def _description(name: str) -> str:
    first = (CONF_DIR / "model" / f"{name}.yaml").read_text().splitlines()[0]
    return first.lstrip("# ").strip() if first.startswith("#") else ""


def _dp_check(net: Any, size: int) -> str:
    from bloodfl.errors import BloodflError
    from bloodfl.privacy.engine import prepare_model

    try:
        _, _, mode = prepare_model(net, (3, size, size), "auto")
    except (BloodflError, RuntimeError, ValueError, NotImplementedError) as exc:
        return f"no ({str(exc).splitlines()[0][:60]})"
    return f"yes ({mode})"


def model_rows(pattern: str = "*", num_classes: int = 8, dp: bool = False) -> list[dict[str, Any]]:
    """One row per model: name, params, native_size, min_size, source, arch, [dp], description."""
    from bloodfl.models import build_classifier, list_models, model_config

    rows = []
    for name in list_models(pattern):
        cfg = model_config(name)
        size = int(cfg.min_size)
        net = build_classifier(name, num_classes, size)
        row = {"name": name, "params": sum(p.numel() for p in net.parameters()),
               "native_size": int(cfg.native_size), "min_size": size, "source": str(cfg.source),
               "arch": str(cfg.arch)}
        if dp:
            row["dp"] = _dp_check(net, size)
        row["description"] = _description(name)
        rows.append(row)
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    from bloodfl.models import format_params

    header = ["model", "params", "native", "min", "source", "arch", *(["dp-sgd"] if rows and "dp" in rows[0] else []),
              "description"]
    table = [header] + [[r["name"], format_params(r["params"]), str(r["native_size"]), str(r["min_size"]),
                         r["source"], r["arch"], *([r["dp"]] if "dp" in r else []), r["description"]]
                        for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(row, widths)), row[-1]]).rstrip() for row in table)


@task_wrapper
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    rows = model_rows(args.pattern, args.classes, args.dp)
    if not rows:
        print(f"no model matches {args.pattern!r}", file=sys.stderr)
        return 1
    print(format_rows(rows))
    print(f"\nparameters with a {args.classes}-class head, built at each model's minimum input size")
    return 0


if __name__ == "__main__":
    sys.exit(main())
