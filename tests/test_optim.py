"""LR schedule values at the points that matter, and the weight-decay mask."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from codemix_jax import optim


def values(schedule, steps):
    return [float(schedule(step)) for step in steps]


def test_warmup_cosine_warmup_end_mid_and_final():
    schedule = optim.warmup_cosine(peak=1e-3, warmup_steps=100, total_steps=1100, final=1e-5)
    start, half_warm, warm_end, mid, final = values(schedule, [0, 50, 100, 600, 1100])
    assert start == 0.0
    assert half_warm == pytest.approx(5e-4)
    assert warm_end == pytest.approx(1e-3)
    # Halfway through the cosine the LR is the mean of peak and final.
    assert mid == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-5)
    assert final == pytest.approx(1e-5)


def test_warmup_stable_decay_holds_then_decays_linearly():
    schedule = optim.warmup_stable_decay(
        peak=1e-3, warmup_steps=10, total_steps=110, decay_fraction=0.2, final=0.0
    )
    warm_end, stable, decay_start, decay_mid, final = values(schedule, [10, 50, 88, 99, 110])
    assert warm_end == pytest.approx(1e-3)
    assert stable == pytest.approx(1e-3)
    assert decay_start == pytest.approx(1e-3)
    assert decay_mid == pytest.approx(0.5e-3)
    assert final == pytest.approx(0.0, abs=1e-12)


def test_wsd_rejects_overlong_warmup():
    with pytest.raises(ValueError, match="warmup_steps=100"):
        optim.warmup_stable_decay(peak=1.0, warmup_steps=100, total_steps=110)


def test_linear_anneal_starts_and_ends_at_the_given_lrs():
    """The first step (count 0) trains at ``start``, the last (count 100 of 101) at ``final``."""
    schedule = optim.linear_anneal(start=3e-4, total_steps=101, final=1e-6)
    start, mid, final = values(schedule, [0, 50, 100])
    assert start == pytest.approx(3e-4)
    assert mid == pytest.approx((3e-4 + 1e-6) / 2)
    assert final == pytest.approx(1e-6)


def test_warmup_constant_holds_the_peak_after_warmup():
    schedule = optim.warmup_constant(peak=2e-3, warmup_steps=4)
    assert values(schedule, [0, 2, 4, 1000]) == pytest.approx([0.0, 1e-3, 2e-3, 2e-3])


def test_rsqrt_peaks_at_warmup_then_decays_as_inverse_sqrt():
    schedule = optim.rsqrt(peak=1e-2, warmup_steps=100)
    half_warm, warm_end, later = values(schedule, [50, 100, 400])
    assert half_warm == pytest.approx(5e-3)
    assert warm_end == pytest.approx(1e-2)
    assert later == pytest.approx(5e-3)


def _params():
    return {
        "token_embedding": {"embedding": jnp.ones((4, 2))},
        "block": {
            "mlp": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))},
            "norm": {"scale": jnp.ones((2,))},
        },
    }


@pytest.mark.parametrize("decay_embeddings", [True, False])
def test_weight_decay_skips_norms_biases_and_optionally_embeddings(decay_embeddings):
    params = _params()
    tx = optim.adamw(
        optax.constant_schedule(0.1),
        weight_decay=0.5,
        decay_embeddings=decay_embeddings,
        clip_norm=None,
    )
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    # With zero gradients the Adam part is zero, so any update is pure weight decay.
    assert np.all(np.asarray(updates["block"]["mlp"]["kernel"]) == pytest.approx(-0.05))
    assert np.all(np.asarray(updates["block"]["mlp"]["bias"]) == 0.0)
    assert np.all(np.asarray(updates["block"]["norm"]["scale"]) == 0.0)
    embedding_update = np.asarray(updates["token_embedding"]["embedding"])
    assert np.all(embedding_update == pytest.approx(-0.05 if decay_embeddings else 0.0))
