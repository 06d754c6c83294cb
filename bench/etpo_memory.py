"""ETPO's lean buffer and chunked update vs a naive full-vocabulary buffer, side by side in one run.

The naive layout is the public reference implementation's: per generated token it keeps three float32 vectors of
vocabulary size (π logits, ρ logits, target Q) in host memory and runs the update on full [B, T, V] tensors. Ours keeps
token ids and per-token scalars (the shared RolloutBuffer) and reduces every vocabulary-sized quantity in chunks.
Both updates do the same math (soft values, soft Bellman targets, critic and policy losses, one optimiser step).

    .venv/bin/python bench/etpo_memory.py                      # V = 1k, 4k, 16k, 32k; 256 new tokens
    .venv/bin/python bench/etpo_memory.py --vocab 1024 32768 --actions 4 --repeats 3
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import numpy as np
import torch


def llama_config(vocab: int, hidden: int, layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048)


def make_buffer(vocab: int, actions: int, prompt_tokens: int, new_tokens: int, seed: int):
    from agents.rollout import RolloutBuffer, Transition

    rng = np.random.default_rng(seed)
    buffer = RolloutBuffer()
    for i in range(actions):
        n = new_tokens
        buffer.append(Transition(
            obs_ids=rng.integers(2, vocab, prompt_tokens).astype(np.int32),
            action_ids=rng.integers(2, vocab, n).astype(np.int32),
            logp=np.zeros(n, np.float32), ref_logp=np.zeros(n, np.float32), reward=float(rng.uniform(-1, 1)),
            terminated=True, truncated=False, episode_id=i, t=0))
    return buffer


def naive_buffer(agent, buffer) -> list[dict[str, np.ndarray]]:
    """What the reference implementation stores: three float32 [n, V] arrays per action, built at collection."""
    from agents.etpo import pack

    out = []
    models = agent.models
    with torch.no_grad():
        for t in buffer:
            packed = pack([(t.obs_ids, t.action_ids)], agent.policy.pad_id, agent.policy.device)
            rows = {role: models.hidden(role, packed.input_ids, packed.attention_mask)[packed.row_batch,
                                                                                      packed.row_pos]
                    for role in ("policy", "reference", "target")}
            out.append({"obs_ids": t.obs_ids, "action_ids": t.action_ids,
                        "pi_logits": models.head("policy", rows["policy"]).float().cpu().numpy(),
                        "ref_logits": models.head("reference", rows["reference"]).float().cpu().numpy(),
                        "q_target": models.head("target", rows["target"]).float().cpu().numpy(),
                        "reward": np.float32(t.reward)})
    return out


def naive_update(agent, nbuf, beta: float, gamma: float) -> None:
    """The same losses on full [tokens, V] tensors built from the stored vectors and unchunked forward passes."""
    from agents.etpo import critic_loss_per_token, pack, policy_loss_per_state, soft_value

    models, device = agent.models, agent.policy.device
    packed = pack([(b["obs_ids"], b["action_ids"]) for b in nbuf], agent.policy.pad_id, device)
    pi_old = torch.from_numpy(np.concatenate([b["pi_logits"] for b in nbuf])).to(device)
    rho = torch.from_numpy(np.concatenate([b["ref_logits"] for b in nbuf])).to(device)
    q_bar = torch.from_numpy(np.concatenate([b["q_target"] for b in nbuf])).to(device)
    values = soft_value(pi_old, rho, q_bar, beta)
    targets, offset = [], 0
    for b in nbuf:  # one-step episodes: yʲ = V(uʲ⁺¹) inside, r at the last token
        n = len(b["action_ids"])
        targets.append(torch.cat([values[offset + 1: offset + n], torch.tensor([float(b["reward"])], device=device)]))
        offset += n
    y = torch.cat(targets)
    h_pi = models.hidden("policy", packed.input_ids, packed.attention_mask)[packed.row_batch, packed.row_pos]
    h_q = models.hidden("critic", packed.input_ids, packed.attention_mask)[packed.row_batch, packed.row_pos]
    pi_logits, q = models.head("policy", h_pi), models.head("critic", h_q)  # full [tokens, V], kept for backward
    q_taken = q.gather(-1, packed.tokens[:, None]).squeeze(-1)
    loss = policy_loss_per_state(pi_logits, rho, q, beta).mean() + critic_loss_per_token(q_taken, y).mean()
    agent.policy_opt.zero_grad()
    agent.critic_opt.zero_grad()
    loss.backward()
    agent.policy_opt.step()
    agent.critic_opt.step()


def timed(fn, repeats: int, device: torch.device) -> tuple[float, float | None]:
    times, peak = [], None
    fn()  # warm-up
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) / 2**20
        times.append(time.perf_counter() - t0)
    return statistics.median(times), peak


def measure(vocab: int, args: argparse.Namespace, device: torch.device) -> str:
    """One table row: both buffers' bytes per token and both updates' median time at vocabulary size `vocab`."""
    from agents.etpo import ETPOAgent, ETPOConfig, etpo_update, lm_policy_from_config
    from agents.lm import RuntimeSettings

    cfg = ETPOConfig(beta=0.1, gamma=1.0, epochs=1, minibatch_size=args.actions, chunk_size=args.chunk_size,
                     runtime=RuntimeSettings(device=str(device)), lora_r=4)
    policy = lm_policy_from_config(llama_config(vocab, args.hidden, args.layers), lora_r=4, device=str(device))
    agent = ETPOAgent.from_policy(policy, cfg)
    buffer = make_buffer(vocab, args.actions, args.prompt_tokens, args.new_tokens, seed=vocab)
    nbuf = naive_buffer(agent, buffer)
    ours_bytes = buffer.bytes_per_token()
    naive_bytes = sum(sum(np.asarray(v).nbytes for v in b.values()) for b in nbuf) / buffer.token_count()
    rng, settings = random.Random(0), cfg.update_settings(policy.pad_id)
    ours_s, ours_mb = timed(lambda: etpo_update(agent.models, buffer, settings, agent.policy_opt, agent.critic_opt,
                                                rng, device=device), args.repeats, device)
    naive_s, naive_mb = timed(lambda: naive_update(agent, nbuf, cfg.beta, cfg.gamma), args.repeats, device)
    line = (f"{vocab:>6} | {ours_bytes:>10.1f} {naive_bytes:>12.0f} {naive_bytes / ours_bytes:>7.0f}x | "
            f"{ours_s:>10.3f} {naive_s:>11.3f} {naive_s / ours_s:>5.2f}x")
    if device.type == "cuda":
        line += f" | {ours_mb:>8.0f}  {naive_mb:>9.0f}"
    return line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens per action")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--actions", type=int, default=4, help="actions (env steps) in the rollout batch")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 keeps timings stable on a "
                                                                  "shared machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    header = (f"{'V':>6} | {'ours B/tok':>10} {'naive B/tok':>12} {'ratio':>8} | {'ours upd s':>10} "
              f"{'naive upd s':>11} {'ratio':>6}" + (" | ours MiB  naive MiB" if device.type == "cuda" else ""))
    print(f"ETPO buffer and update: {args.actions} actions x {args.new_tokens} new tokens, prompt "
          f"{args.prompt_tokens}, Llama-shaped model hidden={args.hidden} layers={args.layers}, device={device}, "
          f"threads={torch.get_num_threads()}")
    print(header)
    print("-" * len(header))
    for vocab in args.vocab:
        print(measure(vocab, args, device), flush=True)
    print("B/tok: buffer bytes per generated token (ids, log-probs, prompts amortised; naive adds 3 float32 "
          "vocabulary vectors). upd s: median wall time of one update (ours includes its target pass). "
          "ratio = naive / ours.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
