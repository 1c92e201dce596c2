"""Held-out exact-match of the embedded SmolLM2-135M-Instruct on the arithmetic task before and after
``tether ppo --advantage_estimator grpo --num_generations 4 --reward_funcs examples/arithmetic_reward.py:exact_answer``
(no reward model, no value model), on the CPU.

usage (from the repository root): python scripts/arithmetic_grpo.py [--iterations N] [--output_dir DIR]
Exact match: greedy decoding (16 new tokens) on the 50 held-out problems, scored by the same reward function.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the tether command: spinning threads crawl on busy cores

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASK = ROOT / "examples" / "arithmetic"
REWARD = ROOT / "examples" / "arithmetic_reward.py"


def exact_match(model_path: str, rows: list[dict]) -> float:
    from tether.generation import SamplingSettings, sample_responses
    from tether.models.loading import load_causal_lm, load_tokenizer

    spec = importlib.util.spec_from_file_location("arithmetic_reward", REWARD)
    reward = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reward)
    model, tok = load_causal_lm(model_path).eval(), load_tokenizer(model_path)
    prompts = [r["prompt"] for r in rows]
    samples = sample_responses(model, tok, prompts, SamplingSettings(max_new_tokens=16, temperature=0), batch_size=25)
    completions = [group[0].text for group in samples]
    scores = reward.exact_answer(prompts, completions, [r["answer"] for r in rows])
    return sum(scores) / len(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--batch_size", type=int, default=32, help="responses per iteration (prompts × 4)")
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=1e-5)
    parser.add_argument("--output_dir", default="outputs/arithmetic_grpo")
    args = parser.parse_args()
    import torch

    from tether.config import EMBEDDED_MODEL
    from tether.ppo import PPOConfig, run_ppo

    torch.manual_seed(0)
    held_out = [json.loads(line) for line in (TASK / "test.jsonl").read_text().splitlines()]
    started = time.perf_counter()
    before = exact_match(EMBEDDED_MODEL, held_out)
    print(f"before: held-out exact match {before:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
    config = PPOConfig(
        output_dir=args.output_dir,
        overwrite_output_dir=True,
        model_name_or_path=EMBEDDED_MODEL,
        dataset=str(TASK / "train.jsonl"),
        reward_funcs=[f"{REWARD}:exact_answer"],
        advantage_estimator="grpo",
        num_generations=4,
        kl_in_loss=True,
        batch_size=args.batch_size,
        ppo_epochs=1,
        num_iterations=args.iterations,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        max_new_tokens=args.max_new_tokens,
        save_steps=0,
        logging_steps=1,
        disable_tqdm=True,
        report_to="none",
        use_cpu=True,
        seed=0,
    )
    trained = time.perf_counter()
    result = run_ppo(config)
    train_s = time.perf_counter() - trained
    after = exact_match(result.policy_dir, held_out)
    rows = [json.loads(line) for line in (Path(args.output_dir) / "metrics.jsonl").read_text().splitlines()]
    summary = {
        "before": before,
        "after": after,
        "iterations": args.iterations,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "train_wall_s": round(train_s, 1),
        "total_wall_s": round(time.perf_counter() - started, 1),
        "train_reward_first_last": [rows[0]["reward/exact_answer/mean"], rows[-1]["reward/exact_answer/mean"]],
    }
    print(json.dumps(summary, indent=2))
    (Path(args.output_dir) / "arithmetic_summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
