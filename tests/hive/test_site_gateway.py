"""Two SiteGateway agents as real Ray actors in one hive cluster, over real Noise connections.

Both gateways share the cluster's EventLog (one Ray instance = one Coordinator), so they
republish disjoint event types: site-a sends ``rollback.executed``, site-b sends
``checkpoint.created`` and ``ext.event`` (to prove a received event is never sent on).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray

import hive
from hive._events import CheckpointCreated, RollbackExecuted
from hive._site_control import control_request
from hive._site_gateway import REMOTE_EVENT_TOPIC, TENSORS_TOPIC, add_allowed, init_site
from hive.testing import EchoAgent
from tests.factories import ensure_local_ray, wait_until

pytestmark = pytest.mark.integration

LOCAL = "/ip4/127.0.0.1/tcp/0"


@dataclass
class Sites:
    client: hive.Client
    home: Path
    dirs: dict[str, Path]  # site name -> site dir
    ids: dict[str, str]  # site name -> agent id
    peers: dict[str, str]  # site name -> peer id

    def handle(self, site: str) -> Any:
        return wait_until(lambda: self.client.agent_handle(self.ids[site]), 60,
                          message=f"gateway {site} has no live actor")

    def do(self, site: str, method: str, payload: Any = None, timeout: float = 60) -> Any:
        return ray.get(getattr(self.handle(site), method).remote(payload), timeout=timeout)

    def remote_events(self, origin: str) -> list[Any]:
        return [e for e in self.client.events(types="ext.event")
                if e.topic == REMOTE_EVENT_TOPIC and e.data["origin_site"] == origin]


def _meshed(sites: Sites, a: str, b: str) -> bool:
    return sites.peers[b] in sites.do(a, "p2p_info")["mesh"]


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sites]:
    ensure_local_ray()
    home = tmp_path_factory.mktemp("gw-home")
    client = hive.init(home=home, heartbeat_interval_s=0.2, heartbeat_timeout_s=3.0)
    try:
        dirs = {s: home / s for s in ("site-a", "site-b")}
        peers = {s: init_site(d, s).peer_id for s, d in dirs.items()}
        add_allowed(dirs["site-a"], peers["site-b"], "site-b")  # site-b dials site-a
        [a] = client.spawn(hive.SiteGateway, directory=str(dirs["site-a"]), listen=LOCAL,
                           republish=("rollback.executed",), accept_tasks=True, catchup_s=1.0)
        addr_a = ray.get(client.agent_handle(a).p2p_info.remote(), timeout=30)["addrs"][0]
        add_allowed(dirs["site-b"], peers["site-a"], "site-a", [addr_a])
        [b] = client.spawn(hive.SiteGateway, directory=str(dirs["site-b"]), listen=LOCAL,
                           republish=("checkpoint.created", "ext.event"), catchup_s=1.0)
        client.spawn(EchoAgent)
        out = Sites(client, home, dirs, {"site-a": a, "site-b": b}, peers)
        wait_until(lambda: _meshed(out, "site-a", "site-b") and _meshed(out, "site-b", "site-a"),
                   30, message="the two gateways never formed a gossip mesh")
        yield out
    finally:
        hive.shutdown(stop_cluster=True)


def test_membership_through_the_coordinator(sites: Sites) -> None:
    rows = sites.client.submit("p2p.sites").result(timeout=60)  # whichever gateway runs it
    assert len(rows) == 1 and rows[0]["state"] == "connected", rows
    assert rows[0]["site"] in ("site-a", "site-b") and rows[0]["peer_id"] in sites.peers.values()
    b_rows = sites.do("site-b", "sites")
    assert [(r["site"], r["peer_id"], r["connected"]) for r in b_rows] == [
        ("site-a", sites.peers["site-a"], True)]


def test_event_reaches_the_other_site_once_tagged_with_its_origin(sites: Sites) -> None:
    seq = sites.client.record_event(RollbackExecuted(target="model/champion", restored="v3",
                                                     reason="regression"))
    got = wait_until(lambda: [e for e in sites.remote_events("site-a") if e.data["seq"] == seq],
                     20, message="site-a's rollback never reached site-b")
    assert len(got) == 1
    ev = got[0]
    assert ev.agent_id == sites.ids["site-b"]  # recorded by the receiving gateway
    assert ev.data["origin_peer"] == sites.peers["site-a"]
    assert ev.data["type"] == "rollback.executed"
    assert ev.data["event"]["target"] == "model/champion"
    # catch-up pulls the same event again: it is not recorded twice
    assert sites.do("site-b", "sync") == 0
    assert len([e for e in sites.remote_events("site-a") if e.data["seq"] == seq]) == 1


def test_reverse_direction_and_no_echo(sites: Sites) -> None:
    # site-b republishes ext.event: the remote event it recorded above must not go back out
    seq = sites.client.record_event(CheckpointCreated(agent_id="x", path="/ckpt/1", sha256="0" * 64,
                                                      size_bytes=1))
    got = wait_until(lambda: [e for e in sites.remote_events("site-b") if e.data["seq"] == seq],
                     20, message="site-b's checkpoint event never reached site-a")
    assert got[0].agent_id == sites.ids["site-a"]
    b_cursor = sites.do("site-b", "p2p_info")["cursor"]
    assert b_cursor >= seq  # site-b has looked at every event up to here, its own records too
    echoed = [e for e in sites.remote_events("site-b") if e.data["type"] == "ext.event"]
    assert echoed == [], echoed
    assert not [e for e in sites.remote_events("site-a") if e.data["type"] == "ext.event"]


def test_tensors_rpc_and_remote_tasks(sites: Sites) -> None:
    w = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    stats = sites.do("site-b", "send_tensors", {"site": "site-a", "tensors": {"w": w},
                                                "name": "weights"})
    assert stats["bytes"] > w.nbytes and stats["site"] == "site-a"
    stored = Path(stats["result"]["path"])
    assert stored.parent == sites.dirs["site-a"] / "inbox"
    from safetensors.numpy import load_file

    np.testing.assert_array_equal(load_file(stored)["w"], w)
    recorded = wait_until(lambda: [e for e in sites.client.events(types="ext.event")
                                   if e.topic == TENSORS_TOPIC], 10)
    assert recorded[-1].data["from_site"] == "site-b"
    assert recorded[-1].data["tensors"] == [{"name": "w", "dtype": "F32", "shape": [64, 64]}]
    # RPC by site name and by peer id; a remote hive task (site-a accepts tasks)
    info = sites.do("site-b", "call_site", {"site": "site-a", "method": "hive.site"})
    assert info["peer_id"] == sites.peers["site-a"]
    by_id = sites.do("site-b", "call_site", {"site": sites.peers["site-a"], "method": "hive.task",
                                             "params": {"type": "echo", "payload": {"x": [1, 2]}}})
    assert by_id == {"x": [1, 2]}
    with pytest.raises(Exception, match=r"unknown site 'nowhere'.*site-a"):
        sites.do("site-b", "call_site", {"site": "nowhere", "method": "hive.site"})
    # the CLI path: the gateway also serves the control socket of its site dir
    peers = control_request(sites.dirs["site-b"], "peers")
    assert peers[0]["site"] == "site-a" and peers[0]["state"] == "connected"


def test_demo_step_two_sites(sites: Sites) -> None:
    from hive._demo import _two_sites

    detail = _two_sites(sites.client)  # asserts delivery both ways and no duplicate inside
    assert "reached demo-b" in detail and "0 duplicates" in detail and "tensor" in detail
    assert [e for e in sites.remote_events("demo-b")], "demo-b's event is in this EventLog"


def test_restart_keeps_identity_port_and_dedup(sites: Sites) -> None:
    before = sites.do("site-b", "p2p_info")
    seqs = [e.data["seq"] for e in sites.remote_events("site-a")]
    assert seqs, "run after the event test"
    pid = next(a["pid"] for a in sites.client.agents() if a["agent_id"] == sites.ids["site-b"])
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: any(a["agent_id"] == sites.ids["site-b"] and a["restarts"] >= 1
                           and a["state"] == "ready" for a in sites.client.agents()), 60,
               message="the killed gateway was not restarted")
    after = sites.do("site-b", "p2p_info")
    assert after["peer_id"] == before["peer_id"]  # the identity is on disk
    assert after["addrs"] == before["addrs"]  # and it took its old port back
    wait_until(lambda: _meshed(sites, "site-b", "site-a"), 30, message="no mesh after restart")
    assert sites.do("site-b", "sync") == 0  # the restarted gateway remembers what it recorded
    assert sorted(e.data["seq"] for e in sites.remote_events("site-a")) == sorted(seqs)
    seq = sites.client.record_event(RollbackExecuted(target="m", restored="v4", reason="after"))
    wait_until(lambda: [e for e in sites.remote_events("site-a") if e.data["seq"] == seq], 20,
               message="no delivery after the restart")
