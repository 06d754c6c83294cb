"""Peak GPU memory and tokens/s of one ETPO update for model shapes built from a config (no download), and the
critic's training state at those shapes counted on the meta device (no memory allocated; printed with or without a
GPU).

Shapes: "0.5b" (Qwen2.5-0.5B: hidden 896, 24 layers, vocabulary 151,936) and "7b" (Qwen2.5-7B: hidden 3584,
28 layers, vocabulary 152,064); base weights in bf16, LoRA adapters, critic head, EMA target and optimiser state in
fp32, gradient checkpointing on. One update = the target pass (π, ρ, Q_φ̄ forwards) + the gradient pass (π, ρ, Q_φ
forwards, backward, two optimiser steps, EMA) over `--actions` actions of `--new-tokens` tokens after a
`--prompt-tokens` prompt. The critic table gives, per shape and critic kind, its trainable parameters (fp32, with
gradients and AdamW's two moments) plus its EMA target, against the 1 GiB budget. Prints whether the 7B update fits
on one 80 GB GPU. The update needs CUDA; without one it says so after the critic table (status 0).

    .venv/bin/python bench/etpo_gpu.py                          # both shapes
    .venv/bin/python bench/etpo_gpu.py --shapes 7b --actions 8 --new-tokens 256 --prompt-tokens 512
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time

import numpy as np
import torch

SHAPES = {  # transformers config fields by model type (AutoConfig.for_model)
    "0.5b": dict(model_type="qwen2", vocab_size=151_936, hidden_size=896, intermediate_size=4864,
                 num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "7b": dict(model_type="qwen2", vocab_size=152_064, hidden_size=3584, intermediate_size=18_944,
               num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
    # a few-MB shape that runs the same code on CPU (--device cpu): a smoke test of this script, not a figure
    "smoke": dict(model_type="llama", vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
}
CRITICS = ("dueling", "head", "lm_head")
CRITIC_BUDGET_MIB = 1024  # the critic's trainable state plus its target must fit in 1 GiB at the 7B shape
GPU_80GB_MIB = 80 * 1000**3 / 2**20  # an "80 GB" card, in MiB


def buffer_for(vocab: int, actions: int, prompt_tokens: int, new_tokens: int):
    from agents.rollout import RolloutBuffer, Transition

    rng = np.random.default_rng(0)
    buffer = RolloutBuffer()
    for i in range(actions):
        buffer.append(Transition(
            obs_ids=rng.integers(2, vocab, prompt_tokens).astype(np.int32),
            action_ids=rng.integers(2, vocab, new_tokens).astype(np.int32),
            logp=np.zeros(new_tokens, np.float32), ref_logp=np.zeros(new_tokens, np.float32),
            reward=float(rng.uniform(0, 1)), terminated=True, truncated=False, episode_id=i, t=0))
    return buffer


def shape_config(shape: str):
    from transformers import AutoConfig

    fields = dict(SHAPES[shape])
    return AutoConfig.for_model(fields.pop("model_type"), max_position_embeddings=4096, **fields)


def critic_mib_on_meta(shape: str, lora_r: int) -> dict[str, float]:
    """The critic's training state (`critic_state_bytes`) at `shape` for each critic kind, counted on the meta
    device: the model's parameters exist as shapes only, so a 7B count allocates nothing."""
    from agents.etpo import ETPOConfig, LMTokenModels, critic_state_bytes, lm_policy_from_config

    policy = lm_policy_from_config(shape_config(shape), lora_r=lora_r, device="meta", dtype=torch.bfloat16)
    return {critic: critic_state_bytes(LMTokenModels(policy, ETPOConfig(critic=critic, lora_r=lora_r))) / 2**20
            for critic in CRITICS}


def print_critic_table(shapes: list[str], lora_r: int) -> None:
    print(f"critic state (trainable fp32 x4 + EMA target), meta device, LoRA r={lora_r}, budget "
          f"{CRITIC_BUDGET_MIB} MiB:")
    print(f"{'shape':>5} " + " ".join(f"{critic + ' MiB':>14}" for critic in CRITICS))
    for shape in shapes:
        counts = critic_mib_on_meta(shape, lora_r)
        print(f"{shape:>5} " + " ".join(f"{mib:>10.1f} {'ok' if mib <= CRITIC_BUDGET_MIB else 'over':>3}"
                                        for mib in counts.values()), flush=True)


def measure(shape: str, args: argparse.Namespace) -> dict:
    from agents.etpo import ETPOAgent, ETPOConfig, critic_state_bytes, etpo_update, lm_policy_from_config
    from agents.lm import RuntimeSettings

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    hf_config = shape_config(shape)
    policy = lm_policy_from_config(hf_config, lora_r=args.lora_r, device=str(device), dtype=torch.bfloat16)
    policy.set_gradient_checkpointing(True)
    cfg = ETPOConfig(epochs=1, minibatch_size=args.minibatch_size, chunk_size=args.chunk_size, lora_r=args.lora_r,
                     runtime=RuntimeSettings(device=str(device)), critic=args.critic)
    agent = ETPOAgent.from_policy(policy, cfg)
    weights_mib = torch.cuda.memory_allocated(device) / 2**20 if cuda else float("nan")
    buffer = buffer_for(hf_config.vocab_size, args.actions, args.prompt_tokens, args.new_tokens)
    settings = cfg.update_settings(policy.pad_id)
    rng = random.Random(0)
    etpo_update(agent.models, buffer, settings, agent.policy_opt, agent.critic_opt, rng, device=device)  # warm-up
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        etpo_update(agent.models, buffer, settings, agent.policy_opt, agent.critic_opt, rng, device=device)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else float("nan")
    n_params = sum(p.numel() for p in policy.model.parameters())
    result = {"shape": shape, "params_b": n_params / 1e9, "weights_mib": weights_mib, "peak_mib": peak,
              "critic_mib": critic_state_bytes(agent.models) / 2**20,
              "update_s": float(np.median(times)), "tokens": buffer.token_count()}
    result["tokens_per_s"] = result["tokens"] / result["update_s"]
    del agent, policy
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["0.5b", "7b"], choices=sorted(SHAPES))
    parser.add_argument("--actions", type=int, default=8, help="actions (env steps) in the rollout batch")
    parser.add_argument("--minibatch-size", type=int, default=4, help="actions per optimiser step")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, default=256, help="token states per vocabulary chunk")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--critic", default="dueling", choices=CRITICS)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda", help="cuda (the figures) or cpu (only with --shapes smoke)")
    parser.add_argument("--critic-table", default="auto", choices=["auto", "on", "off", "only"],
                        help="print the meta-device critic table (auto: for every shape but smoke; only: then stop)")
    args = parser.parse_args(argv)
    counted = {"auto": [s for s in args.shapes if s != "smoke"], "off": []}.get(args.critic_table, args.shapes)
    if counted:
        print_critic_table(counted, args.lora_r)
    if args.critic_table == "only":
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("etpo_gpu: no CUDA device here; the update needs a GPU (run it on a GPU machine).")
        return 0
    if args.device == "cpu":
        name, total_mib = "cpu", float("nan")
    else:
        name = torch.cuda.get_device_name(0)
        total_mib = torch.cuda.get_device_properties(0).total_memory / 2**20
    print(f"ETPO update on {name} ({total_mib:.0f} MiB): {args.actions} actions x {args.new_tokens} new tokens after "
          f"{args.prompt_tokens} prompt tokens, minibatch {args.minibatch_size}, chunk {args.chunk_size}, "
          f"LoRA r={args.lora_r}, critic={args.critic}, bf16 base, gradient checkpointing")
    print(f"{'shape':>5} {'params':>8} {'weights MiB':>12} {'peak MiB':>10} {'critic MiB':>11} {'update s':>9} "
          f"{'tokens/s':>9}")
    for shape in args.shapes:
        try:
            r = measure(shape, args)
        except torch.cuda.OutOfMemoryError as exc:
            print(f"{shape:>5} out of memory: {str(exc).splitlines()[0]}")
            gc.collect()
            torch.cuda.empty_cache()
            continue
        print(f"{r['shape']:>5} {r['params_b']:>7.2f}B {r['weights_mib']:>12.0f} {r['peak_mib']:>10.0f} "
              f"{r['critic_mib']:>11.1f} {r['update_s']:>9.2f} {r['tokens_per_s']:>9.0f}", flush=True)
        if shape == "7b":
            verdict = "fits" if r["peak_mib"] < GPU_80GB_MIB else "does NOT fit"
            print(f"7B: one ETPO update peaks at {r['peak_mib'] / 1024:.1f} GiB -> {verdict} on one 80 GB GPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
