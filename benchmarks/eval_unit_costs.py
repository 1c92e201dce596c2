"""CPU seconds (1 thread) of the demo evaluation's unit operations on a demo run's SFT model.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/eval_unit_costs.py outputs/pipeline/sft outputs/pipeline/rm

CPU time rather than wall time, so the figures hold on a machine shared with other jobs (which
inflate them somewhat). Prints one line per operation and a JSON summary.
"""

from __future__ import annotations

import json
import resource
import sys
import time


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(sft: str, rm_path: str) -> None:
    import torch

    from tether.data.embedded import DEMO
    from tether.data.loading import load_prompts
    from tether.demo.annotator import default_annotator
    from tether.evaluation.metrics import per_sequence_kl
    from tether.evaluation.probes import run_probes
    from tether.generation import SamplingSettings, sample_responses
    from tether.models.loading import load_causal_lm, load_scalar_model, load_tokenizer
    from tether.models.scoring import score_texts

    torch.set_num_threads(1)
    out = {}

    def timed(label, fn):
        cpu, wall = cpu_seconds(), time.perf_counter()
        value = fn()
        out[label] = round(cpu_seconds() - cpu, 1)
        print(f"{label}: {out[label]} CPU s ({time.perf_counter() - wall:.1f} s wall)", flush=True)
        return value

    tok = load_tokenizer(sft)
    model = timed("load policy", lambda: load_causal_lm(sft).eval())
    ref = load_causal_lm(sft).eval()
    prompts = [p.prompt for p in load_prompts(DEMO, "test")][:32]
    settings = SamplingSettings(max_new_tokens=40, temperature=0.7)
    torch.manual_seed(0)
    one_each = timed("generate 32 rows x 40 tokens", lambda: sample_responses(model, tok, prompts, settings, 1, 64))
    four_each = timed(
        "generate 64 rows x 40 tokens (16 prompts x 4)",
        lambda: sample_responses(model, tok, prompts[:16], settings, 4, 16),
    )
    flat = [s for g in one_each for s in g]
    timed("KL pass, 32 responses (policy + reference)", lambda: per_sequence_kl(model, ref, tok, flat, 0.7, 64))
    rm = timed("load reward model", lambda: load_scalar_model(rm_path).eval())
    texts = [s.text for g in four_each for s in g]
    repeated = [p for p in prompts[:16] for _ in range(4)]
    timed("reward model, 64 responses", lambda: score_texts(rm, tok, repeated, texts, batch_size=64))
    timed("probes (66 greedy answers x 16 tokens)", lambda: run_probes(model, tok, max_new_tokens=16, batch_size=64))
    annotator = timed("load annotator", default_annotator)
    stopped = [s.stopped for g in four_each for s in g]
    timed("gold, 64 responses", lambda: annotator.scores(repeated, texts, stopped))
    print(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:3])
