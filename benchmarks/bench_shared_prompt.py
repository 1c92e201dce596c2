"""The shared prompt of --num_generations k, in isolation: one process, the embedded SmolLM2-135M-Instruct.

    .venv/bin/python benchmarks/bench_shared_prompt.py     # writes benchmarks/results/shared_prompt_cpu.json

For ``--groups`` prompts of about ``--prompt_tokens`` tokens (multi-turn chats from data/qa_feedback,
as in bench_critic_free.py), k = ``--k`` responses each of exactly ``--response_length`` tokens, the
three phases of a rollout and update are timed both ways, alternating, in the same process:

* sampling: ``generate_batch`` on the k-times repeated prompts (the prompt prefilled k times) vs
  ``generate_groups`` (prefilled once, the cache repeated k times);
* scoring: ``score_responses`` with plain rows vs grouped rows (policy, reference, reward model);
* the training forward + backward of the policy on the same responses, plain vs grouped.

It also records how far grouped rows are from plain rows on this model (max |Δ log-prob|, |Δ score|).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--prompt_tokens", default="480,512")
    parser.add_argument("--response_length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "shared_prompt_cpu.json")
    args = parser.parse_args()

    import torch
    from _harness import cpu_name
    from bench_critic_free import conversations
    from transformers import AutoModelForSequenceClassification

    from tether.data.records import Message
    from tether.data.templates import pad_token_id, prompt_ids
    from tether.generation import SamplingSettings, generate_batch, left_pad
    from tether.models.loading import load_causal_lm, load_tokenizer, resolve_model_path
    from tether.ppo.grouping import generate_groups
    from tether.ppo.losses import logprobs_from_logits
    from tether.ppo.models import PolicyAndValue, RolloutModels
    from tether.ppo.rollout import Rollout, RolloutSettings, score_responses

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = resolve_model_path(None)
    tok = load_tokenizer(path)
    policy = load_causal_lm(path, dtype="float32")
    reference = copy.deepcopy(policy).eval()
    rm = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32).eval()
    rm.config.pad_token_id = tok.pad_token_id
    models = RolloutModels(PolicyAndValue(policy), reference=reference, reward_model=rm)
    low, high = (int(x) for x in args.prompt_tokens.split(","))
    chats, lengths = conversations(tok, low, high, args.groups)
    ids = [prompt_ids(tok, tuple(Message(**m) for m in chat), None) for chat in chats]
    k = args.k
    query_ids, query_mask = left_pad([i for i in ids for _ in range(k)], pad_token_id(tok))
    sampling = SamplingSettings(max_new_tokens=args.response_length, temperature=0.7, fixed_length=True)
    settings = RolloutSettings(sampling=sampling, group_size=k)
    times: dict[str, list[float]] = {}

    def timed(name, fn):
        start = time.perf_counter()
        out = fn()
        times.setdefault(name, []).append(time.perf_counter() - start)
        print(f"{name}: {times[name][-1]:.2f} s", flush=True)
        return out

    def train_step(batch: Rollout) -> float:
        policy.zero_grad(set_to_none=True)
        logits, _ = models.policy_and_value(**batch.forward_inputs(torch.arange(len(batch))))
        logp = logprobs_from_logits(logits, batch.responses, 0.7)
        loss = -(logp * batch.response_mask).sum() / batch.response_mask.sum()
        loss.backward()
        return loss.item()

    deviations = {}
    for r in range(args.repeats):
        order = ("plain", "grouped") if r % 2 == 0 else ("grouped", "plain")
        for way in order:
            with torch.no_grad():
                if way == "plain":
                    generated = timed(
                        "generate/plain", lambda: generate_batch(policy, tok, query_ids, query_mask, sampling)
                    )
                else:
                    generated = timed(
                        "generate/grouped", lambda: generate_groups(policy, tok, query_ids, query_mask, sampling, k)
                    )
        # score and train the same responses both ways
        batches = {}
        for way in order:
            group = 1 if way == "plain" else k
            batches[way] = timed(
                f"score/{way}",
                lambda: score_responses(models, query_ids, query_mask, generated, settings, group_size=group),
            )
        losses = {way: timed(f"train/{way}", lambda: train_step(batches[way])) for way in order}
        deviations = {
            "logprobs": (batches["plain"].logprobs - batches["grouped"].logprobs).abs().max().item(),
            "ref_logprobs": (batches["plain"].ref_logprobs - batches["grouped"].ref_logprobs).abs().max().item(),
            "scores": (batches["plain"].raw_scores - batches["grouped"].raw_scores).abs().max().item(),
            "loss": abs(losses["plain"] - losses["grouped"]),
        }
    median = {name: sorted(v)[len(v) // 2] for name, v in times.items()}
    speedup = {phase: median[f"{phase}/plain"] / median[f"{phase}/grouped"] for phase in ("generate", "score", "train")}
    total_plain = sum(median[f"{p}/plain"] for p in ("generate", "score", "train"))
    total_grouped = sum(median[f"{p}/grouped"] for p in ("generate", "score", "train"))
    speedup["all"] = total_plain / total_grouped
    report = {
        "benchmark": "shared_prompt_cpu",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": args.threads, "shared": True},
        "load_average_after": os.getloadavg(),
        "command": "python benchmarks/bench_shared_prompt.py " + " ".join(sys.argv[1:]),
        "settings": vars(args) | {"out": str(args.out), "prompt_tokens_each": lengths},
        "seconds": times,
        "median_seconds": median,
        "speedup": speedup,
        "grouped_vs_plain_max_abs_difference": deviations,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"speedup": speedup, "deviations": deviations}, indent=2))


if __name__ == "__main__":
    main()
