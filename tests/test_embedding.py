"""embedding: integer ids -> rows of W; dW is a scatter-add, ids get no gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprop as jp
from jaxprop.combinators import serial
from jaxprop.layers.dense import dense
from jaxprop.layers.embedding import embedding
from jaxprop.layers.recurrent import gru
from jaxprop.testing import Case, setup, token_ids


# The registry (jaxprop.testing.CASES) holds embedding and serial(embedding, gru, dense); one more
# configuration here (ids with two leading axes), jitted and eager.
CASES = [Case("embedding_3d", lambda: embedding(9, 3), (2, 3, 4), x_fn=token_ids(9))]
DTYPES = [jnp.float64, jnp.float32]
RUNS = [pytest.param(c, d, j, id=f"{c.name}-{jnp.dtype(d).name}-{'jit' if j else 'eager'}")
        for c in CASES for d in DTYPES for j in (True, False)]


@pytest.mark.parametrize("case, dtype, jit", RUNS)
def test_backward_matches_autodiff(case, dtype, jit):
    layer, params, x, ctx = setup(case, dtype)
    with jax.default_matmul_precision("highest"):
        report = jp.check_layer(layer, params, x, jit=jit, fd=case.fd and dtype == jnp.float64 and not jit,
                                **ctx)
    assert report.ok, str(report)
    assert report.dtype == jnp.dtype(dtype).name
    assert all(not r.name.startswith("['input']") for r in report.rows)     # ids: params only
    y, cache = jax.jit(layer.forward)(params, x)
    assert jax.jit(layer.backward)(cache, jnp.ones_like(y))[1] is None     # integer ids: dx = None


def test_repeated_ids_sum_their_rows():
    layer = embedding(5, 2)
    w = jnp.arange(10.0).reshape(5, 2)
    ids = jnp.array([[1, 3, 1], [1, 0, 3]])
    y, cache = layer.forward({"w": w}, ids)
    np.testing.assert_array_equal(y, w[ids])
    dy = jax.random.normal(jax.random.key(0), (2, 3, 2))
    grads, dx = layer.backward(cache, dy)
    assert dx is None
    expected = np.zeros((5, 2))
    expected[1] = dy[0, 0] + dy[0, 2] + dy[1, 0]          # id 1 three times
    expected[3] = dy[0, 1] + dy[1, 2]                      # id 3 twice
    expected[0] = dy[1, 1]                                 # ids 2 and 4 never occur: zero rows
    np.testing.assert_allclose(grads["w"], expected, rtol=1e-15)
    ref = jax.grad(lambda ww: jnp.vdot(dy, layer.forward({"w": ww}, ids)[0]))(w)
    np.testing.assert_allclose(grads["w"], ref, rtol=1e-15)


def test_init_is_standard_normal_like_pytorch():
    out_shape, params = embedding(1000, 64).init(jax.random.key(0), (8, 12))
    assert out_shape == (8, 12, 64)
    w = np.asarray(params["w"])
    assert w.shape == (1000, 64) and w.dtype == np.float64
    assert abs(w.mean()) < 0.02 and abs(w.std() - 1.0) < 0.02          # 5 standard errors


@pytest.mark.parametrize("ids", [jnp.zeros((2, 3)), jnp.zeros((2, 3), jnp.float32), jnp.zeros((2, 3), bool)],
                         ids=["float64", "float32", "bool"])
def test_non_integer_ids_rejected(ids):
    layer = embedding(4, 2)
    _, params = layer.init(jax.random.key(0), (2, 3))
    with pytest.raises(ValueError, match=r"embedding\(4, 2\): expected integer token ids .* shape \(2, 3\)"):
        layer.forward(params, ids)
    with pytest.raises(ValueError, match="expected integer token ids"):      # at trace time too
        jax.jit(layer.forward)(params, ids)


@pytest.mark.parametrize("bad", [4, -1, 100])
def test_out_of_range_ids_rejected_when_concrete(bad):
    layer = embedding(4, 2)
    _, params = layer.init(jax.random.key(0), (1, 3))
    with pytest.raises(ValueError, match=r"embedding\(4, 2\): token ids must lie in \[0, 4\)"):
        layer.forward(params, jnp.array([[0, bad, 2]]))


def test_out_of_range_ids_under_jit_give_nan_rows_and_no_gradient():
    """Under jit the ids are not known: a bad id looks up NaN (never wraps around as -1
    would in NumPy) and its dy row is dropped from dW."""
    layer = embedding(4, 2)
    w = jnp.arange(8.0).reshape(4, 2)
    ids = jnp.array([[0, -1, 4, 3]])
    y, cache = jax.jit(layer.forward)({"w": w}, ids)
    assert np.all(np.isnan(y[0, 1])) and np.all(np.isnan(y[0, 2]))
    np.testing.assert_array_equal(y[0, [0, 3]], w[jnp.array([0, 3])])
    dy = jnp.ones((1, 4, 2)) * jnp.array([1.0, 2.0, 3.0, 4.0])[None, :, None]
    grads, _ = jax.jit(layer.backward)(cache, dy)
    np.testing.assert_array_equal(grads["w"], [[1, 1], [0, 0], [0, 0], [4, 4]])


def test_bad_params_and_dy_rejected():
    layer = embedding(4, 2)
    with pytest.raises(ValueError, match=r"embedding\(4, 2\): params\['w'\] expected shape \(4, 2\)"):
        layer.forward({"w": jnp.zeros((5, 2))}, jnp.zeros((1, 3), jnp.int32))
    _, cache = layer.forward({"w": jnp.zeros((4, 2))}, jnp.zeros((1, 3), jnp.int32))
    with pytest.raises(ValueError, match="expected dy of shape"):
        layer.backward(cache, jnp.zeros((1, 3, 3)))
    with pytest.raises(ValueError, match="vocab_size must be an int"):
        embedding(0, 3)
    with pytest.raises(ValueError, match="features must be an int"):
        embedding(3, 2.0)


def test_dtypes_follow_params():
    layer = embedding(5, 3)
    params = {"w": jnp.ones((5, 3), jnp.float32)}
    ids = jnp.array([[1, 2]], jnp.int8)                     # any integer dtype
    y, cache = layer.forward(params, ids)
    assert y.dtype == jnp.float32
    grads, _ = layer.backward(cache, jnp.ones((1, 2, 3), jnp.float32))
    assert grads["w"].dtype == jnp.float32 and grads["w"].shape == (5, 3)
