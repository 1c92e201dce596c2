"""DPO: tether against TRL 1.16 ``DPOTrainer``, same model, data and settings, in one script run.

    .venv/bin/python benchmarks/bench_dpo.py            # writes benchmarks/results/dpo.json
    .venv/bin/python benchmarks/bench_dpo.py --data qa_feedback --max_length 1536 --rounds 1 \
        --sides tether,trl,trl_precompute --output benchmarks/results/dpo_qa_feedback.json

``--data qa_feedback``: real pairs from ``data/qa_feedback`` (train split for training, test split held
out), prompts whole. ``--sides``: ``tether``, ``tether_padded`` (``--padding_free false``), ``trl``
(its defaults: live reference) and ``trl_precompute`` (``precompute_ref_log_probs=True``, TRL's
fastest CPU-valid option: its ``padding_free`` is FlashAttention-only and disabled in 1.16; the
reference pass is inside its ``train()`` and so in its time). Each side reports its peak resident
memory (``VmHWM``).

The script is the driver; each side trains in its own fresh process, alternating (tether, TRL,
tether, TRL, ... for ``--rounds``): tether in this venv, TRL in ``benchmarks/.venv-trl116`` (built
on first use with torch 2.13.0 CPU pinned first, then ``trl==1.16.0``). Settings shared by both:
the model (default: the embedded SmolLM2-135M-Instruct), the preference pairs (synthetic, made
here, with a chat prompt that includes the model's default system prompt), the token sequences
(TRL gets the prompt already rendered by the chat template, so both sides train on the same ids;
the driver checks the token counts), batch size, max length, epochs (so optimizer steps),
learning rate and schedule, β, loss, precision, no gradient checkpointing, a live reference model
(no precomputation) and the same seed. Throughput is pairs per second of ``trainer.train()``
(``train_runtime``; model loading and tokenisation excluded on both sides); held-out accuracy is the
implicit-reward accuracy on the same held-out pairs after training.

Timings on a shared machine are noisy: the JSON records the load average before and after.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

from _harness import OFFLINE_ENV, peak_rss_mib, qa_feedback_rows, run_side  # noqa: E402  (benchmarks/ is the script's folder)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TRL_VENV = HERE / ".venv-trl116"
RESULTS = HERE / "results"

TOPICS = [
    "the ocean",
    "a rainy day",
    "learning to cook",
    "an old library",
    "mountain hiking",
    "city buses",
    "growing tomatoes",
    "the night sky",
    "a first job",
    "playing chess",
    "winter mornings",
    "bicycles",
    "reading poetry",
    "a quiet village",
    "honey bees",
    "train journeys",
    "baking bread",
    "a busy market",
    "ancient maps",
    "learning a language",
    "river fishing",
    "solar panels",
    "a school garden",
    "jazz music",
    "making pottery",
    "desert plants",
    "lighthouses",
    "birdwatching",
    "paper airplanes",
    "the moon landing",
    "public parks",
    "tea ceremonies",
    "old cameras",
    "snowy forests",
    "sailing boats",
    "a science fair",
    "street food",
    "wooden furniture",
    "volcanoes",
    "museum visits",
]
QUESTIONS = [
    "Can you tell me something interesting about {t}?",
    "Write two sentences about {t}.",
    "What should a beginner know about {t}?",
    "Describe {t} for a child.",
    "Why do people enjoy {t}?",
]
GOOD = [
    "Of course! {T} is a wonderful subject: people often find that it rewards patience and curiosity, "
    "and there is always something new to notice.",
    "Happy to help. {T} can be surprisingly rich; a good way to start is to look closely, ask questions, "
    "and enjoy the small details.",
    "Great question! Many people love {t} because it brings calm, a sense of discovery, and good stories "
    "to share with friends.",
    "Sure. {T} is worth exploring slowly; start simple, stay curious, and you will learn a lot along the way.",
]
BAD = [
    "Ugh, {t}? Who cares. Figure it out yourself.",
    "That is a boring question about {t} and I will not answer it properly.",
    "No. {T} is pointless, stop asking me things.",
    "Whatever. Go read about {t} somewhere else, I am busy.",
]


def make_pairs(n: int, seed: int) -> list[dict]:
    """Preference pairs where the chosen answer is helpful and polite and the rejected one dismissive."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        t = rng.choice(TOPICS)
        fill = {"t": t, "T": t[0].upper() + t[1:]}
        rows.append(
            {
                "prompt": rng.choice(QUESTIONS).format(**fill),
                "chosen": rng.choice(GOOD).format(**fill),
                "rejected": rng.choice(BAD).format(**fill),
            }
        )
    return rows


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# --------------------------------------------------------------------------------------------
# the two workers (each runs in its own process and prints one JSON line)
# --------------------------------------------------------------------------------------------


SIDES = ("tether", "tether_padded", "trl", "trl_precompute")


def run_tether(args, train_rows, eval_rows, padding_free: bool = True) -> dict:
    import torch

    from tether.data.records import PreferencePair
    from tether.data.templates import Truncation
    from tether.models.loading import load_tokenizer
    from tether.stages.dpo import DPOConfig, tokenize_pairs, train_dpo

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    train = [PreferencePair(r["prompt"], r["chosen"], r["rejected"]) for r in train_rows]
    held_out = [PreferencePair(r["prompt"], r["chosen"], r["rejected"]) for r in eval_rows]
    tokens = sum(
        len(x.prompt) * 2 + len(x.chosen) + len(x.rejected)
        for x in tokenize_pairs(tokenizer, train, Truncation(max_length=args.max_length))[0]
    )
    config = DPOConfig(
        model_name_or_path=args.model,
        output_dir=args.out,
        overwrite_output_dir=True,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        learning_rate=args.learning_rate,
        beta=args.beta,
        loss_type="sigmoid",
        max_length=args.max_length,
        max_prompt_length=args.max_length,
        padding_free=padding_free,
        lr_scheduler_type="linear",
        warmup_steps=0,
        optim="adamw_torch",
        gradient_checkpointing=False,
        bf16=False,
        use_cpu=args.cpu,
        report_to="none",
        save_strategy="no",
        logging_steps=1000,
        seed=args.seed,
        disable_tqdm=True,
        dtype="float32",
    )
    metrics = train_dpo(config, train, held_out, tokenizer=tokenizer)
    return {
        "train_runtime_s": metrics["train"]["train_runtime"],
        "optimizer_steps": metrics["train"].get("global_step"),
        "eval_accuracy": metrics["eval"]["eval_rewards/accuracies"],
        "eval_loss": metrics["eval"]["eval_loss"],
        "eval_margin": metrics["eval"]["eval_rewards/margins"],
        "train_tokens_as_two_sequences": tokens,
        "padding_free_rows": metrics["train"]["padding_free_rows"],
    }


def run_trl(args, train_rows, eval_rows, precompute_ref_log_probs: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    def rendered(rows):  # the prompt as tether renders it (one user turn, generation prompt), same ids
        return [
            {
                "prompt": tokenizer.apply_chat_template(
                    [{"role": "user", "content": r["prompt"]}], tokenize=False, add_generation_prompt=True
                ),
                "chosen": r["chosen"],
                "rejected": r["rejected"],
            }
            for r in rows
        ]

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    config = DPOConfig(
        output_dir=args.out,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        learning_rate=args.learning_rate,
        beta=args.beta,
        loss_type=["sigmoid"],
        max_length=args.max_length,
        lr_scheduler_type="linear",
        warmup_steps=0,
        optim="adamw_torch",
        gradient_checkpointing=False,
        bf16=False,
        use_cpu=args.cpu,
        report_to="none",
        save_strategy="no",
        logging_steps=1000,
        seed=args.seed,
        disable_tqdm=True,
        precompute_ref_log_probs=precompute_ref_log_probs,
    )
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rendered(train_rows)),
        eval_dataset=Dataset.from_list(rendered(eval_rows)),
        processing_class=tokenizer,
    )
    tokens = sum(
        2 * len(x["prompt_ids"]) + len(x["chosen_ids"]) + len(x["rejected_ids"]) for x in trainer.train_dataset
    )
    result = trainer.train()
    metrics = trainer.evaluate()
    return {
        "train_runtime_s": result.metrics["train_runtime"],
        "optimizer_steps": trainer.state.global_step,
        "eval_accuracy": metrics["eval_rewards/accuracies"],
        "eval_loss": metrics["eval_loss"],
        "eval_margin": metrics["eval_rewards/margins"],
        "train_tokens_as_two_sequences": tokens,
    }


def worker(args) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.data == "qa_feedback":  # real pairs; held-out ones from the test questions
        train_rows = qa_feedback_rows("train", args.train_pairs, args.seed)
        eval_rows = qa_feedback_rows("test", args.eval_pairs, args.seed)
    else:
        rows = make_pairs(args.train_pairs + args.eval_pairs, args.seed)
        train_rows, eval_rows = rows[: args.train_pairs], rows[args.train_pairs :]
    started = time.perf_counter()
    if args.worker.startswith("tether"):
        result = run_tether(args, train_rows, eval_rows, padding_free=args.worker == "tether")
    else:
        result = run_trl(args, train_rows, eval_rows, precompute_ref_log_probs=args.worker == "trl_precompute")
    result["wall_s"] = time.perf_counter() - started
    result["pairs_per_s"] = args.train_pairs * args.epochs / result["train_runtime_s"]
    result["peak_rss_mib"] = peak_rss_mib()
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------------


def trl_python() -> Path:
    python = TRL_VENV / "bin" / "python"
    if (
        python.exists()
        and subprocess.run([str(python), "-c", "import trl, datasets"], capture_output=True).returncode == 0
    ):
        return python
    # Another job may be building it: wait up to 10 minutes before building our own.
    deadline = time.time() + 600
    while TRL_VENV.exists() and time.time() < deadline:
        if (
            python.exists()
            and subprocess.run([str(python), "-c", "import trl, datasets"], capture_output=True).returncode == 0
        ):
            return python
        time.sleep(15)
    subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    # torch pinned first, from the configured index (2.13.0 there is the CPU wheel), as scripts/bootstrap.sh does
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    subprocess.run(pip + ["trl==1.16.0", "transformers==5.23.0", "accelerate==1.15.0", "datasets==5.2.0"], check=True)
    return python


def launch(side: str, python: Path, args, out_dir: Path) -> dict:
    cmd = [str(python), str(Path(__file__).resolve()), "--worker", side, "--out", str(out_dir / side)]
    for key in (
        "model",
        "data",
        "train_pairs",
        "eval_pairs",
        "batch_size",
        "epochs",
        "learning_rate",
        "beta",
        "max_length",
        "seed",
        "threads",
    ):
        cmd += [f"--{key}", str(getattr(args, key))]
    if args.cpu:
        cmd += ["--cpu"]
    env = dict(os.environ, **OFFLINE_ENV, PYTHONPATH=str(ROOT / "src"))
    if side.startswith("trl"):
        env.pop("PYTHONPATH")  # TRL's venv must not see tether
    return run_side(side, cmd, env, ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=SIDES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument(
        "--data",
        choices=["synthetic", "qa_feedback"],
        default="synthetic",
        help="synthetic pairs (made here) or real ones from data/qa_feedback (training pairs drawn from its train "
        "split, held-out pairs from its test split)",
    )
    parser.add_argument(
        "--sides",
        default="tether,trl",
        help=f"comma-separated, from {', '.join(SIDES)} (tether_padded: --padding_free false; trl_precompute: "
        "TRL with precompute_ref_log_probs=True, its reference pass counted in its training time)",
    )
    parser.add_argument("--train_pairs", type=int, default=64)
    parser.add_argument("--eval_pairs", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=2e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per side (1: on a busy shared machine, OpenMP barriers stall with more)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternating tether/TRL runs per side")
    parser.add_argument("--cpu", action="store_true", default=True)
    parser.add_argument("--output", default=str(RESULTS / "dpo.json"))
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    if args.model is None:
        sys.path.insert(0, str(ROOT / "src"))
        from tether.models.loading import ensure_embedded_model

        args.model = str(ensure_embedded_model())
    python = trl_python()
    import tempfile

    load_before = load_average()
    sides = args.sides.split(",")
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory(prefix="tmp-dpo-", dir=RESULTS if RESULTS.exists() else None) as tmp:
        for round_ in range(args.rounds):
            for side in sides:
                runs[side].append(
                    launch(
                        side,
                        Path(sys.executable) if side.startswith("tether") else python,
                        args,
                        Path(tmp) / f"round{round_}",
                    )
                )
                print(f"{side} round {round_ + 1}: {runs[side][-1]}", flush=True)

    def best(side: str) -> dict:  # the fastest run of each side (least disturbed by other jobs)
        return max(runs[side], key=lambda r: r["pairs_per_s"])

    bests = {side: best(side) for side in sides}
    for row in bests.values():  # binomial standard error of the held-out accuracy: sqrt(a (1 − a) / n)
        row["eval_accuracy_standard_error"] = (
            row["eval_accuracy"] * (1 - row["eval_accuracy"]) / args.eval_pairs
        ) ** 0.5
    tether, trl = bests.get("tether"), bests.get("trl")
    result = {
        "benchmark": "dpo",
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores ({platform.processor() or platform.platform()})",
        "command": "benchmarks/bench_dpo.py " + " ".join(sys.argv[1:]),
        "settings": {
            "model": "SmolLM2-135M-Instruct" if "SmolLM2" in args.model else args.model,
            "data": args.data,
            "train_pairs": args.train_pairs,
            "eval_pairs": args.eval_pairs,
            "batch_size": args.batch_size,
            "epochs": args.epochs,
            "learning_rate": args.learning_rate,
            "beta": args.beta,
            "loss": "sigmoid",
            "max_length": args.max_length,
            "precision": "float32",
            "gradient_checkpointing": False,
            "reference": "live (no precomputation), except trl_precompute (precompute_ref_log_probs=True)",
            "seed": args.seed,
            "torch_threads": args.threads,
            "rounds": args.rounds,
        },
        **bests,
        "trl_version": "1.16.0",
        "ratio_pairs_per_s": tether["pairs_per_s"] / trl["pairs_per_s"] if tether and trl else None,
        "ratios_to_tether": {s: tether["pairs_per_s"] / r["pairs_per_s"] for s, r in bests.items()} if tether else None,
        "same_token_sequences": len({r["train_tokens_as_two_sequences"] for r in bests.values()}) == 1,
        "all_runs": runs,
        "load_average_before_after": [load_before, load_average()],
        "note": "Shared 2-core machine with other jobs running: timings are noisy; each side's fastest of "
        f"{args.rounds} alternating run(s) is reported. Run kept to a few minutes on purpose.",
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("ratio_pairs_per_s", "same_token_sequences")}, indent=2))
    for side, row in bests.items():
        print(
            f"{side}: {row['pairs_per_s']:.3f} pairs/s, acc {row['eval_accuracy']:.3f}, {row['peak_rss_mib']:.0f} MiB"
        )


if __name__ == "__main__":
    main()
