"""cluster.yaml passes Ray's own cluster-launcher validation and says what hive needs.

Validation is the offline part of what ``ray up`` does before it calls the cloud
(``ray.autoscaler._private.commands._bootstrap_config``): ``prepare_config`` (merge with the
provider's defaults.yaml, merge setup commands, check docker, fill per-type min/max workers)
then ``validate_config`` (Ray's ray-schema.json + its cross-field checks). Only the provider's
resource auto-detection and ``bootstrap_config`` (which need cloud credentials) are left out.
Deliberately broken copies must be rejected by the same function, so these tests can fail.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.factories import REPO_ROOT

CLUSTER_YAML = REPO_ROOT / "cluster.yaml"


def ray_validated(raw: dict[str, Any]) -> dict[str, Any]:
    """Run Ray's launcher preparation + validation on a config dict; return the prepared one.

    Raises whatever Ray raises for an invalid config (jsonschema.ValidationError, ValueError,
    AssertionError, KeyError).
    """
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    with CLUSTER_YAML.open() as f:
        return yaml.safe_load(f)  # how `ray up` reads it


@pytest.fixture(scope="module")
def prepared(raw: dict[str, Any]) -> dict[str, Any]:
    return ray_validated(raw)


def test_cluster_yaml_passes_rays_validation(prepared: dict[str, Any]) -> None:
    assert prepared["cluster_name"] == "hive"
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_gpu_workers_have_gpus_and_the_head_has_none(prepared: dict[str, Any]) -> None:
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["max_workers"] == 0  # filled in by prepare_config: the head is not autoscaled

    workers = {name: t for name, t in types.items() if name != prepared["head_node_type"]}
    gpu_workers = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_workers, f"no worker type declares resources.GPU >= 1: {workers}"
    for name, t in gpu_workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= prepared["max_workers"], name
        assert t["max_workers"] >= 1, name


def test_every_node_installs_this_project(raw: dict[str, Any], prepared: dict[str, Any]) -> None:
    mounts = prepared["file_mounts"]
    remote = next(r for r, local in mounts.items() if (REPO_ROOT / local).resolve() == REPO_ROOT)
    assert (REPO_ROOT / mounts[remote] / "pyproject.toml").is_file()
    install = f"pip install -e {remote}"
    # prepare_config merges the common setup_commands into the head's and the workers' lists.
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any(cmd.strip() == install for cmd in prepared[key]), (key, prepared[key])
    assert any(cmd.strip() == install for cmd in raw["setup_commands"])


def test_ray_start_commands_form_one_cluster(prepared: dict[str, Any]) -> None:
    head = " ".join(prepared["head_start_ray_commands"])
    worker = " ".join(prepared["worker_start_ray_commands"])
    port = re.search(r"ray start --head --port=(\d+)", head)
    assert port, head
    assert "--dashboard-host=0.0.0.0" in head  # Job Submission API reachable in the cluster
    assert f"--address=$RAY_HEAD_IP:{port.group(1)}" in worker
    assert prepared["head_start_ray_commands"][0] == "ray stop"
    assert prepared["worker_start_ray_commands"][0] == "ray stop"


def test_images_carry_the_installed_ray_version(prepared: dict[str, Any]) -> None:
    docker = prepared["docker"]
    images = [docker[k] for k in ("image", "head_image", "worker_image") if k in docker]
    assert images
    for image in images:
        assert image.startswith(f"rayproject/ray:{ray.__version__}-"), (image, ray.__version__)
    assert docker["worker_image"].endswith("-gpu")


def _misspelled_top_level_key(c: dict[str, Any]) -> None:
    c["setup_comands"] = c.pop("setup_commands")


def _gpu_count_not_an_integer(c: dict[str, Any]) -> None:
    worker = next(t for n, t in c["available_node_types"].items() if n != c["head_node_type"])
    worker["resources"]["GPU"] = "one"


def _unknown_head_node_type(c: dict[str, Any]) -> None:
    c["head_node_type"] = "no_such_type"


def _min_workers_above_global_max(c: dict[str, Any]) -> None:
    worker = next(t for n, t in c["available_node_types"].items() if n != c["head_node_type"])
    worker["min_workers"] = c["max_workers"] + 1


def _node_type_without_node_config(c: dict[str, Any]) -> None:
    worker = next(t for n, t in c["available_node_types"].items() if n != c["head_node_type"])
    del worker["node_config"]


@pytest.mark.parametrize(
    ("breakage", "error"),
    [
        (_misspelled_top_level_key, r"'setup_comands' was unexpected"),
        (_gpu_count_not_an_integer, r"'one' is not of type 'integer'"),
        (_unknown_head_node_type, r"head_node_type` must be one of `available_node_types"),
        (_min_workers_above_global_max, r"smaller than the sum of `min_workers`"),
        (_node_type_without_node_config, r"'node_config' is a required property"),
    ],
)
def test_broken_copies_are_rejected(raw: dict[str, Any], breakage: Any, error: str) -> None:
    broken = copy.deepcopy(raw)
    breakage(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=error):
        ray_validated(broken)
