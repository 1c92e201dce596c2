"""DPO in the demo: a small sweep on one demo run's SFT model and pairs.

Trains DPO from ``RUN/sft`` on ``RUN/data/preferences_round1.jsonl`` (the pipeline's split: the
same 15% held out) for each setting, then scores every DPO policy and the SFT policy on the demo's
held-out prompts with the simulated annotator (gold), paired by prompt, with the KL to SFT and the
share of answers that end with the stop token within the budget. Writes one JSON file and prints a
markdown table for benchmarks/README.md.

    .venv/bin/python benchmarks/demo_dpo_sweep.py --run outputs/pipeline --out benchmarks/results/demo_dpo_sweep.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

SETTINGS = {
    # name: (DPO options over the demo's, pair filter), most telling first
    "demo (β 0.1, lr 1e-5, 1 ep)": ({}, None),
    # what the demo did before pairs recorded a response cut at the budget: the stop token appended to it
    "cut responses as if stopped": ({}, "as_if_finished"),
    "finished pairs only": ({}, "finished"),
    "lr 2e-6": ({"learning_rate": 2e-6}, None),
    "β 0.5": ({"beta": 0.5}, None),
    "lr 5e-6, 3 ep": ({"learning_rate": 5e-6, "num_train_epochs": 3}, None),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True, help="a finished demo pipeline folder (sft/, data/)")
    parser.add_argument("--out", default="benchmarks/results/demo_dpo_sweep.json")
    parser.add_argument("--work", default="outputs/dpo_sweep", help="where the DPO policies go")
    parser.add_argument("--only", nargs="*", help="run only these settings (names as in SETTINGS)")
    parser.add_argument("--eval_prompts", type=int, default=70, help="held-out prompts (70: all)")
    parser.add_argument("--samples_per_prompt", type=int, default=1)
    parser.add_argument("--reuse", action="store_true", help="evaluate policies already trained in --work as they are")
    parser.add_argument("--no_train", action="store_true", help="train nothing: evaluate the policies in --work")
    args = parser.parse_args()

    import torch

    from tether.data.embedded import DEMO
    from tether.data.loading import load_preferences, load_prompts, split_train_eval
    from tether.evaluation.evaluate import evaluate_policies
    from tether.models.loading import load_tokenizer
    from tether.pipeline import DEMO_STAGE_DEFAULTS
    from tether.stages.dpo import DPOConfig, train_dpo

    torch.set_num_threads(2)
    run, work = Path(args.run), Path(args.work)
    sft = str(run / "sft")
    tok = load_tokenizer(sft)
    pairs = load_preferences(str(run / "data" / "preferences_round1.jsonl"))
    seed = 42
    budget = 40  # the demo's preference_max_new_tokens (recorded with the statistics; the pairs mark cut responses)

    def n_tokens(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    def finished(pair) -> bool:  # both responses ended with the stop token within the sampling budget
        return not (pair.chosen_truncated or pair.rejected_truncated)

    def as_if_finished(pair):  # the pair files of earlier demos: a cut response trained as if it had stopped
        return dataclasses.replace(pair, chosen_truncated=False, rejected_truncated=False)

    chosen_len = [n_tokens(p.chosen) for p in pairs]
    rejected_len = [n_tokens(p.rejected) for p in pairs]
    pair_stats = {
        "pairs": len(pairs),
        "budget_tokens": budget,
        "chosen_tokens_mean": sum(chosen_len) / len(pairs),
        "rejected_tokens_mean": sum(rejected_len) / len(pairs),
        "chosen_cut_share": sum(p.chosen_truncated for p in pairs) / len(pairs),
        "rejected_cut_share": sum(p.rejected_truncated for p in pairs) / len(pairs),
        "chosen_shorter_share": sum(c < r for c, r in zip(chosen_len, rejected_len)) / len(pairs),
    }
    print("pairs:", json.dumps(pair_stats), flush=True)

    policies, rows = {"sft": sft}, {}
    for name, (options, pair_filter) in SETTINGS.items():
        if args.only and name not in args.only:
            continue
        if pair_filter == "finished":
            use = [p for p in pairs if finished(p)]
        elif pair_filter == "as_if_finished":
            use = [as_if_finished(p) for p in pairs]
        else:
            use = pairs
        folder = work / name.replace(" ", "_").replace(",", "").replace("β", "beta")
        cfg = DPOConfig(
            **{
                **DEMO_STAGE_DEFAULTS["dpo"],
                "model_name_or_path": sft,
                "output_dir": str(folder),
                "overwrite_output_dir": True,
                "seed": seed,
                "report_to": "none",
                "disable_tqdm": True,
                **options,
            }
        )
        train, held = split_train_eval(use, cfg.eval_split_ratio, seed)
        if (args.reuse or args.no_train) and (folder / "config.json").is_file():
            rows[name] = {"options": options, "pairs": pair_filter or "all", "train_pairs": len(train), "reused": True}
            policies[name] = str(folder)
            continue
        if args.no_train:
            continue
        started = time.time()
        metrics = train_dpo(cfg, train, held)
        rows[name] = {
            "options": options,
            "pairs": pair_filter or "all",
            "train_pairs": len(train),
            "seconds": round(time.time() - started, 1),
            "dpo_eval": {k: v for k, v in (metrics.get("eval") or {}).items() if isinstance(v, (int, float))},
        }
        policies[name] = str(folder)
        print(name, json.dumps(rows[name]), flush=True)

    prompts = load_prompts(DEMO, "test")[: args.eval_prompts]
    results = evaluate_policies(
        policies,
        sft,
        None,
        tok,
        prompts,
        temperature=0.7,
        max_new_tokens=40,
        samples_per_prompt=args.samples_per_prompt,
        gold=True,
        probes=False,
        batch_size=64,
        seed=seed,
    )
    table = [
        "| setting | pairs | gold gain ± s.e. | KL (nats) | finished | length (tokens) |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in results.metrics.items():
        row = rows.setdefault(name, {})
        row.update(
            {k: m.get(k) for k in ("gain/gold", "gain/gold_se", "kl/ref", "response/stopped", "response/length")}
        )
        row["reward/gold"] = m.get("reward/gold")
        gain = "–" if name == "sft" else f"{m['gain/gold']:+.3f} ± {m['gain/gold_se']:.3f}"
        table.append(
            f"| {name} | {row.get('train_pairs', '–')} | {gain} | {m['kl/ref']:.2f} | "
            f"{m['response/stopped']:.0%} | {m['response/length']:.1f} |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    doc = {"run": str(run), "pair_stats": pair_stats, "eval": results.settings, "rows": rows}
    Path(args.out).write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    print("\n".join(table))


if __name__ == "__main__":
    main()
