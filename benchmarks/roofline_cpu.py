"""Machine limits for the PPO roofline note: memory bandwidth and fp32 matmul rate on this CPU, and
the time each PPO phase would take at those limits next to the measured times.

    .venv/bin/python benchmarks/roofline_cpu.py [--threads 2]   # writes benchmarks/results/roofline_cpu.json
                                                                  # (reads benchmarks/results/ppo_cpu.json if present)

Bandwidth: a STREAM-like copy of a 512 MiB float64 array with numpy (bytes moved = read + write),
best of 5. Peak FLOP rate: a 2048×2048 fp32 ``torch.mm`` (2·n³ FLOPs), best of 10, on ``--threads``.
Best-of-N, because other processes may share the cores; the load average is recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch


def copy_bandwidth_gbs(mib: int = 512, repeats: int = 5) -> float:
    src = np.ones(mib * 2**20 // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def model_counts(config: dict) -> dict:
    """Parameter counts of a Llama-family model: transformer blocks, and the (tied) vocabulary matrix."""
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    block = h * (h + 2 * kv + h) + 3 * h * i + 2 * h
    return {"blocks": layers * block + h, "vocab_matrix": config["vocab_size"] * h}


def ppo_roofline(config: dict, s: dict, gflops: float, bandwidth_gbs: float) -> dict:
    """Lower bounds, in seconds per iteration, for the PPO CPU benchmark's phases.

    generation: every decoding step reads all weights once (bandwidth) or does 2·params·rows FLOPs
    (whichever is slower), plus a prefill of 2·params·prompt tokens; scoring: one forward each of the
    reference (LM head on response positions), value model and reward model over all tokens (2·params·
    tokens); update: fwd+bwd = 6·params·tokens for policy and value model on every minibatch of every
    epoch, plus fused AdamW reading/writing param, grad, m, v (28 bytes per trained parameter) per step.
    """
    n = model_counts(config)
    blocks, vocab = n["blocks"], n["vocab_matrix"]
    rows, prompt, response = s["batch_size"], s["prompt_tokens"], s["response_length"]
    tokens = rows * (prompt + response)
    peak, bw = gflops * 1e9, bandwidth_gbs * 1e9
    step_bytes = 4 * (blocks + vocab)
    prefill = 2 * blocks * rows * prompt + 2 * vocab * rows
    decode = max(step_bytes / bw, 2 * (blocks + vocab) * rows / peak)
    generation = prefill / peak + (response - 1) * decode
    lm_positions = rows * (response + 1)
    scoring_flops = 3 * 2 * blocks * tokens + 2 * vocab * lm_positions  # reference, value, reward
    if s.get("recompute_logprobs", False):
        scoring_flops += 2 * blocks * tokens + 2 * vocab * lm_positions
    steps = s["ppo_epochs"] * rows // s["mini_batch_size"]
    update_flops = s["ppo_epochs"] * (6 * blocks * tokens * 2 + 6 * vocab * lm_positions)
    adam_bytes = steps * 28 * 2 * (blocks + vocab)
    update = update_flops / peak + adam_bytes / bw
    return {"generate": generation, "score": scoring_flops / peak, "update": update,
            "flops": {"prefill": prefill, "decode_per_step": 2 * (blocks + vocab) * rows, "score": scoring_flops,
                      "update": update_flops}, "bytes": {"decode_per_step": step_bytes, "adamw": adam_bytes},
            "params": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (use the benchmark's)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "roofline_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "threads": args.threads,
              "load_average_before": os.getloadavg(), "copy_bandwidth_gb_s": copy_bandwidth_gbs(),
              "fp32_matmul_gflop_s": matmul_gflops(), "load_average_after": os.getloadavg()}
    ppo_file = args.out.parent / "ppo_cpu.json"
    if ppo_file.is_file():
        ppo = json.loads(ppo_file.read_text())
        settings = ppo["settings"]
        config = json.loads((Path(settings["model"]) / "config.json").read_text())
        settings = settings | {"prompt_tokens": max(settings["prompt_tokens"]), "recompute_logprobs":
                               settings.get("tether_options", {}).get("rollout_logprobs", "recompute") == "recompute"}
        bound = ppo_roofline(config, settings, result["fp32_matmul_gflop_s"], result["copy_bandwidth_gb_s"])
        result["ppo_cpu_roofline_seconds"] = bound
        result["ppo_cpu_measured_seconds"] = {side: v["split_seconds_per_iteration"] for side, v in ppo["summary"].items()}
        result["ppo_cpu_threads"] = ppo["machine"]["threads_per_side"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
