"""Run by tests/test_crash_recovery.py: a real ``tether`` command (``tether.cli.main``) that kills itself
with SIGKILL in the middle of writing the checkpoint of one step (after the model and optimizer are
written, before the RNG states and the trainer state), like a power cut or the OOM killer would.

usage: python kill_during_save_worker.py STEP tether-arguments...
"""

from __future__ import annotations

import os
import signal
import sys

from transformers import Trainer


def main() -> int:
    step = int(sys.argv[1])
    original = Trainer._save_rng_state

    def save_rng_state(self, output_dir):
        if self.state.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, output_dir)

    Trainer._save_rng_state = save_rng_state
    from tether.cli import main as tether

    return tether(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
