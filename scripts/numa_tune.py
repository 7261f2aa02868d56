#!/usr/bin/env python3
"""Measure NUMA bandwidth and MoE kernel scaling; write a config for `--numa-config`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybrid_runtime.numa.tune import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
