"""`gradaccum verify`: prove that the distributed run computes the single-device update.

The reference (one process, whole global batch per step) runs here; the distributed run
runs as real worker processes under torchrun (gloo on CPU). Both start from the task's
seeded weights and see the same global batches. After every optimizer step every tensor of
the model's state is compared; the report gives, per step, both losses, the largest
absolute and relative differences and the gradient all-reduce rounds, and says what is
likely wrong when the run does not match.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from launcher.atomic import write_json_atomic
from launcher.errors import UserError
from launcher.plan import PLAN_ENV_VAR, BatchPlan
from launcher.verify_options import CheckedOptions, VerifyOptions, check
from trainers.metrics_log import CSV_NAME
from trainers.reference import ReferenceTrainer
from trainers.startup import save_atomic
from trainers.task import Task, load_task
from trainers.verify.compare import compare_states, diagnose
from trainers.verify.protocol import STEPS_DIR, WorkerArgs, clear_previous_run, load_steps, plan_path
from trainers.verify.report import Interruption, StepReport, VerifyReport, plot_losses


def _clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def run_reference(task: Task, plan: BatchPlan, steps: int, shuffle: bool, log: Callable[[str], None]):
    # always fp32 (only the global batch of the plan counts): a bf16/fp16 run is compared
    # with what it approximates
    trainer = ReferenceTrainer.from_task(task, plan.global_batch_size, shuffle=shuffle)
    initial = _clone(trainer.module.state_dict())
    states, metrics = [], []

    def record(m):
        states.append(_clone(trainer.module.state_dict()))
        metrics.append(m)
        log(f"reference:   step {m.step}/{steps}  loss {m.loss:.6f}")

    trainer.train(steps, callback=record)
    trainer.close()  # data workers, if the task asked for them; the model stays usable
    return trainer, initial, states, metrics


def worker_args(opts: VerifyOptions, out: Path, **extra: Any) -> WorkerArgs:
    """The workers' flags for these options (`extra`: checkpoint and hold flags)."""
    return WorkerArgs(
        task=opts.task,
        steps=opts.steps,
        output_dir=str(out / STEPS_DIR),
        no_shuffle=not opts.shuffle,
        sync_every_micro_step=opts.sync_every_micro_step,
        collective_timeout=opts.collective_timeout,
        backend=opts.backend,
        zero_stage=opts.zero_stage,
        deepspeed_config=str(Path(opts.deepspeed_config).resolve()) if opts.deepspeed_config else None,
        log_dir=str(out.resolve()),  # metrics.csv of the distributed run, beside the report
        no_progress=True,  # verify prints its own progress lines
        fsdp_blocks=opts.fsdp_blocks,
        **extra,
    )


def run_distributed(
    opts: VerifyOptions,
    plan: BatchPlan,
    out: Path,
    log: Callable[[str], None],
    extra: Mapping[str, Any] | None = None,
    fresh: bool = True,
    runner: Callable[..., int] | None = None,
) -> int:
    """Start the workers under torchrun. `fresh=False` continues an interrupted run (its
    step records are kept); `runner` replaces run_command (trainers/verify/interrupt.py)."""
    from launcher.run import format_command, run_command

    steps_dir = out / STEPS_DIR
    if fresh:  # an earlier run's steps, metrics rows and curves went with clear_previous_run
        steps_dir.mkdir(parents=True, exist_ok=True)
    plan_file = plan_path(out, plan.world_size, resumed=not fresh)
    write_json_atomic(plan_file, plan.to_dict())
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={plan.world_size}"]
    argv += ["-m", "trainers.worker", *worker_args(opts, out, **(extra or {})).to_argv()]
    env = dict(os.environ)
    env[PLAN_ENV_VAR] = str(plan_file.resolve())
    env.setdefault("OMP_NUM_THREADS", "1")  # P processes on a small machine; also silences torchrun's notice
    # The task module may live in the current directory, as with `python -m`.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    log(f"distributed: starting {plan.world_size} worker processes: {format_command(argv)}")
    try:
        stdout = sys.stderr.fileno()  # workers' output is progress: keep stdout for --json
    except (AttributeError, OSError, ValueError):
        stdout = None
    return (runner or run_command)(argv, env=env, stdout=stdout)


def _step_report(ref_m: Any, rec: Mapping[str, Any], cmp: Mapping[str, Any]) -> StepReport:
    dm = rec["metrics"]
    return StepReport(
        step=ref_m.step,
        reference_loss=ref_m.loss,
        distributed_loss=dm["loss"],
        max_abs_diff=cmp["max_abs_diff"],
        max_rel_diff=cmp["max_rel_diff"],
        allreduce_rounds=dm["allreduce_rounds"],
        worst_tensor=cmp["worst"][0]["name"] if cmp["worst"] else None,
        items=dm["items"],
        count=dm["count"],
        lr=dm["lr"],
        skipped=bool(dm.get("skipped", False)),
        world_size=rec.get("world_size"),
        collective_calls=rec.get("collective_calls"),
    )


def verify(opts: VerifyOptions, log: Callable[[str], None] | None = None) -> VerifyReport:
    """Check the options, run both halves, compare, write the files (see DESIGN.md "Verify")."""
    return run_checked(check(opts), log)


def run_checked(checked: CheckedOptions, log: Callable[[str], None] | None = None) -> VerifyReport:
    """`verify` for options that passed `launcher.verify_options.check`."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    opts, plan, ds_config = checked.options, checked.plan, checked.deepspeed_config
    assert opts.tolerance is not None
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: a task module in the current directory
    task = load_task(opts.task)
    if opts.fsdp_blocks is not None:  # names no module: say so before anything is written
        from trainers.fsdp import resolve_blocks

        resolve_blocks(task.model(), opts.fsdp_blocks)
    out = Path(opts.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        clear_previous_run(out)  # a run owns its files: never mix them with an earlier run's
    except OSError as e:
        raise UserError(f"cannot create --output-dir {out}: {e.strerror}") from None
    log(
        f"verify: {task.name}: global {plan.global_batch_size} = micro {plan.micro_batch_size} × accumulation "
        f"{plan.gradient_accumulation_steps} × data-parallel {plan.data_parallel_size}, {opts.steps} steps"
    )
    t0 = time.monotonic()
    reference, initial, ref_states, ref_metrics = run_reference(task, plan, opts.steps, opts.shuffle, log)
    model = reference.module
    t1 = time.monotonic()
    save_atomic(initial, out / "initial.pt")
    save_atomic(ref_states[-1], out / "reference.pt")
    interrupted: Interruption | None = None
    world_sizes = [plan.world_size]
    if opts.interrupt_at_step is not None:
        from trainers.verify.interrupt import run_interrupted

        def start(run_plan: BatchPlan, fresh: bool, extra: dict[str, Any], runner: Any) -> int:
            return run_distributed(opts, run_plan, out, log, extra, fresh=fresh, runner=runner)

        rc, world_sizes, interrupted = run_interrupted(opts, plan, out, log, start)
    else:
        rc = run_distributed(opts, plan, out, log)
    t2 = time.monotonic()
    records = load_steps(out / STEPS_DIR, opts.steps)

    initial_cmp = compare_states(initial, records[0]["model"]) if records else None
    steps, final_cmp, unequal = [], None, False
    for ref_state, ref_m, rec in zip(ref_states, ref_metrics, records[1:], strict=False):
        final_cmp = compare_states(ref_state, rec["model"])
        unequal = unequal or bool(rec["metrics"].get("unequal_micro_batches"))
        steps.append(_step_report(ref_m, rec, final_cmp))
    report = VerifyReport(
        task=task.name,
        backend=opts.backend,
        zero_stage=ds_config["zero_optimization"]["stage"] if ds_config else None,
        precision=opts.precision,
        plan=plan.to_dict(),
        world_sizes=world_sizes,
        tolerance=opts.tolerance,
        loss_mode=ref_metrics[0].loss_mode,
        optimizer=type(reference.optimizer).__name__,
        worker_exit_status=rc,
        output_dir=str(out),
        seconds={"reference": round(t1 - t0, 3), "distributed": round(t2 - t1, 3)},
        initial_max_abs_diff=initial_cmp["max_abs_diff"] if initial_cmp else None,
        steps=steps,
        unequal_micro_batches=unequal,
        passed=False,
        interrupted=interrupted,
    )
    complete = rc == 0 and len(steps) == opts.steps
    report.passed = bool(complete and report.initial_max_abs_diff == 0.0 and report.max_rel_diff <= opts.tolerance)
    problems = []
    if interrupted is not None and not interrupted.resumed:
        problems.append(
            f"the run never reached the checkpoint of step {opts.interrupt_at_step} to be interrupted there "
            f"(it exited with status {interrupted.exit_status})"
        )
    elif rc != 0:
        problems.append(f"the distributed run exited with status {rc} (its output is above)")
    elif len(steps) != opts.steps:
        problems.append(f"the distributed run wrote {len(steps)} of {opts.steps} steps")
    report.diagnostics = problems + (diagnose(model, report.to_dict(), final_cmp) if not report.passed else [])

    files = {"initial": "initial.pt", "reference": "reference.pt", "report": "report.json", "plan": "plan.json"}
    if len(records) > 1:  # the state after the last step the run took; never its initial weights
        save_atomic(records[-1]["model"], out / "distributed.pt")
        files["distributed"] = "distributed.pt"
    if (out / CSV_NAME).exists():
        files["metrics"] = CSV_NAME
    if steps:
        try:
            plot_losses(report.to_dict(), out / "loss-curve.png")
            files["loss_curve"] = "loss-curve.png"
        except Exception as e:  # a plot must never hide the verdict
            report.diagnostics.append(f"could not draw the loss curve: {e}")
    report.files = {k: str(out / v) for k, v in files.items()}
    write_json_atomic(out / "report.json", report.to_dict())
    return report
