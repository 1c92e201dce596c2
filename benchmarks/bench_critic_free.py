"""Critic-free RL on this CPU: tether (rloo, grpo) vs TRL 1.16 ``RLOOTrainer`` / ``GRPOTrainer``, one script run.

    .venv/bin/python benchmarks/bench_critic_free.py        # writes benchmarks/results/critic_free_cpu.json

Same work on every side: policy = the embedded SmolLM2-135M-Instruct (fp32), a frozen reference copy
(β = 0.05 > 0, so every side computes reference log-probs), reward model = one SmolLM2-135M
``LlamaForSequenceClassification`` with a seeded random one-label head (written once by the parent);
k = 4 completions per prompt, ``--batch_size`` completions per iteration (batch/k prompts), exactly
``--response_length`` completion tokens (tether ``--response_length``; TRL ``min_new_tokens`` =
``max_completion_length``), temperature 0.7, no top-k/top-p, one optimisation pass per batch with one
optimizer step (tether ``--ppo_epochs 1 --mini_batch_size batch``; TRL ``num_iterations 1``,
``steps_per_generation 1``, ``gradient_accumulation_steps 1``), lr 3e-6, no gradient checkpointing.
KL placement as each method defines it: RLOO puts β·KL into the reward on both sides; GRPO puts β·k3
into the loss (tether ``--kl_in_loss``).

Work that differs (recorded, not hidden): TRL's GRPO with aligned steps takes the "old" log-probs from
the training forward itself (ratio ≡ 1, no extra pass); tether always computes them in a no-grad pass
(TRL's RLOO does too). TRL re-tokenises the decoded completions for the reward model; tether scores
the token ids.

Prompts are shaped like users' chats: multi-turn conversations built from data/qa_feedback (a user
turn with one passage and its question, the preferred answer as the assistant turn, then a follow-up
user turn), kept when their rendered length (chat template, generation prompt) lies in
``--prompt_tokens MIN,MAX`` (default 256..512 tokens, variable). Every side gets the same
conversations in the same order.

Sides: ``tether-rloo``, ``trl-rloo``, ``tether-grpo``, ``trl-grpo`` and ``tether-grpo-plain``
(tether with ``--share_prompt false``: the k completions of a prompt read as k separate rows and the
prompt prefilled k times, i.e. what the shared prompt saves). Each side runs ``--warmup`` untimed +
``--iterations`` timed iterations in its own fresh process; completions/s = batch × timed iterations
/ their wall time (end-of-iteration marks: tether's extra-metrics hook, TRL's ``on_step_end``). Peak
memory = VmHWM of the side's process. The order of the sides alternates between rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from _harness import OFFLINE_ENV, cpu_name, run_side, versions  # noqa: E402  (benchmarks/ is the script's folder)
from bench_ppo import count_optimizer_steps, peak_rss_mb, rss_mb, summarise

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PYTHON = Path(sys.executable)  # the tether side runs in the venv that runs this script, on this checkout's src/
TRL_PYTHON = Path(os.environ.get("TRL116_PYTHON", HERE / ".venv-trl116" / "bin" / "python"))
SIDES = ("tether-rloo", "trl-rloo", "tether-grpo", "trl-grpo", "tether-grpo-plain")
FOLLOW_UPS = (
    "Can you say that in one sentence?",
    "Which passage supports your answer best, and why?",
    "Is there any ambiguity in the question? Explain briefly.",
    "Rewrite your answer for a ten-year-old.",
)


def run_tether(work: Path, s: dict, estimator: str, share_prompt: bool) -> dict:
    from tether.data.records import Message
    from tether.ppo import PPOConfig, PPOTrainer
    from tether.tracking import read_jsonl

    chats = json.loads((work / "prompts.json").read_text())["messages"]
    prompts = [tuple(Message(**m) for m in chat) for chat in chats]
    out = work / f"tether-{os.getpid()}"
    config = PPOConfig(
        output_dir=str(out),
        model_name_or_path=s["model"],
        reward_model_path=str(work / "rm"),
        advantage_estimator=estimator,
        num_generations=s["k"],
        share_prompt=share_prompt,
        kl_in_loss=estimator == "grpo",
        batch_size=s["batch_size"],
        mini_batch_size=s["batch_size"],
        ppo_epochs=1,
        num_iterations=s["warmup"] + s["iterations"],
        response_length=s["response_length"],
        max_prompt_length=s["max_prompt_tokens"],
        temperature=s["temperature"],
        learning_rate=s["learning_rate"],
        init_kl_coef=s["beta"],
        normalize_reward=False,
        missing_eos_penalty=None,
        seed=s["seed"],
        save_steps=0,
        logging_steps=1000,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        dtype="float32",
    )
    marks: list[float] = []
    trainer = PPOTrainer(config, prompts, extra_metrics=lambda rollout: marks.append(time.perf_counter()) or {})
    steps = count_optimizer_steps(trainer.models.optimizer)
    loaded_rss = rss_mb()
    marks.append(time.perf_counter())
    trainer.train()
    rows = read_jsonl(out / "metrics.jsonl")
    timed = rows[s["warmup"] :]
    result = summarise(marks, s["warmup"], s["batch_size"], s["response_length"])
    result["split_seconds"] = {
        name: sum(r[f"time/{name}"] for r in timed) / len(timed) for name in ("generate", "score", "update")
    }
    result["mean_response_length"] = statistics.mean(r["response/length"] for r in rows)
    result["optimizer_steps_per_iteration"] = steps[0] / len(rows)
    result["rss_after_load_mb"] = loaded_rss
    result["shared_rows"] = trainer.rollout_settings.shared_rows
    # the first rollout checks grouped rows against plain rows on one group, once per run
    check = trainer.rollout_settings.shared_rows_check_seconds
    result["shared_rows_check_seconds"] = check
    if s["warmup"] == 0 and check:
        timed = result["timed_seconds"] - check
        result["episodes_per_s_without_check"] = s["batch_size"] * result["timed_iterations"] / timed
    return result


def run_trl(work: Path, s: dict, estimator: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    if estimator == "rloo":
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer
    else:
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer

    prompts = json.loads((work / "prompts.json").read_text())["messages"]
    n_iter = s["warmup"] + s["iterations"]
    tokenizer = AutoTokenizer.from_pretrained(s["model"], padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(s["model"], dtype=torch.float32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(work / "rm", dtype=torch.float32, num_labels=1)
    reward_tokenizer = AutoTokenizer.from_pretrained(work / "rm")
    args = Config(
        output_dir=str(work / f"trl-{os.getpid()}"),
        per_device_train_batch_size=s["batch_size"],
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=s["k"],
        num_iterations=1,
        max_steps=n_iter,
        max_completion_length=s["response_length"],
        generation_kwargs={"min_new_tokens": s["response_length"]},
        temperature=s["temperature"],
        top_p=1.0,
        top_k=0,
        learning_rate=s["learning_rate"],
        beta=s["beta"],
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        seed=s["seed"],
        disable_tqdm=True,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
    )
    n_prompts = s["batch_size"] // s["k"] * n_iter
    dataset = Dataset.from_dict({"prompt": prompts[:n_prompts]})
    trainer = Trainer(
        model=policy,
        reward_funcs=reward_model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        reward_processing_classes=reward_tokenizer,
    )
    marks: list[float] = []

    class Marks(TrainerCallback):
        def on_step_end(self, *_a, **_k):
            marks.append(time.perf_counter())

    trainer.add_callback(Marks())  # (the optimizer only exists once train() runs: steps from global_step)
    loaded_rss = rss_mb()
    marks.append(time.perf_counter())
    trainer.train()
    steps = [trainer.state.global_step]
    result = summarise(marks, s["warmup"], s["batch_size"], s["response_length"])
    lengths = [row["completions/mean_length"] for row in trainer.state.log_history if "completions/mean_length" in row]
    result["mean_response_length"] = statistics.mean(lengths) if lengths else None
    result["optimizer_steps_per_iteration"] = steps[0] / n_iter
    result["rss_after_load_mb"] = loaded_rss
    return result


def child(side: str, work: Path) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    settings = json.loads((work / "settings.json").read_text())
    library, estimator, *rest = side.split("-")
    if library == "tether":
        result = run_tether(work, settings, estimator, share_prompt=not rest)
    else:
        result = run_trl(work, settings, estimator)
    result["peak_rss_mb"] = peak_rss_mb()
    result["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------
# the parent: shared inputs, alternation, JSON


def conversations(tokenizer, low: int, high: int, n: int) -> tuple[list, list[int]]:
    """Multi-turn chats from data/qa_feedback whose rendered prompt has ``low..high`` tokens."""
    from tether.data.loading import load_preferences
    from tether.data.records import Message
    from tether.data.templates import prompt_ids

    chats, lengths, seen = [], [], set()
    for i, pair in enumerate(load_preferences(ROOT / "data" / "qa_feedback", "train")):
        text = pair.prompt[-1].content
        passage, _, question = text.partition("\n\n")
        question = question.rsplit("Question:", 1)[-1].strip()
        if question in seen:
            continue
        chat = [
            {"role": "user", "content": f"{passage}\n\nQuestion: {question}"},
            {"role": "assistant", "content": pair.chosen},
            {"role": "user", "content": FOLLOW_UPS[i % len(FOLLOW_UPS)]},
        ]
        tokens = prompt_ids(tokenizer, tuple(Message(**m) for m in chat), None)
        if low <= len(tokens) <= high:
            seen.add(question)
            chats.append(chat)
            lengths.append(len(tokens))
        if len(chats) == n:
            break
    if len(chats) < n:
        raise SystemExit(f"only {len(chats)} conversations of {low}..{high} tokens; widen --prompt_tokens")
    return chats, lengths


def prepare(work: Path, s: dict) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification

    from tether.models.loading import load_tokenizer, resolve_model_path

    s["model"] = resolve_model_path(s["model"])
    tokenizer = load_tokenizer(s["model"])
    n = s["batch_size"] // s["k"] * (s["warmup"] + s["iterations"])
    low, high = (int(x) for x in s["prompt_tokens"].split(","))
    chats, lengths = conversations(tokenizer, low, high, n)
    s["max_prompt_tokens"] = high
    (work / "prompts.json").write_text(json.dumps({"messages": chats}))
    torch.manual_seed(s["seed"])
    rm = AutoModelForSequenceClassification.from_pretrained(s["model"], num_labels=1, dtype=torch.float32)
    rm.config.pad_token_id = tokenizer.pad_token_id
    rm.save_pretrained(work / "rm", safe_serialization=True)
    tokenizer.save_pretrained(work / "rm")
    (work / "settings.json").write_text(json.dumps(s))
    return {"prompts": len(chats), "prompt_tokens": lengths, "mean_prompt_tokens": statistics.mean(lengths)}


def side_env(side: str, threads: int) -> dict[str, str]:
    env = {**os.environ, **OFFLINE_ENV, "BENCH_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    env.pop("PYTHONPATH", None)
    if side.startswith("tether"):
        env["PYTHONPATH"] = str(ROOT / "src")
    return env


def python_of(side: str) -> Path:
    return PYTHON if side.startswith("tether") else TRL_PYTHON


def aggregate(runs: list[dict]) -> dict:
    eps = [r["episodes_per_s"] for r in runs]
    out = {
        "completions_per_s": statistics.median(eps),
        "completions_per_s_runs": eps,
        "seconds_per_iteration": statistics.median(r["timed_seconds"] / r["timed_iterations"] for r in runs),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "optimizer_steps_per_iteration": runs[0]["optimizer_steps_per_iteration"],
        **(
            {"completions_per_s_without_check": statistics.median(r["episodes_per_s_without_check"] for r in runs)}
            if "episodes_per_s_without_check" in runs[0]
            else {}
        ),
        "mean_response_length": runs[0]["mean_response_length"],
    }
    if "split_seconds" in runs[0]:
        out["split_seconds_per_iteration"] = {
            k: statistics.median(r["split_seconds"][k] for r in runs) for k in runs[0]["split_seconds"]
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--batch_size", type=int, default=8, help="completions per iteration (batch/k prompts)")
    parser.add_argument("--k", type=int, default=4, help="completions per prompt")
    parser.add_argument("--response_length", type=int, default=32)
    parser.add_argument("--prompt_tokens", default="256,512", help="MIN,MAX rendered prompt tokens")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations at the start of each run")
    parser.add_argument("--iterations", type=int, default=2, help="timed iterations per run")
    parser.add_argument("--rounds", type=int, default=1, help="each round runs every side; the order alternates")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each side")
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "critic_free_cpu.json")
    args = parser.parse_args()
    if args.side:
        child(args.side, args.work)
        return
    if not TRL_PYTHON.exists():
        raise SystemExit(f"TRL 1.16 venv missing: {TRL_PYTHON}")
    settings = {
        k: getattr(args, k)
        for k in ("model", "batch_size", "k", "response_length", "prompt_tokens", "warmup", "iterations", "seed")
    }
    settings.update(temperature=0.7, learning_rate=3e-6, beta=0.05)
    sys.path.insert(0, str(ROOT / "src"))
    load_before = os.getloadavg()
    started = time.perf_counter()
    sides = args.sides.split(",")
    (HERE / "results").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tmp-critic-free-", dir=HERE / "results") as tmp:
        work = Path(tmp)
        data = prepare(work, settings)
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        failures: dict[str, str] = {}
        for r in range(args.rounds):
            for side in sides if r % 2 == 0 else sides[::-1]:
                cmd = [str(python_of(side)), str(Path(__file__).resolve()), "--side", side, "--work", str(work)]
                try:
                    result = run_side(side, cmd, side_env(side, args.threads), work)
                except SystemExit as exc:  # a side that fails is recorded (the others still run)
                    print(f"round {r + 1} {side}: FAILED {exc}", flush=True)
                    failures[side] = str(exc)
                    continue
                runs[side].append(result)
                partial = {"settings": settings | data, "runs": runs, "failures": failures}
                args.out.with_suffix(".partial.json").write_text(json.dumps(partial, indent=2) + "\n")
                print(
                    f"round {r + 1} {side}: {result['episodes_per_s']:.3f} completions/s, "
                    f"{result['timed_seconds'] / result['timed_iterations']:.1f} s/iteration, "
                    f"peak RSS {result['peak_rss_mb']:.0f} MiB, load {result['load_average_after']:.2f}",
                    flush=True,
                )
    summary = {side: aggregate(rs) for side, rs in runs.items() if rs}
    for estimator in ("rloo", "grpo"):
        if f"tether-{estimator}" in summary and f"trl-{estimator}" in summary:
            summary[f"speedup_{estimator}"] = (
                summary[f"tether-{estimator}"]["completions_per_s"] / summary[f"trl-{estimator}"]["completions_per_s"]
            )
    if "tether-grpo" in summary and "tether-grpo-plain" in summary:
        summary["shared_prompt_speedup_grpo"] = (
            summary["tether-grpo"]["completions_per_s"] / summary["tether-grpo-plain"]["completions_per_s"]
        )
    report = {
        "benchmark": "critic_free_cpu",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "threads_per_side": args.threads,
            "platform": platform.platform(),
            "shared": "other jobs ran on the same cores",
        },
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "versions": {"tether_side": versions(PYTHON, side_env("tether", 1)), "trl_side": versions(TRL_PYTHON)},
        "command": "python benchmarks/bench_critic_free.py " + " ".join(sys.argv[1:]),
        "settings": settings | data,
        "wall_seconds": time.perf_counter() - started,
        "summary": summary,
        "failures": failures,
        "runs": runs,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".partial.json").unlink(missing_ok=True)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
