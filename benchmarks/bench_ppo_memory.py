"""Peak memory of one tether PPO iteration vs training the policy alone (CPU, fp32, SmolLM2-135M).

    .venv/bin/python benchmarks/bench_ppo_memory.py     # writes benchmarks/results/ppo_memory.json
    (the same as: .venv/bin/python benchmarks/bench_ppo.py --memory)

Each configuration runs in its own fresh process and reports the process's peak resident set size
(VmHWM from /proc/self/status) and its RSS after the imports, before any model is loaded (the
interpreter + torch + transformers baseline, the same for every configuration):

* ``policy_alone``: the policy trained by itself, the usual way: ``model(ids, labels=ids)`` (full
  logits), backward, fused AdamW step, twice (AdamW's state exists from the first step on), on one
  PPO micro-batch (8 rows × 41 prompt + 32 response tokens);
* ``ppo_full``: one PPO iteration (batch 16, 32 response tokens, 2 epochs, mini-batch 8), full
  fine-tuning, frozen reference copy, reward model, separate value model (a copy of the reward model);
* ``ppo_full_value_head``: the same with a value head on the policy instead of a value model;
* ``ppo_lora``: LoRA on the policy (r 16, all linear layers; the reference is the adapter-disabled
  policy) and the default critic, which under LoRA is the reward model with its own adapters and a
  trainable copy of its head (the reward is that network with the adapters disabled);
* ``ppo_lora_value_head``: LoRA, value head on the policy: the four roles in two networks (policy
  with adapters and the frozen reward model).

The target of issue 7 reads "LoRA PPO peak memory ≤ 1.5× training the policy alone"; both the
ratio of whole-process peaks and the ratio of peaks above the common baseline are written.

``--sharded ppo_full [ppo_lora ...]`` measures instead the peak per process of those configurations
on 1 process (plain) and on 2 CPU processes under FSDP2 (``accelerate launch`` with a copy of
``configs/accelerate/fsdp.yaml`` with ``use_cpu: true``, ``num_processes: 2``, ``mixed_precision:
'no'``; accelerate shards only on GPUs, so the ranks import ``tests/fsdp_on_cpu.py``, which lifts
that one gate), the same global batch, and writes ``results/ppo_memory_sharded.json``::

    .venv/bin/python benchmarks/bench_ppo_memory.py --sharded ppo_full ppo_lora --threads 1 \
        --malloc_mmap_threshold 1048576 --out benchmarks/results/ppo_memory_sharded_mmap1m.json

``--malloc_mmap_threshold`` runs both sides with glibc's ``MALLOC_MMAP_THRESHOLD_``: under FSDP2 on
CPU every forward and backward allocates and frees each unit's gathered parameters and gradients;
with glibc's default (a threshold that rises to the size of the first large block freed) those
blocks come from the heap afterwards and the freed memory stays in the process, which hides what
sharding saves (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_ppo import PYTHON, cpu_name, peak_rss_mb, prepare, rss_mb  # noqa: E402

CONFIGS = {
    "policy_alone": None,
    "ppo_full": {},
    "ppo_full_value_head": {"value_head_on_policy": True},
    "ppo_lora": {"use_peft": True},
    "ppo_lora_value_head": {"use_peft": True, "value_head_on_policy": True},
}


def run_config(name: str, work: Path) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    import transformers  # noqa: F401  (part of the baseline)

    if os.environ.get("BENCH_FSDP_ON_CPU") == "1":  # (--sharded) before any Accelerator exists
        sys.path.insert(0, str(HERE.parent / "tests"))
        import fsdp_on_cpu  # noqa: F401

    s = json.loads((work / "settings.json").read_text())
    baseline = rss_mb()
    started = time.perf_counter()
    if CONFIGS[name] is None:
        from transformers import AutoModelForCausalLM

        ids = json.loads((work / "prompts.json").read_text())["ids"][: s["mini_batch_size"]]
        width = max(len(i) for i in ids) + s["response_length"]
        generator = torch.Generator().manual_seed(0)
        batch = torch.randint(0, 49152, (len(ids), width), generator=generator)
        model = AutoModelForCausalLM.from_pretrained(s["model"], dtype=torch.float32)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-6, eps=1e-5, fused=True)
        for _ in range(2):
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        detail = {"rows": len(ids), "tokens_per_row": width}
    else:
        from tether.ppo import PPOConfig, PPOTrainer

        prompts = json.loads((work / "prompts.json").read_text())["texts"]
        config = PPOConfig(
            output_dir=str(work / f"{name}-{os.environ.get('BENCH_RUN', os.getpid())}"),
            model_name_or_path=s["model"],
            reward_model_path=str(work / "rm"),
            batch_size=s["batch_size"],
            mini_batch_size=s["mini_batch_size"],
            ppo_epochs=s["ppo_epochs"],
            num_iterations=1,
            response_length=s["response_length"],
            normalize_reward=False,
            missing_eos_penalty=None,
            save_steps=0,
            logging_steps=1000,
            report_to="none",
            disable_tqdm=True,
            use_cpu=True,
            dtype="float32",
            **CONFIGS[name],
            **s.get("tether_options", {}),
        )
        after_update: list[float] = []  # the peak through each iteration's update (before the final save)
        trainer = PPOTrainer(config, prompts, extra_metrics=lambda _: after_update.append(peak_rss_mb()) or {})
        after_setup = peak_rss_mb()  # the models loaded (and under FSDP sharded), the optimizer built
        trainer.train()
        models = trainer.models
        detail = {
            "peak_rss_after_setup_mb": after_setup,
            "peak_rss_after_update_mb": after_update[-1],
            "trained_parameters": sum(p.numel() for p in models.trained_parameters),
            "process": trainer.rank,
            "processes": trainer.world,
            "distributed_type": str(trainer.accelerator.distributed_type.value),
        }
    return {
        "peak_rss_mb": peak_rss_mb(),
        "baseline_rss_mb": baseline,
        "seconds": time.perf_counter() - started,
        **detail,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tether_options", default="{}", help="JSON of extra PPOConfig fields for tether")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--malloc_mmap_threshold",
        type=int,
        default=None,
        help="run every process with MALLOC_MMAP_THRESHOLD_=BYTES (glibc): allocations of at least this size "
        "are mapped and returned to the system when freed (default: glibc's own, dynamic threshold)",
    )
    parser.add_argument(
        "--sharded",
        nargs="+",
        choices=[c for c in CONFIGS if CONFIGS[c] is not None],
        help="peak per process on 1 process vs 2 under FSDP2 for these configurations",
    )
    args = parser.parse_args(argv)
    if args.config:
        result = run_config(args.config, args.work)
        if "BENCH_RUN" in os.environ:  # (--sharded) one file per process: their stdout lines would interleave
            (args.work / f"result-{os.environ['BENCH_RUN']}-{result['process']}.json").write_text(json.dumps(result))
        print("RESULT " + json.dumps(result), flush=True)
        return
    if args.sharded:
        run_sharded(args, argv)
        return
    args.out = args.out or HERE / "results" / "ppo_memory.json"
    settings = _settings(args)
    results = {}
    with tempfile.TemporaryDirectory(prefix="tmp-ppo-memory-", dir=HERE / "results") as tmp:
        work = Path(tmp)
        prepare(work, settings)
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "BENCH_THREADS": str(args.threads),
            "OMP_NUM_THREADS": str(args.threads),
        }
        env.pop("PYTHONPATH", None)
        for name in CONFIGS:
            proc = subprocess.run(
                [str(PYTHON), str(Path(__file__).resolve()), "--config", name, "--work", str(work)],
                capture_output=True,
                text=True,
                env=env,
                cwd=str(work),
            )
            if proc.returncode != 0:
                sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
                raise SystemExit(f"{name} failed (exit {proc.returncode})")
            line = next(x for x in proc.stdout.splitlines()[::-1] if x.startswith("RESULT "))
            results[name] = json.loads(line[len("RESULT ") :])
            print(
                f"{name}: peak RSS {results[name]['peak_rss_mb']:.0f} MiB "
                f"(baseline {results[name]['baseline_rss_mb']:.0f} MiB)",
                flush=True,
            )
    alone = results["policy_alone"]
    for r in results.values():
        r["ratio_to_policy_alone"] = r["peak_rss_mb"] / alone["peak_rss_mb"]
        r["ratio_above_baseline"] = (r["peak_rss_mb"] - r["baseline_rss_mb"]) / (
            alone["peak_rss_mb"] - alone["baseline_rss_mb"]
        )
    report = {
        "benchmark": "ppo_memory",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count()},
        "load_average": os.getloadavg(),
        "command": "python benchmarks/bench_ppo_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": settings,
        "target": "LoRA PPO peak <= 1.5x policy_alone",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(f".tmp-{args.out.name}")
    tmp_out.write_text(json.dumps(report, indent=2))
    os.replace(tmp_out, args.out)
    for name, r in results.items():
        print(
            f"{name:22s} peak {r['peak_rss_mb']:7.0f} MiB  x{r['ratio_to_policy_alone']:.2f} "
            f"(above baseline x{r['ratio_above_baseline']:.2f})"
        )
    print(f"wrote {args.out}")


def _settings(args) -> dict:
    return {
        "model": None,
        "batch_size": 16,
        "mini_batch_size": 8,
        "ppo_epochs": 2,
        "response_length": 32,
        "warmup": 0,
        "iterations": 1,
        "seed": 0,
        "tether_options": json.loads(args.tether_options),
    }


def run_sharded(args, argv) -> None:
    """Each configuration of ``args.sharded`` on 1 process, then on 2 under FSDP2: peak RSS per process."""
    import yaml

    out = args.out or HERE / "results" / "ppo_memory_sharded.json"
    settings = _settings(args)
    python = PYTHON if PYTHON.exists() else Path(sys.executable)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="tmp-ppo-memory-", dir=HERE / "results") as tmp:
        work = Path(tmp)
        prepare(work, settings)
        fsdp = yaml.safe_load((HERE.parent / "configs" / "accelerate" / "fsdp.yaml").read_text())
        fsdp.update(use_cpu=True, num_processes=2, mixed_precision="no")
        (work / "fsdp_cpu.yaml").write_text(yaml.safe_dump(fsdp))
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "BENCH_THREADS": str(args.threads),
            "OMP_NUM_THREADS": str(args.threads),
            "PYTHONPATH": str(HERE.parent / "src"),  # this checkout's tether
        }
        if args.malloc_mmap_threshold is not None:
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
        worker = [str(Path(__file__).resolve()), "--work", str(work), "--config"]
        for name in args.sharded:
            launch = {
                "1_process": [str(python), *worker, name],
                "2_processes_fsdp2": [
                    str(python),
                    "-m",
                    "accelerate.commands.launch",
                    "--config_file",
                    str(work / "fsdp_cpu.yaml"),
                    "--num_cpu_threads_per_process",
                    str(args.threads),
                    *worker,
                    name,
                ],
            }
            for layout, command in launch.items():
                run_env = env | {"BENCH_RUN": f"{name}-{layout}", "BENCH_FSDP_ON_CPU": "1" if "fsdp" in layout else "0"}
                started = time.perf_counter()
                proc = subprocess.run(command, capture_output=True, text=True, env=run_env, cwd=str(work))
                entry: dict = {"wall_seconds": time.perf_counter() - started}
                if proc.returncode != 0:
                    entry["error"] = (proc.stdout[-1500:] + proc.stderr[-3000:]).strip()
                    print(f"{name} {layout}: FAILED (exit {proc.returncode})\n{entry['error'][-2000:]}", flush=True)
                else:
                    files = sorted(work.glob(f"result-{name}-{layout}-*.json"))
                    entry["per_process"] = sorted(
                        (json.loads(f.read_text()) for f in files), key=lambda r: r["process"]
                    )
                    peaks = [r["peak_rss_mb"] for r in entry["per_process"]]
                    entry["max_peak_rss_mb"] = max(peaks)
                    print(f"{name} {layout}: peak RSS per process {[round(p) for p in peaks]} MiB", flush=True)
                results.setdefault(name, {})[layout] = entry
            pair = results[name]
            if all("max_peak_rss_mb" in pair[k] for k in launch):
                pair["ratio_2_to_1"] = (
                    pair["2_processes_fsdp2"]["max_peak_rss_mb"] / pair["1_process"]["max_peak_rss_mb"]
                )
    report = {
        "benchmark": "ppo_memory_sharded",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count()},
        "load_average": os.getloadavg(),
        "command": "python benchmarks/bench_ppo_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": settings | {"malloc_mmap_threshold": args.malloc_mmap_threshold},
        "target": "peak RSS per process lower on 2 processes (FSDP2) than on 1",
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(f".tmp-{out.name}")
    tmp_out.write_text(json.dumps(report, indent=2))
    os.replace(tmp_out, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
