"""Benchmark: FSDPTrainer (FSDP2) against DDP's memory and a hand-written FSDP2 loop's time.

    python -m benchmarks.sharded [--rounds 30] [--output FILE.json]

Starts itself as 2 CPU processes (torchrun, gloo, one thread each) and prints three rows,
each a ratio measured in this one run:

1. memory: per-rank bytes of parameters + gradients + optimizer state after an optimizer
   step at world 2, FSDPTrainer / DDPTrainer, on a >= 5M-parameter MLP with Adam
   (target <= 0.55; sharding everything gives 0.5 at best).
2. time: FSDPTrainer's time per optimizer step / a hand-written FSDP2 accumulation loop's
   (set_requires_gradient_sync and set_reshard_after_backward off on non-boundary
   micro-steps) on the same model, data and optimizer; the two take turns, one step each,
   in an order shuffled per round, and each round's ratio is paired (benchmarks/common.py)
   (target <= 1.02).
3. rounds: gradient reduction rounds per optimizer step with sync off on non-boundary
   micro-steps (1) and with sync on every micro-step (K).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, Target, free_port, paired_ratios

WIDTH, DEPTH, MICRO, K, WORLD = 1024, 5, 4, 4, 2
MEMORY_TARGET, TIME_TARGET = 0.55, 1.02


def _model():
    import torch
    from torch import nn

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(DEPTH))
            self.out = nn.Linear(WIDTH, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = torch.relu(layer(x))
            return self.out(x)

    torch.manual_seed(0)
    return MLP()


def _loss(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _adam(params):
    import torch

    return torch.optim.Adam(params, lr=1e-4)


def _batches(rank: int, rounds: int) -> list[list[tuple[Any, Any]]]:
    import torch

    g = torch.Generator().manual_seed(1000 + rank)
    return [
        [(torch.randn(MICRO, WIDTH, generator=g), torch.randn(MICRO, 16, generator=g)) for _ in range(K)]
        for _ in range(rounds)
    ]


def _local_bytes(t) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def state_bytes(module, optimizer, batch) -> dict[str, int]:
    """Parameters and optimizer state as they are after a step; gradients as one synced
    backward leaves them (the step frees them), then freed again."""
    params = sum(_local_bytes(p) for p in module.parameters())
    optim = sum(_local_bytes(v) for s in optimizer.state.values() for v in s.values() if hasattr(v, "numel"))
    _loss(module, batch).backward()
    grads = sum(_local_bytes(p.grad) for p in module.parameters() if p.grad is not None)
    optimizer.zero_grad(set_to_none=True)
    return {"parameters": params, "gradients": grads, "optimizer": optim, "total": params + grads + optim}


class HandLoop:
    """The baseline: FSDP2 by hand, as its documentation accumulates."""

    def __init__(self) -> None:
        from trainers import fsdp

        self.module = fsdp.shard(_model())
        self.optimizer = fsdp.build_optimizer(self.module, _adam)

    def step(self, micro_batches) -> None:
        for i, mb in enumerate(micro_batches):
            boundary = i == len(micro_batches) - 1
            self.module.set_requires_gradient_sync(boundary)
            self.module.set_reshard_after_backward(boundary)
            (_loss(self.module, mb) / len(micro_batches)).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def rank_main(rounds: int, warmup: int, output: str | None) -> None:
    import torch
    import torch.distributed as dist

    from launcher.plan import BatchPlan
    from trainers import DDPTrainer, FSDPTrainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    plan = BatchPlan(MICRO * K * WORLD, MICRO, K, world_size=WORLD)
    data = _batches(rank, warmup + rounds)
    result: dict[str, Any] = {"world_size": WORLD, "micro": MICRO, "k": K, "rounds": rounds}

    # 1. memory after a step
    fsdp_trainer = FSDPTrainer(_model(), _adam, plan, _loss, log=False)
    ddp_model = _model()
    ddp_trainer = DDPTrainer(ddp_model, _adam(ddp_model.parameters()), plan, _loss, log=False)
    result["parameters"] = sum(p.numel() for p in _model().parameters())
    for name, trainer in (("fsdp", fsdp_trainer), ("ddp", ddp_trainer)):
        trainer.step(data[0])
        result[f"bytes_{name}"] = state_bytes(trainer.module, trainer.optimizer, data[0][0])
    del ddp_trainer, ddp_model

    # 2. time per optimizer step, paired rounds in shuffled order
    hand = HandLoop()
    contenders = {"ours": lambda mbs: fsdp_trainer.step(mbs), "hand": hand.step}
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    rng = random.Random(0)
    for i in range(warmup + rounds):
        order = list(contenders)
        rng.shuffle(order)
        for name in order:
            dist.barrier()
            t0 = time.perf_counter()
            contenders[name](data[i])
            seconds[name].append(time.perf_counter() - t0)
        dist.barrier()
    for name, values in seconds.items():
        t = torch.tensor(values[warmup:], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank's time
        result[f"ms_{name}"] = (t * 1000).tolist()

    # 3. rounds per step, sync off on non-boundary micro-steps and on every micro-step
    for name, sync in (("rounds_sync_off", False), ("rounds_sync_every", True)):
        counted = FSDPTrainer(
            _model(), _adam, plan, _loss, log=False, count_collectives=True, sync_every_micro_step=sync
        )
        result[name] = counted.step(data[0]).allreduce_rounds
        counted.close()
    if rank == 0 and output:
        Path(output).write_text(json.dumps(result))
    dist.destroy_process_group()


def summarize(raw: dict[str, Any]) -> tuple[list[str], list[Target]]:
    memory = raw["bytes_fsdp"]["total"] / raw["bytes_ddp"]["total"]
    time_ratio = paired_ratios(raw["ms_ours"], raw["ms_hand"])
    targets = [
        Target("fsdp_state_bytes_vs_ddp", memory, MEMORY_TARGET, "<=", "per-rank params+grads+Adam state, FSDP / DDP"),
        Target("fsdp_trainer_vs_hand_loop", time_ratio["median"], TIME_TARGET, "<=", "time per optimizer step"),
        Target("fsdp_rounds_sync_off", raw["rounds_sync_off"], 1, "<=", "gradient rounds per step, sync off"),
    ]
    mib = 1 / 2**20
    lines = [
        f"model: {raw['parameters'] / 1e6:.2f}M-parameter MLP, Adam, micro {raw['micro']} x K {raw['k']} x world "
        f"{raw['world_size']}, gloo CPU, {raw['rounds']} paired rounds",
        f"memory   FSDP {raw['bytes_fsdp']['total'] * mib:.1f} MiB vs DDP {raw['bytes_ddp']['total'] * mib:.1f} MiB "
        f"per rank: {memory:.3f}x (target <= {MEMORY_TARGET})",
        f"time     FSDPTrainer / hand FSDP2 loop: median {time_ratio['median']:.3f}x (IQR {time_ratio['q1']:.3f}-"
        f"{time_ratio['q3']:.3f}; ours {sorted(raw['ms_ours'])[len(raw['ms_ours']) // 2]:.1f} ms/step) "
        f"(target <= {TIME_TARGET})",
        f"rounds   per optimizer step: sync off {raw['rounds_sync_off']} (target 1), sync every micro-step "
        f"{raw['rounds_sync_every']} (K = {raw['k']})",
    ]
    return lines, targets


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sharded", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=30, help="paired timing rounds (default 30)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--output", metavar="FILE", help="also write the raw figures and targets here (JSON)")
    p.add_argument("--rank-side", metavar="RAW", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank_side:
        rank_main(args.rounds, args.warmup, args.rank_side)
        return 0
    raw_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"sharded-raw-{os.getpid()}.json"
    argv_ = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={WORLD}",
        "--master-addr=127.0.0.1", f"--master-port={free_port()}",
        "-m", "benchmarks.sharded", f"--rounds={args.rounds}", f"--warmup={args.warmup}", f"--rank-side={raw_path}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("GRADACCUM_PLAN", None)
    subprocess.run(argv_, check=True, env=env, cwd=REPO)
    raw = json.loads(raw_path.read_text())
    raw_path.unlink()
    lines, targets = summarize(raw)
    print("\n".join(lines))
    for t in targets:
        print(f"target {t.name}: {t.value:.4g} {t.op} {t.limit}: {'met' if t.passed else 'MISSED'}")
    if args.output:
        Path(args.output).write_text(json.dumps({"raw": raw, "targets": [t.to_dict() for t in targets]}, indent=1))
    return 0 if all(t.passed for t in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
