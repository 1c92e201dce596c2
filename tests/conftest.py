"""Shared fixtures: tiny random models with the default model's tokenizer, built once per session.

Most tests run on these (2 layers, width 32: a forward pass takes milliseconds); the few tests
that load the real SmolLM2-135M-Instruct are marked ``slow``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may touch a hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that spin while waiting make oversubscribed runs (pytest-xdist workers, test
# subprocesses) up to 10x slower on 2 cores; passive waiting costs nothing when cores are free.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402  (after the environment above)

_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))


def tiny_llama_config(vocab_size: int, pad_token_id: int, eos_token_id: int, bos_token_id: int, **overrides):
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=bos_token_id,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """The cached safetensors copy of SmolLM2-135M-Instruct (converted from the GGUF on first use)."""
    from tether.models.loading import ensure_embedded_model

    return ensure_embedded_model()


@pytest.fixture(scope="session")
def tokenizer(embedded_model_dir):
    from tether.models.loading import load_tokenizer

    return load_tokenizer(str(embedded_model_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A random 2-layer Llama causal LM with SmolLM2's tokenizer, saved as a normal HF folder."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    folder = tmp_path_factory.mktemp("tiny-causal-lm")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_rm_dir(tmp_path_factory, tokenizer) -> Path:
    """A random 2-layer Llama sequence-classification model with one label (a reward model)."""
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(1)
    config = tiny_llama_config(
        len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, num_labels=1
    )
    model = LlamaForSequenceClassification(config)
    folder = tmp_path_factory.mktemp("tiny-reward-model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def annotator():
    """The demo task's simulated annotator (all-MiniLM-L6-v2 embeddings; loads in a few seconds, once)."""
    from tether.demo.annotator import default_annotator

    return default_annotator()
