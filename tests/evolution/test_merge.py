"""Streaming merges of real tiny checkpoints: loadable output, equal to in-memory merges, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from evolution import ChecksumError, MergeError, NonFiniteError
from evolution._checksum import sha256_dir, verify
from evolution._merge import RECIPE_FILE, merge
from evolution._recipe import MergeRecipe
from tests.evolution.helpers import (
    TinySet,
    edit_checkpoint,
    load_weights,
    make_synthetic_checkpoint,
    reference_merge,
)
from tests.factories import make_tiny_model

METHODS = ["linear", "task_arithmetic", "slerp", "ties", "dare_linear", "dare_ties", "breadcrumbs"]


def make_recipe(tiny: TinySet, method: str, **fields) -> MergeRecipe:
    n = 2 if method == "slerp" else 3
    models = [
        {"path": str(p), "weight": w, "density": d, "gamma": 0.05}
        for p, w, d in zip(tiny.models[:n], (1.0, 0.6, 0.3), (0.5, 0.7, 0.4))
    ]
    params = {"t": 0.3} if method == "slerp" else {}
    data = {"method": method, "base_model": str(tiny.base), "models": models, "parameters": params,
            "seed": 11, **fields}  # fmt: skip
    return MergeRecipe.model_validate(data)


def load_model(path: Path | str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    return model


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


# ----------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("method", METHODS)
def test_streaming_merge_loads_and_equals_the_in_memory_merge(
    llamas: TinySet, out: Path, method: str
) -> None:
    recipe = make_recipe(llamas, method)
    result = merge(recipe, out, progress=False)
    assert_same_weights(load_weights(out), reference_merge(recipe))
    model = load_model(out)
    logits = model(torch.tensor([[1, 5, 9]])).logits
    assert torch.isfinite(logits).all()
    assert result.n_tensors == len(load_weights(llamas.base))
    assert result.sha256 == sha256_dir(out)
    assert MergeRecipe.load(out / RECIPE_FILE) == recipe
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= set(os.listdir(out))
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_task_arithmetic_and_ties_match_independent_whole_model_formulas(
    llamas: TinySet, tmp_path: Path
) -> None:
    base = load_weights(llamas.base)
    models = [load_weights(p) for p in llamas.models]
    ta = make_recipe(llamas, "task_arithmetic", parameters={"lambda": 0.7})
    merge(ta, tmp_path / "ta", progress=False)
    ties = make_recipe(
        llamas, "ties", models=[{"path": str(p), "density": 0.3} for p in llamas.models]
    )
    merge(ties, tmp_path / "ties", progress=False)
    got_ta, got_ties = load_weights(tmp_path / "ta"), load_weights(tmp_path / "ties")
    for name, b in base.items():
        taus = torch.stack([m[name] - b for m in models])  # (models, *shape)
        weights = torch.tensor([1.0, 0.6, 0.3]).reshape(-1, *[1] * b.dim())
        torch.testing.assert_close(got_ta[name], b + 0.7 * (weights * taus).sum(0))
        # TIES the way the paper's code does it, on the stacked flattened task vectors
        flat = taus.reshape(len(models), -1)
        k = max(1, round(0.3 * flat.shape[1]))
        kth = flat.abs().kthvalue(flat.shape[1] - k + 1, dim=1, keepdim=True).values
        trimmed = flat * (flat.abs() >= kth)
        sign = torch.sign(trimmed.sum(0))
        agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
        mean = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
        torch.testing.assert_close(got_ties[name], b + mean.reshape(b.shape))


def test_linear_of_identical_models_is_that_model(llamas: TinySet, out: Path) -> None:
    same = [{"path": str(llamas.models[0])}] * 2
    merge(MergeRecipe(method="linear", models=same), out, progress=False)
    assert_same_weights(load_weights(out), load_weights(llamas.models[0]))
    weighted = MergeRecipe(
        method="linear", models=[{"path": str(llamas.models[0]), "weight": w} for w in (0.3, 0.7)]
    )
    merge(weighted, out.with_name("weighted"), progress=False)
    for name, tensor in load_weights(llamas.models[0]).items():
        torch.testing.assert_close(load_weights(out.with_name("weighted"))[name], tensor)


def test_output_dtype_is_written_and_recorded_in_config(llamas: TinySet, out: Path) -> None:
    recipe = make_recipe(llamas, "task_arithmetic", dtype="bfloat16")
    merge(recipe, out, progress=False)
    got = load_weights(out)
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    assert_same_weights(got, reference_merge(recipe))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_model(out).dtype == torch.bfloat16


def test_large_outputs_are_sharded_with_an_index(llamas: TinySet, tmp_path: Path) -> None:
    recipe = make_recipe(llamas, "ties")
    whole = merge(recipe, tmp_path / "whole", progress=False)
    sharded = merge(recipe, tmp_path / "sharded", progress=False, max_shard_bytes=64 * 1024)
    files = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == whole.bytes_written
    assert_same_weights(load_weights(tmp_path / "sharded"), load_weights(tmp_path / "whole"))
    load_model(tmp_path / "sharded")
    assert sharded.sha256 == sha256_dir(tmp_path / "sharded") != whole.sha256
    assert set(sharded.files) == {*files, "model.safetensors.index.json"}


def test_dare_merges_are_reproducible_and_seeded(llamas: TinySet, tmp_path: Path) -> None:
    recipe = make_recipe(llamas, "dare_ties")
    first = merge(recipe, tmp_path / "a", progress=False)
    again = merge(recipe, tmp_path / "b", progress=False)
    other = merge(recipe.model_copy(update={"seed": 12}), tmp_path / "c", progress=False)
    assert first.sha256 == again.sha256 != other.sha256


def test_layer_groups_apply_to_their_tensors_only(llamas: TinySet, out: Path) -> None:
    recipe = make_recipe(
        llamas,
        "task_arithmetic",
        layer_groups=[{"name": "frozen", "layers": [0, 2], "parameters": {"lambda": 0.0}}],
    )
    merge(recipe, out, progress=False)
    got, base = load_weights(out), load_weights(llamas.base)
    for name in base:
        in_group = name.startswith(("model.layers.0.", "model.layers.1."))
        assert torch.equal(got[name], base[name]) == in_group, name


# ----------------------------------------------------------------------------- tied embeddings


def test_tied_base_stays_tied(gpt2s: TinySet, out: Path) -> None:
    merge(make_recipe(gpt2s, "ties"), out, progress=False)
    keys = set(load_weights(out))
    assert "lm_head.weight" not in keys and "transformer.wte.weight" in keys
    model = load_model(out)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_untied_base_takes_a_tied_models_embedding_as_its_head(
    llamas: TinySet, tmp_path: Path
) -> None:
    tied = make_tiny_model("llama", tmp_path / "tied", seed=5, tie_embeddings=True)
    recipe = MergeRecipe(
        method="linear",
        base_model=str(llamas.base),
        models=[{"path": str(llamas.base)}, {"path": str(tied)}],
    )
    merge(recipe, tmp_path / "out", progress=False)
    base, other = load_weights(llamas.base), load_weights(tied)
    want = (base["lm_head.weight"] + other["model.embed_tokens.weight"]) / 2
    torch.testing.assert_close(load_weights(tmp_path / "out")["lm_head.weight"], want)
    load_model(tmp_path / "out")


# ----------------------------------------------------------------------------- errors


def test_mismatched_architecture_names_both_models(
    llamas: TinySet, gpt2s: TinySet, out: Path
) -> None:
    recipe = MergeRecipe(
        method="linear", models=[{"path": str(llamas.base)}, {"path": str(gpt2s.base)}]
    )
    with pytest.raises(MergeError, match="architecture mismatch.*'gpt2'.*'llama'") as info:
        merge(recipe, out, progress=False)
    assert info.value.path == str(gpt2s.base)
    assert not out.exists()


def test_mismatched_shape_names_the_tensor(llamas: TinySet, tmp_path: Path) -> None:
    name = "model.layers.2.mlp.up_proj.weight"
    bad = edit_checkpoint(
        llamas.models[0], tmp_path / "bad", **{name.replace(".", "__"): torch.zeros(3, 3)}
    )
    recipe = MergeRecipe(method="linear", models=[{"path": str(llamas.base)}, {"path": str(bad)}])
    with pytest.raises(MergeError, match=f"tensor '{name}' has shape \\[3, 3\\]") as info:
        merge(recipe, tmp_path / "out", progress=False)
    assert info.value.tensor == name and not (tmp_path / "out").exists()


def test_missing_tensor_names_it_and_the_model(llamas: TinySet, tmp_path: Path) -> None:
    name = "model.layers.3.self_attn.o_proj.weight"
    bad = edit_checkpoint(llamas.models[1], tmp_path / "bad", **{name.replace(".", "__"): None})
    recipe = make_recipe(
        llamas, "ties", models=[{"path": str(llamas.models[0])}, {"path": str(bad)}]
    )
    with pytest.raises(MergeError, match=f"tensor '{name}' is missing from models\\[1\\]") as info:
        merge(recipe, tmp_path / "out", progress=False)
    assert info.value.tensor == name


def test_nan_in_a_merged_tensor_raises_non_finite_and_writes_nothing(
    llamas: TinySet, tmp_path: Path
) -> None:
    name = "model.layers.1.mlp.down_proj.weight"
    poisoned = load_weights(llamas.models[0])[name].clone()
    poisoned[0, 0] = float("nan")
    bad = edit_checkpoint(llamas.models[0], tmp_path / "bad", **{name.replace(".", "__"): poisoned})
    recipe = make_recipe(
        llamas, "task_arithmetic", models=[{"path": str(bad)}, {"path": str(llamas.models[1])}]
    )
    with pytest.raises(NonFiniteError, match="already hold NaN/inf") as info:
        merge(recipe, tmp_path / "out", progress=False)
    assert isinstance(info.value, MergeError) and info.value.tensor == name
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad"]  # the staging directory is gone


def test_float16_overflow_is_non_finite(llamas: TinySet, out: Path) -> None:
    recipe = make_recipe(llamas, "task_arithmetic", parameters={"lambda": 1e6}, dtype="float16")
    with pytest.raises(NonFiniteError, match="overflow float16"):
        merge(recipe, out, progress=False)


def test_missing_model_path_and_non_empty_output_are_refused(
    llamas: TinySet, tmp_path: Path
) -> None:
    recipe = MergeRecipe(method="linear", models=[{"path": str(tmp_path / "nope")}])
    with pytest.raises(MergeError, match="models\\[0\\] path .*nope does not exist"):
        merge(recipe, tmp_path / "out", progress=False)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    ok = MergeRecipe(method="linear", models=[{"path": str(llamas.base)}])
    with pytest.raises(MergeError, match="not empty.*overwrite"):
        merge(ok, taken, progress=False)
    merge(ok, taken, progress=False, overwrite=True)
    assert not (taken / "keep.txt").exists() and (taken / "model.safetensors").is_file()
    with pytest.raises(MergeError, match="is one of the inputs"):
        merge(ok, llamas.base, progress=False, overwrite=True)


def test_checksum_verifies_and_detects_a_changed_byte(llamas: TinySet, out: Path) -> None:
    result = merge(make_recipe(llamas, "linear"), out, progress=False, checksum="sha256")
    assert result.checksum == "sha256" and result.digest == result.sha256
    verify(out, result.sha256)
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="re-run the merge") as info:
        verify(out, result.sha256)
    assert info.value.expected == result.sha256 and info.value.actual == sha256_dir(out)


def test_integer_tensors_are_copied_from_the_template(tmp_path: Path) -> None:
    paths = [
        make_synthetic_checkpoint(tmp_path / f"m{i}", n_tensors=2, numel=1024, seed=i)
        for i in range(2)
    ]
    recipe = MergeRecipe(method="linear", models=[{"path": str(p)} for p in paths])
    merge(recipe, tmp_path / "out", progress=False)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as fh:
        assert torch.equal(fh.get_tensor("model.position_ids"), torch.arange(16))


def test_a_method_returning_its_input_is_written_intact(
    llamas: TinySet, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next tensor is read into the input buffers while the writer still holds this one."""
    import time

    from evolution import _merge
    from evolution.merge_methods import MergeMethod, register, registry

    class First(MergeMethod):
        name = "test_first"

        def merge_tensor(self, name, base, tensors, params):  # type: ignore[no-untyped-def]
            return tensors[0]  # a view of a reusable read buffer

    slow = _merge._MergeLoop._write

    def slow_write(self, writer, name, tensor, check):  # type: ignore[no-untyped-def]
        time.sleep(0.02)  # the next tensor's read lands first
        return slow(self, writer, name, tensor, check)

    monkeypatch.setattr(_merge._MergeLoop, "_write", slow_write)
    register(First)
    try:
        recipe = MergeRecipe(method="test_first", models=[{"path": str(p)} for p in llamas.models])
        merge(recipe, out, progress=False)
    finally:
        del registry._REGISTRY["test_first"]
    assert_same_weights(load_weights(out), load_weights(llamas.models[0]))


def bfloat16_set(root: Path) -> TinySet:
    from tests.evolution.helpers import make_tiny_set

    tiny = make_tiny_set(root, "llama", n_models=2)
    for path in (tiny.base, *tiny.models):  # re-save every checkpoint in bfloat16
        weights = {k: v.to(torch.bfloat16) for k, v in load_weights(path).items()}
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return tiny


def test_bfloat16_inputs_are_cast_piece_by_piece(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from evolution import _merge

    tiny = bfloat16_set(tmp_path / "bf16")
    monkeypatch.setattr(_merge, "_PIECE_ELEMENTS", 1000)  # many odd-sized pieces per tensor
    recipe = make_recipe(
        tiny, "ties", models=[{"path": str(p), "density": 0.4} for p in tiny.models]
    )
    result = merge(recipe, tmp_path / "out", progress=False)
    got = load_weights(tmp_path / "out")
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    assert_same_weights(got, reference_merge(recipe))
    assert result.bytes_read == sum(
        t.nbytes for p in (tiny.base, *tiny.models) for t in load_weights(p).values()
    )


@pytest.mark.parametrize("method", METHODS)
def test_every_method_merges_large_tensors_in_pieces_bit_for_bit(
    llamas: TinySet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """Pieces of 4096 + 8 elements: most tensors split unevenly, with statistics passes."""
    from evolution import _merge

    monkeypatch.setattr(_merge, "_PIECE_ELEMENTS", 4096 + 8)
    recipe = make_recipe(llamas, method, dtype="float16")
    result = merge(recipe, tmp_path / "out", progress=False)
    assert_same_weights(load_weights(tmp_path / "out"), reference_merge(recipe))
    whole = merge(recipe, tmp_path / "whole", progress=False, checksum="xxh3_128")
    assert result.digest == whole.digest  # monkeypatch is still active: same pieces
    load_model(tmp_path / "out")


def test_checksum_is_xxh3_by_default_and_sha256_on_request(llamas: TinySet, tmp_path: Path) -> None:
    recipe = make_recipe(llamas, "linear")
    fast = merge(recipe, tmp_path / "fast", progress=False)
    slow = merge(recipe, tmp_path / "slow", progress=False, checksum="sha256")
    assert fast.checksum == "xxh3_128" and len(fast.digest) == 32
    assert slow.checksum == "sha256" and slow.digest == sha256_dir(tmp_path / "slow")
    assert fast.sha256 == slow.digest  # computed from the files on demand
    with pytest.raises(ValueError, match="unknown checksum 'md5'"):
        merge(recipe, tmp_path / "bad", progress=False, checksum="md5")  # type: ignore[arg-type]
    assert not (tmp_path / "bad").exists()


def test_all_finite_checks_by_sum_and_confirms_an_overflowing_sum() -> None:
    from evolution._merge import all_finite

    assert all_finite(torch.ones(5)) and all_finite(torch.empty(0))
    assert not all_finite(torch.tensor([1.0, float("nan"), 2.0]))
    assert not all_finite(torch.tensor([float("-inf"), 2.0]))
    assert not all_finite(torch.tensor([float("inf"), float("-inf")]))  # sum NaN
    assert all_finite(torch.full((4,), 3e38))  # the sum overflows; every element is finite
    assert not all_finite(torch.tensor([65504.0, float("inf")], dtype=torch.float16))


def test_a_nan_in_a_middle_piece_rejects_the_merge_with_that_tensor(tmp_path: Path) -> None:
    """The writer thread checks each piece: a NaN in the 2nd of 3 pieces of the first tensor
    stops the merge with that tensor named, while later pieces were already being merged."""
    n = 3 << 20  # 3 pieces of 1 Mi elements
    good = {"a.weight": torch.ones(n), "b.weight": torch.ones(n)}
    bad = {k: v.clone() for k, v in good.items()}
    bad["a.weight"][(1 << 20) + 5] = float("nan")
    for name, tensors in (("good", good), ("bad", bad)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text('{"model_type": "llama"}')
        save_file(tensors, str(tmp_path / name / "model.safetensors"))
    recipe = MergeRecipe(method="linear", models=[{"path": str(tmp_path / "good")},
                                                  {"path": str(tmp_path / "bad")}])
    with pytest.raises(NonFiniteError, match="'a.weight' has 1 NaN/inf.*models\\[1\\]") as info:
        merge(recipe, tmp_path / "out", progress=False)
    assert info.value.tensor == "a.weight" and info.value.count == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "good"]  # nothing left behind
