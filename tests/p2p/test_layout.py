"""House rules the p2p package must keep: one trio/asyncio bridge, small layered modules."""

from __future__ import annotations

import ast
from pathlib import Path

import p2p

PKG = Path(p2p.__file__).parent


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_only_the_bridge_mixes_trio_and_asyncio() -> None:
    mixing = sorted(p.name for p in PKG.glob("*.py")
                    if {"trio", "asyncio"} <= imported_roots(p))
    assert mixing == ["_bridge.py"]


def test_public_node_module_does_not_touch_trio() -> None:
    assert "trio" not in imported_roots(PKG / "_node.py")


def test_modules_stay_small() -> None:
    sizes = {p.name: len(p.read_text().splitlines()) for p in PKG.glob("*.py")}
    assert max(sizes.values()) <= 350, sizes
