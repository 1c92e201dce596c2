"""PPO in the demo: a small sweep on one demo run's SFT model, reward model and SFT samples, judged on
validation prompts, never on the demo's held-out test prompts.

Trains PPO from ``RUN/sft`` against ``RUN/rm`` for each setting exactly as the pipeline's ppo stage
does (the `ppo:` options of ``DEMO_STAGE_DEFAULTS``, reward normalised on ``RUN/data/sft_samples_round1.jsonl``,
the demo's training prompts), then samples every PPO policy and the SFT policy on **validation
prompts**: a seeded sample of the demo's *training* split (the test split stays untouched for the
README table). PPO draws its 96 episodes from the same 301 training prompts, so a few validation
prompts may have been seen once in training; the test split never was. Gold (the simulated annotator)
gain over SFT, paired by prompt, with KL to SFT, length and the share that ends with the stop token.
Writes one JSON file and prints a markdown table for benchmarks/README.md.

    .venv/bin/python benchmarks/demo_ppo_sweep.py --run outputs/pipeline --out benchmarks/results/demo_ppo_sweep.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from tether.pipeline import DEMO_STAGE_DEFAULTS, RL_METHODS

SETTINGS = {
    # name: PPO options over the demo's
    "demo (β 0.05, lr 5e-5)": {},
    "β 0.1": {"init_kl_coef": 0.1},
    "β 0.2": {"init_kl_coef": 0.2},
    "lr 2.5e-5": {"learning_rate": 2.5e-5},
    "whitened rewards": {"whiten_rewards": True},
    # the critic: a separate value model (initialised from the reward model) instead of a head on the policy
    "separate critic": {"value_head_on_policy": False},
    # no critic: the pipeline's `rl: rloo` (RLOO's leave-one-out baseline over 4 responses per prompt)
    "rloo": {**RL_METHODS["rloo"], "value_head_on_policy": False},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True, help="a finished demo pipeline folder (sft/, rm/, data/)")
    parser.add_argument("--out", default="benchmarks/results/demo_ppo_sweep.json")
    parser.add_argument("--work", default="outputs/ppo_sweep", help="where the PPO runs go")
    parser.add_argument("--only", nargs="*", help="run only these settings (names as in SETTINGS)")
    parser.add_argument("--val_prompts", type=int, default=64, help="validation prompts from the training split")
    parser.add_argument("--samples_per_prompt", type=int, default=2)
    parser.add_argument("--no_train", action="store_true", help="train nothing: evaluate the policies in --work")
    args = parser.parse_args()

    import torch

    from tether.data.embedded import DEMO
    from tether.data.loading import load_prompts
    from tether.demo.annotator import gold_metrics_hook
    from tether.evaluation.evaluate import evaluate_policies
    from tether.models.loading import load_tokenizer
    from tether.ppo import PPOConfig, run_ppo

    torch.set_num_threads(2)
    run, work = Path(args.run), Path(args.work)
    sft, rm = str(run / "sft"), str(run / "rm")
    samples = run / "data" / "sft_samples_round1.jsonl"
    tok = load_tokenizer(sft)
    seed = 42
    train_prompts = load_prompts(DEMO, "train")
    validation = random.Random(seed).sample(train_prompts, args.val_prompts)

    policies, rows = {"sft": sft}, {}
    for name, options in SETTINGS.items():
        if args.only and name not in args.only:
            continue
        folder = work / name.replace(" ", "_").replace(",", "").replace("β", "beta").replace("(", "").replace(")", "")
        if not options and (run / "ppo" / "policy" / "config.json").is_file():  # the demo's own PPO run
            policies[name], rows[name] = str(run / "ppo" / "policy"), {"options": options, "reused": "the demo run's"}
            continue
        if args.no_train:
            if (folder / "policy" / "config.json").is_file():
                policies[name], rows[name] = str(folder / "policy"), {"options": options, "reused": True}
            continue
        cfg = PPOConfig(
            **{
                **DEMO_STAGE_DEFAULTS["ppo"],
                "model_name_or_path": sft,
                "reward_model_path": rm,
                "output_dir": str(folder),
                "overwrite_output_dir": True,
                "temperature": 0.7,
                "seed": seed,
                "reward_norm_responses": str(samples),
                **options,
            }
        )
        started = time.time()
        result = run_ppo(cfg, train_prompts, extra_metrics=gold_metrics_hook(tok))
        rows[name] = {
            "options": options,
            "seconds": round(time.time() - started, 1),
            "stopped_reason": result.stopped_reason,
            "final_metrics": {k: result.final_metrics.get(k) for k in ("reward/score", "reward/gold", "kl/ref")},
        }
        policies[name] = str(result.policy_dir)
        print(name, json.dumps(rows[name]), flush=True)

    results = evaluate_policies(
        policies,
        sft,
        None,
        tok,
        validation,
        temperature=0.7,
        max_new_tokens=40,
        samples_per_prompt=args.samples_per_prompt,
        gold=True,
        probes=False,
        batch_size=64,
        seed=seed,
    )
    table = [
        "| setting | gold gain ± s.e. (validation) | KL (nats) | finished | length (tokens) |",
        "|---|---|---|---|---|",
    ]
    for name, m in results.metrics.items():
        row = rows.setdefault(name, {})
        row.update(
            {k: m.get(k) for k in ("gain/gold", "gain/gold_se", "kl/ref", "response/stopped", "response/length")}
        )
        row["reward/gold"] = m.get("reward/gold")
        gain = "–" if name == "sft" else f"{m['gain/gold']:+.3f} ± {m['gain/gold_se']:.3f}"
        table.append(
            f"| {name} | {gain} | {m['kl/ref']:.2f} | {m['response/stopped']:.0%} | {m['response/length']:.1f} |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "run": str(run),
        "validation": {"prompts": len(validation), "from": "embedded:demo train split, random.Random(42).sample"},
        "eval": results.settings,
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    print("\n".join(table))


if __name__ == "__main__":
    main()
