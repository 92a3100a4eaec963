"""The evolution step of ``hive demo``: merge two tiny specialists of one base with a GA.

A 4-layer Llama (64 wide, character tokenizer) is the base; two "specialists" are copies of it
trained for a few steps on arithmetic (layers 0-1) or Python (layers 2-3). A GA searches the
task-vector weights of a ``task_arithmetic`` merge, scored by perplexity per domain behind the
regression gate. Everything is built in a temporary directory with fixed seeds; nothing is
downloaded. ``examples/evolution_round.ipynb`` is the same run, explained.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["demo_steps"]

_VOCAB = 128  # ids 0-3: <unk> <s> </s> <pad>; 4-127: chr(4)..chr(127)
_TRAIN = {
    "math": ["12+7=19", "3*4=12", "40-15=25", "9+9=18", "6*7=42", "100-1=99", "8+5=13"],
    "code": ["def add(a, b):\n    return a + b", "for i in range(10):\n    print(i)",
             "import os\nx = os.getcwd()", "if x is None:\n    x = []"],
}  # fmt: skip
_EVAL = {
    "math": ["5+8=13", "7*6=42", "30-12=18", "11+11=22"],
    "code": ["def mul(a, b):\n    return a * b", "for k in range(3):\n    print(k)"],
}
_LAYERS = {"math": (0, 1), "code": (2, 3)}  # decoder layers each specialist trains


def _tokenizer() -> Any:
    """A character-level ASCII tokenizer (one token per character)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<unk>", "<s>", "</s>", "<pad>"])}
    vocab.update({chr(i): i for i in range(4, _VOCAB)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")  # fmt: skip


def build_tiny_set(root: Path, steps: int = 30) -> tuple[Path, dict[str, Path]]:
    """Write a tiny Llama base and one specialist per domain under ``root``.

    Returns:
        ``(base_dir, {domain: specialist_dir})``.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )  # fmt: skip
    tokenizer = _tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = LlamaForCausalLM(config).eval()
        base.save_pretrained(root / "base")
        tokenizer.save_pretrained(root / "base")
        out = {}
        for seed, (domain, texts) in enumerate(_TRAIN.items(), start=1):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
            model.load_state_dict(base.state_dict())
            prefixes = tuple(f"layers.{i}." for i in _LAYERS[domain])
            trainable = []
            for name, p in model.named_parameters():
                p.requires_grad_(any(x in name for x in prefixes))
                if p.requires_grad:
                    trainable.append(p)
            opt = torch.optim.Adam(trainable, lr=1e-2)
            model.train()
            for step in range(steps):
                ids = tokenizer(
                    texts[step % len(texts)], add_special_tokens=False, return_tensors="pt"
                )["input_ids"]  # (1, T)
                loss = model(input_ids=ids, labels=ids).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
            model.eval().save_pretrained(root / domain)
            tokenizer.save_pretrained(root / domain)
            out[domain] = root / domain
    return root / "base", out


def _combined(path: Path, tasks: Any) -> float:
    """Sum of the tasks' scores for the checkpoint at ``path`` (in this process)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return sum(t.score(model, tokenizer) for t in tasks)


def demo_steps(state: dict[str, Any], quick: bool) -> list[tuple[str, Callable[[], str]]]:
    """Steps ``hive demo`` runs after its own (the hive client is ``state["client"]``)."""
    import evolution

    generations = 1 if quick else 2

    def build() -> str:
        models = Path(state["client"].config.home) / "demo-models"  # kept: recipes point here
        models.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="evolution-", dir=models))
        state["evolution_root"] = root
        base, specialists = build_tiny_set(root)
        state["evolution_models"] = (base, specialists)
        return (f"tiny Llama base + specialists {', '.join(specialists)} (layers 0-1 / 2-3 "
                f"fine-tuned) in {root}")  # fmt: skip

    def evolve() -> str:
        base, specialists = state["evolution_models"]
        cfg = evolution.EvolutionConfig(
            base_model=str(base), models=tuple(str(p) for p in specialists.values()),
            method="task_arithmetic", strategy="ga", population=4, generations=generations,
            tasks=tuple(evolution.Perplexity(d, texts, max_length=64) for d, texts in _EVAL.items()),
            tolerances={d: 0.05 for d in _EVAL}, baseline_repeats=2, evaluators=2, seed=0,
        )  # fmt: skip
        name = f"demo-{state['evolution_root'].name.rsplit('-', 1)[-1]}"
        sched = evolution.EvolutionScheduler.launch(cfg, name, client=state["client"])
        result = sched.run_round(progress=False)
        champ = sched.champion()
        evolution.verify(champ.path, champ.sha256 or "")
        base_score = _combined(base, cfg.tasks)
        start = result.champions[0].combined
        ok = sum(c.status == "ok" for c in result.search)
        return (f"{len(result.search)} candidates ({ok} ok), {len(result.champions) - 1} promoted; "
                f"champion {champ.n} ({champ.candidate_id}) scores {champ.combined:.4f} vs base model "
                f"{base_score:.4f} and starting merge {start:.4f} (summed minus NLL per token, "
                f"higher is better); sha256 {champ.sha256}")  # fmt: skip

    return [
        ("build a tiny base and two specialists", build),
        (f"evolve a merge of them (GA, population 4, {generations} generation(s))", evolve),
    ]
