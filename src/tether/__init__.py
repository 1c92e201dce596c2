"""tether: the classic RLHF pipeline (SFT -> reward model -> PPO with a KL tether, DPO, best-of-N)
on any Hugging Face causal language model.

The Python API is importable from here (``from tether import SFTConfig, train_sft``); each name is
imported from its module on first use, so ``import tether`` loads neither torch nor transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> module that defines it
_EXPORTS = {
    "ConfigError": "tether.config",
    "DataError": "tether.data.errors",
    "load_demonstrations": "tether.data.loading",
    "load_preferences": "tether.data.loading",
    "load_prompts": "tether.data.loading",
    "SFTConfig": "tether.stages.sft",
    "run_sft": "tether.stages.sft",
    "train_sft": "tether.stages.sft",
    "RewardConfig": "tether.stages.reward",
    "run_reward": "tether.stages.reward",
    "train_reward": "tether.stages.reward",
    "DPOConfig": "tether.stages.dpo",
    "run_dpo": "tether.stages.dpo",
    "train_dpo": "tether.stages.dpo",
    "PPOConfig": "tether.ppo",
    "PPOTrainer": "tether.ppo",
    "run_ppo": "tether.ppo",
    "BestOfNConfig": "tether.stages.best_of_n",
    "run_best_of_n": "tether.stages.best_of_n",
    "EvalConfig": "tether.evaluation.evaluate",
    "run_eval": "tether.evaluation.evaluate",
    "evaluate_policies": "tether.evaluation.evaluate",
    "ServeConfig": "tether.serve.app",
    "create_app": "tether.serve.app",
    "PipelineConfig": "tether.pipeline",
    "run_pipeline": "tether.pipeline",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tether' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
