r"""``jaxprop.testing``: check hand-written gradients in your own tests.

Two things for users who compare their hand-derived gradients with autodiff:

* :func:`assert_gradients_match` — one assertion. Given a layer (or a whole
  net and a loss), it builds params, inputs and targets when you give none,
  compares the hand-written backward with ``jax.vjp``/``jax.grad`` of the
  same forward (random cotangent, dtype-aware tolerance, finite differences
  in float64) and raises ``AssertionError`` whose message is the report
  table (which parameter, how far off, "looks like a wrong sign")::

      def test_my_layer():
          jp.testing.assert_gradients_match(my_layer(16), in_shape=(8, 4))
          jp.testing.assert_gradients_match(net, jp.mse(), in_shape=(8, 4), jit=True)

* The registry of layer cases: :class:`Case` (how to build a layer and an
  input for it), :data:`CASES` (every jaxprop layer: the test suite runs
  them all), :func:`setup` and :func:`run_case`, which runs every generic
  check of jaxprop's own suite on one case::

      MY_CASES = [jp.testing.Case("my_layer", lambda: my_layer(16), (8, 4), bad_shape=(8, 5))]

      @pytest.mark.parametrize("case", MY_CASES, ids=str)
      def test_generic(case):
          jp.testing.run_case(case)

  The generic checks, one function each (``run_case`` calls them all; each
  raises ``AssertionError`` on a failure and returns ``None``, or a string
  saying why it does not apply to this case):

  ================== ========================================================
  check_backward     hand backward vs ``jax.vjp`` (random cotangent), float64
                     and float32, eager and jitted; finite differences
                     (float64, in the jitted run) when ``case.fd``
  check_structure    forward and backward as two jitted functions (the cache
                     crosses a jit boundary, holds arrays only); y has
                     ``output_shape``; grads have params' structure, shapes,
                     dtypes; dx has x's shape and dtype (``None`` for a
                     non-float input)
  check_bridge       ``as_custom_vjp(layer)`` under ``jax.vjp`` gives the
                     forward's y, and its VJP is the hand backward
  check_bad_shape    ``case.bad_shape`` is a ``ValueError`` naming the layer and
                     the shape
  check_dy_shape     a dy of the wrong shape is a ``ValueError``
  check_nan          NaN in the input reaches y, and y, dx and grads are NaN
                     exactly where ``jax.vjp`` of the same forward gives NaN
  ================== ========================================================

Non-float inputs (integer token ids: ``x_fn`` returning integers) follow
jaxprop's rule: the backward returns ``dx = None``; checks of dx, the bridge
and the NaN check are skipped for them.

This is verification code: it calls ``jax.grad``/``jax.vjp`` (never used by
the gradient path) and imports no test framework (pytest is not needed).
"""
from __future__ import annotations

import dataclasses
import weakref
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxprop.bridge import as_custom_vjp
from jaxprop.check import (check_gradients, check_layer, default_cotangent, host_normal, host_rng, max_abs,
                           layer_report)
from jaxprop.core import (Layer, Loss, call_forward, cast_floating, default_float, init_state,
                          is_floating, needs_key, output_shape)
from jaxprop.combinators import remat, repeat, residual, serial
from jaxprop.layers.activations import (elu, gelu, identity, leaky_relu, log_softmax, relu, sigmoid, silu,
                                        softmax, softplus, tanh)
from jaxprop.layers.attention import attention
from jaxprop.layers.augment import random_shift
from jaxprop.layers.conv import conv1d, conv2d
from jaxprop.layers.dense import dense
from jaxprop.layers.dropout import dropout
from jaxprop.layers.embedding import embedding
from jaxprop.layers.norm import batch_norm, group_norm, layer_norm
from jaxprop.layers.pooling import avg_pool, global_avg_pool, max_pool
from jaxprop.layers.positional import positional_embedding
from jaxprop.layers.recurrent import bidirectional, gru, lstm, rnn
from jaxprop.layers.reshape import flatten, reshape
from jaxprop.layers.transformer import transformer_block
from jaxprop.losses import mse

__all__ = ["Case", "CASES", "away_from_zero", "setup", "assert_gradients_match", "run_case",
           "check_backward", "check_structure", "check_bridge", "check_bad_shape", "check_dy_shape",
           "check_nan", "CHECKS"]


# ------------------------------------------------------------------------------------ the case record

@dataclasses.dataclass(frozen=True, eq=False)
class Case:
    """How to build one layer and an input for it, for the generic checks.

    Attributes:
      name: the test id.
      make: ``() -> Layer``.
      in_shape: the input's shape, batch axis included.
      ctx: forward keywords (``key``, ``train``, ``state``, ``mask``, ...):
        a dict, or a function ``() -> dict`` for values that are arrays
        (building a Case then allocates nothing).
      x_fn: ``(key, shape, dtype) -> x``; default standard normal. Return
        integers for a layer that takes token ids (then ``dx`` must be None).
      rtol32: float32 tolerance, where the default (1e-4) is too tight.
      fd: whether finite differences are meaningful (no kinks near x); they
        run in the jitted float64 check, on a jitted objective.
      bad_shape: an input shape the layer must reject with a ValueError.
      nan: whether the NaN check applies (a NaN must reach y).
      eager: whether the un-jitted gradient check runs too (off for scans
        beyond a representative few: an eager scan compiles on every call).
    """

    name: str
    make: Callable[[], Layer]
    in_shape: tuple
    ctx: Union[dict, Callable[[], dict]] = dataclasses.field(default_factory=dict)
    x_fn: Optional[Callable] = None
    rtol32: Optional[float] = None
    fd: bool = True
    bad_shape: Optional[tuple] = None
    nan: bool = True
    eager: bool = True

    def __str__(self):
        return self.name


def away_from_zero(key, shape, dtype):
    """Inputs with |x| >= 0.1: finite differences never straddle a kink at 0
    (drawn on the host from the key's bits, as :func:`jaxprop.check.host_normal`)."""
    rng = host_rng(key)
    mag = 0.1 + rng.uniform(size=tuple(shape))
    return jnp.asarray((rng.choice(np.array([-1.0, 1.0]), size=tuple(shape)) * mag).astype(jnp.dtype(dtype)))


def token_ids(vocab: int):
    """An ``x_fn`` for layers that read token ids: integers in [0, vocab) (JAX's default int)."""
    def draw(key, shape, dtype):
        ids = host_rng(key).integers(0, vocab, size=tuple(shape))
        return jnp.asarray(ids.astype(jax.dtypes.canonicalize_dtype(jnp.int64)))
    return draw


def _normal(key, shape, dtype):
    return host_normal(key, shape, dtype)


def _float64_enabled() -> bool:
    return bool(jax.config.jax_enable_x64)


def _resolve_dtype(dtype):
    dtype = jnp.dtype(default_float() if dtype is None else dtype)
    if dtype == jnp.float64 and not _float64_enabled():
        raise ValueError("jaxprop.testing: float64 checks need jax.config.update('jax_enable_x64', True) "
                         "before any array is made (or ask for dtype=jnp.float32)")
    return dtype


def setup(case: Case, dtype=None, seed: int = 0):
    """``(layer, params, x, ctx)`` for ``case``: params from ``layer.init(key(seed)...)``
    and floating state cast to ``dtype`` (default: float64 with x64 on, else
    float32), ``x = case.x_fn(key, case.in_shape, dtype)``; a stateful layer
    without ``state`` in ``ctx`` gets ``init_state``.

    Built once per (case, dtype, seed) and kept: later calls return the same
    layer and arrays (a fresh ``ctx`` dict), so do not donate them. ``init``
    runs under one ``jax.jit`` (eagerly, each random draw of a new shape would
    compile a program of its own)."""
    dtype = _resolve_dtype(dtype)
    made = _SETUPS.setdefault(case, {})
    hit = made.get((dtype.name, seed))
    if hit is None:
        layer, raw, k_x = _initialized(case, seed)
        params = _host_cast(raw, dtype)
        x = (case.x_fn or _normal)(k_x, tuple(case.in_shape), dtype)
        ctx = dict(case.ctx() if callable(case.ctx) else case.ctx)
        if "state" in ctx:
            ctx["state"] = cast_floating(ctx["state"], dtype)
        elif layer.stateful:
            ctx["state"] = cast_floating(init_state(layer, case.in_shape), dtype)
        hit = made[(dtype.name, seed)] = (layer, params, x, ctx)
    layer, params, x, ctx = hit
    return layer, params, x, dict(ctx)


_SETUPS = weakref.WeakKeyDictionary()      # case -> {(dtype name, seed): (layer, params, x, ctx)}
_INITS = weakref.WeakKeyDictionary()       # case -> {seed: (layer, params as init made them, x's key)}


def _initialized(case, seed):
    """``(layer, params as init made them, x's key)``, once per case and seed."""
    made = _INITS.setdefault(case, {})
    hit = made.get(seed)
    if hit is None:
        layer = case.make()
        k_init, k_x = jax.random.split(jax.random.key(seed))
        in_shape = tuple(case.in_shape)
        hit = made[seed] = (layer, jax.jit(lambda k: layer.init(k, in_shape)[1])(k_init), k_x)
    return hit


def _host_cast(tree, dtype):
    """cast_floating on the host (no XLA program per leaf shape)."""
    def cast(a):
        if not is_floating(a) or jnp.result_type(a) == dtype:
            return a
        return jnp.asarray(np.asarray(a).astype(dtype))
    return jax.tree_util.tree_map(cast, tree)


# ------------------------------------------------------------------------------------ the registry

def _drop_ctx():
    return {"key": jax.random.key(7), "train": True}


def _bn_eval_ctx():
    return {"train": False, "state": {"mean": jnp.array([0.5, -1.0, 0.2, 2.0]),
                                      "var": jnp.array([2.0, 0.5, 1.5, 3.0])}}


CASES = [
    Case("dense", lambda: dense(7), (5, 4), bad_shape=(5, 3)),
    Case("dense_nobias", lambda: dense(3, bias=False, w_init="he"), (6, 5), bad_shape=(6, 4)),
    Case("dense_3d", lambda: dense(4, w_init="lecun"), (3, 2, 5), bad_shape=(3, 2, 4)),
    Case("identity", lambda: identity(), (4, 3)),
    Case("sigmoid", lambda: sigmoid(), (4, 6)),
    Case("tanh", lambda: tanh(), (4, 6)),
    Case("relu", lambda: relu(), (5, 6), x_fn=away_from_zero),
    Case("relu_save_output", lambda: relu(save="output"), (5, 6), x_fn=away_from_zero),
    Case("leaky_relu", lambda: leaky_relu(0.1), (5, 6), x_fn=away_from_zero),
    Case("elu", lambda: elu(0.7), (5, 6), x_fn=away_from_zero),
    Case("softplus", lambda: softplus(), (4, 6)),
    Case("gelu", lambda: gelu(), (4, 6)),
    Case("gelu_tanh", lambda: gelu(approximate=True), (4, 6)),
    Case("silu", lambda: silu(), (4, 6)),
    Case("softmax", lambda: softmax(), (4, 5)),
    Case("log_softmax", lambda: log_softmax(), (4, 5)),
    Case("flatten", lambda: flatten(), (3, 2, 4)),
    Case("reshape", lambda: reshape((4, -1)), (3, 2, 4)),
    Case("dropout_train", lambda: dropout(0.3), (6, 5), ctx=_drop_ctx),
    Case("dropout_key", lambda: dropout(0.3, save_mask=False), (6, 5), ctx=_drop_ctx),
    Case("dropout_eval", lambda: dropout(0.3), (6, 5), ctx={"train": False}),
    Case("serial", lambda: serial(dense(6), tanh(), dense(3)), (4, 5), bad_shape=(4, 6)),
    Case("serial_dropout", lambda: serial(dense(6), dropout(0.5), dense(3)), (4, 5),
         ctx=_drop_ctx),
    Case("residual", lambda: residual(serial(dense(5), gelu(), dense(5))), (4, 5),
         bad_shape=(4, 6)),
    # repeat(block, n): lax.scan forward, reverse-scan backward. Finite differences off: an eager
    # scan recompiles per call; repeat's forward is checked equal to serial's (which has finite
    # differences here) in tests/test_repeat.py, with residual and dropout blocks.
    Case("repeat", lambda: repeat(serial(dense(5), tanh()), 3), (4, 5), bad_shape=(4, 6),
         fd=False),
    # CNN layers: every conv/pool/norm layer and mode once, with odd sizes, strides that do not divide
    # the input, dilation with stride, groups. More configurations are in tests/test_conv.py,
    # test_pooling.py and test_norm.py.
    Case("conv1d", lambda: conv1d(4, 3, stride=2, dilation=2, groups=2), (2, 13, 2), bad_shape=(2, 13, 3)),
    Case("conv2d", lambda: conv2d(3, (3, 2), stride=(2, 3), padding=((1, 0), (2, 1)), dilation=(2, 1)),
         (2, 9, 8, 2), bad_shape=(2, 9, 8, 3)),
    Case("max_pool", lambda: max_pool((3, 2), (2, 1), ((1, 0), (0, 1))), (2, 7, 6, 2), bad_shape=(2, 7)),
    Case("avg_pool", lambda: avg_pool(3, 2, "SAME"), (2, 10, 3), bad_shape=(2, 10)),
    Case("global_avg_pool", lambda: global_avg_pool(), (2, 4, 5, 3), bad_shape=(2, 5)),
    Case("batch_norm", lambda: batch_norm(0.8), (3, 5, 4), ctx={"train": True}, bad_shape=(3, 5, 3)),
    Case("batch_norm_eval", lambda: batch_norm(), (3, 5, 4), ctx=_bn_eval_ctx),
    Case("layer_norm", lambda: layer_norm(), (3, 5, 4), bad_shape=(3, 5, 3)),
    Case("group_norm", lambda: group_norm(3), (2, 3, 4, 6), bad_shape=(2, 3, 4, 5)),
    Case("cnn1d_bn_residual", lambda: serial(
        conv1d(4, 3, stride=2, bias=False), batch_norm(), relu(),
        residual(serial(conv1d(4, 3, bias=False), batch_norm(), tanh())),
        max_pool(2), global_avg_pool(), dense(3)), (4, 12, 2), ctx={"train": True}),
    Case("random_shift", lambda: random_shift(2), (3, 7, 2), ctx=_drop_ctx),
    # Sequence layers. Recurrent cells run under jp.scan (forward lax.scan, backward the reverse
    # scan): every cell at T = 1 and T > 1, both directions, both return_sequences modes; eager
    # checks for one case per cell (an eager scan compiles on every call). Finite differences off
    # for relu (kinks). More configurations, PyTorch equality and BPTT training: test_recurrent.py.
    Case("embedding", lambda: embedding(7, 3), (4, 5), x_fn=token_ids(7), bad_shape=(4, 5)),
    Case("embedding_gru", lambda: serial(embedding(6, 3), gru(4, return_sequences=False),
                                            dense(2)), (3, 5), x_fn=token_ids(6), fd=False, eager=False),
    Case("rnn", lambda: rnn(5), (3, 4, 2), bad_shape=(3, 4, 3)),
    Case("rnn_relu_last", lambda: rnn(4, activation="relu", return_sequences=False), (3, 5, 2),
         fd=False, eager=False),
    Case("gru", lambda: gru(5), (3, 4, 2), bad_shape=(3, 4, 3), eager=False),
    Case("gru_reverse_last_t1", lambda: gru(3, return_sequences=False, reverse=True), (2, 1, 2)),
    Case("lstm", lambda: lstm(5), (3, 4, 2), bad_shape=(3, 4, 3), eager=False),
    Case("lstm_reverse_last", lambda: lstm(4, return_sequences=False, reverse=True), (2, 5, 3)),
    Case("bidirectional", lambda: bidirectional(rnn(3), gru(2, reverse=True)), (2, 4, 3),
         eager=False),
    # Attention (save="probs" keeps P; save="lse" is blocked over keys with an online softmax, no T x T
    # array) with T not a multiple of block_size, causal and not, 1-4 heads; finite differences off:
    # dJ/dbk is exactly 0 (softmax ignores a per-row shift), so its difference quotient is pure noise;
    # in float32 both sides of dbk are rounding (about 1e-7 of the largest gradient entry), which the
    # relative-error floor (1e-3 of it) reads as up to 1.5e-4 on some seeds: rtol32 5e-4 (the other
    # leaves stay near 1e-7, and a wrong sign or factor is an O(1) error).
    # More (PyTorch equality, the no-T-by-T-array check): tests/test_attention.py, test_transformer.py.
    Case("attention", lambda: attention(2), (2, 5, 8), bad_shape=(2, 5, 6), fd=False, rtol32=5e-4),
    Case("attention_causal", lambda: attention(4, causal=True), (2, 6, 8), fd=False, eager=False, rtol32=5e-4),
    Case("attention_causal_blocks", lambda: attention(2, causal=True, block_size=3), (2, 7, 8), fd=False,
         eager=False, rtol32=5e-4),
    Case("attention_lse", lambda: attention(1, save="lse", block_size=4), (2, 7, 6), fd=False,
         eager=False, rtol32=5e-4),
    Case("attention_lse_causal", lambda: attention(3, causal=True, save="lse", block_size=4), (2, 10, 6),
         fd=False, eager=False, rtol32=5e-4),
    Case("positional_embedding", lambda: positional_embedding(8), (2, 5, 4), bad_shape=(2, 9, 4)),
    Case("transformer_block", lambda: transformer_block(2), (2, 5, 8), bad_shape=(2, 5, 6), fd=False,
         eager=False),
    Case("transformer_block_lse", lambda: transformer_block(1, mlp_ratio=2, causal=False, save="lse"),
         (2, 6, 4), fd=False, eager=False),
    # remat(layer): caches only the input, re-runs the forward in backward (tests/test_remat.py
    # compares each with the plain layer and measures the memory).
    Case("remat", lambda: remat(serial(dense(6), tanh(), dense(5))), (4, 5), bad_shape=(4, 6)),
    Case("remat_dropout", lambda: remat(serial(dense(6), dropout(0.5), dense(3))), (4, 5),
         ctx=_drop_ctx, eager=False),
    Case("remat_batch_norm", lambda: remat(batch_norm(0.8)), (6, 3), ctx={"train": True}, eager=False),
    Case("remat_transformer_block", lambda: remat(transformer_block(2)), (2, 4, 4), fd=False,
         eager=False),
]
"""Every jaxprop layer, each configuration once: ``tests/test_layers.py`` runs
every generic check on each. Adding a layer adds one entry here."""


# ------------------------------------------------------------------------------------ one assertion

def _targets(loss, pred, key, dtype):
    """Targets a built-in loss accepts, for predictions shaped like ``pred``."""
    if loss.name == "softmax_cross_entropy":
        return jax.random.randint(key, pred.shape[:-1], 0, pred.shape[-1])
    if loss.name == "sigmoid_binary_cross_entropy":
        return jax.random.uniform(key, pred.shape, dtype)
    if loss.name == "mse":
        return jax.random.normal(key, pred.shape, dtype)
    raise ValueError(f"assert_gradients_match: no default targets for loss {loss.name!r}; pass y=")


def assert_gradients_match(layer_or_net: Layer, loss: Optional[Loss] = None, *, params=None, x=None, y=None,
                           in_shape=None, dtype=None, jit: bool = False, seed: int = 0,
                           fd: Optional[bool] = None, rtol: Optional[float] = None, **ctx):
    """Assert that a layer's (or a net's) hand-written gradients match autodiff.

    Without ``loss``: :func:`jaxprop.check_layer` — ``layer.backward(cache,
    dy)`` against ``jax.vjp`` of its forward, for a random normal cotangent
    dy. With ``loss``: :func:`jaxprop.check_gradients` — the training sweep
    ``jp.value_and_grad(net, loss)`` against ``jax.grad`` of J.

    Args:
      layer_or_net: a :class:`jaxprop.Layer` (``serial(...)`` is one).
      loss: a :class:`jaxprop.Loss`, or None.
      params: default ``layer.init(key(seed), in_shape)``.
      x: default standard normal of ``in_shape``; ``in_shape`` defaults to
        ``x.shape``, one of the two is needed.
      y: targets (with a loss); default random targets of the prediction's
        shape: integer labels for ``softmax_cross_entropy``, uniform [0, 1]
        for ``sigmoid_binary_cross_entropy``, normal for ``mse``.
      dtype: the floating dtype params, x and state are cast to; default
        that of ``x`` (or of params), else float64 with x64 on, else float32.
      jit: run the hand-written path under ``jax.jit``.
      seed: for params, x, y, the cotangent and the finite-difference
        directions; a stochastic layer with no ``key=`` gets one from it.
      fd: finite differences too; default: when ``dtype`` is float64.
      rtol: relative tolerance; default by dtype (float64 1e-9, float32 1e-4,
        see ``jaxprop.check.TOLERANCES``).
      **ctx: forward keywords (``key``, ``train``, ``state``, ``mask``...);
        a stateful layer without ``state`` gets ``init_state``.

    Runs under ``jax.default_matmul_precision("highest")`` (no TF32/bf16
    passes for float32 matmuls on accelerators).

    Returns the :class:`jaxprop.GradientReport`. Raises ``AssertionError``
    with the report's table when a gradient differs.
    """
    layer = layer_or_net
    if not isinstance(layer, Layer):
        raise TypeError(f"assert_gradients_match: expected a jaxprop Layer, got {type(layer).__name__}")
    if loss is not None and not isinstance(loss, Loss):
        raise TypeError(f"assert_gradients_match: loss must be a jaxprop Loss, got {type(loss).__name__} "
                        "(did you forget the call, e.g. mse()?)")
    if x is None and in_shape is None:
        raise ValueError(f"assert_gradients_match: {layer.name}: pass x= or in_shape=")
    if dtype is None:
        floats = [a for a in jax.tree_util.tree_leaves((x, params)) if is_floating(a)]
        dtype = jnp.result_type(floats[0]) if floats else None
    dtype = _resolve_dtype(dtype)
    k_init, k_x, k_y, k_key = jax.random.split(jax.random.key(seed), 4)
    in_shape = tuple(np.shape(x)) if x is not None else tuple(in_shape)
    if params is None:
        _, params = layer.init(k_init, in_shape)
    params = cast_floating(params, dtype)
    x = _normal(k_x, in_shape, dtype) if x is None else cast_floating(jnp.asarray(x), dtype)
    if "state" in ctx:
        ctx["state"] = cast_floating(ctx["state"], dtype)
    elif layer.stateful:
        ctx["state"] = cast_floating(init_state(layer, in_shape), dtype)
    if needs_key(layer, train=ctx.get("train", True)) and ctx.get("key") is None:
        ctx["key"] = k_key
    if fd is None:
        fd = dtype == jnp.float64
    with jax.default_matmul_precision("highest"):
        if loss is None:
            report = check_layer(layer, params, x, jit=jit, fd=fd, rtol=rtol, seed=seed, **ctx)
        else:
            if y is None:
                pred = jax.eval_shape(lambda p, xx: call_forward(layer, p, xx, **ctx)[0], params, x)
                y = _targets(loss, pred, k_y, dtype)
            report = check_gradients(layer, loss, params, x, y, jit=jit, fd=fd, rtol=rtol, seed=seed, **ctx)
    if not report.ok:
        raise AssertionError(str(report))
    return report


# ------------------------------------------------------------------------------------ the generic checks

_COMPILED = weakref.WeakKeyDictionary()     # case -> {(dtype, seed): prepared}


def _prepared(case, dtype, seed: int = 0):
    """setup(case, dtype, seed) and the case's jitted forward, backward and
    jax.vjp reference, built once per (case, dtype, seed): every check that
    uses them compiles each once."""
    made = _COMPILED.setdefault(case, {})
    hit = made.get((jnp.dtype(dtype).name, seed))
    if hit is None:
        layer, params, x, ctx = setup(case, dtype, seed)

        def forward(p, xx):
            return call_forward(layer, p, xx, **ctx)

        def reference(p, xx, dy):
            if is_floating(xx):
                y, vjp = jax.vjp(lambda a, b: forward(a, b)[0], p, xx)
                return y, vjp(dy)
            y, vjp = jax.vjp(lambda a: forward(a, xx)[0], p)
            return y, (vjp(dy)[0], None)

        hit = made[(jnp.dtype(dtype).name, seed)] = (layer, params, x, ctx, jax.jit(forward),
                                                     jax.jit(layer.backward), jax.jit(reference))
    return hit


def _cotangent(seed, y):
    # a key no user picks for x (jax.random.key(1) is the README's): fold in a constant
    return host_normal(jax.random.fold_in(jax.random.key(seed), 0x5EED), y.shape, y.dtype)


def _check_dtypes(dtypes):
    if dtypes is None:
        return (jnp.float64, jnp.float32) if _float64_enabled() else (jnp.float32,)
    return tuple(_resolve_dtype(d) for d in dtypes)


def check_backward(case: Case, dtype=None, jit: bool = False, seed: int = 0):
    """The hand backward against ``jax.vjp`` of the forward (as ``check_layer``,
    random cotangent); with finite differences in float64 when jitted and
    ``case.fd`` (the objective they evaluate is jitted either way: running them
    once per case, beside the jitted run every case has, keeps eager runs
    optional). Jitted, the hand side is the case's compiled forward and
    backward (two programs: the cache crosses a jit boundary); eager, it runs
    op by op. The reference is the compiled ``jax.vjp`` either way, shared
    with the other checks. Returns a reason (and checks nothing) for an eager
    run of a case with ``eager=False``."""
    dtype = _resolve_dtype(dtype)
    if not jit and not case.eager:
        return "eager run off for this case (case.eager=False); the jitted check covers it"
    rtol = case.rtol32 if (dtype == jnp.float32 and case.rtol32) else None
    fd = case.fd and dtype == jnp.float64 and jit
    with jax.default_matmul_precision("highest"):
        layer, params, x, ctx, fwd, bwd, ref = _prepared(case, dtype, seed)
        y = jax.eval_shape(fwd, params, x)[0]
        dy = default_cotangent(y.shape, y.dtype, seed)
        if jit:
            hand = bwd(fwd(params, x)[1], dy)
        else:
            hand = layer.backward(call_forward(layer, params, x, **ctx)[1], dy)
        report = layer_report(layer, params, x, dy, hand, ref=ref(params, x, dy)[1], fd=fd, rtol=rtol,
                              seed=seed, **ctx)
    if not report.ok:
        raise AssertionError(str(report))
    if report.dtype != dtype.name:
        raise AssertionError(f"{case.name}: the check ran in {report.dtype}, expected {dtype.name}")


def check_structure(case: Case, dtype=None):
    """Forward and backward as two jitted functions (the cache crosses a jit
    boundary): y has ``output_shape``, the cache holds arrays only, grads have
    params' structure, shapes and dtypes, dx has x's shape and dtype (None for
    a non-float input)."""
    dtype = _resolve_dtype(dtype)
    layer, params, x, ctx, fwd, bwd, _ = _prepared(case, dtype)
    y, cache = fwd(params, x)
    out_shape = output_shape(layer, case.in_shape)
    if tuple(y.shape) != tuple(out_shape):
        raise AssertionError(f"{case.name}: forward gave y of shape {y.shape}, init said {out_shape}")
    if not all(isinstance(a, jax.Array) for a in jax.tree_util.tree_leaves(cache)):
        raise AssertionError(f"{case.name}: the cache holds non-arrays: "
                             f"{[type(a).__name__ for a in jax.tree_util.tree_leaves(cache)]}")
    grads, dx = bwd(cache, _cotangent(3, y))
    g_def, p_def = jax.tree_util.tree_structure(grads), jax.tree_util.tree_structure(params)
    if g_def != p_def:
        raise AssertionError(f"{case.name}: grads have structure {g_def}, params {p_def}")
    for (path, g), p in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree_util.tree_leaves(params)):
        if g.shape != p.shape or g.dtype != p.dtype:
            raise AssertionError(f"{case.name}: grads{jax.tree_util.keystr(path)} is {g.shape} {g.dtype}, "
                                 f"params {p.shape} {p.dtype}")
    if not is_floating(x):
        if dx is not None:
            raise AssertionError(f"{case.name}: the input is {x.dtype} (not floating point), so dx must be "
                                 f"None, got {type(dx).__name__}")
    elif dx is None or dx.shape != x.shape or dx.dtype != x.dtype:
        got = None if dx is None else (dx.shape, dx.dtype)
        raise AssertionError(f"{case.name}: dx is {got}, expected {(x.shape, x.dtype)}")


def check_bridge(case: Case, dtype=None):
    """``as_custom_vjp(layer)`` under ``jax.vjp`` (one jitted program) gives the
    forward's y and, as its VJP, the hand-written backward's grads and dx.
    (That backward equals ``jax.vjp`` of the forward by ``check_backward``, so
    the bridge is right by the two checks together.) Skipped for a non-float input."""
    dtype = _resolve_dtype(dtype)
    layer, params, x, ctx, fwd, bwd, _ = _prepared(case, dtype)
    if not is_floating(x):
        return "the input is not floating point: no dx, no bridge check"
    bridged = as_custom_vjp(layer, **ctx)

    @jax.jit
    def through_bridge(p, xx, d):
        y, vjp = jax.vjp(bridged, p, xx)
        return y, vjp(d)

    y, cache = fwd(params, x)
    dy = _cotangent(5, y)
    y_bridge, g_bridge = through_bridge(params, x, dy)
    g_hand = bwd(cache, dy)
    rtol = 1e-12 if dtype == jnp.float64 else 1e-6
    np.testing.assert_allclose(y_bridge, y, rtol=rtol, atol=rtol * 1e-2 * (max_abs(y) + 1),
                               err_msg=f"{case.name}: the bridge's forward is not the layer's forward")
    h_leaves, b_leaves = jax.tree_util.tree_leaves(g_hand), jax.tree_util.tree_leaves(g_bridge)
    if len(h_leaves) != len(b_leaves):
        raise AssertionError(f"{case.name}: the bridge's VJP has {len(b_leaves)} leaves, the hand backward "
                             f"{len(h_leaves)}")
    for a, b in zip(b_leaves, h_leaves):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * 1e-2 * (max_abs(b) + 1),
                                   err_msg=f"{case.name}: the bridge's VJP is not the hand backward")


def check_bad_shape(case: Case, dtype=None):
    """``case.bad_shape`` is rejected with a ValueError that names the layer
    (or the dense layer inside it) and the shape."""
    if not case.bad_shape:
        return "the case has no bad_shape"
    layer, params, _, ctx = setup(case, dtype)
    x = jnp.zeros(case.bad_shape, _resolve_dtype(dtype))
    try:
        call_forward(layer, params, x, **ctx)
    except ValueError as err:
        msg = str(err)
    else:
        raise AssertionError(f"{case.name}: an input of shape {case.bad_shape} was accepted")
    if not ("dense" in msg or case.name in msg or layer.name in msg):
        raise AssertionError(f"{case.name}: the error does not name the layer: {msg}")
    if str(tuple(case.bad_shape)) not in msg and str(case.bad_shape[-1]) not in msg:
        raise AssertionError(f"{case.name}: the error does not name the shape {case.bad_shape}: {msg}")


def check_dy_shape(case: Case, dtype=None):
    """A dy whose last axis is one too long is a ValueError ("expected dy of shape")."""
    dtype = _resolve_dtype(dtype)
    layer, params, x, ctx, fwd, bwd, _ = _prepared(case, dtype)
    y, cache = fwd(params, x)
    bad = jnp.zeros(y.shape[:-1] + (y.shape[-1] + 1,), y.dtype)
    try:
        bwd(cache, bad)
    except ValueError as err:
        if "expected dy of shape" not in str(err):
            raise AssertionError(f"{case.name}: a wrong dy shape raised an unclear error: {err}")
        return None
    if ctx.get("train", True) is False and not jax.tree_util.tree_leaves(params):
        return "identity in evaluation mode: dy passes through unchecked"
    raise AssertionError(f"{case.name}: backward accepted dy of shape {bad.shape} for y of shape {y.shape}")


def _nan_input(x):
    """x with its whole first example NaN, and one element of the last example."""
    flat = np.array(x).reshape(x.shape[0], -1)          # on the host: no XLA program per shape
    flat[0] = np.nan
    if x.shape[0] > 1:
        flat[-1, flat.shape[1] // 2] = np.nan
    return jnp.asarray(flat.reshape(x.shape))


def _same_nans(case, what, hand, ref):
    h, r = np.asarray(hand, np.float64), np.asarray(ref, np.float64)
    hn, rn = np.isnan(h), np.isnan(r)
    if not np.array_equal(hn, rn):
        where = tuple(int(i) for i in np.argwhere(hn != rn)[0])
        raise AssertionError(
            f"{case.name}: with a NaN in the input, {what} is NaN at {int(np.sum(hn & ~rn))} positions where "
            f"jax.vjp's is not and finite at {int(np.sum(rn & ~hn))} where jax.vjp's is NaN "
            f"(first at index {where}: hand {h[where]}, jax {r[where]})")


def check_nan(case: Case, dtype=None, seed: int = 0):
    """NaN propagates as through ``jax.vjp``: with the first example all NaN
    (and one element of the last), y has a NaN, and y, dx and every grad are
    NaN exactly where ``jax.vjp`` of the same forward gives NaN. (Finite
    values are not compared: where a max over a window holding a NaN routes
    its gradient is arbitrary; finite inputs are ``check_backward``'s.)
    Skipped for a non-float input or ``case.nan=False``."""
    dtype = _resolve_dtype(dtype)
    if not case.nan:
        return "the case opts out of the NaN check"
    layer, params, x, ctx, fwd, bwd, ref = _prepared(case, dtype)
    if not is_floating(x):
        return "the input is not floating point: no NaN to put in"
    x = _nan_input(x)
    y, cache = fwd(params, x)
    if not np.isnan(np.asarray(y)).any():
        raise AssertionError(f"{case.name}: a NaN in the input (its first example) gives no NaN in the output: "
                             "the forward hides it (as a relu mapping NaN to 0 would)")
    dy = _cotangent(seed, y)
    grads, dx = bwd(cache, dy)
    y_ref, (g_ref, dx_ref) = ref(params, x, dy)
    _same_nans(case, "y", y, y_ref)
    _same_nans(case, "dx", dx, dx_ref)
    for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree_util.tree_leaves(g_ref)):
        _same_nans(case, f"grads{jax.tree_util.keystr(path)}", g, r)


CHECKS = {"backward": check_backward, "structure": check_structure, "bridge": check_bridge,
          "bad_shape": check_bad_shape, "dy_shape": check_dy_shape, "nan": check_nan}
"""The generic checks by name; ``run_case`` runs them all."""


def run_case(case: Case, dtypes=None, jit=(False, True), seed: int = 0) -> dict:
    """Run every generic check on ``case``.

    ``check_backward`` runs for each dtype in ``dtypes`` (default float64 and
    float32 with x64 on, else float32) and each ``jit`` mode; the other checks
    once, in the first dtype. Returns ``{check: "ok" | "skipped: why"}``;
    raises one ``AssertionError`` listing every failed check.
    """
    dtypes = _check_dtypes(dtypes)
    jits = (jit,) if isinstance(jit, bool) else tuple(jit)
    runs = [(f"backward[{jnp.dtype(d).name}-{'jit' if j else 'eager'}]",
             lambda d=d, j=j: check_backward(case, d, j, seed)) for d in dtypes for j in jits]
    runs += [(name, lambda fn=fn: fn(case, dtypes[0])) for name, fn in CHECKS.items() if name != "backward"]
    results, failures = {}, []
    for name, run in runs:
        try:
            reason = run()
        except AssertionError as err:
            failures.append(f"{case.name}: {name} FAILED\n{err}")
            results[name] = "FAILED"
        except Exception as err:                 # a check that crashes the layer fails, and says how
            failures.append(f"{case.name}: {name} FAILED: raised {type(err).__name__}: {err}")
            results[name] = "FAILED"
        else:
            results[name] = "ok" if reason is None else f"skipped: {reason}"
    if failures:
        raise AssertionError("\n\n".join(failures))
    return results
