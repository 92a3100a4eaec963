"""Smoke test: ``benchmarks/bench_p2p.py --quick`` runs every section and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_p2p.py"


def test_quick_run_writes_every_goal(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    [path] = tmp_path.glob("p2p-*.json")
    doc = json.loads(path.read_text())
    assert doc["benchmark"] == "p2p" and doc["quick"] is True
    sections = {r["section"]: r for r in doc["results"]}
    assert set(sections) == {"throughput", "connect", "gossip", "reconnect"}
    assert not [r for r in doc["results"] if "error" in r], doc["results"]
    assert sections["throughput"]["raw_tcp_mib_per_s"] > 0 < sections["throughput"]["ours_mib_per_s"]
    assert sections["connect"]["connect_ms"]["n"] == 20
    goals = {g["name"].replace("_8_", "_N_"): g for g in doc["goals"]}
    assert set(goals) == {"throughput_vs_raw_tcp", "connect_p50_ms", "gossip_all_N_p50_ms",
                          "gossip_all_N_p99_ms", "gossip_lost_messages", "reconnect_p95_s"}
    assert all(isinstance(g["met"], bool) and g["value"] is not None for g in goals.values())
    assert "Goals" in proc.stdout and "wrote " in proc.stdout
