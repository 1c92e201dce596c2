"""Machine limits for the PPO roofline note: memory bandwidth and matmul rate of this CPU (or GPU), and
the time each PPO phase would take at those limits next to the measured times.

    .venv/bin/python benchmarks/roofline.py [--threads 2] [--ppo results/ppo_cpu_quiet.json]
        # writes benchmarks/results/roofline_cpu.json (next to the PPO benchmark JSON given, if any)
    .venv/bin/python benchmarks/roofline.py --device cuda      # measured on the GPU (bf16 matmul)
    .venv/bin/python benchmarks/roofline.py --device cuda --peak_gflops 989000 --bandwidth_gbs 3350 \
        [--architecture 24x1024]   # datasheet figures instead (H100 SXM: 989 TFLOP/s bf16 dense, 3.35 TB/s)

Bandwidth: a copy of 512 MiB (CPU: numpy float64; GPU: a torch tensor), bytes moved = read + write,
best of 5. Peak FLOP rate: a square ``torch.mm`` (CPU: 2048² fp32 on ``--threads``; GPU: 8192² bf16),
2·n³ FLOPs, best of 10. Best-of-N, because other processes may share the cores; the load average is
recorded. Without a PPO benchmark JSON the bounds are computed for issue 7's setting of the device
(CPU: batch 16, 32 tokens, 2 epochs, mini-batch 8; GPU: batch 64, 53 tokens, 4 epochs, mini-batch 16;
41 prompt tokens; the embedded SmolLM2-135M or ``--architecture``).
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


def copy_bandwidth_gbs(device: str, mib: int = 512, repeats: int = 5) -> float:
    if device == "cpu":
        src = np.ones(mib * 2**20 // 8)
        dst = np.empty_like(src)
        copy, sync = (lambda: np.copyto(dst, src)), (lambda: None)
    else:
        src = torch.ones(mib * 2**20 // 4, device=device)
        dst = torch.empty_like(src)
        copy, sync = (lambda: dst.copy_(src)), torch.cuda.synchronize
    copy()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        copy()
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * mib * 2**20 / best / 1e9


def matmul_gflops(device: str, repeats: int = 10) -> float:
    n, dtype = (2048, torch.float32) if device == "cpu" else (8192, torch.bfloat16)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    torch.mm(a, b)
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
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
    """Lower bounds, in seconds per iteration, for the PPO benchmark's phases (weights stored in fp32,
    as in the benchmark: with bf16 autocast every step still reads the fp32 weights).

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
    return {
        "generate": generation,
        "score": scoring_flops / peak,
        "update": update,
        "flops": {
            "prefill": prefill,
            "decode_per_step": 2 * (blocks + vocab) * rows,
            "score": scoring_flops,
            "update": update_flops,
        },
        "bytes": {"decode_per_step": step_bytes, "adamw": adam_bytes},
        "params": n,
    }


ISSUE_SETTINGS = {
    "cpu": {"batch_size": 16, "response_length": 32, "ppo_epochs": 2, "mini_batch_size": 8},
    "cuda": {"batch_size": 64, "response_length": 53, "ppo_epochs": 4, "mini_batch_size": 16},
}


def main() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_ppo import family_config

    from tether.models.loading import resolve_model_path

    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (use the benchmark's)")
    parser.add_argument("--peak_gflops", type=float, default=None, help="use this FLOP rate instead of measuring")
    parser.add_argument("--bandwidth_gbs", type=float, default=None, help="use this bandwidth instead of measuring")
    parser.add_argument(
        "--ppo",
        type=Path,
        default=None,
        help="PPO benchmark JSON whose measured phase times go next to the bounds "
        "(default: results/ppo_DEVICE.json when it exists)",
    )
    parser.add_argument("--architecture", default=None, help="LAYERSxWIDTH when no PPO JSON names the model")
    parser.add_argument("--out", type=Path, default=None, help="default: results/roofline_DEVICE.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": args.device,
        "threads": args.threads,
        "load_average_before": os.getloadavg(),
    }
    measured = args.peak_gflops is None or args.bandwidth_gbs is None
    result["bandwidth_gb_s"] = args.bandwidth_gbs or copy_bandwidth_gbs(args.device)
    result["matmul_gflop_s"] = args.peak_gflops or matmul_gflops(args.device)
    result["source"] = "measured" if measured else "given (datasheet)"
    result["load_average_after"] = os.getloadavg()
    ppo_file = args.ppo or here / "results" / f"ppo_{args.device}.json"
    if ppo_file.is_file():
        ppo = json.loads(ppo_file.read_text())
        settings = ppo["settings"]
        config = (
            json.loads((Path(settings["model"]) / "config.json").read_text())
            if Path(settings["model"]).is_dir()
            else family_config(resolve_model_path(None), settings["architecture"])
        )
        settings = settings | {
            "prompt_tokens": max(settings["prompt_tokens"]),
            "recompute_logprobs": settings.get("tether_options", {}).get("rollout_logprobs", "recompute")
            == "recompute",
        }
        result["ppo_measured_seconds"] = {side: v["split_seconds_per_iteration"] for side, v in ppo["summary"].items()}
        result["ppo_file"] = str(ppo_file)
    else:
        config = family_config(resolve_model_path(None), args.architecture)
        settings = ISSUE_SETTINGS[args.device] | {"prompt_tokens": 41, "recompute_logprobs": False}
    result["ppo_settings"] = settings
    result["ppo_roofline_seconds"] = ppo_roofline(config, settings, result["matmul_gflop_s"], result["bandwidth_gb_s"])
    out = args.out or here / "results" / f"roofline_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
