"""A node inside a Ray async actor: the asyncio side of the bridge in its real habitat."""

from __future__ import annotations

from typing import Any

import pytest

from p2p import Node, NodeConfig, SitePeer, generate_identity

pytestmark = pytest.mark.integration


class SiteActor:
    """What a site gateway actor does: own a node, serve async handlers, call peers."""

    def __init__(self) -> None:
        self.identity = generate_identity("actor-site")
        self.node: Node | None = None

    async def start(self, driver_peer_id: str) -> dict[str, Any]:
        cfg = NodeConfig(identity=self.identity, peers=(SitePeer(peer_id=driver_peer_id),))
        self.node = await Node(cfg).astart()

        async def shout(params: Any, peer: str) -> Any:  # runs on the actor's event loop
            return {"shout": str(params).upper(), "from": peer}

        self.node.register("shout", shout)
        return {"peer_id": self.node.peer_id, "addrs": self.node.addrs}

    async def call_back(self, peer_id: str, method: str, params: Any) -> Any:
        assert self.node is not None
        return await self.node.acall(peer_id, method, params, timeout=10)

    async def stop(self) -> None:
        if self.node is not None:
            await self.node.aclose()


def test_node_in_a_ray_async_actor(ray_local: Any, make_node: Any) -> None:
    import ray

    driver_ident = generate_identity("driver")
    actor = ray.remote(num_cpus=0)(SiteActor).remote()
    try:
        info = ray.get(actor.start.remote(driver_ident.peer_id), timeout=60)
        driver = make_node(driver_ident, peers=(SitePeer(peer_id=info["peer_id"]),))
        driver.register("add", lambda params, peer: params["a"] + params["b"])
        assert driver.connect(info["addrs"][0]) == info["peer_id"]
        assert driver.call(info["peer_id"], "shout", "hi") == {"shout": "HI",
                                                               "from": driver.peer_id}
        assert ray.get(actor.call_back.remote(driver.peer_id, "add", {"a": 2, "b": 3}),
                       timeout=30) == 5
    finally:
        ray.get(actor.stop.remote(), timeout=30)
        ray.kill(actor)
