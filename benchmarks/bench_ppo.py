"""PPO on this CPU: tether vs TRL 1.12.0 `trl.experimental.ppo.PPOTrainer`, same work, one script run.

    .venv/bin/python benchmarks/bench_ppo.py                 # writes benchmarks/results/ppo_cpu.json
    .venv/bin/python benchmarks/bench_ppo.py --memory        # writes benchmarks/results/ppo_memory.json
    # issue 7's H100 settings (writes results/ppo_cuda.json; peak GPU memory of each side is recorded):
    .venv/bin/python benchmarks/bench_ppo.py --device cuda --precision bf16 --batch_size 64 \
        --mini_batch_size 16 --ppo_epochs 4 --response_length 53 [--architecture 24x1024]

Same work on both sides (issue 7's CPU setting): policy = the embedded SmolLM2-135M-Instruct, fp32;
reward model = value model = one SmolLM2-135M ``LlamaForSequenceClassification`` (the same backbone
with a seeded random one-label head, written once by the parent, the same folder for both sides;
each side trains its own copy as the critic); a frozen reference copy of the policy; batch 16
prompts, exactly 32 response tokens (tether ``--response_length 32``; TRL with no stop token and the
policy's ``generation_config.eos_token_id = None``, so it always generates ``response_length``), 2 PPO
epochs, mini-batch 8 (4 optimizer steps per iteration on both sides, counted by a step hook on the
torch optimizer), temperature 0.7, lr 3e-6 linear decay, AdamW eps 1e-5 (fused), β 0.05, no
gradient checkpointing, no reward whitening, dropout off. The prompts are 64 prompts of the embedded
demo task that render (tether's template rule, chat template) to 40 or 41 tokens, so every batch on
both sides is 41 prompt + 32 response tokens; both sides receive the same token ids.

TRL geometry: per_device_train_batch_size 16, gradient_accumulation_steps 1, num_mini_batches 2
(TRL slices each 8-row minibatch with the 16-row micro-batch size, so one forward/backward per
minibatch and one optimizer step each: 4 per iteration as tether). The brief's alternative
(per_device 8 × accumulation 2) makes accelerate step the optimizer only every other minibatch
(2 steps per iteration), which is less work than tether's; the hook records the count either way.

Timing: each side runs ``--warmup`` + ``--iterations`` PPO iterations in its own fresh process; the
warm-up iterations are not timed. An iteration's time is the wall time between consecutive
end-of-iteration marks (tether: the extra-metrics hook, called once per iteration after the update;
TRL: the ``on_step_end`` callback), so everything the loop does counts on both sides. Time split:
tether reports its own ``time/generate|score|update``; for TRL the module-level ``batch_generation``
and ``forward`` functions are wrapped with timers (they are called, unchanged): generation = the
``batch_generation`` call, update = from the first grad-enabled ``forward`` to the end of the
iteration, scoring = the rest. Peak memory = VmHWM of the side's process (/proc/self/status; one
process per side and round, so nothing else counts), read at its end.

The sides alternate tether, TRL, TRL, tether, ... for ``--rounds`` rounds so drift in machine load
hits both; the load average is recorded before and after. The TRL process imports TRL 1.12.0 from
``benchmarks/.peers/trl-1.12.0`` (``PYTHONPATH``) with the main venv's torch/transformers.
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PYTHON = ROOT / ".venv" / "bin" / "python"
TRL_PATH = HERE / ".peers" / "trl-1.12.0"
PROMPT_LENGTHS = (40, 41)


# ------------------------------------------------------------------------------------------------
# helpers shared by the processes


def peak_rss_mb() -> float:
    """VmHWM (peak resident set size) of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def count_optimizer_steps(optimizer) -> list[int]:
    """A counter of real optimizer steps (accelerate's wrapper may skip ``step`` while accumulating)."""
    import torch

    inner = optimizer
    while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):  # accelerate's wrapper
        inner = inner.optimizer
    counter = [0]
    inner.register_step_post_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
    return counter


def summarise(marks: list[float], warmup: int, batch: int, tokens_per_episode: int) -> dict:
    """Per-iteration times from end-of-iteration marks (``marks[0]`` = training start)."""
    durations = [b - a for a, b in zip(marks, marks[1:])]
    timed = durations[warmup:]
    seconds = sum(timed)
    return {
        "iteration_seconds": durations,
        "timed_iterations": len(timed),
        "timed_seconds": seconds,
        "episodes_per_s": batch * len(timed) / seconds,
        "generated_tokens_per_s": batch * tokens_per_episode * len(timed) / seconds,
    }


# ------------------------------------------------------------------------------------------------
# the two sides (each runs in its own process)


def run_tether(work: Path, s: dict) -> dict:
    from tether.ppo import PPOConfig, PPOTrainer
    from tether.tracking import read_jsonl

    prompts = json.loads((work / "prompts.json").read_text())["texts"]
    out = work / f"tether-{os.getpid()}"
    config = PPOConfig(
        output_dir=str(out),
        model_name_or_path=s["model"],
        reward_model_path=str(work / "rm"),
        batch_size=s["batch_size"],
        mini_batch_size=s["mini_batch_size"],
        ppo_epochs=s["ppo_epochs"],
        num_iterations=s["warmup"] + s["iterations"],
        response_length=s["response_length"],
        temperature=s["temperature"],
        learning_rate=s["learning_rate"],
        adam_epsilon=1e-5,
        lr_scheduler_type="linear",
        init_kl_coef=s["kl_coef"],
        vf_coef=0.1,
        normalize_reward=False,
        missing_eos_penalty=None,
        seed=s["seed"],
        save_steps=0,
        logging_steps=1000,
        report_to="none",
        disable_tqdm=True,
        use_cpu=s["device"] == "cpu",
        dtype="float32",
        bf16=s["precision"] == "bf16",
        optim="adamw_torch_fused",
        **s.get("tether_options", {}),
    )
    marks: list[float] = []
    trainer = PPOTrainer(config, prompts, extra_metrics=lambda rollout: marks.append(time.perf_counter()) or {})
    steps = count_optimizer_steps(trainer.models.optimizer)
    loaded_rss = rss_mb()
    marks.append(time.perf_counter())
    trainer.train()
    rows = [r for r in read_jsonl(out / "metrics.jsonl")]
    timed = rows[s["warmup"] :]
    result = summarise(marks, s["warmup"], s["batch_size"], s["response_length"])
    result["split_seconds"] = {
        name: sum(r[f"time/{name}"] for r in timed) / len(timed) for name in ("generate", "score", "update")
    }
    result["mean_response_length"] = statistics.mean(r["response/length"] for r in rows)
    result["optimizer_steps_per_iteration"] = steps[0] / len(rows)
    result["rss_after_load_mb"] = loaded_rss
    result["first_iteration_ratio_max_dev"] = rows[0].get("policy/ratio_max_dev")
    return result


def run_trl(work: Path, s: dict) -> dict:
    import copy

    import torch
    import trl.experimental.ppo.ppo_trainer as trl_ppo
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    ids = json.loads((work / "prompts.json").read_text())["ids"]
    tokenizer = AutoTokenizer.from_pretrained(s["model"], padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(s["model"], dtype=torch.float32)
    policy.generation_config.eos_token_id = None  # never stop early: exactly response_length tokens
    reference = copy.deepcopy(policy)
    reward_model = AutoModelForSequenceClassification.from_pretrained(work / "rm", dtype=torch.float32, num_labels=1)
    value_model = AutoModelForSequenceClassification.from_pretrained(work / "rm", dtype=torch.float32, num_labels=1)
    n_iter = s["warmup"] + s["iterations"]
    args = PPOConfig(
        output_dir=str(work / f"trl-{os.getpid()}"),
        per_device_train_batch_size=s["batch_size"],
        gradient_accumulation_steps=1,
        num_mini_batches=s["batch_size"] // s["mini_batch_size"],
        local_rollout_forward_batch_size=s["batch_size"],
        num_ppo_epochs=s["ppo_epochs"],
        response_length=s["response_length"],
        stop_token=None,
        total_episodes=s["batch_size"] * n_iter,
        temperature=s["temperature"],
        learning_rate=s["learning_rate"],
        adam_epsilon=1e-5,
        lr_scheduler_type="linear",
        kl_coef=s["kl_coef"],
        vf_coef=0.1,
        missing_eos_penalty=None,
        num_sample_generations=0,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        seed=s["seed"],
        disable_tqdm=True,
        use_cpu=s["device"] == "cpu",
        bf16=s["precision"] == "bf16",
        fp16=False,
        gradient_checkpointing=False,
        optim="adamw_torch_fused",
        dataloader_num_workers=0,
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

    # timers around TRL's own module-level functions (they still run, unchanged)
    phase: dict[str, list[float]] = {"gen_start": [], "gen_end": [], "update_start": []}
    original_generation, original_forward = trl_ppo.batch_generation, trl_ppo.forward

    def timed_generation(*a, **k):
        phase["gen_start"].append(time.perf_counter())
        out = original_generation(*a, **k)
        phase["gen_end"].append(time.perf_counter())
        return out

    def timed_forward(*a, **k):
        if torch.is_grad_enabled() and len(phase["update_start"]) < len(phase["gen_end"]):
            phase["update_start"].append(time.perf_counter())
        return original_forward(*a, **k)

    trl_ppo.batch_generation, trl_ppo.forward = timed_generation, timed_forward
    marks: list[float] = []
    lengths: list[float] = []

    class Marks(TrainerCallback):
        def on_step_end(self, *_a, **_k):
            marks.append(time.perf_counter())

    trainer.add_callback(Marks())
    steps = count_optimizer_steps(trainer.optimizer)
    original_batch = trl_ppo.batch_generation

    def measured_generation(*a, **k):
        query_responses, logits = original_batch(*a, **k)
        lengths.append(query_responses.shape[1] - a[1].shape[1])
        return query_responses, logits

    trl_ppo.batch_generation = measured_generation
    loaded_rss = rss_mb()
    marks.append(time.perf_counter())
    trainer.train()
    w = s["warmup"]
    result = summarise(marks, w, s["batch_size"], s["response_length"])
    ends = marks[1:]
    generate = [b - a for a, b in zip(phase["gen_start"], phase["gen_end"])][w:]
    update = [e - u for u, e in zip(phase["update_start"], ends)][w:]
    score = [u - g for g, u in zip(phase["gen_end"], phase["update_start"])][w:]
    result["split_seconds"] = {
        "generate": statistics.mean(generate),
        "score": statistics.mean(score),
        "update": statistics.mean(update),
    }
    result["mean_response_length"] = statistics.mean(lengths)
    result["optimizer_steps_per_iteration"] = steps[0] / n_iter
    result["rss_after_load_mb"] = loaded_rss
    if any(n != s["response_length"] for n in lengths):
        raise SystemExit(f"TRL generated {lengths} tokens, not {s['response_length']}: the comparison is off")
    return result


def child(side: str, work: Path) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    settings = json.loads((work / "settings.json").read_text())
    result = (run_tether if side == "tether" else run_trl)(work, settings)
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["peak_rss_mb"] = peak_rss_mb()
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        result["peak_gpu_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["peak_gpu_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
        result["gpu"] = torch.cuda.get_device_name()
    result["cpu_user_seconds"], result["cpu_system_seconds"] = usage.ru_utime, usage.ru_stime
    result["minor_page_faults"] = usage.ru_minflt
    result["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------
# the parent: shared inputs, alternation, JSON


def prepare(work: Path, s: dict) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification

    from tether.data.loading import load_prompts
    from tether.data.templates import prompt_ids
    from tether.models.loading import load_tokenizer, resolve_model_path

    s["model"] = resolve_model_path(s["model"])
    tokenizer = load_tokenizer(s["model"])
    if s.get("architecture"):
        s["model"] = str(random_model(work / "policy", s["model"], s["architecture"], s["seed"]))
    n = s["batch_size"] * (s["warmup"] + s["iterations"])
    texts, ids = [], []
    for record in load_prompts("embedded:demo"):
        tokens = prompt_ids(tokenizer, record.prompt, None)
        if len(tokens) in PROMPT_LENGTHS:
            texts.append(record.prompt)
            ids.append(tokens)
        if len(ids) == n:
            break
    unique = len(ids)
    texts, ids = [texts[i % unique] for i in range(n)], [ids[i % unique] for i in range(n)]  # repeated if too few
    if isinstance(texts[0], (list, tuple)):  # chat messages → plain dicts for JSON
        texts = [[{"role": m.role, "content": m.content} for m in t] for t in texts]
    (work / "prompts.json").write_text(json.dumps({"texts": texts, "ids": ids}))
    torch.manual_seed(s["seed"])
    rm = AutoModelForSequenceClassification.from_pretrained(s["model"], num_labels=1, dtype=torch.float32)
    rm.config.pad_token_id = tokenizer.pad_token_id
    rm.save_pretrained(work / "rm", safe_serialization=True)
    tokenizer.save_pretrained(work / "rm")
    (work / "settings.json").write_text(json.dumps(s))
    return {"prompts": len(ids), "unique_prompts": unique, "prompt_tokens": sorted({len(i) for i in ids})}


def family_overrides(architecture: str) -> dict:
    """Config fields of the base model's family resized to ``LAYERSxWIDTH`` (e.g. ``24x1024``).

    Heads of 64 dimensions; a third as many key/value heads when that divides (SmolLM2-135M: 9 and
    3), else a quarter; the MLP 8/3 times as wide (SmolLM2's 1536/576), rounded to a multiple of 64.
    """
    layers, width = (int(x) for x in architecture.lower().split("x"))
    heads = width // 64
    return {
        "num_hidden_layers": layers,
        "hidden_size": width,
        "num_attention_heads": heads,
        "head_dim": 64,
        "num_key_value_heads": heads // 3 if heads % 3 == 0 else heads // 4 if heads % 4 == 0 else heads,
        "intermediate_size": round(width * 8 / 3 / 64) * 64,
    }


def family_config(base: str, architecture: str | None) -> dict:
    """The base model's config (a dict), resized by :func:`family_overrides` when ``architecture`` is given."""
    config = json.loads((Path(base) / "config.json").read_text())
    return config | family_overrides(architecture) if architecture else config


def random_model(folder: Path, base: str, architecture: str, seed: int) -> Path:
    """Random weights of :func:`family_overrides` (throughput benchmarks only; the base's tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tether.models.loading import load_tokenizer

    config = AutoConfig.from_pretrained(base, **family_overrides(architecture))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    load_tokenizer(base).save_pretrained(folder)
    return folder


def side_env(side: str, threads: int | None = None) -> dict[str, str]:
    env = {**os.environ, **OFFLINE_ENV}
    if threads is not None:
        env.update(BENCH_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    env.pop("PYTHONPATH", None)
    if side == "trl":
        env["PYTHONPATH"] = str(TRL_PATH)
    return env


def launch(side: str, work: Path, threads: int) -> dict:
    return run_side(
        side,
        [str(PYTHON), str(Path(__file__).resolve()), "--side", side, "--work", str(work)],
        side_env(side, threads),
        work,
    )


def aggregate(runs: list[dict]) -> dict:
    eps = [r["episodes_per_s"] for r in runs]
    return {
        "episodes_per_s": statistics.median(eps),
        "episodes_per_s_runs": eps,
        "generated_tokens_per_s": statistics.median(r["generated_tokens_per_s"] for r in runs),
        "split_seconds_per_iteration": {
            k: statistics.median(r["split_seconds"][k] for r in runs) for k in runs[0]["split_seconds"]
        },
        "seconds_per_iteration": statistics.median(r["timed_seconds"] / r["timed_iterations"] for r in runs),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        **(
            {"peak_gpu_allocated_mb": max(r["peak_gpu_allocated_mb"] for r in runs)}
            if "peak_gpu_allocated_mb" in runs[0]
            else {}
        ),
        "optimizer_steps_per_iteration": runs[0]["optimizer_steps_per_iteration"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", choices=["tether", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--memory", action="store_true", help="the memory comparison instead (bench_ppo_memory.py)")
    parser.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--mini_batch_size", type=int, default=8)
    parser.add_argument("--ppo_epochs", type=int, default=2)
    parser.add_argument("--response_length", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations at the start of each run")
    parser.add_argument("--iterations", type=int, default=2, help="timed iterations per run")
    parser.add_argument("--rounds", type=int, default=2, help="each round runs both sides; the order alternates")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each side")
    parser.add_argument(
        "--tether_options",
        default="{}",
        help='JSON of extra PPOConfig fields for tether (e.g. \'{"rollout_logprobs": "generation"}\')',
    )
    parser.add_argument("--sides", default="tether,trl", help=argparse.SUPPRESS)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16: fp32 weights with bf16 autocast on both sides (TrainingArguments' bf16)",
    )
    parser.add_argument(
        "--architecture",
        default=None,
        help="LAYERSxWIDTH (e.g. 24x1024): random weights of that size in the model's family",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="default: results/ppo_DEVICE.json")
    args = parser.parse_args()
    if args.side:
        child(args.side, args.work)
        return
    if args.memory:
        sys.path.insert(0, str(HERE))
        from bench_ppo_memory import main as memory_main

        memory_main([])
        return
    if "trl" in args.sides.split(",") and not (TRL_PATH / "trl").is_dir():
        raise SystemExit(f"TRL 1.12.0 missing: {PYTHON.parent}/pip install --no-deps --target {TRL_PATH} trl==1.12.0")
    settings = {
        k: getattr(args, k)
        for k in (
            "model",
            "batch_size",
            "mini_batch_size",
            "ppo_epochs",
            "response_length",
            "warmup",
            "iterations",
            "seed",
            "device",
            "precision",
            "architecture",
        )
    }
    args.out = args.out or HERE / "results" / f"ppo_{args.device}.json"
    settings.update(temperature=0.7, learning_rate=3e-6, kl_coef=0.05, tether_options=json.loads(args.tether_options))
    (HERE / "results").mkdir(exist_ok=True)
    load_before = os.getloadavg()
    started = time.perf_counter()
    sides = args.sides.split(",")
    with tempfile.TemporaryDirectory(prefix="tmp-ppo-", dir=HERE / "results") as tmp:
        work = Path(tmp)
        data = prepare(work, settings)
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        for r in range(args.rounds):
            order = sides if r % 2 == 0 else sides[::-1]
            for side in order:
                result = launch(side, work, args.threads)
                runs[side].append(result)
                print(
                    f"round {r + 1} {side}: {result['episodes_per_s']:.3f} episodes/s, "
                    f"{result['timed_seconds'] / result['timed_iterations']:.1f} s/iteration, "
                    f"split {json.dumps({k: round(v, 2) for k, v in result['split_seconds'].items()})}, "
                    f"peak RSS {result['peak_rss_mb']:.0f} MiB, load {result['load_average_after']:.2f}",
                    flush=True,
                )
    summary = {side: aggregate(rs) for side, rs in runs.items()}
    report = {
        "benchmark": f"ppo_{args.device}",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "threads_per_side": args.threads,
            "platform": platform.platform(),
        },
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "versions": {
            "tether_side": versions(PYTHON, side_env("tether")),
            "trl_side": versions(PYTHON, side_env("trl")),
        },
        "command": "python benchmarks/bench_ppo.py " + " ".join(sys.argv[1:]),
        "settings": settings | data,
        "summary": summary,
        "runs": runs,
        "wall_seconds": time.perf_counter() - started,
    }
    if "tether" in summary and "trl" in summary:
        report["ratio_episodes_per_s"] = summary["tether"]["episodes_per_s"] / summary["trl"]["episodes_per_s"]
        report["ratio_peak_rss"] = summary["tether"]["peak_rss_mb"] / summary["trl"]["peak_rss_mb"]
        if "peak_gpu_allocated_mb" in summary["tether"]:
            report["ratio_peak_gpu_allocated"] = (
                summary["tether"]["peak_gpu_allocated_mb"] / summary["trl"]["peak_gpu_allocated_mb"]
            )
        print(
            f"tether {summary['tether']['episodes_per_s']:.3f} vs TRL {summary['trl']['episodes_per_s']:.3f} "
            f"episodes/s: {report['ratio_episodes_per_s']:.2f}x; peak RSS {summary['tether']['peak_rss_mb']:.0f} vs "
            f"{summary['trl']['peak_rss_mb']:.0f} MiB"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(f".tmp-{args.out.name}")
    tmp_out.write_text(json.dumps(report, indent=2))
    os.replace(tmp_out, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
