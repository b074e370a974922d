"""Swin blocks of the decoder: each output token depends on exactly its (shifted) window."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dcp_jax.models import decoder


def window_groups(size: int, window: int, shift: int) -> np.ndarray:
    """Group id per position along one axis, in original coordinates.

    Unshifted: [0,w), [w,2w), ... Shifted by s: the windows move by s, and the window that wraps
    around the border is split by Swin's mask into [0,s) and [size-w+s, size).
    """
    if not shift:
        return np.arange(size) // window
    edges = [0, shift, *range(shift + window, size, window), size]
    return np.searchsorted(edges, np.arange(size), side="right") - 1


@pytest.mark.parametrize("shift", [0, 2])
def test_swin_block_mixes_exactly_within_windows(shift):
    size, window, dim = 8, 4, 8
    block = decoder.SwinBlock(dim, 4, 2, dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(block)
    run = jax.jit(lambda s, x, g: nnx.merge(graphdef, s)(x, g, window, shift))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, size, size, dim)).astype(np.float32)
    guidance = rng.standard_normal((1, size, size, 4)).astype(np.float32)
    base = np.asarray(run(state, x, guidance))
    groups = window_groups(size, window, shift)
    for i, j in [(0, 0), (0, 7), (3, 4), (5, 1), (7, 7)]:
        poked = x.copy()
        poked[0, i, j] += rng.standard_normal(dim)  # not a constant: LayerNorm would remove it
        changed = np.any(np.abs(np.asarray(run(state, poked, guidance)) - base) > 1e-6, axis=-1)[0]
        expected = (groups[:, None] == groups[i]) & (groups[None, :] == groups[j])
        np.testing.assert_array_equal(changed, expected, err_msg=f"token ({i},{j}), shift {shift}")
    # Guidance enters Q/K only: changing it moves attention weights inside the same windows.
    g2 = guidance.copy()
    g2[0, 2, 2] += rng.standard_normal(4)
    changed = np.any(np.abs(np.asarray(run(state, x, g2)) - base) > 1e-6, axis=-1)[0]
    expected = (groups[:, None] == groups[2]) & (groups[None, :] == groups[2])
    np.testing.assert_array_equal(changed, expected)


def test_window_partition_round_trip_and_groupnorm_groups():
    x = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
    windows = decoder.window_partition(x, 4)
    assert windows.shape == (2, 4, 16, 3)
    np.testing.assert_array_equal(np.asarray(windows[0, 1, :4, 0]), np.asarray(x[0, 0, 4:8, 0]))
    np.testing.assert_array_equal(np.asarray(decoder.window_reverse(windows, 4, 8, 8)), np.asarray(x))
    assert [decoder.group_count(c) for c in (8, 32, 64, 48, 40)] == [1, 2, 4, 3, 2]


def test_window_must_divide_the_map():
    enhance = decoder.SpatialEnhance(8, 0, 2, 3, dtype=jnp.float32, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="decoder.window"):
        enhance(jnp.zeros((1, 8, 8, 8)), None)


@pytest.mark.parametrize("stride", [2, 4])
def test_block_conv_transpose_is_flax_conv_transpose(stride):
    """The decoder's upsampling as a matmul and a depth-to-space (decoder.BlockConvTranspose) gives
    nnx.ConvTranspose's output and gradients with the same parameters (float32, highest precision;
    1e-6 of the output's scale: sums in another order)."""
    from dcp_jax.models.decoder import BlockConvTranspose

    block = BlockConvTranspose(6, 5, (stride, stride), (stride, stride), padding="VALID", rngs=nnx.Rngs(0))
    plain = nnx.ConvTranspose(6, 5, (stride, stride), (stride, stride), padding="VALID", rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(stride).standard_normal((3, 4, 5, 6)), jnp.float32)

    def loss(module, x):
        return jnp.sum(jnp.sin(module(x)))

    with jax.default_matmul_precision("highest"):
        out, want = block(x), plain(x)
        grads = nnx.grad(loss, argnums=(0, 1))(block, x)
        want_grads = nnx.grad(loss, argnums=(0, 1))(plain, x)
    assert out.shape == want.shape == (3, 4 * stride, 5 * stride, 5)
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-6 * scale)
    for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5 * float(jnp.max(jnp.abs(expected))))
