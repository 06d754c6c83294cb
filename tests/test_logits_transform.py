"""The policy scores tokens with the model's own logits: the output layer *and* the model's final transform
(Gemma-2's tanh softcap, Cohere's logit scale, Granite's logit scaling), so what the learners train is the
distribution generation samples from. Tiny random models built from configs: nothing is downloaded."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from agents.lm import GenerationSettings, LMPolicy, default_lora_config

TOKENIZER = SimpleNamespace(pad_token_id=0, eos_token_id=1, decode=lambda ids, **kw: " ".join(map(str, ids)))
SIZES = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=64, initializer_range=0.5)


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    # a cap of 1 on logits of size ~5: the transform is far from the identity (default Gemma-2 uses 30 on ~30)
    return Gemma2ForCausalLM(Gemma2Config(**SIZES, head_dim=8, final_logit_softcapping=1.0,
                                          attn_implementation="eager"))


def _cohere():
    from transformers import CohereConfig, CohereForCausalLM

    return CohereForCausalLM(CohereConfig(**SIZES, logit_scale=0.25))


def _granite():
    from transformers import GraniteConfig, GraniteForCausalLM

    return GraniteForCausalLM(GraniteConfig(**SIZES, logits_scaling=4.0))


MODELS = {"gemma2-softcap": _gemma2, "cohere-logit-scale": _cohere, "granite-logits-scaling": _granite}
IDS = torch.tensor([[5, 9, 2, 33, 17, 40], [7, 7, 3, 12, 60, 1]])


@pytest.fixture(params=sorted(MODELS))
def model(request):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    return MODELS[request.param]().eval()


def test_head_reproduces_the_models_own_logits(model):
    with torch.no_grad():
        direct = model(input_ids=IDS).logits
    pol = LMPolicy(model, TOKENIZER)
    hidden = pol.hidden_states(IDS)
    raw = pol.head(transform=False)(hidden.reshape(-1, hidden.shape[-1])).reshape(direct.shape).detach()
    assert float((raw - direct).abs().max()) > 0.05  # the transform matters for this model
    logits = pol.head()(hidden.reshape(-1, hidden.shape[-1])).reshape(direct.shape)
    torch.testing.assert_close(logits, direct, atol=1e-5, rtol=1e-5)
    # the log-probs the learners train equal log-softmax of the model's logits
    prompt, action = IDS[0, :3].tolist(), IDS[0, 3:].tolist()
    logp = pol.sequence_logprobs([prompt], [action])[0]
    expected = F.log_softmax(direct[0, 2:5].float(), -1).gather(-1, torch.tensor(action)[:, None]).squeeze(-1)
    torch.testing.assert_close(logp, expected, atol=1e-5, rtol=1e-5)
    assert pol.check_head(force=True) < 1e-5


def test_sampling_and_training_log_probs_agree_with_adapters(model):
    """Generation samples from the model's real logits; re-scoring the same ids (the trained path) agrees, for the
    policy adapter and for ρ, and ETPO's token models score π and ρ the same way."""
    from peft import get_peft_model

    from agents.etpo import ETPOConfig, LMTokenModels
    from agents.lm import peft_wrapping

    with peft_wrapping():
        peft_model = get_peft_model(model, default_lora_config(r=2), adapter_name="policy")
    peft_model.add_adapter("critic", default_lora_config(r=2))
    peft_model.set_adapter("policy")
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    pol = LMPolicy(peft_model, TOKENIZER)
    prompts = [IDS[0, :3].tolist(), IDS[1, :4].tolist()]
    gens = pol.generate(prompts, GenerationSettings(max_new_tokens=5, stop_at_eos=False, seed=0))
    rescored = pol.sequence_logprobs(prompts, [g.action_ids for g in gens])
    for g, lp in zip(gens, rescored, strict=True):
        torch.testing.assert_close(lp.detach(), torch.from_numpy(g.logp), atol=1e-5, rtol=1e-5)
    models = LMTokenModels(pol, ETPOConfig())
    full = torch.tensor([prompts[0] + gens[0].action_ids])
    for role, adapter in (("policy", "policy"), ("reference", None)):
        hidden = pol.hidden_states(full, adapter=adapter)[0]
        torch.testing.assert_close(models.head(role, hidden), pol.logits(full, adapter=adapter)[0],
                                   atol=1e-5, rtol=1e-5)


def test_an_unknown_final_transform_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    class Doubled(LlamaForCausalLM):  # a final transform no config field announces
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = 2.0 * out.logits
            return out

    torch.manual_seed(0)
    pol = LMPolicy(Doubled(LlamaConfig(**SIZES)).eval(), TOKENIZER)
    with pytest.raises(ValueError, match="does not reproduce the logits"):
        pol.head()
    with pytest.raises(ValueError, match="does not reproduce the logits"):
        pol.sequence_logprobs([[2, 3]], [[4]])
