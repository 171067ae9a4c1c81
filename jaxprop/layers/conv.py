r"""Convolution layers, 1-D and 2-D, channels-last, with a hand-derived backward pass.

The derivation is written once, for one spatial axis (a 2-D convolution does
the same on each axis independently). Shapes: x (N, L, C), kernel W
(K, C/G, F), b (F,), y (N, O, F), with G groups, stride S, dilation D and the
zero padding (lo, hi) already applied: xp (N, Lp, C), Lp = lo + L + hi.
Channel c = g C_g + i of group g (C_g = C/G) meets output channel
f = g F_g + j (F_g = F/G) only.

Forward (a cross-correlation, as every deep-learning "convolution")::

    y[n, o, f] = sum_{k < K} sum_{i < C_g} xp[n, o S + k D, g C_g + i] W[k, i, f] + b[f]
    O = floor((Lp - (K - 1) D - 1) / S) + 1

Backward. Each xp[n, p, c] reaches y[n, o, f] through every (o, k) with
o S + k D = p, so (chain rule, summing over those paths)::

    dxp[n, p, g C_g + i] = sum_{o, k : o S + k D = p} sum_j dY[n, o, g F_g + j] W[k, i, g F_g + j]

Insert S - 1 zeros between the entries of dY (``lhs_dilation=S``) and the
condition o S + k D = p becomes a plain correlation of the dilated dY with
the kernel flipped in space (k -> K - 1 - k) and with input/output channels
swapped inside each group: dX is the *transposed convolution* of dY. Padding
the dilated dY with (K - 1) D - lo zeros in front and L + lo - 1 - (O - 1) S
behind gives exactly the L positions of x (negative amounts crop: they drop
the rows of dxp that belong to the padding)::

    dX = conv(dY, flip(W)^T; strides 1, lhs_dilation S, rhs_dilation D,
              padding ((K-1)D - lo, L + lo - 1 - (O-1)S), groups G)        (N, L, C)

The kernel gradient sums every use of W[k, i, f] (fan-out over n and o)::

    dW[k, i, f] = sum_n sum_o xp[n, o S + k D, g C_g + i] dY[n, o, f]      (K, C/G, F)

which is again a correlation -- of xp with dY used as the kernel -- in which
the batch axis n is the contracted "feature" axis, the input channel is the
"batch" axis, the kernel tap k plays the output position (window stride D)
and dY is spread by S (``rhs_dilation=S``). Groups pair input-channel group g
with output-channel group g, which is ``batch_group_count=G``. The hi padding
is cut by the trailing positions no window reaches, so exactly K taps come
out. Finally ``db[f] = sum_{n, o} dY[n, o, f]``.

Per example (:mod:`jaxprop.per_example`): dW_n is the same sum with the sum
over n dropped, computed tap by tap: with V_k (N, P, C) the input entries
xp[n, oS + kD, :] that tap k meets at the P output positions (a strided
slice, no patch matrix), dW_n[k] = V_k[n]^T dY_n per group, a batched matmul
((N, C/G, F) per tap; (N, K, C/G, F) stacked); db_n = sum_o dY[n, o, :].
Its squared norm takes one of three forms, all exact:

* taps: the squares of each tap's (N, C/G, F) slice summed, as a ``lax.scan``
  over the T taps (one slice alive at a time), or unrolled when the whole
  kernel (N, T, C/G, F) is no larger than dY (T C/G <= P: a thin input such as
  a first layer on one channel, where the scan's per-step cost dominates);
* tap Gram, the Gram form of Li et al. (2022) over the P output positions,
  without any kernel-sized array: with U_n (P, T C_g) the patches of group g
  (row o: xp[n, oS + kD, g C_g + i] over k, i)::

      ||dW_n||^2 = sum_g <U_ng U_ng^T, dY_ng dY_ng^T>_F,    U U^T = sum_k V_k V_k^T

  accumulated over the taps in a ``lax.scan`` (T P^2 C_g multiply-adds);
* shifted Gram: the patches share their entries, so
  (U U^T)[o, o'] = sum_k Gamma[oS + kD, o'S + kD] with Gamma = xq xq^T the
  Gram of the padded input over its Lu used positions (per group). Then
  <U U^T, dY dY^T> = <Gamma, M> with M = sum_k (dY dY^T spread by S and
  shifted by kD along both position axes, ``lax.pad`` with interior padding):
  one (Lu, Lu) Gram of the input and one (P, P) of dY, Lu^2 C_g + P^2 F_g
  multiply-adds, a factor ~T fewer than the tap Gram for stride 1.

:func:`_norms_form` picks the form with the fewest multiply-adds whose
temporaries are no larger than the per-example kernel gradient itself (what
``per_example_grads`` and ``jax.vmap(jax.grad)`` hold): on the MNIST-1D CNN
(P = 40, C = F = 32, K = 5) the shifted Gram for the deep layers, the
unrolled taps for the first (measured in experiments/bench/per_example.py).

Choice: both gradients are written as ``lax.conv_general_dilated`` calls with
explicit dimension numbers rather than im2col + matmul. Same arithmetic, but
no (N, O, K C) patch matrix in memory and XLA's convolution kernels on every
backend. Circular padding is done outside the convolution (a wrap-around
gather, see :mod:`jaxprop.layers.spatial`); its backward folds dxp back.
"""
from __future__ import annotations

import itertools
import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprop import initializers
from jaxprop.core import (Layer, check_float, check_input, check_same_shape, default_float,
                          shape_token, token_shape)
from jaxprop.layers import spatial as sp
from jaxprop.layers._params import BIAS_NOTES, check_params

# (input, kernel, output) layouts of the forward and of the two backward convolutions
_FORWARD = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC")}


def _norms_form(taps, p, lu, groups, c_g, f_g):
    """Which form of ||dW_n||^2 a convolution's ``per_example_norms`` takes (module docstring): the
    one with the fewest multiply-adds per example, among those whose temporaries per example are
    no larger than the per-example kernel gradient itself (T C_g F numbers, what
    ``per_example_grads`` and ``jax.vmap(jax.grad)`` hold); the taps unrolled when all T kernel
    slices together are no larger than dY. T taps, P output and Lu used input positions, G groups
    of C_g input and F_g output channels."""
    room = taps * c_g * groups * f_g
    cost = {"taps": p * taps * c_g * groups * f_g}                # the taps' kernels, T batched matmuls
    if groups * 2 * p * p <= room:                              # sum_k V_k V_k^T, and dY dY^T
        cost["tap gram"] = groups * (taps * p * p * c_g + p * p * f_g)
    if groups * (lu * lu + p * p) <= room:                      # Gamma, and dY dY^T (spread into it)
        cost["shifted gram"] = groups * (lu * lu * c_g + p * p * f_g + taps * p * p)
    form = min(cost, key=cost.get)
    if form == "taps" and taps * c_g <= p:          # the kernels (N, T, C/G, F) no larger than dY (N, P, F)
        return "taps unrolled"
    return form


def _conv(nd, features, kernel_size, stride, padding, dilation, groups, bias, w_init, dtype) -> Layer:
    layer = f"conv{nd}d"
    if not isinstance(features, (int, np.integer)) or features < 1:
        raise ValueError(f"{layer}: features must be a positive int, got {features!r}")
    ks = sp.as_tuple(kernel_size, nd, "kernel_size", layer)
    st = sp.as_tuple(stride, nd, "stride", layer)
    dl = sp.as_tuple(dilation, nd, "dilation", layer)
    padding = sp.check_padding_spec(padding, layer)
    if not isinstance(groups, (int, np.integer)) or groups < 1 or features % groups:
        raise ValueError(f"{layer}: groups must be a positive int dividing features={features}, got {groups!r}")
    shown = (("stride", st, (1,) * nd), ("padding", padding, "SAME"), ("dilation", dl, (1,) * nd), ("groups", groups, 1))
    name = f"{layer}({features}, {ks if nd > 1 else ks[0]}" + "".join(  # the options that differ from the defaults
        f", {k}={(v[0] if nd == 1 and k in ('stride', 'dilation') else v)!r}" for k, v, d in shown if v != d) + ")"
    init_w = initializers.get(w_init)
    spatial_names = "L" if nd == 1 else "H, W"

    def geometry(in_shape):
        """Static shapes of the forward pass: (pads, circular, conv_pads, out_spatial)."""
        spatial = tuple(in_shape[1:-1])
        pads, circular = sp.resolve_padding(padding, spatial, ks, st, dl, name)
        out = tuple(sp.out_size(n, p, k, s, d) for n, p, k, s, d in zip(spatial, pads, ks, st, dl))
        if any(o < 1 for o in out):
            raise ValueError(f"{name}: input of spatial size {spatial} is smaller than the dilated kernel "
                             f"{tuple((k - 1) * d + 1 for k, d in zip(ks, dl))} after padding {pads}")
        conv_pads = ((0, 0),) * nd if circular else pads
        return pads, circular, conv_pads, out

    def check_x(x, c_in):
        check_float(name, x)
        if np.ndim(x) != nd + 2:
            raise ValueError(f"{name}: expected input of shape (N, {spatial_names}, C) (rank {nd + 2}, "
                             f"channels last), got shape {tuple(np.shape(x))}")
        check_input(name, x, last=c_in)

    def init(key, in_shape):
        in_shape = tuple(in_shape)
        if len(in_shape) != nd + 2:
            raise ValueError(f"{name}: in_shape must be (N, {spatial_names}, C), got {in_shape}")
        c_in = in_shape[-1]
        if c_in % groups:
            raise ValueError(f"{name}: groups={groups} must divide the input channels, got in_shape {in_shape}")
        _, _, _, out = geometry(in_shape)
        dt = dtype or default_float()
        fan_in, fan_out = math.prod(ks) * c_in // groups, math.prod(ks) * features // groups
        params = {"w": init_w(key, ks + (c_in // groups, features), dt, fan_in, fan_out)}
        if bias:
            params["b"] = jnp.zeros((features,), dt)
        return (in_shape[0],) + out + (features,), params

    spec = {"w": ks + ("C/G", features), "b": (features,)} if bias else {"w": ks + ("C/G", features)}

    def forward(params, x):
        sizes, dt = check_params(name, params, spec, notes=BIAS_NOTES[bias])
        check_x(x, sizes["C/G"] * groups)
        check_input(name, x, dtype=dt)
        w = params["w"]
        pads, circular, conv_pads, _ = geometry(x.shape)
        xp = sp.wrap_pad(x, pads) if circular else x
        y = lax.conv_general_dilated(xp, w, st, conv_pads, rhs_dilation=dl,
                                     dimension_numbers=_FORWARD[nd], feature_group_count=groups)
        if bias:
            y = y + params["b"].reshape((1,) * (nd + 1) + (features,))     # b[None, ..., :]
        return y, {"x": xp, "w": w, "x_shape": shape_token(x)}

    def used_span(out):
        """Input positions the windows reach along each axis: (O - 1) S + (K - 1) D + 1."""
        return tuple((o - 1) * s + (k - 1) * d + 1 for o, s, k, d in zip(out, st, ks, dl))

    def kernel_grad(xp, dy, conv_pads, out):
        """dW[k, i, f] = sum_{n,o} xp[n, oS + kD, gC_g + i] dY[n, o, f]: correlate xp with dY."""
        used = used_span(out)
        w_pads = [(lo, hi - (n + lo + hi - u)) for (lo, hi), n, u in zip(conv_pads, xp.shape[1:-1], used)]
        # A convolution whose batch is x's channels and whose features are x's examples (contracted);
        # dY (N, P..., F) is the kernel, N its input features. Written with explicit transposes to the
        # forward's canonical layouts rather than as dimension_numbers on xp and dy as they are (the
        # same contraction): XLA:CPU runs the latter on a slow path inside loops (lax.map / lax.scan
        # bodies, 14x slower at the MNIST-1D CNN's size), this one at full speed (0.75x outside too).
        lhs = jnp.transpose(xp, (nd + 1,) + tuple(range(1, nd + 1)) + (0,))        # (C, L..., N)
        rhs = jnp.transpose(dy, tuple(range(1, nd + 1)) + (0, nd + 1))             # (P..., N, F)
        dw = lax.conv_general_dilated(lhs, rhs, dl, w_pads, rhs_dilation=st,
                                      dimension_numbers=_FORWARD[nd], batch_group_count=groups)  # (C/G, K..., F)
        return jnp.transpose(dw, tuple(range(1, nd + 1)) + (0, nd + 1))            # (K..., C/G, F)

    def backward(cache, dy):
        xp, w = cache["x"], cache["w"]
        x_shape = token_shape(cache["x_shape"])
        pads, circular, conv_pads, out = geometry(x_shape)
        check_same_shape(name, (x_shape[0],) + out + (features,), dy)
        conv_in = xp.shape[1:-1]                        # spatial size the convolution saw (L, or Lp if wrapped)
        c_g, f_g = w.shape[-2], features // groups

        # forward was: y = conv(xp, W) + b;  db = sum over n and positions
        grads = {"w": kernel_grad(xp, dy, conv_pads, out)}
        if bias:
            grads["b"] = dy.sum(axis=tuple(range(nd + 1)))

        # dX: transposed convolution of dY with the kernel flipped in space, channels swapped per group
        w_t = jnp.flip(w, axis=tuple(range(nd)))                            # k -> K - 1 - k
        w_t = w_t.reshape(ks + (c_g, groups, f_g))                         # [k, i, g, j]
        w_t = w_t.transpose(tuple(range(nd)) + (nd + 2, nd + 1, nd))        # [k, j, g, i]
        w_t = w_t.reshape(ks + (f_g, groups * c_g))                         # (K, F/G, C)
        x_pads = [((k - 1) * d - lo, n + lo - 1 - (o - 1) * s)
                  for (lo, _), n, k, d, o, s in zip(conv_pads, conv_in, ks, dl, out, st)]
        dxp = lax.conv_general_dilated(dy, w_t, (1,) * nd, x_pads, lhs_dilation=st, rhs_dilation=dl,
                                       dimension_numbers=_FORWARD[nd], feature_group_count=groups)
        # forward was: xp = wrap_pad(x)  (circular only)
        dx = sp.wrap_pad_backward(dxp, pads, x_shape[1:-1]) if circular else dxp
        return grads, dx

    def per_example_taps(cache, dy):
        """``(offsets, view, dyg, xq)``: the taps' offsets k D (T, nd) in row-major order; ``view(offset)``,
        V_k (N, P, G, C_g) = xq[n, oS + kD, g C_g + i] at every output position o of the zero-padded
        input xq (a dynamic slice, so a ``lax.scan`` over the taps holds one at a time); dY (N, P, G, F_g);
        xq itself, cut to the used positions (Lu)."""
        x_shape = token_shape(cache["x_shape"])
        _, _, conv_pads, out = geometry(x_shape)
        check_same_shape(name, (x_shape[0],) + out + (features,), dy)
        xp, n, p = cache["x"], dy.shape[0], math.prod(out)
        c = xp.shape[-1]
        xq = lax.pad(xp, jnp.zeros((), xp.dtype), ((0, 0, 0),) + tuple((lo, hi, 0) for lo, hi in conv_pads)
                     + ((0, 0, 0),))
        xq = lax.slice(xq, (0,) * (nd + 2), (n,) + used_span(out) + (c,))     # the positions windows reach
        offsets = np.array([[a * d for a, d in zip(tap, dl)] for tap in itertools.product(*(range(k) for k in ks))],
                           np.int32)
        spans = tuple((o - 1) * s + 1 for o, s in zip(out, st))

        def view(offset):
            zero = jnp.zeros((), offset.dtype)      # one integer type for every start index (x64 or not)
            window = lax.dynamic_slice(xq, (zero,) + tuple(offset[i] for i in range(nd)) + (zero,),
                                       (n,) + spans + (c,))
            strided = lax.slice(window, (0,) * (nd + 2), window.shape, (1,) + st + (1,))
            return strided.reshape(n, p, groups, c // groups)

        return offsets, view, dy.reshape(n, p, groups, features // groups), xq

    def tap_grad(v, dyg):
        """dW_n[k, i, g F_g + j] = sum_o V_k[n, o, g, i] dY[n, o, g, j]: (N, C_g, F) for one tap."""
        dw = jnp.einsum("npgi,npgj->nigj", v, dyg)
        return dw.reshape(dw.shape[0], dw.shape[1], features)

    def bias_per_example(dy):
        return dy.sum(axis=tuple(range(1, nd + 1)))                          # (N, F)

    def per_example(cache, dy):
        offsets, view, dyg, _ = per_example_taps(cache, dy)
        # forward was: y = conv(xp, W) + b; dW's correlation with the sum over n dropped, tap by tap
        _, dw = lax.scan(lambda carry, off: (carry, tap_grad(view(off), dyg)), None, offsets)   # (T, N, C/G, F)
        grads = {"w": jnp.moveaxis(dw, 0, 1).reshape((dy.shape[0],) + ks + dw.shape[2:])}
        if bias:
            grads["b"] = bias_per_example(dy)
        return grads, backward(cache, dy)[1]

    def per_example_norms(cache, dy):
        offsets, view, dyg, xq = per_example_taps(cache, dy)
        n, p, _, f_g = dyg.shape
        c_g = cache["x"].shape[-1] // groups
        out, used = dy.shape[1:-1], xq.shape[1:-1]
        lu = math.prod(used)
        form = _norms_form(len(offsets), p, lu, groups, c_g, f_g)
        if form == "shifted gram":
            # U U^T[o, o'] = sum_k Gamma[oS + kD, o'S + kD] with Gamma = xq xq^T over the Lu used
            # positions, so <U U^T, dY dY^T> = <Gamma, M>, M = sum_k (dY dY^T spread by S, shifted by kD
            # on both position axes): one Gram of the input (N, G, Lu, Lu) and one of dY (N, G, P, P)
            xu = xq.reshape(n, lu, groups, c_g)
            gamma = jnp.einsum("nagi,nbgi->ngab", xu, xu)
            gram_y = jnp.einsum("npgj,nqgj->ngpq", dyg, dyg).reshape((n, groups) + out + out)
            zero, m = jnp.zeros((), gram_y.dtype), 0
            for off in offsets.tolist():
                spread = tuple((a, u - a - (o - 1) * s - 1, s - 1) for a, u, o, s in zip(off, used, out, st))
                m = m + lax.pad(gram_y, zero, ((0, 0, 0),) * 2 + spread + spread)
            sq = (gamma * m.reshape(gamma.shape)).sum(axis=(1, 2, 3))
        elif form == "tap gram":
            # U U^T = sum_k V_k V_k^T, accumulated over the taps: (N, G, P, P)
            def gram_step(gram, off):
                v = view(off)
                return gram + jnp.einsum("npgi,nqgi->ngpq", v, v), None
            gram_x, _ = lax.scan(gram_step, jnp.zeros((n, groups, p, p), dyg.dtype), offsets)
            sq = jnp.einsum("ngpq,ngpq->n", gram_x, jnp.einsum("npgj,nqgj->ngpq", dyg, dyg))
        elif form == "taps unrolled":           # no scan: its per-step cost dominates a thin layer
            sq = sum((tap_grad(view(jnp.asarray(off)), dyg) ** 2).sum(axis=(1, 2)) for off in offsets)
        else:                                   # tap by tap: one (N, C/G, F) slice of the kernels at a time
            def tap_step(sq, off):
                return sq + (tap_grad(view(off), dyg) ** 2).sum(axis=(1, 2)), None
            sq, _ = lax.scan(tap_step, jnp.zeros((n,), dyg.dtype), offsets)
        if bias:
            db = bias_per_example(dy)
            sq = sq + (db * db).sum(axis=1)
        return sq, backward(cache, dy)[1]

    return Layer(init, forward, backward, name=name, per_example=per_example,
                 per_example_norms=per_example_norms)


_ARGS_DOC = """
    Args:
      features: F, the number of output channels.
      kernel_size: K, an int or a tuple (one per spatial axis).
      stride: S, an int or a tuple; need not divide the input size.
      padding: ``"SAME"`` (JAX's meaning: output ceil(L / S)), ``"VALID"``,
        ``"CIRCULAR"`` (wrap-around, the amounts of "SAME"), an int, or one
        (lo, hi) pair per spatial axis.
      dilation: D (kernel dilation, "atrous"), an int or a tuple.
      groups: G; must divide C and F. ``groups=C`` with ``features=m C`` is a
        depthwise convolution (channel multiplier m).
      bias: whether to add b; without it params are ``{"w"}`` only.
      w_init: ``"he"`` (default, for ReLU nets), ``"glorot"``, ``"lecun"`` or
        a function ``(key, shape, dtype, fan_in, fan_out)`` with
        fan_in = prod(K) C/G, fan_out = prod(K) F/G; b starts at zero.
      dtype: parameter dtype (default: float64 under x64, else float32); the
        input must have the same dtype.
"""


def conv1d(features: int, kernel_size, stride=1, padding="SAME", dilation=1, groups=1, bias=True,
           *, w_init="he", dtype=None) -> Layer:
    """1-D convolution (cross-correlation) over (N, L, C) -> (N, O, F).

    The forward/backward derivation is in the module docstring::

        y[n,o,f] = sum_{k,i} xp[n, oS + kD, gC/G + i] W[k,i,f] + b[f]
        dX = conv_transpose(dY, flip(W))   (N, L, C)
        dW = corr(X, dY)                   (K, C/G, F)
        db = sum_{n,o} dY                  (F,)

    Params: ``{"w": (K, C/G, F), "b": (F,)}``, checked in ``forward`` against
    K, F and the input's C and dtype (at trace time).
    """
    return _conv(1, features, kernel_size, stride, padding, dilation, groups, bias, w_init, dtype)


def conv2d(features: int, kernel_size, stride=1, padding="SAME", dilation=1, groups=1, bias=True,
           *, w_init="he", dtype=None) -> Layer:
    """2-D convolution (cross-correlation) over (N, H, W, C) -> (N, Oh, Ow, F).

    The derivation of the module docstring, on both spatial axes at once::

        y[n,oh,ow,f] = sum_{kh,kw,i} xp[n, oh Sh + kh Dh, ow Sw + kw Dw, gC/G + i] W[kh,kw,i,f] + b[f]
        dX = conv_transpose(dY, flip(W))   (N, H, W, C)
        dW = corr(X, dY)                   (Kh, Kw, C/G, F)
        db = sum_{n,oh,ow} dY              (F,)

    Params: ``{"w": (Kh, Kw, C/G, F), "b": (F,)}``, checked in ``forward``
    against K, F and the input's C and dtype (at trace time).
    """
    return _conv(2, features, kernel_size, stride, padding, dilation, groups, bias, w_init, dtype)


conv1d.__doc__ += _ARGS_DOC
conv2d.__doc__ += _ARGS_DOC
