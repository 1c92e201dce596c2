"""Tiny real components for the PPO tests: a word-level tokenizer, a tiny policy, and a reward
model whose weights are set by hand so that its score is a known function of the text.

The tokenizer pads with its stop token (like SmolLM2), so every test also exercises the
"masks from lengths, never from token == pad" rule.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = [
    "a",
    "b",
    "c",
    "d",
    "e",
    "f",
    "g",
    "h",
    "i",
    "j",
    "k",
    "l",
    "m",
    "n",
    "o",
    "p",
    "q",
    "r",
    "s",
    "t",
    "u",
    "v",
    "w",
    "x",
    "y",
    "z",
    "yes",
    "no",
    "good",
]
SPECIAL = ["<unk>", "<bos>", "<eos>"]
VOCAB = SPECIAL + WORDS  # 32 tokens
GOOD = "good"


def make_word_tokenizer(folder: Path):
    """A whitespace word-level tokenizer over VOCAB, saved as a normal HF tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>", pad_token="<eos>"
    )
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(folder)
    return tok


def tiny_config(tok, **overrides):
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def make_policy(folder: Path, tok, seed: int = 0, **overrides) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(tok, **overrides))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_random_rm(folder: Path, tok, seed: int = 1, **overrides) -> Path:
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(tiny_config(tok, num_labels=1, **overrides))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@torch.no_grad()
def make_counting_rm(folder: Path, tok, target: str = GOOD, seed: int = 2) -> Path:
    """A one-layer reward model that scores the share of ``target`` tokens in prompt + response.

    Weights by hand: queries and keys are zero, so attention is uniform over the real tokens so far;
    the value/output projections copy coordinate 0 of the normalised embeddings, which is non-zero
    for ``target`` only; the MLP is off; the head reads coordinate 0 after the final norm. At the
    stop token (embedding 0 on coordinate 0, fixed norm elsewhere) the score is then an increasing
    function of the share of ``target`` tokens (0 when there is none).
    """
    from transformers import LlamaForSequenceClassification

    d = 16
    config = tiny_config(
        tok,
        num_labels=1,
        hidden_size=d,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    model = LlamaForSequenceClassification(config)
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(len(VOCAB), d, generator=g)
    emb[:, 0] = 0.0
    emb[:, 1:] *= (d - 1) ** 0.5 / emb[:, 1:].norm(dim=1, keepdim=True)  # same norm for every token
    emb[tok.convert_tokens_to_ids(target), 0] = 4.0
    model.model.embed_tokens.weight.copy_(emb)
    layer = model.model.layers[0]
    for proj in (
        layer.self_attn.q_proj,
        layer.self_attn.k_proj,
        layer.self_attn.v_proj,
        layer.self_attn.o_proj,
        layer.mlp.down_proj,
    ):
        proj.weight.zero_()
    layer.self_attn.v_proj.weight[0, 0] = 1.0
    layer.self_attn.o_proj.weight[0, 0] = 4.0
    model.score.weight.zero_()
    model.score.weight[0, 0] = 1.0
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# ---- fixtures (imported by the PPO test modules) -----------------------------------------------
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run far faster on one thread; on a shared 2-core machine extra threads only spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def word_dirs(tmp_path_factory):
    """Folders: word tokenizer, tiny policy, random RM, counting RM (all sharing the 32-word vocabulary)."""
    root = tmp_path_factory.mktemp("ppo-tiny")
    tok = make_word_tokenizer(root / "tokenizer")
    return {
        "root": root,
        "tokenizer": root / "tokenizer",
        "policy": make_policy(root / "policy", tok),
        "rm": make_random_rm(root / "rm", tok),
        "counting_rm": make_counting_rm(root / "counting-rm", tok),
    }


@pytest.fixture(scope="session")
def word_tok(word_dirs):
    from tether.models.loading import load_tokenizer

    return load_tokenizer(str(word_dirs["tokenizer"]))
