"""`gradaccum advise`: measure briefly, predict every (world size, micro-batch), recommend one.

This process imports no torch: the trials run as `python -m trainers.advise_trial` in W
processes per world size (gloo, on this machine); the prediction is `launcher.advise`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from launcher.advise import (
    BACKENDS,
    AdviseError,
    Compute,
    Line,
    Link,
    StateBytes,
    calibrate,
    check_world_sizes,
    enumerate_options,
    fit_link,
    parse_interconnect,
    recommend,
)
from launcher.atomic import read_json
from launcher.cli.common import add_json_flag, info, print_json
from launcher.memory import MemoryModel, format_bytes, parse_bytes

ORDER = 15
TRIAL_TIMEOUT_S = 600


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "advise",
        help="predict step time and memory for every world size and micro-batch, and recommend one",
        description=(
            "Measure the task's model briefly on this machine (W trial processes per world size, gloo), "
            "predict the optimizer-step time and per-rank peak memory of every (world size, micro-batch, "
            "accumulation) that gives the global batch, and recommend the fastest that fits. "
            "The model and its assumptions: docs/advise.md."
        ),
        epilog="example: gradaccum advise --task trainers.example:task --global-batch-size 24 --world-sizes 1,2",
    )
    p.add_argument("--task", required=True, metavar="MODULE:FUNCTION", help="e.g. trainers.example:task")
    p.add_argument("--global-batch-size", type=int, required=True, metavar="G", help="samples per optimizer step")
    p.add_argument("--world-sizes", required=True, metavar="W1,W2,...", help="world sizes to compare, e.g. 1,2,4")
    p.add_argument("--backend", choices=BACKENDS, default="ddp", help="trainer backend (default ddp)")
    p.add_argument("--zero-stage", type=int, default=None, metavar="S", help="DeepSpeed ZeRO stage 0-3 (default 0)")
    p.add_argument(
        "--memory-budget",
        metavar="SIZE",
        help="memory per rank, e.g. 80GiB (10%% kept as margin); default: this machine's available memory / W",
    )
    p.add_argument(
        "--interconnect",
        metavar="GBPS[,LATENCY_US]",
        help="bus bandwidth in GB/s (e.g. NCCL all-reduce busbw) and latency in µs (default 5); "
        "default: measured between local processes with gloo",
    )
    add_json_flag(p)
    p.set_defaults(func=run)


def _world_sizes(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise AdviseError(f"--world-sizes must be comma-separated integers, e.g. 1,2,4; got {text!r}") from None


def _zero_stage(args: argparse.Namespace) -> int:
    if args.zero_stage is None:
        return 0
    if args.backend != "deepspeed":
        raise AdviseError(
            f"--zero-stage is a DeepSpeed setting; add --backend deepspeed (got --backend {args.backend})"
        )
    if args.zero_stage not in (0, 1, 2, 3):
        raise AdviseError(f"--zero-stage must be 0, 1, 2 or 3, got {args.zero_stage}")
    return args.zero_stage


def trial_sizes(per_rank: int) -> list[int]:
    """1, about the square root, and the per-rank batch: enough for a line, cheap to measure."""
    if per_rank <= 2:
        return [1, 2]
    return sorted({1, max(2, round(per_rank**0.5)), per_rank})


def local_trial_limit() -> int:
    """Most processes a trial starts on this machine; larger world sizes reuse the largest trial."""
    return max(2, os.cpu_count() or 1)


def run_trial(task: str, world: int, sizes: list[int], measure_link: bool, memory: bool, workdir: Path) -> dict:
    from launcher.cli.launch import _free_port
    from launcher.run import python_module_argv, run_local_workers

    output = workdir / f"trial-{world}.json"
    argv = python_module_argv(
        "trainers.advise_trial", "--task", task, "--sizes", ",".join(map(str, sizes)), "--output", str(output)
    )
    argv += ["--measure-link"] * measure_link + ["--memory"] * memory
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun and `gradaccum verify` do for several processes
    status = run_local_workers(argv, world, "127.0.0.1", _free_port(), env=env, log=lambda _msg: None)
    result = read_json(output, "advise trial result", AdviseError) if output.exists() else None
    if result and "error" in result:
        raise AdviseError(result["error"])
    if status != 0 or result is None:
        raise AdviseError(
            f"the trial at world size {world} failed (exit status {status}); its error is above. "
            f"Check that `--task {task}` trains (e.g. `gradaccum verify --task {task}`)"
        )
    return result


def measure(args: argparse.Namespace, worlds: list[int], link: Link | None) -> tuple[dict[int, dict], float]:
    start = time.monotonic()
    limit = local_trial_limit()
    trial_worlds = sorted({min(w, limit) for w in worlds})
    results = {}
    with tempfile.TemporaryDirectory(prefix="gradaccum-advise-") as tmp:
        for i, w in enumerate(trial_worlds):
            per_rank = args.global_batch_size // min(x for x in worlds if min(x, limit) == w)
            memory_sizes = trial_sizes(args.global_batch_size // worlds[0])
            sizes = sorted(set(trial_sizes(per_rank)) | (set(memory_sizes) if i == 0 else set()))
            info(f"gradaccum advise: trial at world size {w} ({w} process(es)), micro-batches {sizes}")
            results[w] = run_trial(args.task, w, sizes, w > 1, i == 0, Path(tmp))
    return results, time.monotonic() - start


def compute_for(result: dict, link: Link | None) -> Compute:
    """The trial's figures, calibrated on its trainer steps; `link` (given) or the measured one."""
    local = None
    if result.get("allreduce"):
        (small_b, small_s), (large_b, large_s) = result["allreduce"]
        local = fit_link(small_b, small_s, large_b, large_s, result["world_size"])
    raw = Compute(
        Line.fit([tuple(p) for p in result["forward"]]),
        Line.fit([tuple(p) for p in result["backward"]]),
        result["optimizer_step_s"],
        link or local,
    )
    steps = result["trainer_steps"]
    return calibrate(
        raw,
        steps["micro_batch_size"],
        {int(k): s for k, s in steps["step_s"]},
        result["gradient_bytes"],
        result["world_size"],
        local,
    )


def run(args: argparse.Namespace) -> int:
    worlds = check_world_sizes(args.global_batch_size, _world_sizes(args.world_sizes))
    zero_stage = _zero_stage(args)
    budget = parse_bytes(args.memory_budget) if args.memory_budget is not None else None
    link = parse_interconnect(args.interconnect) if args.interconnect is not None else None
    results, wall = measure(args, worlds, link)
    limit = local_trial_limit()
    first = results[min(results)]
    compute = {w: compute_for(results[min(w, limit)], link) for w in worlds}
    state = StateBytes(first["gradient_bytes"], first["parameter_bytes"], first["optimizer_state_bytes"])
    memory = MemoryModel.fit([tuple(p) for p in first["memory"]])
    budgets = {w: budget if budget is not None else first["available_bytes"] / min(w, limit) for w in worlds}
    options = enumerate_options(
        args.global_batch_size,
        worlds,
        compute,
        memory,
        state,
        budgets,
        args.backend,
        zero_stage,
        first.get("tokens_per_sample"),
    )
    measured = _measured(results, compute, memory, state, first, wall, budget is None)
    best, why = recommend(options, budgets)
    if args.json:
        print_json(
            {
                "options": [o.to_dict() for o in options],
                "recommended": {**best.to_dict(), "reason": why},
                "measured": measured,
            }
        )
        return 0
    print(render(options, best, why, args, zero_stage, measured, budgets))
    return 0


def _measured(results, compute, memory, state, first, wall, budget_is_default) -> dict[str, Any]:
    out: dict[str, Any] = {
        "trial_seconds": wall,
        "gradient_bytes": state.gradient_bytes,
        "parameter_bytes": state.parameter_bytes,
        "optimizer_state_bytes": state.optimizer_state_bytes,
        "tokens_per_sample": first.get("tokens_per_sample"),
        "memory": {
            "base_bytes": memory.base_bytes,
            "per_sample_bytes": memory.per_sample_bytes,
            "points": [list(p) for p in memory.points],
        },
        "budget": "available memory of this machine / world size" if budget_is_default else "--memory-budget",
        "threads_per_process": first.get("threads"),
        "trials": {},
    }
    for w, c in sorted(compute.items()):
        out["trials"][str(w)] = {
            "trial_processes": min(w, local_trial_limit()),
            "forward_s": [c.forward.intercept, c.forward.slope],
            "backward_s": [c.backward.intercept, c.backward.slope],
            "optimizer_step_s": c.optimizer_step_s,
            "trainer_micro_overhead_s": c.micro_overhead_s,
            "trainer_step_overhead_s": c.step_overhead_s,
            "link": None
            if c.link is None
            else {
                "bandwidth_bytes_per_s": c.link.bandwidth_bytes_per_s,
                "latency_s": c.link.latency_s,
                "source": c.link.source,
            },
        }
    return out


def render(options, best, why, args, zero_stage, measured, budgets) -> str:
    backend = args.backend + (f" ZeRO-{zero_stage}" if args.backend == "deepspeed" else "")
    tokens = measured["tokens_per_sample"] is not None
    head = (
        f"{'world':>5} {'micro':>5} {'accum':>5} {'step ms':>9} {'comm ms':>8} {'samples/s':>10}"
        + (f" {'tokens/s':>10}" if tokens else "")
        + f" {'peak/rank':>11} {'fits':>4} {'scaling':>7}"
    )
    lines = [
        f"advise: {args.task}, global batch {args.global_batch_size}, backend {backend} "
        f"(measured in {measured['trial_seconds']:.0f} s)",
        head,
    ]
    for o in options:
        mark = " <" if o is best else ""
        lines.append(
            f"{o.world_size:>5} {o.micro_batch_size:>5} {o.gradient_accumulation_steps:>5} "
            f"{o.predicted_step_s * 1e3:>9.2f} {o.communication_s * 1e3:>8.2f} {o.samples_per_s:>10.1f}"
            + (f" {o.tokens_per_s:>10.0f}" if tokens else "")
            + f" {format_bytes(o.predicted_peak_bytes):>11} {'yes' if o.fits else 'no':>4} "
            f"{o.scaling_efficiency:>6.0%}{mark}"
        )
    for w, t in measured["trials"].items():
        link = t["link"]
        if link:
            lines.append(
                f"world {w}: link {link['bandwidth_bytes_per_s'] / 1e9:.2f} GB/s, {link['latency_s'] * 1e6:.0f} µs "
                f"({link['source']}); budget {format_bytes(budgets[int(w)])}/rank ({measured['budget']})"
            )
    lines.append(
        f"recommended: world size {best.world_size}, micro-batch {best.micro_batch_size}, accumulation "
        f"{best.gradient_accumulation_steps}: {why}"
    )
    return "\n".join(lines)
