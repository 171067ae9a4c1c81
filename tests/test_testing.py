"""jaxprop.testing, as a user's test suite uses it: assert_gradients_match and run_case on user layers."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprop as jp
from jaxprop import testing as jt
from jaxprop.core import check_same_shape, shape_token


def scale(sign=1.0, nan_to_zero=False):
    """A user's layer: y = x * w (w: (D,)); ``sign=-1`` gives a wrong-sign dW, ``nan_to_zero``
    a forward that hides NaN."""
    def init(key, in_shape):
        return tuple(in_shape), {"w": jax.random.normal(key, in_shape[-1:])}

    def forward(params, x):
        w = params["w"]
        if np.shape(x)[-1:] != w.shape:
            raise ValueError(f"scale: expected input with {w.shape[0]} features on the last axis, "
                             f"got shape {np.shape(x)}")
        if nan_to_zero:
            x = jnp.where(jnp.isnan(x), 0.0, x)
        return x * w[None, :], {"x": x, "w": w}

    def backward(cache, dy):
        check_same_shape("scale", cache["x"], dy)
        x, w = cache["x"], cache["w"]
        return {"w": sign * jnp.sum(dy * x, axis=0)}, dy * w[None, :]     # forward was: y = x * w

    return jp.Layer(init, forward, backward, name="scale")


def lookup(vocab, dim):
    """A user's embedding: integer ids (N, T) -> table[ids] (N, T, D); no gradient for the ids."""
    def init(key, in_shape):
        return tuple(in_shape) + (dim,), {"table": jax.random.normal(key, (vocab, dim))}

    def forward(params, ids):
        y = params["table"][ids]
        return y, {"ids": ids, "y": shape_token(y), "table": shape_token(params["table"])}

    def backward(cache, dy):
        check_same_shape("lookup", cache["y"].shape[1:], dy)
        table = jnp.zeros(cache["table"].shape[1:], dy.dtype)
        return {"table": table.at[cache["ids"]].add(dy)}, None          # forward was: y = table[ids]

    return jp.Layer(init, forward, backward, name="lookup")


def token_ids(key, shape, dtype):
    del dtype
    return jax.random.randint(key, shape, 0, 7)


def test_assert_gradients_match_passes_on_correct_layers():
    report = jt.assert_gradients_match(scale(), in_shape=(4, 3))
    assert report.ok and report.dtype == "float64"
    assert {r.name for r in report.rows} == {"['params']['w']", "['input']"}
    jt.assert_gradients_match(scale(), in_shape=(4, 3), dtype=jnp.float32, jit=True)
    net = jp.serial(jp.dense(5), jp.tanh(), scale(), jp.dense(3))
    jt.assert_gradients_match(net, jp.softmax_cross_entropy(), in_shape=(6, 4), jit=True)
    jt.assert_gradients_match(net, jp.sigmoid_binary_cross_entropy(reduction="mean"), in_shape=(6, 4),
                              jit=True, fd=False)
    # a stochastic layer gets a key, a stateful one its initial state
    jt.assert_gradients_match(jp.serial(jp.dense(4), jp.dropout(0.5), jp.batch_norm()), in_shape=(5, 3),
                              jit=True, fd=False)
    # a sequence model: logits (N, T, C), default labels (N, T), padding mask through to the loss
    mask = jnp.array([[True, True, False, False], [True, True, True, True], [True, False, False, False]])
    jt.assert_gradients_match(jp.serial(jp.dense(6), jp.gelu(), jp.dense(5)), jp.softmax_cross_entropy(0.1),
                              in_shape=(3, 4, 2), where=mask, jit=True)
    x = np.linspace(-1, 1, 12).reshape(4, 3)
    jt.assert_gradients_match(jp.dense(2), x=x, params=jp.dense(2).init(jax.random.key(1), (4, 3))[1], jit=True)


def test_assert_gradients_match_raises_with_the_report_table():
    with pytest.raises(AssertionError) as err:
        jt.assert_gradients_match(scale(sign=-1.0), in_shape=(4, 3))
    msg = str(err.value)
    assert "check_layer: scale" in msg and "FAILED" in msg
    assert "parameter" in msg and "max abs err" in msg and "<-- FAIL" in msg     # the table
    assert "['params']['w']" in msg and "looks like a wrong sign" in msg
    with pytest.raises(AssertionError, match="looks like a wrong sign"):
        jt.assert_gradients_match(jp.serial(jp.dense(3), scale(sign=-1.0)), jp.mse(), in_shape=(5, 2), jit=True)


def test_assert_gradients_match_argument_errors():
    with pytest.raises(ValueError, match="pass x= or in_shape="):
        jt.assert_gradients_match(scale())
    with pytest.raises(TypeError, match="did you forget the call"):
        jt.assert_gradients_match(scale(), jp.mse, in_shape=(2, 3))


USER_CASES = [
    jt.Case("scale", scale, (4, 3), bad_shape=(4, 5)),
    jt.Case("scale_in_serial", lambda: jp.serial(jp.dense(3), scale(), jp.relu()), (5, 2), x_fn=jt.away_from_zero),
]


@pytest.mark.parametrize("case", USER_CASES, ids=str)
def test_run_case_on_a_users_case(case):
    results = jt.run_case(case)
    assert set(results) == {"backward[float64-eager]", "backward[float64-jit]", "backward[float32-eager]",
                            "backward[float32-jit]", "structure", "bridge", "bad_shape", "dy_shape", "nan"}
    assert results["nan"] == "ok" and results["bridge"] == "ok"
    assert results["bad_shape"] == ("ok" if case.bad_shape else "skipped: the case has no bad_shape")


def test_run_case_reports_every_failed_check():
    with pytest.raises(AssertionError) as err:
        jt.run_case(jt.Case("wrong_sign", lambda: scale(sign=-1.0), (4, 3)), dtypes=[jnp.float64], jit=False)
    msg = str(err.value)
    assert "wrong_sign: backward[float64-eager] FAILED" in msg and "looks like a wrong sign" in msg
    assert "wrong_sign: nan FAILED" not in msg and "wrong_sign: bridge FAILED" not in msg   # the bridge is
    # the hand backward (check_bridge); that this backward is wrong is check_backward's finding


def test_check_bridge_catches_a_bridge_that_is_not_the_backward(monkeypatch):
    """check_bridge fails when the custom_vjp bridge's VJP differs from the layer's backward."""
    import jaxprop.bridge

    real = jaxprop.bridge.as_custom_vjp
    monkeypatch.setattr(jt, "as_custom_vjp", lambda layer, **ctx: real(scale(sign=-1.0), **ctx))
    with pytest.raises(AssertionError, match="the bridge's VJP is not the hand backward"):
        jt.check_bridge(jt.Case("scale", scale, (4, 3)), jnp.float64)


def test_check_nan_catches_a_forward_that_hides_nan():
    """relu used to map NaN to 0: the NaN check fails on such a forward."""
    case = jt.Case("nan_to_zero", lambda: scale(nan_to_zero=True), (4, 3))
    jt.check_backward(case, jnp.float64)                        # finite inputs: gradients are right
    with pytest.raises(AssertionError, match="nan_to_zero: a NaN in the input .* gives no NaN in the output"):
        jt.check_nan(case)


def test_run_case_on_integer_inputs():
    """Non-float input (token ids): dx must be None; the bridge and NaN checks do not apply."""
    case = jt.Case("lookup", lambda: lookup(7, 3), (4, 5), x_fn=token_ids)
    layer, params, x, _ = jt.setup(case, jnp.float32)
    assert x.dtype == jnp.int32 or x.dtype == jnp.int64
    assert params["table"].dtype == jnp.float32
    results = jt.run_case(case)
    assert results["structure"] == "ok" and results["dy_shape"] == "ok"
    assert results["bridge"].startswith("skipped: the input is not floating point")
    assert results["nan"].startswith("skipped: the input is not floating point")
    # a backward that returns a dx for integer ids breaks the rule
    bad = lookup(7, 3)
    bad = bad._replace(backward=lambda c, dy: (lookup(7, 3).backward(c, dy)[0], jnp.zeros(c["ids"].shape)))
    with pytest.raises(AssertionError, match="dx must be None"):
        jt.check_structure(jt.Case("lookup_dx", lambda: bad, (4, 5), x_fn=token_ids))


def test_registry_names_are_unique_and_cover_the_case_record():
    names = [c.name for c in jt.CASES]
    assert len(names) == len(set(names))
    assert all(isinstance(c, jt.Case) and callable(c.make) for c in jt.CASES)


def test_testing_imports_without_pytest_and_runs_without_x64():
    """jaxprop.testing needs no pytest, allocates nothing at import, and with x64 off checks float32 only."""
    code = (
        "import sys; sys.modules['pytest'] = None\n"
        "import jaxprop.testing as jt, jax, jax.numpy as jnp\n"
        "from jax._src import xla_bridge\n"
        "assert not xla_bridge.backends_are_initialized(), 'importing jaxprop.testing initialized a backend'\n"
        "r = jt.run_case(jt.CASES[0], jit=True)\n"
        "assert [k for k in r if k.startswith('backward')] == ['backward[float32-jit]'], r\n"
        "try:\n"
        "    jt.check_backward(jt.CASES[0], jnp.float64)\n"
        "except ValueError as e:\n"
        "    assert 'jax_enable_x64' in str(e)\n"
        "else:\n"
        "    raise SystemExit('float64 without x64 was accepted')\n"
        "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.parametrize("jit,fd", [(True, True), (False, False)])
def test_finite_differences_run_in_the_jitted_float64_check(monkeypatch, jit, fd):
    """Finite differences run once per case, in the jitted float64 check, so a case with
    eager=False (gru, lstm, bidirectional) still gets them; they used to run only eagerly."""
    seen = []
    real = jt.layer_report

    def spy(*args, **kwargs):
        seen.append(kwargs["fd"])
        return real(*args, **kwargs)

    monkeypatch.setattr(jt, "layer_report", spy)
    case = next(c for c in jt.CASES if c.name == "gru_reverse_last_t1")
    assert case.fd and case.eager
    jt.check_backward(case, jnp.float64, jit=jit)
    jt.check_backward(case, jnp.float32, jit=jit)
    assert seen == [fd, False]


def test_host_draws_are_deterministic_in_the_key():
    """The checks draw x and cotangents on the host from the key's bits (no XLA program per shape)."""
    from jaxprop.check import host_normal
    a = host_normal(jax.random.key(3), (4, 5), jnp.float32)
    b = host_normal(jax.random.key(3), (4, 5), jnp.float32)
    c = host_normal(jax.random.key(4), (4, 5), jnp.float32)
    assert a.dtype == jnp.float32 and a.shape == (4, 5)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    np.testing.assert_array_equal(host_normal(jax.random.PRNGKey(3), (2,), jnp.float64),
                                  host_normal(jax.random.key(3), (2,), jnp.float64))
    ids = jt.token_ids(7)(jax.random.key(0), (3, 4), None)
    assert ids.shape == (3, 4) and jnp.issubdtype(ids.dtype, jnp.integer) and int(ids.min()) >= 0 \
        and int(ids.max()) < 7
    x = jt.away_from_zero(jax.random.key(0), (50,), jnp.float32)
    assert float(jnp.min(jnp.abs(x))) >= 0.1 and bool(jnp.any(x < 0)) and bool(jnp.any(x > 0))


def test_setup_is_built_once_per_case_dtype_and_seed():
    case = next(c for c in jt.CASES if c.name == "dense")
    l1, p1, x1, c1 = jt.setup(case, jnp.float64)
    l2, p2, x2, c2 = jt.setup(case, jnp.float64)
    assert l1 is l2 and p1["w"] is p2["w"] and x1 is x2 and c1 is not c2
    _, p32, x32, _ = jt.setup(case, jnp.float32)
    assert p32["w"].dtype == jnp.float32 and x32.dtype == jnp.float32
    np.testing.assert_array_equal(p32["w"], p1["w"].astype(jnp.float32))
    _, p_other, _, _ = jt.setup(case, jnp.float64, seed=1)
    assert not np.allclose(p_other["w"], p1["w"])
