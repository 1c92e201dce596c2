"""``tether`` with ``fsdp_on_cpu`` imported first: the CLI under an FSDP launch on CPU processes (tests only)."""

import sys

import fsdp_on_cpu  # noqa: F401  (before any Accelerator exists)

from tether.cli import main

if __name__ == "__main__":
    sys.exit(main())
