"""The tiny code model, built offline: a byte-level BPE tokenizer and a small Llama-shaped causal LM trained on the
environment's own prompts followed by demonstration programs, on CPU, deterministically for a seed.

It learns the three prompts an episode of `DataSciCode-v0` shows, each with the env's exact text:

- the first prompt (task, request, function header) -> a corpus program;
- the fix prompt (the error message and trimmed traceback the sandbox really gave, and the failing code) -> a
  corrected program: the failing program's model family, the bug removed, in its plainest form (`fix_program`).
  The failing programs are corpus programs with one realistic mistake each (`tasks.demos`), run once through the
  real sandbox; their feedback is cached under `$ETPO_CACHE/tiny/feedback/`;
- the refine prompt (`mode="refine"`: the last result, the best program so far and its real dev score) -> a
  different corpus program.

Every program is written in the corpus's `local` layout (`DEMO_LAYOUT`): the classifier first, each import right
above the line that uses it. A model this small keeps a choice consistent over a line or two far more reliably than
over a whole program (imports at the top, their use twenty lines below), so more of its samples run, and a fix
decides the model family on its first two lines and then writes one fixed plain rest.

Context: the model accepts `context_length` positions (512 by default) and is trained on sequences of at most that
many tokens, so no position used at inference is outside the trained range. A prompt is cut the same way in
training and at inference: its last `context_length - GENERATION_TOKENS` tokens are kept (`LMPolicy.encode` and
`encode_observation` keep the tail to fit `max_prompt_tokens`, which with the learners' default of 256 new tokens
is the same 256). A feedback prompt thus loses its head (the task description and most of the error block) and
keeps the end of the traceback (the exception line), the failing code and the request; a first prompt in the paper
style fits whole. An agent generating more new tokens (SFT and prompting default to 384) keeps a shorter tail.

It must leave room for RL: it writes runnable programs some of the time, not the best program for each task, and
fixes a failed program often but not always. Training is brief and the corpus mixes weak model families and some
buggy programs in with the good ones, so its samples vary in quality.

    path = ensure_tiny_model()                # builds once into $ETPO_CACHE/tiny (or ~/.cache/etpo-gym/tiny)
    policy = LMPolicy.from_pretrained(path)

`etpo model build-tiny` builds it and runs five-attempt fix-mode episodes per task
(`agents.tiny_evaluation.evaluate_samples`), printing first-attempt validity, fix rate, episode success,
distinct-program rate and mean normalized score (`summary_line` gives its last line).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

EOS = "<|endoftext|>"
PAD = "<|pad|>"
HEADER = "def build_model(X, y):"
BUILD_THREADS = 1  # torch threads of the build (fixed: see build_tiny_model)
BUILD_FORMAT = 4  # bump when the build recipe changes so cached models are rebuilt
GENERATION_TOKENS = 256  # new tokens per action the learners and the evaluation default to (max_new_tokens)
FEEDBACK_FORMAT = 2  # bump when the feedback cache's content changes (2: scores on the holdout protocol's reward rows)
EVAL_MAX_ROWS = 2000  # the env's default row cap: the prompts and feedback are those of DataSciCode-v0
DEMO_LAYOUT = "local"  # demos with each import right above its use: nothing to remember across a program


@dataclass(frozen=True)
class TinyPreset:
    vocab_size: int = field(default=4096, metadata={"help": "BPE vocabulary size (larger: fewer tokens per program)."})
    hidden_size: int = field(default=128, metadata={"help": "Model width."})
    num_layers: int = field(default=4, metadata={"help": "Transformer blocks."})
    num_heads: int = field(default=4, metadata={"help": "Attention heads."})
    intermediate_size: int = field(default=384, metadata={"help": "MLP width."})
    context_length: int = field(default=512, metadata={
        "help": "Positions the model accepts (RoPE); equal to train_block, so inference stays in the trained range."})
    train_block: int = field(default=512, metadata={"help": "Most tokens per training sequence (prompt tail kept)."})
    prompt_tail_tokens: int = field(default=512 - GENERATION_TOKENS, metadata={
        "help": "Prompt tokens kept before each completion in training (0 = as many as fit the block): "
                "context_length - 256, the tail LMPolicy keeps at inference for 256 new tokens."})
    n_demos: int = field(default=1200, metadata={"help": "Training pairs of all kinds (drawn with repetition)."})
    fix_fraction: float = field(default=0.5, metadata={"help": "Share of fix-prompt pairs (failed program -> fix)."})
    refine_fraction: float = field(default=0.05, metadata={"help": "Share of refine-prompt pairs (best program -> "
                                                                    "a different program)."})
    feedback_tasks: int = field(default=2, metadata={"help": "Tasks each program and its buggy variants are run on "
                                                              "for the fix and refine prompts."})
    distinct_programs: int = field(default=12, metadata={
        "help": "Distinct corpus programs the demonstrations are drawn from. Few enough that a model this small learns "
                "each one well (its samples then mostly run), many enough that they differ in quality: RL has "
                "room to shift mass toward the better ones."})
    buggy_fraction: float = field(default=0.1, metadata={"help": "Share of buggy demos (errors to learn from)."})
    steps: int = field(default=400, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per step."})
    lr: float = field(default=3e-3, metadata={"help": "Peak AdamW learning rate (linear warmup, cosine decay)."})
    tasks_per_prompt_style: int = field(default=0, metadata={"help": "Tasks used for prompts (0 = all bundled)."})
    weak_family_weight: float = field(default=3.0, metadata={"help": "How much more often demos of weak model "
                                                                      "families are drawn (varied sample quality)."})


# Model families whose programs usually score well below the best on the suite's tasks; drawn more often.
WEAK_FAMILIES = ("naive_bayes", "knn", "decision_tree", "lda", "sgd", "adaboost")


PRESETS: dict[str, TinyPreset] = {
    # ~1.2M parameters; first, fix and refine prompts (tail of 256 tokens) -> programs, 400 steps on 2 CPU cores.
    "default": TinyPreset(),
    # For the test suite: built in seconds without a sandbox (first prompts only), generates text, nothing more.
    "test": TinyPreset(vocab_size=400, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                       context_length=1024, train_block=160, prompt_tail_tokens=0, n_demos=40, fix_fraction=0.0,
                       refine_fraction=0.0, steps=6, batch_size=4, lr=3e-3, tasks_per_prompt_style=1),
    # For the learning tests: the default model on first prompts only (no sandbox), half the steps (~2 min on 2
    # cores); writes programs of the demonstrations' shape (model family on the first lines), so reward probes on
    # their keywords can be learned with the learners' default settings.
    "test-learn": TinyPreset(fix_fraction=0.0, refine_fraction=0.0, n_demos=600, steps=200),
    # For the tests of the feedback pairs: as small, with fix and refine prompts from 3 programs on 1 task.
    "test-feedback": TinyPreset(vocab_size=400, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                context_length=320, train_block=320, prompt_tail_tokens=64, n_demos=40,
                                distinct_programs=3, buggy_fraction=0.0, feedback_tasks=1, steps=6, batch_size=4,
                                lr=3e-3, tasks_per_prompt_style=1),
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
    import tasks
    from tasks import demos

    prompts = _task_prompts(tasks, max_tasks)
    rng = random.Random(seed)
    pool = demos.corpus(n=distinct_programs or 4 * n_demos, seed=seed, buggy_fraction=buggy_fraction,
                        layout=DEMO_LAYOUT)
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


def _load_tasks(tasks_module: Any, max_tasks: int) -> list[Any]:
    names = tasks_module.names(suite="bundled")
    return [tasks_module.get(name, max_rows=EVAL_MAX_ROWS) for name in (names[:max_tasks] if max_tasks else names)]


def feedback_pairs(spec: TinyPreset, seed: int, sandbox: Any = "auto", cache_dir: str | Path | None = None,
                   log: Any = None) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(fix pairs, refine pairs) with the env's exact fix and refine prompt text.

    Each valid program of the demo pool is run on `spec.feedback_tasks` tasks, and so is each of its buggy variants
    (one per `tasks.demos.BUG_KINDS`, made on its recipe) that should fail there. A failed run gives fix prompts
    (error, trimmed traceback, failing code; 1-4 attempts left; either prompt style) -> `fix_program`; a
    valid run gives refine prompts (its real dev score as the best so far; the last result is that run or one of
    the failures) -> another valid program. Runs go through `tasks.evaluate` as the env's do (split seed 0) and
    are cached (`run_feedback`), so later builds need no sandbox.
    """
    n_fix, n_refine = round(spec.n_demos * spec.fix_fraction), round(spec.n_demos * spec.refine_fraction)
    if not n_fix and not n_refine:
        return [], []
    import tasks
    from etpo_env import prompts
    from etpo_env.program import extract_program
    from etpo_env.spaces import sanitize
    from tasks import demos

    task_list = _load_tasks(tasks, spec.tasks_per_prompt_style)
    by_name = {t.name: t for t in task_list}
    pool = demos.corpus(n=spec.distinct_programs or 4 * spec.n_demos, seed=seed, buggy_fraction=spec.buggy_fraction,
                        layout=DEMO_LAYOUT)
    valid = [d for d in pool if d.bug is None]
    rng = random.Random(f"tiny-feedback-{seed}")
    plan = []  # (valid demo, task name, [buggy demos expected to fail there])
    for demo in valid:
        variants = [demos.buggy_demo(demo.recipe, bug, rng, DEMO_LAYOUT) for bug in demos.BUG_KINDS]
        for name in rng.sample(sorted(by_name), min(spec.feedback_tasks, len(by_name))):
            plan.append((demo, name, [b for b in variants if b.fails_on(by_name[name])]))
    jobs = [(name, extract_program(d.program)) for demo, name, bugs in plan for d in (demo, *bugs)]
    results = dict(zip(jobs, run_feedback(jobs, by_name, sandbox, cache_dir, log)))

    fixes, refines = [], []  # situations: (task, program shown, step info, completion) / (task, best, score, lasts)
    for demo, name, bugs in plan:
        failed = []
        for bug in bugs:
            program = extract_program(bug.program)
            info = results[(name, program)]
            if info["status"] != "ok":
                failed.append(info)
                fixes.append((name, program, info, completion_of(fix_program(bug))))
        best = results[(name, extract_program(demo.program))]
        if best["status"] == "ok":
            refines.append((name, extract_program(demo.program), best["score"], [best, *failed]))
    fix_pairs, refine_pairs = [], []
    styles = prompts.STYLES
    for _ in range(n_fix if fixes else 0):
        name, program, info, completion = rng.choice(fixes)
        text = prompts.fix_prompt(by_name[name], rng.choice(styles), program, info, rng.randint(1, 4))
        fix_pairs.append((sanitize(text), completion))
    others = [completion_of(d.program) for d in valid]
    for _ in range(n_refine if refines and len(valid) > 1 else 0):
        name, best_program, score, lasts = rng.choice(refines)
        last = lasts[0] if rng.random() < 0.6 else rng.choice(lasts)
        text = prompts.refine_prompt(by_name[name], rng.choice(styles), best_program, score, last, rng.randint(1, 4))
        completion = rng.choice([c for c in others if extract_program(c) != best_program])
        refine_pairs.append((sanitize(text), completion))
    return fix_pairs, refine_pairs


def fix_program(demo: Any) -> str:
    """What the model learns to answer a fix prompt with: the failing program's model family in its plainest form
    that runs everywhere (`tasks.demos.safe_recipe`: the bug removed, median imputation, scaled numeric columns).
    One answer per family keeps the fix reliable for a model this small even when the failing code is its own
    garbled program; which family to keep is read from the failing code."""
    from tasks import demos
    from tasks.programs import wrap_body

    return wrap_body(demos.render(demos.safe_recipe(demo.family), layout=DEMO_LAYOUT))


def step_info_of(evaluation: Any) -> dict:
    """The fields of the env's step info that its prompts read, from a `tasks.evaluate` result (as the env's
    `_run` builds them)."""
    result = evaluation.result
    status = getattr(evaluation.status, "value", str(evaluation.status))
    score = evaluation.score
    if status == "ok" and (score is None or not math.isfinite(score)):
        status = "invalid_output"
    return {"status": status, "error_type": result.error_type, "message": result.message,
            "traceback": result.traceback, "score": float(score) if status == "ok" else None,
            "isolation": result.isolation}


def run_feedback(jobs: list[tuple[str, str]], tasks_by_name: dict[str, Any], sandbox: Any = "auto",
                 cache_dir: str | Path | None = None, log: Any = None) -> list[dict]:
    """Step info of each (task name, program) run through `tasks.evaluate` on the dev part with split seed 0 (the
    env's default), cached as JSON under `<cache>/tiny/feedback/` keyed by the jobs and the backend asked for."""
    backend = sandbox if isinstance(sandbox, str) else type(sandbox).__name__
    key = hashlib.sha256(json.dumps([FEEDBACK_FORMAT, backend, jobs]).encode()).hexdigest()[:16]
    path = Path(cache_dir or default_cache_dir()) / "tiny" / "feedback" / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    import tasks

    say = log or (lambda msg: None)
    say(f"running {len(jobs)} programs through the sandbox for the fix and refine prompts (cached after)")
    own = isinstance(sandbox, str)
    if own:
        from sandbox import make_sandbox

        sandbox = make_sandbox(sandbox)
    try:
        with ThreadPoolExecutor(max_workers=sandbox_slots(sandbox)) as pool:
            out = list(pool.map(lambda job: step_info_of(tasks.evaluate(tasks_by_name[job[0]], job[1], sandbox,
                                                                        part="dev", seed=0)), jobs))
    finally:
        if own:
            sandbox.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    tmp.rename(path)
    return out


def sandbox_slots(sandbox: Any) -> int:
    """How many jobs the sandbox runs at once (a pooled sandbox's `parallelism`, else 1)."""
    return max(1, int(getattr(sandbox, "parallelism", 1) or 1))




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
                     log: Any = None, sandbox: Any = "auto", progress: bool | None = None) -> dict:
    """Train tokenizer and model from nothing and `save_pretrained` both into `out_dir`. Returns build info.

    `sandbox` runs the buggy and valid programs behind the fix and refine prompts the first time (then cached);
    `progress` shows a progress bar (step, loss, ETA; plain lines through `log` when stderr is not a terminal),
    by default when `log` is given.
    """
    import torch

    spec = PRESETS[preset] if isinstance(preset, str) else preset
    say = log or (lambda msg: None)
    started = time.perf_counter()
    # A fixed intra-op thread count (not the machine's): how float sums are split then does not depend on the core
    # count, so a seed gives the same model on any machine with the same CPU instruction set.
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        return _build(spec, seed, Path(out_dir), say, started, sandbox, log is not None if progress is None
                      else progress)
    finally:
        torch.set_num_threads(threads)


def training_examples(spec: TinyPreset, seed: int, sandbox: Any = "auto", log: Any = None) -> list[tuple[str, str]]:
    """All (prompt, completion) pairs of a build: first prompts, then fix prompts, then refine prompts."""
    n_first = spec.n_demos - round(spec.n_demos * spec.fix_fraction) - round(spec.n_demos * spec.refine_fraction)
    first = training_pairs(n_first, seed, spec.buggy_fraction, spec.tasks_per_prompt_style,
                           spec.weak_family_weight, spec.distinct_programs)
    fix, refine = feedback_pairs(spec, seed, sandbox, log=log)
    return first + fix + refine


class _Progress:
    """Step, loss and ETA: a tqdm bar on a terminal, else a plain line through `say` every 5 % of the steps."""

    def __init__(self, total: int, say: Any, enabled: bool):
        self.total, self.say, self.enabled = total, say, enabled
        self.started = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="tiny model", unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            self.bar.update(1)
            return
        every = max(1, self.total // 20)
        if (step + 1) % every == 0 or step == 0 or step + 1 == self.total:
            elapsed = time.perf_counter() - self.started
            eta = elapsed / (step + 1) * (self.total - step - 1)
            self.say(f"step {step + 1}/{self.total}  loss {loss:.3f}  elapsed {elapsed:.0f}s  ETA {eta:.0f}s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _build(spec: TinyPreset, seed: int, out_dir: Path, say: Any, started: float, sandbox: Any = "auto",
           progress: bool = False) -> dict:
    import torch

    from agents.lm import pad_sequences

    torch.manual_seed(seed)
    random.seed(seed)
    pairs = training_examples(spec, seed, sandbox, log=say)
    n_fix = sum("Your previous code failed." in p for p, _ in pairs)
    n_refine = sum("Your best program so far" in p for p, _ in pairs)
    say(f"{len(pairs)} training pairs: {len(pairs) - n_fix - n_refine} first, {n_fix} fix, {n_refine} refine prompts")
    tokenizer = train_tokenizer(sorted({p for p, _ in pairs}) + [c for _, c in pairs], spec.vocab_size)
    model = make_model(spec, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"model: {n_params / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}, context {spec.context_length}")
    examples = encode_pairs(tokenizer, pairs, min(spec.train_block, spec.context_length), spec.prompt_tail_tokens)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)
    warmup = max(1, spec.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / spec.steps)))
    rng = random.Random(seed)
    model.train()
    losses = []
    bar = _Progress(spec.steps, say, progress)
    try:
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
            bar.update(step, losses[-1])
    finally:
        bar.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_quietly(model, tokenizer, out_dir)
    info = {"format": BUILD_FORMAT, "preset": asdict(spec), "seed": seed, "n_params": n_params,
            "n_pairs": len(pairs), "n_fix_pairs": n_fix, "n_refine_pairs": n_refine, "first_loss": losses[0],
            "final_loss": losses[-1], "build_seconds": round(time.perf_counter() - started, 1)}
    (out_dir / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _save_quietly(model: Any, tokenizer: Any, out_dir: Path) -> None:
    """`save_pretrained` both without the library's one-shard progress bar (the build has its own)."""
    with no_library_progress_bars():
        model.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))


@contextmanager
def no_library_progress_bars():
    """transformers' progress bars (saving, loading a model of one shard) off inside the block."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def ensure_tiny_model(path: str | Path | None = None, preset: str = "default", seed: int = 0,
                      rebuild: bool = False, log: Any = None, sandbox: Any = "auto",
                      progress: bool | None = None) -> Path:
    """Return a directory holding the tiny model, building it when missing or built by another recipe."""
    spec = PRESETS[preset]
    target = Path(path) if path else default_cache_dir() / "tiny" / f"{preset}-seed{seed}"
    info_file = target / "build.json"
    if not rebuild and info_file.exists():
        info = json.loads(info_file.read_text())
        if info.get("format") == BUILD_FORMAT and info.get("preset") == asdict(spec) and info.get("seed") == seed:
            return target
    tmp = target.with_name(target.name + f".building-{os.getpid()}")
    build_tiny_model(tmp, spec, seed, log=log, sandbox=sandbox, progress=progress)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)  # atomic on one filesystem: readers never see a half-written model
    return target


def resolve_model(model: str | Path) -> str | Path:
    """`"tiny"` -> the cached tiny model (built if missing); anything else (path or hub name) unchanged."""
    return ensure_tiny_model() if str(model) == "tiny" else model
