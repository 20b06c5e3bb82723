"""`make gpu-check` / `python -m benchmarks.gpu_check`: the CUDA paths, on one NVIDIA GPU.

A GPU is rarely lent to this project (never in CI), so this is the one command to run when
one is: each check runs as its own process with a time limit, and one summary line per
check is printed (`gpu-check: NAME: PASS|FAIL (SECONDS s) DETAIL`). All of it takes a few
minutes (well under ten on one current GPU). Exit status: 0 all passed, 1 some check
failed, 2 no CUDA here (nothing is run).

Checks:
  nccl-world1     gradaccum verify at 1 process: NCCL backend, model and batches on cuda:0
  gloo-2procs     gradaccum verify at 2 processes sharing the one GPU (gloo between them)
  bf16            gradaccum verify at 1 process with --precision bf16 (autocast on CUDA)
  pinned-workers  StepLoader(num_workers=2, device=cuda) equals num_workers=0, pinned pages
  benchmark       python -m benchmarks --gpu (--quick with --quick)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHECKS = ("nccl-world1", "gloo-2procs", "bf16", "pinned-workers", "benchmark")


def _verify_cmd(out: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "launcher", "verify", "--json", "--output-dir", str(out), *flags]


def _pinned_workers() -> str:
    """In a child process: workers on and off give the same batches, pinned and on the GPU."""
    import torch

    from launcher.plan import BatchPlan
    from trainers.example import pad_collate, text_sequences
    from trainers.loader import StepLoader

    plan, seqs = BatchPlan(16, 4, 4, 1), text_sequences()[:100]
    with StepLoader(seqs, plan, collate=pad_collate, device="cuda", num_workers=0) as plain:
        expected = [plain.next_step() for _ in range(8)]
    with StepLoader(seqs, plan, collate=pad_collate, device="cuda", num_workers=2, prefetch_factor=2) as loader:
        assert loader.pin_memory, "pin_memory is off on CUDA"
        got = [loader.next_step() for _ in range(8)]
    torch.cuda.synchronize()
    for a_step, b_step in zip(expected, got, strict=True):
        for a, b in zip(a_step, b_step, strict=True):
            assert a.items == b.items
            for x, y in zip(a.batch, b.batch, strict=True):
                assert y.device.type == "cuda" and torch.equal(x, y), "batches differ"
    return "8 steps identical, pinned, on cuda"


def _command(name: str, out: Path, quick: bool) -> list[str]:
    if name == "nccl-world1":
        return _verify_cmd(out / name, "--nproc-per-node", "1")
    if name == "gloo-2procs":
        return _verify_cmd(out / name, "--nproc-per-node", "2")
    if name == "bf16":
        return _verify_cmd(out / name, "--nproc-per-node", "1", "--precision", "bf16")
    if name == "pinned-workers":
        return [sys.executable, "-m", "benchmarks.gpu_check", "--child-pinned-workers"]
    return [sys.executable, "-m", "benchmarks", "--gpu", "--out", str(out / name), *(["--quick"] if quick else [])]


def _detail(name: str, proc: subprocess.CompletedProcess) -> str:
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return f"exit {proc.returncode}: " + " | ".join(tail)
    if name in ("nccl-world1", "gloo-2procs", "bf16"):
        report = json.loads(proc.stdout)
        return f"max rel diff {report['max_rel_diff']:.3g}, world {report['world_sizes']}"
    return (proc.stdout.strip().splitlines() or [""])[-1][:160]


def run_checks(names: list[str], quick: bool, timeout_s: float) -> int:
    failed = 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    with tempfile.TemporaryDirectory(prefix="gradaccum-gpu-check-") as tmp:
        for name in names:
            began = time.perf_counter()
            try:
                proc = subprocess.run(
                    _command(name, Path(tmp), quick), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s
                )
                ok, detail = proc.returncode == 0, _detail(name, proc)
            except subprocess.TimeoutExpired:
                ok, detail = False, f"did not finish in {timeout_s:.0f} s"
            failed += not ok
            took = time.perf_counter() - began
            print(f"gpu-check: {name}: {'PASS' if ok else 'FAIL'} ({took:.1f} s) {detail}", flush=True)
    print(f"gpu-check: {len(names) - failed}/{len(names)} checks passed", flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", metavar="NAME[,NAME]", help=f"run these checks only ({', '.join(CHECKS)})")
    p.add_argument("--quick", action="store_true", help="the benchmark's quick configuration")
    p.add_argument("--timeout", type=float, default=150.0, metavar="S", help="per check (default 150)")
    p.add_argument("--child-pinned-workers", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    names = list(CHECKS) if not args.only else args.only.split(",")
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        print(f"gpu-check: error: unknown check(s) {', '.join(unknown)}; choose from {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print(
            f"gpu-check: error: no CUDA device here (torch {torch.__version__}, torch.cuda.is_available() is False); "
            "run it on a machine with an NVIDIA GPU and a CUDA build of torch (make gpu-check TORCH_SPEC=torch). "
            "Nothing was run.",
            file=sys.stderr,
        )
        return 2
    if args.child_pinned_workers:
        print(_pinned_workers())
        return 0
    return run_checks(names, args.quick, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
