"""Classify images with a finished run's model. Examples:

    python -m bloodfl.predict run=logs/train/runs/<timestamp> images=/path/to/folder
    python -m bloodfl.predict run=<run dir> images=cell.jpg out=cell.csv --cam
    python -m bloodfl.predict run=<federated run dir> images=slides.zip batch_size=128

Writes one CSV row per readable image (``path, predicted, confidence, p_<class>...``; with ``--cam`` also the
overlay's file), by default to ``<run>/predictions/<timestamp>.csv``; an existing file is never overwritten.
Files that cannot be decoded are listed in ``<csv name>_unreadable.csv`` and do not stop the others. ``--cam``
writes a Grad-CAM overlay per image, ``<name>_cam.png``, into ``<csv name>_cam/`` beside the CSV.
See docs/predict.md.
"""

from __future__ import annotations

import csv
import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from bloodfl.errors import BloodflError

KEYS = ("run", "images", "out", "batch_size", "device")
USAGE = ("usage: python -m bloodfl.predict run=<run dir> images=<folder, file or zip> [out=<csv>] "
         "[batch_size=64] [device=auto|cpu|cuda] [--cam]")


@dataclass
class Args:
    run: Path
    images: Path
    out: Path | None = None
    batch_size: int = 64
    device: str = "auto"
    cam: bool = False


def parse_args(argv: Sequence[str]) -> Args:
    """``key=value`` arguments as train.py takes them, plus the ``--cam`` flag."""
    values: dict[str, str] = {}
    cam = False
    valid = f"valid keys: {', '.join(KEYS)}, and the flag --cam"
    for arg in argv:
        if arg == "--cam":
            cam = True
        elif arg in ("-h", "--help"):
            print(USAGE)
            sys.exit(0)
        elif "=" in arg and not arg.startswith("-"):
            key, value = arg.split("=", 1)
            if key not in KEYS:
                raise BloodflError(f"unknown key {key!r}; {valid}")
            values[key] = value
        else:
            raise BloodflError(f"unexpected argument {arg!r}; {valid} ({USAGE})")
    missing = [k for k in ("run", "images") if not values.get(k)]
    if missing:
        raise BloodflError(f"missing {' and '.join(f'{k}=...' for k in missing)}; {USAGE}")
    try:
        batch_size = int(values.get("batch_size", 64))
    except ValueError:
        batch_size = 0
    if batch_size < 1:
        raise BloodflError(f"batch_size must be a positive integer, got {values['batch_size']!r}")
    device = values.get("device", "auto")
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise BloodflError(f"unknown device {device!r}; valid: auto, cpu, cuda, cuda:N")
    return Args(Path(values["run"]), Path(values["images"]), Path(values["out"]) if values.get("out") else None,
                batch_size, device, cam)


def output_path(args: Args) -> Path:
    """The CSV to write: ``out=`` or a new timestamped file under the run; never one that exists."""
    if args.out is not None:
        if args.out.exists():
            raise BloodflError(f"out={args.out} already exists; predictions never overwrite a file, choose another")
        return args.out
    return args.run / "predictions" / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{time.time_ns() % 10**9:09d}.csv"


def _reason(exc: Exception) -> str:
    """One line for the unreadable-files list (without PIL's ``<_io.BytesIO object at 0x...>``)."""
    text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc)).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def predict(args: Args, console: Console | None = None) -> Path:
    """Run predictions as the command line does; returns the CSV written."""
    from bloodfl.inference.cam import CamMaker, cam_file_names, overlay
    from bloodfl.inference.images import list_images
    from bloodfl.inference.load import find_checkpoint, load_run_model

    console = console or Console(stderr=True)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model, preprocess, classes = load_run_model(args.run, device)
    what = find_checkpoint(args.run).what
    images, skipped = list_images(args.images)
    if not images:
        raise BloodflError(f"images={args.images} holds no image files ({len(skipped)} other files skipped); "
                           "give a folder of .png/.jpg/.tif/... images")
    out = output_path(args)
    cam_dir = out.with_name(f"{out.stem}_cam")
    listing = out.with_name(f"{out.stem}_unreadable.csv")
    for taken in (cam_dir, listing) if args.cam else (listing,):
        if taken.exists():
            raise BloodflError(f"{taken} already exists; predictions never overwrite a file, choose another out=")
    cam_names = dict(zip([im.ref for im in images], cam_file_names([im.name for im in images])))
    unreadable: list[tuple[str, str]] = []

    out.parent.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        # before any file is written: a model Grad-CAM cannot explain is refused first
        cams = stack.enter_context(CamMaker(model, preprocess.image_size)) if args.cam else None
        fh = stack.enter_context(open(out, "x", newline=""))  # "x": a file that appeared meanwhile is kept too
        writer = csv.writer(fh)
        header = ["path", "predicted", "confidence", *(f"p_{c}" for c in classes)]
        writer.writerow([*header, "cam"] if args.cam else header)
        if cams is not None:
            cam_dir.mkdir(parents=True, exist_ok=True)
        progress = stack.enter_context(Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(),
                                                TimeRemainingColumn(), console=console))
        task = progress.add_task("predict", total=len(images))
        for chunk in _batches(images, args.batch_size):
            decoded, ok = [], []
            for image in chunk:
                try:
                    decoded.append(preprocess.decode(image.ref))
                    ok.append(image)
                except Exception as exc:  # noqa: BLE001 - any broken file is listed, never ends the run
                    unreadable.append((image.ref, _reason(exc)))
            if ok:
                x = preprocess.to_tensor(np.stack(decoded)).to(device)
                with torch.inference_mode():
                    probs = model(x).softmax(dim=1).cpu()
                predicted = probs.argmax(dim=1).tolist()
                maps = cams.maps(x, predicted) if cams is not None else None
                for i, image in enumerate(ok):
                    row = [image.ref, classes[predicted[i]], f"{float(probs[i, predicted[i]]):.6f}",
                           *(f"{float(p):.6f}" for p in probs[i])]
                    if maps is not None:
                        cam_path = cam_dir / cam_names[image.ref]
                        overlay(image.ref, maps[i], preprocess.resize).save(cam_path)
                        row.append(str(cam_path))
                    writer.writerow(row)
            progress.advance(task, len(chunk))

    done = len(images) - len(unreadable)
    print(f"predicted {done} image(s) with {what} of {args.run} -> {out}")
    if args.cam:
        grid = "x".join(map(str, cams.grid)) if cams is not None else "?"
        print(f"Grad-CAM overlays (original | overlay) in {cam_dir}, from the model's {grid} feature map "
              f"at {preprocess.image_size} px")
    if unreadable:
        with open(listing, "x", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "error"])
            w.writerows(unreadable)
        shown = ", ".join(Path(r.split("::")[-1]).name for r, _ in unreadable[:3])
        more = f" and {len(unreadable) - 3} more" if len(unreadable) > 3 else ""
        print(f"{len(unreadable)} unreadable file(s) left out ({shown}{more}), listed in {listing}")
    if skipped:
        print(f"{len(skipped)} file(s) skipped as no image (hidden, junk or other extensions)")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from bloodfl.console import quiet_known_notices

    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        quiet_known_notices()
        predict(args)
    except BloodflError as exc:
        print(f"bloodfl: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
