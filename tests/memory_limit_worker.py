"""Run in a subprocess by tests/test_memory.py: one PPO iteration without a limit, then the same
iteration under an address-space limit (RLIMIT_AS) below what the first one used, so the CPU
allocator really fails and tether must shrink its chunks. ``case`` picks the phase under test: the
other phase runs one row at a time, so the measured peak is the tested phase's. Prints one JSON
line with both runs' metrics and chunk sizes."""

from __future__ import annotations

import gc
import json
import re
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppo_tiny import make_policy, make_random_rm, make_word_tokenizer  # noqa: E402


def status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) * 1024


def run(folder: Path, name: str, case: str, limit_fraction: float | None, need: int | None, rows: int = 16):
    from tether.ppo import PPOConfig, PPOTrainer
    from tether.tracking import read_jsonl

    config = PPOConfig(
        output_dir=str(folder / name),
        model_name_or_path=str(folder / "policy"),
        reward_model_path=str(folder / "rm"),
        batch_size=rows,
        mini_batch_size=rows // 2,
        ppo_epochs=1,
        max_new_tokens=16,
        response_length=16,
        learning_rate=1e-3,
        num_iterations=1,
        save_steps=0,
        disable_tqdm=True,
        logging_steps=1000,
        report_to="none",
        use_cpu=True,
        missing_eos_penalty=None,
        normalize_reward=False,
        **({"per_device_train_batch_size": 1} if case == "scoring" else {"forward_batch_size": 1}),
    )
    trainer = PPOTrainer(config, ["a b c", "d e", "yes no", "x y z w"] * 4)
    gc.collect()
    before = status("VmSize")
    if limit_fraction is not None:
        resource.setrlimit(resource.RLIMIT_AS, (before + int(limit_fraction * need), resource.RLIM_INFINITY))
    trainer.train()
    row = read_jsonl(folder / name / "metrics.jsonl")[0]
    result = {
        "forward_batch": trainer.rollout_settings.forward_batch_size,
        "micro": trainer.geometry.micro,
        "generation_batch": trainer.rollout_settings.generation_batch_size,
        "metrics": {k: v for k, v in row.items() if not k.startswith(("time", "throughput"))},
        "need": status("VmPeak") - before,
    }
    del trainer
    gc.collect()
    return result


def main() -> None:
    torch.set_num_threads(1)
    folder = Path(sys.argv[1])
    tok = make_word_tokenizer(folder / "tok")
    # a huge vocabulary makes the logits of the scoring pass and of the update dwarf everything else
    make_policy(folder / "policy", tok, vocab_size=150_000, hidden_size=16, intermediate_size=32, num_hidden_layers=1)
    make_random_rm(folder / "rm", tok, vocab_size=150_000, hidden_size=16, intermediate_size=32, num_hidden_layers=1)
    case, fraction = sys.argv[2], float(sys.argv[3])
    run(folder, "warm-up", case, None, None, rows=2)  # first-use costs (lazy imports, thread pools) out of the way
    free = run(folder, "free", case, None, None)
    limited = run(folder, "limited", case, fraction, free["need"])
    print("RESULT " + json.dumps({"free": free, "limited": limited}), flush=True)


if __name__ == "__main__":
    main()
