"""bf16 gradient accumulation: K roundings (bf16 `p.grad`) against one (fp32 accumulator).

    python -m benchmarks.bf16_accumulation [--ks 1,8,32] [--reps 3]

A model with bf16 parameters (the built-in example LM, and a wider one) computes each
micro-step's gradient on its own; the K gradients are then summed three ways and compared
with their exact (fp64) sum, as a relative L2 error:

  bf16 sum          what autograd does with bf16 parameters: p.grad += g, rounded at each add
  fp32 accumulator  trainers.precision.Fp32GradAccumulator: fp32 sum, rounded once to bf16
  fp32 (no cast)    the accumulator's fp32 sum itself

Each row is the median over `--reps` disjoint sets of micro-batches. Only the summation
differs between the columns (the micro-step gradients are the same tensors), so the
table isolates the round-off of accumulation from that of the bf16 forward/backward.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from trainers.example import TinyGPT, pad_collate, text_sequences, token_loss_sum
from trainers.precision import accumulation_roundoff, micro_step_gradients

MODELS = {
    "example LM (d=64, 2 layers)": {},
    "wider LM (d=256, 4 layers)": {"d_model": 256, "n_layer": 4, "n_head": 8},
}
COLUMNS = ("bf16_sum", "fp32_accumulator", "fp32_before_cast")


def measure(ks: list[int], reps: int, micro_batch_size: int = 2) -> list[dict[str, object]]:
    seqs = text_sequences()
    rows = []
    for name, kwargs in MODELS.items():
        torch.manual_seed(0)
        model = TinyGPT(**kwargs).to(torch.bfloat16)
        for k in ks:
            runs = []
            for rep in range(reps):
                start = rep * k * micro_batch_size
                if start + k * micro_batch_size > len(seqs):
                    break
                batches = [
                    pad_collate(seqs[start + i * micro_batch_size : start + (i + 1) * micro_batch_size])
                    for i in range(k)
                ]
                runs.append(accumulation_roundoff(micro_step_gradients(model, batches, token_loss_sum)))
            row: dict[str, object] = {"model": name, "micro_steps": k, "reps": len(runs)}
            row.update({c: statistics.median(float(r[c]) for r in runs) for c in COLUMNS})
            rows.append(row)
    return rows


def table(rows: list[dict[str, object]]) -> str:
    lines = [
        "| model | K | bf16 sum | fp32 accumulator | fp32 (no cast) | bf16 sum / accumulator |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{r['bf16_sum'] / r['fp32_accumulator']:.1f}x" if r["fp32_accumulator"] else "1x (exact)"
        lines.append(
            f"| {r['model']} | {r['micro_steps']} | {r['bf16_sum']:.2e} | {r['fp32_accumulator']:.2e} | "
            f"{r['fp32_before_cast']:.1e} | {ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bf16_accumulation", description=__doc__.splitlines()[0])
    p.add_argument("--ks", default="1,8,32", help="micro-steps per optimizer step (default 1,8,32)")
    p.add_argument("--reps", type=int, default=3, help="disjoint micro-batch sets per row (default 3)")
    args = p.parse_args(argv)
    try:
        ks = [int(k) for k in args.ks.split(",")]
    except ValueError:
        p.error(f"--ks must be comma-separated integers, got {args.ks!r}")
    if any(k < 1 for k in ks) or args.reps < 1:
        p.error("--ks and --reps must be positive")
    print("relative L2 error of the summed gradient against the exact (fp64) sum of the same micro-step gradients")
    print(table(measure(ks, args.reps)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
