"""Issue 19's benchmark: does `gradaccum advise` predict the real step time?

`python -m benchmarks.advise [--steps S] [--out FILE]`

For the example LM and the MLP (trainers/example.py) it runs `gradaccum advise --json` at
world sizes 1 and 2, then trains the recommended option and at least three others for real
(worlds 1 and 2, the largest and a small micro-batch) through DDPTrainer, W processes each as
`gradaccum launch` starts them, and compares the predicted optimizer-step time with the
measured one: the median of the steps after the first two, timed by a `train()` callback.
Targets: median absolute error <= 15%, worst <= 30%. (Until `examples/train.py --log-dir`
writes metrics.csv, the step times come from this callback; switch to `step_time_s` then.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, child_env, free_port, log, machine, now_iso, run_checked, source_state
from launcher.atomic import read_json, write_json_atomic
from launcher.run import python_module_argv, run_local_workers

TASKS = {"lm": "trainers.example:task", "mlp": "trainers.example:mlp_task"}
GLOBAL_BATCH = 24
DROP_FIRST = 2
TARGET_MEDIAN, TARGET_WORST = 0.15, 0.30


def worker(args: argparse.Namespace) -> int:
    """One rank of a real run: DDPTrainer over the task, a perf_counter stamp after each step."""
    from launcher.plan import BatchPlan
    from trainers import DDPTrainer, load_task

    plan = BatchPlan.solve(args.global_batch_size, args.micro, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    trainer = DDPTrainer.from_task(load_task(args.task), plan, log=False)
    stamps = [time.perf_counter()]
    trainer.train(args.steps, callback=lambda _m: stamps.append(time.perf_counter()))
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    if trainer.dist.rank == 0:
        write_json_atomic(args.output, {"step_s": steps})
    from trainers.distributed import shutdown

    shutdown(barrier=True)
    return 0


def measure(task: str, world: int, micro: int, steps: int, tmp: Path) -> float:
    out = tmp / f"run-{world}-{micro}-{time.monotonic_ns()}.json"
    argv = python_module_argv(
        "benchmarks.advise", "--worker", "--task", task, "--micro", str(micro), "--steps", str(steps),
        "--global-batch-size", str(GLOBAL_BATCH), "--output", str(out),
    )  # fmt: skip
    status = run_local_workers(argv, world, "127.0.0.1", free_port(), env=child_env(), cwd=REPO)
    if status != 0:
        raise RuntimeError(f"real run {task} world {world} micro {micro} failed with status {status}")
    return statistics.median(read_json(out, "step times")["step_s"][DROP_FIRST:])


def pick(options: list[dict], recommended: dict) -> list[dict]:
    """The recommended option, then per world the largest and a small micro-batch (>= 4 in all)."""
    key = lambda o: (o["world_size"], o["micro_batch_size"])  # noqa: E731
    chosen = {key(recommended): recommended}
    for w in sorted({o["world_size"] for o in options}):
        mine = sorted((o for o in options if o["world_size"] == w), key=lambda o: o["micro_batch_size"])
        for o in (mine[-1], mine[min(1, len(mine) - 1)]):
            chosen.setdefault(key(o), o)
    return list(chosen.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.advise", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per real run (the first 2 are dropped)")
    p.add_argument("--rounds", type=int, default=2, help="real runs per option, taking turns (median)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "advise.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--task", help=argparse.SUPPRESS)
    p.add_argument("--micro", type=int, help=argparse.SUPPRESS)
    p.add_argument("--global-batch-size", type=int, default=GLOBAL_BATCH, help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    started, rows, advice = now_iso(), [], {}
    gradaccum = [sys.executable, "-m", "launcher"]
    with tempfile.TemporaryDirectory(prefix="gradaccum-bench-advise-") as tmp:
        for name, task in TASKS.items():
            cmd = [*gradaccum, "advise", "--task", task, "--global-batch-size", str(GLOBAL_BATCH)]
            cmd += ["--world-sizes", "1,2", "--json"]
            t0 = time.perf_counter()
            advice[name] = json.loads(run_checked(cmd, timeout=600, env=child_env()))
            advice[name]["advise_wall_s"] = time.perf_counter() - t0
            log(f"advise {name}: {advice[name]['advise_wall_s']:.0f} s")
            rec = advice[name]["recommended"]
            picked = pick(advice[name]["options"], rec)
            # several rounds over the options, so that a change of load on a shared machine
            # falls on all of them rather than on one
            reals: dict[int, list[float]] = {i: [] for i in range(len(picked))}
            for _round in range(args.rounds):
                for i, o in enumerate(picked):
                    reals[i].append(measure(task, o["world_size"], o["micro_batch_size"], args.steps, Path(tmp)))
            for i, o in enumerate(picked):
                real = statistics.median(reals[i])
                err = o["predicted_step_s"] / real - 1
                row = dict(task=name, world_size=o["world_size"], micro_batch_size=o["micro_batch_size"],
                           gradient_accumulation_steps=o["gradient_accumulation_steps"],
                           recommended=o is rec or (o["world_size"], o["micro_batch_size"]) == (rec["world_size"], rec["micro_batch_size"]),
                           predicted_s=o["predicted_step_s"], measured_s=real, measured_rounds_s=reals[i], error=err)  # fmt: skip
                rows.append(row)
                log(
                    f"{name} world {row['world_size']} micro {row['micro_batch_size']:>2} accum "
                    f"{row['gradient_accumulation_steps']:>2}: predicted {row['predicted_s'] * 1e3:7.1f} ms, "
                    f"measured {real * 1e3:7.1f} ms ({err:+.0%})"
                )
    errors = [abs(r["error"]) for r in rows]
    summary = {"median_abs_error": statistics.median(errors), "worst_abs_error": max(errors)}
    passed = summary["median_abs_error"] <= TARGET_MEDIAN and summary["worst_abs_error"] <= TARGET_WORST
    result = dict(started=started, machine=machine(), source=source_state(), steps=args.steps,
                  global_batch_size=GLOBAL_BATCH, rows=rows, summary=summary, passed=passed,
                  targets={"median_abs_error": TARGET_MEDIAN, "worst_abs_error": TARGET_WORST},
                  advice={k: {"measured": v["measured"], "recommended": v["recommended"],
                              "advise_wall_s": v["advise_wall_s"]} for k, v in advice.items()})  # fmt: skip
    write_json_atomic(args.out, result)
    print(render(rows, summary, passed))
    return 0 if passed else 1


def render(rows: list[dict[str, Any]], summary: dict[str, float], passed: bool) -> str:
    lines = [
        "| task | world | micro | accum | predicted ms | measured ms | error |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']}{' (recommended)' if r['recommended'] else ''} | {r['world_size']} | "
            f"{r['micro_batch_size']} | {r['gradient_accumulation_steps']} | {r['predicted_s'] * 1e3:.1f} | "
            f"{r['measured_s'] * 1e3:.1f} | {r['error']:+.0%} |"
        )
    lines.append(
        f"median |error| {summary['median_abs_error']:.0%} (target <= {TARGET_MEDIAN:.0%}), worst "
        f"{summary['worst_abs_error']:.0%} (target <= {TARGET_WORST:.0%}): {'PASS' if passed else 'FAIL'}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
