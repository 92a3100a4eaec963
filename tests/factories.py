"""Shared test factories: tiny HF checkpoints, local/simulated Ray clusters, polling helpers.

Everything here is importable from any test (``from tests.factories import make_tiny_model``);
the pytest fixtures wrapping it live in ``tests/conftest.py``.

Tiny models
    ``make_tiny_model(arch, path)`` writes a real Hugging Face checkpoint (``config.json`` +
    ``model.safetensors`` + an ASCII character tokenizer) built from ``TINY_CONFIGS`` with a fixed
    seed, so two builds with the same arguments are bit-identical. Nothing is downloaded.

Ray
    ``ensure_local_ray()`` starts (or reuses) one local Ray instance for the test session;
    ``SimCluster`` is a multi-node cluster on one machine (``ray.cluster_utils.Cluster``) whose
    worker nodes carry ``sim_gpu`` resources standing in for GPUs. Only one of the two is connected
    at a time; each shuts the other down first (see ``RAY_STATE``).

Example:
    >>> path = make_tiny_model("llama", tmp_path / "llama", seed=1)      # doctest: +SKIP
    >>> AutoModelForCausalLM.from_pretrained(path)                      # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

__all__ = [
    "RAY_STATE",
    "REPO_ROOT",
    "SIM_CLUSTER_HEAD",
    "SIM_GPU",
    "TINY_CONFIGS",
    "TINY_VOCAB_SIZE",
    "SimCluster",
    "WorkerSpec",
    "ensure_local_ray",
    "file_sha256",
    "free_port",
    "make_tiny_model",
    "make_tiny_tokenizer",
    "shutdown_ray",
    "tiny_config",
    "wait_until",
]

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent  # /…/hive checkout; put on workers' PYTHONPATH

# --------------------------------------------------------------------------------------------
# Polling and ports
# --------------------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0, read it back, close).

    Another process may take it before you bind it; use it right away.

    Example:
        >>> 0 < free_port() < 65536
        True
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], T],
    timeout_s: float,
    interval_s: float = 0.05,
    message: str | Callable[[], str] = "condition not met",
) -> T:
    """Poll ``predicate()`` until it returns something truthy, and return that value.

    Exceptions raised by the predicate propagate (a broken predicate should fail loudly, not
    be retried until the timeout).

    Args:
        predicate: called with no arguments every ``interval_s`` seconds.
        timeout_s: give up after this many seconds.
        interval_s: sleep between polls.
        message: what was being waited for (or a callable producing it, evaluated on timeout so
            it can show the last observed state).

    Returns:
        The first truthy value ``predicate`` returned.

    Raises:
        AssertionError: the timeout passed; the error names ``message``, the timeout and the last
            value seen.

    Example:
        >>> wait_until(lambda: 3, timeout_s=1)
        3
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(
                f"timed out after {timeout_s:g}s waiting for: {text} (last value: {value!r})"
            )
        time.sleep(interval_s)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes (to check that two checkpoints are bit-identical)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# Tiny Hugging Face checkpoints
# --------------------------------------------------------------------------------------------

TINY_VOCAB_SIZE = 128  # ids 0..3 are specials, 4..127 are the ASCII characters chr(4)..chr(127)
_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0, 1, 2, 3
_TOKEN_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}

# Keyword arguments of each architecture's transformers config class. "n_layers" and
# "tie_embeddings" from make_tiny_model() override the layer count and the tying.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2": {
        "model_type": "gpt2",
        "n_layer": 4,
        "n_embd": 64,
        "n_head": 4,
        "n_positions": 128,
        "vocab_size": TINY_VOCAB_SIZE,
        "tie_word_embeddings": True,  # GPT-2 always ties wte and lm_head
        **_TOKEN_IDS,
    },
    "llama": {
        "model_type": "llama",
        "num_hidden_layers": 4,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,  # grouped-query attention: 2 query heads per kv head
        "intermediate_size": 128,
        "max_position_embeddings": 128,
        "vocab_size": TINY_VOCAB_SIZE,
        "tie_word_embeddings": False,
        **_TOKEN_IDS,
    },
}
_LAYER_KEY = {"gpt2": "n_layer", "llama": "num_hidden_layers"}


def tiny_config(arch: str, *, n_layers: int = 4, tie_embeddings: bool | None = None) -> Any:
    """The transformers config for a tiny ``arch`` model (see ``TINY_CONFIGS``).

    Args:
        arch: a key of ``TINY_CONFIGS`` ("gpt2" or "llama").
        n_layers: number of transformer blocks.
        tie_embeddings: tie lm_head to the input embedding; None keeps the arch default.

    Returns:
        A ``transformers.PretrainedConfig``.

    Raises:
        ValueError: unknown ``arch`` (the message lists the known ones).
    """
    from transformers import AutoConfig

    if arch not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny arch {arch!r}; known: {sorted(TINY_CONFIGS)}")
    kwargs = dict(TINY_CONFIGS[arch])
    model_type = kwargs.pop("model_type")
    kwargs[_LAYER_KEY[arch]] = n_layers
    if tie_embeddings is not None:
        kwargs["tie_word_embeddings"] = tie_embeddings
    return AutoConfig.for_model(model_type, **kwargs)


def make_tiny_tokenizer(path: str | os.PathLike[str]) -> Path:
    """Write a character-level ASCII tokenizer (``tokenizer.json``) that matches the tiny vocab.

    One token per character: ``"Hi"`` -> ``[72, 105]``; ids 0-3 are ``<unk> <s> </s> <pad>``;
    characters outside chr(4)..chr(127) map to ``<unk>``. Loads with ``AutoTokenizer``.

    Returns:
        ``path`` as a Path.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIAL_TOKENS)}
    vocab.update({chr(i): i for i in range(len(_SPECIAL_TOKENS), TINY_VOCAB_SIZE)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()  # join characters back without spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    out = Path(path)
    tokenizer.save_pretrained(out)
    return out


def make_tiny_model(
    arch: str,
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    n_layers: int = 4,
    tie_embeddings: bool | None = None,
    dtype: torch.dtype = torch.float32,
    with_tokenizer: bool = True,
) -> Path:
    """Build a randomly initialised tiny causal LM and save it as a real HF checkpoint.

    The weights depend only on ``(arch, seed, n_layers, tie_embeddings, dtype)``: the global torch
    RNG is seeded right before construction (and restored afterwards), so two builds with the same
    arguments write bit-identical ``model.safetensors`` files.

    Args:
        arch: "gpt2" or "llama" (keys of ``TINY_CONFIGS``).
        path: directory to write (created if missing).
        seed: torch seed for the initial weights.
        n_layers: number of transformer blocks.
        tie_embeddings: tie lm_head to the input embedding; None keeps the arch default
            (gpt2 tied, llama untied).
        dtype: parameter dtype stored in the checkpoint.
        with_tokenizer: also write the ASCII tokenizer (``make_tiny_tokenizer``).

    Returns:
        ``path`` as a Path; it holds ``config.json`` and ``model.safetensors``.

    Raises:
        ValueError: unknown ``arch``.

    Example:
        >>> p = make_tiny_model("llama", "/tmp/tiny-llama", tie_embeddings=True)  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, n_layers=n_layers, tie_embeddings=tie_embeddings)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model = model.to(dtype).eval()
    model.save_pretrained(out, safe_serialization=True)
    if with_tokenizer:
        make_tiny_tokenizer(out)
    return out


# --------------------------------------------------------------------------------------------
# Ray: one local instance, or one simulated multi-node cluster, connected at a time
# --------------------------------------------------------------------------------------------

SIM_GPU = "sim_gpu"  # custom resource standing in for "GPU" on simulated worker nodes
SIM_CLUSTER_HEAD = "head"  # custom resource only the simulated head node carries
_LOCAL_OBJECT_STORE_BYTES = 512 * 1024**2  # keep /dev/shm use small on shared test machines
_SIM_NODE_OBJECT_STORE_BYTES = 128 * 1024**2  # per simulated node
# The GCS declares a silent (SIGKILLed) simulated node dead after ~1.5 s instead of Ray's ~15 s
# default, so node-loss tests stay fast. Graceful removal is reported at once either way.
_SIM_CLUSTER_SYSTEM_CONFIG = {
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 3,
}


def _worker_env() -> dict[str, str]:
    """Environment every Ray worker of the tests gets (runtime_env ``env_vars``)."""
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    return {
        "PYTHONPATH": pythonpath,  # workers import tests.*, hive, inference… from this checkout
        "TOKENIZERS_PARALLELISM": "false",  # no tokenizer thread pools inside 2-core workers
    }


@dataclass
class _RayState:
    """Which Ray the driver is connected to; the one module-level instance is ``RAY_STATE``."""

    kind: str | None = None  # None (nothing of ours), "local" or "cluster"
    gcs_address: str | None = None  # address of the instance we started, to detect a foreign one
    context: Any = None  # the RayContext ray.init returned for the local instance
    owner: str | None = None  # who is connected ("ray_cluster: tests/x.py"), for error messages


RAY_STATE = _RayState()


def _current_gcs_address() -> str | None:
    import ray

    if not ray.is_initialized():
        return None
    return str(ray.get_runtime_context().gcs_address)


def shutdown_ray() -> None:
    """Disconnect the driver from whatever Ray it is connected to and forget our state.

    Stops the local instance if we started it; a ``SimCluster`` must still be shut down by its
    owner (``SimCluster.shutdown``).
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    RAY_STATE.kind = None
    RAY_STATE.gcs_address = None
    RAY_STATE.context = None
    RAY_STATE.owner = None


def ensure_local_ray(num_cpus: int = 4) -> Any:
    """Connect the driver to the test session's local Ray instance, starting it if needed.

    Reuses the running instance when it is the one this function started; otherwise (nothing
    running, a foreign ``ray.init`` by some test, or a previous cluster) shuts down what is there
    and starts a fresh one with ``ray.init(address="local", namespace="hive", ...)``.

    Returns:
        The ``ray`` RayContext of the local instance (``.address_info`` has ``gcs_address``…).

    Raises:
        RuntimeError: a ``SimCluster`` is connected right now (one module mixes ``ray_local``
            and ``ray_cluster``; use one of them per module).
    """
    import ray

    if RAY_STATE.kind == "cluster" and ray.is_initialized():
        raise RuntimeError(
            f"ray_local requested while a simulated cluster is connected ({RAY_STATE.owner}); "
            "use either the ray_local or the ray_cluster fixture in one test module, not both"
        )
    if (
        RAY_STATE.kind == "local"
        and RAY_STATE.gcs_address is not None
        and _current_gcs_address() == RAY_STATE.gcs_address
    ):
        return RAY_STATE.context
    shutdown_ray()
    context = ray.init(
        address="local",  # never attach to a cluster found via RAY_ADDRESS or /tmp/ray
        num_cpus=num_cpus,
        namespace="hive",
        include_dashboard=False,
        log_to_driver=True,
        object_store_memory=_LOCAL_OBJECT_STORE_BYTES,
        runtime_env={"env_vars": _worker_env()},
    )
    RAY_STATE.kind = "local"
    RAY_STATE.gcs_address = _current_gcs_address()
    RAY_STATE.context = context
    RAY_STATE.owner = "ray_local"
    return context


@dataclass(frozen=True)
class WorkerSpec:
    """Shape of one simulated worker node."""

    name: str  # e.g. "w1"; the node also gets a custom resource f"node_{name}" = 1
    num_cpus: int = 2  # logical CPUs the raylet advertises
    sim_gpus: int = 2  # units of the SIM_GPU resource (stand-in for GPUs)
    resources: dict[str, float] = field(default_factory=dict)  # extra custom resources

    @property
    def node_resource(self) -> str:
        """The custom resource that pins work to this node: ``{"node_w1": 1}``."""
        return f"node_{self.name}"

    def all_resources(self) -> dict[str, float]:
        """Custom resources the raylet advertises (everything except CPU)."""
        return {SIM_GPU: float(self.sim_gpus), self.node_resource: 1.0, **self.resources}


class SimCluster:
    """A multi-node Ray cluster simulated on one machine, with the driver connected to it.

    Head: ``num_cpus=head_cpus``, resource ``{"head": 1}``. Workers: per ``WorkerSpec`` —
    by default ``w1`` and ``w2`` with 2 CPUs, ``{"sim_gpu": 2, "node_w<i>": 1}`` each.

    Attributes:
        cluster: the underlying ``ray.cluster_utils.Cluster``.
        address: GCS address of the head (``ray.init(address=...)`` from a subprocess works).
        head_node_id: hex node id of the head.
        node_ids: ``{"head": id, "w1": id, ...}`` for the live nodes.
        node_resources: ``{"head": "head", "w1": "node_w1", ...}``, the pinning resource names.
        workers: ``{"w1": WorkerSpec, ...}`` for the live worker nodes.

    Example:
        >>> sim = SimCluster.start([WorkerSpec("w1"), WorkerSpec("w2")])  # doctest: +SKIP
        >>> sim.add_worker(WorkerSpec("w3", sim_gpus=1)); sim.remove_worker("w1")  # doctest: +SKIP
        >>> sim.shutdown()  # doctest: +SKIP
    """

    def __init__(self, cluster: Any, head_cpus: int) -> None:
        self.cluster = cluster
        self.head_cpus = head_cpus
        self.workers: dict[str, WorkerSpec] = {}
        self._nodes: dict[str, Any] = {}  # name -> ray._private.node.Node

    @classmethod
    def start(
        cls,
        workers: list[WorkerSpec] | None = None,
        *,
        head_cpus: int = 1,
        owner: str = "SimCluster",
    ) -> SimCluster:
        """Shut down any connected Ray, start head + workers, and connect the driver.

        Args:
            workers: worker nodes to add (default ``w1`` and ``w2``).
            head_cpus: logical CPUs of the head node.
            owner: who started it, shown in error messages.

        Returns:
            The connected SimCluster.
        """
        import ray
        from ray.cluster_utils import Cluster

        shutdown_ray()
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": head_cpus,
                "resources": {SIM_CLUSTER_HEAD: 1},
                "object_store_memory": _SIM_NODE_OBJECT_STORE_BYTES,
                "include_dashboard": False,
                "_system_config": _SIM_CLUSTER_SYSTEM_CONFIG,
            },
        )
        sim = cls(cluster, head_cpus)
        sim._nodes[SIM_CLUSTER_HEAD] = cluster.head_node
        try:
            for spec in workers if workers is not None else [WorkerSpec("w1"), WorkerSpec("w2")]:
                sim.add_worker(spec, wait_registered=False)
            cluster.wait_for_nodes(timeout=60)
            ray.init(
                address=cluster.address,
                namespace="hive",
                log_to_driver=True,
                runtime_env={"env_vars": _worker_env()},
            )
        except BaseException:
            sim.shutdown()
            raise
        RAY_STATE.kind = "cluster"
        RAY_STATE.gcs_address = _current_gcs_address()
        RAY_STATE.context = None
        RAY_STATE.owner = owner
        return sim

    @property
    def address(self) -> str:
        return str(self.cluster.address)

    @property
    def head_node_id(self) -> str:
        return str(self._nodes[SIM_CLUSTER_HEAD].node_id)

    @property
    def node_ids(self) -> dict[str, str]:
        return {name: str(node.node_id) for name, node in self._nodes.items()}

    @property
    def node_resources(self) -> dict[str, str]:
        """The custom resource pinning work to each live node: ``{"head": "head", "w1": "node_w1"}``."""
        return {SIM_CLUSTER_HEAD: SIM_CLUSTER_HEAD} | {
            name: spec.node_resource for name, spec in self.workers.items()
        }

    def add_worker(self, spec: WorkerSpec, *, wait_registered: bool = True) -> str:
        """Start a worker node; returns its hex node id.

        With ``wait_registered`` (default) it also waits until the GCS lists it alive with its
        resources, so a task scheduled right after can land on it.

        Raises:
            ValueError: a worker with that name is already live.
        """
        if spec.name in self._nodes:
            raise ValueError(f"simulated node {spec.name!r} already exists; pick another name")
        node = self.cluster.add_node(
            wait=wait_registered,  # start() adds all workers first, then waits for them together
            num_cpus=spec.num_cpus,
            resources=spec.all_resources(),
            object_store_memory=_SIM_NODE_OBJECT_STORE_BYTES,
        )
        self._nodes[spec.name] = node
        self.workers[spec.name] = spec
        node_id = str(node.node_id)
        if wait_registered:
            wait_until(
                lambda: self._alive(node_id),
                timeout_s=60,
                message=f"simulated node {spec.name} ({node_id}) to register with the GCS",
            )
        return node_id

    def remove_worker(self, name: str, *, allow_graceful: bool = True) -> str:
        """Kill a worker node's processes (``allow_graceful=False`` ~ a machine crash).

        Waits until the GCS marks it dead; returns its hex node id.

        Raises:
            KeyError: no live worker of that name.
        """
        if name not in self.workers:
            raise KeyError(f"no simulated worker {name!r}; live workers: {sorted(self.workers)}")
        node = self._nodes.pop(name)
        del self.workers[name]
        node_id = str(node.node_id)
        self.cluster.remove_node(node, allow_graceful=allow_graceful)
        wait_until(
            lambda: not self._alive(node_id),
            timeout_s=60,
            message=f"GCS to mark simulated node {name} ({node_id}) dead",
        )
        return node_id

    def _alive(self, node_id: str) -> bool:
        """Whether the GCS lists ``node_id`` as alive (works before the driver connects)."""
        nodes = self.cluster.global_state.node_table()
        return any(n["NodeID"] == node_id and n["Alive"] for n in nodes)

    def shutdown(self) -> None:
        """Disconnect the driver and stop every node of the cluster."""
        shutdown_ray()
        self.cluster.shutdown()
        self._nodes.clear()
        self.workers.clear()
