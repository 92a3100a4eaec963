"""A p2p node in its own process, for kill -9 / restart / network-namespace tests.

Run as ``python -m tests.p2p.peer_proc --key-dir D --listen MULTIADDR --peer ID[=ADDR] ...``.
It prints ``READY <multiaddr/p2p/id>`` once listening, then serves until killed (or stdin
closes). RPC methods it serves:

``echo``        returns its params
``received``    the gossip messages it got on ``--topic``: ``[[origin, seqno, data], ...]``
``publish``     ``{"data": [str, ...]}`` -> publishes each on ``--topic``; returns the count
``members``     its membership view (``Member.model_dump()`` each)
``topic_peers`` the peers it knows are subscribed to ``--topic``
"""

from __future__ import annotations

import argparse
import sys
import threading

from pydantic import JsonValue

from p2p import GossipMessage, NodeConfig, SitePeer, load_identity, open_mesh


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--key-dir", required=True)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--peer", action="append", default=[], help="ID or ID=ADDR")
    parser.add_argument("--topic", default="t")
    args = parser.parse_args()
    peers = []
    for spec in args.peer:
        peer_id, _, addr = spec.partition("=")
        peers.append(SitePeer(peer_id=peer_id, addrs=(addr,) if addr else ()))
    got: list[list[JsonValue]] = []
    lock = threading.Lock()

    def on_message(msg: GossipMessage) -> None:
        with lock:
            got.append([msg.origin, msg.seqno, msg.data.decode()])

    node = open_mesh(NodeConfig(identity=load_identity(args.key_dir), listen=args.listen,
                                peers=tuple(peers)))

    def received(params: JsonValue, peer: str) -> JsonValue:
        with lock:
            return list(got)

    def publish(params: JsonValue, peer: str) -> JsonValue:
        assert isinstance(params, dict) and isinstance(params["data"], list)
        for item in params["data"]:
            node.publish(args.topic, str(item).encode())
        return len(params["data"])

    node.register("echo", lambda params, peer: params)
    node.register("received", received)
    node.register("publish", publish)
    node.register("members", lambda params, peer: [m.model_dump() for m in node.members()])
    node.register("topic_peers", lambda params, peer: node.topic_peers(args.topic))
    node.subscribe(args.topic, on_message)
    print("READY", node.addrs[0], flush=True)
    sys.stdin.read()  # until the parent closes our stdin (or kills us)
    node.close()


if __name__ == "__main__":
    main()
