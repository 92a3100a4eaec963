"""Does an evolved merge beat its parents? The honest demonstration, five seeds (~6 min, 2 CPUs).

For each seed: a tiny Llama base pre-trained on the format of two synthetic tasks (``inc``:
"i:372=" -> "483", ``upper``: "u:abc=" -> "ABC"), one specialist fine-tuned per task, a
multitask fine-tune (the upper bound), uniform averaging, plain task arithmetic, TIES, and an
evolution round on hive (CMA-ES over per-layer-group task-arithmetic weights) whose fitness is
the validation split. Every figure is exact-match accuracy on the held-out test split, in points.

    python examples/merge_demonstration.py [--seeds 0 1 2 3 4] [--root DIR] [--json FILE]

See docs/evolution.md, "An honest demonstration", and ``evolution._demonstration``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import hive
from evolution import DemonstrationSettings, run_demonstration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--root", type=Path, default=None, help="checkpoints + hive home (default: a temp dir)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()

    root = args.root or Path(tempfile.mkdtemp(prefix="hive-merge-demonstration-"))
    started = time.perf_counter()
    hive.init(home=root / "hive-home")
    try:
        result = run_demonstration(seeds=args.seeds, root=root, settings=DemonstrationSettings())
    finally:
        hive.shutdown()
    elapsed = time.perf_counter() - started

    print(result.to_pandas().to_string(index=False))
    print()
    print("Combined held-out score (mean of the two task accuracies, points):")
    print(result.markdown())
    wins = sum(m >= 5.0 for m in result.margins().values())
    print(
        f"\nevolved beats both specialists by >= 5 points in {wins} of {len(args.seeds)} seeds "
        f"-> claim {'holds' if result.holds(min_seeds=min(4, len(args.seeds))) else 'FAILS'}"
    )
    print(f"checkpoints under {root}; {elapsed:.0f} s")
    if args.json:
        rows = [r.model_dump() for r in result.rows]
        args.json.write_text(
            json.dumps({"rows": rows, "margins": result.margins(), "seconds": elapsed}, indent=1)
        )


if __name__ == "__main__":
    main()
