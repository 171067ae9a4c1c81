"""remat(layer): registry cases, the same numbers as the plain layer, context replayed, and
less compiled temporary memory for a deep stack (the recomputation is not merged away)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprop as jp
from jaxprop.combinators import repeat
from jaxprop.layers.transformer import transformer_block
from jaxprop.combinators.remat import remat

from jaxprop.testing import CASES as REGISTRY, setup


def _drop_ctx():
    return {"key": jax.random.key(7), "train": True}


def _mlp():
    return jp.serial(jp.dense(6), jp.tanh(), jp.dense(5))


# Registry entries (remat, remat_dropout, remat_batch_norm, remat_transformer_block) are in
# jaxprop.testing.CASES; each is compared here with the plain layer it wraps.
CASES = [c for c in REGISTRY if c.name.startswith("remat")]
PLAIN = {"remat": _mlp, "remat_dropout": lambda: jp.serial(jp.dense(6), jp.dropout(0.5), jp.dense(3)),
         "remat_batch_norm": lambda: jp.batch_norm(0.8),
         "remat_transformer_block": lambda: transformer_block(2)}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_same_numbers_as_the_plain_layer(case):
    """Eager: bit for bit (the same operations on the same values, dropout's mask drawn again from the
    same key, batch norm's statistics again). Jitted: up to XLA's fusion choices (1e-12)."""
    layer, params, x, ctx = setup(case, jnp.float64)
    plain = PLAIN[case.name]()
    dy = jax.random.normal(jax.random.key(3), jp.output_shape(plain, case.in_shape))

    def run(net):
        y, cache = jp.call_forward(net, params, x, **ctx)
        grads, dx = net.backward(cache, dy)
        state = net.update_state(ctx["state"], cache) if net.stateful else ()
        return y, grads, dx, state

    hand, ref = run(layer), run(plain)
    for a, b in zip(jax.tree_util.tree_leaves(hand), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_array_equal(a, b)
    hand, ref = jax.jit(lambda: run(layer))(), jax.jit(lambda: run(plain))()
    for a, b in zip(jax.tree_util.tree_leaves(hand), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_cache_is_only_the_input_params_and_context():
    layer = remat(_mlp())
    _, params = layer.init(jax.random.key(0), (4, 5))
    x = jax.random.normal(jax.random.key(1), (4, 5))
    _, cache = layer.forward(params, x, train=True, key=None)
    assert set(cache) == {"x", "params", "ctx"}
    assert cache["x"] is x and cache["params"] is params
    assert sum(a.size for a in jax.tree_util.tree_leaves(cache["ctx"])) == 0    # a bool token, no data
    assert layer.name == "remat(" + _mlp().name + ")"


def test_unreplayable_context_is_an_error():
    layer = remat(_mlp())
    _, params = layer.init(jax.random.key(0), (4, 5))
    with pytest.raises(ValueError, match=r"remat\(serial.*context keyword temperature=0.5 \(float\)"):
        layer.forward(params, jnp.zeros((4, 5)), temperature=0.5)
    with pytest.raises(TypeError, match="remat: expected a jaxprop Layer"):
        remat(jp.dense)


def _block(width):
    return jp.residual(jp.serial(jp.dense(4 * width), jp.gelu(approximate=True), jp.dense(width)))


def _step_program(net, shape):
    _, params = net.init(jax.random.key(0), shape)
    x = jnp.zeros(shape, jnp.float32)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)

    def step(p, xx):
        y, cache = net.forward(p, xx)
        return net.backward(cache, y)

    return jax.jit(step).lower(params, x).compile()


@pytest.mark.parametrize("stack", ["serial", "repeat"])
def test_remat_lowers_compiled_temp_memory_of_a_deep_stack(stack):
    """16 residual MLP blocks: XLA's temporary memory for forward + backward with every block
    remat'ed is at most half of the plain stack's, and the serial program really recomputes (XLA:CPU
    drops optimization barriers before its last CSE pass: without remat's select on dy the
    recomputation was merged into the first forward and the memory was unchanged)."""
    depth, shape = 16, (64, 32)

    def build(wrap):
        if stack == "serial":
            return jp.serial(*[wrap(_block(shape[-1])) for _ in range(depth)])
        return repeat(wrap(_block(shape[-1])), depth)

    plain, lean = _step_program(build(lambda b: b), shape), _step_program(build(remat), shape)
    m_plain = plain.memory_analysis().temp_size_in_bytes
    m_lean = lean.memory_analysis().temp_size_in_bytes
    assert m_lean <= 0.5 * m_plain, (m_lean, m_plain)
    if stack == "serial":                            # 2 forward + 4 backward matmuls per block, plus 1-2 again
        assert lean.as_text().count(" dot(") >= plain.as_text().count(" dot(") + depth


def test_recomputation_starts_from_x_bit_for_bit():
    """The select that ties the recomputation to dy returns x exactly, whatever dy holds."""
    from jaxprop.combinators.remat import _after
    x = jnp.array([1.5, -0.0, 0.0, jnp.nan, -jnp.inf, 3e-310, -2.0])
    for d0 in (0.7, jnp.nan, -jnp.inf):
        y = jax.jit(_after)(x, jnp.full((2, 3), d0))
        np.testing.assert_array_equal(np.asarray(y).view(np.uint64), np.asarray(x).view(np.uint64))


def test_repeat_remat_flag_is_remat_per_block():
    """repeat(block, n, remat=True): the same gradients as repeat(block, n), and the compiled step's
    temporary memory at most half (each scan step keeps only its input)."""
    depth, shape = 16, (64, 32)
    plain, lean = repeat(_block(shape[-1]), depth), repeat(_block(shape[-1]), depth, remat=True)
    _, params = plain.init(jax.random.key(0), shape)
    x = jax.random.normal(jax.random.key(1), shape)
    dy = jax.random.normal(jax.random.key(2), shape)

    def run(net):
        y, cache = net.forward(params, x)
        return y, net.backward(cache, dy)

    for a, b in zip(jax.tree_util.tree_leaves(jax.jit(lambda: run(lean))()),
                    jax.tree_util.tree_leaves(jax.jit(lambda: run(plain))())):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)
    m_plain = _step_program(plain, shape).memory_analysis().temp_size_in_bytes
    m_lean = _step_program(lean, shape).memory_analysis().temp_size_in_bytes
    assert m_lean <= 0.5 * m_plain, (m_lean, m_plain)
