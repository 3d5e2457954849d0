#!/usr/bin/env python
"""Reproduce the three papers' results and write ``docs/REPRODUCTION.md``.

    python scripts/reproduce.py scale=cpu|tiny|imagenet [key=value ...] [reuse=true]
    python scripts/reproduce.py scale=cpu --print-commands   # that scale's train.py/explain.py calls

A thin entry point: the stages, the report and the settings are in ``attncam.stages.reproduce``
(settings in ``conf/reproduce/<scale>.yaml``, published numbers in ``conf/reproduce/paper.yaml``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from attncam.stages.reproduce import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
