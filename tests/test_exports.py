"""Each package's __all__ is sorted, complete and importable (house style rule 1)."""

from __future__ import annotations

import importlib
import pickle

import pytest

PACKAGES = ["hive", "inference", "evolution", "p2p"]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_matches_public_names(name: str) -> None:
    mod = importlib.import_module(name)
    exported = list(mod.__all__)
    assert exported == sorted(exported), f"{name}.__all__ is not sorted"
    assert len(set(exported)) == len(exported)
    for attr in exported:
        assert hasattr(mod, attr), f"{name}.__all__ names {attr!r} but the package has no such attribute"
    public = {a for a in vars(mod) if not a.startswith("_") and not isinstance(getattr(mod, a), type(mod))}
    public -= {"annotations", "Any"}
    assert public <= set(exported), f"{name} exposes names missing from __all__: {sorted(public - set(exported))}"


@pytest.mark.parametrize("name", PACKAGES)
def test_py_typed_shipped(name: str) -> None:
    from pathlib import Path

    mod = importlib.import_module(name)
    assert (Path(mod.__file__).parent / "py.typed").exists()


@pytest.mark.parametrize("name,base", [("hive", "HiveError"), ("inference", "InferenceError"),
                                       ("evolution", "EvolutionError"), ("p2p", "P2PError")])
def test_errors_pickle_with_context(name: str, base: str) -> None:
    mod = importlib.import_module(name)
    errors = [getattr(mod, a) for a in mod.__all__
              if isinstance(getattr(mod, a), type) and issubclass(getattr(mod, a), getattr(mod, base))]
    assert errors
    for cls in errors:
        err = cls.__new__(cls)
        getattr(mod, base).__init__(err, "what failed and how to fix it", agent_id="a1", path="/x")
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is cls and str(back).startswith("what failed") and back.agent_id == "a1"


def test_p2p_imports_nothing_of_ours() -> None:
    import ast
    from pathlib import Path

    import p2p

    for path in Path(p2p.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for n in names:
                assert n.split(".")[0] not in {"hive", "inference", "evolution"}, f"{path} imports {n}"
