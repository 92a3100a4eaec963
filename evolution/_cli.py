"""``hive evolve``: evolutionary model merging from the command line (mounted into the hive CLI).

Only ``merge`` for now: ``hive evolve merge RECIPE.yaml --out DIR``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

__all__ = ["app"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Evolutionary model merging: merge checkpoints from a recipe.",
)
console = Console()
err = Console(stderr=True)


@app.callback()
def _group() -> None:
    """Evolutionary model merging: merge checkpoints from a recipe."""
    # A callback keeps `merge` a sub-command (typer collapses a one-command app otherwise).


def _fail(message: str) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", soft_wrap=True, markup=True, highlight=False)
    raise typer.Exit(1)


def _load_or_fail(load: Any, path: Path, what: str) -> Any:
    """``load(path)``, or exit with one clear line when the file is missing or invalid."""
    import yaml
    from pydantic import ValidationError

    from evolution._exceptions import EvolutionError

    if not path.is_file():
        _fail(f"{what} file {path} does not exist")
    try:
        return load(path)
    except ValidationError as exc:
        _fail(f"invalid {what} {path}:\n{exc}")
    except EvolutionError as exc:
        _fail(f"invalid {what} {path}: {exc}")
    except yaml.YAMLError as exc:
        _fail(f"cannot parse {what} {path}: {exc}")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


def _parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
             "GIB": 2**30}  # fmt: skip
    raw = text.strip().upper()
    number = raw.rstrip("KMGIB")
    try:
        return int(float(number) * units[raw[len(number) :]])
    except (ValueError, KeyError):
        _fail(f"--shard-size {text!r} is not a size; write e.g. 2GB, 500MB or 1GiB")


@app.command()
def merge(
    recipe: Path = typer.Argument(
        ..., help="recipe YAML/JSON (relative model paths resolve against its directory)"
    ),
    out: Path = typer.Option(..., "--out", "-o", help="directory to write the merged checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty --out"),
    shard_size: str = typer.Option("2GiB", "--shard-size", help="largest weight file, e.g. 2GB"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar"),
) -> None:
    """Merge the models of RECIPE into a new checkpoint, one tensor at a time."""

    from evolution._exceptions import EvolutionError
    from evolution._merge import merge as run_merge
    from evolution._recipe import MergeRecipe

    parsed = _load_or_fail(MergeRecipe.load, recipe, "recipe")
    try:
        result = run_merge(
            parsed,
            out,
            progress=progress,
            overwrite=overwrite,
            max_shard_bytes=_parse_size(shard_size),
            checksum="sha256",  # printed below: hash while writing, not by reading it all again
        )
    except EvolutionError as exc:
        _fail(str(exc))
    table = Table(title=f"merged ({parsed.method})", show_header=False)
    table.add_row("output", result.path)
    table.add_row("tensors", str(result.n_tensors))
    table.add_row("weight files", ", ".join(sorted(result.files)))
    table.add_row("read / written", f"{_size(result.bytes_read)} / {_size(result.bytes_written)}")
    table.add_row(
        "time",
        f"{result.seconds:.2f} s (read {result.read_seconds:.2f}, merge "
        f"{result.merge_seconds:.2f}, write {result.write_seconds:.2f})",
    )
    table.add_row("throughput", f"{_size(result.throughput)}/s (read + written)")
    table.add_row("sha256", result.sha256)
    console.print(table)
    console.print(f"sha256 {result.sha256}", soft_wrap=True, highlight=False)


# ---------------------------------------------------------------------------- evolution runs

_HOME_HELP = "hive home (default $HIVE_HOME or ./.hive)"


def _run_table(status: dict[str, object], title: str) -> Table:
    table = Table(title=title, show_header=False)
    for key in ("name", "run_id", "strategy", "generation", "generations", "candidates",
                "by_status", "champion", "rollbacks"):  # fmt: skip
        value = status.get(key)
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        table.add_row(key, str(value))
    return table


def _print_result(result: object) -> None:
    champ = getattr(result, "champion", None)
    if champ is not None:
        console.print(f"champion {champ.n} ({champ.candidate_id}) {champ.path}", highlight=False)
        console.print(f"sha256 {champ.sha256}", soft_wrap=True, highlight=False)


@app.command()
def start(
    config: Path = typer.Argument(..., help="run config YAML (see evolution._config)"),
    name: str = typer.Option(..., "--name", "-n", help="run name (store: HOME/evolution/NAME.db)"),
    home: Path | None = typer.Option(None, "--home", help=_HOME_HELP),
    generations: int | None = typer.Option(None, "--generations", help="run only this many now"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show progress bars"),
) -> None:
    """Start evolution run NAME from CONFIG (attaches to it if it exists with that config)."""

    import hive
    from evolution._config import EvolutionConfig
    from evolution._exceptions import EvolutionError
    from evolution._scheduler import EvolutionScheduler

    cfg = _load_or_fail(EvolutionConfig.load, config, "config")
    hive.init(home=home)
    try:
        sched = EvolutionScheduler.launch(cfg, name)
        result = sched.run_round(generations, progress=progress)
        console.print(_run_table(sched.status(), f"evolution run {name}"))
        _print_result(result)
    except EvolutionError as exc:
        _fail(str(exc))
    finally:
        hive.shutdown()


@app.command()
def status(
    name: str = typer.Argument(..., help="run name"),
    home: Path | None = typer.Option(None, "--home", help=_HOME_HELP),
) -> None:
    """Show run NAME's progress and champion (reads its store; no cluster needed)."""
    import hive
    from evolution._scheduler import store_path
    from evolution._store import RunStore

    path = store_path(hive.resolve_home(home), name)
    if not path.exists():
        _fail(f"no evolution run {name!r} at {path}; pass --home or start one with `start`")
    store = RunStore.open(path, readonly=True)
    try:
        rows = store.candidates("search")
        state = store.strategy_state() or {}
        champs = [c for c in store.champions() if c.status == "active"]
        import json

        cfg = json.loads(store.meta()["config"])
        info: dict[str, object] = {
            "name": name, "run_id": store.meta().get("run_id"), "strategy": cfg["strategy"],
            "generation": state.get("generation", 0), "generations": cfg["generations"],
            "candidates": len(rows),
            "by_status": {s: sum(r.status == s for r in rows) for s in ("pending", "ok", "failed", "rejected")},
            "champion": None if not champs else f"{champs[-1].n} ({champs[-1].candidate_id}) {champs[-1].path}",
            "rollbacks": len(store.rollbacks()),
        }  # fmt: skip
        console.print(_run_table(info, f"evolution run {name}"))
        if champs:
            console.print(f"sha256 {champs[-1].sha256}", soft_wrap=True, highlight=False)
    finally:
        store.close()


@app.command()
def resume(
    name: str = typer.Argument(..., help="run name"),
    home: Path | None = typer.Option(None, "--home", help=_HOME_HELP),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show progress bars"),
) -> None:
    """Continue run NAME where it stopped (after a crash or Ctrl-C)."""
    import hive
    from evolution._exceptions import EvolutionError
    from evolution._scheduler import EvolutionScheduler

    hive.init(home=home)
    try:
        sched = EvolutionScheduler.attach(name)
        result = sched.resume(progress=progress)
        console.print(_run_table(sched.status(), f"evolution run {name}"))
        _print_result(result)
    except EvolutionError as exc:
        _fail(str(exc))
    finally:
        hive.shutdown()


@app.command()
def rollback(
    name: str = typer.Argument(..., help="run name"),
    reason: str = typer.Option("manual rollback", "--reason", help="recorded with the event"),
    home: Path | None = typer.Option(None, "--home", help=_HOME_HELP),
) -> None:
    """Restore run NAME's previous good champion (sha256 verified; RollbackExecuted recorded)."""
    import hive
    from evolution._exceptions import EvolutionError
    from evolution._scheduler import EvolutionScheduler

    hive.init(home=home)
    try:
        restored = EvolutionScheduler.attach(name).rollback(reason)
        console.print(f"restored champion {restored.n} ({restored.candidate_id}) {restored.path}",
                      highlight=False)  # fmt: skip
        console.print(f"sha256 {restored.sha256}", soft_wrap=True, highlight=False)
    except EvolutionError as exc:
        _fail(str(exc))
    finally:
        hive.shutdown()
