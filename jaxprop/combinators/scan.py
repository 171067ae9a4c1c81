r"""``scan(cell)``: a recurrent cell run over time; backprop through time by hand.

A *cell* is one step of a recurrence with parameters theta shared by every
step. With carry h (the state), input x_t and output y_t::

    (h_t, y_t) = f(theta, h_{t-1}, x_t),     t = 1..T,   h_0 given

``scan`` runs f with ``jax.lax.scan`` over the time axis and keeps each
step's cache (stacked along time); the parameters are closed over, never
stacked, so the cache holds one copy of the weights however long T is.

Backprop through time (BPTT) is ``serial``'s reverse sweep laid along time.
Unroll the recurrence: h_t depends on h_{t-1} and, through it, on every
earlier step, so J depends on h_t along two kinds of path, directly through
y_t and through h_{t+1}. The chain rule sums both (fan-out of h_t)::

    dh_t^total = dJ/dh_t = [dJ/dy_t . dy_t/dh_t] + [dJ/dh_{t+1} . dh_{t+1}/dh_t]

and the second term is exactly what step t+1's backward returns as its
``dh``. So the reverse scan carries dh from step t+1 to step t, computed
once and reused by every earlier step (the dynamic programme)::

    dh_T = 0
    for t = T..1:   (dtheta_t, dh_{t-1}, dx_t) = f.backward(cache_t, dh_t, dy_t)
    dtheta = sum_t dtheta_t          (theta fans out to all T steps: the paths sum)
    dx     = (dx_1, ..., dx_T)

A step's backward receives dh_t from step t+1 and dy_t (the cotangent of its
own output) separately and combines them itself (for the recurrent layers
y_t = h_t, so it simply adds them). The weight gradients are summed in the
reverse scan's carry, so no per-step gradient is stored (or, for a cell with
``sum_grads``, after the scan: below). With
``return_sequences=False`` only the last step's output is returned and only
that step receives a nonzero dy_t.

Cell protocol (:class:`Cell`); writing a new recurrent cell means writing
``step_forward`` and ``step_backward`` and nothing else::

    params               = cell.init(key, x_shape)          -> (y_shape, params); shapes of one step, (N, ...)
    h_0                  = cell.init_carry(params, x_t)     the initial carry (zeros), a pytree
    h_t, y_t, cache_t    = cell.step_forward(params, h_{t-1}, x_t)
    dtheta_t, dh_{t-1}, dx_t = cell.step_backward(params, cache_t, dh_t, dy_t)

``dh_t`` has the carry's structure (an LSTM's is the pair (dh, dc)),
``dtheta_t`` the structure of params. A cell that reads integer inputs may
return ``dx_t = None`` (no gradient for non-float inputs).

Summing after the sweep (optional, ``Cell.sum_grads``). Inside the reverse
scan only dh must be sequential; dtheta_t is not needed by any earlier step.
When each dtheta_t is a product of something the step cached and something
its backward returns as dx_t (for a recurrent layer dW_hh = sum_t
h_{t-1}^T ds_t, with ds_t = dx_t up to a cached gate), a cell can give that
rule as ``sum_grads(params, caches, dxs)``, written over leading axes so that
it applies to one step's (N, ...) arrays or to all steps' stacked (T, N, ...)
ones. Its ``step_backward`` then returns ``dtheta_t = None`` and the scan
places the sum::

    after the sweep:  dtheta = cell.sum_grads(params, caches, dxs)         one contraction over T N rows
    in the loop:      dtheta = sum_t cell.sum_grads(params, cache_t, dx_t)  a running sum in the carry

After the sweep, the reverse scan carries dh alone: T small products
(N, H)^T (N, G H) and an (H, G H) running sum become one (H, T N) @ (T N, G H)
product outside the loop (autodiff of the forward scan always accumulates
inside the transposed loop). That pays when the running sum's traffic, H G H
per step, is large against the step's N H G H products, i.e. for small
batches: measured on 2 CPU cores (training step, paired, same process;
``python -m experiments.bench.rnn_bptt --sum-ab``), after / in the loop was
0.85 for lstm(512) and 0.91 for gru(512) at N = 32, T = 128, but 1.16 for
gru(128) at N = 100, T = 40 (lstm(128) there: 1.00). ``scan(...,
sum_after=None)`` (the default) therefore sums after the sweep when N < 64
and in the loop otherwise; True / False force it.

Layout: the layer is batch-first, x (N, T, ...) -> y (N, T, ...) (or the
last step's output (N, ...)), transposed to time-major (T, N, ...) inside
(``time_major=True``: x and y are (T, N, ...) already, no transposes).
``reverse=True`` runs t = T..1 (the scan's ``reverse``) and still returns the
outputs in input order; the backward then runs t = 1..T.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxprop.core import Layer, check_same_shape, matmul_operands, shape_token, token_shape


class Cell(NamedTuple):
    """One step of a recurrence (see the module docstring for the protocol).

    Attributes:
      init: ``(key, x_shape) -> (y_shape, params)``; shapes of one time step,
        batch axis first, e.g. ``(N, D) -> (N, H)``.
      step_forward: ``(params, h, x_t) -> (h_new, y_t, cache_t)``.
      step_backward: ``(params, cache_t, dh_new, dy_t) -> (dparams, dh, dx_t)``.
      init_carry: ``(params, x_t) -> h_0``, the initial carry (a pytree).
      name: used in error messages.
      sum_grads: optional ``(params, caches, dxs) -> dparams``, the parameter
        gradient from caches and dx_t, over leading axes: of one step, or
        summed over all steps when given them stacked (module docstring);
        with it ``step_backward`` returns ``dparams=None``.
    """

    init: Callable
    step_forward: Callable
    step_backward: Callable
    init_carry: Callable
    name: str = "cell"
    sum_grads: Optional[Callable] = None


def _add(a, b):
    return jax.tree_util.tree_map(jnp.add, a, b)


def _zeros_from_tokens(tokens):
    return jax.tree_util.tree_map(lambda tok: jnp.zeros(token_shape(tok), tok.dtype), tokens)


#: ``scan(sum_after=None)``: a cell's ``sum_grads`` runs after the sweep when the batch N is below this
#: (module docstring: measured on CPU), else in the loop.
SUM_AFTER_BELOW_BATCH = 64


def scan(cell: Cell, *, return_sequences: bool = True, reverse: bool = False, time_major: bool = False,
         unroll: int = 1, sum_after: Optional[bool] = None, name: str = None) -> Layer:
    r"""The layer that runs ``cell`` over the time axis of a batch-first input.

    Shapes: x (N, T, ...); y (N, T, ...) with ``return_sequences=True``, else
    the output of the last step processed, (N, ...) (t = T, or t = 1 when
    ``reverse=True``). dx has x's shape. Params: the cell's (shared by all
    steps); grads: their sum over steps (module docstring).

    Args:
      cell: a :class:`Cell`.
      return_sequences: return every step's output, or only the last one.
      reverse: run from the last time step to the first (outputs stay in
        input order).
      time_major: x, y, dy and dx are (T, N, ...) instead of batch-first:
        no transposes (for a caller that produces its input time-major).
      unroll: passed to both ``lax.scan`` calls.
      sum_after: for a cell with ``sum_grads``: sum the parameter gradients
        after the reverse sweep (True) or in its loop (False); default None:
        after when the batch N < ``SUM_AFTER_BELOW_BATCH`` (64). The same
        numbers up to rounding either way.
      name: the layer's name (default ``scan(<cell name>)``).

    The cache holds params once, each step's cache stacked along time (T, ...),
    and zero-size shape tokens.
    """
    if not isinstance(cell, Cell):
        raise TypeError(f"scan: cell must be a jaxprop.combinators.scan.Cell, got {type(cell).__name__}")
    name = name or f"scan({cell.name})"

    layout = "(T, N, ...)" if time_major else "batch-first (N, T, ...)"
    t_axis = 0 if time_major else 1

    def init(key, in_shape):
        in_shape = tuple(in_shape)
        if len(in_shape) < 3:
            raise ValueError(f"{name}: in_shape must be {layout} with T >= 1, got {in_shape}")
        t, n = (in_shape[0], in_shape[1]) if time_major else (in_shape[1], in_shape[0])
        y_shape, params = cell.init(key, (n,) + in_shape[2:])
        y_shape = tuple(y_shape)
        if not return_sequences:
            return y_shape, params
        return ((t,) + y_shape) if time_major else (y_shape[:1] + (t,) + y_shape[1:]), params

    def forward(params, x):
        if jnp.ndim(x) < 3 or x.shape[t_axis] < 1:
            raise ValueError(f"{name}: expected a {layout} input with T >= 1, got shape {tuple(jnp.shape(x))}")
        xs = jnp.moveaxis(x, t_axis, 0)                              # (T, N, ...) time-major
        h0 = cell.init_carry(params, xs[0])
        p_loop = matmul_operands(params)                             # rounded once, if matmuls round
        if return_sequences:
            def step(h, x_t):                                        # (h_t, y_t) = f(theta, h_{t-1}, x_t)
                h, y_t, c = cell.step_forward(p_loop, h, x_t)
                return h, (y_t, c)

            h, (ys, steps) = jax.lax.scan(step, h0, xs, reverse=reverse, unroll=unroll)
            y = jnp.moveaxis(ys, 0, t_axis)                          # (N, T, ...) unless time_major
        else:
            y_aval = jax.eval_shape(lambda p, hh, xt: cell.step_forward(p, hh, xt)[1], p_loop, h0, xs[0])

            def step(carry, x_t):                                    # keep only the latest y_t
                h, _ = carry
                h, y_t, c = cell.step_forward(p_loop, h, x_t)
                return (h, y_t), c

            (h, y), steps = jax.lax.scan(step, (h0, jnp.zeros(y_aval.shape, y_aval.dtype)), xs,
                                         reverse=reverse, unroll=unroll)
        return y, {"params": params, "steps": steps, "carry": jax.tree_util.tree_map(shape_token, h),
                   "time": jnp.zeros((0, xs.shape[0]), jnp.int8), "y_shape": shape_token(y)}

    def backward(cache, dy):
        check_same_shape(name, token_shape(cache["y_shape"]), dy)
        params = cache["params"]
        t_len = cache["time"].shape[1]
        dh_last = _zeros_from_tokens(cache["carry"])                  # nothing flows in after the last step
        rule = cell.sum_grads
        after = rule is not None and (sum_after if sum_after is not None else      # N: the carry's batch axis
                                      token_shape(jax.tree_util.tree_leaves(cache["carry"])[0])[0]
                                      < SUM_AFTER_BELOW_BATCH)
        g0 = () if after else jax.tree_util.tree_map(jnp.zeros_like, params)
        params = matmul_operands(params)                              # after g0: grads keep params' dtypes
        if return_sequences:
            dys = jnp.moveaxis(dy, t_axis, 0)                         # (T, N, ...)
            dy_of = lambda t_or_dy: t_or_dy                           # noqa: E731
        else:
            last = 0 if reverse else t_len - 1                        # the step whose output was returned
            dys = jnp.arange(t_len)
            dy_of = lambda t: jnp.where(t == last, dy, jnp.zeros_like(dy))  # noqa: E731

        def step(carry, xs):                                          # one step of BPTT
            dh, g = carry                                             # dh = dJ/dh_t from step t+1
            c, d = xs
            dp, dh, dx_t = cell.step_backward(params, c, dh, dy_of(d))
            if after:
                return (dh, g), dx_t
            if rule is not None:                                      # the cell's rule, one step at a time
                dp = rule(params, c, dx_t)
            return (dh, _add(g, dp)), dx_t                            # dtheta = sum_t dtheta_t

        (_, grads), dxs = jax.lax.scan(step, (dh_last, g0), (cache["steps"], dys),
                                       reverse=not reverse, unroll=unroll)
        if after:
            grads = cell.sum_grads(params, cache["steps"], dxs)       # the same sum, one contraction
        return grads, (None if dxs is None else jnp.moveaxis(dxs, 0, t_axis))

    return Layer(init, forward, backward, name=name)
