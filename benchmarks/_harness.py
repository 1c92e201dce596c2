"""What every side-by-side benchmark needs: run one side in a fresh process and read its result,
and describe the machine and the library versions in the JSON it writes."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

# Never let a benchmark reach for the hub: both sides load local folders only.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_side(side: str, cmd: list[str], env: dict[str, str], cwd: Path | str) -> dict:
    """Run one side's worker process; it must print ``RESULT <json>`` as its last result line.

    Adds ``process_seconds`` (wall time of the whole process, model loading included) and
    ``load_average_after`` so a disturbed run can be recognised in the JSON.
    """
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(cwd))
    wall = time.perf_counter() - started
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{side} run failed (exit {proc.returncode})")
    result = json.loads(lines[-1][len("RESULT ") :])
    result["process_seconds"] = wall
    result["load_average_after"] = os.getloadavg()[0]
    return result


def peak_rss_mib() -> float:
    """This process's peak resident memory (``VmHWM`` of /proc/self/status), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def qa_feedback_rows(split: str, n: int, seed: int) -> list[dict]:
    """``n`` pairs of ``data/qa_feedback/{split}.jsonl.gz`` as the set holds them: whole questions (each
    with its answers compared pairwise), drawn in a seeded order until ``n`` pairs (the last question's
    cut to make ``n``), each question's pairs in file order. The prompt is the text of its one user turn
    (which tether and TRL both render with the chat template)."""
    import gzip
    import random

    path = Path(__file__).resolve().parent.parent / "data" / "qa_feedback" / f"{split}.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    if n > len(rows):
        raise SystemExit(f"{path}: {len(rows)} pairs, {n} asked for")
    questions: dict[str, list[dict]] = {}
    for row in rows:
        (turn,) = row["prompt"]
        questions.setdefault(turn["content"], []).append(
            {"prompt": turn["content"], "chosen": row["chosen"], "rejected": row["rejected"]}
        )
    order = list(questions)
    random.Random(seed).shuffle(order)
    out: list[dict] = []
    for question in order:
        out += questions[question][: n - len(out)]
        if len(out) == n:
            break
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def versions(python: Path | str, env: dict[str, str] | None = None) -> dict:
    """torch/transformers/accelerate (and trl when importable) as seen by ``python`` with ``env``."""
    code = (
        "import json, torch, transformers, accelerate\n"
        "v = {'torch': torch.__version__, 'transformers': transformers.__version__, "
        "'accelerate': accelerate.__version__}\n"
        "try:\n import trl; v['trl'] = trl.__version__\nexcept ImportError: pass\nprint(json.dumps(v))"
    )
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env)
    return json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr[-300:]}
