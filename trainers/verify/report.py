"""The verify report: typed, rendered to the JSON of DESIGN.md "Verify" and to text.

`VerifyReport.to_dict()` is what `--json` prints and report.json holds; the aggregates
(max_abs_diff, max_rel_diff, allreduce_rounds_per_step, ...) are computed from the steps.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


@dataclasses.dataclass
class StepReport:
    """One optimizer step: both losses and how far the distributed state is from the reference."""

    step: int
    reference_loss: float
    distributed_loss: float
    max_abs_diff: float
    max_rel_diff: float
    allreduce_rounds: int
    worst_tensor: str | None
    items: int
    count: float
    lr: float | None
    skipped: bool
    world_size: int | None
    collective_calls: dict[str, int] | None = None  # DeepSpeed: calls per collective

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["collective_calls"] is None:
            del d["collective_calls"]
        return d


@dataclasses.dataclass
class Interruption:
    """--interrupt-at-step: where the run was killed, and whether it resumed."""

    at_step: int
    exit_status: int
    resumed: bool
    resumed_plan: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"interrupted_at_step": self.at_step, "interrupt_exit_status": self.exit_status, "resumed": self.resumed}
        return d if self.resumed_plan is None else {**d, "resumed_plan": self.resumed_plan}


@dataclasses.dataclass
class VerifyReport:
    task: str
    backend: str
    zero_stage: int | None  # DeepSpeed only
    precision: str
    plan: dict[str, Any]
    world_sizes: list[int]
    tolerance: float
    loss_mode: str
    optimizer: str
    worker_exit_status: int
    output_dir: str
    seconds: dict[str, float]
    initial_max_abs_diff: float | None
    steps: list[StepReport]
    unequal_micro_batches: bool
    passed: bool
    interrupted: Interruption | None = None
    diagnostics: list[str] = dataclasses.field(default_factory=list)
    files: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def max_abs_diff(self) -> float:
        return max((s.max_abs_diff for s in self.steps), default=float("nan"))

    @property
    def max_rel_diff(self) -> float:
        return max((s.max_rel_diff for s in self.steps), default=float("nan"))

    @property
    def allreduce_rounds_per_step(self) -> int:
        return max((s.allreduce_rounds for s in self.steps), default=0)

    @property
    def loss_max_rel_diff(self) -> float:
        return max(
            (abs(s.distributed_loss - s.reference_loss) / max(abs(s.reference_loss), 1e-30) for s in self.steps),
            default=float("nan"),
        )

    @property
    def skipped_steps(self) -> list[int]:
        """fp16 overflow: the steps whose update was skipped."""
        return [s.step for s in self.steps if s.skipped]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "task": self.task,
            "backend": self.backend,
            "precision": self.precision,
            "plan": self.plan,
            "world_sizes": self.world_sizes,
            "tolerance": self.tolerance,
            "loss_mode": self.loss_mode,
            "optimizer": self.optimizer,
            "worker_exit_status": self.worker_exit_status,
            "output_dir": self.output_dir,
            "seconds": self.seconds,
            "initial_max_abs_diff": self.initial_max_abs_diff,
            "steps": [s.to_dict() for s in self.steps],
            "unequal_micro_batches": self.unequal_micro_batches,
            "max_abs_diff": self.max_abs_diff,
            "max_rel_diff": self.max_rel_diff,
            "allreduce_rounds_per_step": self.allreduce_rounds_per_step,
            "loss_max_rel_diff": self.loss_max_rel_diff,
            "skipped_steps": self.skipped_steps,
            "passed": self.passed,
            "diagnostics": self.diagnostics,
            "files": self.files,
        }
        if self.zero_stage is not None:
            d["zero_stage"] = self.zero_stage
        if self.interrupted is not None:
            d.update(self.interrupted.to_dict())
        return d


def plot_losses(report: Mapping[str, Any], path: Path) -> None:
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


def format_report(typed: VerifyReport) -> str:
    """The text `gradaccum verify` prints."""
    report = typed.to_dict()
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
            f"  ZeRO {report['zero_stage']} partitions gradients, so DeepSpeed reduces them on every micro-step by design "
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
