"""merge_attention_states: partial attentions over disjoint key sets merge into the attention over
all of them, differentiably and without NaN on rows that saw nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash
from grad_oracle import random_normal
from test_features_cpu import make_inputs

SPLITS = (0, 7, 15, 23)  # three key sets of unequal sizes


def _split_attention(q, k, v, mask):
    """Attention over each key set, then merged."""
    parts = [jax_flash.flash_attention(q, k[:, a:b], v[:, a:b], mask=mask[..., a:b],
                                       return_lse=True)
             for a, b in zip(SPLITS, SPLITS[1:])]
    return jax_flash.merge_attention_states([o for o, _ in parts], [l for _, l in parts])


def _mask(seqlen_q, seqlen_k):
    """Rows 0-1 see keys of the last set only (so -inf in two parts), row 2 sees no key at all."""
    mask = np.ones((1, 1, seqlen_q, seqlen_k), bool)
    mask[..., :2, :SPLITS[2]] = False
    mask[..., 2, :] = False
    return jnp.asarray(mask)


def test_merged_equals_attention_over_all_keys_with_gradients():
    q, k, v = make_inputs(0, 2, 11, SPLITS[-1], 4, 2, 8)
    mask = _mask(11, SPLITS[-1])
    full = lambda q, k, v: jax_flash.flash_attention(q, k, v, mask=mask, return_lse=True)
    split = lambda q, k, v: _split_attention(q, k, v, mask)
    dout = random_normal(1, q.shape, jnp.float32)
    dlse = random_normal(2, (2, 4, 11), jnp.float32).at[:, :, 2].set(0)  # 0 on the empty row

    @jax.jit
    def results_and_grads(q, k, v):
        (out, lse), vjp = jax.vjp(split, q, k, v)
        (ref_out, ref_lse), ref_vjp = jax.vjp(full, q, k, v)
        return (out, lse, vjp((dout, dlse))), (ref_out, ref_lse, ref_vjp((dout, dlse)))

    (out, lse, grads), (ref_out, ref_lse, ref_grads) = results_and_grads(q, k, v)
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(lse, ref_lse, atol=2e-5, rtol=2e-5)
    assert np.isneginf(lse[:, :, 2]).all() and (out[:, 2] == 0).all()
    for name, grad, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert np.isfinite(np.asarray(grad)).all(), name
        np.testing.assert_allclose(grad, ref, atol=2e-5, rtol=2e-5, err_msg=name)


def test_gradients_of_the_states_are_finite_on_empty_rows():
    outs = [random_normal(i, (1, 3, 2, 4), jnp.float32) for i in range(2)]
    # Head 0 query 1 is -inf in both parts (an empty row); head 1 mixes -inf and finite.
    lses = [random_normal(5, (1, 2, 3), jnp.float32).at[0, :, 1].set(-jnp.inf),
            jnp.full((1, 2, 3), -jnp.inf).at[0, 1].set(0.5)]

    @jax.jit
    def loss(outs, lses):
        out, lse = jax_flash.merge_attention_states(outs, lses)
        return jnp.sum(out ** 2) + jnp.sum(jnp.where(jnp.isinf(lse), 0, lse))

    both_empty = [jnp.full((1, 2, 3), -jnp.inf)] * 2
    out, lse = jax_flash.merge_attention_states(outs, both_empty)
    assert (out == 0).all() and np.isneginf(lse).all()
    for args in ((outs, lses), (outs, both_empty)):
        douts, dlses = jax.jit(jax.grad(loss, argnums=(0, 1)))(*args)
        for g in (*douts, *dlses):
            assert np.isfinite(np.asarray(g)).all()


def test_one_state_is_itself():
    out = random_normal(3, (2, 5, 3, 8), jnp.bfloat16)
    lse = random_normal(4, (2, 3, 5), jnp.float32)
    merged, merged_lse = jax_flash.merge_attention_states([out], [lse])
    assert merged.dtype == jnp.bfloat16
    np.testing.assert_array_equal(merged, out)
    np.testing.assert_allclose(merged_lse, lse, rtol=1e-6)


@pytest.mark.parametrize("outs,lses,match", [
    ([], [], "at least one"),
    ([jnp.ones((1, 2, 3, 4))], [jnp.ones((1, 2, 3))], r"lses\[0\] is float32\[1, 2, 3\]; "
                                                      r"expected float32\[1, 3, 2\]"),
    ([jnp.ones((1, 2, 3, 4)), jnp.ones((1, 2, 3, 5))], [jnp.ones((1, 3, 2))] * 2,
     r"outs\[1\] is float32\[1, 2, 3, 5\]"),
])
def test_bad_states(outs, lses, match):
    with pytest.raises(ValueError, match=match):
        jax_flash.merge_attention_states(outs, lses)
