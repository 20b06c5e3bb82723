"""Hugging Face causal language models as a `Task`: the exact global token mean.

`causal_lm_task(model_factory, sequences, ...)` wraps any model whose
`forward(input_ids=..., attention_mask=...)` returns an object with `.logits` (every
`AutoModelForCausalLM`: `LlamaForCausalLM`, `GPT2LMHeadModel`, ...). Each micro-batch is
right-padded to its longest sequence with an attention mask; labels are the inputs shifted
by one, padding ignored. The loss is `(sum of token losses, number of target tokens)` and
`Task.count` gives that number without the model, so the trainers divide the whole optimizer
step's gradient by the global token count: the update is the single-device token mean at any
split into ranks and micro-steps (see docs/huggingface.md for how this relates to HF
Trainer's `num_items_in_batch`).

Nothing here imports `transformers`: the task only calls the model factory the user gives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from launcher.errors import UserError
from trainers.task import Task

#: label value cross_entropy skips (also HF's convention)
IGNORE_INDEX = -100


def _as_ids(seq: Any) -> torch.Tensor:
    t = seq if isinstance(seq, torch.Tensor) else torch.as_tensor(seq, dtype=torch.long)
    if t.dim() != 1:
        raise UserError(f"a sequence must be a flat list of token ids, got a tensor of shape {tuple(t.shape)}")
    return t.long()


def check_sequence(seq: Any, pad_token_id: int, index: int | None = None) -> torch.Tensor:
    """The sequence as a 1-D long tensor; a clear error when it is too short or holds the pad id."""
    t = _as_ids(seq)
    where = f"sequence {index}" if index is not None else "a sequence"
    if len(t) < 2:
        raise UserError(f"{where} has {len(t)} token(s); a causal LM needs at least 2 (an input and its target)")
    hits = (t == pad_token_id).nonzero()
    if len(hits):
        raise UserError(
            f"{where} contains the pad id {pad_token_id} as a real token (at position {int(hits[0])}): "
            "padding is recognised by its id, so that token would be silently ignored. Use a pad_token_id "
            "that never occurs in the data (e.g. a dedicated pad token, or the vocabulary size when the "
            "embedding has room for it)."
        )
    return t


class CausalLMCollate:
    """Right-pad a micro-batch: `(input_ids, attention_mask, labels)`.

    `labels[:, j]` is the target of position j, i.e. `input_ids[:, j + 1]`, IGNORE_INDEX
    where that is padding; it has one column less than the inputs. An empty micro-batch
    (possible in the last, partial global batch) gives 0-row tensors.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = int(pad_token_id)

    def __call__(self, items: list[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        seqs = [check_sequence(s, self.pad_token_id) for s in items]
        width = max((len(s) for s in seqs), default=2)
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
            mask[i, : len(s)] = 1
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)
        return ids, mask, labels


def count_targets(batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> int:
    """Non-pad target tokens of a collated micro-batch (what the loss sums over)."""
    return int((batch[2] != IGNORE_INDEX).sum())


def logits_of(output: Any) -> torch.Tensor:
    """`output.logits`, or a UserError naming what the model returned instead."""
    logits = getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        what = type(output).__name__
        if isinstance(output, dict):
            what += f" with keys {sorted(output)}"
        raise UserError(
            f"the model's forward(input_ids=..., attention_mask=...) returned {what}, which has no "
            "`.logits` tensor; causal_lm_task needs a causal LM (e.g. an AutoModelForCausalLM such as "
            "LlamaForCausalLM or GPT2LMHeadModel, not a base model like LlamaModel)."
        )
    return logits


def causal_lm_loss(model: Any, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of next-token losses over non-pad targets, their number)."""
    ids, mask, labels = batch
    if ids.shape[0] == 0:
        # an empty micro-batch still runs (weight zero) so every rank joins every collective
        ids, mask = ids.new_zeros((1, 2)), mask.new_zeros((1, 2))
        labels = labels.new_full((1, 1), IGNORE_INDEX)
    logits = logits_of(model(input_ids=ids, attention_mask=mask))[:, :-1]
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, int((labels != IGNORE_INDEX).sum())


def causal_lm_task(
    model_factory: Callable[[], Any],
    sequences: Sequence[Any] | Iterable[Any],
    *,
    optimizer: Callable[[Iterable[Any]], Any],
    pad_token_id: int,
    scheduler: Callable[[Any], Any] | None = None,
    clip_grad_norm: float | None = None,
    seed: int = 0,
    name: str = "",
) -> Task:
    """A `Task` training a causal LM on token-id sequences with the exact global token mean.

    `sequences`: a list of token-id lists (or 1-D tensors) of varying length, each at least
    2 tokens, or a `torch.utils.data.IterableDataset` of them (a stream; each item is then
    checked as it is collated). A list is checked here, up front: a pad id that occurs
    inside a sequence would be taken for padding and silently dropped, so it is an error.
    """
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
        raise UserError(f"pad_token_id must be an int token id, got {pad_token_id!r}")
    if not callable(model_factory):
        raise UserError(f"model_factory must be callable (e.g. lambda: LlamaForCausalLM(config)), got {model_factory!r}")
    if isinstance(sequences, torch.utils.data.IterableDataset):
        dataset: Any = sequences
    elif isinstance(sequences, Sequence) and not isinstance(sequences, str | bytes):
        if len(sequences) == 0:
            raise UserError("causal_lm_task got no sequences; give at least one token-id list")
        dataset = [check_sequence(s, pad_token_id, i) for i, s in enumerate(sequences)]
    else:
        raise UserError(
            f"sequences must be a list of token-id lists or a torch.utils.data.IterableDataset, "
            f"got {type(sequences).__name__}"
        )
    return Task(
        model_factory,
        dataset,
        causal_lm_loss,
        optimizer,
        CausalLMCollate(pad_token_id),
        count=count_targets,
        scheduler=scheduler,
        clip_grad_norm=clip_grad_norm,
        seed=seed,
        name=name or "Hugging Face causal LM (token sum, count)",
    )
