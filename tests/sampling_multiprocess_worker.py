"""Run by tests/test_sampling_scale_out.py: the generation-only commands on 1 process (in the test's own
interpreter) or on 2 CPU processes (gloo) under ``accelerate launch``.

``tether bon`` (``run_best_of_n``), ``tether eval`` (``run_eval``, with a best-of-N entry and the
best-of-N curve) and the demo's pair sampling (``build_preference_dataset``, labelled by a stand-in
judge so no annotator model loads) each write their files under OUT; the test compares them.

usage: accelerate launch --config_file configs/accelerate/multi_cpu.yaml sampling_multiprocess_worker.py \
           OUT POLICY REWARD_MODEL PROMPTS
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


class LengthJudge:
    """A stand-in for the simulated annotator: g = −(number of words)."""

    def scores(self, prompts, responses, stopped=None):
        return [-float(len(r.split())) for r in responses]


def main(out: str, policy: str, reward_model: str, prompts: str) -> None:
    from accelerate import PartialState

    from tether.data.loading import load_prompts
    from tether.demo.annotator import build_preference_dataset
    from tether.evaluation.evaluate import EvalConfig, run_eval
    from tether.generation import SamplingSettings
    from tether.models.loading import load_causal_lm, load_tokenizer
    from tether.stages.best_of_n import BestOfNConfig, run_best_of_n

    torch.set_num_threads(1)
    out_dir = Path(out)
    run_best_of_n(
        BestOfNConfig(
            model_name_or_path=policy,
            reward_model_path=reward_model,
            dataset=prompts,
            n=3,
            batch_size=2,  # 5 prompts: batches of 2, 2, 1, shared 2 + 1 over two processes
            max_new_tokens=6,
            return_all=True,
            seed=11,
            use_cpu=True,
            output_dir=str(out_dir / "bon"),
        )
    )
    run_eval(
        EvalConfig(
            policies=[f"a={policy}", f"b={policy}"],
            reference=policy,
            reward_model_path=reward_model,
            dataset=prompts,
            samples_per_prompt=2,
            max_new_tokens=6,
            probes=False,
            best_of_n=[2],
            bon_curve=[1, 2, 4],
            batch_size=4,
            seed=5,
            report=False,
            output_dir=str(out_dir / "eval"),
        )
    )
    pairs = build_preference_dataset(
        load_causal_lm(policy),
        load_tokenizer(policy),
        load_prompts(prompts),
        SamplingSettings(max_new_tokens=6, temperature=0.7),
        seed=3,
        batch_size=2,
        annotator=LengthJudge(),
    )
    if PartialState().is_main_process:
        rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
        (out_dir / "pairs.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main(*sys.argv[1:5])
