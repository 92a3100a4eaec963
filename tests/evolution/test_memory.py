"""Peak memory of a streaming merge stays far below one checkpoint (measured in a fresh process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.evolution.helpers import make_synthetic_checkpoint
from tests.factories import REPO_ROOT

N_TENSORS = 64  # tensors per checkpoint
NUMEL = 256 * 1024  # float32 elements per tensor: 1 MiB, so a checkpoint is 64 MiB
CHECKPOINT_BYTES = N_TENSORS * NUMEL * 4

# Runs in a child process so that the peak RSS (VmHWM, reset through /proc/self/clear_refs after a
# warm-up merge) belongs to the merge alone. tracemalloc only sees Python-level allocations (not
# torch's tensor buffers); RSS sees everything, including the file pages a mmap would pull in.
# The child runs torch single-threaded (OpenMP worker threads get their own glibc malloc arenas,
# whose retained pages add noise) and with a fixed glibc mmap threshold: every allocation above
# 64 KiB is its own mapping and is unmapped when freed, so RSS follows the live tensors instead of
# the fragmentation of glibc's heap (with the default dynamic threshold, 1 MiB tensors land in the
# heap and its high-water mark varies by +-10 MiB between runs).
CHILD = r"""
import json, sys, tracemalloc
from evolution._merge import merge
from evolution._recipe import MergeRecipe

def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

method, base, a, b, out = sys.argv[1:6]
recipe = MergeRecipe(method=method, base_model=base,
                     models=[{"path": a, "density": 0.5}, {"path": b, "density": 0.5}])
merge(recipe, out + "-warmup", progress=False)   # import and allocator warm-up
rss_before = kib("VmRSS")
with open("/proc/self/clear_refs", "w") as fh:     # VmHWM := VmRSS
    fh.write("5")
tracemalloc.start()
result = merge(recipe, out, progress=False)
py_peak = tracemalloc.get_traced_memory()[1]
print(json.dumps({"rss_before": rss_before * 1024, "rss_peak": kib("VmHWM") * 1024,
                  "tracemalloc_peak": py_peak, "seconds": result.seconds,
                  "bytes_read": result.bytes_read}))
"""


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("memory")
    return [
        make_synthetic_checkpoint(root / name, n_tensors=N_TENSORS, numel=NUMEL, seed=i)
        for i, name in enumerate(["base", "a", "b"])
    ]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_peak_memory_is_far_below_one_checkpoint(
    three_checkpoints: list[Path], tmp_path: Path, method: str
) -> None:
    base, a, b = three_checkpoints
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, method, str(base), str(a), str(b), str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120, check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    rise = stats["rss_peak"] - stats["rss_before"]
    print(f"\n{method}: 3 x {CHECKPOINT_BYTES / 2**20:.0f} MiB inputs, peak RSS rise "
          f"{rise / 2**20:.1f} MiB, tracemalloc peak {stats['tracemalloc_peak'] / 2**20:.2f} MiB, "
          f"{stats['seconds']:.2f} s")  # fmt: skip
    assert stats["bytes_read"] == 3 * CHECKPOINT_BYTES + 16 * 8  # every input tensor read once
    # A whole-model merge needs >= 3 checkpoints resident; streaming needs a few tensors (1 MiB).
    assert rise < CHECKPOINT_BYTES / 4, f"peak RSS rose by {rise / 2**20:.1f} MiB"
    assert stats["tracemalloc_peak"] < CHECKPOINT_BYTES / 16
