"""``hive evolve merge`` through typer's CliRunner."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from evolution._checksum import sha256_dir
from evolution._cli import app
from tests.evolution.helpers import TinySet, edit_checkpoint

runner = CliRunner()


def write_recipe(path: Path, tiny: TinySet, method: str = "ties", base: Path | None = None) -> Path:
    base = base or tiny.base
    models = "\n".join(f"  - {{path: {p}, density: 0.5}}" for p in tiny.models[:2])
    path.write_text(f"method: {method}\nbase_model: {base}\nmodels:\n{models}\n")
    return path


def test_merge_writes_the_checkpoint_and_prints_its_sha256(llamas: TinySet, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", llamas)
    result = runner.invoke(
        app, ["merge", str(recipe), "--out", str(tmp_path / "out"), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    digest = sha256_dir(tmp_path / "out")
    assert f"sha256 {digest}" in result.output
    assert "throughput" in result.output and "time" in result.output


def test_merge_shards_on_request(llamas: TinySet, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", llamas)
    args = [
        "merge",
        str(recipe),
        "-o",
        str(tmp_path / "out"),
        "--shard-size",
        "100KB",
        "--no-progress",
    ]
    assert runner.invoke(app, args).exit_code == 0
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()


def test_unknown_method_is_a_clear_error(llamas: TinySet, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", llamas, method="frankenmerge")
    result = runner.invoke(app, ["merge", str(recipe), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert (
        "unknown merge method 'frankenmerge'" in result.output
        and "task_arithmetic" in result.output
    )
    assert "Traceback" not in result.output


def test_invalid_recipe_and_missing_file_are_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: ties\nmodels: [{path: /x, density: 2}]\n")
    result = runner.invoke(app, ["merge", str(bad), "--out", str(tmp_path / "out")])
    assert (
        result.exit_code == 1 and "invalid recipe" in result.output and "density" in result.output
    )
    result = runner.invoke(
        app, ["merge", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 1 and "does not exist" in result.output


def test_merge_error_names_the_tensor(llamas: TinySet, tmp_path: Path) -> None:
    name = "model.layers.0.mlp.gate_proj.weight"
    bad = edit_checkpoint(llamas.models[0], tmp_path / "bad", **{name.replace(".", "__"): None})
    recipe = write_recipe(tmp_path / "r.yaml", TinySet(llamas.base, (bad, llamas.models[1])))
    result = runner.invoke(app, ["merge", str(recipe), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert f"tensor '{name}' is missing from models[0]" in " ".join(result.output.split())
