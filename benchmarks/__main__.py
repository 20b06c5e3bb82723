"""`python -m benchmarks [--quick] [--only NAME[,NAME]] [--out DIR] [--gpu]`

Runs the benchmarks, prints the table of ratios, writes DIR/results.json (raw figures,
summaries, targets), DIR/table.md and DIR/*.png, and exits 1 when a target is missed or
a benchmark failed (2 for bad flags, or --gpu without CUDA).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks import comm, launch, loader_io, memory, microbatch, overhead, peers, real_workloads, zero3
from benchmarks.common import REPO, Target, child_env, free_port, log, machine, now_iso, source_state
from launcher.atomic import write_json_atomic, write_text_atomic
from launcher.run import describe_status, run_local_workers

NAMES = (
    "overhead",
    "peers",
    "comm",
    "memory",
    "launch",
    "microbatch",
    "loader_io",
    "metrics_log",
    "hf_step",
    "zero3",
)
DEFAULT_OUT = REPO / "benchmarks" / "results"

FULL = {
    # warmup: rounds dropped; steps: rounds timed (each contender takes one optimizer step per
    # round), per workload: the LM's steps are 4x shorter, so it affords more rounds.
    # launches: the rounds are split over this many separate launches of the two processes and
    # pooled. Repeated runs of one launch differed by 1-2% in the median ratio (where the
    # processes and their memory landed lasts a launch): more rounds do not average that out.
    "training": {"warmup": 2, "steps": {"mlp": 200, "lm": 300, "lm-mean": 300}, "micro": 4, "k": 4, "launches": 3},
    "comm": {"workload": "mlp", "micro": 4, "ks": [1, 2, 4, 8], "count_steps": 2, "warmup": 2, "steps": 20},
    "microbatch": {"global_batch": 64, "sizes": [1, 2, 4, 8, 16, 32], "warmup": 2, "steps": 20},
    "microbatch_trial_sizes": None,  # autobatch's defaults
    "memory": {"ks": [1, 2, 4, 8, 16], "micro": 32, "reps": 2},
    "launch": {"reps": 5, "first_step_reps": 3},
    "loader_io": {"rounds": 5, "steps": 20, "wait_ms": 2.0},
    "metrics_log": {"global_batch": 16, "warmup": 3, "steps": 150},
    "hf_step": {"micro": 4, "k": 4, "warmup": 3, "steps": 60},
    "zero3": {"workload": "lm", "micro": 4, "k": 4, "warmup": 3, "steps": 60, "aa": True},
    "timeout_s": 540,
}
QUICK = {
    "training": {"warmup": 1, "steps": 3, "micro": 2, "k": 2, "launches": 1},
    "comm": {"workload": "mlp", "micro": 2, "ks": [1, 2], "count_steps": 1, "warmup": 1, "steps": 3},
    "microbatch": {"global_batch": 8, "sizes": [1, 2, 4], "warmup": 1, "steps": 3},
    "microbatch_trial_sizes": [1, 2],
    "memory": {"ks": [1, 2], "micro": 4, "reps": 1},
    "launch": {"reps": 1, "first_step_reps": 0},  # 0: six torch imports saved; the full run does it
    "loader_io": {"rounds": 1, "steps": 3, "wait_ms": 2.0},
    "metrics_log": {"global_batch": 8, "warmup": 1, "steps": 3},
    "hf_step": {"micro": 2, "k": 2, "warmup": 1, "steps": 3},
    "zero3": {"workload": "lm", "micro": 2, "k": 2, "warmup": 1, "steps": 3, "aa": False},
    "timeout_s": 240,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, one or two repetitions: checks that it all runs")
    p.add_argument("--only", metavar="NAME[,NAME]", help=f"run only these: {', '.join(NAMES)}")
    p.add_argument(
        "--out", metavar="DIR", help=f"where results go (default {DEFAULT_OUT.relative_to(REPO)}/, or quick/ in it)"
    )
    p.add_argument("--gpu", action="store_true", help="the GPU benchmark alone (needs CUDA)")
    args = p.parse_args(argv)
    if args.only:
        args.only = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in args.only if n not in NAMES]
        if unknown:
            p.error(f"--only: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(NAMES)}")
    args.out = Path(args.out) if args.out else DEFAULT_OUT / "quick" if args.quick else DEFAULT_OUT
    return args


def training_config(cfg: dict[str, Any], selected: list[str], peer_list: list[str], quick: bool) -> dict[str, Any]:
    t = cfg["training"]

    def spec(workload: str, contenders: list[str]) -> dict[str, Any]:
        steps = t["steps"][workload] if isinstance(t["steps"], dict) else t["steps"]
        steps = -(-steps // t["launches"])  # per launch, rounded up
        return {"micro": t["micro"], "k": t["k"], "steps": steps, "contenders": contenders}

    workloads: dict[str, Any] = {}
    if "overhead" in selected:
        workloads["mlp"] = spec("mlp", ["ours", "hand", "ours-copy", "ours-ddp-defaults"])
        workloads["lm"] = spec("lm", ["ours", "hand", "ours-copy", "ours-ddp-defaults"])
    if "peers" in selected and peer_list:
        workloads.setdefault("mlp", spec("mlp", ["ours", "hand"]))["contenders"] += peer_list
        if not quick:  # the LM through the peers, with the loss they scale (per-micro-batch mean / K)
            workloads["lm-mean"] = spec("lm-mean", ["ours", "hand", *peer_list])
    return {"workloads": workloads, "warmup": t["warmup"]}


def run_distributed(jobs: dict[str, Any], quick: bool, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gradaccum-bench-") as tmp:
        cfg_path, raw_path = Path(tmp) / "config.json", Path(tmp) / "raw.json"
        cfg_path.write_text(json.dumps({"jobs": jobs, "quick": quick, "threads": 1}))
        argv = [sys.executable, "-m", "benchmarks.dist_worker", "--config", str(cfg_path), "--output", str(raw_path)]
        # gradaccum's own `local` launcher: torchrun's variables without torchrun's agent process
        # (one torch import less); a rank that fails stops the other.
        status = run_local_workers(argv, 2, "127.0.0.1", free_port(), env=child_env(OMP_NUM_THREADS="1"), cwd=REPO)
        if status != 0:
            raise RuntimeError(f"the benchmark workers failed ({describe_status(status)}); their stderr is above")
        return json.loads(raw_path.read_text())


def error_entry(name: str, exc: BaseException) -> tuple[dict[str, Any], list[Target]]:
    log(f"benchmarks: {name} failed:\n{''.join(traceback.format_exception(exc))[-3000:]}")
    return {"error": f"{type(exc).__name__}: {exc}"}, [Target(f"{name}: ran", None, 1, ">=", "the benchmark finished")]


def run_cpu(args: argparse.Namespace) -> dict[str, Any]:
    cfg = QUICK if args.quick else FULL
    selected = args.only or list(NAMES)
    peer_list, peers_missing = peers.available()
    benchmarks: dict[str, Any] = {}
    targets: list[Target] = []

    def record(name: str, fn: Any, wall_s: float | None = None) -> None:
        t0 = time.perf_counter()
        try:
            result, tgts = fn()
        except Exception as e:  # noqa: BLE001 - one benchmark failing must not hide the others
            result, tgts = error_entry(name, e)
        result["wall_s"] = round(wall_s if wall_s is not None else time.perf_counter() - t0, 1)
        benchmarks[name] = result
        targets.extend(tgts)
        log(f"benchmarks: {name}: {len(tgts)} target(s), {result['wall_s']} s")

    jobs: dict[str, Any] = {}
    if "overhead" in selected or ("peers" in selected and peer_list):
        jobs["training"] = training_config(cfg, selected, peer_list, args.quick)
    if "comm" in selected:
        jobs["comm"] = cfg["comm"]
    if "microbatch" in selected:
        jobs["microbatch"] = cfg["microbatch"]
    if "zero3" in selected:
        jobs["zero3"] = cfg["zero3"]
    raw: dict[str, Any] = {}
    dist_error: Exception | None = None
    if jobs:
        launches = cfg["training"]["launches"] if "training" in jobs else 1
        log(f"benchmarks: {launches} launch(es) of 2 processes (gloo) for: {', '.join(jobs)}")
        try:
            raw = run_distributed(jobs, args.quick, cfg["timeout_s"])
            if launches > 1:  # the training rounds of further launches, pooled with the first's
                parts = [raw["training"]]
                for _ in range(launches - 1):
                    parts.append(
                        run_distributed({"training": jobs["training"]}, args.quick, cfg["timeout_s"])["training"]
                    )
                raw["training"] = overhead.pool_launches(parts)
        except Exception as e:  # noqa: BLE001 - reported for each benchmark of the launch
            dist_error = e

    def rank_figures(job: str) -> dict[str, Any]:
        if dist_error is not None:
            raise dist_error
        return raw[job]

    def job_wall(job: str) -> float | None:
        return raw.get(job, {}).get("wall_s")

    if "overhead" in selected:
        record("overhead", lambda: overhead.summarize(rank_figures("training")), job_wall("training"))
    if "peers" in selected:
        if peer_list:
            record("peers", lambda: peers.summarize(rank_figures("training"), peers_missing), job_wall("training"))
        else:
            benchmarks["peers"] = {"skipped": peers_missing, "workloads": {}}
            log(f"benchmarks: peers skipped: {'; '.join(peers_missing.values())}")
    if "comm" in selected:
        record("comm", lambda: comm.summarize(rank_figures("comm")), job_wall("comm"))
    if "microbatch" in selected:
        gb, trial = cfg["microbatch"]["global_batch"], cfg["microbatch_trial_sizes"]

        def microbatch_result() -> Any:
            figures = rank_figures("microbatch")  # first: no trial processes after a failed launch
            return microbatch.summarize(figures, microbatch.auto_choice(gb, 2, trial and tuple(trial)))

        record("microbatch", microbatch_result)
    if "zero3" in selected:
        record("zero3", lambda: zero3.summarize(rank_figures("zero3")), job_wall("zero3"))
    if "memory" in selected:
        record("memory", lambda: memory.summarize(memory.run(cfg["memory"])))
    if "launch" in selected:
        record("launch", lambda: launch.summarize(launch.run(cfg["launch"])))
    if "loader_io" in selected:
        record("loader_io", lambda: loader_io.summarize(loader_io.run(cfg["loader_io"])))
    if "metrics_log" in selected:
        record(
            "metrics_log",
            lambda: real_workloads.summarize_metrics_log(real_workloads.run_metrics_log(cfg["metrics_log"])),
        )
    if "hf_step" in selected:
        record("hf_step", lambda: real_workloads.summarize_hf(real_workloads.run_hf(cfg["hf_step"])))
    return {"benchmarks": benchmarks, "targets": targets, "config": cfg, "selected": selected}


def run_gpu(args: argparse.Namespace) -> dict[str, Any] | None:
    import torch

    from benchmarks import gpu

    if not torch.cuda.is_available():
        print(
            "python -m benchmarks --gpu: no CUDA device here (torch.cuda.is_available() is False, torch "
            f"{torch.__version__}); run it on a machine with an NVIDIA GPU and a CUDA build of torch "
            "(make test TORCH_SPEC=torch installs one). The CPU benchmarks: python -m benchmarks",
            file=sys.stderr,
        )
        return None
    cfg = {"micro": 16, "k": 4, "warmup": 5, "steps": 60}
    if args.quick:
        cfg = {"micro": 4, "k": 2, "warmup": 1, "steps": 3}
    result, targets = gpu.summarize(gpu.run(cfg))
    return {"benchmarks": {"gpu": result}, "targets": targets, "config": cfg, "selected": ["gpu"]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "-m", "benchmarks", *(sys.argv[1:] if argv is None else argv)])
    started = now_iso()
    t0 = time.perf_counter()
    info = machine()
    body = run_gpu(args) if args.gpu else run_cpu(args)
    if body is None:
        return 2
    targets = body.pop("targets")
    results = {
        "schema": 1,
        "command": command,
        "date": started,
        "quick": args.quick,
        "machine": info,
        "source": source_state(),
        "wall_s": round(time.perf_counter() - t0, 1),
        **body,
        "targets": [t.to_dict() for t in targets],
        "passed": all(t.passed for t in targets),
    }
    from benchmarks.report import markdown, plots

    table = markdown(results)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        results["plots"] = plots(results, args.out)
    except Exception as e:  # noqa: BLE001 - the figures matter more than the pictures
        log(f"benchmarks: plotting failed: {e!r}")
        results["plots"] = []
    write_json_atomic(args.out / "results.json", results)
    header = f"`{command}` — {started}, {info['cpu_count']} × {info['cpu_model']}, load {info['load_average_at_start'][0]:.1f}\n\n"
    write_text_atomic(args.out / "table.md", header + table)
    print(table)
    missed = [t.name for t in targets if not t.passed]
    log(
        f"benchmarks: {len(targets) - len(missed)}/{len(targets)} targets met in {results['wall_s']:.0f} s; results in {args.out}"
    )
    if missed:
        log("benchmarks: missed: " + "; ".join(missed))
    return 0 if not missed else 1


if __name__ == "__main__":
    sys.exit(main())
