"""Write the embedded demo task's fixed preference pairs (src/tether/data/embedded/preferences.jsonl).

Run once, from the repository root: ``python scripts/make_demo_preferences.py`` (about two minutes
on a CPU). The embedded SmolLM2-135M-Instruct samples two responses (40 new tokens, T = 0.7) for
each of ``NUM_PROMPTS`` training prompts of the demo task (a seeded sample), and the simulated
annotator (``tether.demo.annotator``, τ = 0.1) labels each pair; pairs of identical responses are
dropped. Everything is seeded, so a re-run on the same library versions writes the same file.
"""

from __future__ import annotations

import os

# as the tether command: spinning OpenMP threads crawl on busy cores
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import random  # noqa: E402
from pathlib import Path

from tether.config import EMBEDDED_MODEL  # noqa: E402
from tether.data.embedded import DEMO  # noqa: E402
from tether.data.loading import load_prompts  # noqa: E402
from tether.data.writing import write_preferences  # noqa: E402
from tether.demo.annotator import DEFAULT_TAU, build_preference_dataset  # noqa: E402
from tether.generation import SamplingSettings  # noqa: E402
from tether.models.loading import load_causal_lm, load_tokenizer  # noqa: E402

NUM_PROMPTS = 120
SEED = 0
OUTPUT = Path(__file__).resolve().parents[1] / "src" / "tether" / "data" / "embedded" / "preferences.jsonl"


def main() -> None:
    prompts = random.Random(SEED).sample(load_prompts(DEMO, "train"), NUM_PROMPTS)
    print(f"sampling 2 x {NUM_PROMPTS} responses from {EMBEDDED_MODEL}", flush=True)
    pairs = build_preference_dataset(
        load_causal_lm(EMBEDDED_MODEL).eval(),
        load_tokenizer(EMBEDDED_MODEL),
        prompts,
        SamplingSettings(max_new_tokens=40, temperature=0.7),
        tau=DEFAULT_TAU,
        seed=SEED,
        batch_size=40,
    )
    write_preferences(pairs, OUTPUT)
    print(f"wrote {len(pairs)} pairs to {OUTPUT}")


if __name__ == "__main__":
    main()
