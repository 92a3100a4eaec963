"""Small helpers shared by the benchmark scripts in ``benchmarks/``.

Every script measures its baseline in the same run, prints a table, and writes one JSON file
``benchmarks/results/<benchmark>-<UTC timestamp>.json`` with the shape described in
ARCHITECTURE.md ("Measuring")::

    {"benchmark": ..., "quick": ..., "host": {...}, "results": [{"config": {...}, ...}],
     "goals": [{"name": ..., "value": ..., "op": ">=", "target": ..., "met": true}]}

Typical use::

    from _common import base_parser, goal, host_info, print_goals, print_results, write_json
    args = base_parser("my benchmark").parse_args()
    results = [{"section": "x", "config": {...}, "ops_per_s": 123.0}]
    goals = [goal("x_ops_per_s", 123.0, ">=", 100)]
    print_results(results); print_goals(goals)
    write_json("mybench", args.quick, results, goals, args.out)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import operator
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "DEFAULT_OUT", "Stopwatch", "base_parser", "fmt", "fs_type", "goal", "host_info", "median", "percentile",
    "print_goals", "print_results", "print_table", "proc_memory", "summarize", "utc_stamp", "write_json",
]

DEFAULT_OUT = Path(__file__).resolve().parent / "results"

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq,
    "!=": operator.ne,
}


# ---- host --------------------------------------------------------------------------------

def _gpu() -> str | None:
    """Names of the visible NVIDIA GPUs (via nvidia-smi), or None."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    names = [line.strip() for line in out.splitlines() if line.strip()]
    return ", ".join(names) or None


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - not installed
        return None


def host_info(**extra: Any) -> dict[str, Any]:
    """What the figures were measured on: CPUs, GPU, Python, OS, load, key package versions."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    cpus_usable: int | None
    try:
        cpus_usable = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus_usable = os.cpu_count()
    info: dict[str, Any] = {
        "cpus": os.cpu_count(), "cpus_usable": cpus_usable, "gpu": _gpu(),
        "python": platform.python_version(), "platform": platform.platform(),
        "hostname": platform.node(), "loadavg_1_5_15": load,
        "ray": _version("ray"), "hive": _version("hive-cluster") or _version("hive"),
        "vm_free_page_reporting": _free_page_reporting(),
        "damon_pageout": _damon_pageout(),
    }
    info.update(extra)
    return info


def _damon_pageout() -> bool:
    """True when a running DAMON kdamond has a ``pageout`` scheme: the kernel evicts memory
    (page cache included) that went unaccessed for a while, and on a VM the freed pages may
    go back to the host - a checkpoint "in the page cache" can be cold again a minute later."""
    root = Path("/sys/kernel/mm/damon/admin/kdamonds")
    try:
        for kdamond in root.glob("[0-9]*"):
            if (kdamond / "state").read_text().strip() != "on":
                continue
            for action in kdamond.glob("contexts/*/schemes/*/action"):
                if action.read_text().strip() == "pageout":
                    return True
    except OSError:
        pass
    return False


def _free_page_reporting() -> bool | None:
    """True in a VM whose virtio balloon has free page reporting (feature bit 5).

    The guest then hands memory it freed back to the host after a few seconds; touching such
    pages again faults them in from the host (about 0.5 GB/s on the development VM instead of
    several GB/s), so a write into freshly allocated memory can be several times slower in one
    repetition than in the next. None where there is no virtio balloon.
    """
    for device in Path("/sys/bus/virtio/devices").glob("*"):
        try:
            if (device / "device").read_text().strip() == "0x0005":  # virtio balloon
                features = (device / "features").read_text().strip()
                return len(features) > 5 and features[5] == "1"
        except OSError:
            continue
    return None


def fs_type(path: str | os.PathLike[str]) -> str | None:
    """The filesystem type (ext4, tmpfs, overlay, ...) holding ``path``, from /proc/mounts."""
    target = os.path.realpath(path)
    best, kind = "", None
    try:
        with open("/proc/mounts") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 3 and (target == parts[1] or target.startswith(parts[1].rstrip("/") + "/")) \
                        and len(parts[1]) >= len(best):
                    best, kind = parts[1], parts[2]
    except OSError:
        return None
    return kind


def proc_memory(pid: int | None = None) -> dict[str, int | None]:
    """Resident memory of a local process from /proc/<pid>/status: ``rss_bytes`` (VmRSS) and
    ``peak_rss_bytes`` (VmHWM, the high-water mark since it started); None where unreadable."""
    out: dict[str, int | None] = {"rss_bytes": None, "peak_rss_bytes": None}
    keys = {"VmRSS:": "rss_bytes", "VmHWM:": "peak_rss_bytes"}
    try:
        with open(f"/proc/{pid or os.getpid()}/status") as fh:
            for line in fh:
                parts = line.split()
                if parts and parts[0] in keys and len(parts) >= 2:
                    out[keys[parts[0]]] = int(parts[1]) * 1024  # reported in kB
    except (OSError, ValueError):
        pass
    return out


# ---- statistics --------------------------------------------------------------------------

def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation (numpy's default); None if empty."""
    data = sorted(values)
    if not data:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    pos = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def median(values: Iterable[float]) -> float | None:
    """The median, or None if empty."""
    data = list(values)
    return statistics.median(data) if data else None


def summarize(values: Iterable[float], scale: float = 1.0, ndigits: int = 4) -> dict[str, Any]:
    """n, p50, p95, p99, max, mean of ``values`` times ``scale`` (e.g. 1000 for s -> ms)."""
    data = [v * scale for v in values]
    if not data:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None, "mean": None}

    def r(x: float | None) -> float | None:
        return None if x is None else round(x, ndigits)

    return {"n": len(data), "p50": r(percentile(data, 50)), "p95": r(percentile(data, 95)),
            "p99": r(percentile(data, 99)), "max": r(max(data)), "mean": r(statistics.fmean(data))}


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.s`` is the elapsed wall time (perf_counter)."""

    def __enter__(self) -> Self:
        self.t0 = time.perf_counter()
        self.s = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.s = time.perf_counter() - self.t0


# ---- goals -------------------------------------------------------------------------------

def dig(by: Mapping[str, Any], key: str, *path: str) -> Any:
    """``by[key][path[0]][path[1]]...``, or None where a level is missing (results lookups)."""
    cur: Any = by.get(key)
    for k in path:
        cur = cur.get(k) if isinstance(cur, dict) else None
    return cur


def goal(name: str, value: float | None, op: str, target: float) -> dict[str, Any]:
    """One entry of ``goals``: whether ``value op target`` holds (a missing value is not met)."""
    if op not in _OPS:
        raise ValueError(f"unknown goal op {op!r}; use one of {sorted(_OPS)}")
    met = value is not None and not (isinstance(value, float) and math.isnan(value)) and bool(_OPS[op](value, target))
    if isinstance(value, float):
        value = round(value, 4)
    return {"name": name, "value": value, "op": op, "target": target, "met": met}


# ---- output ------------------------------------------------------------------------------

def utc_stamp(when: _dt.datetime | None = None) -> str:
    """A file-name-safe UTC timestamp, e.g. ``20261121T072611Z``."""
    when = when or _dt.datetime.now(_dt.timezone.utc)
    return when.astimezone(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def write_json(benchmark: str, quick: bool, results: Sequence[Mapping[str, Any]],
               goals: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike[str] = DEFAULT_OUT,
               host: Mapping[str, Any] | None = None, **extra: Any) -> Path:
    """Write ``<out_dir>/<benchmark>-<UTC timestamp>.json`` and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"benchmark": benchmark, "quick": bool(quick),
                           "host": dict(host) if host is not None else host_info(),
                           "results": list(results), "goals": list(goals)}
    doc.update(extra)
    path = out / f"{benchmark}-{utc_stamp()}.json"
    n = 1
    while path.exists():  # two runs in the same second
        path = out / f"{benchmark}-{utc_stamp()}-{n}.json"
        n += 1
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return path


def fmt(value: Any) -> str:
    """A compact cell: floats to 4 significant digits, dicts/lists as short JSON."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e6:
            return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
        return f"{value:.3e}"
    if isinstance(value, (dict, list, tuple)):
        text = json.dumps(value, default=str)
        return text if len(text) <= 80 else text[:77] + "..."
    return str(value)


def _dist(s: Mapping[str, Any]) -> str:
    """One cell for a ``summarize`` dict: ``p50 · p95 · p99 · max (n)``."""
    parts = [f"{k} {fmt(s[k])}" for k in ("p50", "p95", "p99", "max") if k in s]
    return " · ".join(parts) + (f" (n={s['n']})" if "n" in s else "")


def _console() -> Any:
    from rich.console import Console

    return Console(width=max(100, shutil.get_terminal_size((120, 40)).columns))


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Print a rich table (plain text when rich is missing)."""
    try:
        from rich.table import Table
    except ImportError:
        print(f"\n{title}\n" + " | ".join(columns))
        for row in rows:
            print(" | ".join(re.sub(r"\[/?[a-z ]*\]", "", c) if isinstance(c, str) else fmt(c) for c in row))
        return
    table = Table(title=title, title_justify="left")
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i < 2 else "right")
    for row in rows:
        table.add_row(*(c if isinstance(c, str) else fmt(c) for c in row))
    _console().print(table)


def print_results(results: Sequence[Mapping[str, Any]], title: str = "Results",
                  skip: Sequence[str] = ("config", "section", "samples")) -> None:
    """One row per (section, metric); nested dicts (e.g. a ``summarize``) are flattened."""
    rows = []
    for res in results:
        section = str(res.get("section", "?"))
        for key, value in res.items():
            if key in skip:
                continue
            if isinstance(value, Mapping) and {"p50", "p95", "max"} <= set(value):  # a summarize()
                rows.append((section, key, _dist(value)))
            elif isinstance(value, Mapping) and all(not isinstance(v, (Mapping, list)) for v in value.values()):
                for sub, v in value.items():
                    rows.append((section, f"{key}.{sub}", v))
            else:
                rows.append((section, key, value))
        if "config" in res:
            rows.append((section, "config", res["config"]))
    print_table(title, ["section", "metric", "value"], rows)


def print_goals(goals: Sequence[Mapping[str, Any]], title: str = "Goals") -> int:
    """Print the goals table (MISSED in bold red); returns how many were missed."""
    rows = []
    for g in goals:
        verdict = "[bold green]met[/]" if g["met"] else "[bold red]MISSED[/]"
        rows.append((g["name"], fmt(g["value"]), f"{g['op']} {fmt(g['target'])}", verdict))
    print_table(title, ["goal", "value", "target", "verdict"], rows)
    missed = [g["name"] for g in goals if not g["met"]]
    if missed:
        print(f"MISSED {len(missed)} goal(s): {', '.join(missed)}")
    else:
        print(f"all {len(goals)} goal(s) met")
    return len(missed)


def base_parser(description: str) -> argparse.ArgumentParser:
    """An argparse parser with the flags every benchmark has: ``--quick`` and ``--out``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes, for CI and smoke runs")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="directory for the JSON results "
                        "(default: %(default)s)")
    return parser


if __name__ == "__main__":  # pragma: no cover - tiny self-check
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 99) == 5
    print(json.dumps(host_info(), indent=2), file=sys.stderr)
