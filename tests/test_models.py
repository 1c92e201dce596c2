"""Model loading: the embedded default, its cache, tiny models, scalar heads."""

from __future__ import annotations

import pytest
import torch

from tether.config import EMBEDDED_MODEL
from tether.models import loading


@pytest.mark.slow
def test_embedded_default_generates_offline_for_a_chat_prompt(embedded_model_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = loading.load_causal_lm(None)
    tok = loading.load_tokenizer(None, padding_side="left")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    batch = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text


def test_embedded_default_resolves_to_the_cached_safetensors_copy(embedded_model_dir):
    # The cache is used: the default resolves to the converted folder (with its marker), which holds
    # plain safetensors weights and no GGUF quantization config.
    path = loading.resolve_model_path(None)
    assert path == str(embedded_model_dir) == loading.resolve_model_path(EMBEDDED_MODEL)
    assert loading.is_cached_embedded(embedded_model_dir)
    assert (embedded_model_dir / "model.safetensors").is_file()
    import json

    config = json.loads((embedded_model_dir / "config.json").read_text())
    assert "quantization_config" not in config


def test_conversion_is_not_redone_when_cached(embedded_model_dir, monkeypatch):
    def fail(*a, **k):
        raise AssertionError("GGUF conversion ran although the cache exists")

    monkeypatch.setattr(loading, "embedded_gguf_folder", fail)
    assert loading.ensure_embedded_model() == embedded_model_dir


def test_local_folders_and_hub_ids_pass_through(tiny_model_dir, tmp_path):
    assert loading.resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir)
    assert loading.resolve_model_path("HuggingFaceTB/SmolLM2-360M") == "HuggingFaceTB/SmolLM2-360M"
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="expected a folder"):
        loading.resolve_model_path(str(f))


def test_tiny_models_share_the_default_tokenizer(tiny_model_dir, tiny_rm_dir, tokenizer):
    lm = loading.load_causal_lm(str(tiny_model_dir))
    assert lm.config.vocab_size == len(tokenizer) and lm.config.num_hidden_layers == 2
    rm = loading.load_scalar_model(str(tiny_rm_dir))
    assert rm.config.num_labels == 1


def test_scalar_model_from_a_causal_lm_gets_a_fresh_head_with_the_reference_init(tiny_model_dir):
    torch.manual_seed(0)
    rm = loading.load_scalar_model(str(tiny_model_dir))
    head = loading.scalar_head(rm)
    assert head.out_features == 1
    # N(0, 1/sqrt(d+1)): with d=32 the sample std of 32 weights is near 0.174
    assert 0.08 < head.weight.std().item() < 0.3
    assert head.bias is None or torch.all(head.bias == 0)
    # the backbone is the causal LM's
    lm = loading.load_causal_lm(str(tiny_model_dir))
    assert torch.equal(rm.model.embed_tokens.weight, lm.model.embed_tokens.weight)


def test_disable_dropout_zeroes_every_dropout():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.3))
    loading.disable_dropout(model)
    assert model[1].p == 0.0


def test_disable_dropout_zeroes_the_functional_attention_dropout_of_llama(tiny_model_dir):
    # LlamaAttention keeps config.attention_dropout as a float and applies it in train mode.
    model = loading.load_causal_lm(str(tiny_model_dir))
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    loading.disable_dropout(model)
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in model.model.layers)
    model.train()
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.manual_seed(0)
    a = model(ids).logits
    torch.manual_seed(1)
    b = model(ids).logits
    assert torch.equal(a, b)


def test_dtype_auto_is_bfloat16_on_a_bf16_gpu_and_float32_elsewhere():
    from tether.models.loading import resolve_dtype

    gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert resolve_dtype("auto") == (torch.bfloat16 if gpu_bf16 else torch.float32)
    assert resolve_dtype("float32") == torch.float32 and resolve_dtype("bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="float16 or auto"):
        resolve_dtype("int8")
