"""Reward functions (``--reward_funcs``) and how they combine with reward models into one score.

A reward function is any Python callable, named by ``module.path:function`` or
``path/to/file.py:function``, called once per batch as TRL calls it:

    fn(prompts=[...], completions=[...], **columns) -> list[float | int | bool | None]

where ``columns`` are the prompt dataset's other columns (one value per completion), so a function
that does not use them should take ``**kwargs``. ``None`` means "this function does not apply to
this example"; booleans count as 1.0 / 0.0 (a correctness check may return ``c == answer``);
NaN and ±inf are refused.

Combination (``--reward_weights``, one weight per component, **reward models first** in
``--reward_model_path`` order, then the functions in ``--reward_funcs`` order; TRL's rule that a
reward model counts as one reward function):

    total = W·E + Σ_f w_f·r_f,      W = Σ_m w_m over the reward models

    E = Σ_m w_m·s_m / W      --reward_ensemble mean: so W·E = Σ_m w_m·s_m, exactly TRL's weighted sum
    E = min_m s_m            --reward_ensemble min: the worst-case ensemble (Coste et al. 2023)

With one reward model both are ``w·s``; weights 1/M give the plain mean or min of M models.
A ``None`` component is **skipped** (it adds nothing, and a missing reward model drops out of W and
the min), as TRL's ``nansum``; the total is ``None`` only when every component is ``None`` for that
example, and the advantage estimators then leave the response out (advantage 0) instead of
treating it as reward 0.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import numbers
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tether.config import ConfigError

REWARD_ENSEMBLES = ("mean", "min")

RewardFunction = Callable[..., Sequence]


class RewardFunctionError(ValueError):
    """A reward function raised, or returned something that is not one finite number (or None) per completion."""


# ---- loading ------------------------------------------------------------------------------------
def load_reward_function(spec: str) -> RewardFunction:
    """The callable named by ``module.path:function`` or ``path/to/file.py:function``.

    A file is imported under a private module name (registered in ``sys.modules``, so dataclasses and
    pickling inside it work); a module is imported from ``sys.path``. Anything missing or not
    callable is a :class:`~tether.config.ConfigError` naming ``--reward_funcs`` and the spec.
    """
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ConfigError(f"--reward_funcs {spec!r}: expected module.path:function or path/to/file.py:function")
    if where.endswith(".py") or "/" in where or "\\" in where:
        module = _import_file(spec, Path(where))
    else:
        module = _import_module(spec, where)
    if not hasattr(module, name):
        defined = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise ConfigError(
            f"--reward_funcs {spec!r}: {where} has no {name!r} (its callables: {', '.join(defined) or 'none'})"
        )
    fn = getattr(module, name)
    if not callable(fn):
        raise ConfigError(f"--reward_funcs {spec!r}: {where}:{name} is a {type(fn).__name__}, not a function")
    return fn


def _import_file(spec: str, path: Path):
    if not path.is_file():
        raise ConfigError(f"--reward_funcs {spec!r}: no such file {path}")
    # the same name on every process and run (str hashes are salted per process)
    module_name = f"tether_reward_funcs_{path.stem}_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise ConfigError(f"--reward_funcs {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from e
    return module


def _import_module(spec: str, module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ConfigError(
                f"--reward_funcs {spec!r}: no module named {e.name!r} (give module.path:function importable "
                "from the current directory or the environment, or path/to/file.py:function)"
            ) from e
        raise ConfigError(f"--reward_funcs {spec!r}: importing {module_name} failed: {e}") from e
    except Exception as e:
        raise ConfigError(f"--reward_funcs {spec!r}: importing {module_name} failed: {type(e).__name__}: {e}") from e


def load_reward_functions(specs: Sequence[str]) -> dict[str, RewardFunction]:
    """Every ``--reward_funcs`` spec loaded, keyed by its function name (the name its metrics carry)."""
    functions: dict[str, RewardFunction] = {}
    for spec in specs:
        name = spec.rpartition(":")[2]
        if name in functions:
            raise ConfigError(f"--reward_funcs: two functions are named {name!r}; give them distinct names")
        functions[name] = load_reward_function(spec)
    return functions


# ---- calling ------------------------------------------------------------------------------------
def _excerpt(prompt, width: int = 60) -> str:
    text = prompt if isinstance(prompt, str) else repr(prompt)
    text = " ".join(text.split())
    return repr(text if len(text) <= width else text[: width - 1] + "…")


def _check_reward(value, name: str, index: int, prompt) -> float | None:
    """One returned value as a float (bool → 1.0/0.0), or None; anything else or non-finite is refused."""
    if value is None:
        return None
    if not isinstance(value, numbers.Real):
        raise RewardFunctionError(
            f"reward function {name!r} returned a {type(value).__name__} for example {index} "
            f"(prompt {_excerpt(prompt)}): each value must be a float, an int, a bool or None"
        )
    value = float(value)
    if not math.isfinite(value):
        raise RewardFunctionError(
            f"reward function {name!r} returned {value} for example {index} (prompt {_excerpt(prompt)}): "
            "rewards must be finite (return None where the function does not apply)"
        )
    return value


def call_reward_function(
    fn: RewardFunction, name: str, prompts: Sequence, completions: Sequence, columns: Mapping[str, Sequence]
) -> list[float | None]:
    """``fn(prompts=…, completions=…, **columns)`` checked: one finite number or None per completion.

    When the batch call raises, the function is called again one example at a time to name the
    first example that fails (index and prompt excerpt); reward functions are expected to be pure.
    """
    n = len(completions)
    if len(prompts) != n or any(len(v) != n for v in columns.values()):
        lengths = {"prompts": len(prompts), "completions": n} | {k: len(v) for k, v in columns.items()}
        raise ValueError(f"reward function {name!r}: inputs of different lengths {lengths}")
    try:
        out = fn(prompts=list(prompts), completions=list(completions), **{k: list(v) for k, v in columns.items()})
    except Exception as e:
        raise _first_failing_example(fn, name, prompts, completions, columns, e) from e
    if not isinstance(out, (list, tuple)):
        raise RewardFunctionError(
            f"reward function {name!r} returned a {type(out).__name__}; it must return a list with one value "
            f"per completion ({n})"
        )
    if len(out) != n:
        raise RewardFunctionError(f"reward function {name!r} returned {len(out)} values for {n} completions")
    return [_check_reward(value, name, i, prompts[i]) for i, value in enumerate(out)]


def _first_failing_example(fn, name, prompts, completions, columns, batch_error: Exception) -> RewardFunctionError:
    for i in range(len(completions)):
        try:
            fn(prompts=[prompts[i]], completions=[completions[i]], **{k: [v[i]] for k, v in columns.items()})
        except Exception as e:
            return RewardFunctionError(
                f"reward function {name!r} raised on example {i} (prompt {_excerpt(prompts[i])}): "
                f"{type(e).__name__}: {e} (it is called as fn(prompts=..., completions=..., "
                f"**dataset_columns): columns {sorted(columns)})"
            )
    return RewardFunctionError(
        f"reward function {name!r} raised on the batch of {len(completions)} (though on no single example): "
        f"{type(batch_error).__name__}: {batch_error}"
    )


# ---- combining ----------------------------------------------------------------------------------
def check_reward_weights(weights: Sequence[float] | None, components: Sequence[str]) -> list[float]:
    """The weights, one per component (reward models first, then functions); ``None`` → all 1.0."""
    if weights is None or len(weights) == 0:
        return [1.0] * len(components)
    if len(weights) != len(components):
        raise ConfigError(
            f"--reward_weights: expected {len(components)} weights, one per reward model then per reward function "
            f"({', '.join(components)}), got {len(weights)}"
        )
    return [float(w) for w in weights]


def check_reward_ensemble(ensemble: str) -> str:
    if ensemble not in REWARD_ENSEMBLES:
        raise ConfigError(f"--reward_ensemble {ensemble!r}: use one of {', '.join(REWARD_ENSEMBLES)}")
    return ensemble


def combine_example(
    model_scores: Sequence[tuple[float, float | None]],
    function_rewards: Sequence[tuple[float, float | None]],
    ensemble: str = "mean",
) -> float | None:
    """One example's total from ``(weight, value)`` pairs, ``None`` values skipped (module docstring):

    total = W·E + Σ_f w_f·r_f,   W = Σ_m w_m,   E = Σ_m w_m·s_m / W (mean) or min_m s_m (min)
    """
    models = [(w, s) for w, s in model_scores if s is not None]
    functions = [(w, r) for w, r in function_rewards if r is not None]
    if not models and not functions:
        return None
    if ensemble == "mean":
        total = sum(w * s for w, s in models)
    else:
        total = sum(w for w, _ in models) * min((s for _, s in models), default=0.0)
    return total + sum(w * r for w, r in functions)


@dataclass
class CombinedRewards:
    total: list[float | None]  # one per response; None when every component was None
    metrics: dict[str, float]  # reward/<name>/mean (over non-None values) and reward/<name>/none (count)


def combine_rewards(
    components: Mapping[str, Sequence[float | None]],
    weights: Sequence[float] | None = None,
    ensemble: str = "mean",
    reward_models: Collection[str] = (),
) -> CombinedRewards:
    """The weighted total per response (module docstring) and per-component logging statistics.

    ``components`` maps each name to one value per response, reward models (the names in
    ``reward_models``) first in ``--reward_model_path`` order, then functions in ``--reward_funcs``
    order; ``weights`` follow the same order (:func:`check_reward_weights`).
    """
    names = list(components)
    weights = check_reward_weights(weights, names)
    check_reward_ensemble(ensemble)
    lengths = {len(v) for v in components.values()}
    if len(lengths) > 1:
        raise ValueError(f"reward components of different lengths: { {k: len(v) for k, v in components.items()} }")
    n = lengths.pop() if lengths else 0
    weight = dict(zip(names, weights))
    models = [k for k in names if k in reward_models]
    functions = [k for k in names if k not in reward_models]
    total = [
        combine_example(
            [(weight[k], components[k][i]) for k in models],
            [(weight[k], components[k][i]) for k in functions],
            ensemble,
        )
        for i in range(n)
    ]
    return CombinedRewards(total, reward_component_metrics(components))


def reward_component_metrics(components: Mapping[str, Sequence[float | None]]) -> dict[str, float]:
    """``reward/<name>/mean``: the component's mean over its non-None values (absent when all are None);
    ``reward/<name>/none``: how many were None (TRL logs ``rewards/<name>/mean``)."""
    metrics: dict[str, float] = {}
    for name, values in components.items():
        present = [v for v in values if v is not None]
        if present:
            metrics[f"reward/{name}/mean"] = sum(present) / len(present)
        metrics[f"reward/{name}/none"] = float(len(values) - len(present))
    return metrics


def rewards_tensor(total: Sequence[float | None], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rewards, valid)`` for the advantage estimators: ``[batch]`` float32 with 0 where None, and the mask."""
    valid = torch.tensor([r is not None for r in total], dtype=torch.bool, device=device)
    rewards = torch.tensor([0.0 if r is None else r for r in total], dtype=torch.float32, device=device)
    return rewards, valid


# ---- one rollout's rewards ----------------------------------------------------------------------
def prompt_for_functions(prompt):
    """A prompt as TRL hands it to reward functions: the string, or a list of ``{"role", "content"}`` dicts."""
    if isinstance(prompt, str):
        return prompt
    return [{"role": m.role, "content": m.content} for m in prompt]


def completion_for_functions(prompt, text: str):
    """A completion as TRL hands it: the text, or ``[{"role": "assistant", "content": text}]`` for a chat prompt."""
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


@dataclass
class ScoredBatch:
    scores: torch.Tensor  # [batch] combined reward, 0 where missing
    valid: torch.Tensor  # [batch] bool, False where every component was None
    component_sums: torch.Tensor  # [components, 3]: Σ present values, count present, count None (this process)


class ProgrammableRewards:
    """The reward components of a run (the reward model's score, then ``--reward_funcs``) and how they
    combine into the score the advantages see (:func:`combine_rewards`).

    ``needed`` is False on the plain path (one reward model, no functions, no weights): the reward
    model's score is then used as it is, untouched.
    """

    def __init__(self, cfg):
        self.functions = load_reward_functions(cfg.reward_funcs)
        self.names = cfg.reward_components
        self.weights = check_reward_weights(cfg.reward_weights, self.names)
        self.ensemble = check_reward_ensemble(cfg.reward_ensemble)
        self.model_names = self.names[: len(self.names) - len(self.functions)]
        self.needed = bool(self.functions) or cfg.reward_weights is not None or len(self.model_names) > 1

    def score(
        self,
        model_scores: Sequence[torch.Tensor],
        prompts: Sequence,
        texts: Sequence[str],
        columns: Mapping[str, Sequence],
    ) -> ScoredBatch:
        """Every component for one batch (``model_scores``: each reward model's, after the missing-stop
        penalty; ignored without a reward model), combined. A function that raises or returns a bad
        value raises :class:`RewardFunctionError` naming it and the first failing example."""
        components: dict[str, Sequence[float | None]] = {}
        for name, scores in zip(self.model_names, model_scores):
            components[name] = scores.float().cpu().tolist()
        fn_prompts = [prompt_for_functions(p) for p in prompts]
        completions = [completion_for_functions(p, t) for p, t in zip(prompts, texts)]
        for name, fn in self.functions.items():
            components[name] = call_reward_function(fn, name, fn_prompts, completions, columns)
        combined = combine_rewards(components, self.weights, self.ensemble, reward_models=self.model_names)
        device = model_scores[0].device
        scores, valid = rewards_tensor(combined.total, device=device)
        sums = [
            [
                sum(v for v in values if v is not None),
                sum(v is not None for v in values),
                sum(v is None for v in values),
            ]
            for values in components.values()
        ]
        return ScoredBatch(scores, valid, torch.tensor(sums, dtype=torch.float64, device=device))


def component_metrics(names: Sequence[str], sums: torch.Tensor) -> dict[str, float]:
    """``reward/<name>/mean`` (Σ values / count over every process: not a mean of means) and
    ``reward/<name>/none`` from the per-component sums of :meth:`ProgrammableRewards.score` (already
    summed over processes)."""
    metrics: dict[str, float] = {}
    for name, (total, present, missing) in zip(names, sums.tolist()):
        if present:
            metrics[f"reward/{name}/mean"] = total / present
        metrics[f"reward/{name}/none"] = missing
    return metrics
