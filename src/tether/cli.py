"""The ``tether`` command: ``tether <stage> [flags]``.

Each subcommand names a config dataclass and the function that runs it; the module is imported
only when its subcommand runs, so ``tether --help`` stays fast.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

# OpenMP threads that spin while waiting make a CPU run many times slower as soon as anything else
# runs on the machine (seen here: 10x on 2 busy cores); passive waiting costs almost nothing on idle
# cores. Set before torch is imported; an explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# subcommand -> (module, config class, function, one-line description)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "sft": ("tether.stages.sft", "SFTConfig", "run_sft", "Stage 1: supervised fine-tuning on demonstrations."),
    "rm": (
        "tether.stages.reward",
        "RewardConfig",
        "run_reward",
        "Stage 2: Bradley-Terry reward model on preference pairs.",
    ),
    "ppo": (
        "tether.pipeline",  # run_ppo_command: run_ppo plus the demo's gold score (the simulated annotator)
        "PPOConfig",
        "run_ppo_command",
        "Stage 3: PPO against the reward model with a per-token KL penalty.",
    ),
    "dpo": ("tether.stages.dpo", "DPOConfig", "run_dpo", "Direct Preference Optimization from preference pairs."),
    "bon": (
        "tether.stages.best_of_n",
        "BestOfNConfig",
        "run_best_of_n",
        "Best-of-N sampling scored by a reward model.",
    ),
    "eval": (
        "tether.evaluation.evaluate",
        "EvalConfig",
        "run_eval",
        "Evaluate policies: reward, gold, KL, diversity, probes.",
    ),
    "pipeline": (
        "tether.pipeline",
        "PipelineConfig",
        "run_pipeline",
        "SFT -> RM -> PPO, DPO, best-of-N, evaluation and report.",
    ),
    "serve": ("tether.serve.app", "ServeConfig", "run_serve", "Serve a policy over HTTP with best-of-N reranking."),
    "study": ("tether.study", "StudyConfig", "run_study", "Studies: `tether study overoptimization`."),
}


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: tether <command> [options]   (tether <command> --help lists every option)", "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, _, _, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from tether import __version__

        print(f"tether {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"tether: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if name == "study" and rest and not rest[0].startswith("-"):
        # `tether study overoptimization [flags]`: the study's name is a positional word
        rest = ["--study", rest[0], *rest[1:]]
    module_name, config_name, function_name, description = COMMANDS[name]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from tether.config import ConfigError, parse_config
    from tether.data.errors import DataError
    from tether.errors import NonFiniteError, RewardFunctionFailed

    module = importlib.import_module(module_name)
    config_class = getattr(module, config_name)
    try:
        config = parse_config(config_class, rest, prog=f"tether {name}", description=description)
        getattr(module, function_name)(config)
    except (ConfigError, DataError) as exc:
        print(f"tether {name}: error: {exc}", file=sys.stderr)
        return 2
    except (NonFiniteError, RewardFunctionFailed) as exc:
        # the run stopped itself; its message says where the last good checkpoint is
        print(f"tether {name}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
