"""A scheduler process for the resume test: join the test's Ray and hive, run a round.

Usage: python -m tests.evolution._resume_driver GCS_ADDRESS HOME CONFIG_JSON NAME
(the test SIGKILLs it part-way through).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hive
from evolution._config import EvolutionConfig
from evolution._scheduler import EvolutionScheduler


def main() -> None:
    address, home, config, name = sys.argv[1:5]
    client = hive.init(address=address, home=home)
    cfg = EvolutionConfig.from_json(Path(config).read_text())
    EvolutionScheduler.launch(cfg, name, client=client).run_round(progress=False)
    print("round finished", flush=True)


if __name__ == "__main__":
    main()
