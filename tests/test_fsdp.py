"""Issue 15: SFT, reward model and DPO (full and LoRA) under FSDP2 full sharding on 2 CPU processes,
launched with ``accelerate launch --config_file`` a copy of ``configs/accelerate/fsdp.yaml`` in which
only ``use_cpu``, ``num_processes`` and ``mixed_precision`` differ (so ``fsdp_cpu_ram_efficient_loading:
true``: process 1 loads meta tensors and receives process 0's weights in ``prepare``; checkpoints are
SHARDED_STATE_DICT), against the same runs on 1 process at the same global batch (8 = 2 × 4 = 1 × 8).

accelerate runs FSDP on GPUs only; the worker imports ``fsdp_on_cpu``, which lifts that one gate so
accelerate's own FSDP2 code runs over gloo (see there). Without it the same launch must fail with a
clear message (the last test).

The same runs under DeepSpeed ZeRO-2 and ZeRO-3 (copies of ``configs/accelerate/deepspeed_zero{2,3}.yaml``
with ``num_processes: 2`` and ``mixed_precision: 'no'``; ZeRO-3 with ``zero3_init_flag: true``, so the
weights are partitioned as they load) when ``deepspeed`` is importable; skipped otherwise (it is not
a dependency of tether; see docs/scaling.md). DPO with a live reference model is refused under ZeRO-3
(checked there); precomputed reference log-probs and LoRA's adapter-disabled reference work in all.

Tolerances, each a little above what was measured on this machine (FSDP reduce-scatters two
half-batch gradients where one process sums the whole batch, so float sums are ordered differently):
* final weights: 1e-5 absolute (measured at most 2.5e-6: FSDP's DPO; ZeRO-2/3 at most 2.1e-6);
* logged numbers: 2e-4 relative, 1e-5 absolute (measured at most 4.6e-5 relative under FSDP and
  9.2e-5 under ZeRO-2/3, both SFT's grad norm at step 3);
* resumed from the step-2 sharded checkpoint vs straight through, both in the same layout: exactly
  equal (measured bit-identical in all three layouts: the same operations in the same order).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_scale_out import SKIP, _check_global_batches, _free_port, _initial_weights_differ, _pairs, _rows, _write

HERE = Path(__file__).parent
ROOT = HERE.parent
TOL = dict(rel=2e-4, abs=1e-5)
WEIGHT_TOL = 1e-5
SHIPPED = ROOT / "configs" / "accelerate" / "fsdp.yaml"
TIMEOUT = 600


def fsdp_on_two_cpu_processes(folder: Path) -> Path:
    """The shipped FSDP config with only the device, process count and precision changed."""
    config = yaml.safe_load(SHIPPED.read_text())
    assert config["distributed_type"] == "FSDP" and config["fsdp_config"]["fsdp_version"] == 2
    assert config["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] is True
    assert config["fsdp_config"]["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    config.update(use_cpu=True, num_processes=2, mixed_precision="no")
    path = folder / "fsdp_cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def deepspeed_on_two_cpu_processes(folder: Path, stage: int) -> Path:
    """The shipped ZeRO config with only the process count and precision changed (DeepSpeed needs
    ``use_cpu: false``; its gloo process group comes from ``--ddp_backend gloo``)."""
    config = yaml.safe_load((ROOT / "configs" / "accelerate" / f"deepspeed_zero{stage}.yaml").read_text())
    assert config["distributed_type"] == "DEEPSPEED" and config["deepspeed_config"]["zero_stage"] == stage
    config.update(num_processes=2, mixed_precision="no")
    path = folder / f"zero{stage}_cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _env() -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(HERE), os.environ.get("PYTHONPATH", "")]),
    }


def _launcher(config: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        "--main_process_port",
        str(_free_port()),
        "--num_cpu_threads_per_process",
        "1",
    ]


def _launch_two(root: Path, config: Path, model: Path, sharding: str) -> subprocess.Popen:
    worker = HERE / "sharded_multiprocess_worker.py"
    return subprocess.Popen(
        [*_launcher(config), str(worker), str(root / sharding), str(model), str(root / "data"), "4", sharding],
        cwd=HERE,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finished(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, output[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """``one/``: every run on 1 process; ``fsdp/``: the same on 2 processes under FSDP2."""
    from sharded_multiprocess_worker import main

    root = tmp_path_factory.mktemp("sharded")
    data = root / "data"
    data.mkdir()
    rng = random.Random(0)
    _write(data / "pairs.jsonl", _pairs(32, rng))
    _write(data / "held_out_rm.jsonl", _pairs(8, rng))
    _write(data / "held_out_dpo.jsonl", _pairs(7, rng))
    _write(data / "demos.jsonl", [{"prompt": p["prompt"], "completion": p["chosen"]} for p in _pairs(32, rng)])
    # the two processes start first; the one-process run shares the machine with their start-up
    two = _launch_two(root, fsdp_on_two_cpu_processes(root), tiny_model_dir, "fsdp")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(str(root / "one"), str(tiny_model_dir), str(data), "8")
    finally:
        torch.set_num_threads(before)
    _finished(two)
    return root


@pytest.fixture(scope="module", params=["fsdp", "zero2", "zero3"])
def layout(request, runs, tiny_model_dir) -> str:
    """The sharded layout a test compares with the 1-process runs (DeepSpeed ones launched here)."""
    if request.param.startswith("zero"):
        pytest.importorskip("deepspeed", reason="deepspeed is not installed (optional; see docs/scaling.md)")
        config = deepspeed_on_two_cpu_processes(runs, int(request.param[-1]))
        _finished(_launch_two(runs, config, tiny_model_dir, request.param))
    return request.param


def _same_numbers(a: dict, b: dict, where: str) -> None:
    numbers = {k for k, v in a.items() if isinstance(v, (int, float)) and not any(s in k for s in SKIP)}
    assert numbers == {k for k, v in b.items() if isinstance(v, (int, float)) and not any(s in k for s in SKIP)}, where
    for key in sorted(numbers):
        assert b[key] == pytest.approx(a[key], **TOL), f"{where}: {key}"


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "dpo-lora", "dpo-precomputed"])
def test_stage_with_sharded_weights_equals_one_process(runs, layout, tiny_model_dir, stage):
    if stage == "dpo" and layout == "zero3":  # refused before anything was loaded or written
        assert "--precompute_ref_log_probs true" in (runs / layout / "dpo.refused.txt").read_text()
        assert not (runs / layout / "dpo").exists()
        return
    one, two = runs / "one" / stage, runs / layout / stage
    if stage in ("sft", "rm", "dpo"):
        _check_global_batches(runs, stage, layout)  # the same 8 examples at every step, split 4 + 4
    a, b = _rows(one), _rows(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] and sum("loss" in r for r in a) == 4
    for ra, rb in zip(a, b):
        _same_numbers(ra, rb, f"{stage} metrics.jsonl step {ra['step']}")
    for name in ("eval_results.json", "reward_stats.json"):
        if (one / name).is_file():
            _same_numbers(*(json.loads((f / name).read_text()).get("final", {}) or {} for f in (one, two)), name)
    # complete weights, saved once (the gathered state dict), loadable, equal to the 1-process result
    wa, wb = _weights(one), _weights(two)
    assert wa.keys() == wb.keys() and all(wa[k].shape == wb[k].shape for k in wa)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < WEIGHT_TOL
    assert _initial_weights_differ(two, tiny_model_dir)
    assert not list(two.parent.glob(f".{stage}*"))  # staged, published whole
    assert [p.name for p in two.glob("checkpoint-*")] == (["checkpoint-4"] if stage == "rm" else [])
    if stage == "dpo-lora":  # merged on saving: a plain model, no adapter left
        assert not (two / "adapter_config.json").is_file() and not any("lora" in k for k in wb)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if stage == "rm" else AutoModelForCausalLM
    loaded = auto.from_pretrained(two)
    for name, tensor in loaded.state_dict().items():
        if name in wb:
            assert torch.equal(tensor, wb[name]), name


def test_sharded_checkpoints_resume_exactly(runs, layout):
    straight, resumed = runs / layout / "rm-resume" / "straight", runs / layout / "rm-resume" / "resumed"
    checkpoint = straight / "checkpoint-2"
    if layout == "fsdp":  # SHARDED_STATE_DICT: one shard per process of the weights and the optimizer, nothing whole
        shards = ["__0_0.distcp", "__1_0.distcp"]
        assert sorted(p.name for p in (checkpoint / "pytorch_model_fsdp_0").glob("*.distcp")) == shards
        assert sorted(p.name for p in (checkpoint / "optimizer_0").glob("*.distcp")) == shards
        assert not list(checkpoint.glob("*.safetensors")) and not list(checkpoint.glob("pytorch_model.bin"))
    else:  # DeepSpeed's own checkpoint: the optimizer state partitioned per process
        optim = sorted(p.name for p in (checkpoint / "global_step2").glob("*optim_states.pt"))
        assert optim == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    assert [r["step"] for r in _rows(resumed) if "loss" in r] == [3, 4]
    steps = {r["step"]: r for r in _rows(straight) if "loss" in r}
    for row in (r for r in _rows(resumed) if "loss" in r):
        assert row["loss"] == steps[row["step"]]["loss"] and row["grad_norm"] == steps[row["step"]]["grad_norm"]
    ws, wr = _weights(straight), _weights(resumed)
    assert ws.keys() == wr.keys() and all(torch.equal(ws[k], wr[k]) for k in ws)
    # and both equal the 1-process run within the tolerance above
    wo = _weights(runs / "one" / "rm-resume" / "straight")
    assert max((wo[k] - wr[k]).abs().max().item() for k in wo) < WEIGHT_TOL


def test_fsdp_config_on_cpu_processes_is_refused_before_training(tmp_path, tiny_model_dir):
    """The issue's command as it was: the shipped FSDP config with use_cpu: true, no test shim. accelerate
    runs it as plain data parallel while transformers left process 1's weights on the meta device; every
    process stops with a message naming the option, before any step, and nothing hangs."""
    data = tmp_path / "pairs.jsonl"
    _write(data, _pairs(8, random.Random(1)))
    out = tmp_path / "rm"
    command = [
        *_launcher(fsdp_on_two_cpu_processes(tmp_path)),
        "-m",
        "tether.cli",
        "rm",
        "--use_cpu",
        "true",
        "--model_name_or_path",
        str(tiny_model_dir),
        "--dataset",
        str(data),
        "--output_dir",
        str(out),
        "--report_to",
        "none",
    ]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    message = "tether rm: error: the accelerate config asks for FSDP (distributed_type: FSDP) but accelerate runs"
    assert output.count(message) == 2, output[-4000:]  # both processes, each with its own message
    assert "use_cpu" in output and "multi_cpu.yaml" in output
    assert "meta tensor" not in output and "]: Traceback" not in output  # (the launcher reports the exit codes)
    assert not out.exists()
