"""LMPolicy: log-probs against a direct forward pass, the reference switch, generation, chunked reductions."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import agents.lm as P
from agents.lm import GenerationSettings, LMPolicy, decoding, default_lora_config
from agents.lm import policy as policy_module


def _perturb_adapter(pol: LMPolicy, name: str, seed: int = 0) -> None:
    """LoRA starts as an exact no-op (B = 0); give adapter `name` random weights so it changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in pol.model.named_parameters():
            if f".{name}." in pname:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.fixture()
def fresh_policy(tiny_model_dir):
    pol = LMPolicy.from_pretrained(tiny_model_dir, adapters={"policy": default_lora_config(r=4)})
    _perturb_adapter(pol, "policy")
    return pol


PROMPTS = ["The dataset has 120 rows and 7 features.\n\ndef build_model(X, y):", "Task:\ndef build_model(X, y):"]


def test_sequence_logprobs_match_a_direct_forward_pass(fresh_policy):
    pol = fresh_policy
    prompts = [pol.encode(t) for t in PROMPTS]
    actions = [pol.encode("\n    return None"), pol.encode("\n    from sklearn import tree")]
    for adapter in ("policy", None):
        got = pol.sequence_logprobs(prompts, actions, adapter=adapter)
        for p, a, lp in zip(prompts, actions, got):
            ids = torch.tensor([p + a])
            logits = pol.logits(ids, adapter=adapter)[0]
            direct = F.log_softmax(logits.float(), -1)[len(p) - 1: len(p) + len(a) - 1].gather(
                -1, torch.tensor(a)[:, None]).squeeze(-1)
            torch.testing.assert_close(lp, direct, atol=1e-5, rtol=1e-5)
    padded, mask = pol.sequence_logprobs(prompts, actions, padded=True)
    assert mask.sum(1).tolist() == [len(a) for a in actions]
    assert float(padded[~mask].detach().abs().sum()) == 0.0


def test_reference_is_the_base_model_with_adapters_disabled(tiny_model_dir, fresh_policy):
    pol = fresh_policy
    base = LMPolicy.from_pretrained(tiny_model_dir)  # no adapters at all
    ids = torch.tensor([pol.encode(PROMPTS[0])])
    ref_logits = pol.logits(ids, adapter=None)
    torch.testing.assert_close(ref_logits, base.logits(ids))
    assert not torch.allclose(pol.logits(ids, adapter="policy"), ref_logits, atol=1e-3)
    # after reading ρ the policy adapter is active again and still trainable
    assert pol.model.active_adapter == "policy"
    assert pol.trainable_parameters("policy") and all(p.requires_grad for p in pol.trainable_parameters("policy"))


def test_frozen_reference_adapter_switch(tiny_model_dir, fresh_policy, tmp_path):
    """Training from an SFT adapter: the same saved adapter is loaded as a frozen reference and a trainable policy."""
    fresh_policy.save(tmp_path / "sft")
    sft_dir = tmp_path / "sft" / "policy"
    pol = LMPolicy.from_pretrained(tiny_model_dir, adapters={"reference": str(sft_dir), "policy": str(sft_dir)},
                                   reference="adapter:reference")
    prompts, actions = [pol.encode(PROMPTS[0])], [pol.encode("\n    return None")]
    before_ref = pol.sequence_logprobs(prompts, actions, adapter=None)[0].detach()
    torch.testing.assert_close(pol.sequence_logprobs(prompts, actions, "policy")[0].detach(), before_ref)
    base = LMPolicy.from_pretrained(tiny_model_dir)
    assert not torch.allclose(base.sequence_logprobs(prompts, actions)[0], before_ref, atol=1e-3)

    ref_params = [p for n, p in pol.model.named_parameters() if ".reference." in n]
    assert ref_params and not any(p.requires_grad for p in ref_params)
    trainable = pol.trainable_parameters()
    assert trainable and all(".policy." in n for n, p in pol.model.named_parameters() if p.requires_grad)
    opt = torch.optim.SGD(trainable, lr=1e-4)  # small: gradients are large here (|g|² ~ 1e3); no overshoot
    loss = -pol.sequence_logprobs(prompts, actions, "policy")[0].sum()
    loss.backward()
    opt.step()
    after_policy = pol.sequence_logprobs(prompts, actions, "policy")[0].detach()
    torch.testing.assert_close(pol.sequence_logprobs(prompts, actions, adapter=None)[0].detach(), before_ref)
    assert after_policy.sum() > before_ref.sum()  # the step raised the policy's log-likelihood only
    with pytest.raises(ValueError, match="not loaded"):
        LMPolicy(pol.model, pol.tokenizer, reference="adapter:nope")


def test_a_reference_pass_leaves_every_trainable_adapter_trainable(tiny_model_dir):
    pol = LMPolicy.from_pretrained(tiny_model_dir, adapters={"policy": default_lora_config(r=4),
                                                             "critic": default_lora_config(r=4)})
    _perturb_adapter(pol, "critic")
    ids = [pol.encode(PROMPTS[1])]
    critic_logp = pol.sequence_logprobs(ids, [pol.encode(" return")], adapter="critic")[0]  # graph into the critic
    with torch.no_grad():
        pol.sequence_logprobs(ids, [pol.encode(" return")], adapter=None)  # ρ: adapters disabled, then re-enabled
    assert all(p.requires_grad for p in pol.trainable_parameters())
    critic_logp.sum().backward()  # the critic's graph still reaches its parameters
    assert all(p.grad is not None for p in pol.trainable_parameters("critic"))


def test_copy_reference_for_full_fine_tuning(tiny_model_dir):
    pol = LMPolicy.from_pretrained(tiny_model_dir, reference="copy")
    ids = torch.tensor([pol.encode(PROMPTS[1])])
    with torch.no_grad():
        for p in pol.model.parameters():
            p.mul_(1.1)
    assert not torch.allclose(pol.logits(ids), pol.logits(ids, adapter=None), atol=1e-4)
    assert all(p.requires_grad for p in pol.trainable_parameters())


def test_generation_keeps_ids_logprobs_and_honours_settings(fresh_policy):
    pol = fresh_policy
    prompts = [pol.encode(t) for t in PROMPTS]  # different lengths: exercises left padding
    gen = GenerationSettings(max_new_tokens=12, temperature=1.0, seed=123)
    first, second = pol.generate(prompts, gen), pol.generate(prompts, gen)
    twin = LMPolicy(pol.model, pol.tokenizer)  # same weights, fresh sampling streams
    assert [g.action_ids for g in twin.generate(prompts, gen)] == [g.action_ids for g in first]  # seeded
    assert [g.action_ids for g in twin.generate(prompts, gen)] == [g.action_ids for g in second]  # stream goes on
    assert [g.action_ids for g in first] != [g.action_ids for g in second]  # a repeated prompt gets new samples
    for g in first:
        assert 1 <= len(g.action_ids) <= 12 and g.logp.dtype.name == "float32" and len(g.logp) == len(g.action_ids)
        assert g.text == pol.decode(g.action_ids)
    # log-probs recorded while sampling (KV cache, left padding) equal a fresh re-scoring of the same ids
    rescored = pol.sequence_logprobs(prompts, [g.action_ids for g in first])
    for g, lp in zip(first, rescored):
        torch.testing.assert_close(lp.detach(), torch.from_numpy(g.logp), atol=1e-4, rtol=1e-4)
    greedy = pol.generate(prompts, GenerationSettings(max_new_tokens=8, temperature=0))
    assert greedy[0].action_ids == pol.generate(prompts[:1], GenerationSettings(max_new_tokens=8, temperature=0))[
        0].action_ids  # padding does not change a row's result
    top1 = pol.generate(prompts, GenerationSettings(max_new_tokens=8, top_k=1, seed=5))
    assert [g.action_ids for g in top1] == [g.action_ids for g in greedy]


def test_generation_stops_at_a_stop_string(fresh_policy):
    pol = fresh_policy
    prompt = pol.encode(PROMPTS[0])
    free = pol.generate([prompt], GenerationSettings(max_new_tokens=30, temperature=0, stop_at_eos=False))[0]
    assert len(free.text) > 3
    stop = free.text[2:4]  # a string greedy decoding is certain to produce
    stopped = pol.generate([prompt], GenerationSettings(max_new_tokens=30, temperature=0, stop=(stop,),
                                                        stop_at_eos=False))[0]
    assert stopped.finish_reason == "stop" and stop in stopped.text
    assert stop not in pol.decode(stopped.action_ids[:-1])  # the action ends at the token completing it
    assert free.action_ids[: len(stopped.action_ids)] == stopped.action_ids


def test_generation_ends_at_any_id_of_the_models_generation_config_eos_list(fresh_policy):
    pol = fresh_policy
    prompt = pol.encode(PROMPTS[0])
    free = pol.generate([prompt], GenerationSettings(max_new_tokens=30, temperature=0, stop_at_eos=False))[0]
    position = next(i for i, t in enumerate(free.action_ids) if i >= 2 and t not in free.action_ids[:i])
    ender = free.action_ids[position]  # greedy decoding reaches this id first at `position`
    config = pol.hf_model.generation_config
    saved = config.eos_token_id
    config.eos_token_id = [pol.tokenizer.eos_token_id, ender]
    try:
        assert ender in pol.eos_ids()
        ended = pol.generate([prompt], GenerationSettings(max_new_tokens=30, temperature=0))[0]
    finally:
        config.eos_token_id = saved
    assert ended.finish_reason == "eos"
    assert ended.action_ids == free.action_ids[: position + 1]  # the EOS id is kept, nothing after it
    assert ender not in pol.eos_ids()


def test_weights_dtype_is_the_frozen_floating_weights_not_packed_ones_or_the_fp32_adapters(tiny_model_dir):
    pol = LMPolicy.from_pretrained(tiny_model_dir, adapters={"policy": default_lora_config(r=4)})
    assert pol.weights_dtype == torch.float32
    with torch.no_grad():
        for p in pol.hf_model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
        embedding = pol.hf_model.get_input_embeddings()
        embedding.weight = torch.nn.Parameter(torch.zeros_like(embedding.weight, dtype=torch.uint8),
                                              requires_grad=False)  # as a quantised base's packed weights
    assert next(pol.hf_model.parameters()).dtype == torch.uint8
    assert pol.weights_dtype == torch.bfloat16  # the compute dtype, what an export of the merged model uses


def _lora_runs(pol: LMPolicy) -> list[int]:
    """Count forward calls of every `lora_A` module of the policy adapter (they run only when it is unmerged)."""
    calls = [0]
    for name, module in pol.model.named_modules():
        if name.endswith("lora_A.policy"):
            module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_merged_generation_records_the_training_forwards_logprobs_and_restores_the_base_exactly(fresh_policy):
    pol = fresh_policy
    prompts = [pol.encode(t) for t in PROMPTS]
    gen = GenerationSettings(max_new_tokens=12, stop_at_eos=False)
    weights = {k: v.clone() for k, v in pol.model.state_dict().items()}
    calls = _lora_runs(pol)
    results = {}
    for merge in (False, True):
        pol.merge_for_generation = merge
        calls[0] = 0
        results[merge] = pol.generate(prompts, gen, generator=torch.Generator().manual_seed(7))
        assert (calls[0] > 0) == (not merge)  # merged: the decode steps never run the adapter's own layers
    assert all(torch.equal(v, weights[k]) for k, v in pol.model.state_dict().items())  # bit for bit
    assert not any(v.is_inference() for v in pol.model.state_dict().values())  # still usable by autograd
    assert [g.action_ids for g in results[True]] == [g.action_ids for g in results[False]]
    rescored = pol.sequence_logprobs(prompts, [g.action_ids for g in results[True]])  # the update's forward
    for merged, unmerged, lp in zip(results[True], results[False], rescored):
        torch.testing.assert_close(torch.from_numpy(merged.logp), lp.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.from_numpy(merged.logp), torch.from_numpy(unmerged.logp), atol=1e-5,
                                   rtol=1e-5)
    # ρ is still the base: the reference scores are those of a policy that never merged
    twin = LMPolicy.from_pretrained(pol.name_or_path, adapters={"policy": default_lora_config(r=4)})
    ids = [g.action_ids for g in results[True]]
    assert all(torch.equal(a, b) for a, b in zip(pol.sequence_logprobs(prompts, ids, adapter=None),
                                                 twin.sequence_logprobs(prompts, ids, adapter=None)))


def test_identical_prompts_share_one_prefill_and_still_sample_independently(fresh_policy):
    pol = fresh_policy
    first, second = (pol.encode(t) for t in PROMPTS)
    prompts = [first, second, first, first]
    rows = []
    hook = pol.hf_model.get_input_embeddings().register_forward_pre_hook(lambda m, args: rows.append(len(args[0])))
    try:
        gens = pol.generate(prompts, GenerationSettings(max_new_tokens=10, stop_at_eos=False, seed=11))
    finally:
        hook.remove()
    assert rows[0] == 2 and set(rows[1:]) == {4}  # the prompts' pass ran the two distinct prompts; decoding all rows
    rescored = pol.sequence_logprobs(prompts, [g.action_ids for g in gens])
    for g, lp in zip(gens, rescored):
        torch.testing.assert_close(torch.from_numpy(g.logp), lp.detach(), atol=1e-5, rtol=1e-5)
    assert len({tuple(g.action_ids) for g in (gens[0], gens[2], gens[3])}) > 1  # each row draws its own tokens


def _caches_seen(pol: LMPolicy, fn):
    """Per decode step of `fn()`: the KV cache's type, its first layer's key storage and batch rows, and the
    positions attention reads after the step writes its own."""
    seen = []

    def hook(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if kwargs["input_ids"].shape[1] == 1 and cache is not None:
            keys = cache.layers[0].keys
            seen.append((type(cache).__name__, keys.untyped_storage().data_ptr(), len(kwargs["input_ids"]),
                         cache.get_mask_sizes(1, 0)[0]))

    handle = pol.hf_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        result = fn()
    finally:
        handle.remove()
    return seen, result


def test_decoding_writes_into_one_preallocated_cache_and_attends_to_the_filled_part(fresh_policy, monkeypatch):
    """Each decode step writes its keys and values in place into a cache sized for prompt + max_new_tokens (the
    default cache copied all of it at every step) and attention reads only the positions written so far
    (transformers' StaticCache hands it all of them); the sampled tokens are still scored as the training forward
    scores them. Models with other layer kinds take a StaticCache, or their default cache."""
    pol = fresh_policy
    prompts = [pol.encode(t) for t in PROMPTS]
    width = max(len(p) for p in prompts)
    gen = GenerationSettings(max_new_tokens=12, stop_at_eos=False)
    sample = lambda: pol.generate(prompts, gen, generator=torch.Generator().manual_seed(5))  # noqa: E731
    seen, gens = _caches_seen(pol, sample)
    assert len(seen) == 11 and {kind for kind, *_ in seen} == {"Cache"}
    assert len({ptr for _, ptr, *_ in seen}) == 1  # one storage for every step: nothing reallocated or copied
    assert [read for *_, read in seen] == [width + 1 + k for k in range(11)]  # the prompt and the tokens so far
    rescored = pol.sequence_logprobs(prompts, [g.action_ids for g in gens])
    for g, lp in zip(gens, rescored):
        torch.testing.assert_close(torch.from_numpy(g.logp), lp.detach(), atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(decoding, "full_attention_only", lambda config: False)
    for fallback_kind in ("StaticCache", "DynamicCache"):
        seen, fallback = _caches_seen(pol, sample)
        assert {kind for kind, *_ in seen} == {fallback_kind}
        for a, b in zip(gens, fallback):
            assert a.action_ids == b.action_ids
            torch.testing.assert_close(torch.from_numpy(a.logp), torch.from_numpy(b.logp), atol=1e-5, rtol=1e-5)
        monkeypatch.setattr(type(pol.hf_model), "_can_compile_fullgraph", False)


def test_finished_rows_leave_the_decode_batch_without_changing_any_row(fresh_policy, monkeypatch):
    """Rows that ended (EOS or a stop string) stop being decoded once they are a quarter of the batch; every row's
    tokens and log-probs are those of decoding the whole batch to the end (each row draws its own uniforms)."""
    pol = fresh_policy
    prompts = [pol.encode(t) for t in PROMPTS] * 4
    gen = GenerationSettings(max_new_tokens=24, stop_at_eos=False, seed=3)
    texts = [g.text for g in pol.generate(prompts, gen)]
    stops = tuple(dict.fromkeys(t[3:5] for t in texts if t[3:5].isprintable() and len(t[3:5]) == 2))[:3]
    gen = GenerationSettings(max_new_tokens=24, stop_at_eos=False, stop=stops, seed=3)  # those rows end early
    runs = {}
    for compact in (decoding.COMPACT_FRACTION, 2.0):  # 2.0: never (the call ends when all rows are done)
        monkeypatch.setattr(decoding, "COMPACT_FRACTION", compact)
        pol._streams.clear()
        runs[compact] = _caches_seen(pol, lambda: pol.generate(prompts, gen))
    (seen, gens), (seen_whole, gens_whole) = runs.values()
    assert {rows for _, _, rows, _ in seen_whole} == {len(prompts)}
    rows = [r for _, _, r, _ in seen]
    assert rows == sorted(rows, reverse=True) and rows[-1] < len(prompts)  # the batch shrank as rows finished
    assert sum(g.finish_reason != "length" for g in gens) >= len(prompts) // 4
    for a, b in zip(gens, gens_whole):
        assert (a.action_ids, a.finish_reason) == (b.action_ids, b.finish_reason)
        torch.testing.assert_close(torch.from_numpy(a.logp), torch.from_numpy(b.logp), atol=1e-5, rtol=1e-5)


def test_a_bfloat16_base_never_merges_the_adapter(tiny_model_dir):
    pol = LMPolicy.from_pretrained(tiny_model_dir, adapters={"policy": default_lora_config(r=4)},
                                   dtype=torch.bfloat16)
    _perturb_adapter(pol, "policy")
    calls = _lora_runs(pol)
    pol.generate([pol.encode(PROMPTS[0])], GenerationSettings(max_new_tokens=4, seed=0))
    assert pol.merge_for_generation and calls[0] > 0


def test_inverse_cdf_sampling_draws_the_categorical_distribution():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3, 0.0]]).expand(40_000, -1).contiguous()
    draws = P.inverse_cdf_sample(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    # 4 standard errors of a frequency of 40k draws is at most 0.01
    torch.testing.assert_close(freq, probs[0], atol=0.01, rtol=0)
    assert freq[1] == 0 and freq[4] == 0  # zero mass (a top-k/top-p cut) is never drawn


def test_inverse_cdf_sampling_at_u_equal_to_the_total_mass_takes_the_last_possible_token(monkeypatch):
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    monkeypatch.setattr(torch, "rand", lambda shape, **k: torch.ones(shape, dtype=k.get("dtype")))  # u·total = total
    assert P.inverse_cdf_sample(probs).tolist() == [1, 3]


def test_hidden_states_come_from_the_decoder_alone(fresh_policy, monkeypatch):
    pol = fresh_policy
    ids, mask = P.pad_sequences([pol.encode(t) for t in PROMPTS], pol.pad_id, "right")
    with torch.no_grad():
        every_layer = {a: pol._forward(ids, mask, a, output_hidden_states=True).hidden_states for a in ("policy", None)}

    def refuse(*args, **kwargs):
        raise AssertionError("the output layer's model ran: T×V logits or every layer's states were made")

    monkeypatch.setattr(type(pol.hf_model), "forward", refuse)
    for adapter, states in every_layer.items():
        torch.testing.assert_close(pol.hidden_states(ids, mask, adapter), states[-1], atol=1e-6, rtol=1e-6)


def test_prompt_truncation_and_empty_prompt(fresh_policy):
    pol = fresh_policy
    gen = GenerationSettings(max_new_tokens=100)
    long_ids = pol.encode("x = 1\n" * 2000, max_length=pol.max_prompt_tokens(gen))
    assert len(long_ids) == pol.context_length - 100
    with pytest.raises(ValueError, match="empty prompt"):
        pol.generate([[]], gen)
    with pytest.raises(ValueError, match="no room"):
        pol.generate([[1] * pol.context_length], gen)


def test_trainable_parameters_are_fp32_on_a_bf16_base(tiny_model_dir):
    pol = LMPolicy.from_pretrained(tiny_model_dir, adapters={"policy": default_lora_config(r=4)},
                                   dtype=torch.bfloat16)
    trainable = pol.trainable_parameters()
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    frozen = [p for p in pol.model.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    lp = pol.sequence_logprobs([pol.encode(PROMPTS[0])], [pol.encode(" return")])[0]
    assert torch.isfinite(lp).all() and lp.dtype == torch.float32


def test_gradient_checkpointing_switch_gives_the_same_gradients(tiny_model_dir):
    grads = []
    for enabled in (False, True):
        torch.manual_seed(0)  # LoRA A matrices are randomly initialised
        pol = LMPolicy.from_pretrained(tiny_model_dir, adapters={"policy": default_lora_config(r=4)},
                                       gradient_checkpointing=enabled)
        _perturb_adapter(pol, "policy")
        pol.model.train()
        assert pol.gradient_checkpointing == enabled
        loss = -pol.sequence_logprobs([pol.encode(PROMPTS[0])], [pol.encode("\n    return X")])[0].sum()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in pol.trainable_parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def _full_sequence_states(pol: LMPolicy, prompts, actions) -> torch.Tensor:
    """What `action_states` must equal: each pair run as one whole sequence, the action token states gathered."""
    ids, mask = P.pad_sequences([list(p) + list(a) for p, a in zip(prompts, actions)], pol.pad_id, "right")
    hidden = pol.hidden_states(ids, mask, "policy")
    return torch.cat([hidden[b, len(p) - 1: len(p) - 1 + max(len(a), 1)]
                      for b, (p, a) in enumerate(zip(prompts, actions))])


def test_a_shared_prompt_runs_once_with_the_states_and_gradients_of_whole_sequences(tiny_model_dir):
    """Three pairs share a prompt (one with an empty action), one has its own: the shared prompt's tokens enter the
    model once; states and adapter gradients equal those of the four whole sequences, with activation
    checkpointing off and on (and the two runs are bit-identical)."""
    results = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        pol = LMPolicy.from_pretrained(tiny_model_dir, adapters={"policy": default_lora_config(r=4)},
                                       gradient_checkpointing=checkpointing)
        _perturb_adapter(pol, "policy")
        pol.train_without_dropout()
        shared, own = pol.encode(PROMPTS[0]), pol.encode(PROMPTS[1])
        prompts = [shared, own, shared, shared]
        actions = [pol.encode("\n    return X"), pol.encode(" y"), [], pol.encode("\n    a = 1\n    return a")]
        params = pol.trainable_parameters("policy")
        tokens: list[int] = []
        hook = pol.hf_model.get_input_embeddings().register_forward_hook(
            lambda m, a, out, seen=tokens: seen.append(a[0].numel()))
        try:
            states = pol.action_states(prompts, actions, "policy")
        finally:
            hook.remove()
        grads = torch.autograd.grad((states * torch.linspace(-1, 1, states.shape[-1])).sum(), params)
        expected = _full_sequence_states(pol, prompts, actions)
        expected_grads = torch.autograd.grad((expected * torch.linspace(-1, 1, states.shape[-1])).sum(), params)
        assert states.shape == expected.shape == (sum(max(len(a), 1) for a in actions), pol.hf_model.config.hidden_size)
        torch.testing.assert_close(states, expected, atol=2e-5, rtol=1e-5)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)  # float32 sums in another order
        # the pair with its own prompt ran whole; the shared prompt once, then the three actions (each but its last
        # token) padded to the longest
        longest = max(len(a) for a in actions) - 1
        assert sorted(tokens) == sorted([len(own) + len(actions[1]), len(shared), 3 * longest])
        results[checkpointing] = (states.detach(), grads)
    assert torch.equal(results[False][0], results[True][0])
    assert all(torch.equal(a, b) for a, b in zip(results[False][1], results[True][1]))


def test_save_and_load_round_trip(fresh_policy, tmp_path):
    fresh_policy.save(tmp_path / "saved")
    loaded = LMPolicy.load(tmp_path / "saved")
    ids = torch.tensor([fresh_policy.encode(PROMPTS[0])])
    torch.testing.assert_close(loaded.logits(ids), fresh_policy.logits(ids))
    torch.testing.assert_close(loaded.logits(ids, adapter=None), fresh_policy.logits(ids, adapter=None))


# ---- chunked whole-vocabulary reductions -----------------------------------------------------------------------
class RecordingHead(torch.nn.Module):
    """A linear output head that records the largest logits block it ever produced."""

    def __init__(self, hidden: int, vocab: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(vocab, hidden, generator=g) / hidden ** 0.5)
        self.max_rows = 0

    def forward(self, h):
        self.max_rows = max(self.max_rows, h.shape[0])
        return h @ self.weight.T


def test_chunked_reductions_equal_the_unchunked_computation_values_and_gradients():
    torch.manual_seed(0)
    n, hidden, vocab, chunk = 37, 16, 101, 8
    head_p, head_q = RecordingHead(hidden, vocab, 1), RecordingHead(hidden, vocab, 2)
    hp = torch.randn(n, hidden, requires_grad=True)
    hq = torch.randn(n, hidden)
    targets = torch.randint(0, vocab, (n,))

    lp, lq = F.log_softmax(head_p(hp), -1), F.log_softmax(head_q(hq), -1)
    q_values = head_q(hq)
    full = {
        "logprob": lp.gather(-1, targets[:, None]).squeeze(-1),
        "entropy": -(lp.exp() * lp).sum(-1),
        "kl": (lp.exp() * (lp - lq)).sum(-1),
        "expectation": (lp.exp() * q_values).sum(-1),
        "logsumexp": 0.5 * torch.logsumexp(head_p(hp) / 0.5, -1),
    }
    head_p.max_rows = head_q.max_rows = 0
    chunked = {
        "logprob": P.token_logprobs(hp, targets, head_p, chunk),
        "entropy": P.entropy(hp, head_p, chunk),
        "kl": P.kl_divergence(hp, hq, head_p, head_q, chunk),
        "expectation": P.expectation(hp, head_p, hq, head_q, chunk),
        "logsumexp": P.logsumexp(hp, head_p, scale=0.5, chunk_size=chunk),
    }
    for key in full:
        torch.testing.assert_close(chunked[key], full[key], atol=1e-5, rtol=1e-5, msg=key)
        g_full = torch.autograd.grad(full[key].sum(), [hp, head_p.weight], retain_graph=True)
        head_p.max_rows = head_q.max_rows = 0
        g_chunk = torch.autograd.grad(chunked[key].sum(), [hp, head_p.weight], retain_graph=True)
        for a, b in zip(g_full, g_chunk):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=key)
        # backward recomputes chunk by chunk too: never more than `chunk` rows of V logits at once
        assert head_p.max_rows <= chunk and head_q.max_rows <= chunk, key
    assert float(full["kl"].detach().min()) >= -1e-6
    assert float(P.kl_divergence(hp, hp, head_p).detach().abs().max()) < 1e-5


def test_known_values_of_the_reductions():
    # A head that returns fixed logits: uniform over 4 tokens -> entropy log 4, KL to itself 0.
    uniform = lambda h: torch.zeros(h.shape[0], 4)  # noqa: E731
    peaked = lambda h: torch.tensor([[0.0, 0.0, 0.0, 10.0]]).expand(h.shape[0], 4)  # noqa: E731
    h = torch.zeros(3, 2)
    torch.testing.assert_close(P.entropy(h, uniform, 2), torch.full((3,), float(torch.log(torch.tensor(4.0)))))
    # KL(uniform || peaked) = log 4... computed by hand: Σ 1/4 (log 1/4 − log q(a))
    logq = F.log_softmax(torch.tensor([0.0, 0.0, 0.0, 10.0]), -1)
    expected = float((0.25 * (torch.log(torch.tensor(0.25)) - logq)).sum())
    torch.testing.assert_close(P.kl_divergence(h, h, uniform, peaked, 2), torch.full((3,), expected))
    values = lambda h: torch.tensor([[1.0, 2.0, 3.0, 4.0]]).expand(h.shape[0], 4)  # noqa: E731
    torch.testing.assert_close(P.expectation(h, uniform, h, values, 2), torch.full((3,), 2.5))


def test_policy_chunked_kl_over_real_model_states(fresh_policy):
    pol = fresh_policy
    prompts, actions = [pol.encode(PROMPTS[0])], [pol.encode("\n    return None")]
    h_pi, _, m = pol.action_hidden(prompts, actions, "policy")
    h_ref, _, _ = pol.action_hidden(prompts, actions, None)
    kl = P.kl_divergence(h_pi[m], h_ref[m], pol.head("policy"), pol.head(None), chunk_size=3)
    ids = torch.tensor([prompts[0] + actions[0]])
    sl = slice(len(prompts[0]) - 1, len(prompts[0]) + len(actions[0]) - 1)
    lp = F.log_softmax(pol.logits(ids, adapter="policy")[0, sl], -1)
    lr = F.log_softmax(pol.logits(ids, adapter=None)[0, sl], -1)
    torch.testing.assert_close(kl, (lp.exp() * (lp - lr)).sum(-1), atol=1e-5, rtol=1e-4)
    assert float(kl.detach().min()) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_generation_and_logprobs(tiny_model_dir):
    pol = LMPolicy.from_pretrained(tiny_model_dir, adapters={"policy": default_lora_config(r=4)}, device="cuda")
    prompts = [pol.encode(t) for t in PROMPTS]
    gens = pol.generate(prompts, GenerationSettings(max_new_tokens=10, seed=0))
    lps = pol.sequence_logprobs(prompts, [g.action_ids for g in gens])
    assert all(lp.device.type == "cuda" for lp in lps)
    for g, lp in zip(gens, lps):
        torch.testing.assert_close(lp.detach().cpu(), torch.from_numpy(g.logp), atol=1e-3, rtol=1e-3)


def test_small_local_model_loads_without_a_progress_bar(tiny_model_dir, capfd):
    """A benchmark loads the tiny model once per cell: no "Loading weights" bar each time, and transformers' bars
    stay enabled for everything else."""
    from transformers.utils import logging as hf_logging

    LMPolicy.from_pretrained(tiny_model_dir)
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()


def test_a_model_that_drops_the_shared_prompts_cache_falls_back_to_whole_sequences(tiny_model_dir, monkeypatch):
    """Were a model (or a transformers version) to drop the cache argument — as transformers does under
    checkpointing unless a layer is marked safe — the actions would be run without their prompt. `action_states`
    notices that no layer read the cache and gives the whole-sequence states instead, from then on."""
    torch.manual_seed(0)
    pol = LMPolicy.from_pretrained(tiny_model_dir, adapters={"policy": default_lora_config(r=4)},
                                   gradient_checkpointing=True)
    _perturb_adapter(pol, "policy")
    pol.train_without_dropout()
    monkeypatch.setattr(policy_module, "cache_kept_under_checkpointing", lambda decoder: contextlib.nullcontext())
    shared = pol.encode(PROMPTS[0])
    prompts, actions = [shared, shared], [pol.encode("\n    return X"), pol.encode("\n    a = 1")]
    states = pol.action_states(prompts, actions, "policy")
    torch.testing.assert_close(states, _full_sequence_states(pol, prompts, actions), atol=2e-5, rtol=1e-5)
    assert not pol._can_share_prompts()
