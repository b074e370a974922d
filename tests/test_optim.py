"""The optimizer's flat arithmetic (optim.gradient_transform) against optax's per-array transforms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dcp_jax import optim
from dcp_jax.configs import tiny
from dcp_jax.models import build, compute


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
def test_flat_adamw_and_clipping_equal_optax_per_array(platform):
    """For the CPU (each array clipped, then the groups concatenated) and for GPUs and TPUs (each group's vector
    clipped, optim.clipped_flat_groups): three AdamW steps of the tiny recipe's trained parameters (three groups: CLIP's q/v at lr x 0.01, norms
    without weight decay, the rest), with random gradients large enough to be clipped and one small enough not
    to be: the flat transform's parameters equal optax's per-array ones (float32; rtol 1e-5, atol 1e-8)."""
    config = tiny.get_config()
    with config.unlocked():
        config.optim.lr = 1e-2  # steps that move the parameters visibly
    model = build.create_model(config)
    params = nnx.state(model, optim.trainable(config))
    assert len(set(jax.tree.leaves(optim.group_labels(optim.parameter_rules(config), params)))) == 3
    with compute.compiling_for(platform):
        flat = optim.gradient_transform(config, model)
    reference = optim.gradient_transform(config, model, flat=False)
    rng = np.random.default_rng(0)
    p_flat, s_flat = params, flat.init(params)
    p_ref, s_ref = params, reference.init(params)
    # the state has the tree of the per-array clipping before per-group flat AdamW, so that earlier checkpoints load
    labels = optim.group_labels(optim.parameter_rules(config), params)
    earlier = optax.chain(optax.clip_by_global_norm(1.0), optax.partition(
        {g: optim.flattened(optax.adamw(lambda step: 1e-3)) for g in set(jax.tree.leaves(labels))}, labels))
    assert jax.tree.structure(s_flat) == jax.tree.structure(earlier.init(params))
    vectors = [x for x in jax.tree.leaves(s_flat) if x.ndim == 1]  # each group's moments: FSDP can split them
    assert len(vectors) == 6 and all(x.shape[0] % optim.FLAT_MULTIPLE == 0 for x in vectors)
    for scale in (10.0, 1e-6, 3.0):  # the recipe clips at 0.01: clipped, not clipped, clipped
        grads = jax.tree.map(lambda p: jnp.asarray(scale * rng.standard_normal(p.shape), p.dtype), params)
        assert (float(optim.global_norm(grads)) > config.optim.grad_clip_norm) == (scale > 1)
        u_flat, s_flat = flat.update(grads, s_flat, p_flat)
        u_ref, s_ref = reference.update(grads, s_ref, p_ref)
        p_flat, p_ref = optax.apply_updates(p_flat, u_flat), optax.apply_updates(p_ref, u_ref)
    # the global norm is summed in another order, so the clip scale may differ in float32's last bits
    for a, b in zip(jax.tree.leaves(p_flat), jax.tree.leaves(p_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-8)
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(p_flat), jax.tree.leaves(params))]
    assert min(moved) > 0


def test_global_norm_is_optax_norm():
    tree = {"a": jnp.arange(6.0).reshape(2, 3), "b": [jnp.ones(4, jnp.bfloat16), jnp.full((), -2.0)]}
    np.testing.assert_allclose(float(optim.global_norm(tree)), float(optax.tree.norm(tree)), rtol=1e-6)
    assert float(optim.global_norm({})) == 0.0


def test_all_finite_sees_every_value_and_no_overflow():
    tree = {"a": jnp.full((3,), 1e30), "b": [jnp.ones((2, 2), jnp.bfloat16)]}
    assert bool(optim.all_finite(tree))  # a norm of these overflows: the check must not
    assert not bool(optim.all_finite({**tree, "c": jnp.array([0.0, jnp.nan])}))
    assert not bool(optim.all_finite({**tree, "c": jnp.array([-jnp.inf])}))
    assert bool(optim.all_finite({}))
