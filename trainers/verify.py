"""`gradaccum verify`: prove that the distributed run computes the single-device update.

The reference (one process, whole global batch per step) runs here; the distributed run
runs as real worker processes under torchrun (gloo on CPU). Both start from the task's
seeded weights and see the same global batches. After every optimizer step every tensor of
the model's state is compared; the report gives, per step, both losses, the largest
absolute and relative differences and the gradient all-reduce rounds, and says what is
likely wrong when the run does not match.

Relative difference of a tensor: max|distributed - reference| / max|reference| (per tensor,
then the largest over tensors), so parameters near zero do not inflate it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from launcher.atomic import write_json_atomic
from launcher.cli.verify import (
    check_backend_options,
    check_interrupt_options,
    check_options,
    check_precision_options,
    resolve_tolerance,
)
from launcher.cli.verify import resolve_plan as cli_resolve_plan
from launcher.errors import UserError
from launcher.plan import PLAN_ENV_VAR, BatchPlan
from trainers.reference import ReferenceTrainer
from trainers.task import Task, load_task
from trainers.worker import save_atomic, step_path

DEFAULT_TASK = "trainers.example:task"
STEPS_DIR = "distributed-steps"


@dataclasses.dataclass
class VerifyOptions:
    task: str = DEFAULT_TASK
    global_batch_size: int | None = None
    micro_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    nproc_per_node: int = 2
    steps: int = 4
    shuffle: bool = True
    output_dir: str = "gradaccum-verify"
    tolerance: float | None = None  # None: the default for the precision (DEFAULT_TOLERANCES)
    sync_every_micro_step: bool = False
    backend: str = "ddp"
    zero_stage: int | None = None  # --backend deepspeed: None means the JSON's stage, or 0
    deepspeed_config: str | None = None  # --backend deepspeed: the user's DeepSpeed JSON
    precision: str = "fp32"  # of the distributed run; the reference is always fp32
    collective_timeout: float | None = None  # seconds; None: the trainers' default
    interrupt_at_step: int | None = None  # SIGKILL after this step's checkpoint, then resume
    resume_nproc_per_node: int | None = None  # resume at this many processes (same global batch)


def resolve_plan(opts: VerifyOptions) -> BatchPlan:
    plan = cli_resolve_plan(
        opts.global_batch_size, opts.micro_batch_size, opts.gradient_accumulation_steps, opts.nproc_per_node
    )
    return dataclasses.replace(plan, precision=opts.precision)  # the workers read it from the plan


def compare_states(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Largest absolute / relative differences over all tensors, and the worst tensors."""
    if set(reference) != set(other):
        missing, extra = sorted(set(reference) - set(other)), sorted(set(other) - set(reference))
        raise ValueError(f"state_dict keys differ: missing {missing[:5]}, unexpected {extra[:5]}")
    rows, exact_mismatch = [], []
    for name, ref in reference.items():
        got = other[name]
        if not ref.is_floating_point():
            if not torch.equal(ref, got):
                exact_mismatch.append(name)
            continue
        if ref.numel() == 0:
            continue
        ref64, got64 = ref.detach().double().cpu(), got.detach().double().cpu()
        diff = float((got64 - ref64).abs().max())
        scale = float(ref64.abs().max())
        rows.append((name, diff, diff / max(scale, 1e-30)))
    rows.sort(key=lambda r: r[2], reverse=True)
    return {
        "max_abs_diff": max((r[1] for r in rows), default=0.0),
        "max_rel_diff": rows[0][2] if rows else 0.0,
        "worst": [{"name": n, "abs": a, "rel": r} for n, a, r in rows[:3]],
        "non_float_mismatch": exact_mismatch,
    }


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
    return trainer, initial, states, metrics


def run_distributed(
    opts: VerifyOptions,
    plan: BatchPlan,
    out: Path,
    log: Callable[[str], None],
    extra_args: Sequence[str] = (),
    fresh: bool = True,
    runner: Callable[..., int] | None = None,
) -> int:
    """Start the workers under torchrun. `fresh=False` continues an interrupted run (its
    step records are kept); `runner` replaces run_command (trainers/interrupt.py)."""
    from launcher.run import format_command, run_command

    steps_dir = out / STEPS_DIR
    if fresh:
        if steps_dir.exists():
            shutil.rmtree(steps_dir)  # stale steps of an earlier run must not be compared
        steps_dir.mkdir(parents=True)
    plan_file = out / ("plan.json" if fresh else f"plan-resumed-world{plan.world_size}.json")
    write_json_atomic(plan_file, plan.to_dict())
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={plan.world_size}"]
    argv += ["-m", "trainers.worker", "--task", opts.task, "--steps", str(opts.steps), "--output-dir", str(steps_dir)]
    if not opts.shuffle:
        argv.append("--no-shuffle")
    if opts.sync_every_micro_step:
        argv.append("--sync-every-micro-step")
    if opts.collective_timeout is not None:
        argv += ["--collective-timeout", str(opts.collective_timeout)]
    if opts.backend != "ddp":
        argv += ["--backend", opts.backend]
    if opts.zero_stage is not None:
        argv += ["--zero-stage", str(opts.zero_stage)]
    if opts.deepspeed_config is not None:
        argv += ["--deepspeed-config", str(Path(opts.deepspeed_config).resolve())]
    argv += list(extra_args)
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


def load_distributed(out: Path, steps: int) -> list[dict[str, Any]]:
    records = []
    for step in range(steps + 1):
        path = step_path(out / STEPS_DIR, step)
        if not path.exists():
            break
        records.append(torch.load(path, map_location="cpu", weights_only=True))
    return records


def _dropout_modules(model: nn.Module) -> list[str]:
    found = []
    for name, module in model.named_modules():
        p = getattr(module, "p", None) if isinstance(module, nn.modules.dropout._DropoutNd) else None
        p = p if p is not None else getattr(module, "dropout", None)
        if isinstance(p, float) and p > 0:
            found.append(name or type(module).__name__)
    return found


def diagnose(model: nn.Module, report: dict[str, Any], final_cmp: dict[str, Any] | None) -> list[str]:
    """The usual reasons a distributed run does not match, as far as they can be detected."""
    notes = []
    bn = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bn:
        notes.append(
            f"BatchNorm layers ({', '.join(bn[:4])}{', ...' if len(bn) > 4 else ''}) normalise with the statistics "
            "of each micro-batch on each rank, not of the global batch: they cannot match a single-device run. "
            "Use SyncBatchNorm (still per micro-batch) or GroupNorm/LayerNorm to compare."
        )
    buffers = {n for n, _ in model.named_buffers()}
    if final_cmp:
        differing = [w["name"] for w in final_cmp["worst"] if w["name"] in buffers and w["rel"] > report["tolerance"]]
        differing += [n for n in final_cmp["non_float_mismatch"] if n in buffers]
        if differing:
            notes.append(
                f"buffers {', '.join(sorted(set(differing)))} differ: buffers updated in forward depend on how the "
                "batch is cut (and DDP broadcasts rank 0's buffers); they cannot match a single-device run"
            )
    drop = _dropout_modules(model)
    if drop:
        notes.append(
            f"dropout is active in {', '.join(drop[:4])}: its random masks depend on the rank and micro-batch, "
            "so the updates differ; switch dropout off (p=0) to compare"
        )
    if report.get("loss_mode") == "mean":
        unequal = report.get("unequal_micro_batches")
        notes.append(
            "the loss returns a scalar mean per micro-batch"
            + (" and micro-batches of different sizes were seen" if unequal else "")
            + ": averaging means of micro-batches with different numbers of items or tokens (padded sequences of "
            "different lengths count) is not the global mean. Return (loss_sum, count) from the loss."
        )
    rel = report.get("max_rel_diff")
    if "adam" in str(report.get("optimizer", "")).lower() and isinstance(rel, float) and rel < 1e-3:
        notes.append(
            f"{report['optimizer']} divides by the root of the squared-gradient average: gradients that are "
            "(almost) exactly zero turn their round-off into full-size steps, and a split batch sums in another "
            "order. A small mismatch like this one can be round-off: try a larger eps (e.g. 1e-5), parameters "
            "without analytically-zero gradients, or a looser --tolerance"
        )
    if (report.get("initial_max_abs_diff") or 0.0) > 0:
        notes.append(
            "the initial weights already differ: the model factory is not deterministic under torch.manual_seed "
            "(it must build the same weights in every process)"
        )
    if final_cmp and final_cmp["worst"]:
        worst = ", ".join(f"{w['name']} (rel {w['rel']:.2e})" for w in final_cmp["worst"])
        notes.append(f"largest differences: {worst}")
    return notes


def plot_losses(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s["step"] for s in report["steps"]]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, [s["reference_loss"] for s in report["steps"]], "o-", label="reference (1 process)")
    ax.plot(steps, [s["distributed_loss"] for s in report["steps"]], "x--", label=f"distributed ({report['backend']})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("global mean loss")
    ax.set_title(f"{report['task']}: {'passed' if report['passed'] else 'FAILED'}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def verify(opts: VerifyOptions, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run both halves, compare, write the files; returns the report (see DESIGN.md "Verify")."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    check_options(opts.backend, opts.steps, opts.nproc_per_node, opts.tolerance, opts.task)
    check_precision_options(opts.precision, opts.collective_timeout)
    opts = dataclasses.replace(opts, tolerance=resolve_tolerance(opts.tolerance, opts.precision))
    plan = resolve_plan(opts)
    check_interrupt_options(opts.steps, opts.interrupt_at_step, opts.resume_nproc_per_node, plan)
    ds_config = check_backend_options(
        opts.backend,
        plan,
        opts.zero_stage,
        opts.deepspeed_config,
        opts.sync_every_micro_step,
        opts.precision,
        opts.resume_nproc_per_node,
    )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: a task module in the current directory
    task = load_task(opts.task)
    out = Path(opts.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
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
    interrupted: dict[str, Any] = {}
    if opts.interrupt_at_step is not None:
        from trainers.interrupt import run_interrupted

        interrupted = run_interrupted(opts, plan, out, log)
        rc = interrupted.pop("rc")
    else:
        rc = run_distributed(opts, plan, out, log)
    t2 = time.monotonic()
    records = load_distributed(out, opts.steps)

    report: dict[str, Any] = {
        "task": task.name,
        "backend": opts.backend,
        **({"zero_stage": ds_config["zero_optimization"]["stage"]} if ds_config else {}),
        "precision": opts.precision,
        "plan": plan.to_dict(),
        "world_sizes": interrupted.pop("world_sizes", [plan.world_size]),
        **interrupted,
        "tolerance": opts.tolerance,
        "loss_mode": ref_metrics[0].loss_mode,
        "optimizer": type(reference.optimizer).__name__,
        "worker_exit_status": rc,
        "output_dir": str(out),
        "seconds": {"reference": round(t1 - t0, 3), "distributed": round(t2 - t1, 3)},
    }
    initial_cmp = compare_states(initial, records[0]["model"]) if records else None
    report["initial_max_abs_diff"] = initial_cmp["max_abs_diff"] if initial_cmp else None
    steps, final_cmp, unequal = [], None, False
    for ref_state, ref_m, rec in zip(ref_states, ref_metrics, records[1:], strict=False):
        cmp = compare_states(ref_state, rec["model"])
        dm = rec["metrics"]
        unequal = unequal or bool(dm.get("unequal_micro_batches"))
        steps.append(
            {
                "step": ref_m.step,
                "reference_loss": ref_m.loss,
                "distributed_loss": dm["loss"],
                "max_abs_diff": cmp["max_abs_diff"],
                "max_rel_diff": cmp["max_rel_diff"],
                "allreduce_rounds": dm["allreduce_rounds"],
                "worst_tensor": cmp["worst"][0]["name"] if cmp["worst"] else None,
                "items": dm["items"],
                "count": dm["count"],
                "lr": dm["lr"],
                "skipped": bool(dm.get("skipped", False)),
                "world_size": rec.get("world_size"),
                **({"collective_calls": rec["collective_calls"]} if "collective_calls" in rec else {}),
            }
        )
        final_cmp = cmp
    report["steps"] = steps
    report["unequal_micro_batches"] = unequal
    report["max_abs_diff"] = max((s["max_abs_diff"] for s in steps), default=float("nan"))
    report["max_rel_diff"] = max((s["max_rel_diff"] for s in steps), default=float("nan"))
    report["allreduce_rounds_per_step"] = max((s["allreduce_rounds"] for s in steps), default=0)
    report["loss_max_rel_diff"] = max(
        (abs(s["distributed_loss"] - s["reference_loss"]) / max(abs(s["reference_loss"]), 1e-30) for s in steps),
        default=float("nan"),
    )
    report["skipped_steps"] = [s["step"] for s in steps if s["skipped"]]  # fp16 overflow: update skipped
    complete = rc == 0 and len(steps) == opts.steps
    report["passed"] = bool(
        complete and report["initial_max_abs_diff"] == 0.0 and report["max_rel_diff"] <= opts.tolerance
    )
    problems = []
    if interrupted and not interrupted["resumed"]:
        problems.append(
            f"the run never reached the checkpoint of step {opts.interrupt_at_step} to be interrupted there "
            f"(it exited with status {interrupted['interrupt_exit_status']})"
        )
    elif rc != 0:
        problems.append(f"the distributed run exited with status {rc} (its output is above)")
    elif len(steps) != opts.steps:
        problems.append(f"the distributed run wrote {len(steps)} of {opts.steps} steps")
    report["diagnostics"] = problems + (diagnose(model, report, final_cmp) if not report["passed"] else [])

    if records:
        save_atomic(records[-1]["model"], out / "distributed.pt")
    files = {"initial": "initial.pt", "reference": "reference.pt", "report": "report.json", "plan": "plan.json"}
    if records:
        files["distributed"] = "distributed.pt"
    if steps:
        try:
            plot_losses(report, out / "loss-curve.png")
            files["loss_curve"] = "loss-curve.png"
        except Exception as e:  # a plot must never hide the verdict
            report["diagnostics"].append(f"could not draw the loss curve: {e}")
    report["files"] = {k: str(out / v) for k, v in files.items()}
    write_json_atomic(out / "report.json", report)
    return report


def format_report(report: dict[str, Any]) -> str:
    plan = report["plan"]
    k = plan["gradient_accumulation_steps"]
    lines = [
        f"task: {report['task']}",
        f"plan: global {plan['global_batch_size']} = micro {plan['micro_batch_size']} × accumulation {k} × "
        f"data-parallel {plan['data_parallel_size']} (backend {report['backend']}"
        + (f" ZeRO {report['zero_stage']}" if "zero_stage" in report else "")
        + ", "
        f"precision {report.get('precision', 'fp32')}, world {report['world_sizes']})",
        "",
        f"{'step':>4}  {'reference loss':>14}  {'distributed loss':>16}  {'max abs diff':>12}  "
        f"{'max rel diff':>12}  {'all-reduce rounds':>17}",
    ]
    for s in report["steps"]:
        lines.append(
            f"{s['step']:>4}  {s['reference_loss']:>14.6f}  {s['distributed_loss']:>16.6f}  "
            f"{s['max_abs_diff']:>12.3e}  {s['max_rel_diff']:>12.3e}  {s['allreduce_rounds']:>17}"
        )
    if report.get("interrupted_at_step") is not None:
        sizes = " -> ".join(str(w) for w in report["world_sizes"])
        lines.append(
            f"interrupted: SIGKILL after the checkpoint of step {report['interrupted_at_step']}, resumed with "
            f"--resume auto; world sizes {sizes}"
        )
    lines.append("")
    rounds = report["allreduce_rounds_per_step"]
    verdict = "PASSED" if report["passed"] else "FAILED"
    lines.append(
        f"{verdict}: max relative parameter difference {report['max_rel_diff']:.3e} "
        f"({'<=' if report['passed'] else 'vs'} tolerance {report['tolerance']:g}) after {len(report['steps'])} steps; "
        f"{rounds} gradient all-reduce round(s) per optimizer step with {k} micro-steps"
    )
    if report.get("zero_stage", 0) >= 2 and k > 1:
        lines.append(
            "  ZeRO 2 partitions gradients, so DeepSpeed reduces them on every micro-step by design "
            "(ZeRO 0 and 1 reduce once per optimizer step)"
        )
    if report.get("precision", "fp32") != "fp32" and report["steps"]:
        lines.append(
            f"  {report['precision']} run against the fp32 reference: parameters differ by "
            f"{report['steps'][-1]['max_rel_diff']:.2e} (relative) after the last step, losses by at most "
            f"{report['loss_max_rel_diff']:.2e}; the tolerance is sized for {report['precision']} round-off, "
            "which Adam amplifies on the first steps (README, 'Mixed precision')"
        )
    if report.get("skipped_steps"):
        lines.append(f"  fp16 overflow: the update of step(s) {report['skipped_steps']} was skipped")
    for note in report["diagnostics"]:
        lines.append(f"  - {note}")
    lines.append("files: " + ", ".join(report["files"].values()))
    return "\n".join(lines)
