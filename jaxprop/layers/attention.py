r"""Multi-head self-attention with its projections, backward written by hand.

Shapes: x, y (N, T, D); H heads of width d = D / H; per head Q, K, V, O are
(N, H, T, d) and S, P are (N, H, T, T). Head h is the columns h d:(h+1) d
of the (N, T, D) projections.

Forward::

    Q = x Wq + bq,   K = x Wk + bk,   V = x Wv + bv           (N, T, D) -> heads (N, H, T, d)
    S = Q K^T / sqrt(d)          S_ij = sum_c Q_ic K_jc / sqrt(d)        (-inf for j > i if causal)
    P = softmax_j(S)             P_ij = exp(S_ij - lse_i),  lse_i = log sum_j exp(S_ij)
    O = P V                      O_ic = sum_j P_ij V_jc
    y = concat_h(O) Wo + bo

Backward, one line per forward line, from the bottom up (Oc = concat_h(O),
(N, T, D); dO its gradient cut back into heads)::

    dWo = Oc^T dy  (D, D)     dbo = sum_{N,T} dy  (D,)    dOc = dy Wo^T  (N, T, D)
    dV  = P^T dO              (T, T)^T @ (T, d) -> (T, d)    dV_jc = sum_i P_ij dO_ic
    dP  = dO V^T              (T, d) @ (d, T)  -> (T, T)     dP_ij = sum_c dO_ic V_jc
    dS  = P * (dP - Delta)    (T, T)   with Delta_i = sum_j P_ij dP_ij = sum_c dO_ic O_ic
    dQ  = dS K / sqrt(d)      (T, T) @ (T, d)  -> (T, d)
    dK  = dS^T Q / sqrt(d)    (T, T)^T @ (T, d) -> (T, d)
    dWq = x^T dQc, dbq = sum_{N,T} dQc  (and the same for K, V with dKc, dVc)
    dx  = dQc Wq^T + dKc Wk^T + dVc Wv^T        (x fans out to three projections: paths sum)

The softmax Jacobian is folded into dS. Row i of P depends on row i of S
only, with dP_ij / dS_ik = P_ij (delta_jk - P_ik), so::

    dS_ik = sum_j dP_ij P_ij (delta_jk - P_ik) = P_ik (dP_ik - sum_j P_ij dP_ij)

and sum_j P_ij dP_ij = sum_j P_ij sum_c dO_ic V_jc = sum_c dO_ic O_ic: Delta
is a rowsum over d entries of dO * O, never needing the (T, T) product. A
masked entry has P_ij = 0, hence dS_ij = 0: the mask needs no backward.
Each row of dS sums to zero (sum_k P_ik dP_ik - Delta_i sum_k P_ik = 0), so
dbk = sum_j dK_j = 0 up to rounding: bk shifts row i of S by a constant,
which softmax ignores (a finite-difference check of dbk sees only noise).

``save="probs"`` caches P (N, H, T, T) and runs the lines above. Causal with
T > ``block_size``, it cuts the query rows into blocks of ``block_size``:
rows [lo, hi) see keys [0, hi) only (P = 0 beyond, dS = 0 there), so block b
runs the lines above on its P_b (N, H, hi - lo, hi), dQ's rows come from
their block, and dK, dV of a key sum over the blocks that see it. With nb
blocks that is (1 + 1/nb) / 2 of the (T, T) work and of P's memory
(autodiff of the masked full forward computes every masked entry).

``save="lse"`` (the idea of FlashAttention, Dao et al. 2022, in plain
``jax.numpy``/``lax``) never forms a (T, T) array, forward or backward. The
keys are cut into blocks of ``block_size`` columns (the last block padded and
masked). The forward is a ``lax.scan`` over key blocks with an online
softmax: for block b with scores S_b = Q K_b^T / sqrt(d), (N, H, T, B)::

    m'  = max(m, rowmax S_b)                        running row maximum
    l'  = l exp(m - m') + rowsum exp(S_b - m')      running row sum of exp
    A'  = A exp(m - m') + exp(S_b - m') V_b         running unnormalized O
    after the last block:  O = A / l,  lse = m + log l   (N, H, T)

It caches only x, Q, K, V, O and lse. The backward is a second scan over the
key blocks that rebuilds each block of P from the log-sum-exp,
P_b = exp(S_b - lse), then applies the lines above to that block::

    dV_b = P_b^T dO,  dP_b = dO V_b^T,  dS_b = P_b * (dP_b - Delta),
    dK_b = dS_b^T Q / sqrt(d),  dQ += dS_b K_b / sqrt(d)     (dQ is the scan's carry)

so the largest intermediate is (N, H, T, block_size). Causal, the query rows
are cut into blocks of ``block_size`` as well: row block i sees key blocks
0..i only (every later one is masked whole), so both scans run per row block
over those key blocks, nb (nb + 1) / 2 of the nb^2 block pairs; a key block's
dK_b, dV_b sum over the row blocks that see it. Gradients equal
``save="probs"`` up to rounding.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxprop import initializers
from jaxprop.core import Layer, check_float, check_input, check_same_shape, default_float, matmul, matmul_nt, matmul_tn

SAVE_MODES = ("probs", "lse")


def _heads(a, h):
    """(N, T, D) -> (N, H, T, d): head h is the columns h d:(h+1) d."""
    n, t, dim = a.shape
    return a.reshape(n, t, h, dim // h).transpose(0, 2, 1, 3)


def _merge(a):
    """(N, H, T, d) -> (N, T, D), the inverse of :func:`_heads`."""
    n, h, t, d = a.shape
    return a.transpose(0, 2, 1, 3).reshape(n, t, h * d)


def _bias(b, ndim):
    return b.reshape((1,) * (ndim - 1) + (b.shape[0],))        # b[None, None, :]


def _acc(dtype):
    """Accumulation dtype: float32 for half-precision inputs, else the input's own."""
    return jnp.promote_types(dtype, jnp.float32)


def _mm(spec, a, b, dtype):
    """einsum of a and b in the input dtype ``dtype``, accumulated in ``_acc(dtype)``."""
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=_acc(dtype))


def _scores(q, k, scale):
    """S = Q K^T / sqrt(d): (N, H, Tq, d), (N, H, Tk, d) -> (N, H, Tq, Tk), accumulation dtype."""
    return _mm("nhic,nhjc->nhij", q, k, q.dtype) * scale


def _probs_forward(q, k, v, causal, scale, lo=0):
    """Full softmax attention of the queries at positions lo, lo + 1, ... (all T rows by default)
    against the keys 0, 1, ...: returns O (N, H, Tq, d) and P (N, H, Tq, Tk)."""
    dt = q.dtype
    s = _scores(q, k, scale)
    if causal:
        keep = jnp.arange(k.shape[2])[None, :] <= lo + jnp.arange(q.shape[2])[:, None]   # (Tq, Tk): j <= i
        s = jnp.where(keep[None, None], s, -jnp.inf)
    e = jnp.exp(s - s.max(axis=-1, keepdims=True))
    p = (e / e.sum(axis=-1, keepdims=True)).astype(dt)
    return _mm("nhij,nhjc->nhic", p, v, dt).astype(dt), p


def _probs_backward(q, k, v, o, p, do, scale):
    dt = q.dtype
    dv = _mm("nhij,nhic->nhjc", p, do, dt)                    # forward was: O = P V
    dp = _mm("nhic,nhjc->nhij", do, v, dt)                    # forward was: O = P V
    delta = (do.astype(dp.dtype) * o).sum(axis=-1, keepdims=True)   # rowsum(dO * O) = rowsum(P * dP)
    ds = p * (dp - delta)                                     # forward was: P = softmax(S)
    dq = _mm("nhij,nhjc->nhic", ds, k, dt) * scale            # forward was: S = Q K^T / sqrt(d)
    dk = _mm("nhij,nhic->nhjc", ds, q, dt) * scale            # forward was: S = Q K^T / sqrt(d)
    return dq.astype(dt), dk.astype(dt), dv.astype(dt)


def _row_blocks(t, block_size):
    """Query rows cut into blocks of ``block_size``: [(lo, hi)], the last one shorter."""
    return [(lo, min(lo + block_size, t)) for lo in range(0, t, block_size)]


def _causal_probs_forward(q, k, v, scale, block_size):
    """Causal attention by query blocks: block [lo, hi) of the rows sees keys [0, hi) only (every
    later key is masked, P = 0 there), so the (T, T) work and P shrink to the blocks on and below
    the diagonal: about (1 + 1/nb) / 2 of it for nb blocks. Returns O and P as a tuple of blocks
    P_b (N, H, hi - lo, hi)."""
    outs, probs = [], []
    for lo, hi in _row_blocks(q.shape[2], block_size):
        o_b, p_b = _probs_forward(q[:, :, lo:hi], k[:, :, :hi], v[:, :, :hi], True, scale, lo)
        outs.append(o_b)
        probs.append(p_b)
    return jnp.concatenate(outs, axis=2), tuple(probs)


def _causal_probs_backward(q, k, v, o, probs, do, scale, block_size):
    """_probs_backward block by block (the lines of the module docstring on each P_b): dQ's rows
    lo..hi come from block b alone; dK and dV of keys [0, hi) sum over the blocks that see them."""
    t = q.shape[2]
    dqs, dk, dv = [], jnp.zeros_like(k), jnp.zeros_like(v)
    for (lo, hi), p_b in zip(_row_blocks(t, block_size), probs):
        dq_b, dk_b, dv_b = _probs_backward(q[:, :, lo:hi], k[:, :, :hi], v[:, :, :hi], o[:, :, lo:hi], p_b,
                                           do[:, :, lo:hi], scale)
        dqs.append(dq_b)
        pad = ((0, 0), (0, 0), (0, t - hi), (0, 0))                # keys hi.. are not seen by block b
        dk, dv = dk + jnp.pad(dk_b, pad), dv + jnp.pad(dv_b, pad)
    return jnp.concatenate(dqs, axis=2), dk, dv


def _blocks(a, b, nb):
    """(N, H, T, d) -> (nb, N, H, b, d): key blocks, the last zero-padded to b rows."""
    n, h, t, d = a.shape
    a = jnp.pad(a, ((0, 0), (0, 0), (0, nb * b - t), (0, 0)))
    return a.reshape(n, h, nb, b, d).transpose(2, 0, 1, 3, 4)


def _unblocks(a, t):
    """(nb, N, H, b, d) -> (N, H, T, d): inverse of :func:`_blocks` (padding dropped)."""
    nb, n, h, b, d = a.shape
    return a.transpose(1, 2, 0, 3, 4).reshape(n, h, nb * b, d)[:, :, :t]


def _block_keep(j, b, t, causal, lo=0, rows=None):
    """(rows, b) boolean: which keys of block j the queries lo, lo + 1, ... (``rows`` of them, all
    T by default) may see (padding and causal mask)."""
    rows = t if rows is None else rows
    kidx = j * b + jnp.arange(b)                              # key positions of block j
    keep = jnp.broadcast_to(kidx[None, :] < t, (rows, b))
    if causal:
        keep = keep & (kidx[None, :] <= lo + jnp.arange(rows)[:, None])
    return keep


def _lse_plan(t, b, causal):
    """[(lo, hi, nkb)]: query rows [lo, hi) against the first nkb key blocks. Causal, the rows are
    cut into blocks of b too and row block i sees key blocks 0..i only (the later ones are masked
    whole): nb (nb + 1) / 2 of the nb^2 block pairs. Otherwise all T rows against all nb blocks."""
    nb = -(-t // b)
    if causal:
        return [(i * b, min((i + 1) * b, t), i + 1) for i in range(nb)]
    return [(0, t, nb)]


def _lse_forward(q, k, v, causal, scale, block):
    """Online-softmax forward over key blocks: O (N, H, T, d) and lse (N, H, T).

    The running statistics m, l and the unnormalized output accumulate in
    float32 for half-precision inputs (``_acc``)."""
    n, h, t, d = q.shape
    dt, at = q.dtype, _acc(q.dtype)
    b = min(block, t)
    nb = -(-t // b)
    kbs, vbs = _blocks(k, b, nb), _blocks(v, b, nb)
    outs, lses = [], []
    for lo, hi, nkb in _lse_plan(t, b, causal):
        qr = q[:, :, lo:hi]

        def step(carry, j, lo=lo, qr=qr):
            m, l, acc = carry
            kb, vb = kbs[j], vbs[j]                                  # read in place: no copy of kbs[:nkb]
            keep = _block_keep(j, b, t, causal, lo, qr.shape[2])[None, None]
            s = jnp.where(keep, _scores(qr, kb, scale), -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=-1, keepdims=True))   # finite: key 0 is in block 0
            alpha = jnp.exp(m - m_new)                               # rescales what came before
            e = jnp.exp(s - m_new)                                   # (N, H, rows, b)
            l_new = alpha * l + e.sum(axis=-1, keepdims=True)
            acc_new = alpha * acc + _mm("nhij,nhjc->nhic", e, vb, dt)
            return (m_new, l_new, acc_new), None

        rows = hi - lo
        init = (jnp.full((n, h, rows, 1), -jnp.inf, at), jnp.zeros((n, h, rows, 1), at),
                jnp.zeros((n, h, rows, d), at))
        (m, l, acc), _ = lax.scan(step, init, jnp.arange(nkb))
        outs.append((acc / l).astype(dt))
        lses.append((m + jnp.log(l))[..., 0])
    return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)


def _lse_backward(q, k, v, o, lse, do, causal, scale, block):
    """Blocked backward: P_b rebuilt from lse, one key block at a time (per row block, causal)."""
    n, h, t, d = q.shape
    dt = q.dtype
    b = min(block, t)
    nb = -(-t // b)
    delta = (do.astype(lse.dtype) * o).sum(axis=-1, keepdims=True)   # (N, H, T, 1) rowsum(dO * O)
    lse = lse[..., None]
    kbs, vbs = _blocks(k, b, nb), _blocks(v, b, nb)
    at = lse.dtype                                                   # dK, dV sum over row blocks in it
    dqs, dk, dv = [], jnp.zeros((nb, n, h, b, d), at), jnp.zeros((nb, n, h, b, d), at)
    for lo, hi, nkb in _lse_plan(t, b, causal):
        qr, dor, lser, deltar = q[:, :, lo:hi], do[:, :, lo:hi], lse[:, :, lo:hi], delta[:, :, lo:hi]

        def step(carry, j, lo=lo, qr=qr, dor=dor, lser=lser, deltar=deltar):
            dq, dk, dv = carry
            kb, vb = kbs[j], vbs[j]
            keep = _block_keep(j, b, t, causal, lo, qr.shape[2])[None, None]
            # forward was: P_b = exp(S_b - lse), masked entries 0
            p = jnp.exp(jnp.where(keep, _scores(qr, kb, scale) - lser, -jnp.inf))
            dvb = _mm("nhij,nhic->nhjc", p, dor, dt)              # forward was: O = sum_b P_b V_b
            dp = _mm("nhic,nhjc->nhij", dor, vb, dt)              # forward was: O = sum_b P_b V_b
            ds = p * (dp - deltar)                                # forward was: P = softmax(S)
            dkb = _mm("nhij,nhic->nhjc", ds, qr, dt) * scale      # forward was: S_b = Q K_b^T / sqrt(d)
            dq = dq + _mm("nhij,nhjc->nhic", ds, kb, dt) * scale
            # a key's gradient sums over the row blocks that see it: added in place at block j
            return (dq, dk.at[j].add(dkb), dv.at[j].add(dvb)), None

        (dq, dk, dv), _ = lax.scan(step, (jnp.zeros(qr.shape, at), dk, dv), jnp.arange(nkb))
        dqs.append(dq.astype(dt))
    return jnp.concatenate(dqs, axis=2), _unblocks(dk, t).astype(dt), _unblocks(dv, t).astype(dt)


def attention(heads: int, *, causal: bool = False, save: str = "probs", block_size: int = 128,
              dtype=None) -> Layer:
    r"""Multi-head self-attention ``(N, T, D) -> (N, T, D)`` (see the module docstring).

    Forward: Q, K, V = x Wq + bq, x Wk + bk, x Wv + bv, cut into ``heads``
    heads of width d = D / heads; per head O = softmax(Q K^T / sqrt(d)) V (with
    -inf above the diagonal when ``causal``); y = concat_h(O) Wo + bo. Equal to
    PyTorch's ``scaled_dot_product_attention`` on the same projections.

    Backward (the module docstring derives it), per head::

        dV = P^T dO     dP = dO V^T     dS = P * (dP - rowsum(dO * O))
        dQ = dS K / sqrt(d)     dK = dS^T Q / sqrt(d)
        dWq = x^T dQc (D, D), dbq = sum_{N,T} dQc (D,) (same for k, v);  dWo = Oc^T dy, dbo = sum dy
        dx = dQc Wq^T + dKc Wk^T + dVc Wv^T   (N, T, D)

    The three input projections run as one product with the weights side by
    side, [Q K V] = x [Wq Wk Wv] + [bq bk bv] ((M, D) @ (D, 3D), M = N T), so
    the backward has one [dWq dWk dWv] = x^T [dQc dKc dVc] and one
    dx = [dQc dKc dVc] [Wq Wk Wv]^T (the sum over the three paths inside the
    product). The params stay separate; the (D, 3D) copy is made per call.
    Measured on 2 CPU cores against the three-product form, paired in one
    process: the GPT training step (bfloat16 operands, batch 32, context 128)
    0.917 [0.909, 0.932] of the time for gpt:4-128-4, 0.898 [0.890, 0.908]
    for gpt:3-96-4, 0.993 [0.964, 1.018] for gpt:2-64-4 in float32 at batch
    16; the benchmark's lone layer (N 8, T 512, D 256, float32, causal)
    1.066 [1.015, 1.081] with ``save="probs"`` and 0.893 [0.878, 0.906] with
    ``save="lse"``. (Three backward products after one forward product:
    1.085x the fused GPT step.)

    Args:
      heads: H, must divide D (a ``ValueError`` at init otherwise).
      causal: position i attends to positions j <= i only.
      save: ``"probs"`` caches P (N, H, T, T); ``"lse"`` caches only the row
        log-sum-exp (N, H, T) and runs forward and backward over key blocks,
        so no (T, T) array ever exists (memory O(T block_size) per head).
      block_size: key-block width for ``save="lse"`` (T need not be a multiple);
        for ``save="probs"`` with ``causal``, the height of the query blocks
        (used when T > block_size; see the module docstring).
      dtype: parameter dtype (default: float64 under x64, else float32). For
        half-precision inputs (bfloat16, float16) the matmuls take the input
        dtype and accumulate in float32, and the scores, softmax statistics
        (running max and sum, lse) and dQ are float32; P is cached in the
        input dtype. Under ``jax.default_matmul_precision("bfloat16")`` the
        four projections (forward and backward) take bfloat16 operands with
        float32 sums (:func:`jaxprop.core.matmul`); the per-head score and
        value products stay float32 (not faster in bfloat16 on XLA:CPU).

    Params: ``{"wq", "wk", "wv", "wo": (D, D), "bq", "bk", "bv", "bo": (D,)}``;
    the matrices start Glorot-uniform (as PyTorch's MultiheadAttention), the
    biases at zero.
    """
    if not isinstance(heads, int) or heads < 1:
        raise ValueError(f"attention: heads must be a positive int, got {heads!r}")
    if save not in SAVE_MODES:
        raise ValueError(f"attention: save must be 'probs' or 'lse', got {save!r}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"attention: block_size must be a positive int, got {block_size!r}")
    name = f"attention({heads}{', causal' if causal else ''}, save={save})"
    glorot = initializers.get("glorot")

    def init(key, in_shape):
        in_shape = tuple(in_shape)
        if len(in_shape) != 3:
            raise ValueError(f"{name}: in_shape must be (N, T, D), got {in_shape}")
        dim = in_shape[-1]
        if dim % heads:
            raise ValueError(f"{name}: heads={heads} must divide the model width D; got D={dim} "
                             f"(in_shape {in_shape})")
        dt = dtype or default_float()
        ks = jax.random.split(key, 4)
        params = {}
        for kk, w in zip(ks, ("wq", "wk", "wv", "wo")):
            params[w] = glorot(kk, (dim, dim), dt, dim, dim)
        for b in ("bq", "bk", "bv", "bo"):
            params[b] = jnp.zeros((dim,), dt)
        return in_shape, params

    def by_query_blocks(x):
        """save="probs", causal, T > block_size: P by query blocks (module docstring)."""
        return causal and x.shape[1] > block_size

    def forward(params, x):
        wq = params["wq"]
        dim = wq.shape[0]
        check_float(name, x)
        check_input(name, x, ndim=3, what="input (N, T, D)")
        check_input(name, x, last=dim, dtype=wq.dtype)
        if dim % heads:
            raise ValueError(f"{name}: heads={heads} must divide D={dim}")
        scale = 1.0 / math.sqrt(dim // heads)
        # the three projections as one (M, D) @ (D, 3D) product: one pass over x, a wider GEMM
        w_qkv = jnp.concatenate([params["wq"], params["wk"], params["wv"]], axis=1)
        b_qkv = jnp.concatenate([params["bq"], params["bk"], params["bv"]])
        qkv = matmul(x, w_qkv) + _bias(b_qkv, 3)
        q, k, v = (_heads(a, heads) for a in jnp.split(qkv, 3, axis=-1))
        cache = {"x": x, "q": q, "k": k, "v": v, "w_qkv": w_qkv, "wo": params["wo"]}
        if save == "probs" and by_query_blocks(x):
            o, cache["p"] = _causal_probs_forward(q, k, v, scale, block_size)
        elif save == "probs":
            o, cache["p"] = _probs_forward(q, k, v, causal, scale)
        else:
            o, cache["lse"] = _lse_forward(q, k, v, causal, scale, block_size)
        oc = _merge(o)                                          # (N, T, D)
        cache["o"] = oc
        return matmul(oc, params["wo"]) + _bias(params["bo"], 3), cache

    def backward(cache, dy):
        x, oc = cache["x"], cache["o"]
        check_same_shape(name, x, dy)
        dim = x.shape[-1]
        scale = 1.0 / math.sqrt(dim // heads)
        x2, dy2 = x.reshape(-1, dim), dy.reshape(-1, dim)       # (M, D) rows, M = N T
        grads = {"wo": matmul_tn(oc.reshape(-1, dim), dy2),     # forward was: y = Oc @ Wo + bo
                 "bo": dy2.sum(axis=0)}
        do = _heads(matmul_nt(dy, cache["wo"]), heads)          # forward was: y = Oc @ Wo
        q, k, v, o = cache["q"], cache["k"], cache["v"], _heads(oc, heads)
        if save == "probs" and by_query_blocks(x):
            dq, dk, dv = _causal_probs_backward(q, k, v, o, cache["p"], do, scale, block_size)
        elif save == "probs":
            dq, dk, dv = _probs_backward(q, k, v, o, cache["p"], do, scale)
        else:
            dq, dk, dv = _lse_backward(q, k, v, o, cache["lse"], do, causal, scale, block_size)
        # forward was: [Q K V] = x [Wq Wk Wv] + [bq bk bv], so with dC = [dQc dKc dVc] (M, 3D):
        # [dWq dWk dWv] = x^T dC, [dbq dbk dbv] = sum_M dC, dx = dC [Wq Wk Wv]^T (x fans out to
        # the three projections: their paths sum inside this one product)
        dc = jnp.concatenate([_merge(dh) for dh in (dq, dk, dv)], axis=-1).reshape(-1, 3 * dim)
        for c, dw, db in zip("qkv", jnp.split(matmul_tn(x2, dc), 3, axis=1), jnp.split(dc.sum(axis=0), 3)):
            grads["w" + c], grads["b" + c] = dw, db
        dx = matmul_nt(dc, cache["w_qkv"]).reshape(x.shape)
        return {w: grads[w] for w in ("wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo")}, dx

    return Layer(init, forward, backward, name=name)
