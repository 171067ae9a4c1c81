"""The layer and loss records, the forward context, and the helpers every layer shares.

Notation used in every docstring of jaxprop: for a cost J and any array ``a``
of the computation, ``da`` is dJ/da, an array of the same shape as ``a``
(autodidax calls it the cotangent ``a_bar``). A backward pass receives ``dy``
and returns the gradients of its parameters and ``dx``.

The layer protocol (see DESIGN.md, section 1)::

    out_shape, params = layer.init(key, in_shape)    # in_shape includes the batch axis
    y, cache          = layer.forward(params, x, **ctx)   # cache: arrays backward needs
    grads, dx         = layer.backward(cache, dy)    # grads: same pytree as params

**The forward context is open.** ``ctx`` is any set of keywords: ``key=``
(a PRNG key), ``train=`` (training or evaluation), ``state=`` (running
statistics), and whatever a future layer reads (``mask=``, ``positions=``).
:func:`call_forward` passes each layer exactly the keywords its ``forward``
signature declares (all of them when it has ``**kwargs``), so a simple layer
is ``forward(params, x)`` and never sees a keyword it does not use; dropout
declares ``key=None, train=True``, batch norm ``state=None, train=True``.
Combinators declare ``**ctx``: they split ``key`` into one key per child
(when it is given and not None), hand each child its own slice of
``state``, and pass every other keyword on unchanged. A new keyword
therefore touches only the layers that read it -- not the combinators, the
gradient sweep, the checker or the training loop, which all pass ``**ctx``
through (the style of stax's ``**kwargs`` and optax's extra args).

Two capabilities, declared on the record, tell the callers what to supply:

* ``stochastic=True`` (dropout): training needs ``key=`` (:func:`needs_key`).
* ``init_state`` / ``update_state`` (batch norm): ``forward`` takes
  ``state=``; ``init_state(in_shape)`` builds the state (running statistics)
  that the optimizer never touches, and ``update_state(state, cache)``
  returns the next state after a training forward pass. Stateless layers
  have state ``()``.

**Per-example rules** (optional, :mod:`jaxprop.per_example`): ``per_example(cache,
dy) -> (per_example_grads, dx)`` and ``per_example_norms(cache, dy) -> (sq, dx)``
sit next to a layer's backward; :func:`call_per_example` and
:func:`call_per_example_norms` dispatch to them (the backward itself for a
layer without parameters; :class:`PerExampleUnsupported` for a layer with
parameters and no rule).

**Non-float inputs** (integer token ids) get no gradient: the layer's
backward returns ``dx = None``. ``serial`` accepts that from its first layer
only (a later layer's input is an earlier layer's output, which carries a
gradient); the gradient sweep and the checker expect ``dx is None`` exactly
when the input is not floating point (:func:`is_floating`) and report the
parameters only.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Shape = tuple
PyTree = Any


class Layer(NamedTuple):
    """A layer: three pure functions and two optional capabilities.

    Attributes:
      init: ``(key, in_shape) -> (out_shape, params)``.
      forward: ``(params, x, **ctx) -> (y, cache)``, declaring the context
        keywords it reads (none for most layers; see :func:`call_forward`);
        ``cache`` is a pytree of arrays only, so it can cross ``jax.jit``.
      backward: ``(cache, dy) -> (grads, dx)``; ``grads`` has the structure,
        shapes and dtypes of ``params`` (``()`` for a layer without
        parameters); ``dx`` is ``None`` when the input is not floating point.
      name: used in error messages and gradient reports.
      init_state: ``in_shape -> state`` for layers with non-trainable state
        (running statistics); ``None`` for stateless layers.
      update_state: ``(state, cache) -> state`` after a training forward pass.
      stochastic: training needs ``key=`` (dropout); see :func:`needs_key`.
      per_example: optional ``(cache, dy) -> (per_example_grads, dx)``, the
        layer's per-example rule (see :func:`call_per_example`):
        ``per_example_grads`` has the pytree of ``params`` with a leading
        batch axis N on every leaf; ``dx`` is ``backward``'s. ``None``: a
        layer without parameters uses its ``backward``; one with parameters
        has no per-example gradients (an error naming it).
      per_example_norms: optional ``(cache, dy) -> (sq, dx)`` with ``sq``
        (N,) the squared L2 norm of each example's gradient over all of this
        layer's parameters, computed without forming the per-example
        gradients where the layer can ("ghost norms"); ``None``: from
        ``per_example`` (see :func:`call_per_example_norms`).
    """

    init: Callable
    forward: Callable
    backward: Callable
    name: str = "layer"
    init_state: Optional[Callable] = None
    update_state: Optional[Callable] = None
    stochastic: bool = False
    per_example: Optional[Callable] = None
    per_example_norms: Optional[Callable] = None

    @property
    def stateful(self) -> bool:
        return self.init_state is not None


class Loss(NamedTuple):
    """A loss: ``J = forward(pred, target)``, mean over the batch axis.

    Attributes:
      forward: ``(pred, target, **kw) -> (value, cache)``; ``value`` is a
        scalar; ``kw`` is e.g. ``where=`` (a mask of the positions that count).
      backward: ``(cache, dvalue=1.0) -> dpred`` with ``dpred`` = dJ/dpred.
      name: used in error messages and reports.
      backward_target: optional ``(cache, dvalue) -> dtarget`` for float
        targets (used by the custom_vjp bridge); ``None`` when the target is
        integer labels or its gradient is not defined.
    """

    forward: Callable
    backward: Callable
    name: str = "loss"
    backward_target: Optional[Callable] = None


@functools.lru_cache(maxsize=4096)
def _declared_cached(fn) -> Optional[frozenset]:
    return _declared(fn)


def _declared(fn) -> Optional[frozenset]:
    """The keyword names ``fn(params, x, ...)`` accepts after its two positional
    arguments; ``None`` when it takes ``**kwargs`` (or has no signature): all."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    names, positional = [], 0
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            return None
        if p.kind is p.POSITIONAL_ONLY:
            positional += 1
        elif p.kind is p.POSITIONAL_OR_KEYWORD:
            positional += 1
            if positional > 2:                  # after (params, x)
                names.append(p.name)
        elif p.kind is p.KEYWORD_ONLY:
            names.append(p.name)
    return frozenset(names)


def declared_keywords(fn) -> Optional[frozenset]:
    """The context keywords ``fn`` (a ``forward``) declares, cached per function;
    ``None`` means every keyword (``**kwargs``)."""
    try:
        return _declared_cached(fn)
    except TypeError:                           # an unhashable callable: not cached
        return _declared(fn)


def call_forward(layer: Layer, params, x, **ctx):
    """Run ``layer.forward(params, x, **kw)`` with ``kw`` the keywords of ``ctx``
    that ``layer.forward`` declares (all of ``ctx`` if it takes ``**kwargs``).

    A keyword the layer does not declare is not passed; one it declares but
    ``ctx`` lacks keeps the layer's default (``train=True``, ``key=None``).
    """
    names = declared_keywords(layer.forward)
    if names is not None:
        ctx = {k: v for k, v in ctx.items() if k in names}
    return layer.forward(params, x, **ctx)


class PerExampleUnsupported(ValueError):
    """A layer that has no per-example gradients: no rule (``Layer.per_example``),
    or its forward mixes the examples of a batch (batch norm in training)."""


def call_per_example(layer: Layer, cache, dy):
    """The per-example backward of one layer: ``(per_example_grads, dx)``.

    ``dy``'s row n must be the gradient of example n's own loss term
    (:mod:`jaxprop.per_example` calls the loss backward with dvalue = N), so
    that, for a layer whose forward treats the examples independently,
    ``per_example_grads[leaf][n]`` is the gradient of that term alone and
    ``dx`` (the ordinary backward's) again has rows of single examples.

    ``layer.per_example`` when the layer has one; otherwise a layer without
    parameters (activations, reshapes, pooling, dropout) runs its
    ``backward`` (its grads are ``()``: nothing per example), and a layer with
    parameters raises :class:`PerExampleUnsupported` naming it (never a wrong
    number). A layer without parameters whose forward *mixes* examples (e.g.
    centring over the batch) would pass on mixed rows; none of jaxprop's does.
    """
    if layer.per_example is not None:
        return layer.per_example(cache, dy)
    grads, dx = layer.backward(cache, dy)
    if jax.tree_util.tree_leaves(grads):
        raise PerExampleUnsupported(
            f"{layer.name}: no per-example gradient rule (Layer.per_example); per-example gradients and "
            "DP-SGD cover dense, conv1d/conv2d, layer_norm, group_norm, batch_norm(train=False), "
            "embedding, layers without parameters, and serial/residual/repeat of them")
    return grads, dx


def call_per_example_norms(layer: Layer, cache, dy):
    """``(sq, dx)``: sq (N,) the squared L2 norm of each example's gradient over
    ``layer``'s parameters (dy as in :func:`call_per_example`).

    ``layer.per_example_norms`` when the layer has one; else the squares of
    :func:`call_per_example`'s gradients summed per example (zeros for a
    layer without parameters).
    """
    if layer.per_example_norms is not None:
        return layer.per_example_norms(cache, dy)
    grads, dx = call_per_example(layer, cache, dy)
    return per_example_sq_norms(grads, dy.shape[0], dy.dtype), dx


def per_example_sq_norms(per_example_grads, n: int, dtype):
    """(n,): sum over the leaves of ``per_example_grads`` (leading axis n) of
    each row's squared entries; zeros when there are no leaves."""
    sq = jnp.zeros((n,), dtype)
    for g in jax.tree_util.tree_leaves(per_example_grads):
        sq = sq + (g * g).reshape(n, -1).sum(axis=1).astype(dtype)
    return sq


def call_loss(loss: Loss, pred, target, **kw):
    """``loss.forward(pred, target, **kw)`` with the keywords that are None left out,
    so ``where=None`` reaches a loss that has no ``where=``."""
    return loss.forward(pred, target, **{k: v for k, v in kw.items() if v is not None})


def needs_key(layer: Layer, *, train: bool = True) -> bool:
    """True when ``layer``'s forward must be given ``key=``: it is stochastic
    (dropout, random augmentation) and runs in training mode."""
    return bool(layer.stochastic) and bool(train)


def require_key(name: str, key):
    """The error of a stochastic layer run in training mode without a key."""
    if key is None:
        raise ValueError(f"{name}: training mode needs a PRNG key (forward(..., key=k)); "
                         "pass train=False to evaluate")


def require_state(layer: Layer, state):
    """The error of a network with state (batch norm) run without ``state=``."""
    if layer.stateful and state is None:
        raise ValueError(f"{layer.name}: this network has state (e.g. batch norm); pass "
                         "state=jp.init_state(net, in_shape) and read ((value, state), grads)")


def is_floating(x) -> bool:
    """True when ``x`` (an array, a scalar or a dtype) is floating point."""
    if x is None:
        return False
    return bool(jnp.issubdtype(jnp.result_type(x), jnp.floating))


def cast_floating(tree, dtype):
    """Cast every floating-point leaf of ``tree`` to ``dtype``; integer leaves
    (labels, token ids, step counters) are left alone."""
    dtype = jnp.dtype(dtype)
    return jax.tree_util.tree_map(lambda a: a.astype(dtype) if is_floating(a) else a, tree)


def check_grads(name: str, grads, params, what: str = "grads"):
    """Raise a ``ValueError`` unless ``grads`` has the structure of ``params`` and
    every leaf its parameter's shape and dtype (``grads`` must be usable as
    optax's updates). Static: free under ``jit``."""
    g_leaves, g_def = jax.tree_util.tree_flatten_with_path(grads)
    p_leaves, p_def = jax.tree_util.tree_flatten_with_path(params)
    if g_def != p_def:
        g_paths = {jax.tree_util.keystr(k) for k, _ in g_leaves}
        p_paths = {jax.tree_util.keystr(k) for k, _ in p_leaves}
        detail = ""
        if g_paths != p_paths:
            missing, extra = sorted(p_paths - g_paths), sorted(g_paths - p_paths)
            detail = (f" (missing {what}{', '.join(missing) or ' -'}; unexpected {what}"
                      f"{', '.join(extra) or ' -'})")
        raise ValueError(f"{name}: backward returned {what} with structure {g_def}, expected the "
                         f"structure of params {p_def}{detail}")
    for (path, g), (_, p) in zip(g_leaves, p_leaves):
        g_shape, p_shape = tuple(np.shape(g)), tuple(np.shape(p))
        g_dtype, p_dtype = jnp.result_type(g), jnp.result_type(p)
        if g_shape != p_shape or g_dtype != p_dtype:
            where = jax.tree_util.keystr(path)
            raise ValueError(f"{name}: backward returned {what}{where} of shape {g_shape} {g_dtype}, "
                             f"expected {p_shape} {p_dtype} (the shape and dtype of params{where})")


def check_dx(name: str, dx, x):
    """Raise a ``ValueError`` unless ``dx`` fits the input ``x``: the shape and
    dtype of ``x`` for a floating-point input, ``None`` allowed otherwise.
    (An input that is a pytree rather than one array is not checked.)"""
    if not hasattr(x, "dtype") or not is_floating(x):
        return
    if dx is None:
        raise ValueError(f"{name}: backward returned dx=None for a floating-point input of shape "
                         f"{tuple(np.shape(x))} {jnp.result_type(x)} (only non-float inputs, e.g. "
                         "integer token ids, have no gradient)")
    if tuple(np.shape(dx)) != tuple(np.shape(x)) or jnp.result_type(dx) != jnp.result_type(x):
        raise ValueError(f"{name}: backward returned dx of shape {tuple(np.shape(dx))} "
                         f"{jnp.result_type(dx)}, expected {tuple(np.shape(x))} {jnp.result_type(x)} "
                         "(the shape and dtype of the input)")


def init_state(layer: Layer, in_shape) -> PyTree:
    """The layer's initial non-trainable state (``()`` for stateless layers)."""
    return layer.init_state(tuple(in_shape)) if layer.stateful else ()


def output_shape(layer: Layer, in_shape) -> Shape:
    """The output shape of ``layer`` for ``in_shape``, without allocating params."""
    box = []

    def run(key):
        out_shape, params = layer.init(key, tuple(in_shape))
        box.append(tuple(out_shape))
        return params

    jax.eval_shape(run, jax.random.key(0))
    return box[0]


def matmul(a, b):
    r"""``a @ b``, with ``jax.default_matmul_precision("bfloat16")`` honoured on every backend.

    Under that setting (``with jax.default_matmul_precision("bfloat16"):``
    around the tracing of a jitted function, or the runner's
    ``--matmul-precision bfloat16``), float32 operands are rounded to bfloat16
    and their products summed in float32; the result is float32::

        a @ b  ~  bf16(a) @ bf16(b)          (each product exact, sums in float32)

    That is what TPUs do for float32 matmuls by default and what the setting
    asks of GPUs, but XLA:CPU ignores it and multiplies in float32 whatever
    it says; casting the operands here makes the setting mean the same on
    every backend. On CPUs with AMX or AVX512-BF16 units such a product runs
    at 2-3x the float32 rate. Each operand's relative rounding error is at
    most 2^-9 (bfloat16 keeps 8 significant bits); the sums keep float32's.
    Any other setting, or none, or operands that are not float32 (float64,
    both half precision), is a plain ``a @ b``. A bfloat16 operand with a
    float32 one counts as float32 (see :func:`matmul_operands`).

    The layers' forward *and* hand-written backward products go through here
    and through :func:`matmul_nt` (``a @ b^T``, dX = dY W^T) and
    :func:`matmul_tn` (``a^T @ b``, dW = X^T dY): dense, the recurrent
    layers and attention's projections, so a step traced under the setting
    rounds the operands of all three the same way.
    """
    if _rounds(a, b):
        return _dot(a, b, (a.ndim - 1,), (0,))
    return a @ b


def matmul_nt(a, b):
    """``a @ b.T`` for a 2-D ``b``, rounding as :func:`matmul` does. The
    contraction is given to XLA as it is (last axis with last axis), since a
    transpose inside a loop body was not folded into the bfloat16 product."""
    if _rounds(a, b):
        return _dot(a, b, (a.ndim - 1,), (1,))
    return a @ b.T


def matmul_tn(a, b):
    r"""``a.T @ b`` for 2-D ``a`` (M, I) and ``b`` (M, O): the (I, O) sum over
    the M rows, rounding as :func:`matmul` does. XLA:CPU runs a bfloat16
    product that contracts the lhs's *first* axis in float32 (it converts the
    operands back); contracting (M, 1) as a pair of axes makes it copy a^T
    once and take the fast path (13 against 29 ms for a (512, 4096) x
    (4096, 2048) product on the machine of this round's figures)."""
    if _rounds(a, b):
        return _dot(jnp.transpose(a[:, None, :], (2, 0, 1)), b[:, None, :], (1, 2), (0, 1))
    return a.T @ b


def _rounds(a, b) -> bool:
    return (_bf16_matmuls() and jnp.result_type(a, b) == jnp.float32
            and {jnp.result_type(a), jnp.result_type(b)} <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)})


def _dot(a, b, ca, cb):
    """The bfloat16 x bfloat16 -> float32 product, kept whole: without the
    barrier XLA folds a consumer's transpose (``matmul(a, b).T``, the tied
    head's dW^T) into the product, and XLA:CPU has no kernel for the folded
    form ("Unsupported element type for DotThunk: BF16 x BF16 = F32")."""
    out = jax.lax.dot_general(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), ((ca, cb), ((), ())),
                              preferred_element_type=jnp.float32)
    return jax.lax.optimization_barrier(out)


def _bf16_matmuls() -> bool:
    return jax.config.jax_default_matmul_precision == "bfloat16"


def matmul_operands(tree):
    """``tree`` with its float32 matrices (ndim >= 2) rounded to bfloat16 when
    :func:`matmul` rounds its operands (``jax.default_matmul_precision("bfloat16")``),
    else ``tree`` itself. For loops: a weight read at every step (the
    recurrent W_hh) is rounded once before the ``lax.scan``, not at each
    step (XLA does not hoist the cast, and it cost more than it saved);
    :func:`matmul` takes a bfloat16 operand with a float32 one as it is.
    Vectors (biases) stay float32: they are added, not multiplied."""
    if not _bf16_matmuls():
        return tree
    return jax.tree_util.tree_map(
        lambda a: a.astype(jnp.bfloat16) if jnp.ndim(a) >= 2 and jnp.result_type(a) == jnp.float32 else a, tree)


def default_float():
    """float64 when ``jax_enable_x64`` is on, else float32."""
    return jnp.zeros(()).dtype


def check_input(name: str, x, *, ndim=None, min_ndim=None, last=None, dtype=None,
                what: str = "input"):
    """Raise a ``ValueError`` naming the layer and both shapes/dtypes.

    Runs at trace time on static shapes, so it costs nothing under ``jit``.
    """
    shape = tuple(np.shape(x))
    if ndim is not None and len(shape) != ndim:
        raise ValueError(f"{name}: expected a rank-{ndim} {what}, got shape {shape} (rank {len(shape)})")
    if min_ndim is not None and len(shape) < min_ndim:
        raise ValueError(f"{name}: expected a {what} of rank >= {min_ndim}, got shape {shape}")
    if last is not None and (not shape or shape[-1] != last):
        raise ValueError(f"{name}: expected {what} with {last} features on the last axis, "
                         f"got shape {shape}")
    if dtype is not None and jnp.result_type(x) != jnp.dtype(dtype):
        raise ValueError(f"{name}: expected {what} of dtype {jnp.dtype(dtype)}, "
                         f"got {jnp.result_type(x)} (cast the input or the parameters explicitly)")


def check_same_shape(name: str, expected, got, what: str = "dy"):
    """``expected``: a shape tuple, or an array whose shape ``got`` must have."""
    exp = tuple(expected) if isinstance(expected, (tuple, list)) else tuple(np.shape(expected))
    if tuple(np.shape(got)) != exp:
        raise ValueError(f"{name}: expected {what} of shape {exp}, got {tuple(np.shape(got))}")


def check_float(name: str, x, what: str = "input"):
    if not is_floating(x):
        raise ValueError(f"{name}: expected a floating-point {what}, got dtype {jnp.result_type(x)}")


def is_concrete(x) -> bool:
    """True when ``x`` holds values now (not a tracer inside jit/grad)."""
    return not isinstance(x, jax.core.Tracer)


def shape_token(x) -> Array:
    """A zero-size array whose shape records ``x``'s shape: ``(0, *x.shape)``.

    Caches hold arrays only (so they cross ``jit``), yet some backward passes
    need a static shape (flatten, or checking ``dy``). This costs no memory.
    """
    return jnp.zeros((0,) + tuple(x.shape), x.dtype)


def token_shape(token) -> Shape:
    return tuple(token.shape[1:])
