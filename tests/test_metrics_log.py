"""MetricsLogger (metrics.csv, TensorBoard, progress bar) and `gradaccum report`."""

from __future__ import annotations

import csv
import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import textwrap

import pytest

from launcher.errors import UserError
from tests.conftest import run_cli
from trainers.example import mlp_sum_task
from trainers.metrics_log import COLUMNS, MetricsLogger
from trainers.reference import ReferenceTrainer

PNG = b"\x89PNG\r\n\x1a\n"


class FakeTrainer:
    """Only what the hooks read: the number of optimizer steps already taken."""

    def __init__(self, global_step: int = 0) -> None:
        self.global_step = global_step


def _train(trainer, logger, steps):
    """Run real optimizer steps, logging each through the component hooks; return the metrics."""
    seen = []

    def observe(m):
        logger.on_step_end(trainer, m, 0.25)
        seen.append(m)

    logger.on_train_start(trainer, steps)
    try:
        trainer.train(steps, callback=observe)
    finally:
        logger.on_train_end(trainer)
    return seen


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_rows_equal_the_step_metrics_and_append_across_calls(tmp_path):
    task = mlp_sum_task(56)
    trainer = ReferenceTrainer.from_task(task, 16, shuffle=False, track_grad_norm=True)
    logger = MetricsLogger(tmp_path, progress=False, tensorboard=False, rank0=True)
    first = _train(trainer, logger, 3)
    rows = _rows(tmp_path / "metrics.csv")
    assert len(rows) == 3  # flushed before each hook returned, readable while the file is open
    second = _train(trainer, logger, 2)  # a second train() call appends
    logger.close()
    rows = _rows(tmp_path / "metrics.csv")
    assert list(rows[0]) == list(COLUMNS)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    for r, m in zip(rows, first + second, strict=True):
        assert float(r["loss"]) == m.loss  # full precision: repr round-trips exactly
        assert int(r["items"]) == m.items and float(r["count"]) == m.count
        assert float(r["grad_norm"]) == m.grad_norm and float(r["lr"]) == m.lr
        assert float(r["step_time_s"]) == 0.25
        assert float(r["items_per_s"]) == m.items / 0.25
        assert float(r["tokens_per_s"]) == m.count / 0.25  # (sum, count) loss
        assert r["loss_mode"] == "sum" and r["skipped"] == "0"
    # 56 items: the fourth global batch is partial, so items differ between rows
    assert [int(r["items"]) for r in rows] == [16, 16, 16, 8, 16]
    # a new logger (a resumed run) appends below the same header
    with MetricsLogger(tmp_path, progress=False, tensorboard=False, rank0=True) as again:
        _train(trainer, again, 1)
    text = (tmp_path / "metrics.csv").read_text()
    assert text.count("step,loss") == 1 and len(_rows(tmp_path / "metrics.csv")) == 6


def test_unknown_values_are_empty_and_other_ranks_write_nothing(tmp_path):
    task = mlp_sum_task()
    trainer = ReferenceTrainer.from_task(task, 16, shuffle=False)  # no clipping: grad_norm None
    logger = MetricsLogger(tmp_path / "r0", progress=False, tensorboard=False, rank0=True)
    m = _train(trainer, MetricsLogger(None, progress=False, tensorboard=False, rank0=False), 1)[0]
    row = logger.log_step(m, None)
    logger.close()
    assert row["grad_norm"] is None and row["items_per_s"] is None
    r = _rows(tmp_path / "r0" / "metrics.csv")[0]
    assert r["grad_norm"] == r["step_time_s"] == r["items_per_s"] == r["tokens_per_s"] == ""
    other = MetricsLogger(tmp_path / "r1", progress=False, tensorboard=False, rank0=False)
    _train(trainer, other, 1)
    other.close()
    assert not (tmp_path / "r1").exists()


def test_a_foreign_csv_is_refused_not_mixed(tmp_path):
    (tmp_path / "metrics.csv").write_text("a,b\n1,2\n")
    logger = MetricsLogger(tmp_path, progress=False, tensorboard=False, rank0=True)
    with pytest.raises(UserError, match="exists with other columns"):
        logger.on_train_start(FakeTrainer(), 1)
    assert (tmp_path / "metrics.csv").read_text() == "a,b\n1,2\n"


def test_tensorboard_event_files_beside_the_csv(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    task = mlp_sum_task()
    trainer = ReferenceTrainer.from_task(task, 16, shuffle=False)
    with MetricsLogger(tmp_path, progress=False, tensorboard=True, rank0=True) as logger:
        seen = _train(trainer, logger, 3)
    assert list(tmp_path.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    losses = acc.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3]
    assert [e.value for e in losses] == pytest.approx([m.loss for m in seen], rel=1e-6)


_BAR_SCRIPT = textwrap.dedent(
    """
    import sys
    from trainers.example import mlp_sum_task
    from trainers.reference import ReferenceTrainer
    # the trainer's own progress= option (default True) makes its MetricsLogger draw the bar
    options = {} if sys.argv[1] == "on" else {"progress": False}
    with ReferenceTrainer.from_task(mlp_sum_task(), 16, shuffle=False, **options) as trainer:
        trainer.train(3)
    print("done", flush=True)
    """
)


def _stderr_on_a_terminal(arg):
    """Run the script with stderr on a pseudo-terminal; return what the terminal received."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 120-column terminal
    env = {**os.environ, "COLUMNS": "100"}
    proc = subprocess.Popen([sys.executable, "-c", _BAR_SCRIPT, arg], stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    out, _ = proc.communicate(timeout=120)
    os.close(master)
    assert proc.returncode == 0 and b"done" in out
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.timeout(180)
def test_progress_bar_on_a_terminal_only_and_off_with_progress_false():
    shown = _stderr_on_a_terminal("on")
    assert "3/3" in shown and "loss" in shown and "items/s" in shown
    assert "3/3" not in _stderr_on_a_terminal("off")
    # not a terminal (a pipe): no bar even with progress=True
    proc = subprocess.run(
        [sys.executable, "-c", _BAR_SCRIPT, "on"], capture_output=True, text=True, timeout=120, check=True
    )
    assert proc.stderr == "" and "done" in proc.stdout


# ------------------------------------------------------------------ gradaccum report
def test_report_draws_pngs_from_a_real_log(tmp_path):
    task = mlp_sum_task()
    trainer = ReferenceTrainer.from_task(task, 16, shuffle=False)
    with MetricsLogger(tmp_path, progress=False, tensorboard=False, rank0=True) as logger:
        _train(trainer, logger, 4)
        _train(trainer, logger, 0)
    result = run_cli("report", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "4 steps" in result.stdout
    for name in ("loss.png", "throughput.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG


def test_report_keeps_the_last_row_of_a_repeated_step(tmp_path):
    from launcher.cli.report import read_metrics

    header = ",".join(COLUMNS)
    (tmp_path / "metrics.csv").write_text(
        f"{header}\n1,3.0,8,8.0,,,,,,sum,0,1\n2,2.0,8,8.0,,,,,,sum,0,2\n2,1.5,8,8.0,,,,,,sum,0,3\n"
    )
    m = read_metrics(tmp_path / "metrics.csv")
    assert m["step"] == [1.0, 2.0] and m["loss"] == [3.0, 1.5] and m["items_per_s"] == [None, None]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no metrics file"),
        ("a,b\n1,2\n", "not a metrics file"),
        ("step,loss\n", "no rows"),
        ("step,loss\n1,abc\n", "line 2: column 'loss' holds 'abc'"),
        ("step,loss\n1.5,2\n", "whole number"),
        ("step,loss\n1,2,3\n", "columns expected"),
    ],
)
def test_report_bad_input_exits_2_without_writing(tmp_path, content, message):
    if content is not None:
        (tmp_path / "metrics.csv").write_text(content)
    result = run_cli("report", str(tmp_path))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.glob("*.png"))


def test_report_does_not_import_torch(tmp_path):
    (tmp_path / "metrics.csv").write_text("step,loss\n1,2.5\n2,2.0\n")
    code = (
        "import sys; from launcher.cli import main; rc = main(['report', sys.argv[1]]); "
        "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------ through the trainers
def test_log_dir_on_the_trainer_writes_each_step_and_appends_across_calls_and_resume(tmp_path):
    import time

    task = mlp_sum_task(56)
    log = tmp_path / "log"
    seen = []
    with ReferenceTrainer.from_task(task, 16, log_dir=log, progress=False, track_grad_norm=True) as trainer:
        assert trainer.metrics_logger in trainer.components
        t0 = time.perf_counter()
        trainer.train(2, callback=seen.append)
        took = time.perf_counter() - t0
        assert len(_rows(log / "metrics.csv")) == 2  # written before train() returned
        trainer.train(1, callback=seen.append)
        trainer.save(tmp_path / "ck")
    with ReferenceTrainer.from_task(task, 16, log_dir=log, progress=False, track_grad_norm=True) as resumed:
        resumed.resume(tmp_path / "ck")
        resumed.train(2, callback=seen.append)
    rows = _rows(log / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    for row, m in zip(rows, seen, strict=True):
        assert float(row["loss"]) == m.loss and int(row["items"]) == m.items and float(row["count"]) == m.count
        assert float(row["lr"]) == m.lr and float(row["grad_norm"]) == m.grad_norm
        assert float(row["items_per_s"]) == pytest.approx(m.items / float(row["step_time_s"]))
    assert 0 < sum(float(r["step_time_s"]) for r in rows[:2]) <= took


def test_no_logger_without_log_dir_and_without_a_terminal():
    with ReferenceTrainer.from_task(mlp_sum_task(56), 16, log=False) as trainer:  # pytest's stderr: no tty
        assert trainer.metrics_logger is None


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_metrics_csv_of_a_two_process_run_equals_its_step_metrics(tmp_path):
    """verify's distributed run (2 processes): rank 0's metrics.csv rows are the StepMetrics
    the workers recorded, one per step, in order; interrupted and resumed, the rows append."""
    import json

    import torch

    r = run_cli(
        "verify", "--steps", "4", "--interrupt-at-step", "2", "--json", "--output-dir", str(tmp_path), timeout=280
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["files"]["metrics"] == str(tmp_path / "metrics.csv")
    rows = _rows(tmp_path / "metrics.csv")
    assert [int(row["step"]) for row in rows] == [1, 2, 3, 4]
    for row in rows:
        record = torch.load(tmp_path / "distributed-steps" / f"step-{int(row['step']):06d}.pt", weights_only=False)
        m = record["metrics"]
        assert float(row["loss"]) == m["loss"] and int(row["items"]) == m["items"]
        assert float(row["count"]) == m["count"] and float(row["lr"]) == m["lr"]
        assert (float(row["grad_norm"]) if row["grad_norm"] else None) == m["grad_norm"]
        assert float(row["step_time_s"]) > 0 and row["loss_mode"] == m["loss_mode"] == "sum"
