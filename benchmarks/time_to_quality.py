"""Time to quality on the demo task: gold gain over SFT against training seconds (issue 16).

    # the demo pipeline's SFT policy and reward model, without its RL, DPO and evaluation stages:
    ./tether pipeline --skip ppo,dpo,bon,eval,report
    /work/main/.venv/bin/python benchmarks/time_to_quality.py --sft outputs/pipeline/sft \
        --reward_model outputs/pipeline/rm          # writes benchmarks/results/time_to_quality.{json,png}
    /work/main/.venv/bin/python benchmarks/time_to_quality.py --smoke   # tiny models, all five sides, minutes

Sides (``--sides``): ``tether-ppo`` (GAE with the demo's value head on the policy), ``tether-rloo``,
``tether-grpo`` (the pipeline's ``--rl`` methods, ``tether.pipeline.RL_METHODS``), ``trl112-ppo`` (TRL
1.12.0 ``trl.experimental.ppo.PPOTrainer``, imported from ``benchmarks/.peers/trl-1.12.0`` with this
venv's torch/transformers) and ``trl116-rloo`` (TRL 1.16 ``RLOOTrainer`` in its own venv, ``TRL116_PYTHON``).
Each trains from the same SFT policy on the same reward model (the pipeline's ``rm/`` folder) and the
demo's training prompts (``embedded:demo``, train split, in file order; every trainer shuffles them with
its own seeded sampler, seed = the demo's 42, so the orders differ), in its own fresh process with the
same torch thread count (``--threads``, default 2 = the machine).

Settings: ``configs/demo.yaml`` (read with yaml, so they stay in sync with the demo): its ``ppo:``
section, top-level ``temperature`` and ``seed``; ``--iterations`` (default the section's 6) of 16
responses each, lr 5e-5 with linear decay to 0 over the run, β = 0.05, T = 0.7, at most 40 new tokens,
one epoch of two minibatches of 8 (2 optimizer steps per iteration), AdamW ε 1e-5, no gradient
clipping, fp32, no gradient checkpointing, on every side:

* tether-ppo: the YAML section as is (value head on the policy, GAE λ 0.95, γ 1, vf_coef 0.1, clip 0.2,
  k1 KL in the reward, missing-stop score −1 in normalised units); its reward normalised to mean 0 / std
  1 on the SFT policy's own samples: as the pipeline does, ``--sft_samples`` (default
  ``<sft>/../data/sft_samples_round1.jsonl``, the samples the demo labelled) gives 256 of them to score;
  without that file tether samples 256 responses itself (its default). That scoring (or sampling) runs
  in ``PPOTrainer.__init__``; its seconds are timed and ADDED to tether's clock (TRL does no such pass).
* tether-rloo / tether-grpo: the same section with ``RL_METHODS`` on top (4 prompts × k = 4, no value
  head; grpo puts β·k3 in the loss), exactly as ``tether pipeline --rl ppo,rloo,grpo`` trains them.
* trl112-ppo: a separate value model (TRL has no value head on the policy) and the reward model, both
  loaded from the RM folder; per_device_train_batch_size 16 × num_mini_batches 2 (2 optimizer steps an
  iteration, bench_ppo.py's geometry), ``stop_token="eos"``, ``missing_eos_penalty=1.0`` (TRL's documented
  example value, SUBTRACTED from the raw score, where tether replaces the normalised score by −1), kl_coef
  0.05, vf_coef 0.1, λ 0.95. TRL does not normalise the reward: it trains on the raw RM score, so β and the
  penalty act on another scale than tether's (recorded in the JSON). TRL reads the RM at the response's
  last token before the stop token (SmolLM2 pads with its stop token); tether reads it at the stop token,
  as the RM was trained.
* trl116-rloo: ``reward_funcs`` = the RM (loaded from its folder, its tokenizer as the reward processing
  class), conversational prompts (one user turn; the chat template renders them to the same token ids as
  tether's, checked by ``prepare``), num_generations 4, per_device_train_batch_size 8 ×
  steps_per_generation 2 (16 completions = 4 prompts per generation, 2 optimizer steps), num_iterations 1,
  beta 0.05 (sequence k1 KL in the reward, as tether's rloo), ``max_grad_norm 0`` (off, as tether),
  ``max_completion_length`` 40. TRL 1.16 RLOO has no missing-EOS penalty and no reward normalisation; it
  scores the decoded text re-rendered by the chat template (a closing ``<|im_end|>`` appended even to a
  response cut at the budget).

The clock: each side records wall seconds from the start of training (after model loading; tether
after ``PPOTrainer.__init__``, TRL at ``on_train_begin``) to the end of iterations ``--eval_every``,
2·``--eval_every``, ... (tether: the per-iteration ``extra_metrics`` hook, called after the update; TRL:
``on_step_end`` at the matching optimizer step), where it saves its policy; the saving is excluded from
the clock (tether: its ``save_steps`` checkpoints, timed around ``save_checkpoint``; TRL: a callback that
``save_pretrained``s the policy).

Evaluation, one process after all training: the SFT policy and every saved policy sample
``eval.samples_per_prompt`` (4) responses to each of the first ``eval_max_prompts`` (32) held-out demo
prompts at T = 0.7 and ``eval.max_new_tokens`` (40) with the same seeds (``tether.evaluation.evaluate.
evaluate_policies``, seed 42, batches of ``eval.batch_size``: every policy gets the same per-batch seeds),
scored by the simulated annotator (gold) and the reward model (proxy, normalised with tether-ppo's
statistics). Gold = mean over prompts of each prompt's sample mean, SE across prompts; gold gain =
policy − SFT paired by prompt (``tether.evaluation.metrics.paired_difference``, SE of the paired
differences).

Time to quality: the target is tether-ppo's gold gain at its last iteration; a side reaches it at the
first saved iteration whose gold gain is at least the target (its seconds; None if never, so times are
quantised to ``--eval_every`` iterations); ratio = fastest TRL side's time / fastest tether estimator's
time (issue 16's target: ≥ 2). When no TRL side reaches the target, ``ratio_lower_bound`` = the shortest
TRL run's seconds / tether's time. Output: JSON (``--out``), a PNG beside it, a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from _harness import OFFLINE_ENV, cpu_name, peak_rss_mib, run_side, versions  # noqa: E402  (the script's folder)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PYTHON = Path(sys.executable)  # tether's sides, TRL 1.12 and the evaluation run in the venv that runs this
DEMO_YAML = ROOT / "configs" / "demo.yaml"
SIDES = ("tether-ppo", "tether-rloo", "tether-grpo", "trl112-ppo", "trl116-rloo")
TETHER_METHODS = {"tether-ppo": "ppo", "tether-rloo": "rloo", "tether-grpo": "grpo"}
TRL_PPO_MISSING_EOS_PENALTY = 1.0  # TRL's documented PPO example value (raw score units, subtracted)
TRL116_RLOO_K = 4


def trl112_path() -> Path:
    """TRL 1.12.0 installed with ``pip install --no-deps --target``: $TRL112_PATH, the main checkout's
    (/work/main/benchmarks/.peers/trl-1.12.0) when it has one, else this checkout's benchmarks/.peers."""
    if os.environ.get("TRL112_PATH"):
        return Path(os.environ["TRL112_PATH"])
    shared = Path("/work/main/benchmarks/.peers/trl-1.12.0")
    return shared if (shared / "trl").is_dir() else HERE / ".peers" / "trl-1.12.0"


def trl116_python() -> Path:
    """The TRL 1.16 venv's python: $TRL116_PYTHON, the main checkout's venv when present, else this checkout's."""
    if os.environ.get("TRL116_PYTHON"):
        return Path(os.environ["TRL116_PYTHON"])
    shared = Path("/work/main/benchmarks/.venv-trl116/bin/python")
    return shared if shared.exists() else HERE / ".venv-trl116" / "bin" / "python"


# ------------------------------------------------------------------------------------------------
# the sides (each in its own process): train, save at every eval_every iterations, report the clock


class Clock:
    """Training seconds with the saving left out: ``now()`` = wall time since ``start()`` minus saves."""

    def __init__(self, offset: float = 0.0):
        self.offset, self.started, self.saving = offset, None, 0.0

    def start(self) -> None:
        self.started = time.perf_counter()

    def now(self) -> float:
        return self.offset + time.perf_counter() - self.started - self.saving


def run_tether(work: Path, s: dict, side: str) -> dict:
    import tether.ppo.trainer as tether_trainer
    from tether.pipeline import RL_METHODS
    from tether.ppo import PPOConfig, PPOTrainer
    from tether.tracking import read_jsonl

    method = TETHER_METHODS[side]
    out = work / side
    values = dict(s["ppo"])  # the demo's `ppo:` section, then what the pipeline sets for the method
    if method != "ppo":
        values.update(RL_METHODS[method], value_head_on_policy=False)
    config = PPOConfig(
        **values
        | dict(
            output_dir=str(out),
            model_name_or_path=s["sft"],
            reward_model_path=s["reward_model"],
            temperature=s["temperature"],
            seed=s["seed"],
            num_iterations=s["iterations"],
            save_steps=s["eval_every"],
            save_total_limit=None,
            keep_checkpoints=True,
            overwrite_output_dir=True,
            reward_norm_responses=s["sft_samples"],
            reward_norm_samples=s["reward_norm_samples"],
            report_to="none",
            disable_tqdm=True,
            use_cpu=True,
            **s.get("tether_overrides", {}),
        )
    )
    prompts = json.loads((work / "prompts.json").read_text())["train"]["texts"]

    # the reward normalisation runs in PPOTrainer.__init__: time it (it is training work TRL does not do)
    normalisation = [0.0]
    original = tether_trainer.set_reward_normalisation

    def timed_normalisation(*a, **k):
        t0 = time.perf_counter()
        record = original(*a, **k)
        normalisation[0] = time.perf_counter() - t0
        return record

    tether_trainer.set_reward_normalisation = timed_normalisation
    clock = Clock()
    saves: list[dict] = []
    marks: list[float] = []
    trainer = PPOTrainer(config, prompts, extra_metrics=lambda rollout: marks.append(clock.now()) or {})
    tether_trainer.set_reward_normalisation = original
    clock.offset = normalisation[0]
    save = trainer.save_checkpoint

    def timed_save():
        t0 = time.perf_counter()
        path = save()
        iteration = trainer.state.iteration
        saves.append({"iteration": iteration, "seconds": marks[iteration - 1], "path": str(Path(path) / "policy")})
        clock.saving += time.perf_counter() - t0
        return path

    trainer.save_checkpoint = timed_save
    clock.start()
    result = trainer.train()
    if result.stopped_reason != "completed":
        raise SystemExit(f"{side}: stopped ({result.stopped_reason}) after {result.iterations} iterations")
    for entry in saves:  # only the policy is evaluated: drop optimizer state and critic to spare the disk
        folder = Path(entry["path"]).parent
        for item in folder.iterdir():
            if item.name != "policy":
                shutil.rmtree(item) if item.is_dir() else item.unlink()
    rows = read_jsonl(out / "metrics.jsonl")
    keep = ("reward/score", "kl/ref", "response/length", "time/total", "time/generate", "time/score", "time/update")
    return {
        "checkpoints": saves,
        "iteration_seconds": marks,
        "normalisation_seconds": normalisation[0],
        "saving_seconds": clock.saving,
        "reward_normalisation": trainer.reward_normalisation,
        "iterations_log": [{k: r.get(k) for k in keep} for r in rows],
    }


def _trl_callback(trainer, tokenizer, policy_of, out: Path, steps_per_iteration: int, s: dict):
    """A TrainerCallback: the clock starts at on_train_begin; at every eval_every iterations on_step_end
    marks the time, then saves the policy (the saving left out of the clock)."""
    from transformers import TrainerCallback

    clock = Clock()
    record: dict = {"checkpoints": [], "iteration_seconds": [], "clock": clock}

    class TimeToQuality(TrainerCallback):
        def on_train_begin(self, *_a, **_k):
            clock.start()

        def on_step_end(self, args, state, control, **_k):
            if state.global_step % steps_per_iteration:
                return
            now = clock.now()
            iteration = state.global_step // steps_per_iteration
            record["iteration_seconds"].append(now)
            if iteration % s["eval_every"] == 0:
                t0 = time.perf_counter()
                folder = out / f"policy-{iteration}"
                policy = trainer.accelerator.unwrap_model(policy_of(trainer))
                policy.save_pretrained(folder, safe_serialization=True)
                tokenizer.save_pretrained(folder)
                record["checkpoints"].append({"iteration": iteration, "seconds": now, "path": str(folder)})
                clock.saving += time.perf_counter() - t0

    return TimeToQuality(), record


def _trl_training_args(s: dict) -> dict:
    """The settings both TRL sides share: the demo's temperature and learning rate, tether's schedule and
    AdamW (linear to 0, eps 1e-5, fused), fp32 on the CPU, no checkpoints, tracking or worker processes."""
    return dict(
        temperature=s["temperature"],
        learning_rate=s["ppo"]["learning_rate"],
        lr_scheduler_type="linear",
        adam_epsilon=1e-5,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        seed=s["seed"],
        disable_tqdm=True,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        optim="adamw_torch_fused",
        dataloader_num_workers=0,
    )


def run_trl112_ppo(work: Path, s: dict, side: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    ids = json.loads((work / "prompts.json").read_text())["train"]["ids"]
    p = s["ppo"]
    out = work / side
    tokenizer = AutoTokenizer.from_pretrained(s["sft"], padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(s["sft"], dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(s["sft"], dtype=torch.float32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(
        s["reward_model"], dtype=torch.float32, num_labels=1
    )
    value_model = AutoModelForSequenceClassification.from_pretrained(
        s["reward_model"], dtype=torch.float32, num_labels=1
    )
    args = PPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=p["batch_size"],
        gradient_accumulation_steps=1,
        num_mini_batches=p["batch_size"] // p["mini_batch_size"],
        local_rollout_forward_batch_size=p["batch_size"],
        num_ppo_epochs=p["ppo_epochs"],
        response_length=p["max_new_tokens"],
        stop_token="eos",
        total_episodes=p["batch_size"] * s["iterations"],
        kl_coef=p["init_kl_coef"],
        vf_coef=0.1,
        missing_eos_penalty=TRL_PPO_MISSING_EOS_PENALTY,
        num_sample_generations=0,
        fp16=False,
        **_trl_training_args(s),
    )
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=reference,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=Dataset.from_dict({"input_ids": ids}),
    )
    callback, record = _trl_callback(trainer, tokenizer, lambda t: t.model.policy, out, 1, s)
    trainer.add_callback(callback)
    trainer.train()
    return _trl_result(trainer, record)


def run_trl116_rloo(work: Path, s: dict, side: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import RLOOConfig, RLOOTrainer

    messages = json.loads((work / "prompts.json").read_text())["train"]["messages"]
    p = s["ppo"]
    out = work / side
    steps_per_iteration = p["batch_size"] // p["mini_batch_size"]
    tokenizer = AutoTokenizer.from_pretrained(s["sft"], padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(s["sft"], dtype=torch.float32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(
        s["reward_model"], dtype=torch.float32, num_labels=1
    )
    reward_tokenizer = AutoTokenizer.from_pretrained(s["reward_model"])
    args = RLOOConfig(
        output_dir=str(out),
        per_device_train_batch_size=p["mini_batch_size"],
        gradient_accumulation_steps=1,
        steps_per_generation=steps_per_iteration,
        num_generations=TRL116_RLOO_K,
        num_iterations=p["ppo_epochs"],
        max_steps=steps_per_iteration * s["iterations"],
        max_completion_length=p["max_new_tokens"],
        top_p=1.0,
        top_k=0,
        max_grad_norm=0.0,
        beta=p["init_kl_coef"],
        **_trl_training_args(s),
    )
    trainer = RLOOTrainer(
        model=policy,
        reward_funcs=reward_model,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": messages}),
        processing_class=tokenizer,
        reward_processing_classes=reward_tokenizer,
    )
    callback, record = _trl_callback(trainer, tokenizer, lambda t: t.model, out, steps_per_iteration, s)
    trainer.add_callback(callback)
    trainer.train()
    result = _trl_result(trainer, record)
    result["optimizer_steps"] = trainer.state.global_step
    return result


def _trl_result(trainer, record: dict) -> dict:
    keep = ("objective/scores", "objective/kl", "reward", "kl", "completions/mean_length", "loss")
    log = [{k: row[k] for k in keep if k in row} for row in trainer.state.log_history]
    return {
        "checkpoints": record["checkpoints"],
        "iteration_seconds": record["iteration_seconds"],
        "saving_seconds": record["clock"].saving,
        "iterations_log": [row for row in log if row],
    }


# ------------------------------------------------------------------------------------------------
# the evaluation process


def run_evaluation(work: Path, s: dict) -> dict:
    import numpy as np

    from tether.demo.annotator import default_annotator
    from tether.evaluation.evaluate import evaluate_policies, load_reward
    from tether.evaluation.metrics import paired_difference
    from tether.models.loading import disable_dropout, load_causal_lm, load_tokenizer
    from tether.models.scoring import RewardStats

    policies = json.loads((work / "policies.json").read_text())  # [{name, path}], the SFT policy first
    prompts = json.loads((work / "prompts.json").read_text())["eval"]["texts"]
    tokenizer = load_tokenizer(s["sft"])
    sft = load_causal_lm(s["sft"])
    disable_dropout(sft)
    sft.eval()
    rm, rm_tokenizer, stats = load_reward(s["reward_model"])
    norm = s.get("proxy_normalisation")
    if norm and norm.get("mean") is not None:
        stats = RewardStats(norm["mean"], norm["std"], norm["count"], norm["source"])
    annotator = default_annotator()
    e = s["eval"]
    per_prompt: dict[str, dict[str, list[float]]] = {}
    metrics: dict[str, dict] = {}
    for entry in policies:
        name = entry["name"]
        t0 = time.perf_counter()
        results = evaluate_policies(
            {name: sft if entry["path"] is None else entry["path"]},
            sft,
            rm,
            tokenizer,
            prompts,
            reward_tokenizer=rm_tokenizer,
            reward_stats=stats,
            temperature=s["temperature"],
            max_new_tokens=e["max_new_tokens"],
            samples_per_prompt=e["samples_per_prompt"],
            gold=annotator,
            probes=False,
            batch_size=e["batch_size"],
            seed=s["seed"],
        )
        by_prompt: dict[str, dict[int, list[float]]] = {"gold": {}, "proxy": {}}
        for row in results.samples:
            by_prompt["gold"].setdefault(row["prompt_index"], []).append(row["gold"])
            by_prompt["proxy"].setdefault(row["prompt_index"], []).append(row["reward"])
        n = len(prompts)
        per_prompt[name] = {k: [float(np.mean(v[i])) for i in range(n)] for k, v in by_prompt.items()}
        m = results.metrics[name]
        gold = np.asarray(per_prompt[name]["gold"])
        metrics[name] = {
            "gold": float(gold.mean()),
            "gold_se": float(gold.std(ddof=1) / math.sqrt(n)) if n > 1 else None,
            "proxy": m.get("reward/score"),
            "kl_ref": m.get("kl/ref"),
            "response_tokens": m.get("response/length"),
            "stopped": m.get("response/stopped"),
            "eval_seconds": time.perf_counter() - t0,
        }
        print(f"eval {name}: gold {metrics[name]['gold']:+.3f} ({metrics[name]['eval_seconds']:.0f} s)", flush=True)
    base = policies[0]["name"]
    for name, m in metrics.items():
        if name == base:
            m.update(gold_gain=0.0, gold_gain_se=0.0, proxy_gain=0.0, proxy_gain_se=0.0)
            continue
        for key in ("gold", "proxy"):
            gain, se = paired_difference(per_prompt[name][key], per_prompt[base][key])
            m[f"{key}_gain"], m[f"{key}_gain_se"] = gain, (None if math.isnan(se) else se)
    return {"metrics": metrics, "per_prompt": per_prompt, "proxy_normalisation": stats.source if stats else None}


def child(side: str, work: Path) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    settings = json.loads((work / "settings.json").read_text())
    if side == "eval":
        result = run_evaluation(work, settings)
    elif side in TETHER_METHODS:
        result = run_tether(work, settings, side)
    elif side == "trl112-ppo":
        result = run_trl112_ppo(work, settings, side)
    elif side == "trl116-rloo":
        result = run_trl116_rloo(work, settings, side)
    else:
        raise SystemExit(f"unknown side {side}")
    result["peak_rss_mib"] = peak_rss_mib()
    result["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------
# the parent: inputs, sides, evaluation, table, plot, JSON


def demo_settings(args) -> dict:
    import yaml

    demo = yaml.safe_load(DEMO_YAML.read_text())
    ppo = dict(demo["ppo"])
    ppo.pop("save_steps", None)  # the benchmark saves every --eval_every iterations
    ppo.pop("num_iterations", None)  # --iterations
    eval_section = demo.get("eval", {})
    return {
        "ppo": ppo,
        "iterations": args.iterations or demo["ppo"]["num_iterations"],
        "eval_every": args.eval_every,
        "temperature": demo["temperature"],
        "seed": demo["seed"],
        "reward_norm_samples": 256,
        "eval_max_prompts": args.eval_prompts or demo["eval_max_prompts"],
        "eval": {
            "samples_per_prompt": eval_section.get("samples_per_prompt", 4),
            "max_new_tokens": eval_section.get("max_new_tokens", 40),
            "batch_size": eval_section.get("batch_size", 64),
        },
    }


def tiny_pipeline(folder: Path) -> tuple[Path, Path]:
    """--smoke: a random 2-layer Llama policy and reward model with SmolLM2's tokenizer (as tests/conftest.py
    builds them) and a few fake SFT samples for tether's reward normalisation."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from tether.data.embedded import DEMO
    from tether.data.loading import load_prompts
    from tether.models.loading import ensure_embedded_model, load_tokenizer

    tokenizer = load_tokenizer(str(ensure_embedded_model()))
    config = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    policy = LlamaForCausalLM(LlamaConfig(**config))
    policy.generation_config.eos_token_id = tokenizer.eos_token_id
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    policy.save_pretrained(folder / "sft")
    tokenizer.save_pretrained(folder / "sft")
    torch.manual_seed(1)
    LlamaForSequenceClassification(LlamaConfig(**config, num_labels=1)).save_pretrained(folder / "rm")
    tokenizer.save_pretrained(folder / "rm")
    (folder / "data").mkdir(parents=True, exist_ok=True)
    rows = [
        {"prompt": r.prompt, "response": f"A short answer number {i}.", "stopped": i % 2 == 0}
        for i, r in enumerate(load_prompts(DEMO, "train")[:16])
    ]
    (folder / "data" / "sft_samples_round1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "sft", folder / "rm"


def prepare(work: Path, s: dict) -> dict:
    """prompts.json: the demo's training prompts (text, token ids, chat messages) and held-out prompts."""
    from tether.data.embedded import DEMO
    from tether.data.loading import load_prompts
    from tether.data.templates import prompt_ids
    from tether.models.loading import load_tokenizer

    tokenizer = load_tokenizer(s["sft"])
    train = [r.prompt for r in load_prompts(DEMO, "train")]
    held_out = [r.prompt for r in load_prompts(DEMO, "test")][: s["eval_max_prompts"]]
    if not all(isinstance(p, str) for p in train + held_out):
        raise SystemExit("the demo's prompts are expected to be plain strings (one user turn)")
    ids = [prompt_ids(tokenizer, p, None) for p in train]
    messages = [[{"role": "user", "content": p}] for p in train]
    # TRL 1.16 renders the conversational prompts with the chat template itself: the same ids as tether's?
    rendered = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
    same = all(tokenizer(r, add_special_tokens=False)["input_ids"] == i for r, i in zip(rendered, ids))
    (work / "prompts.json").write_text(
        json.dumps({"train": {"texts": train, "ids": ids, "messages": messages}, "eval": {"texts": held_out}})
    )
    return {
        "train_prompts": len(train),
        "eval_prompts": len(held_out),
        "prompt_tokens": [min(map(len, ids)), max(map(len, ids))],
        "chat_template_ids_equal": same,
    }


def side_env(side: str, threads: int) -> dict[str, str]:
    env = {**os.environ, **OFFLINE_ENV, "BENCH_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    env.pop("PYTHONPATH", None)
    if side.startswith("tether") or side == "eval":
        env["PYTHONPATH"] = str(ROOT / "src")
    elif side == "trl112-ppo":
        env["PYTHONPATH"] = str(trl112_path())
    return env


def python_of(side: str) -> Path:
    return trl116_python() if side == "trl116-rloo" else PYTHON


def launch(side: str, work: Path, threads: int) -> dict:
    """One side's process; its result is kept in WORK/SIDE.json so a re-run on the same --work_dir resumes."""
    saved = work / f"{side}.result.json"
    if saved.is_file():
        print(f"{side}: reusing {saved}", flush=True)
        return json.loads(saved.read_text())
    cmd = [str(python_of(side)), str(Path(__file__).resolve()), "--side", side, "--work", str(work)]
    result = run_side(side, cmd, side_env(side, threads), work)
    saved.write_text(json.dumps(result))
    return result


def time_to_quality(curves: dict[str, list[dict]]) -> dict:
    """The target (tether-ppo's last gold gain), each side's first time at or above it, and the ratio."""
    if not curves.get("tether-ppo"):
        return {"target_gold_gain": None, "note": "tether-ppo not run: no target"}
    target = curves["tether-ppo"][-1]["gold_gain"]
    reached = {
        side: next((p["seconds"] for p in points if p["gold_gain"] >= target), None) for side, points in curves.items()
    }
    tether = {k: v for k, v in reached.items() if k.startswith("tether") and v is not None}
    trl = {k: v for k, v in reached.items() if k.startswith("trl") and v is not None}
    out: dict = {"target_gold_gain": target, "seconds_to_target": reached}
    if tether:
        fastest = min(tether, key=tether.get)
        out |= {"fastest_tether": fastest, "fastest_tether_seconds": tether[fastest]}
    if trl:
        fastest = min(trl, key=trl.get)
        out |= {"fastest_trl": fastest, "fastest_trl_seconds": trl[fastest]}
    if tether and trl:
        out["ratio"] = out["fastest_trl_seconds"] / out["fastest_tether_seconds"]
        out["target_met"] = out["ratio"] >= 2
    elif tether and any(k.startswith("trl") for k in curves):
        # each TRL side needs more than its whole run, so the fastest of them more than the shortest run
        shortest = min(curves[k][-1]["seconds"] for k in curves if k.startswith("trl") and curves[k])
        out["ratio_lower_bound"] = shortest / out["fastest_tether_seconds"]
        out["note"] = "no TRL side reached the target within its run: ratio > ratio_lower_bound"
        out["target_met"] = out["ratio_lower_bound"] >= 2 or None
    return out


def table(curves: dict[str, list[dict]], ttq: dict, sft: dict) -> str:
    lines = [
        "| side | iteration | seconds | gold | gold gain ± s.e. | proxy gain ± s.e. | KL (nats) | tokens | stopped |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| sft | 0 | 0 | {sft['gold']:+.3f} | – | – | 0.00 | {sft['response_tokens']:.1f} | {sft['stopped']:.0%} |",
    ]

    def pm(m, key):
        se = m.get(f"{key}_se")
        return f"{m[key]:+.3f} ± {se:.3f}" if se is not None else f"{m[key]:+.3f}"

    for side, points in curves.items():
        for p in points:
            lines.append(
                f"| {side} | {p['iteration']} | {p['seconds']:.0f} | {p['gold']:+.3f} | {pm(p, 'gold_gain')} | "
                f"{pm(p, 'proxy_gain') if p.get('proxy_gain') is not None else '–'} | "
                f"{p['kl_ref']:.2f} | {p['response_tokens']:.1f} | {p['stopped']:.0%} |"
            )
    if ttq.get("target_gold_gain") is not None:
        lines += ["", f"Target gold gain (tether-ppo, last iteration): {ttq['target_gold_gain']:+.3f}", ""]
        lines += ["| side | seconds to target |", "|---|---|"]
        for side, secs in ttq["seconds_to_target"].items():
            lines.append(f"| {side} | {'never' if secs is None else f'{secs:.0f}'} |")
        if "ratio" in ttq:
            lines.append(
                f"\nfastest TRL ({ttq['fastest_trl']}) / fastest tether ({ttq['fastest_tether']}): "
                f"**{ttq['ratio']:.2f}×** (target ≥ 2: {'met' if ttq['target_met'] else 'missed'})"
            )
        elif "ratio_lower_bound" in ttq:
            lines.append(f"\n{ttq['note']}: **> {ttq['ratio_lower_bound']:.2f}×**")
    return "\n".join(lines)


def plot(curves: dict[str, list[dict]], ttq: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for side, points in curves.items():
        xs = [0.0] + [p["seconds"] for p in points]
        ys = [0.0] + [p["gold_gain"] for p in points]
        errs = [0.0] + [p.get("gold_gain_se") or 0.0 for p in points]
        ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=side, linestyle="--" if "trl" in side else "-")
    if ttq.get("target_gold_gain") is not None:
        ax.axhline(ttq["target_gold_gain"], color="grey", linestyle=":", label="target (tether-ppo, last)")
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.set_xlabel("training seconds (model loading and saving excluded)")
    ax.set_ylabel("gold gain over SFT (paired by prompt, ± s.e.)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--sft", type=Path, help="the demo pipeline's SFT policy folder (outputs/pipeline/sft)")
    parser.add_argument("--reward_model", type=Path, help="its reward model folder (outputs/pipeline/rm)")
    parser.add_argument(
        "--sft_samples",
        type=Path,
        default=None,
        help="SFT samples for tether's reward normalisation (default: SFT/../data/sft_samples_round1.jsonl if it "
        "exists, else tether samples 256 responses itself)",
    )
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--iterations", type=int, default=None, help="default: the demo's (configs/demo.yaml)")
    parser.add_argument("--eval_every", type=int, default=2, help="iterations between saved (evaluated) policies")
    parser.add_argument("--eval_prompts", type=int, default=None, help="held-out prompts (default: the demo's 32)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of each process (default 2)")
    parser.add_argument("--out", type=Path, default=None, help="JSON (default results/time_to_quality.json)")
    parser.add_argument("--work_dir", type=Path, default=None, help="keep policies here (a re-run resumes)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny random models, 2 iterations, eval every 1, 4 prompts, 8 tokens, 1 thread (checks the script)",
    )
    args = parser.parse_args()
    if args.side:
        child(args.side, args.work)
        return
    sys.path.insert(0, str(ROOT / "src"))
    if args.smoke:
        args.iterations, args.eval_every, args.eval_prompts = args.iterations or 2, 1, args.eval_prompts or 4
        args.threads = args.threads or 1
        args.out = args.out or HERE / "results" / "time_to_quality_smoke.json"
    args.threads = args.threads or 2
    args.out = args.out or HERE / "results" / "time_to_quality.json"
    sides = [x.strip() for x in args.sides.split(",") if x.strip()]
    if unknown := [x for x in sides if x not in SIDES]:
        raise SystemExit(f"unknown sides {unknown}; choose from {', '.join(SIDES)}")
    if "trl112-ppo" in sides and not (trl112_path() / "trl").is_dir():
        raise SystemExit(f"TRL 1.12.0 missing: {PYTHON} -m pip install --no-deps --target {trl112_path()} trl==1.12.0")
    if "trl116-rloo" in sides and not trl116_python().exists():
        raise SystemExit(f"TRL 1.16 venv missing: {trl116_python()} (set TRL116_PYTHON)")
    if not args.smoke and not (args.sft and args.reward_model):
        raise SystemExit("--sft and --reward_model are required (or --smoke)")

    settings = demo_settings(args)
    (HERE / "results").mkdir(exist_ok=True)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="tmp-ttq-", dir=HERE / "results"))
    work.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.sft, args.reward_model = tiny_pipeline(work / "pipeline")
        settings["ppo"]["max_new_tokens"] = 8
        settings["eval"]["max_new_tokens"] = 8
        # a random tiny policy never stops within 8 tokens: with the missing-stop score every response of a
        # group would score -1 and the critic-free sides would get no signal to update on
        settings["tether_overrides"] = {"missing_eos_penalty": None}
    sft_samples = args.sft_samples or args.sft.resolve().parent / "data" / "sft_samples_round1.jsonl"
    settings |= {
        "sft": str(args.sft.resolve()),
        "reward_model": str(args.reward_model.resolve()),
        "sft_samples": str(sft_samples) if sft_samples.is_file() else None,
        "threads": args.threads,
        "sides": sides,
    }
    load_before = os.getloadavg()
    started = time.perf_counter()
    (work / "settings.json").write_text(json.dumps(settings))
    data = prepare(work, settings)
    print(f"work folder {work}; settings {json.dumps(settings)}", flush=True)

    runs: dict[str, dict] = {}
    for side in sides:
        runs[side] = launch(side, work, args.threads)
        r = runs[side]
        print(
            f"{side}: {len(r['iteration_seconds'])} iterations in {r['iteration_seconds'][-1]:.1f} s "
            f"(process {r['process_seconds']:.0f} s, peak RSS {r['peak_rss_mib']:.0f} MiB, "
            f"load {r['load_average_after']:.2f})",
            flush=True,
        )
    # the evaluation: SFT first, then every saved policy; proxy scores in tether-ppo's normalised units
    policies = [{"name": "sft", "path": None}] + [
        {"name": f"{side}@{c['iteration']}", "path": c["path"]} for side in sides for c in runs[side]["checkpoints"]
    ]
    (work / "policies.json").write_text(json.dumps(policies))
    settings["proxy_normalisation"] = (runs.get("tether-ppo") or {}).get("reward_normalisation")
    (work / "settings.json").write_text(json.dumps(settings))
    (work / "eval.result.json").unlink(missing_ok=True)  # the evaluation always runs again
    evaluation = launch("eval", work, args.threads)
    metrics = evaluation["metrics"]
    curves = {
        side: [
            {"iteration": c["iteration"], "seconds": c["seconds"], **metrics[f"{side}@{c['iteration']}"]}
            for c in runs[side]["checkpoints"]
        ]
        for side in sides
    }
    ttq = time_to_quality(curves)
    text = table(curves, ttq, metrics["sft"])
    print(text)
    png = args.out.with_suffix(".png")
    plot(curves, ttq, png, "Time to quality, demo task" + (" (smoke: tiny random models)" if args.smoke else ""))
    report = {
        "benchmark": "time_to_quality",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/time_to_quality.py " + " ".join(sys.argv[1:]),
        "smoke": args.smoke,
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "threads_per_process": args.threads,
            "platform": platform.platform(),
        },
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "versions": {
            "tether_commit": subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
            ).stdout.strip(),
            "tether": versions(PYTHON, side_env("tether-ppo", 1)),
            **({"trl112-ppo": versions(PYTHON, side_env("trl112-ppo", 1))} if "trl112-ppo" in sides else {}),
            **({"trl116-rloo": versions(trl116_python())} if "trl116-rloo" in sides else {}),
        },
        "settings": settings | data,
        "differences": {
            "reward": "tether normalises the RM score (mean 0, std 1 on SFT samples; the scoring is timed and "
            "counted); TRL trains on the raw score",
            "missing_stop": "tether: the score of a response without the stop token is replaced by -1 (normalised); "
            f"TRL 1.12 PPO: {TRL_PPO_MISSING_EOS_PENALTY} subtracted from the raw score; TRL 1.16 RLOO: none",
            "critic": "tether-ppo: value head on the policy (the demo's); TRL 1.12 PPO: a separate value model "
            "initialised from the RM",
            "rm_reading": "tether reads the RM at the stop token (as trained); TRL 1.12 PPO at the last token before "
            "it; TRL 1.16 RLOO re-renders the decoded text with the chat template (<|im_end|> appended)",
            "prompt_order": "same prompts, same seed; each trainer's own sampler shuffles them",
        },
        "time_to_quality": ttq,
        "curves": curves,
        "sft": metrics["sft"],
        "runs": runs,
        "evaluation": {k: v for k, v in evaluation.items() if k != "metrics"},
        "table": text,
        "plot": str(png),
        "wall_seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(f".tmp-{args.out.name}")
    tmp_out.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp_out, args.out)
    print(f"wrote {args.out} and {png} ({report['wall_seconds']:.0f} s)")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
