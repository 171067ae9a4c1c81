r"""Recurrent layers (``rnn``, ``gru``, ``lstm``), exactly PyTorch's ``nn.RNN``,
``nn.GRU`` and ``nn.LSTM`` with ``batch_first=True``, and ``bidirectional``.

Shapes: x (N, T, D) batch-first; H hidden units; G gates (rnn 1, gru 3, lstm 4).
Params (PyTorch's, transposed so that rows multiply from the left)::

    w_ih (D, G H) = weight_ih_l0.T      b_ih (G H,) = bias_ih_l0
    w_hh (H, G H) = weight_hh_l0.T      b_hh (G H,) = bias_hh_l0

with the gate blocks of G H in PyTorch's order: (r, z, n) for the GRU,
(i, f, g, o) for the LSTM. h_0 = 0 (and c_0 = 0). Output: h_t for every t,
(N, T, H), or with ``return_sequences=False`` the final state (N, H)
(PyTorch's ``h_n``; for ``reverse=True`` the state after reading x_0).

Every layer is two parts:

1. The input projection, which does not depend on h::

       a_t = x_t W_ih + b_ih          (N, D) @ (D, G H) -> (N, G H);   A = [a_1 .. a_T]  (T, N, G H)

   computed inside the forward loop, at the start of each step, so that A is
   never written to memory (``PROJECT_IN_LOOP``; before the loop, as one
   (T N, D) @ (D, G H) product, A costs a write and two reads of T N G H
   floats). Measured on 2 CPU cores (hand training step, paired, same
   process; ``python -m experiments.bench.rnn_bptt ... --project-ab``,
   ``docs/performance.md``): 0.87x the time for lstm(512) with bfloat16
   operands at N 32, T 128, D 64 (gru(512): 0.89x; float32: 0.95x),
   0.93-0.99x for rnn/gru/lstm(128) on MNIST-1D (N 100, T 40, D 1), with
   25-42% less temporary memory; one loss, 1.07x, for a float32 lstm(512)
   at N 32 with D = 512 (slow small per-step products). The backward is the
   same either way, with dA from the scan (dA[t] = da_t, each step's dx_t)::

       dW_ih = sum_t x_t^T da_t = X^T dA     (D, T N) @ (T N, G H)
       db_ih = sum_t sum_n da_t              (G H,)
       dX    = dA W_ih^T                     (T, N, G H) @ (G H, D)

2. The recurrent cell, run by :func:`jaxprop.combinators.scan.scan` over a_1..a_T with
   params {w_hh, b_hh} (its step given x_t, computing a_t first: ``_projected``):
   its step's forward and backward are below. The scan
   carries dh_t = dy_t + (dJ/dh_t from step t+1) backwards (BPTT; see
   ``jaxprop/combinators/scan.py``); the shared weights' gradients are one
   rule (``Cell.sum_grads``) that the scan applies *after* the sweep to the
   stacked h_{t-1} and ds_t^h, one product instead of T small ones and a
   running sum inside the loop (for batches N < 64, where that measured
   faster), or step by step in the loop otherwise::

       dW_hh = sum_t h_{t-1}^T ds_t^h = H_prev^T dS^h     (H, T N) @ (T N, G H)
       db_hh = sum_t sum_n ds_t^h                          (G H,)

   where ds_t^h is the gradient of the hidden half of the pre-activations
   h_{t-1} W_hh + b_hh (equal to da_t, except in the GRU's n gate).

Every product above and in the cells (x W_ih, h W_hh, dA W_ih^T, ds W_hh^T, X^T dA,
H_prev^T dS^h) goes through :func:`jaxprop.core.matmul` / ``matmul_nt`` /
``matmul_tn``: under ``jax.default_matmul_precision("bfloat16")`` (the runner's
``--matmul-precision bfloat16``) their float32 operands are rounded to bfloat16
and summed in float32, on CPU too, and the scan rounds W_hh once before its loop
(:func:`jaxprop.core.matmul_operands`); gates, states and gradients stay float32.
The LSTM language model's step (N 32, T 128, H 512) runs 1.5x faster that way on
a CPU with AMX (``docs/performance.md``).

Notation of each step (one t, rows n = 1..N): h = h_{t-1}, h' = h_t,
dh' = dJ/dh_t = dy_t + dh_t^{carry}; sigma' = sigma (1 - sigma),
tanh' = 1 - tanh^2. Each cell's equations and local derivatives are in its
step function's docstring.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxprop.core import (Layer, call_forward, check_float, check_input, check_same_shape, default_float,
                          matmul, matmul_nt, matmul_operands, matmul_tn, shape_token,
                          token_shape)
from jaxprop.layers._params import check_params
from jaxprop.combinators.scan import Cell, scan

_ACTIVATIONS = ("tanh", "relu")


def _row(b, ndim):
    """(K,) -> (1, ..., 1, K): explicit broadcasting of a bias over leading axes."""
    return b.reshape((1,) * (ndim - 1) + (b.shape[0],))


def _hidden(params, h):
    """The hidden half of every pre-activation: h W_hh + b_hh, (N, G H)."""
    return matmul(h, params["w_hh"]) + _row(params["b_hh"], 2)


def _hidden_backward(params, ds_h):
    """Backward of ``_hidden`` to h, inside the reverse scan: dh = ds^h W_hh^T."""
    return matmul_nt(ds_h, params["w_hh"])           # (N, G H) @ (G H, H)


def _hidden_grads(h_prev, ds_h):
    """Backward of ``_hidden`` to its weights (``Cell.sum_grads``), over leading
    axes: one step's (N, ...) or, after the scan, with H_prev (T, N, H) the
    stacked h_{t-1} and dS^h (T, N, G H) the stacked ds_t^h::

        dW_hh = sum_t h_{t-1}^T ds_t^h = H_prev^T dS^h     (H, T N) @ (T N, G H)
        db_hh = sum_t sum_n ds_t^h                          (G H,)
    """
    h2 = h_prev.reshape(-1, h_prev.shape[-1])        # (T N, H)
    d2 = ds_h.reshape(-1, ds_h.shape[-1])            # (T N, G H)
    return {"w_hh": matmul_tn(h2, d2),               # forward was: s^h = h @ w_hh + ...
            "b_hh": d2.sum(axis=0)}                  # forward was: s^h = ... + b_hh[None, :]


def _sum_grads_ds_is_da(params, caches, das):
    """``sum_grads`` of the cells whose ds^h is da (rnn, lstm)."""
    return _hidden_grads(caches["h"], das)


def _zeros_state(hidden, n_carry):
    def init_carry(params, a_t):
        z = jnp.zeros((a_t.shape[0], hidden), a_t.dtype)
        return z if n_carry == 1 else (z,) * n_carry
    return init_carry


def _cell_init(hidden, gates):
    def init(key, a_shape):
        dt = default_float()
        bound = 1.0 / math.sqrt(hidden)
        k1, k2 = jax.random.split(key)
        params = {"w_hh": jax.random.uniform(k1, (hidden, gates * hidden), dt, -bound, bound),
                  "b_hh": jax.random.uniform(k2, (gates * hidden,), dt, -bound, bound)}
        return (a_shape[0], hidden), params
    return init


def rnn_cell(hidden: int, activation: str = "tanh") -> Cell:
    r"""Elman cell on the projected input a_t = x_t W_ih + b_ih (N, H)::

        s  = a_t + h W_hh + b_hh          (N, H)
        h' = act(s)                        y_t = h'

    Backward::

        ds   = dh' * act'(s)               tanh' = 1 - h'^2;  relu' = [s > 0]
        da_t = ds,   ds^h = ds
        dh   = ds W_hh^T                   (+ dW_hh, db_hh: module docstring)
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"rnn: activation must be one of {_ACTIVATIONS}, got {activation!r}")

    def step_forward(params, h, a_t):
        s = a_t + _hidden(params, h)
        h_new = jnp.tanh(s) if activation == "tanh" else jax.nn.relu(s)
        return h_new, h_new, {"h": h, "h_new": h_new}

    def step_backward(params, cache, dh_new, dy_t):
        h_new = cache["h_new"]
        dh_total = dh_new + dy_t                     # h' feeds y_t and step t+1: paths sum
        if activation == "tanh":
            ds = dh_total * (1 - h_new * h_new)      # forward was: h' = tanh(s)
        else:
            ds = jnp.where(h_new > 0, dh_total, 0)   # forward was: h' = relu(s) (h' > 0 iff s > 0)
        dh = _hidden_backward(params, ds)            # forward was: s = a_t + h @ w_hh + b_hh
        return None, dh, ds                          # dW_hh, db_hh: after the scan (sum_grads)

    return Cell(_cell_init(hidden, 1), step_forward, step_backward, _zeros_state(hidden, 1),
                name=f"rnn_cell({hidden}, {activation})", sum_grads=_sum_grads_ds_is_da)


def gru_cell(hidden: int) -> Cell:
    r"""GRU cell (PyTorch's: the reset gate multiplies h W_hn + b_hn) on
    a_t = x_t W_ih + b_ih = [a^r, a^z, a^n] (N, 3H), with
    s^h = h W_hh + b_hh = [s^r, s^z, s^n]::

        r  = sigma(a^r + s^r)
        z  = sigma(a^z + s^z)
        n  = tanh(a^n + r * s^n)
        h' = (1 - z) * n + z * h           y_t = h'

    Backward (each line from the forward line it undoes)::

        dn    = dh' * (1 - z)              dz = dh' * (h - n)
        dpn   = dn * (1 - n^2)             (pre-activation of n)
        dr    = dpn * s^n
        dpr   = dr * r (1 - r)             dpz = dz * z (1 - z)
        da_t  = [dpr, dpz, dpn]            (N, 3H)
        ds^h  = [dpr, dpz, dpn * r]        (N, 3H): r scales the hidden half of n only
        dh    = dh' * z + ds^h W_hh^T
    """
    H = hidden

    def step_forward(params, h, a_t):
        s_h = _hidden(params, h)
        r = jax.nn.sigmoid(a_t[:, :H] + s_h[:, :H])
        z = jax.nn.sigmoid(a_t[:, H:2 * H] + s_h[:, H:2 * H])
        s_n = s_h[:, 2 * H:]
        n = jnp.tanh(a_t[:, 2 * H:] + r * s_n)
        h_new = (1 - z) * n + z * h
        return h_new, h_new, {"h": h, "r": r, "z": z, "n": n, "s_n": s_n}

    def step_backward(params, cache, dh_new, dy_t):
        h, r, z, n, s_n = cache["h"], cache["r"], cache["z"], cache["n"], cache["s_n"]
        dh_total = dh_new + dy_t                     # h' feeds y_t and step t+1: paths sum
        dn = dh_total * (1 - z)                      # forward was: h' = (1 - z) * n + z * h
        dz = dh_total * (h - n)
        dpn = dn * (1 - n * n)                       # forward was: n = tanh(a^n + r * s^n)
        dr = dpn * s_n
        dpr = dr * r * (1 - r)                       # forward was: r = sigma(a^r + s^r)
        dpz = dz * z * (1 - z)                       # forward was: z = sigma(a^z + s^z)
        da = jnp.concatenate([dpr, dpz, dpn], axis=1)
        ds_h = jnp.concatenate([dpr, dpz, dpn * r], axis=1)
        dh = _hidden_backward(params, ds_h)
        return None, dh + dh_total * z, da           # h reaches h' directly (z * h) and through s^h

    def sum_grads(params, caches, das):              # ds^h from da: the n block scaled by r
        ds_h = jnp.concatenate([das[..., :2 * H], das[..., 2 * H:] * caches["r"]], axis=-1)
        return _hidden_grads(caches["h"], ds_h)

    return Cell(_cell_init(hidden, 3), step_forward, step_backward, _zeros_state(hidden, 1),
                name=f"gru_cell({hidden})", sum_grads=sum_grads)


def lstm_cell(hidden: int) -> Cell:
    r"""LSTM cell, carry (h, c), on a_t = x_t W_ih + b_ih (N, 4H)::

        s        = a_t + h W_hh + b_hh = [s^i, s^f, s^g, s^o]     (N, 4H)
        i, f, o  = sigma(s^i), sigma(s^f), sigma(s^o);   g = tanh(s^g)
        c'       = f * c + i * g
        h'       = o * tanh(c')                                   y_t = h'

    Backward, with dh' = dy_t + dh_t^{carry} and dc' from step t+1::

        do   = dh' * tanh(c')
        dc'  = dc'^{carry} + dh' * o * (1 - tanh(c')^2)           (c' fans out to h' and c_{t+1})
        di   = dc' * g        df = dc' * c        dg = dc' * i      dc = dc' * f
        ds   = [di i(1-i), df f(1-f), dg (1-g^2), do o(1-o)]      (N, 4H)
        da_t = ds^h = ds,     dh = ds W_hh^T
    """
    H = hidden

    def step_forward(params, carry, a_t):
        h, c = carry
        s = a_t + _hidden(params, h)
        i = jax.nn.sigmoid(s[:, :H])
        f = jax.nn.sigmoid(s[:, H:2 * H])
        g = jnp.tanh(s[:, 2 * H:3 * H])
        o = jax.nn.sigmoid(s[:, 3 * H:])
        c_new = f * c + i * g
        tc = jnp.tanh(c_new)
        h_new = o * tc
        return (h_new, c_new), h_new, {"h": h, "c": c, "i": i, "f": f, "g": g, "o": o, "tc": tc}

    def step_backward(params, cache, dcarry, dy_t):
        dh_new, dc_new = dcarry
        c, i, f, g, o, tc = (cache[k] for k in ("c", "i", "f", "g", "o", "tc"))
        dh_total = dh_new + dy_t                     # h' feeds y_t and step t+1: paths sum
        do = dh_total * tc                           # forward was: h' = o * tanh(c')
        dc_total = dc_new + dh_total * o * (1 - tc * tc)
        di = dc_total * g                            # forward was: c' = f * c + i * g
        df = dc_total * c
        dg = dc_total * i
        dc = dc_total * f
        ds = jnp.concatenate([di * i * (1 - i),      # forward was: i = sigma(s^i)
                              df * f * (1 - f),      # forward was: f = sigma(s^f)
                              dg * (1 - g * g),      # forward was: g = tanh(s^g)
                              do * o * (1 - o)],     # forward was: o = sigma(s^o)
                             axis=1)
        dh = _hidden_backward(params, ds)            # forward was: s = a_t + h @ w_hh + b_hh
        return None, (dh, dc), ds                    # dW_hh, db_hh: after the scan (sum_grads)

    return Cell(_cell_init(hidden, 4), step_forward, step_backward, _zeros_state(hidden, 2),
                name=f"lstm_cell({hidden})", sum_grads=_sum_grads_ds_is_da)


def _projected(cell, w_ih, b_ih):
    """``cell`` on x_t instead of a_t: its step first computes a_t = x_t W_ih + b_ih (N, G H),
    inside the forward loop, so the (T, N, G H) array A is never written to memory. The
    step's cache and backward are the cell's own (dA still comes out of the reverse scan)."""
    def step_forward(params, carry, x_t):
        return cell.step_forward(params, carry, matmul(x_t, w_ih) + b_ih)
    return cell._replace(step_forward=step_forward)


#: Compute a_t = x_t W_ih + b_ih inside the forward loop (module docstring, part 1: measured
#: faster or equal in all but one configuration, and always leaner); False: A before the loop.
#: Read when a layer is built.
PROJECT_IN_LOOP = True


def _recurrent(kind, hidden, cell, gates, return_sequences, reverse, name_extra=""):
    project_in_loop = PROJECT_IN_LOOP
    if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1:
        raise ValueError(f"{kind}: hidden must be a positive int, got {hidden!r}")
    opts = name_extra + ("" if return_sequences else ", return_sequences=False") + \
        (", reverse=True" if reverse else "")
    name = f"{kind}({hidden}{opts})"
    def over_time(c):                                  # the scan of cell c, time-major (T, N, ...)
        return scan(c, return_sequences=return_sequences, reverse=reverse, time_major=True, name=name)

    core = over_time(cell)                             # init, backward, and the forward on A
    gh = gates * hidden

    def init(key, in_shape):
        in_shape = tuple(in_shape)
        if len(in_shape) != 3:
            raise ValueError(f"{name}: in_shape must be batch-first (N, T, D), got {in_shape}")
        k_ih, k_ib, k_core = jax.random.split(key, 3)
        n, t, d = in_shape
        dt = default_float()
        bound = 1.0 / math.sqrt(hidden)                # PyTorch: every weight and bias U(-1/sqrt(H), 1/sqrt(H))
        _, p_core = core.init(k_core, (t, n, gh))
        out_shape = (n, t, hidden) if return_sequences else (n, hidden)
        params = {"w_ih": jax.random.uniform(k_ih, (d, gh), dt, -bound, bound),
                  "w_hh": p_core["w_hh"],
                  "b_ih": jax.random.uniform(k_ib, (gh,), dt, -bound, bound),
                  "b_hh": p_core["b_hh"]}
        return out_shape, params

    def forward(params, x):
        sizes, dt = check_params(name, params, {"w_ih": ("D", gh), "w_hh": (hidden, gh),
                                                "b_ih": (gh,), "b_hh": (gh,)})
        d, w_ih = sizes["D"], params["w_ih"]
        check_float(name, x)
        if jnp.ndim(x) != 3 or x.shape[2] != d or x.shape[1] < 1:
            raise ValueError(f"{name}: expected a batch-first input (N, T, {d}) with T >= 1, "
                             f"got shape {tuple(jnp.shape(x))}")
        check_input(name, x, dtype=dt)
        xs = jnp.moveaxis(x, 1, 0)                    # (T, N, D): time-major
        p_core = {"w_hh": params["w_hh"], "b_hh": params["b_hh"]}
        if project_in_loop:                           # the same caches as core's: core.backward runs them
            looped = over_time(_projected(cell, matmul_operands(w_ih), _row(params["b_ih"], 2)))
            y, c_core = looped.forward(p_core, xs)
        else:
            a = matmul(xs, w_ih) + _row(params["b_ih"], 3)   # (T, N, G H), so the big array is never transposed
            y, c_core = core.forward(p_core, a)
        if return_sequences:
            y = jnp.moveaxis(y, 0, 1)                 # (T, N, H) -> (N, T, H)
        return y, {"xs": xs, "w_ih": w_ih, "core": c_core}

    def backward(cache, dy):
        xs, w_ih = cache["xs"], cache["w_ih"]
        if return_sequences:
            check_same_shape(name, (xs.shape[1], xs.shape[0], hidden), dy)
            dy = jnp.moveaxis(dy, 1, 0)                   # (T, N, H)
        g_core, da = core.backward(cache["core"], dy)     # BPTT through the recurrent cell; da (T, N, G H)
        x2 = xs.reshape(-1, xs.shape[-1])                 # (T N, D)
        da2 = da.reshape(-1, gh)                          # (T N, G H)
        grads = {"w_ih": matmul_tn(x2, da2),              # forward was: a = x @ w_ih + ...
                 "w_hh": g_core["w_hh"],
                 "b_ih": da2.sum(axis=0),                 # forward was: a = ... + b_ih[None, None, :]
                 "b_hh": g_core["b_hh"]}
        return grads, jnp.moveaxis(matmul_nt(da, w_ih), 0, 1)   # (T, N, G H) @ (G H, D) -> (N, T, D)

    return Layer(init, forward, backward, name=name)


def rnn(hidden: int, *, activation: str = "tanh", return_sequences: bool = True,
        reverse: bool = False) -> Layer:
    r"""Elman RNN, PyTorch's ``nn.RNN(D, H, nonlinearity=activation, batch_first=True)``::

        h_t = act(x_t W_ih + b_ih + h_{t-1} W_hh + b_hh),   h_0 = 0,   act = tanh or relu

    Shapes: x (N, T, D) -> y (N, T, H), or (N, H) with ``return_sequences=False``.
    Params: ``{"w_ih": (D, H), "w_hh": (H, H), "b_ih": (H,), "b_hh": (H,)}``.

    Backward (per step, see :func:`rnn_cell`; sums over t, module docstring)::

        ds_t  = (dy_t + dh_t^{carry}) * act'(s_t)        (N, H)
        dh_{t-1}^{carry} = ds_t W_hh^T                   (N, H)
        dW_hh = sum_t h_{t-1}^T ds_t (H, H)    dW_ih = sum_t x_t^T ds_t (D, H)
        db_hh = db_ih = sum_{t,n} ds_t (H,)    dx_t = ds_t W_ih^T (N, D)

    Args:
      hidden: H.
      activation: ``"tanh"`` or ``"relu"``.
      return_sequences: every h_t (N, T, H), or only the final state (N, H).
      reverse: read x_{T-1} first and x_0 last; outputs stay in input order.
    """
    cell = rnn_cell(hidden, activation) if isinstance(hidden, int) else None
    return _recurrent("rnn", hidden, cell, 1, return_sequences, reverse,
                      "" if activation == "tanh" else f", activation={activation!r}")


def gru(hidden: int, *, return_sequences: bool = True, reverse: bool = False) -> Layer:
    r"""GRU, PyTorch's ``nn.GRU(D, H, batch_first=True)``; gate blocks (r, z, n)::

        r   = sigma(x_t W_ir + b_ir + h_{t-1} W_hr + b_hr)
        z   = sigma(x_t W_iz + b_iz + h_{t-1} W_hz + b_hz)
        n   = tanh(x_t W_in + b_in + r * (h_{t-1} W_hn + b_hn))
        h_t = (1 - z) * n + z * h_{t-1},    h_0 = 0

    Shapes: x (N, T, D) -> y (N, T, H), or (N, H) with ``return_sequences=False``.
    Params: ``{"w_ih": (D, 3H), "w_hh": (H, 3H), "b_ih": (3H,), "b_hh": (3H,)}``
    with ``w_ih = [W_ir | W_iz | W_in]`` etc.

    Backward: each gate's local derivative in :func:`gru_cell`; then
    dW_ih = sum_t x_t^T da_t (D, 3H), dW_hh = sum_t h_{t-1}^T ds^h_t (H, 3H),
    db_ih = sum_{t,n} da_t, db_hh = sum_{t,n} ds^h_t, dx_t = da_t W_ih^T (N, D).

    Args: as :func:`rnn` (no activation).
    """
    cell = gru_cell(hidden) if isinstance(hidden, int) else None
    return _recurrent("gru", hidden, cell, 3, return_sequences, reverse)


def lstm(hidden: int, *, return_sequences: bool = True, reverse: bool = False,
         forget_bias: float = 0.0) -> Layer:
    r"""LSTM, PyTorch's ``nn.LSTM(D, H, batch_first=True)``; gate blocks (i, f, g, o)::

        [s^i, s^f, s^g, s^o] = x_t W_ih + b_ih + h_{t-1} W_hh + b_hh     (N, 4H)
        i, f, g, o = sigma(s^i), sigma(s^f), tanh(s^g), sigma(s^o)
        c_t = f * c_{t-1} + i * g,    h_t = o * tanh(c_t),    h_0 = c_0 = 0

    Outputs h only (c stays inside). Shapes: x (N, T, D) -> y (N, T, H), or
    (N, H) with ``return_sequences=False``. Params: ``{"w_ih": (D, 4H),
    "w_hh": (H, 4H), "b_ih": (4H,), "b_hh": (4H,)}``.

    Backward: the carry is (dh, dc); each gate's local derivative in
    :func:`lstm_cell`; dW_ih = sum_t x_t^T ds_t (D, 4H), dW_hh = sum_t
    h_{t-1}^T ds_t (H, 4H), db_ih = db_hh = sum_{t,n} ds_t, dx_t = ds_t W_ih^T.

    Args: as :func:`rnn` (no activation), and
      forget_bias: added at init to the forget block of ``b_hh`` (on top of
        PyTorch's uniform draw), so that early in training f = sigma(s^f) starts
        near sigma(forget_bias) and the cell keeps its state (Gers et al. 2000;
        Jozefowicz et al. 2015 recommend 1; Keras's ``unit_forget_bias``).
        Default 0: PyTorch's initialization exactly.
    """
    if not isinstance(forget_bias, (int, float)) or isinstance(forget_bias, bool) or not math.isfinite(forget_bias):
        raise ValueError(f"lstm: forget_bias must be a finite number, got {forget_bias!r}")
    cell = lstm_cell(hidden) if isinstance(hidden, int) else None
    layer = _recurrent("lstm", hidden, cell, 4, return_sequences, reverse,
                       f", forget_bias={forget_bias:g}" if forget_bias else "")
    if not forget_bias:
        return layer

    def init(key, in_shape):
        out_shape, params = layer.init(key, in_shape)
        b = params["b_hh"]
        return out_shape, dict(params, b_hh=b.at[hidden:2 * hidden].add(jnp.asarray(forget_bias, b.dtype)))

    return layer._replace(init=init)


def bidirectional(fwd: Layer, bwd: Layer) -> Layer:
    r"""Both directions over the same input, concatenated on the last axis::

        y = [fwd(x) | bwd(x)]          e.g. bidirectional(gru(H), gru(H, reverse=True))

    equals PyTorch's ``bidirectional=True`` (its ``_reverse`` weights are
    ``bwd``'s). Shapes: y (N, T, H_f + H_b) (or (N, H_f + H_b) for final
    states). Params ``(p_fwd, p_bwd)``. Backward: dy splits into its two
    column blocks; x fans out to both layers, so dx = dx_fwd + dx_bwd.
    """
    for i, layer in enumerate((fwd, bwd)):
        if not isinstance(layer, Layer):
            raise TypeError(f"bidirectional: argument {i} is {type(layer).__name__}, not a jaxprop Layer")
        if layer.stateful:
            raise ValueError(f"bidirectional: {layer.name} has state; not supported")
    name = f"bidirectional({fwd.name}, {bwd.name})"

    def init(key, in_shape):
        k_f, k_b = jax.random.split(key)
        s_f, p_f = fwd.init(k_f, in_shape)
        s_b, p_b = bwd.init(k_b, in_shape)
        if tuple(s_f[:-1]) != tuple(s_b[:-1]):
            raise ValueError(f"{name}: the two directions' outputs differ before the last axis: "
                             f"{tuple(s_f)} and {tuple(s_b)}")
        return tuple(s_f[:-1]) + (s_f[-1] + s_b[-1],), (p_f, p_b)

    def forward(params, x, **ctx):
        key = ctx.get("key")
        k_f, k_b = (None, None) if key is None else jax.random.split(key)
        y_f, c_f = call_forward(fwd, params[0], x, **(dict(ctx, key=k_f) if ctx else {}))
        y_b, c_b = call_forward(bwd, params[1], x, **(dict(ctx, key=k_b) if ctx else {}))
        if y_f.shape[:-1] != y_b.shape[:-1]:
            raise ValueError(f"{name}: the two directions' outputs differ before the last axis: "
                             f"{y_f.shape} and {y_b.shape}")
        y = jnp.concatenate([y_f, y_b], axis=-1)
        return y, {"fwd": c_f, "bwd": c_b, "y_f": shape_token(y_f), "y_shape": shape_token(y)}

    def backward(cache, dy):
        check_same_shape(name, token_shape(cache["y_shape"]), dy)
        h_f = token_shape(cache["y_f"])[-1]
        g_f, dx_f = fwd.backward(cache["fwd"], dy[..., :h_f])    # forward was: y = [y_f | y_b]
        g_b, dx_b = bwd.backward(cache["bwd"], dy[..., h_f:])
        dx = None if dx_f is None or dx_b is None else dx_f + dx_b   # x fans out to both: paths sum
        return (g_f, g_b), dx

    return Layer(init, forward, backward, name=name, stochastic=fwd.stochastic or bwd.stochastic)
