"""Genome <-> recipe layout and the run config (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from evolution import UnknownNameError
from evolution._config import EvolutionConfig
from evolution._genome import GenomeLayout
from tests.evolution.helpers import TinySet

TASKS = [{"task": "perplexity", "domain": "wiki", "texts": ["hello there"]}]


def test_layout_round_trips_with_layer_groups(llamas: TinySet) -> None:
    layout = GenomeLayout(method="ties", base_model=str(llamas.base),
                          models=[str(p) for p in llamas.models[:2]],
                          params=("weight", "density"), per_layer_groups=2, n_layers=4)  # fmt: skip
    assert layout.dims == 3 * 2 * 2
    assert layout.names[:2] == ("all.m0.weight", "all.m0.density")
    assert layout.names[-1] == "layers_2_4.m1.density"
    genome = tuple(0.15 + 0.05 * i for i in range(layout.dims))
    recipe = layout.to_recipe(genome)
    assert [g.layers for g in recipe.layer_groups] == [(0, 2), (2, 4)]
    assert recipe.params_for("model.layers.3.mlp.up_proj.weight").weights == pytest.approx(
        genome[8::2][:2]
    )
    assert recipe.params_for("lm_head.weight").densities == pytest.approx((genome[1], genome[3]))
    assert layout.from_recipe(recipe) == pytest.approx(genome)
    space = layout.space()
    assert space.dims == layout.dims and space.names == layout.names
    assert space.low[1] == 0.1 and space.high[0] == 1.0


def test_layout_refuses_params_the_method_does_not_read() -> None:
    with pytest.raises(ValidationError, match="searchable params for it: weight"):
        GenomeLayout(method="linear", models=["a"], params=("density",))
    with pytest.raises(ValidationError, match="density bounds"):
        GenomeLayout(method="ties", base_model="b", models=["a"], params=("density",),
                     bounds={"density": (0.0, 1.0)})  # fmt: skip


def test_config_names_unknown_strategy_method_and_task(llamas: TinySet) -> None:
    good: dict = {"base_model": str(llamas.base), "models": [str(llamas.models[0])], "tasks": TASKS}
    with pytest.raises(UnknownNameError, match="known: cma-es, ga, random"):
        EvolutionConfig(**good, strategy="pso")
    with pytest.raises(UnknownNameError, match="known methods: breadcrumbs.*ties"):
        EvolutionConfig(**good, method="avg")
    with pytest.raises(UnknownNameError, match="known tasks: callable, exact_match, perplexity"):
        EvolutionConfig(**{**good, "tasks": [{"task": "bleu", "domain": "x"}]})
    with pytest.raises(UnknownNameError, match="unknown setting 'sigma'"):
        EvolutionConfig(**good, strategy_settings={"sigma": 0.1})
    with pytest.raises(ValidationError, match="unknown domain"):
        EvolutionConfig(**good, tolerances={"math": 0.1})


def test_config_file_resolves_paths_and_maps_population(llamas: TinySet, tmp_path: Path) -> None:
    base = llamas.base
    (tmp_path / "run.yaml").write_text(
        f"base_model: {base}\nmodels: [{llamas.models[0]}, {llamas.models[1]}]\n"
        "method: ties\ngenes: [weight, density]\nlayer_groups: 2\nstrategy: ga\npopulation: 6\n"
        "tasks:\n  - {task: perplexity, domain: wiki, texts: [hello]}\n"
    )
    cfg = EvolutionConfig.load(tmp_path / "run.yaml")
    assert cfg.layout().dims == 12  # 2 layer groups + "all", 2 models, 2 genes; 4 layers read
    assert cfg.strategy_kwargs()["population_size"] == 6
    assert EvolutionConfig.from_json(cfg.to_json()) == cfg
