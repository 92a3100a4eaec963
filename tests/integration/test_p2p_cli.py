"""``hive p2p`` as a user runs it: the real executable, two sites on loopback, each its own
home, ``hive p2p up`` in the background and the other commands talking to it."""

from __future__ import annotations

import json
import os
import queue
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from tests.factories import free_port, wait_until

pytestmark = pytest.mark.integration

HIVE = str(Path(sys.executable).with_name("hive"))


def env_for(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "HIVE_HOME", "HIVE_P2P_PASSPHRASE")}
    env.update(HIVE_HOME=str(home), COLUMNS="200")
    return env


def p2p(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HIVE, "p2p", *args], env=env_for(home), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, check=False)


def explain(proc: subprocess.CompletedProcess[str]) -> str:
    return (f"`{' '.join(proc.args)}` exited {proc.returncode}\n--- stdout\n{proc.stdout}\n"
            f"--- stderr\n{proc.stderr}")


def failed_with(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode != 0, explain(proc)
    text = " ".join(proc.stderr.split())
    for needle in needles:
        assert needle in text, explain(proc)
    assert "Traceback" not in proc.stderr, explain(proc)


@dataclass
class Up:
    """A running `hive p2p up` and the lines it printed so far."""

    proc: subprocess.Popen[str]
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    seen: list[str] = field(default_factory=list)

    def wait_for(self, prefix: str, timeout: float = 60) -> str:
        for line in self.seen:
            if line.startswith(prefix) or prefix in line:
                return line
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"`hive p2p up` never printed {prefix!r}; got {self.seen}")
            self.seen.append(line)
            if line.startswith(prefix) or prefix in line:
                return line

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def start_up(home: Path, *args: str) -> Up:
    proc = subprocess.Popen([HIVE, "p2p", "up", *args], env=env_for(home), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    up = Up(proc)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            up.lines.put(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    return up


# --------------------------------------------------------------------------------------------
# no node needed
# --------------------------------------------------------------------------------------------


def test_init_prints_the_peer_id_and_refuses_to_overwrite(tmp_path: Path) -> None:
    first = p2p(tmp_path, "init", "--site", "eu-1", "--json")
    assert first.returncode == 0, explain(first)
    info = json.loads(first.stdout)
    assert info["peer_id"].startswith("12D3KooW") and info["site"] == "eu-1"
    key = tmp_path / "p2p" / "identity.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    before = key.read_bytes()
    again = p2p(tmp_path, "init", "--site", "eu-1")
    failed_with(again, "refusing to overwrite")
    assert key.read_bytes() == before
    failed_with(p2p(tmp_path / "other", "init", "--site", "bad name!"), "not valid")


def test_passphrase_from_the_environment(tmp_path: Path) -> None:
    env = {**env_for(tmp_path), "HIVE_P2P_PASSPHRASE": "s3cret"}
    proc = subprocess.run([HIVE, "p2p", "init", "--site", "vault", "--passphrase", "--json"],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0 and json.loads(proc.stdout)["encrypted"], explain(proc)
    assert b"ENCRYPTED" in (tmp_path / "p2p" / "identity.key").read_bytes()
    # without the passphrase the node cannot start, and says which variable to set
    failed_with(p2p(tmp_path, "up", "--listen", "/ip4/127.0.0.1/tcp/0"), "HIVE_P2P_PASSPHRASE")


def test_allow_validates_and_persists(tmp_path: Path) -> None:
    other = json.loads(p2p(tmp_path / "b", "init", "--site", "us-2", "--json").stdout)["peer_id"]
    failed_with(p2p(tmp_path, "allow", "not-a-peer", "--site", "us-2"), "not a libp2p peer id")
    failed_with(p2p(tmp_path, "allow", other, "--site", "us-2", "--addr", "/ip4/1.2.3/tcp/x"),
                "malformed multiaddr")
    ok = p2p(tmp_path, "allow", other, "--site", "us-2", "--addr",
             f"/ip4/10.0.0.2/tcp/4001/p2p/{other}")
    assert ok.returncode == 0, explain(ok)
    doc = json.loads((tmp_path / "p2p" / "allowlist.json").read_text())
    assert doc["peers"] == [{"peer_id": other, "site": "us-2", "addrs": ["/ip4/10.0.0.2/tcp/4001"]}]


def test_commands_without_identity_or_node_say_what_to_run(tmp_path: Path) -> None:
    failed_with(p2p(tmp_path, "up", "--listen", "/ip4/127.0.0.1/tcp/0"), "hive p2p init")
    failed_with(p2p(tmp_path, "peers"), "no p2p node is running", "hive p2p up")
    failed_with(p2p(tmp_path, "ping", "us-2"), "no p2p node is running")


# --------------------------------------------------------------------------------------------
# two sites: eu-1 and us-2, each `hive p2p up` in the background
# --------------------------------------------------------------------------------------------


@dataclass
class TwoSites:
    eu: Path
    us: Path
    eu_id: str
    us_id: str
    eu_up: Up
    us_up: Up


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoSites]:
    eu, us = tmp_path_factory.mktemp("eu-1"), tmp_path_factory.mktemp("us-2")
    eu_id = json.loads(p2p(eu, "init", "--site", "eu-1", "--json").stdout)["peer_id"]
    us_id = json.loads(p2p(us, "init", "--site", "us-2", "--json").stdout)["peer_id"]
    port = free_port()
    us_addr = f"/ip4/127.0.0.1/tcp/{port}"
    assert p2p(us, "allow", eu_id, "--site", "eu-1").returncode == 0
    assert p2p(eu, "allow", us_id, "--site", "us-2").returncode == 0  # address: --bootstrap
    us_up = start_up(us, "--listen", us_addr)
    eu_up: Up | None = None
    try:
        us_up.wait_for("PEER_ID")
        eu_up = start_up(eu, "--listen", "/ip4/127.0.0.1/tcp/0",
                         "--bootstrap", f"{us_addr}/p2p/{us_id}")
        eu_up.wait_for("PEER_ID")
        yield TwoSites(eu, us, eu_id, us_id, eu_up, us_up)
    finally:
        codes = [u.stop() for u in (eu_up, us_up) if u is not None]
        assert codes == [0] * len(codes), (codes, eu_up.seen if eu_up else None, us_up.seen)


def test_up_prints_peer_id_and_addresses(two_sites: TwoSites) -> None:
    assert two_sites.us_up.wait_for("PEER_ID") == f"PEER_ID {two_sites.us_id}"
    assert two_sites.eu_up.wait_for("LISTEN").endswith(f"/p2p/{two_sites.eu_id}")
    failed_with(p2p(two_sites.eu, "up", "--listen", "/ip4/127.0.0.1/tcp/0"), "already runs")


def test_peers_and_ping(two_sites: TwoSites) -> None:
    def connected() -> bool:
        proc = p2p(two_sites.eu, "peers", "--json")
        assert proc.returncode == 0, explain(proc)
        return [(r["site"], r["state"]) for r in json.loads(proc.stdout)] == [("us-2", "connected")]

    wait_until(connected, 30, interval_s=0.5, message="eu-1 never connected to us-2")
    table = p2p(two_sites.eu, "peers")
    assert "us-2" in table.stdout and "connected" in table.stdout, explain(table)
    ping = p2p(two_sites.eu, "ping", "us-2", "--count", "2")
    assert ping.returncode == 0 and ping.stdout.count("rtt") == 2, explain(ping)
    by_id = p2p(two_sites.us, "ping", two_sites.eu_id, "--count", "1", "--json")
    assert by_id.returncode == 0 and json.loads(by_id.stdout)[0]["site"] == "eu-1", explain(by_id)
    failed_with(p2p(two_sites.eu, "ping", "nowhere"), "unknown site 'nowhere'", "us-2")


def test_send_tensor_lands_in_the_other_site_inbox(two_sites: TwoSites, tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    w = np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32)
    src = tmp_path / "layer0.safetensors"
    save_file({"w": w}, str(src))
    proc = p2p(two_sites.eu, "send-tensor", "us-2", str(src))
    assert proc.returncode == 0, explain(proc)
    assert "sent layer0.safetensors to us-2" in " ".join(proc.stdout.split()), explain(proc)
    [stored] = (two_sites.us / "p2p" / "inbox").glob("layer0-*.safetensors")
    np.testing.assert_array_equal(load_file(str(stored))["w"], w)
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(b"not safetensors at all")
    failed_with(p2p(two_sites.eu, "send-tensor", "us-2", str(bad)), "not a safetensors file")


def test_hive_events_cross_to_the_other_site(two_sites: TwoSites) -> None:
    from hive._eventlog import EventLog
    from hive._events import RollbackExecuted

    with EventLog(two_sites.eu / "events.db") as log:
        seq = log.append(RollbackExecuted(target="champion", restored="v2", reason="cli test")).seq
    two_sites.us_up.wait_for("event from eu-1: rollback.executed", timeout=30)

    def recorded() -> list[dict[str, object]]:
        with EventLog(two_sites.us / "events.db", readonly=True) as log:
            return [e.data for e in log.query(types="ext.event")
                    if e.topic == "p2p.remote_event"]

    got = wait_until(recorded, 10)
    assert [(d["origin_site"], d["seq"], d["type"]) for d in got] == [
        ("eu-1", seq, "rollback.executed")]
