"""Hugging Face causal LMs (trainers.hf): padding, labels, counts, errors, and verify at world 2.

Needs the `[hf]` extra (transformers); these tests fail, not skip, when it is missing.
"""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from launcher.errors import UserError
from tests.conftest import run_cli
from trainers.hf import IGNORE_INDEX, CausalLMCollate, causal_lm_loss, causal_lm_task, count_targets
from trainers.hf_example import tiny_gpt2, tiny_llama

PAD = 0


def test_collate_right_pads_masks_and_shifts_labels():
    ids, mask, labels = CausalLMCollate(PAD)([[5, 6, 7, 8], [9, 10], torch.tensor([3, 4, 2])])
    assert ids.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0], [3, 4, 2, 0]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
    i = IGNORE_INDEX
    assert labels.tolist() == [[6, 7, 8], [10, i, i], [4, 2, i]]
    assert count_targets((ids, mask, labels)) == 3 + 1 + 2


def test_loss_is_sum_over_non_pad_targets_and_padding_does_not_change_it():
    torch.manual_seed(0)
    model = tiny_llama().eval()
    seqs = [[5, 6, 7, 8, 9], [9, 10, 11]]
    collate = CausalLMCollate(PAD)
    loss, count = causal_lm_loss(model, collate(seqs))
    assert count == 4 + 2
    # the same sum, one sequence at a time with no padding at all
    total = 0.0
    with torch.no_grad():
        loss = float(loss)
        for s in seqs:
            x = torch.tensor([s])
            logits = model(input_ids=x).logits[0, :-1]
            total += float(F.cross_entropy(logits, x[0, 1:], reduction="sum"))
    assert loss == pytest.approx(total, rel=1e-5)


def test_task_fields_and_exact_token_mean_over_any_split():
    """Summing (loss_sum, count) over micro-batches and dividing once = the whole-batch mean."""
    torch.manual_seed(0)
    seqs = [list(range(1, n + 1)) for n in (3, 9, 5, 2, 7, 4)]
    task = causal_lm_task(tiny_gpt2, seqs, optimizer=partial(torch.optim.SGD, lr=0.1), pad_token_id=PAD, seed=3)
    assert task.count is count_targets and task.seed == 3 and task.clip_grad_norm is None
    model = task.model().eval()
    with torch.no_grad():
        whole_sum, whole_n = task.loss(model, task.collate(task.dataset))
        parts = [task.loss(model, task.collate(task.dataset[a:b])) for a, b in ((0, 1), (1, 4), (4, 6))]
    assert whole_n == sum(n for _, n in parts) == sum(count_targets(task.collate([s])) for s in task.dataset)
    assert float(sum(s for s, _ in parts)) / whole_n == pytest.approx(float(whole_sum) / whole_n, rel=1e-5)


def test_pad_id_inside_a_sequence_is_a_clear_error():
    with pytest.raises(UserError, match=r"sequence 1 contains the pad id 0 as a real token \(at position 2\)"):
        causal_lm_task(tiny_gpt2, [[1, 2, 3], [4, 5, 0, 6]], optimizer=torch.optim.SGD, pad_token_id=0)
    # in a stream the check happens when the item is collated
    with pytest.raises(UserError, match="contains the pad id 7"):
        CausalLMCollate(7)([[1, 7, 2]])


def test_bad_inputs():
    with pytest.raises(UserError, match="at least 2"):
        causal_lm_task(tiny_gpt2, [[1]], optimizer=torch.optim.SGD, pad_token_id=0)
    with pytest.raises(UserError, match="pad_token_id must be an int"):
        causal_lm_task(tiny_gpt2, [[1, 2]], optimizer=torch.optim.SGD, pad_token_id=None)
    with pytest.raises(UserError, match="no sequences"):
        causal_lm_task(tiny_gpt2, [], optimizer=torch.optim.SGD, pad_token_id=0)
    with pytest.raises(UserError, match="IterableDataset, got generator"):
        causal_lm_task(tiny_gpt2, (s for s in [[1, 2]]), optimizer=torch.optim.SGD, pad_token_id=0)


def test_model_without_logits_names_what_it_returned():
    class Base(nn.Module):  # like LlamaModel: hidden states, no LM head
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(16, 4)

        def forward(self, input_ids, attention_mask):
            return {"last_hidden_state": self.emb(input_ids)}

    batch = CausalLMCollate(PAD)([[1, 2, 3]])
    with pytest.raises(UserError, match=r"returned dict with keys \['last_hidden_state'\], which has no `.logits`"):
        causal_lm_loss(Base(), batch)


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("task", ["llama_task", "gpt2_task"])
def test_verify_tiny_hf_model_at_world_2(tmp_path, task):
    result = run_cli(
        "verify", "--task", f"trainers.hf_example:{task}", "--json", "--output-dir", str(tmp_path), timeout=380
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] is True and report["world_sizes"] == [2]
    assert report["plan"]["gradient_accumulation_steps"] > 1
    assert report["max_rel_diff"] <= 1e-5
    assert len({s["count"] for s in report["steps"]}) > 1  # padded, variable-length: counts differ
    assert report["steps"][-1]["reference_loss"] < report["steps"][0]["reference_loss"]
