"""Model loading: the embedded default, its cache, tiny models, scalar heads."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tether.config import EMBEDDED_MODEL, ConfigError
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


# ------------------------------------------------------------------------------------------------
# --attn_implementation, --trust_remote_code, --load_in_4bit (ModelLoadingArguments)

REMOTE_CODE = """
from transformers import LlamaForCausalLM, LlamaForSequenceClassification


class MarkedLlamaForCausalLM(LlamaForCausalLM):
    loaded_from_remote_code = True


class MarkedLlamaForSequenceClassification(LlamaForSequenceClassification):
    loaded_from_remote_code = True
"""


def test_trust_remote_code_loads_the_model_class_shipped_in_the_folder(tiny_model_dir, tmp_path):
    import json
    import shutil

    from tether.config import ModelLoadingArguments

    folder = tmp_path / "remote-code-model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "marked_llama.py").write_text(REMOTE_CODE)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {
        "AutoModelForCausalLM": "marked_llama.MarkedLlamaForCausalLM",
        "AutoModelForSequenceClassification": "marked_llama.MarkedLlamaForSequenceClassification",
    }
    (folder / "config.json").write_text(json.dumps(config))

    trusted = loading.from_pretrained_kwargs(ModelLoadingArguments(trust_remote_code=True))
    assert trusted == {"trust_remote_code": True}
    assert type(loading.load_causal_lm(str(folder))).__name__ == "LlamaForCausalLM"  # the folder's code never runs
    assert loading.load_causal_lm(str(folder), **trusted).loaded_from_remote_code
    assert loading.load_scalar_model(str(folder), **trusted).loaded_from_remote_code
    assert loading.load_tokenizer(str(folder), trust_remote_code=True).eos_token == "<|im_end|>"


def test_ppo_loads_all_its_networks_with_trust_remote_code_and_attn_implementation(
    tiny_model_dir, tiny_rm_dir, tmp_path
):
    import json
    import shutil

    from tether.ppo import PPOConfig, PPOTrainer

    folders = {}
    for name, source, auto in (
        ("policy", tiny_model_dir, "AutoModelForCausalLM"),
        ("rm", tiny_rm_dir, "AutoModelForSequenceClassification"),
    ):
        folder = folders[name] = tmp_path / name
        shutil.copytree(source, folder)
        (folder / "marked_llama.py").write_text(REMOTE_CODE)
        config = json.loads((folder / "config.json").read_text())
        config["auto_map"] = {auto: f"marked_llama.Marked{config['architectures'][0]}"}
        (folder / "config.json").write_text(json.dumps(config))
    config = PPOConfig(
        model_name_or_path=str(folders["policy"]),
        reward_model_path=str(folders["rm"]),
        output_dir=str(tmp_path / "ppo"),
        trust_remote_code=True,
        attn_implementation="eager",
        batch_size=2,
        num_iterations=1,
        use_cpu=True,
        report_to="none",
        reward_norm_samples=0,
    )
    models = PPOTrainer(config, ["a b", "c d"]).models
    networks = {
        "policy": models.policy_and_value.policy,
        "reference": models.reference,
        "reward model": models.reward_model,
        "value model": models.policy_and_value.value_model,
    }
    for name, network in networks.items():
        assert getattr(network, "loaded_from_remote_code", False), name
        assert network.config._attn_implementation == "eager", name
    with pytest.raises(ConfigError, match="--load_in_4bit is not supported by `tether ppo`"):
        PPOConfig(model_name_or_path=str(folders["policy"]), output_dir=str(tmp_path / "q"), load_in_4bit=True)


def test_default_loading_arguments_pass_nothing_to_from_pretrained():
    from tether.config import ModelLoadingArguments

    assert loading.from_pretrained_kwargs(ModelLoadingArguments()) == {}
    assert loading.from_pretrained_kwargs(ModelLoadingArguments(attn_implementation="eager")) == {
        "attn_implementation": "eager"
    }


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed here")
def test_load_in_4bit_without_bitsandbytes_is_a_clear_error_naming_the_option(tiny_model_dir, tmp_path, capsys):
    import json

    from tether.cli import main
    from tether.config import ConfigError
    from tether.stages.sft import SFTConfig

    with pytest.raises(ConfigError, match=r"--load_in_4bit needs the bitsandbytes package.*pip install bitsandbytes"):
        loading.from_pretrained_kwargs(SFTConfig(output_dir=str(tmp_path / "x"), load_in_4bit=True, use_peft=True))
    data = tmp_path / "demos.jsonl"
    data.write_text(json.dumps({"prompt": "2+2?", "completion": "4"}) + "\n")
    out = tmp_path / "out"
    common = ["--model_name_or_path", str(tiny_model_dir), "--dataset", str(data), "--output_dir", str(out)]
    for stage in ("sft", "dpo", "rm"):
        code = main([stage, *common, "--use_cpu", "true", "--report_to", "none", "--load_in_4bit", "true"])
        assert code == 2 and "--load_in_4bit trains LoRA adapters" in capsys.readouterr().err  # QLoRA needs LoRA
    code = main(
        ["sft", *common, "--use_cpu", "true", "--report_to", "none", "--load_in_4bit", "true", "--use_peft", "true"]
        + ["--eval_split_ratio", "0"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--load_in_4bit needs the bitsandbytes package" in err and "pip install bitsandbytes" in err
    assert not out.exists()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_every_stage_loads_with_attn_implementation_and_its_4d_masks_hold(tiny_model_dir, tokenizer, tmp_path, attn):
    from tether.data.records import Demonstration, PreferencePair
    from tether.data.templates import Truncation
    from tether.evaluation.evaluate import EvalConfig, _Models
    from tether.models.packing import Layout
    from tether.serve.app import ServeConfig, load_models
    from tether.stages.dpo import DPOConfig, TokenizedPair, _load_policy, check_fast_paths
    from tether.stages.reward import RewardConfig, choose_reward_layout, load_reward_backbone, tokenize_preferences
    from tether.stages.sft import SFTCollator, SFTConfig, load_policy_for_training, packed_rows, tokenize_demonstrations

    limits = Truncation(max_length=512, max_prompt_length=256)
    common = dict(model_name_or_path=str(tiny_model_dir), attn_implementation=attn, use_cpu=True, report_to="none")
    # SFT packing: position ids restart per example; packed and unpacked losses agree
    sft = load_policy_for_training(SFTConfig(output_dir=str(tmp_path / "sft"), **common)).eval()
    assert sft.config._attn_implementation == attn
    demos = [Demonstration("alpha beta", "gamma delta"), Demonstration("river", "stone cloud light")]
    examples = tokenize_demonstrations(tokenizer, demos, limits).examples
    collate = SFTCollator(tokenizer.pad_token_id)
    with torch.no_grad():
        packed, unpacked = sft(**collate(packed_rows(examples, 512))).loss, sft(**collate(examples)).loss
    assert packed.item() == pytest.approx(unpacked.item(), abs=1e-5)
    # DPO and RM shared-prompt rows: the 4-D masks give the separate sequences' numbers
    dpo = _load_policy(DPOConfig(output_dir=str(tmp_path / "dpo"), **common))
    assert dpo.config._attn_implementation == attn
    pair = TokenizedPair(prompt=[10, 11, 12, 13], chosen=[20, 21, 2], rejected=[30, 31, 32, 33, 2])
    fastest = Layout(share_prompt=True, padding_free=True)
    assert check_fast_paths(dpo, [pair, pair], pad_id=2) == (fastest, True)
    rm, rm_tokenizer, pad = load_reward_backbone(RewardConfig(output_dir=str(tmp_path / "rm"), **common), tmp_path)
    assert rm.config._attn_implementation == attn
    pairs = tokenize_preferences(rm_tokenizer, [PreferencePair("alpha beta", "gamma", "delta river")], limits).pairs
    assert choose_reward_layout(rm.eval(), pairs, pad) == fastest
    # the inference stages
    served = load_models(ServeConfig(model_name_or_path=str(tiny_model_dir), attn_implementation=attn, use_cpu=True))
    assert served["policy"].config._attn_implementation == attn
    evaluated = _Models(None, loading.from_pretrained_kwargs(EvalConfig(attn_implementation=attn)))
    assert evaluated.causal_lm(str(tiny_model_dir)).config._attn_implementation == attn


def test_dtype_auto_is_bfloat16_on_a_bf16_gpu_and_float32_elsewhere():
    from tether.models.loading import resolve_dtype

    gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert resolve_dtype("auto") == (torch.bfloat16 if gpu_bf16 else torch.float32)
    assert resolve_dtype("float32") == torch.float32 and resolve_dtype("bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="float16 or auto"):
        resolve_dtype("int8")


def test_ppo_refuses_load_in_4bit_instead_of_ignoring_it(tmp_path):
    from tether.config import ConfigError
    from tether.ppo import PPOConfig

    with pytest.raises(ConfigError, match=r"--load_in_4bit is not supported by `tether ppo`"):
        PPOConfig(output_dir=str(tmp_path / "ppo"), reward_model_path="rm", dataset="p.jsonl", load_in_4bit=True)
