"""Reward-model training: tether vs TRL 1.16 `RewardTrainer`, same work, one script run.

    .venv/bin/python benchmarks/bench_reward.py            # writes benchmarks/results/reward.json
    .venv/bin/python benchmarks/bench_reward.py --data qa_feedback --max_length 1536 --train_pairs 16 \
        --eval_pairs 16 --sides tether,trl,tether_padded --out benchmarks/results/reward_qa_feedback.json

``--data qa_feedback``: real human preferences (``data/qa_feedback``: long passages), training pairs
drawn (seeded) from its train split and held-out pairs from its test split, prompts whole (with
``--max_length 1536`` no pair is cut; with ``--max_prompt_length P`` each pair's prompt is cut from the
left to P tokens by tether's ``--truncation prompt`` rule, and TRL receives the same cut ids).
``--sides``: ``tether`` (its defaults: shared prompt, padding-free rows), ``tether_padded``
(``--padding_free false``), ``trl``. Each side reports its peak resident memory (``VmHWM``).

Both sides get the same model (the embedded SmolLM2-135M-Instruct unless --model), the same
preference pairs tokenised once by tether's template rule (TRL receives them pre-tokenised as
``chosen_ids``/``rejected_ids``, so no pair is filtered or truncated on either side), the same
batch size, learning rate and schedule (linear decay, no warmup), AdamW eps, epochs, fp32, dropout
off, seed, and the same gradient checkpointing: off unless ``--gradient_checkpointing`` (TRL's
``RewardConfig`` turns it on by default, so it is set explicitly on both sides). TRL is told to pad
with ``<|endoftext|>`` (the pad tether saves its reward models with) so its sequence classifier
reads the score at the final stop token like tether does; with its default pad (= the stop token
for SmolLM2) it would read one token early.

Each side runs in its own subprocess and interpreter (TRL lives in ``benchmarks/.venv-trl116``),
in the order tether, TRL, TRL, tether, ... (``--rounds``), so drift in machine load hits both.
Throughput is training pairs / seconds of ``trainer.train()`` (for tether including its one-batch
check of the shared-prompt rows); held-out accuracy is each trainer's own evaluation on the same
held-out pairs, after training. The script never imports tether in the TRL process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from _harness import OFFLINE_ENV, cpu_name, peak_rss_mib, qa_feedback_rows, run_side, versions  # noqa: E402  (benchmarks/ is the script's folder)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TRL_PYTHON = HERE / ".venv-trl116" / "bin" / "python"
TETHER_PYTHON = ROOT / ".venv" / "bin" / "python" if (ROOT / ".venv").exists() else Path(sys.executable)
PAD_TOKEN = "<|endoftext|>"
SIDES = ("tether", "tether_padded", "trl")


# ------------------------------------------------------------------------------------------------
# the two sides (each runs in its own process)


def _common(settings: dict) -> dict:
    return dict(
        per_device_train_batch_size=settings["batch_size"],
        per_device_eval_batch_size=settings["batch_size"],
        num_train_epochs=settings["epochs"],
        learning_rate=settings["learning_rate"],
        lr_scheduler_type="linear",
        warmup_steps=0,
        adam_epsilon=1e-5,
        weight_decay=0.0,
        logging_steps=10,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=settings["seed"],
        disable_tqdm=True,
        use_cpu=True,
        bf16=False,
        fp16=False,
        dataloader_num_workers=0,
        # transformers' name; TRL's configs default its deprecated alias gradient_checkpointing to True
        activation_checkpointing=settings["gradient_checkpointing"],
    )


def run_tether(work: Path, settings: dict, padding_free: bool = True) -> dict:
    from tether.data.records import PreferencePair
    from tether.stages.reward import RewardConfig, train_reward

    def read(name):
        rows = [json.loads(line) for line in (work / name).read_text().splitlines()]
        return [PreferencePair(r["prompt"], r["chosen"], r["rejected"]) for r in rows]

    config = RewardConfig(
        output_dir=str(work / f"tether-{os.getpid()}"),
        model_name_or_path=settings["model"],
        max_length=settings["max_length"],
        max_prompt_length=settings["max_prompt_length"] or settings["max_length"],
        truncation="prompt" if settings["max_prompt_length"] else "drop",
        padding_free=padding_free,
        reward_stats_max_pairs=8,  # scored after training, outside the timing: kept small
        **_common(settings),
    )
    folder = train_reward(config, read("train.jsonl"), read("eval.jsonl"))
    summary = json.loads((folder / "training_summary.json").read_text())
    return {
        "train_seconds": summary["train_seconds"],
        "steps": summary["global_steps"],
        "eval_accuracy": summary["eval"]["eval_accuracy"],
        "eval_loss": summary["eval"]["eval_loss"],
        "train_loss": summary["train_loss"],
        "shared_prompt_rows": summary["shared_prompt_rows"],
        "padding_free_rows": summary["padding_free_rows"],
    }


def run_trl(work: Path, settings: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    def read(name):
        return Dataset.from_list([json.loads(line) for line in (work / name).read_text().splitlines()])

    tokenizer = AutoTokenizer.from_pretrained(settings["model"])
    tokenizer.pad_token = PAD_TOKEN
    args = RewardConfig(
        output_dir=str(work / f"trl-{os.getpid()}"),
        max_length=settings["max_length"],
        disable_dropout=True,
        model_init_kwargs={"dtype": torch.float32},
        **_common(settings),
    )
    trainer = RewardTrainer(
        model=settings["model"],
        args=args,
        processing_class=tokenizer,
        train_dataset=read("train_ids.jsonl"),
        eval_dataset=read("eval_ids.jsonl"),
    )
    assert len(trainer.train_dataset) == settings["train_pairs"], "TRL filtered pairs: raise --max_length"
    started = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - started
    metrics = trainer.evaluate()
    return {
        "train_seconds": train_seconds,
        "steps": trainer.state.global_step,
        "eval_accuracy": metrics["eval_accuracy"],
        "eval_loss": metrics["eval_loss"],
        "train_loss": result.training_loss,
    }


def child(side: str, work: Path) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    settings = json.loads((work / "settings.json").read_text())
    if side == "trl":
        result = run_trl(work, settings)
    else:
        result = run_tether(work, settings, padding_free=side == "tether")
    result["pairs_per_s"] = settings["train_pairs"] * settings["epochs"] / result["train_seconds"]
    result["peak_rss_mib"] = peak_rss_mib()
    (work / f"result-{side}-{os.getpid()}.json").write_text(json.dumps(result))
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------
# the parent: data, alternation, JSON


def _standard_error(accuracy: float, n: int) -> float:
    """Binomial standard error of an accuracy measured on n pairs: sqrt(a (1 − a) / n)."""
    return (accuracy * (1 - accuracy) / n) ** 0.5


def prepare(work: Path, settings: dict) -> dict:
    sys.path.insert(0, str(HERE))
    from preference_data import make_pairs

    from tether.data.records import PreferencePair
    from tether.data.templates import Truncation
    from tether.models.loading import load_tokenizer, resolve_model_path
    from tether.stages.reward import tokenize_preferences

    settings["model"] = resolve_model_path(settings["model"])
    if Path(settings["model"]).is_dir():  # the sides run in other working directories
        settings["model"] = str(Path(settings["model"]).resolve())
    tokenizer = load_tokenizer(settings["model"])
    if settings["data"] == "qa_feedback":  # real pairs; held-out ones from the test questions
        splits = {
            "train": qa_feedback_rows("train", settings["train_pairs"], settings["seed"]),
            "eval": qa_feedback_rows("test", settings["eval_pairs"], settings["seed"]),
        }
        pairs = splits["train"] + splits["eval"]
    else:
        pairs = make_pairs(settings["train_pairs"] + settings["eval_pairs"], seed=settings["seed"])
        splits = {"train": pairs[: settings["train_pairs"]], "eval": pairs[settings["train_pairs"] :]}
    if settings["max_prompt_length"]:  # the prompt cut from the left (tether's --truncation prompt)
        truncation = Truncation("prompt", settings["max_length"], settings["max_prompt_length"])
    else:  # nothing cut: a pair that does not fit stops the run
        truncation = Truncation("drop", settings["max_length"])
    lengths = []
    for name, rows in splits.items():
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        # tokenised and fitted as tether's reward stage does it (one prompt cut for chosen and rejected)
        tokenized = tokenize_preferences(
            tokenizer, [PreferencePair(r["prompt"], r["chosen"], r["rejected"]) for r in rows], truncation
        )
        if tokenized.pairs_dropped:
            raise SystemExit(f"{tokenized.pairs_dropped} pairs do not fit --max_length {settings['max_length']}")
        ids = [
            {"chosen_ids": [*pair.prompt, *pair.chosen], "rejected_ids": [*pair.prompt, *pair.rejected]}
            for pair in tokenized.pairs
        ]
        lengths += [len(sequence) for pair in ids for sequence in pair.values()]
        (work / f"{name}_ids.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ids))
    (work / "settings.json").write_text(json.dumps(settings))
    return {
        "mean_tokens_per_sequence": statistics.mean(lengths),
        "max_tokens_per_sequence": max(lengths),
        "kinds": sorted({r.get("kind", settings["data"]) for r in pairs}),
    }


def launch(side: str, work: Path) -> dict:
    python = TRL_PYTHON if side == "trl" else TETHER_PYTHON
    env = {**os.environ, **OFFLINE_ENV}
    if side == "trl":  # make sure the TRL interpreter cannot see tether's sources
        env.pop("PYTHONPATH", None)
    return run_side(side, [str(python), str(Path(__file__).resolve()), "--side", side, "--work", str(work)], env, work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help="model folder or hub id (default: the embedded SmolLM2-135M)")
    parser.add_argument(
        "--data",
        choices=["synthetic", "qa_feedback"],
        default="synthetic",
        help="synthetic pairs (benchmarks/preference_data.py) or real ones from data/qa_feedback (training pairs "
        "drawn from its train split, held-out pairs from its test split)",
    )
    parser.add_argument(
        "--sides",
        default="tether,trl",
        help=f"comma-separated, from {', '.join(SIDES)} (tether_padded: tether with --padding_free false)",
    )
    parser.add_argument("--train_pairs", type=int, default=160)
    parser.add_argument("--eval_pairs", type=int, default=96)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument(
        "--max_prompt_length",
        type=int,
        default=None,
        help="cut each prompt from the left to this many tokens (tether's --truncation prompt; TRL gets the same ids)",
    )
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--learning_rate", type=float, default=5e-5)
    parser.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="recompute activations in the backward pass, on both sides (default: off on both)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="each round runs both sides; order alternates")
    parser.add_argument("--start_with", choices=["tether", "trl"], default="tether", help="side of the first round")
    parser.add_argument(
        "--append",
        action="store_true",
        help="add these rounds to the runs already in --out (same settings), e.g. a reversed round",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "reward.json")
    args = parser.parse_args()
    if args.side:
        child(args.side, args.work)
        return
    if not TRL_PYTHON.exists():
        raise SystemExit(
            f"{TRL_PYTHON} missing: python3 -m venv {TRL_PYTHON.parent.parent} && "
            f"{TRL_PYTHON.parent}/pip install torch==2.13.0 && {TRL_PYTHON.parent}/pip install trl==1.16.0 "
            "transformers==5.23.0 accelerate==1.15.0 datasets==5.2.0"
        )
    settings = {
        k: getattr(args, k)
        for k in (
            "model",
            "data",
            "train_pairs",
            "eval_pairs",
            "batch_size",
            "max_length",
            "max_prompt_length",
            "epochs",
            "learning_rate",
            "seed",
            "gradient_checkpointing",
        )
    }
    (HERE / "results").mkdir(exist_ok=True)
    previous = json.loads(args.out.read_text()) if args.append and args.out.exists() else None
    load_before = os.getloadavg()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="tmp-reward-", dir=HERE / "results") as tmp:
        work = Path(tmp)
        data = prepare(work, settings)
        runs = list(previous["runs"]) if previous else []
        first_round = 1 + max((r["round"] for r in runs), default=-1)
        if previous:
            data = previous["data"]
            if {k: previous["settings"][k] for k in settings if k != "model"} != {
                k: v for k, v in settings.items() if k != "model"
            }:
                raise SystemExit(f"--append: settings differ from those in {args.out}")
        sides = args.sides.split(",")
        if args.start_with == "trl":
            sides = sides[::-1]
        for round_index in range(first_round, first_round + args.rounds):
            order = sides if (round_index - first_round) % 2 == 0 else sides[::-1]
            for side in order:
                load_at_start = os.getloadavg()[0]
                result = launch(side, work)
                result.update(
                    side=side,
                    round=round_index,
                    load_average_at_start=round(load_at_start, 2),
                    load_average_at_end=round(os.getloadavg()[0], 2),
                )
                runs.append(result)
                print(
                    f"round {round_index} {side}: {result['pairs_per_s']:.3f} pairs/s, "
                    f"held-out accuracy {result['eval_accuracy']:.3f} ({result['train_seconds']:.1f} s, "
                    f"peak RSS {result['peak_rss_mib']:.0f} MiB)",
                    flush=True,
                )
    load_after = os.getloadavg()

    def side_summary(side):
        rs = [r for r in runs if r["side"] == side]
        return {
            "pairs_per_s": statistics.median(r["pairs_per_s"] for r in rs),
            "eval_accuracy": statistics.median(r["eval_accuracy"] for r in rs),
            "eval_accuracy_standard_error": _standard_error(
                statistics.median(r["eval_accuracy"] for r in rs), settings["eval_pairs"]
            ),
            "peak_rss_mib": statistics.median(r.get("peak_rss_mib", float("nan")) for r in rs),
            "train_seconds": statistics.median(r["train_seconds"] for r in rs),
            "runs": len(rs),
        }

    ran = [side for side in SIDES if any(r["side"] == side for r in runs)]
    summaries = {side: side_summary(side) for side in ran}
    tether, trl = summaries.get("tether"), summaries.get("trl")
    report = {
        "benchmark": "reward model training (Bradley-Terry), tether vs TRL 1.16 RewardTrainer",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "command": ((previous["command"] + " ; then ") if previous else "")
        + "python benchmarks/bench_reward.py "
        + " ".join(sys.argv[1:]),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores visible, CPU only",
        "load_average_before_after": (
            (previous["load_average_before_after"] if previous else [])
            + [round(load_before[0], 2), round(load_after[0], 2)]
        ),
        "note": (
            "shared 2-core machine: other jobs were running during the measurement (see load averages), so "
            "absolute times are noisy; the sides alternate so both see similar load"
        ),
        "settings": {
            **settings,
            "model": settings["model"] or "embedded SmolLM2-135M-Instruct",
            "precision": "fp32",
            "scheduler": "linear, no warmup",
            "adam_epsilon": 1e-5,
        },
        "data": {
            **data,
            "source": "data/qa_feedback (real human preferences; train pairs from its train split, held-out from test)"
            if settings["data"] == "qa_feedback"
            else "benchmarks/preference_data.py (synthetic, five kinds of preference rule)",
        },
        "versions": {"tether_venv": versions(TETHER_PYTHON), "trl_venv": versions(TRL_PYTHON)},
        **summaries,
        "ratio_pairs_per_s": tether["pairs_per_s"] / trl["pairs_per_s"] if tether and trl else None,
        "accuracy_difference": tether["eval_accuracy"] - trl["eval_accuracy"] if tether and trl else None,
        "wall_seconds": time.time() - started + (previous["wall_seconds"] if previous else 0.0),
        "runs": runs,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in (*ran, "ratio_pairs_per_s")}, indent=2))


if __name__ == "__main__":
    main()
