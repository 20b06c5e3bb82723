"""`gradaccum verify --interrupt-at-step S [--resume-nproc-per-node P2]`: kill, resume, compare.

The distributed run is started with checkpoints every step and `--hold-after-step S`: after
the checkpoint of step S every rank waits (the worker's `hold_until_killed`), so the kill
lands at a known point whatever the speed of the machine. Verify then SIGKILLs the whole
run (torchrun's agent and every worker: nothing gets to clean up), starts it again with
`--resume auto` at P2 processes (the plan re-solved for P2 with the same global batch),
and compares every step with the reference as usual.
"""

from __future__ import annotations

import shutil
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from launcher.plan import BatchPlan
from launcher.verify_options import VerifyOptions
from trainers.verify.protocol import CHECKPOINTS_DIR, HELD, STEPS_DIR
from trainers.verify.report import Interruption


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


def run_interrupted(
    opts: VerifyOptions,
    plan: BatchPlan,
    out: Path,
    log: Callable[[str], None],
    run_distributed: Callable[..., int],
) -> tuple[int, list[int], Interruption]:
    """Run, SIGKILL after step S's checkpoint, resume at P2: (exit status, world sizes, what happened).

    `run_distributed(plan, fresh, checkpoints=..., hold_after_step=..., runner=...)` starts one run."""
    from trainers.resume import describe_change

    step = opts.interrupt_at_step
    assert step is not None
    checkpoints = out / CHECKPOINTS_DIR
    if checkpoints.exists():
        shutil.rmtree(checkpoints)  # an earlier verify's checkpoints must not be resumed
    common = {"checkpoint_dir": str(checkpoints), "checkpoint_every": 1, "keep_last": 2, "resume": "auto"}
    runner = kill_when_held(out / STEPS_DIR / HELD, log)
    first = run_distributed(plan, True, dict(common, hold_after_step=step), runner)
    if not (out / STEPS_DIR / HELD).exists():
        return first or 1, [plan.world_size], Interruption(step, first, resumed=False)
    resumed_plan = plan.with_world_size(opts.resume_nproc_per_node or plan.world_size)
    log(f"verify: resuming from the checkpoint of step {step}: {describe_change(plan, resumed_plan)}")
    rc = run_distributed(resumed_plan, False, common, None)
    return rc, [plan.world_size, resumed_plan.world_size], Interruption(step, first, True, resumed_plan.to_dict())
