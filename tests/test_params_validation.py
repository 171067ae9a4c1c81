"""Params from another layer or net are rejected at trace time, naming the layer, the param path,
the expected and the received shape (issue 16, item 4). Before: KeyError 'b', NumPy's reshape
error naming no layer, or a silently wrong output (dense(3, bias=False) returning 5 logits)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprop as jp


def params_of(layer, in_shape):
    return layer.init(jax.random.key(0), in_shape)[1]


def raises(layer, params, x, match, **ctx):
    """The same ValueError eagerly and under jit (trace time)."""
    with pytest.raises(ValueError, match=match):
        jp.call_forward(layer, params, x, **ctx)
    with pytest.raises(ValueError, match=match):
        jax.jit(lambda p, xx: jp.call_forward(layer, p, xx, **ctx)[0])(params, x)


X = jnp.ones((2, 4))


def test_dense_without_bias_params_into_bias_layer():
    p = params_of(jp.dense(5, bias=False), X.shape)
    raises(jp.dense(5), p, X, r"dense\(5\): params\['b'\] is missing \(expected shape \(5,\)\).*bias=False")


def test_dense_bias_params_into_no_bias_layer():
    p = params_of(jp.dense(5), X.shape)
    raises(jp.dense(5, bias=False), p, X, r"dense\(5\): unexpected params\['b'\].*bias=False")


def test_dense_other_width_no_bias_is_not_silent():
    p = params_of(jp.dense(5, bias=False), X.shape)                # w (4, 5)
    raises(jp.dense(3, bias=False), p, X, r"dense\(3\): params\['w'\] expected shape \(I, 3\), got \(4, 5\)")


def test_dense_other_width_names_the_layer():
    p = params_of(jp.dense(8), X.shape)                            # w (4, 8), b (8,)
    raises(jp.dense(5), p, X, r"dense\(5\): params\['b'\] expected shape \(5,\), got \(8,\)")


def test_dense_mixed_dtypes_and_non_arrays():
    p = params_of(jp.dense(5), X.shape)
    raises(jp.dense(5), {"w": p["w"], "b": p["b"].astype(jnp.float32)}, X,
           r"dense\(5\): params\['w'\] expected dtype float32 \(that of params\['b'\]\), got float64")
    raises(jp.dense(5), {"w": p["w"].astype(jnp.int32), "b": p["b"]}, X, r"dense\(5\): params\['w'\] must be floating")
    with pytest.raises(ValueError, match=r"dense\(5\): params\['b'\] must be an array of shape \(5,\), got list"):
        jp.dense(5).forward({"w": p["w"], "b": [0.0] * 5}, X)
    raises(jp.dense(5), (p,), X, r"dense\(5\): params must be a dict with keys \['b', 'w'\], got tuple")


def test_dense_input_checked_against_valid_params():
    """The input check keeps its message, now against the validated params."""
    p = params_of(jp.dense(5), X.shape)
    raises(jp.dense(5), p, jnp.ones((2, 3)), r"dense\(5\): expected input with 4 features on the last axis, got shape \(2, 3\)")
    raises(jp.dense(5), p, jnp.ones((2, 4), jnp.float32), r"dense\(5\): expected input of dtype float64, got float32")


def test_serial_with_params_of_another_net():
    x = jnp.ones((2, 6))
    other = params_of(jp.serial(jp.dense(4), jp.relu(), jp.dense(5, bias=False)), x.shape)
    raises(jp.serial(jp.dense(4), jp.relu(), jp.dense(3, bias=False)), other, x,
           r"dense\(3\): params\['w'\] expected shape \(I, 3\), got \(4, 5\)")
    shifted = params_of(jp.serial(jp.relu(), jp.dense(4), jp.dense(3)), x.shape)
    raises(jp.serial(jp.dense(4), jp.relu(), jp.dense(3)), shifted, x, r"dense\(4\): params must be a dict")


CONV = jnp.ones((2, 10, 4))
CONV2 = jnp.ones((2, 6, 7, 4))


@pytest.mark.parametrize("make, other, x, match", [
    (lambda: jp.conv1d(6, 3), lambda: jp.conv1d(6, 3, bias=False), CONV, r"conv1d\(6, 3\): params\['b'\] is missing"),
    (lambda: jp.conv1d(6, 3, bias=False), lambda: jp.conv1d(6, 3), CONV, r"conv1d\(6, 3\): unexpected params\['b'\]"),
    (lambda: jp.conv1d(6, 3, bias=False), lambda: jp.conv1d(6, 5, bias=False), CONV,
     r"conv1d\(6, 3\): params\['w'\] expected shape \(3, C/G, 6\), got \(5, 4, 6\)"),
    (lambda: jp.conv1d(6, 3, bias=False), lambda: jp.conv1d(8, 3, bias=False), CONV,
     r"conv1d\(6, 3\): params\['w'\] expected shape \(3, C/G, 6\), got \(3, 4, 8\)"),
    (lambda: jp.conv1d(6, 3), lambda: jp.conv1d(8, 3), CONV, r"conv1d\(6, 3\): params\['b'\] expected shape \(6,\), got \(8,\)"),
    (lambda: jp.conv1d(6, 3, groups=2), lambda: jp.conv1d(6, 3), CONV,
     r"conv1d\(6, 3, groups=2\): expected input with 8 features on the last axis, got shape \(2, 10, 4\)"),
    (lambda: jp.conv2d(5, 3), lambda: jp.conv2d(5, (3, 2)), CONV2,
     r"conv2d\(5, \(3, 3\)\): params\['w'\] expected shape \(3, 3, C/G, 5\), got \(3, 2, 4, 5\)"),
    (lambda: jp.conv2d(5, 3, bias=False), lambda: jp.conv1d(5, 3, bias=False), CONV2,
     r"conv2d\(5, \(3, 3\)\): params\['w'\] expected shape \(3, 3, C/G, 5\), got \(3, 4, 5\)"),
], ids=["bias_missing", "bias_unexpected", "kernel_size", "features_w", "features_b", "groups",
        "kernel_2d", "conv1d_into_conv2d"])
def test_conv_params_of_another_layer(make, other, x, match):
    in_shape = CONV.shape if other().name.startswith("conv1d") else x.shape
    raises(make(), params_of(other(), in_shape), x, match)


NORMS = [(lambda: jp.batch_norm(), {"train": True}), (jp.layer_norm, {}), (lambda: jp.group_norm(2), {})]


@pytest.mark.parametrize("make, ctx", NORMS)
def test_norm_params_of_another_layer(make, ctx):
    layer = make()
    x = jnp.ones((3, 5, 4))
    if layer.stateful:
        ctx = dict(ctx, state=layer.init_state(x.shape))
    name = layer.name.replace("(", r"\(").replace(")", r"\)")
    good = params_of(layer, x.shape)
    raises(layer, {"scale": good["scale"]}, x, name + r": params\['offset'\] is missing \(expected shape \(C,\)\)", **ctx)
    raises(layer, {"scale": jnp.ones(4), "offset": jnp.zeros(6)}, x,
           name + r": params\['scale'\] expected shape \(6,\) \(C = 6 from params\['offset'\]\), got \(4,\)", **ctx)
    raises(layer, params_of(jp.dense(4), x.shape), x, name + r": params\['offset'\] is missing.*unexpected params\['b'\]", **ctx)
    raises(layer, params_of(jp.layer_norm(), (3, 5, 6)), x, name + r": expected input with 6 features on the last axis", **ctx)


def test_parameterless_layers_reject_params():
    x = jnp.ones((2, 8, 3))
    for layer in (jp.max_pool(2), jp.avg_pool(2), jp.global_avg_pool(), jp.flatten()):
        raises(layer, {"w": jnp.ones((3, 3))}, x, r"has no parameters: expected params \(\), got dict")
        jp.call_forward(layer, (), x)                                   # () and None still accepted
        jp.call_forward(layer, None, x)


def test_valid_params_still_pass_under_jit():
    """The checks add nothing to the compiled computation: same output as without jit."""
    net = jp.serial(jp.conv1d(4, 3, bias=False), jp.batch_norm(), jp.relu(), jp.global_avg_pool(), jp.dense(3))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 9, 2)))
    params, state = params_of(net, x.shape), jp.init_state(net, x.shape)
    y1 = jp.call_forward(net, params, x, state=state)[0]
    y2 = jax.jit(lambda p, xx: jp.call_forward(net, p, xx, state=state)[0])(params, x)
    np.testing.assert_allclose(y1, y2, rtol=1e-12)
