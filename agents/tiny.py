"""The tiny code model, built offline: a byte-level BPE tokenizer and a small Llama-shaped causal LM trained on task
prompts followed by demonstration programs, on CPU, deterministically for a seed.

It must leave room for RL: it writes runnable programs most of the time, but not the best program for each task.
Two things keep it there: training is brief (a few hundred steps), and the demonstration corpus mixes weak model
families and some buggy programs in with the good ones, so its samples vary in quality.

    path = ensure_tiny_model()                # builds once into $ETPO_CACHE/tiny (or ~/.cache/etpo-gym/tiny)
    policy = LMPolicy.from_pretrained(path)

`etpo model build-tiny` builds it and prints, per task, the validity rate, distinct-program rate and mean normalized
score of its samples (`evaluate_samples`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

EOS = "<|endoftext|>"
PAD = "<|pad|>"
HEADER = "def build_model(X, y):"
BUILD_THREADS = 2  # torch threads of the build (fixed: see build_tiny_model)
BUILD_FORMAT = 2  # bump when the build recipe changes so cached models are rebuilt


@dataclass(frozen=True)
class TinyPreset:
    vocab_size: int = field(default=4096, metadata={"help": "BPE vocabulary size (larger: fewer tokens per program)."})
    hidden_size: int = field(default=160, metadata={"help": "Model width."})
    num_layers: int = field(default=4, metadata={"help": "Transformer blocks."})
    num_heads: int = field(default=4, metadata={"help": "Attention heads."})
    intermediate_size: int = field(default=448, metadata={"help": "MLP width."})
    context_length: int = field(default=2048, metadata={"help": "Positions the model accepts (RoPE)."})
    train_block: int = field(default=384, metadata={"help": "Tokens per training sequence (prompt tail kept)."})
    prompt_tail_tokens: int = field(default=0, metadata={
        "help": "Prompt tokens kept before each completion in training (0 = as many as fit the block). The demos do "
                "not depend on the prompt, so a short tail trains the same programs in fewer tokens per step."})
    n_demos: int = field(default=1200, metadata={"help": "Training pairs (demonstrations drawn with repetition)."})
    distinct_programs: int = field(default=16, metadata={
        "help": "Distinct corpus programs the demonstrations are drawn from. Few enough that a model this small learns "
                "each one well (its samples then mostly run), many enough that they differ in quality: RL has "
                "room to shift mass toward the better ones."})
    buggy_fraction: float = field(default=0.1, metadata={"help": "Share of buggy demos (errors to learn from)."})
    steps: int = field(default=600, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per step."})
    lr: float = field(default=3e-3, metadata={"help": "Peak AdamW learning rate (linear warmup, cosine decay)."})
    tasks_per_prompt_style: int = field(default=0, metadata={"help": "Tasks used for prompts (0 = all bundled)."})
    weak_family_weight: float = field(default=3.0, metadata={"help": "How much more often demos of weak model "
                                                                      "families are drawn (varied sample quality)."})


# Model families whose programs usually score well below the best on the suite's tasks; drawn more often.
WEAK_FAMILIES = ("naive_bayes", "knn", "decision_tree", "lda", "sgd", "adaboost")


PRESETS: dict[str, TinyPreset] = {
    # ~1.6M parameters; 600 steps take about 5 minutes on 2 CPU cores. Most samples compile, about a third run (the
    # rest fail on imports, names and arguments) and they score unevenly: room for RL on both counts.
    "default": TinyPreset(),
    # For the test suite: built in seconds, generates text, nothing more.
    "test": TinyPreset(vocab_size=400, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                       context_length=1024, train_block=160, n_demos=40, steps=6, batch_size=4, lr=3e-3,
                       tasks_per_prompt_style=1),
}


def default_cache_dir() -> Path:
    root = os.environ.get("ETPO_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "etpo-gym"


# ----------------------------------------------------------------------------------------------------------------
# Training data: (prompt, completion) pairs
# ----------------------------------------------------------------------------------------------------------------
def completion_of(program: str) -> str:
    """What the model writes after a prompt that ends with the function header: the rest of the program."""
    if HEADER in program:
        head, _, rest = program.partition(HEADER)
        if not head.strip():
            return rest
    # Imports or helpers before the header: emit them too, after a newline (extract_program handles it).
    return "\n" + program


def training_pairs(n_demos: int, seed: int, buggy_fraction: float, max_tasks: int = 0,
                   weak_family_weight: float = 1.0, distinct_programs: int = 0) -> list[tuple[str, str]]:
    """(prompt, completion) pairs: env prompts of the bundled tasks (both styles) × corpus programs.

    Demos are drawn with repetition from `distinct_programs` corpus programs, weak families `weak_family_weight`
    times more often.
    """
    try:
        import tasks
        from tasks import demos
    except ImportError:  # the task suite is part of this project; this keeps the agents package usable alone
        warnings.warn("task suite not importable: building the tiny model from a minimal built-in corpus",
                      stacklevel=2)
        return _fallback_pairs(n_demos, seed)
    prompts = _task_prompts(tasks, max_tasks)
    rng = random.Random(seed)
    pool = demos.corpus(n=distinct_programs or 4 * n_demos, seed=seed, buggy_fraction=buggy_fraction)
    weights = [weak_family_weight if d.family in WEAK_FAMILIES else 1.0 for d in pool]
    chosen = rng.choices(pool, weights=weights, k=n_demos)
    return [(rng.choice(prompts), completion_of(d.program)) for d in chosen]


def _task_prompts(tasks_module: Any, max_tasks: int) -> list[str]:
    names = tasks_module.names(suite="bundled")
    if max_tasks:
        names = names[:max_tasks]
    try:
        from etpo_env.prompts import initial_prompt
    except ImportError:
        initial_prompt = None
    prompts = []
    for name in names:
        task = tasks_module.get(name)
        for style in ("paper", "rich"):
            if initial_prompt is not None:
                prompts.append(initial_prompt(task, style))
            else:
                prompts.append(task.describe(style=style) + "\n\n" + HEADER)
    return prompts


_FALLBACK_BODIES = [
    "from sklearn.linear_model import LogisticRegression\nreturn LogisticRegression(max_iter=200).fit(X, y)",
    "from sklearn.ensemble import RandomForestClassifier\nreturn RandomForestClassifier(n_estimators=50).fit(X, y)",
    "from sklearn.tree import DecisionTreeClassifier\nreturn DecisionTreeClassifier(max_depth=3).fit(X, y)",
    "from sklearn.naive_bayes import GaussianNB\nreturn GaussianNB().fit(X, y)",
    "from sklearn.neighbors import KNeighborsClassifier\nreturn KNeighborsClassifier(5).fit(X, y)",
]


def _fallback_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        rows, cols = rng.randint(100, 2000), rng.randint(3, 40)
        prompt = (f"You are a data scientist. Your task is binary classification on a tabular dataset.\n"
                  f"The dataset has {rows} rows and {cols} features.\n\n{HEADER}")
        body = rng.choice(_FALLBACK_BODIES)
        pairs.append((prompt, "\n" + "\n".join("    " + line for line in body.splitlines()) + "\n"))
    return pairs


# ----------------------------------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style) trained on the corpus, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD,
                                   unk_token=None, model_max_length=10**6)


def make_model(preset: TinyPreset, tokenizer: Any):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=preset.hidden_size, intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers, num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_heads, max_position_embeddings=preset.context_length,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def encode_pairs(tokenizer: Any, pairs: list[tuple[str, str]], block: int,
                 prompt_tail: int = 0) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per pair; loss only on the completion and EOS; the prompt's tail kept to fit `block`
    (and at most `prompt_tail` tokens of it when that is set)."""
    out = []
    for prompt, completion in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        c = c[: block - 16]
        keep = block - len(c) if not prompt_tail else min(prompt_tail, block - len(c))
        p = p[-keep:]
        out.append((p + c, [-100] * len(p) + c))
    return out


def build_tiny_model(out_dir: str | Path, preset: str | TinyPreset = "default", seed: int = 0,
                     log: Any = None) -> dict:
    """Train tokenizer and model from nothing and `save_pretrained` both into `out_dir`. Returns build info."""
    import torch

    spec = PRESETS[preset] if isinstance(preset, str) else preset
    say = log or (lambda msg: None)
    started = time.perf_counter()
    # A fixed intra-op thread count (not the machine's): how float sums are split then does not depend on the core
    # count, so a seed gives the same model on any machine with the same CPU instruction set.
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        return _build(spec, seed, Path(out_dir), say, started)
    finally:
        torch.set_num_threads(threads)


def _build(spec: TinyPreset, seed: int, out_dir: Path, say: Any, started: float) -> dict:
    import torch

    from agents.policy import pad_sequences

    torch.manual_seed(seed)
    random.seed(seed)
    pairs = training_pairs(spec.n_demos, seed, spec.buggy_fraction, spec.tasks_per_prompt_style,
                           spec.weak_family_weight, spec.distinct_programs)
    say(f"{len(pairs)} training pairs")
    tokenizer = train_tokenizer(sorted({p for p, _ in pairs}) + [c for _, c in pairs], spec.vocab_size)
    model = make_model(spec, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"model: {n_params / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}")
    examples = encode_pairs(tokenizer, pairs, spec.train_block, spec.prompt_tail_tokens)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)
    warmup = max(1, spec.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / spec.steps)))
    rng = random.Random(seed)
    model.train()
    losses = []
    for step in range(spec.steps):
        batch = [examples[rng.randrange(len(examples))] for _ in range(spec.batch_size)]
        ids, mask = pad_sequences([b[0] for b in batch], tokenizer.pad_token_id)
        labels, _ = pad_sequences([b[1] for b in batch], -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if step % max(1, spec.steps // 10) == 0 or step == spec.steps - 1:
            say(f"step {step + 1}/{spec.steps}  loss {loss.item():.3f}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    info = {"format": BUILD_FORMAT, "preset": asdict(spec), "seed": seed, "n_params": n_params,
            "n_pairs": len(pairs), "first_loss": losses[0], "final_loss": losses[-1],
            "build_seconds": round(time.perf_counter() - started, 1)}
    (out_dir / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _fingerprint(spec: TinyPreset, seed: int) -> str:
    return hashlib.sha256(json.dumps([BUILD_FORMAT, asdict(spec), seed], sort_keys=True).encode()).hexdigest()[:12]


def ensure_tiny_model(path: str | Path | None = None, preset: str = "default", seed: int = 0,
                      rebuild: bool = False, log: Any = None) -> Path:
    """Return a directory holding the tiny model, building it when missing or built by another recipe."""
    spec = PRESETS[preset]
    target = Path(path) if path else default_cache_dir() / "tiny" / f"{preset}-seed{seed}"
    info_file = target / "build.json"
    if not rebuild and info_file.exists():
        info = json.loads(info_file.read_text())
        if info.get("format") == BUILD_FORMAT and info.get("preset") == asdict(spec) and info.get("seed") == seed:
            return target
    tmp = target.with_name(target.name + f".building-{os.getpid()}")
    build_tiny_model(tmp, spec, seed, log=log)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)  # atomic on one filesystem: readers never see a half-written model
    return target


def resolve_model(model: str | Path) -> str | Path:
    """`"tiny"` -> the cached tiny model (built if missing); anything else (path or hub name) unchanged."""
    return ensure_tiny_model() if str(model) == "tiny" else model


# ----------------------------------------------------------------------------------------------------------------
# Evaluation of samples (validity, diversity, score)
# ----------------------------------------------------------------------------------------------------------------
def evaluate_samples(model_dir: Any, task_names: list[str] | None = None, n_samples: int = 8,
                     seed: int = 0, sandbox: Any = "auto", temperature: float = 1.0,
                     max_new_tokens: int = 256) -> list[dict]:
    """Sample `n_samples` programs per task and score each through `tasks.evaluate` (the one evaluator).

    `model_dir` is a model directory (or hub name) or a live `LMPolicy` (e.g. a learner's `.policy` mid-training).

    Per task: validity rate (status ok), distinct-program rate, mean normalized score over valid samples
    (a failure counts as normalized score 0 in `mean_normalized_all`).
    """
    import tasks
    from agents.policy import GenerationSettings, LMPolicy
    from etpo_env.program import extract_program
    from etpo_env.prompts import initial_prompt

    policy = model_dir if isinstance(model_dir, LMPolicy) else LMPolicy.from_pretrained(model_dir)
    gen = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    own_sandbox = isinstance(sandbox, str)
    if own_sandbox:
        from sandbox import make_sandbox

        sandbox = make_sandbox(sandbox)
    rows = []
    try:
        for name in task_names or tasks.names(suite="bundled"):
            task = tasks.get(name)
            prompt = policy.encode(initial_prompt(task, "paper"), max_length=policy.max_prompt_tokens(gen))
            programs = [extract_program(g.text) for g in policy.generate([prompt] * n_samples, gen)]
            evals = [tasks.evaluate(task, program, sandbox, part="dev", seed=seed) for program in programs]
            valid = [e for e in evals if e.status.value == "ok" and e.normalized is not None]
            mean_norm = sum(e.normalized for e in valid) / len(valid) if valid else None
            rows.append({
                "task": name, "samples": n_samples, "validity": len(valid) / n_samples,
                "distinct": len(set(programs)) / n_samples, "mean_normalized_valid": mean_norm,
                "mean_normalized_all": sum(e.normalized for e in valid) / n_samples,
                "best_normalized": max((e.normalized for e in valid), default=None),
            })
    finally:
        if own_sandbox:
            sandbox.close()
    return rows
