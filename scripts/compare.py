#!/usr/bin/env python
"""Compare explanation methods with a reference, paired by image id (docs/COMPARE.md).

Reads ``per_image.json`` from an explain run made with ``save_per_image=true``, prints a Markdown
table and writes ``comparison.json`` and ``comparison.md`` into the run folder. Existing results
are never replaced: a second comparison goes to ``comparison-2.*``, then ``comparison-3.*``...

    python scripts/compare.py outputs/explain/RUN
    python scripts/compare.py RUN --reference gradcam --primary average_drop,deletion \\
        --sesoi average_drop=2,deletion=0.01 --metrics average_drop,deletion,insertion
    python scripts/compare.py RUN --out /tmp/my_comparison.md     # also writes my_comparison.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from attncam.io import sha256_file  # noqa: E402
from attncam.metrics.compare import (  # noqa: E402
    DEFAULT_SESOI,
    MIN_RESAMPLES,
    PER_IMAGE_FILE,
    ComparisonRow,
    compare_methods,
    format_comparison_markdown,
    load_per_image,
)

log = logging.getLogger("compare")


def _names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_sesoi(text: str | None) -> dict[str, float]:
    """``"average_drop=2,deletion=0.01"`` -> ``{"average_drop": 2.0, "deletion": 0.01}``."""
    out: dict[str, float] = {}
    for item in _names(text) or []:
        key, sep, value = item.partition("=")
        try:
            if not sep or not key.strip():
                raise ValueError
            out[key.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"bad --sesoi entry {item!r}; expected METRIC=VALUE, e.g. average_drop=2"
            ) from None
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    defaults = ", ".join(f"{k}={v:g}" for k, v in DEFAULT_SESOI.items())
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("run_dir", type=Path, help=f"explain run folder (or its {PER_IMAGE_FILE})")
    p.add_argument("--reference", default="gradcam", help="method compared with (gradcam)")
    p.add_argument("--methods", help="comma list of methods to compare (default: all others)")
    p.add_argument("--metrics", help="comma list of metrics (default: all of the reference)")
    p.add_argument("--primary", help="comma list of primary metrics (Holm over these only)")
    p.add_argument("--sesoi", type=parse_sesoi, default={}, help=f"METRIC=V,... ({defaults})")
    p.add_argument("--alpha", type=float, default=0.05, help="level of every test (0.05)")
    p.add_argument("--resamples", type=int, default=MIN_RESAMPLES, help="bootstrap/sign flips")
    p.add_argument("--seed", type=int, default=0, help="base seed (0)")
    p.add_argument("--out", type=Path, help="write FILE.md and FILE.json here instead (new files)")
    return p


def output_paths(run_dir: Path, out: Path | None) -> tuple[Path, Path]:
    """``(markdown, json)`` paths that do not exist yet; never an existing result."""
    if out is not None:
        md, js = out.with_suffix(".md"), out.with_suffix(".json")
        taken = [str(p) for p in (md, js) if p.exists()]
        if taken:
            raise FileExistsError(f"--out would replace {', '.join(taken)}; choose a new name")
        return md, js
    k = 1
    while True:
        stem = "comparison" if k == 1 else f"comparison-{k}"
        md, js = run_dir / f"{stem}.md", run_dir / f"{stem}.json"
        if not md.exists() and not js.exists():
            return md, js
        k += 1


def _write_new(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "x", encoding="utf-8") as handle:  # "x": fails rather than replace
        handle.write(text)


def _payload(args: argparse.Namespace, source: Path, rows: Sequence[ComparisonRow]) -> Any:
    return {
        "settings": {
            "source": str(source),
            "source_sha256": sha256_file(source),
            "reference": args.reference,
            "primary": _names(args.primary) or [],
            "sesoi": {r.metric: r.sesoi for r in rows},
            "alpha": args.alpha,
            "resamples": args.resamples,
            "seed": args.seed,
        },
        "rows": [r.to_dict() for r in rows],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison; returns the exit status (argparse exits 2 on bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resamples < MIN_RESAMPLES:
        parser.error(
            f"--resamples {args.resamples}: at least {MIN_RESAMPLES} (docs/METHODS.md, Comparisons)"
        )
    source = args.run_dir / PER_IMAGE_FILE if args.run_dir.is_dir() else args.run_dir
    try:
        md_path, json_path = output_paths(source.parent, args.out)
        rows = compare_methods(
            load_per_image(source),
            args.reference,
            metrics=_names(args.metrics),
            primary=_names(args.primary) or [],
            sesoi=args.sesoi,
            alpha=args.alpha,
            resamples=args.resamples,
            seed=args.seed,
            methods=_names(args.methods),
        )
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        parser.error(str(err))
    table = format_comparison_markdown(rows)
    print(table)
    head = f"# Comparison\n\nSource: `{source}`; R = {args.resamples}, seed {args.seed}.\n\n"
    _write_new(json_path, json.dumps(_payload(args, source, rows), indent=2, allow_nan=False))
    _write_new(md_path, head + table)
    print(f"wrote {md_path} and {json_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
