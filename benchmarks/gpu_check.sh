#!/usr/bin/env bash
# The GPU check of tether, meant to finish in under 8 minutes on one GPU:
#   1. the PPO benchmark against TRL 1.12.0 at issue 7's settings (bench_ppo.py --device cuda
#      --precision bf16, batch 64, mini-batch 16, 4 epochs, 53 tokens; TRL is installed from PyPI into
#      benchmarks/.peers/trl-1.12.0 when it is not there, its row skipped with the reason when that fails);
#   2. bf16 smoke runs of `tether rm`, `dpo` and `ppo` (--bf16 true --dtype auto) on the embedded demo
#      task with the embedded SmolLM2-135M-Instruct;
#   3. with 2+ GPUs, the same three under FSDP2 (configs/accelerate/fsdp.yaml, num_processes = GPUs).
# Every step is timed and has its own time limit; a failed step is a row of the table, not the end
# of the check. One table is printed and benchmarks/results/gpu_<UTC time>.json written.
#
#   benchmarks/gpu_check.sh              # on a GPU machine
#   benchmarks/gpu_check.sh --cpu        # the same steps on CPU with tiny settings (checks the script,
#                                        # the table and the JSON; its JSON goes to a tmp folder)
# PYTHON=... picks the interpreter (default .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
if [[ "${1:-}" == "--cpu" ]]; then MODE=cpu; fi
PY="${PYTHON:-.venv/bin/python}"
if [[ ! -x "$PY" ]]; then PY="$(command -v python3)"; fi
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
WORK="benchmarks/results/tmp-gpu-check-$STAMP"   # git-ignored: logs, outputs
mkdir -p "$WORK"
ROWS="$WORK/rows.tsv"
: >"$ROWS"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
TETHER=("$PY" -m tether.cli)

# step NAME LIMIT_SECONDS COMMAND...: run it with its output in $WORK/NAME.log; one row: name, status, milliseconds
step() {
    local name="$1" limit="$2"
    shift 2
    local start end status
    start="$(date +%s%N)"
    if timeout "$limit" "$@" >"$WORK/$name.log" 2>&1; then
        status="ok"
    else
        local code=$?
        if [[ $code -eq 124 ]]; then status="FAILED: over its ${limit} s limit"; else status="FAILED: exit $code"; fi
    fi
    end="$(date +%s%N)"
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(((end - start) / 1000000))" "$WORK/$name.log" >>"$ROWS"
    echo "[$name] $status"
}
skip() {  # skip NAME REASON
    printf '%s\t%s\t0\t\n' "$1" "skipped: $2" >>"$ROWS"
    echo "[$1] skipped: $2"
}

GPUS="$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)"
if [[ "$MODE" == gpu && "$GPUS" -eq 0 ]]; then
    skip cuda "no CUDA device visible to $PY (use --cpu to check the script on CPU)"
fi

# ---- 1. PPO against TRL 1.12.0 at issue 7's settings -------------------------------------------
if [[ "$MODE" == gpu ]]; then
    BENCH=(--device cuda --precision bf16 --batch_size 64 --mini_batch_size 16 --ppo_epochs 4
           --response_length 53 --threads 8 --warmup 1 --iterations 2 --rounds 1)
else  # tiny: a 2-layer 128-wide model of the SmolLM2 family, a few tokens
    BENCH=(--device cpu --architecture 2x128 --batch_size 4 --mini_batch_size 2 --ppo_epochs 1
           --response_length 4 --threads 1 --warmup 0 --iterations 1 --rounds 1)
fi
SIDES="tether,trl"
if [[ ! -d benchmarks/.peers/trl-1.12.0/trl ]]; then
    if [[ "$MODE" == gpu ]] && timeout 120 "$PY" -m pip install --quiet --no-deps \
        --target benchmarks/.peers/trl-1.12.0 trl==1.12.0 >"$WORK/trl_install.log" 2>&1; then
        echo "[trl] installed 1.12.0 from PyPI"
    else
        SIDES="tether"
        skip ppo_vs_trl_trl_side "TRL 1.12.0 not in benchmarks/.peers/trl-1.12.0 and not installable from PyPI here"
    fi
fi
if [[ "$MODE" == gpu && "$GPUS" -eq 0 ]]; then
    skip ppo_vs_trl "no GPU"
else
    step ppo_vs_trl 300 "$PY" benchmarks/bench_ppo.py "${BENCH[@]}" --sides "$SIDES" --out "$WORK/ppo.json"
fi

# ---- 2. bf16 smoke runs of rm, dpo, ppo ----------------------------------------------------------
MODEL=embedded:SmolLM2-135M-Instruct
if [[ "$MODE" == gpu ]]; then
    PRECISION=(--bf16 true --dtype auto)
else  # auto = float32 on CPU; a random 2-layer, 128-wide model of the SmolLM2 family (its tokenizer)
    PRECISION=(--use_cpu true --dtype auto)
    MODEL="$WORK/tiny-model"
    step tiny_model 120 "$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path
from bench_ppo import random_model
from tether.models.loading import resolve_model_path
random_model(Path(sys.argv[1]), resolve_model_path(None), '2x128', 0)" "$MODEL"
fi
SMALL=(--model_name_or_path "$MODEL" --report_to none --max_length 128)
smoke() {  # smoke PREFIX LAUNCHER...: rm, then dpo and ppo (ppo scores with that reward model)
    local prefix="$1"
    shift
    step "${prefix}rm" 120 "$@" rm "${SMALL[@]}" "${PRECISION[@]}" --dataset embedded:demo --max_steps 4 \
        --per_device_train_batch_size 4 --output_dir "$WORK/${prefix}rm"
    step "${prefix}dpo" 120 "$@" dpo "${SMALL[@]}" "${PRECISION[@]}" --dataset embedded:demo --max_steps 4 \
        --per_device_train_batch_size 4 --output_dir "$WORK/${prefix}dpo"
    if [[ -f "$WORK/${prefix}rm/config.json" ]]; then
        step "${prefix}ppo" 120 "$@" ppo --model_name_or_path "$MODEL" --report_to none \
            "${PRECISION[@]}" --reward_model_path "$WORK/${prefix}rm" --dataset embedded:demo --num_iterations 2 \
            --batch_size 8 --mini_batch_size 4 --max_new_tokens 16 --output_dir "$WORK/${prefix}ppo"
    else
        skip "${prefix}ppo" "no reward model (the ${prefix}rm step failed)"
    fi
}
if [[ "$MODE" == gpu && "$GPUS" -eq 0 ]]; then
    skip smoke "no GPU"
else
    smoke "" "${TETHER[@]}"
fi

# ---- 3. FSDP2 on 2+ GPUs --------------------------------------------------------------------------
if [[ "$GPUS" -ge 2 ]]; then
    smoke "fsdp_" "$PY" -m accelerate.commands.launch --config_file configs/accelerate/fsdp.yaml \
        --num_processes "$GPUS" -m tether.cli
else
    skip fsdp "needs 2+ GPUs ($GPUS visible)"
fi

# ---- the table and the JSON ----------------------------------------------------------------------
if [[ "$MODE" == gpu ]]; then OUT="benchmarks/results/gpu_$STAMP.json"; else OUT="$WORK/gpu_check_cpu.json"; fi
"$PY" - "$ROWS" "$OUT" "$MODE" "$GPUS" "$WORK" <<'EOF'
import json, platform, subprocess, sys
from datetime import datetime, timezone
from pathlib import Path

rows_file, out, mode, gpus, work = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), Path(sys.argv[5])
rows = []
for line in Path(rows_file).read_text().splitlines():
    name, status, milliseconds, log = line.split("\t")
    row = {"step": name, "status": status, "seconds": int(milliseconds) / 1000}
    if status.startswith("FAILED") and log:
        row["log_tail"] = Path(log).read_text(errors="replace")[-2000:]
    rows.append(row)
ppo = work / "ppo.json"
bench = json.loads(ppo.read_text()) if ppo.is_file() else None
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
except (OSError, subprocess.SubprocessError):
    smi = []
report = {"check": "gpu_check", "mode": mode, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
          "machine": {"gpus": gpus, "gpu_names": smi, "host": platform.node()}, "steps": rows, "ppo_benchmark": bench}
out.write_text(json.dumps(report, indent=2))
width = max(len(r["step"]) for r in rows)
print(f"\n{'step':{width}}  {'seconds':>8}  status")
for r in rows:
    print(f"{r['step']:{width}}  {r['seconds']:8.1f}  {r['status']}")
if bench:
    for side, result in (bench.get("summary") or {}).items():
        numbers = {k: v for k, v in result.items() if isinstance(v, (int, float))}
        print(f"ppo benchmark, {side}: " + ", ".join(f"{k} {v:.4g}" for k, v in numbers.items()))
print(f"wrote {out}")
EOF
