"""Every family people commonly run decodes exactly as transformers' own greedy ``generate``; the rest is refused.

Tiny random-weight configs (``conftest.tiny_config``): sliding windows of 8 tokens, shorter than prompt plus
output, and hybrid families mixing sliding and full layers. Each method runs single and batched; ``lookahead``
runs its Jacobi window in every forward (a flat cost curve makes it free).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import transformers as tf

import retrieval_spec.families as families
from conftest import StubTokenizer, plain_greedy, tiny_model
from retrieval_spec.drafters.lookahead import LookaheadDrafter
from retrieval_spec.drafters.registry import make_drafters
from retrieval_spec.errors import UnsupportedModelError
from retrieval_spec.config import GenerationConfig
from retrieval_spec.generate import SpeculativeGenerator
from retrieval_spec.sizing import CostCurve
from retrieval_spec.verify import ModelVerifier

ZOO = ["llama", "qwen2", "qwen2-sliding", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox", "opt"]
FLAT = CostCurve.flat(64)


def zoo_prompts(seed: int, count: int = 4) -> list[np.ndarray]:
    """Prompts of 12-40 tokens (longer than the 8-token windows) that repeat themselves, so drafts get accepted."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        base = rng.integers(0, 96, int(rng.integers(8, 25)))
        out.append(np.concatenate([base, base[: int(rng.integers(4, len(base) + 1))]]).astype(np.int32))
    return out


@pytest.fixture(scope="module", params=ZOO)
def model(request):
    return tiny_model(request.param)


@pytest.mark.parametrize("method", ["pld", "recycle", "lookahead", "auto"])
def test_every_family_decodes_exactly_as_generate_single_and_batched(model, method):
    prompts = zoo_prompts(len(method))
    expected = [plain_greedy(model, p, 30) for p in prompts]
    drafters = make_drafters(method, 96)
    generator = SpeculativeGenerator(model, StubTokenizer(), drafters, cost_curve=FLAT)
    config = GenerationConfig(max_new_tokens=30, tree_budget=16)
    for i, (prompt, plain) in enumerate(zip(prompts, expected)):
        np.testing.assert_array_equal(generator.generate(prompt, config).tokens, plain, err_msg=f"prompt {i}")
    batch = generator.generate_batch(prompts, config)
    for i, (row, plain) in enumerate(zip(batch.rows, expected)):
        np.testing.assert_array_equal(row.tokens, plain, err_msg=f"batched row {i}")
    if method == "lookahead":  # what a random model's window guesses is luck: some families never get one right
        assert next(d for d in drafters if isinstance(d, LookaheadDrafter)).pool  # the window ran
        assert sum(row.stats.drafted_nodes for row in batch.rows) > 0  # and its n-grams were verified
    else:
        assert batch.mean_accepted > 1.0  # trees were accepted: the tree paths were exercised


def test_every_family_passes_the_self_check(model):
    """The check unverified families must pass holds for every listed one: a branching tree's logits, verified
    after a 12-token prompt (longer than the windows) and in that prompt's own prefill, equal plain forwards'."""
    ModelVerifier(model).self_check()


def small(config_class, **fields):
    return config_class(vocab_size=96, hidden_size=64, num_attention_heads=4, **fields)


REFUSED = {
    "mamba": (lambda: tf.MambaForCausalLM(tf.MambaConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2)),
              "does not take past_key_values"),
    "jamba": (lambda: tf.JambaForCausalLM(small(tf.JambaConfig, intermediate_size=128, num_hidden_layers=2,
                                                num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1,
                                                expert_layer_period=2, expert_layer_offset=1, num_experts=2,
                                                use_mamba_kernels=False)), "recurrent"),
    "recurrent_gemma": (lambda: tf.RecurrentGemmaForCausalLM(small(tf.RecurrentGemmaConfig, intermediate_size=128,
                                                                   num_hidden_layers=2, lru_width=64)), "recurrent"),
    "qwen3_next": (lambda: tf.Qwen3NextForCausalLM(small(
        tf.Qwen3NextConfig, intermediate_size=128, num_hidden_layers=2, num_key_value_heads=2, num_experts=2,
        layer_types=["linear_attention", "full_attention"], moe_intermediate_size=32,
        shared_expert_intermediate_size=32)), "linear_attention"),
    "llama4_text": (lambda: tf.Llama4ForCausalLM(small(tf.Llama4TextConfig, intermediate_size=128,
                                                       intermediate_size_mlp=128, num_hidden_layers=2,
                                                       num_key_value_heads=2, head_dim=16, num_local_experts=2)),
                    "chunked_attention"),
    "bloom": (lambda: tf.BloomForCausalLM(tf.BloomConfig(vocab_size=96, hidden_size=64, n_layer=2, n_head=4)),
              "does not take position_ids"),
    "t5": (lambda: tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=96, d_model=64, d_ff=128, num_layers=1,
                                                             num_heads=4, d_kv=16)), "encoder-decoder"),
    "flex_attention": (lambda: tf.LlamaForCausalLM._from_config(
        small(tf.LlamaConfig, intermediate_size=128, num_hidden_layers=2), attn_implementation="flex_attention"),
        "cannot apply a tree mask"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_unsupported_families_are_refused_by_name_before_decoding(name):
    build, reason = REFUSED[name]
    model = build().eval()
    with pytest.raises(UnsupportedModelError, match=reason) as refused:
        SpeculativeGenerator(model, StubTokenizer(), make_drafters("pld"))
    assert type(model).__name__ in str(refused.value)


@pytest.mark.parametrize("config", [
    small(tf.CohereConfig, intermediate_size=128, num_hidden_layers=2, num_key_value_heads=2),
    small(tf.Starcoder2Config, intermediate_size=128, num_hidden_layers=2, num_key_value_heads=2),
], ids=["cohere", "starcoder2"])
def test_an_unlisted_family_passes_its_self_check_and_decodes_exactly(config):
    config.bos_token_id = config.eos_token_id = None
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = 0
    generator = SpeculativeGenerator(model, StubTokenizer(), make_drafters("auto", 96), cost_curve=FLAT)
    assert not generator.verifier.layout.verified
    for prompt in zoo_prompts(7, 2):
        result = generator.generate(prompt, GenerationConfig(max_new_tokens=25))
        np.testing.assert_array_equal(result.tokens, plain_greedy(model, prompt, 25))


def test_a_family_whose_tree_forward_differs_is_refused_by_its_self_check(monkeypatch):
    """A model that ignores the attention mask (as some custom kernels do) computes other logits under a tree."""
    model = tiny_model("llama")
    forward = model.forward

    @functools.wraps(forward)
    def unmasked(*args, attention_mask=None, **kwargs):
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", unmasked)
    monkeypatch.setattr(families, "VERIFIED", frozenset())
    with pytest.raises(UnsupportedModelError, match="different logits under a tree mask"):
        SpeculativeGenerator(model, StubTokenizer(), make_drafters("pld"))


@pytest.mark.parametrize("kind", ZOO)
def test_the_probe_finds_a_mask_per_layer_type_exactly_where_layers_are_mixed(kind):
    assert families.attention_layout(tiny_model(kind)).per_layer_type == (kind in ("qwen2-sliding", "gemma2", "gemma3"))


@pytest.mark.parametrize("single", ["full_attention", "sliding_attention", "refused"])
def test_a_mixed_decoder_that_takes_a_single_mask_is_refused(monkeypatch, single):
    """The same hybrid decoder, made to take one mask: every layer given the same one, or a dict refused."""
    model = tiny_model("gemma2")
    decoder = model.get_decoder()
    forward = decoder.forward

    @functools.wraps(forward)
    def one_mask(*args, attention_mask=None, **kwargs):
        if isinstance(attention_mask, dict):
            if single == "refused":
                raise TypeError("attention_mask must be a tensor")
            attention_mask = {name: attention_mask[single] for name in attention_mask}
        return forward(*args, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(decoder, "forward", one_mask)
    with pytest.raises(UnsupportedModelError, match="takes a single attention mask"):
        families.attention_layout(model)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it on one)")
@pytest.mark.parametrize("method", ["pld", "auto"])
def test_every_family_decodes_exactly_as_generate_on_cuda(model, method):
    """The same check on a CUDA device: masks built there, the cache there, one transfer a step."""
    model = model.to("cuda")
    try:
        prompts = zoo_prompts(len(method))
        expected = [plain_greedy(model, p, 30) for p in prompts]
        generator = SpeculativeGenerator(model, StubTokenizer(), make_drafters(method, 96), cost_curve=FLAT)
        batch = generator.generate_batch(prompts, GenerationConfig(max_new_tokens=30, tree_budget=16))
        for i, (row, plain) in enumerate(zip(batch.rows, expected)):
            np.testing.assert_array_equal(row.tokens, plain, err_msg=f"batched row {i}")
    finally:
        model.to("cpu")
