"""MergeRecipe: validation, per-layer-group resolution, YAML/JSON round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from evolution import UnknownNameError
from evolution._recipe import LayerGroup, MergeRecipe, layer_index

TWO = [{"path": "/m/a"}, {"path": "/m/b"}]


def recipe(**fields) -> MergeRecipe:
    data = {"method": "ties", "base_model": "/m/base", "models": TWO, **fields}
    return MergeRecipe.model_validate(data)


def test_unknown_method_fails_listing_the_known_ones() -> None:
    with pytest.raises(UnknownNameError, match="known methods: breadcrumbs, dare_linear, .*ties"):
        MergeRecipe(method="tie", base_model="/m/base", models=TWO)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"base_model": None}, "needs `base_model`"),
        ({"models": [{"path": "/m/a", "weight": float("inf")}]}, "finite"),
        ({"models": [{"path": "/m/a", "density": 0.0}]}, "greater than 0"),
        ({"models": [{"path": "/m/a", "density": 1.5}]}, "less than or equal to 1"),
        ({"models": [{"path": "/m/a", "weight": 0.0}]}, "positive model weights"),
        ({"models": []}, "at least 1 models"),
        ({"parameters": {"lamda": 1.0}}, "unknown parameter 'lamda'.*known: lambda, normalize"),
        ({"parameters": {"normalize": 0.5}}, "must be true/false"),
        ({"parameters": {"lambda": True}}, "must be a number"),
        ({"parameters": {"lambda": float("nan")}}, "finite"),
        ({"models": [{"path": "/m/a", "colour": 1}]}, "Extra inputs are not permitted"),
        ({"dtype": "float64"}, "dtype"),
        ({"layer_groups": [{"name": "g"}]}, "needs `layers"),
        ({"layer_groups": [{"name": "g", "layers": [4, 2]}]}, "0 <= start < stop"),
        ({"layer_groups": [{"name": "g", "match": "("}]}, "bad regex"),
        ({"layer_groups": [{"name": "g", "match": "x", "models": [{}]}]}, "one entry per model"),
        ({"layer_groups": [{"name": "g", "match": "x"}, {"name": "g", "match": "y"}]}, "unique"),
        (
            {"layer_groups": [{"name": "g", "match": "x", "parameters": {"t": 0.5}}]},
            "layer group 'g' parameters: unknown parameter 't'",
        ),
    ],
)
def test_invalid_recipes_are_refused_naming_the_field(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        recipe(**fields)


def test_method_specific_rules() -> None:
    with pytest.raises(ValidationError, match="takes 2 models"):
        MergeRecipe(method="slerp", models=[{"path": "/m/a"}])
    with pytest.raises(ValidationError, match="needs `density` for every model; models\\[1\\]"):
        MergeRecipe(
            method="dare_ties",
            base_model="/b",
            models=[{"path": "/a", "density": 0.5}, {"path": "/c"}],
        )
    with pytest.raises(ValidationError, match="density \\+ gamma.*layer group 'g'"):
        MergeRecipe(
            method="breadcrumbs",
            base_model="/b",
            models=[{"path": "/a", "density": 0.5}],
            layer_groups=[{"name": "g", "match": ".", "models": [{"density": 1.0}]}],
        )


def test_recipe_is_frozen() -> None:
    r = recipe()
    with pytest.raises(ValidationError):
        r.method = "linear"  # type: ignore[misc]


def test_defaults_model_values_and_layer_group_overrides_resolve_per_tensor() -> None:
    r = MergeRecipe(
        method="ties",
        base_model="/m/base",
        models=[{"path": "/m/a", "weight": 2.0}, {"path": "/m/b", "density": 0.5}],
        parameters={"lambda": 0.9},
        layer_groups=[
            {
                "name": "early",
                "layers": [0, 2],
                "parameters": {"lambda": 0.1},
                "models": [{"density": 0.7}, {"weight": 3.0}],
            },
            {"name": "attn", "match": r"self_attn"},
        ],
        seed=5,
    )
    top = r.params_for("lm_head.weight")
    assert top.weights == (2.0, 1.0) and top.densities == (0.2, 0.5)  # ties' default density 0.2
    assert top.options == {"lambda": 0.9, "normalize": True} and top.seed == 5
    early = r.params_for("model.layers.1.self_attn.q_proj.weight")  # first match wins
    assert early.weights == (2.0, 3.0) and early.densities == (0.7, 0.5)
    assert early.options["lambda"] == 0.1
    attn = r.params_for("model.layers.2.self_attn.q_proj.weight")
    assert r.group_for("model.layers.2.self_attn.q_proj.weight").name == "attn"
    assert attn == top
    assert r.group_for("model.layers.2.mlp.up_proj.weight") is None


def test_layer_index_and_group_matching() -> None:
    assert layer_index("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_index("model.layers.11.mlp.down_proj.weight") == 11
    assert layer_index("model.embed_tokens.weight") is None
    group = LayerGroup(name="g", layers=(2, 4), match="mlp")
    assert group.matches("model.layers.3.mlp.up_proj.weight")
    assert not group.matches("model.layers.3.self_attn.q_proj.weight")
    assert not group.matches("model.layers.4.mlp.up_proj.weight")
    assert not group.matches("model.norm.weight")


def test_yaml_and_json_round_trip(tmp_path: Path) -> None:
    r = recipe(
        parameters={"lambda": 0.5, "normalize": False},
        layer_groups=[{"name": "g", "layers": [0, 1], "models": [{"weight": 2.0}, {}]}],
        dtype="bfloat16",
        seed=3,
    )
    assert MergeRecipe.from_yaml(r.to_yaml()) == r
    assert MergeRecipe.load(r.save(tmp_path / "r.yaml")) == r
    assert MergeRecipe.load(r.save(tmp_path / "r.json")) == r
    assert "normalize: false" in r.to_yaml()


def test_load_resolves_relative_paths_against_the_recipe_file(tmp_path: Path) -> None:
    (tmp_path / "recipes").mkdir()
    file = tmp_path / "recipes" / "r.yaml"
    file.write_text(
        "method: task_arithmetic\nbase_model: ../base\nmodels:\n  - path: a\n  - path: /abs/b\n"
    )
    r = MergeRecipe.load(file)
    assert r.base_model == str(tmp_path / "base")
    assert [m.path for m in r.models] == [str(tmp_path / "recipes" / "a"), "/abs/b"]
