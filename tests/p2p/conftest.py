"""Loopback peers for the p2p tests: identities, started node pairs, trio-level meshes.

Everything binds 127.0.0.1 port 0; every node is closed at teardown.

Fixtures
    ``make_node``   factory: ``make_node(identity, peers=...)`` -> a started :class:`p2p.Node`
    ``pair``        two started nodes (``a``, ``b``) on each other's allowlist, connected
Helpers
    ``trio_meshes(n)``  async context manager: ``n`` trio-level meshes, all allowing each other
    ``fd_count()``      open file descriptors of this process
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import pytest
import trio

from p2p import Node, NodeConfig, SiteIdentity, SitePeer, generate_identity
from p2p._allowlist import Allowlist
from p2p._mesh import Mesh


def fd_count() -> int:
    """Open file descriptors of this process (Linux)."""
    return len(os.listdir("/proc/self/fd"))


def peer_of(identity: SiteIdentity, addrs: tuple[str, ...] = ()) -> SitePeer:
    return SitePeer(peer_id=identity.peer_id, site=identity.site, addrs=addrs)


@pytest.fixture
def make_node() -> Iterator[Callable[..., Node]]:
    nodes: list[Node] = []

    def make(identity: SiteIdentity | None = None, peers: tuple[SitePeer, ...] = (),
             **settings: Any) -> Node:
        cfg = NodeConfig(identity=identity or generate_identity("site"), peers=peers,
                         **settings)
        node = Node(cfg).start()
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.close()


@dataclass
class Pair:
    a: Node
    b: Node


@pytest.fixture
def pair(make_node: Callable[..., Node]) -> Pair:
    ia, ib = generate_identity("site-a"), generate_identity("site-b")
    a = make_node(ia, peers=(peer_of(ib),))
    b = make_node(ib, peers=(peer_of(ia),))
    assert a.connect(b.addrs[0]) == ib.peer_id
    return Pair(a, b)


@asynccontextmanager
async def trio_meshes(n: int = 2, **settings: Any) -> AsyncIterator[list[Mesh]]:
    """``n`` meshes in the current trio loop, all on each other's allowlist, not connected."""
    idents = [generate_identity(f"site-{i}") for i in range(n)]
    meshes = []
    for ident in idents:
        cfg = NodeConfig(identity=ident, peers=tuple(peer_of(o) for o in idents
                                                     if o is not ident), **settings)
        meshes.append(Mesh(cfg, Allowlist(cfg.peers)))
    async with trio.open_nursery() as nursery:
        for mesh in meshes:
            await nursery.start(mesh.serve)
        try:
            yield meshes
        finally:
            for mesh in meshes:
                await mesh.close()
            nursery.cancel_scope.cancel()


def with_peers(cfg: NodeConfig, *peers: SitePeer) -> NodeConfig:
    return replace(cfg, peers=cfg.peers + peers)
