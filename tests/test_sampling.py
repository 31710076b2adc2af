"""The key/value-cached sampler against the model's uncached forward pass."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from codemix_jax import sharding
from codemix_jax.eval.sampling import (
    EOS_ID,
    Sampler,
    SamplingSettings,
    left_padded,
    top_p_filtered,
)
from codemix_jax.model import ModelConfig, Transformer, init_params
from codemix_jax.model.transformer import init_cache

# Unequal prompt lengths: every row but the longest is left-padded.
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [3], [40, 41]]

# One greedy and one sampling setting for most tests: each distinct setting compiles the sampler.
GREEDY = SamplingSettings(max_new_tokens=16)
HOT = SamplingSettings(max_new_tokens=16, temperature=1.0)

VARIANTS = {
    "llama": {},
    "paper_a_unrolled_gqa": {
        "block": "parallel",
        "norm": "layernorm",
        "num_kv_heads": 2,
        "scan_layers": False,
    },
    "gpt": {"positions": "learned", "mlp": "gelu", "norm": "layernorm", "use_bias": True},
}


def model_and_params(**overrides) -> tuple[Transformer, dict]:
    """A tiny model with weights large enough that its logits are far from uniform (so argmax
    has no near ties that rounding could flip)."""
    config = ModelConfig(
        vocab_size=512,
        d_model=64,
        num_layers=2,
        num_heads=4,
        d_ff=128,
        max_seq_len=64,
        initializer_std=0.3,
        **overrides,
    )
    model = Transformer(config)
    return model, nn.unbox(init_params(model, jax.random.key(1)))


def sampler(model: Transformer, params: dict, vocab_size: int = 512) -> Sampler:
    return Sampler(
        model=model,
        params=params,
        mesh=sharding.make_mesh(),
        rules=sharding.LOGICAL_AXIS_RULES,
        vocab_size=vocab_size,
    )


def full_logits(model: Transformer, params: dict, rows: list[list[int]]) -> list[np.ndarray]:
    """Each row's logits by the ordinary (training) forward pass, no cache: the rows are
    right-padded into one batch (padding is segment 0, which no real token sees)."""
    length = max(len(row) for row in rows)
    tokens = np.zeros((len(rows), length), np.int32)
    segment_ids = np.zeros_like(tokens)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
        segment_ids[i, : len(row)] = 1
    positions = np.broadcast_to(np.arange(length), tokens.shape)
    logits = jax.jit(model.apply)(
        {"params": params}, tokens, segment_ids=segment_ids, positions=positions
    )
    return [np.asarray(logits[i, : len(row)]) for i, row in enumerate(rows)]


@pytest.mark.parametrize("variant", ["gpt", "paper_a_unrolled_gqa"])
def test_cached_greedy_equals_the_argmax_of_the_uncached_forward_pass(variant):
    model, params = model_and_params(**VARIANTS[variant])
    generated = sampler(model, params).generate(PROMPTS, SamplingSettings(max_new_tokens=24))
    sequences = [prompt + new for prompt, new in zip(PROMPTS, generated, strict=True)]
    for prompt, new, logits in zip(
        PROMPTS, generated, full_logits(model, params, sequences), strict=True
    ):
        assert len(new) == 24  # this model never draws EOS in 24 tokens
        assert logits.argmax(-1)[len(prompt) - 1 : -1].tolist() == new


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_logits_equal_the_full_forward_pass_padded_rows_included(variant):
    """Prefill a left-padded batch, then feed one token per call: every call's logits equal the
    uncached forward pass over the row's real tokens."""
    model, params = model_and_params(**VARIANTS[variant])
    continuation = [[20, 21, 22], [30, 31, 32], [7, 8, 9], [1, 2, 3]]
    batch = left_padded(PROMPTS, 16)
    cache = init_cache(model, len(PROMPTS), 16 + 3)
    apply = jax.jit(
        lambda cache, tokens, segment_ids, positions: model.apply(
            {"params": params, "cache": cache},
            tokens,
            segment_ids=segment_ids,
            positions=positions,
            decode=True,
            mutable=["cache"],
        )
    )
    logits, variables = apply(cache, **batch)
    steps = [np.asarray(logits[:, -1])]
    lengths = np.array([len(prompt) for prompt in PROMPTS])
    for t in range(3):
        token = np.array([[row[t]] for row in continuation], np.int32)
        logits, variables = apply(
            variables["cache"], token, np.ones_like(token), (lengths + t)[:, None]
        )
        steps.append(np.asarray(logits[:, 0]))
    sequences = [prompt + more for prompt, more in zip(PROMPTS, continuation, strict=True)]
    for row, (prompt, logits) in enumerate(
        zip(PROMPTS, full_logits(model, params, sequences), strict=True)
    ):
        expected = logits[len(prompt) - 1 :]
        got = np.stack([step[row] for step in steps])
        np.testing.assert_allclose(got, expected, atol=2e-5, rtol=0)


def test_sampling_is_reproducible_by_seed_and_varies_with_it():
    model, params = model_and_params()
    run = sampler(model, params)
    hot = dataclasses.replace(HOT, seed=3)
    first = run.generate(PROMPTS, hot)
    assert run.generate(PROMPTS, hot) == first
    other = run.generate(PROMPTS, dataclasses.replace(HOT, seed=4))
    assert other != first
    greedy = run.generate(PROMPTS, GREEDY)
    assert first != greedy


def test_a_tiny_nucleus_is_greedy():
    """top_p below the top token's probability keeps only that token, whatever the seed."""
    model, params = model_and_params()
    run = sampler(model, params)
    greedy = run.generate(PROMPTS, GREEDY)
    for seed in (0, 1):
        nucleus = dataclasses.replace(HOT, top_p=1e-6, seed=seed)
        assert run.generate(PROMPTS, nucleus) == greedy


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([[0.5, 0.05, 0.3, 0.15], [0.25, 0.25, 0.25, 0.25]])
    logits = jnp.log(jnp.asarray(probs))
    kept = np.isfinite(np.asarray(top_p_filtered(logits, 0.79)))
    assert kept.tolist() == [[True, False, True, False], [True, True, True, True]]
    kept = np.isfinite(np.asarray(top_p_filtered(logits, 0.81)))
    assert kept[0].tolist() == [True, False, True, True]


def test_a_row_stops_at_eos_and_the_others_go_on():
    """EOS made the likeliest token after token 3 only (its embedding row is token 3's, scaled):
    the row whose prompt ends in 3 stops at once, the rest run their full length."""
    model, params = model_and_params()
    table = params["token_embedding"]["embedding"]
    params["token_embedding"]["embedding"] = table.at[EOS_ID].set(table[3] * 50)
    argmax_after_3 = full_logits(model, params, [[3]])[0].argmax(-1)[-1]
    assert argmax_after_3 == EOS_ID
    generated = sampler(model, params).generate(PROMPTS, GREEDY)
    assert generated[2] == []
    assert all(EOS_ID not in row for row in generated)


def test_padding_rows_of_the_vocabulary_are_never_sampled():
    """A model with 512 rows and a 300-piece tokenizer: ids 300..511 are never produced."""
    model, params = model_and_params()
    hot = dataclasses.replace(HOT, temperature=2.0)
    generated = sampler(model, params, vocab_size=300).generate(PROMPTS, hot)
    unrestricted = sampler(model, params).generate(PROMPTS, hot)
    assert max(max(row) for row in unrestricted) >= 300  # else the check below says nothing
    assert max(max(row) for row in generated) < 300


def test_a_prompt_longer_than_the_context_keeps_its_end(caplog):
    model, params = model_and_params()
    run = sampler(model, params)
    long_prompt = list(range(10, 80))  # 70 tokens, max_seq_len 64, 16 new: the last 48 stay
    with caplog.at_level(logging.WARNING):
        got = run.generate([long_prompt], GREEDY)
    assert "1 prompt(s) longer than 48 tokens" in caplog.text
    assert got == run.generate([long_prompt[-48:]], GREEDY)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens=0"),
        ({"temperature": -1.0}, "temperature=-1.0"),
        ({"top_p": 0.0}, "top_p=0.0"),
        ({"top_p": 1.5}, "top_p=1.5"),
    ],
)
def test_bad_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        SamplingSettings(**settings)


def test_no_room_for_a_prompt_is_refused():
    model, params = model_and_params()
    with pytest.raises(ValueError, match="max_new_tokens=64 leaves no room"):
        sampler(model, params).generate(PROMPTS, SamplingSettings(max_new_tokens=64))
