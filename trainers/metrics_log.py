"""MetricsLogger: a trainer component writing metrics.csv, TensorBoard events and a progress bar.

Rank 0 only; the other ranks' hooks return at once. One row per optimizer step in
`<log_dir>/metrics.csv`, written and flushed before the hook returns, so a crashed run
keeps every row it finished. The file is appended across `train()` calls and on resume
(the header is written once; a file with other columns is refused rather than mixed).
After a resume the steps between the checkpoint and the crash appear twice; the later row
is the one the resumed run computed (`gradaccum report` keeps the last row of each step).

TensorBoard event files go beside the CSV when `tensorboard` is installed (the
`[tensorboard]` extra). The progress bar (tqdm) is drawn on stderr only when stderr is a
terminal and `progress` is true: logs redirected to a file stay free of bar updates.

Hooks (see the trainer's component protocol): `on_train_start(trainer, steps)`,
`on_step_end(trainer, metrics, step_time_s)`, `on_train_end(trainer)`; `log_step(metrics,
step_time_s)` is the same row without a trainer, `close()` ends everything.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import sys
import time
from pathlib import Path
from typing import Any

from launcher.errors import UserError

COLUMNS = (
    "step",
    "loss",
    "items",
    "count",
    "lr",
    "grad_norm",
    "step_time_s",
    "items_per_s",
    "tokens_per_s",
    "loss_mode",
    "skipped",
    "time",
)
CSV_NAME = "metrics.csv"


def _cell(value: Any) -> str:
    """Empty for unknown; floats at full precision (repr round-trips exactly)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return repr(value)
    return str(value)


def metrics_row(metrics: Any, step_time_s: float | None, wall_time: float | None = None) -> dict[str, Any]:
    """One CSV row (column -> value) from a StepMetrics and the step's wall time."""
    items, count = int(metrics.items), float(metrics.count)
    grad_norm = metrics.grad_norm
    rate = step_time_s is not None and step_time_s > 0
    return {
        "step": int(metrics.step),
        "loss": float(metrics.loss),
        "items": items,
        "count": count,
        "lr": None if metrics.lr is None else float(metrics.lr),
        "grad_norm": None if grad_norm is None else float(grad_norm),
        "step_time_s": None if step_time_s is None else float(step_time_s),
        "items_per_s": items / step_time_s if rate else None,
        # for a (sum, count) loss the count is the step's tokens; a mean loss has no token count
        "tokens_per_s": count / step_time_s if rate and metrics.loss_mode == "sum" else None,
        "loss_mode": metrics.loss_mode,
        "skipped": bool(getattr(metrics, "skipped", False)),
        "time": time.time() if wall_time is None else wall_time,
    }


def _rank0() -> bool:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class MetricsLogger:
    """metrics.csv (+ TensorBoard) under `log_dir` (None: no files) and a progress bar, rank 0.

    `rank0`: whether this process writes; None asks torch.distributed (or $RANK) when the
    first hook runs. `tensorboard`: None = when installed, True = required, False = off.
    `progress_file`: draw the bar there, terminal or not (default: stderr, only a terminal).
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None,
        *,
        progress: bool = True,
        tensorboard: bool | None = None,
        rank0: bool | None = None,
        progress_file: Any = None,
    ) -> None:
        if tensorboard and not tensorboard_available():
            raise UserError("tensorboard=True but tensorboard is not installed: pip install 'gradaccum[tensorboard]'")
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.progress = progress
        self.tensorboard = tensorboard_available() if tensorboard is None else tensorboard
        self._rank0 = rank0
        self._file: io.TextIOBase | None = None
        self._writer: csv.DictWriter | None = None
        self._tb: Any = None
        self._bar: Any = None
        self._progress_file = progress_file

    @property
    def csv_path(self) -> Path | None:
        return None if self.log_dir is None else self.log_dir / CSV_NAME

    def _is_rank0(self) -> bool:
        if self._rank0 is None:
            self._rank0 = _rank0()
        return self._rank0

    # ------------------------------------------------------------------ files
    def _open(self, first_step: int) -> None:
        if self.log_dir is None or self._file is not None:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = self.csv_path
        header = ",".join(COLUMNS)
        fresh = not path.exists() or path.stat().st_size == 0
        if not fresh:
            with open(path, encoding="utf-8", newline="") as f:
                existing = f.readline().rstrip("\r\n")
            if existing != header:
                raise UserError(
                    f"{path} exists with other columns ({existing[:80]!r}); it is not a gradaccum metrics file "
                    "of this version. Move it away or choose another log_dir."
                )
        self._file = open(path, "a", encoding="utf-8", newline="")  # noqa: SIM115 (kept open across steps)
        self._writer = csv.DictWriter(self._file, fieldnames=COLUMNS, lineterminator="\n")
        if fresh:
            self._writer.writeheader()
            self._file.flush()
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: on resume, TensorBoard hides the events the crashed run wrote past it
            self._tb = SummaryWriter(str(self.log_dir), purge_step=first_step if first_step > 0 else None)

    def _open_bar(self, steps: int, done: int) -> None:
        self._close_bar()
        out = self._progress_file
        if not self.progress or (out is None and not sys.stderr.isatty()):
            return
        from tqdm import tqdm

        # redrawn at most twice a second: drawing it after every short step costs about 1% of the step
        self._bar = tqdm(
            total=steps, desc="train", unit="step", file=out or sys.stderr, dynamic_ncols=True, mininterval=0.5
        )
        self._bar.set_postfix_str(f"from step {done + 1}")

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: Any, steps: int) -> None:
        if not self._is_rank0():
            return
        done = int(getattr(trainer, "global_step", 0) or 0)
        self._open(done + 1)
        self._open_bar(steps, done)

    def on_step_end(self, trainer: Any, metrics: Any, step_time_s: float) -> None:
        if self._is_rank0():
            self.log_step(metrics, step_time_s)

    def on_train_end(self, trainer: Any) -> None:
        if not self._is_rank0():
            return
        self._close_bar()
        if self._tb is not None:
            self._tb.flush()

    def log_step(self, metrics: Any, step_time_s: float | None) -> dict[str, Any]:
        """Write (and flush) one row for `metrics`; update TensorBoard and the bar; return the row."""
        row = metrics_row(metrics, step_time_s)
        if self._file is None:
            self._open(row["step"])
        if self._writer is not None:
            self._writer.writerow({k: _cell(v) for k, v in row.items()})
            self._file.flush()
        if self._tb is not None:
            self._tb_scalars(row)
        if self._bar is not None:
            rate = f"  {row['items_per_s']:.1f} items/s" if row["items_per_s"] is not None else ""
            self._bar.set_postfix_str(f"step {row['step']}  loss {row['loss']:.4f}{rate}", refresh=False)
            self._bar.update(1)
        return row

    def _tb_scalars(self, row: dict[str, Any]) -> None:
        """The row's scalars as ONE event: a Summary per add_scalar() costs about four times
        as much per step (see docs/performance.md, metrics_log)."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        keys = ("loss", "lr", "grad_norm", "items_per_s", "tokens_per_s", "step_time_s")
        values = [Summary.Value(tag=f"train/{k}", simple_value=row[k]) for k in keys if row[k] is not None]
        self._tb._get_file_writer().add_summary(Summary(value=values), row["step"])

    def close(self) -> None:
        self._close_bar()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._file is not None:
            self._file.close()
            self._file, self._writer = None, None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
