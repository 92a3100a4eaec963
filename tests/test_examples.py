"""The notebooks in ``examples/`` run end to end, as a user would run them (a fresh kernel).

Each notebook runs in a Jupyter kernel started from *this* interpreter (the venv), in a
temporary working directory, with ``$RAY_ADDRESS`` and ``$HIVE_HOME`` cleared so it starts its
own embedded hive instead of joining the test session's Ray.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.factories import REPO_ROOT

nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[dev]' (needs nbformat)")
nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[dev]' (needs nbclient)")
pytest.importorskip("ipykernel", reason="pip install -e '.[dev]' (needs ipykernel)")

EXAMPLES = REPO_ROOT / "examples"
NOTEBOOK_TIMEOUT_S = 300  # per cell; the evolution notebook takes ~40 s in total on 2 CPU cores


def _kernel_manager() -> Any:
    """A ``python3`` kernel manager that runs ``sys.executable`` (never a system python).

    Only the venv's kernel directory is searched (a ``python3`` spec in ``~/.local/share``
    could point at another interpreter); when it has none, jupyter_client's native kernel
    (ipykernel of this interpreter) is used.
    """
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    ksm = KernelSpecManager()
    ksm.kernel_dirs = [str(Path(sys.prefix) / "share" / "jupyter" / "kernels")]
    spec = ksm.get_kernel_spec("python3")
    # jupyter_client replaces a bare "python" with sys.executable when it starts the kernel
    assert spec.argv[0] in {"python", "python3", sys.executable}, (
        f"the python3 kernel spec in {ksm.kernel_dirs} runs {spec.argv[0]}, not {sys.executable}; "
        "reinstall ipykernel into this environment (pip install 'ipykernel>=6,<8')"
    )
    return KernelManager(kernel_name="python3", kernel_spec_manager=ksm)


def _run(name: str, workdir: Path) -> Any:
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    client = nbclient.NotebookClient(
        nb, km=_kernel_manager(), kernel_name="python3", timeout=NOTEBOOK_TIMEOUT_S,
        resources={"metadata": {"path": str(workdir)}},
    )  # fmt: skip
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"{name} failed in a cell:\n{exc}")
    return nb


def _text(cell: Any) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", ""))
    return "".join(parts)


@pytest.mark.integration
def test_evolution_round_notebook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("HIVE_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    nb = _run("evolution_round.ipynb", tmp_path)

    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, [f"{o.ename}: {o.evalue}" for o in errors]
    assert all(c.get("execution_count") for c in code), "a code cell did not run"

    champion_cell = next(c for c in code if "sched.champion()" in c.source)
    out = _text(champion_cell)
    assert re.search(r"^sha256 [0-9a-f]{64}$", out, re.MULTILINE), out
    assert re.search(r"^champion \d+ \(", out, re.MULTILINE), out
    assert "notebook done" in _text(code[-1])
    assert not list(tmp_path.glob(".hive")), "the notebook must keep hive state in its own home"


def test_merge_demonstration_script_parses() -> None:
    """The script imports and parses its arguments (the run itself is the slow
    ``tests/evolution/test_demonstration.py``, which calls the same ``run_demonstration``)."""
    import subprocess

    out = subprocess.run([sys.executable, str(EXAMPLES / "merge_demonstration.py"), "--help"],
                         capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    assert "--seeds" in out.stdout and "--root" in out.stdout
