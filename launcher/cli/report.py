"""`gradaccum report RUN_DIR`: loss and throughput curves from a run's metrics.csv.

Reads `RUN_DIR/metrics.csv` (written by trainers.metrics_log.MetricsLogger) and draws
`loss.png` (loss per optimizer step) and `throughput.png` (items/s, and tokens/s when
known) into RUN_DIR or `--output-dir`. When a resumed run logged a step twice, the later
row wins. Needs no torch; matplotlib is imported only to draw.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
from pathlib import Path

from launcher.errors import UserError

ORDER = 60
REQUIRED = ("step", "loss")


def _number(text: str, column: str, line: int, path: Path) -> float | None:
    if text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{path}, line {line}: column {column!r} holds {text!r}, not a number") from None
    return value if math.isfinite(value) or column == "loss" else None


def read_metrics(path: Path) -> dict[str, list[float | None]]:
    """Columns of metrics.csv, one value per optimizer step (last row of each step wins)."""
    if not path.is_file():
        raise UserError(f"no metrics file at {path}: give the run's log directory (the trainer's log_dir)")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in REQUIRED if c not in columns]
        if missing:
            raise UserError(f"{path} is not a metrics file: it has no column(s) {', '.join(missing)}")
        by_step: dict[int, dict[str, float | None]] = {}
        for line, row in enumerate(reader, start=2):
            if None in row or any(v is None for v in row.values()):
                raise UserError(f"{path}, line {line}: {len(columns)} columns expected, the row has another number")
            step = _number(row["step"], "step", line, path)
            if step is None or step != int(step) or step < 0:
                raise UserError(f"{path}, line {line}: step must be a whole number, got {row['step']!r}")
            by_step[int(step)] = {
                c: _number(row[c], c, line, path) for c in columns if c not in ("step", "loss_mode")
            }
    if not by_step:
        raise UserError(f"{path} has a header but no rows: the run logged no optimizer step yet")
    steps = sorted(by_step)
    out: dict[str, list[float | None]] = {"step": [float(s) for s in steps]}
    for c in columns:
        if c not in ("step", "loss_mode"):
            out[c] = [by_step[s].get(c) for s in steps]
    return out


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def draw(metrics: dict[str, list[float | None]], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    steps = metrics["step"]

    def series(column: str) -> tuple[list[float], list[float]]:
        pairs = [(s, v) for s, v in zip(steps, metrics.get(column, []), strict=False) if v is not None]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*series("loss"), marker="." if len(steps) < 50 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    paths = [out_dir / "loss.png"]
    _save(fig, paths[0])

    fig, ax = plt.subplots(figsize=(7, 4))
    xs, ys = series("items_per_s")
    ax.plot(xs, ys, label="items/s", color="tab:blue")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("items/s")
    tx, ty = series("tokens_per_s")
    if ty:
        ax2 = ax.twinx()
        ax2.plot(tx, ty, label="tokens/s", color="tab:orange")
        ax2.set_ylabel("tokens/s")
        fig.legend(loc="lower right")
    ax.set_title("throughput" if ys or ty else "throughput (no step times in metrics.csv)")
    ax.grid(alpha=0.3)
    paths.append(out_dir / "throughput.png")
    _save(fig, paths[1])
    return paths


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    path = run_dir if run_dir.is_file() else run_dir / "metrics.csv"
    metrics = read_metrics(path)
    out_dir = Path(args.output_dir) if args.output_dir else path.parent
    for p in draw(metrics, out_dir):
        print(p)
    losses = [v for v in metrics["loss"] if v is not None]
    print(f"{len(metrics['step'])} steps (last {int(metrics['step'][-1])}), final loss {losses[-1]:.6g}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="draw loss and throughput curves from a run's metrics.csv",
        description="Read RUN_DIR/metrics.csv (the trainer's log_dir) and write loss.png and throughput.png.",
        epilog="example: gradaccum report runs/demo",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="directory holding metrics.csv (or the CSV file itself)")
    p.add_argument("--output-dir", metavar="DIR", help="where to write the PNGs (default: beside metrics.csv)")
    p.set_defaults(func=run)
