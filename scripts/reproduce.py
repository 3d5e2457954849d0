#!/usr/bin/env python
"""Reproduce the three papers' results and write the reports.

    python scripts/reproduce.py scale=cpu|tiny|imagenet [part=guidance|table2|all] [key=value ...]
    python scripts/reproduce.py scale=cpu --print-commands   # the table-2 part's train/explain calls

``part=guidance`` (the default) writes ``docs/REPRODUCTION.md``, the primary experiment;
``part=table2`` writes ``docs/REPRODUCTION_TABLE2.md``, the paper's table-2 analogue; ``all`` both.

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
