"""Data set tools. ``python -m bloodfl.data verify pbc [--data-dir DIR] [key=value ...]``."""

from __future__ import annotations

import argparse
import sys

from bloodfl.console import task_wrapper


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bloodfl.data", description=__doc__)
    p.add_argument("command", choices=["verify"],
                   help="verify: check a data set (counts, readability, junk files, duplicates, eq. 1 weights)")
    p.add_argument("dataset", help="a config in conf/dataset/ (rbc, all_pbs, wbc4, pbc, wbc5, imagefolder, ...)")
    p.add_argument("--data-dir", help="the folder holding the data sets (default: paths.data_dir, "
                   "i.e. $BLOODFL_DATA or ./data)")
    p.add_argument("--workers", type=int, default=2, help="threads reading files (default 2)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. dataset.root=/my/images")
    return p


@task_wrapper
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)  # overrides may follow options
    from bloodfl.data.verify import compose_config, verify_dataset

    cfg = compose_config(args.dataset, args.data_dir, args.overrides)
    return verify_dataset(cfg.dataset, num_workers=args.workers).exit_code


if __name__ == "__main__":
    sys.exit(main())
