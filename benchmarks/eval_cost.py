"""Wall and CPU seconds of one ``evaluate_policies`` call the size of the demo's, on the embedded model.

    PYTHONPATH=src .venv/bin/python benchmarks/eval_cost.py --label after [--threads 2]

Two policies (the embedded SmolLM2-135M-Instruct as ``sft``, which is also the KL reference, and a
second copy of it as ``copy``, so its KL runs the forward passes), a reward model (the embedded model
as a one-output sequence classifier with a seeded head, saved to a temporary folder), 16 prompts of
the embedded demo test split, 4 samples per prompt, best-of-4 from ``sft``, the curve N = 1, 2, 4,
40-token budget, batch size 64 (the demo's), gold scores, no probes. Counts ``generate`` calls and
the rows they sampled. Writes benchmarks/results/eval_cost_<label>.json. CPU seconds
(``time.process_time``) survive a shared machine better than wall seconds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--label", required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    import tether
    from tether.config import EMBEDDED_MODEL
    from tether.data.embedded import DEMO
    from tether.data.loading import load_prompts
    from tether.demo.annotator import default_annotator
    from tether.evaluation.evaluate import evaluate_policies
    from tether.models.loading import disable_dropout, load_causal_lm, load_scalar_model, load_tokenizer

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    sft, copy = (load_causal_lm(EMBEDDED_MODEL).eval() for _ in range(2))
    for m in (sft, copy):
        disable_dropout(m)
    calls = {"generate": 0, "rows": 0}
    for m in (sft, copy):
        original = m.generate

        def counted(*a, _original=original, **kw):
            out = _original(*a, **kw)
            calls["generate"] += 1
            calls["rows"] += (out.sequences if hasattr(out, "sequences") else out).shape[0]
            return out

        m.generate = counted
    prompts = load_prompts(DEMO, "test")[:16]
    default_annotator()  # loaded once per process, outside the timing
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        rm = load_scalar_model(EMBEDDED_MODEL)
        rm.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        del rm
        wall, cpu = time.perf_counter(), time.process_time()
        results = evaluate_policies(
            {"sft": sft, "copy": copy},
            sft,
            folder,
            tokenizer,
            prompts,
            temperature=0.7,
            max_new_tokens=40,
            samples_per_prompt=4,
            gold=True,
            probes=False,
            best_of_n={"bon4": ("sft", 4)},
            bon_curve=(1, 2, 4),
            batch_size=64,
            seed=0,
        )
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    out = {
        "label": args.label,
        "tether": str(Path(tether.__file__).parent),
        "threads": args.threads,
        "wall_s": round(wall, 1),
        "process_cpu_s": round(cpu, 1),
        "generate_calls": calls["generate"],
        "generated_rows": calls["rows"],
        "metrics": {
            name: {k: m.get(k) for k in ("samples", "reward/score", "reward/gold", "kl/ref", "response/length")}
            for name, m in results.metrics.items()
        },
        "bon_curve": results.bon_curve,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(json.dumps(out, indent=2))
    path = Path(__file__).parent / "results" / f"eval_cost_{args.label}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
