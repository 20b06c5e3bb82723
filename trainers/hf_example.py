"""Tiny Hugging Face causal LMs trained from scratch on the text shipped with the package.

`llama_task()` (LlamaForCausalLM) and `gpt2_task()` (GPT2LMHeadModel) build small
configurations locally (no downloads) and tokenize the package's text by character,
as the built-in example does (trainers/example.py), so sequences have varying lengths
and micro-batches differ in target tokens. Id 0 is kept for padding and never occurs in
the text. Runnable as `gradaccum verify --task trainers.hf_example:llama_task`.
Needs the `[hf]` extra (`pip install 'gradaccum[hf]'`).
"""

from __future__ import annotations

from functools import partial

import torch

from launcher.errors import UserError
from trainers.example import PAD, VOCAB_SIZE, text_sequences, warmup
from trainers.hf import causal_lm_task
from trainers.task import Task


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UserError(
            "this example needs Hugging Face transformers: pip install 'gradaccum[hf]' (or pip install transformers)"
        ) from None
    return transformers


def tiny_llama() -> torch.nn.Module:
    """A 2-layer Llama with a character vocabulary; dropout off (a single device cannot match it)."""
    tf = _transformers()
    config = tf.LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=PAD,
        bos_token_id=None,
        eos_token_id=None,
        attention_dropout=0.0,
        tie_word_embeddings=False,
    )
    return tf.LlamaForCausalLM(config)


def tiny_gpt2() -> torch.nn.Module:
    """A 2-layer GPT-2 with a character vocabulary and every dropout off."""
    tf = _transformers()
    config = tf.GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=128,
        n_embd=64,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        pad_token_id=PAD,
        bos_token_id=None,
        eos_token_id=None,
    )
    return tf.GPT2LMHeadModel(config)


def _optimizer():
    # eps 1e-5 for the reason given in trainers/example.py (round-off of near-zero gradients)
    return partial(torch.optim.AdamW, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01, eps=1e-5)


def _task(factory, name: str, seed: int) -> Task:
    _transformers()  # fail here, with the install hint, rather than in a worker process
    return causal_lm_task(
        factory,
        text_sequences(seed=seed),
        optimizer=_optimizer(),
        pad_token_id=PAD,
        scheduler=warmup,
        clip_grad_norm=1.0,
        seed=seed,
        name=name,
    )


def llama_task(seed: int = 0) -> Task:
    return _task(tiny_llama, "tiny Llama (Hugging Face), token sum + count", seed)


def gpt2_task(seed: int = 0) -> Task:
    return _task(tiny_gpt2, "tiny GPT-2 (Hugging Face), token sum + count", seed)
