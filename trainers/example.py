"""The built-in example: a tiny GPT-style character model on text shipped with the package.

Sequences have different lengths and are padded per micro-batch, so the number of target
tokens differs between micro-batches and ranks: the case where averaging per-micro-batch
means goes wrong and `(loss_sum, count)` does not. `task()` is what `gradaccum verify`
and `make demo` run; `stream_task()` reads the same sequences as a stream (IterableDataset).
`mlp_task()` / `mlp_sum_task()` are smaller still, for tests.
Dropout is off by default: its random masks cannot match a single-device run.
"""

from __future__ import annotations

import math
import random
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trainers.task import Task

PAD = 0
IGNORE = -100
#: newline and printable ASCII; id 0 is padding
ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))
VOCAB_SIZE = len(ALPHABET) + 1
_IDS = {ch: i + 1 for i, ch in enumerate(ALPHABET)}


def load_text() -> str:
    """All the package's text files, in name order."""
    files = sorted((Path(__file__).parent / "data").glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no text files in {Path(__file__).parent / 'data'}: is the package installed whole?")
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files)


def encode(text: str) -> list[int]:
    return [_IDS.get(ch, _IDS[" "]) for ch in text]


def decode(ids: list[int]) -> str:
    return "".join(ALPHABET[i - 1] for i in ids if i != PAD)


def text_sequences(min_len: int = 12, max_len: int = 65, seed: int = 0, text: str | None = None) -> list[torch.Tensor]:
    """Cut the text into consecutive pieces of random lengths (inputs + 1 target each)."""
    ids = encode(load_text() if text is None else text)
    rng = random.Random(seed)
    out, pos = [], 0
    while pos + min_len <= len(ids):
        length = rng.randint(min_len, max_len)
        out.append(torch.tensor(ids[pos : pos + length], dtype=torch.long))
        pos += length
    return out


def pad_collate(items: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest item of this micro-batch: (inputs, targets), pads ignored.

    Right padding under causal attention: a real position never attends to a pad, so the
    padding of a micro-batch cannot change the outputs for its real tokens.
    """
    width = max(len(s) for s in items) - 1
    x = torch.full((len(items), width), PAD, dtype=torch.long)
    y = torch.full((len(items), width), IGNORE, dtype=torch.long)
    for i, seq in enumerate(items):
        x[i, : len(seq) - 1] = seq[:-1]
        y[i, : len(seq) - 1] = seq[1:]
    return x, y


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        # No bias: the key bias gets an exactly-zero gradient (softmax ignores a shift shared
        # by all keys), i.e. pure round-off, which Adam would then normalise into real steps.
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in self.qkv(x).split(c, dim=2))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, dropout)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class TinyGPT(nn.Module):
    """A few pre-norm transformer blocks; ~0.1M parameters with the defaults."""

    def __init__(
        self,
        vocab_size: int = VOCAB_SIZE,
        block_size: int = 128,
        n_layer: int = 2,
        n_head: int = 4,
        d_model: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(block_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        for name, p in self.named_parameters():
            if p.dim() > 1:
                # GPT-2 style: residual projections scaled down with depth
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence of {t} tokens is longer than the block size {self.block_size}")
        x = self.drop(self.tok(idx) + self.pos(torch.arange(t, device=idx.device)))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def token_loss_sum(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses, number of target tokens): exact under any split."""
    x, y = batch
    logits = model(x)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, (y != IGNORE).sum()


def token_loss_mean(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Token mean over one micro-batch: NOT exact when micro-batches differ in tokens."""
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE)


def count_targets(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    return int((batch[1] != IGNORE).sum())


def warmup(optimizer: torch.optim.Optimizer, steps: int = 4) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / steps))


def make_task(loss: str = "sum", with_count: bool = True, dropout: float = 0.0, seed: int = 0) -> Task:
    """The example LM with a choice of loss contract (see the module docstring)."""
    if loss not in ("sum", "mean"):
        raise ValueError(f"loss must be 'sum' or 'mean', got {loss!r}")
    return Task(
        partial(TinyGPT, dropout=dropout),
        text_sequences(seed=seed),
        token_loss_sum if loss == "sum" else token_loss_mean,
        # eps 1e-5, not 1e-8: Adam divides by sqrt(v), which turns the round-off of gradients
        # that are nearly zero into full-size steps; a split batch sums in another order, so
        # with eps 1e-8 the runs differ by ~5e-6 relative instead of ~1e-6 (measured).
        partial(torch.optim.AdamW, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01, eps=1e-5),
        pad_collate,
        count=count_targets if with_count else None,
        scheduler=warmup,
        clip_grad_norm=1.0,
        seed=seed,
        name=f"built-in example LM (token {loss}{' + Task.count' if with_count and loss == 'sum' else ''})",
    )


def task() -> Task:
    """The default of `gradaccum verify`: token loss as (sum, count), with Task.count."""
    return make_task("sum", with_count=True)


def task_without_count() -> Task:
    """(sum, count) loss, no Task.count: gradients are scaled after the backward passes."""
    return make_task("sum", with_count=False)


def task_scalar_mean() -> Task:
    """Per-micro-batch token mean: shows the mismatch that the (sum, count) contract fixes."""
    return make_task("mean", with_count=False)


def task_with_dropout() -> Task:
    return make_task("sum", with_count=True, dropout=0.1)


class SequenceStream(torch.utils.data.IterableDataset):
    """The example's sequences as a stream: no len(), no indexing, read front to back (as an
    HF `datasets` streaming dataset or shards on network storage would be)."""

    def __init__(self, sequences: list[torch.Tensor]) -> None:
        self.sequences = sequences

    def __iter__(self):
        yield from self.sequences


def stream_task() -> Task:
    """The example LM reading its sequences as an IterableDataset (see trainers/stream.py):
    step t trains on stream items [t*G, (t+1)*G) at every world size."""
    t = make_task("sum", with_count=True)
    t.dataset = SequenceStream(t.dataset)
    t.name = "built-in example LM, streamed (IterableDataset)"
    return t


# ----------------------------------------------------------------- a small MLP
def _regression_data(n: int, seed: int = 1234) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    w = torch.randn(8, 4, generator=g)
    y = torch.tanh(x @ w) + 0.1 * torch.randn(n, 4, generator=g)
    return list(zip(x, y, strict=True))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))


def mse_mean(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def mse_sum(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
    x, y = batch
    return F.mse_loss(model(x), y, reduction="sum"), y.numel()


def mlp_task(n: int = 96) -> Task:
    """A regression MLP with a scalar-mean loss (exact here: every micro-batch is full)."""
    sgd = partial(torch.optim.SGD, lr=0.05, momentum=0.9)
    return Task(_mlp, _regression_data(n), mse_mean, sgd, name="MLP regression (mean loss)")


def mlp_sum_task(n: int = 64) -> Task:
    """The MLP with a (sum, count) loss and a dataset that leaves a partial last batch."""
    sgd = partial(torch.optim.SGD, lr=0.05, momentum=0.9)
    return Task(_mlp, _regression_data(n), mse_sum, sgd, name="MLP regression (sum, count loss)")
