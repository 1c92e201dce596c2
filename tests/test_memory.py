"""Chunk sizes fitted to memory: real allocator failures under an address-space limit (RLIMIT_AS) in
a subprocess, never a simulated error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# One malloc arena and a fixed mmap threshold with trimming: every block over 128 KiB is mapped and unmapped on
# its own, so freed memory leaves the address space and the limit measures what a run really needs
# (glibc's dynamic threshold would otherwise keep freed blocks mapped and hand them to the next run).
ENV = {
    **os.environ,
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": "131072",
    "MALLOC_TRIM_THRESHOLD_": "131072",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and RLIMIT_AS")


def _result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = next(line for line in proc.stdout.splitlines()[::-1] if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def test_a_step_that_exceeds_memory_is_retried_with_half_the_rows_until_it_fits():
    # 64 rows of 8 MiB need 512 MiB at once; the limit leaves 300 MiB, so 32 rows (256 MiB) is the first fit
    code = textwrap.dedent("""
        import json, re, resource, torch
        from pathlib import Path
        from tether.memory import run_fitting_memory
        torch.set_num_threads(1)
        size_now = int(re.search(r"VmSize:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (size_now + 300 * 2**20, resource.RLIM_INFINITY))
        calls = []
        def step(rows):
            calls.append(rows)
            sums = []
            for start in range(0, 64, rows):
                block = torch.ones(rows, 2 * 2**20)  # rows x 8 MiB
                sums.append(float(block.sum()))
                del block
            return sums
        sums, fitted = run_fitting_memory(step, 64, "the test step")
        try:
            run_fitting_memory(lambda rows: torch.ones(rows, 2**30), 4, "a step too large")  # 4 GiB per row
            message = None
        except RuntimeError as exc:
            message = str(exc)
        print("RESULT " + json.dumps({"calls": calls, "fitted": fitted, "total": sum(sums), "message": message}))
    """)
    out = _result(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300))
    assert out["calls"] == [64, 32] and out["fitted"] == 32
    assert out["total"] == 64 * 2 * 2**20  # every row was computed exactly once in the run that fitted
    assert out["message"] is not None and "a step too large" in out["message"] and "single row" in out["message"]


def test_an_error_that_is_not_out_of_memory_is_raised_at_once():
    from tether.memory import run_fitting_memory

    calls = []

    def step(rows):
        calls.append(rows)
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_fitting_memory(step, 16, "a broken step")
    assert calls == [16]


@pytest.mark.parametrize("case", ["scoring", "update"])
def test_ppo_shrinks_its_chunks_to_fit_and_computes_the_same_iteration(tmp_path, case):
    """The same PPO iteration without a limit and under one 30% below its peak: the whole-batch
    scoring pass (or the whole-minibatch update) no longer fits, its chunks halve, and every metric
    agrees with the unlimited run (float summation order aside)."""
    proc = subprocess.run(
        [sys.executable, str(HERE / "memory_limit_worker.py"), str(tmp_path), case, "0.7"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    out = _result(proc)
    free, limited = out["free"], out["limited"]
    key, start = ("forward_batch", 16) if case == "scoring" else ("micro", 8)
    assert free[key] == start and limited[key] < start
    assert limited["generation_batch"] == free["generation_batch"] == 16
    assert "ran out of memory; retrying in chunks of" in proc.stderr
    a, b = free["metrics"], limited["metrics"]
    assert a.keys() == b.keys()
    for name, value in a.items():
        if isinstance(value, float):
            assert b[name] == pytest.approx(value, rel=1e-4, abs=1e-7), name
        else:
            assert b[name] == value, name
