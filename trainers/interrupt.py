"""`gradaccum verify --interrupt-at-step S [--resume-nproc-per-node P2]`: kill, resume, compare.

The distributed run is started with checkpoints every step and `--hold-after-step S`: after
the checkpoint of step S every rank waits (the worker's `hold_until_killed`), so the kill
lands at a known point whatever the speed of the machine. Verify then SIGKILLs the whole
run (torchrun's agent and every worker: nothing gets to clean up), starts it again with
`--resume auto` at P2 processes (the plan re-solved for P2 with the same global batch),
and compares every step with the reference as usual.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from launcher.atomic import write_json_atomic
from launcher.errors import UserError
from launcher.plan import BatchPlan

HELD = "held.json"  # written by rank 0 when every rank holds after step S
CHECKPOINTS_DIR = "checkpoints"
HOLD_LIMIT_S = 300.0


def hold_until_killed(steps_dir: str | os.PathLike[str], step: int, limit_s: float = HOLD_LIMIT_S) -> NoReturn:
    """Every rank: wait to be SIGKILLed after step `step` (its checkpoint is complete)."""
    import torch.distributed as dist

    dist.barrier()  # rank 0 has written step `step`'s record; every rank is past the save
    if dist.get_rank() == 0:
        write_json_atomic(Path(steps_dir) / HELD, {"step": step, "pid": os.getpid()})
    parent = os.getppid()
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and os.getppid() == parent:  # the agent died: stop waiting
        time.sleep(0.1)
    raise UserError(f"held after step {step} for up to {limit_s:.0f} s but nobody killed the run (verify gone?)")


def _kill_tree(argv: Sequence[str]) -> int:
    """SIGKILL the child running `argv` (torchrun's agent) and all its descendants; how many."""
    import psutil

    agents, workers = [], []
    for child in psutil.Process().children():
        try:
            if child.cmdline() == list(argv):
                agents.append(child)
                workers += child.children(recursive=True)
        except psutil.NoSuchProcess:
            continue
    for proc in agents + workers:  # the agent first: it must not react to its workers' deaths
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    # Wait for the workers only: waiting on the agent, our own child, would reap it here and
    # Popen.wait in run_command would then report status 0 instead of the SIGKILL.
    psutil.wait_procs(workers, timeout=30)
    return len(agents) + len(workers)


def kill_when_held(marker: Path, log: Callable[[str], None]) -> Callable[..., int]:
    """A runner like launcher.run.run_command that SIGKILLs the run once `marker` appears."""

    def runner(argv: Sequence[str], env: dict[str, str] | None = None, stdout: Any = None) -> int:
        from launcher.run import run_command

        result: dict[str, int] = {}
        thread = threading.Thread(
            target=lambda: result.update(rc=run_command(argv, env=env, stdout=stdout)), daemon=True
        )
        thread.start()
        try:
            while thread.is_alive() and not marker.exists():
                thread.join(0.05)
            if marker.exists():
                killed = _kill_tree(argv)
                log(f"distributed: SIGKILL sent to the run ({killed} processes: torchrun and its workers)")
        except BaseException:  # Ctrl-C here must not leave the workers holding
            _kill_tree(argv)
            raise
        thread.join()
        return result.get("rc", 1)

    return runner


def run_interrupted(opts: Any, plan: BatchPlan, out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Run, SIGKILL after step S's checkpoint, resume at P2; what the report needs to know."""
    from trainers.resume import describe_change
    from trainers.verify import STEPS_DIR, run_distributed

    step = opts.interrupt_at_step
    checkpoints = out / CHECKPOINTS_DIR
    if checkpoints.exists():
        shutil.rmtree(checkpoints)  # an earlier verify's checkpoints must not be resumed
    common = ["--checkpoint-dir", str(checkpoints), "--checkpoint-every", "1", "--keep-last", "2", "--resume", "auto"]
    runner = kill_when_held(out / STEPS_DIR / HELD, log)
    first = run_distributed(opts, plan, out, log, extra_args=[*common, "--hold-after-step", str(step)], runner=runner)
    info: dict[str, Any] = {"interrupted_at_step": step, "interrupt_exit_status": first}
    if not (out / STEPS_DIR / HELD).exists():
        return {**info, "rc": first or 1, "world_sizes": [plan.world_size], "resumed": False}
    resumed_plan = plan.with_world_size(opts.resume_nproc_per_node or plan.world_size)
    log(f"verify: resuming from the checkpoint of step {step}: {describe_change(plan, resumed_plan)}")
    rc = run_distributed(opts, resumed_plan, out, log, extra_args=common, fresh=False)
    return {
        **info,
        "rc": rc,
        "world_sizes": [plan.world_size, resumed_plan.world_size],
        "resumed": True,
        "resumed_plan": resumed_plan.to_dict(),
    }
