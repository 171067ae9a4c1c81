"""Recurrent layers and the scan machinery: BPTT by hand against jax.grad and PyTorch."""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprop as jp
from jaxprop import autodiff
from jaxprop.combinators import serial
from jaxprop.layers.dense import dense
from jaxprop.layers.embedding import embedding
from jaxprop.layers.recurrent import bidirectional, gru, gru_cell, lstm, rnn
from jaxprop.losses import softmax_cross_entropy
from jaxprop.combinators.scan import Cell, scan
from jaxprop.testing import CASES as REGISTRY, Case, setup

# The registry (jaxprop.testing.CASES) holds rnn, rnn_relu_last, gru, gru_reverse_last_t1, lstm,
# lstm_reverse_last and bidirectional, run through every generic check by tests/test_layers.py.
# Three more configurations here, jitted only (an eager scan compiles on every call).
CASES = [
    Case("rnn_reverse_t1", lambda: rnn(3, reverse=True), (2, 1, 3)),
    Case("gru_reverse", lambda: gru(4, reverse=True), (2, 5, 3)),
    Case("lstm_t1", lambda: lstm(3), (2, 1, 2)),
]
DTYPES = [jnp.float64, jnp.float32]
BY_NAME = {c.name: c for c in REGISTRY + CASES}
RUNS = [pytest.param(c, d, True, id=f"{c.name}-{jnp.dtype(d).name}-jit") for c in CASES for d in DTYPES]


@pytest.mark.parametrize("case, dtype, jit", RUNS)
def test_backward_matches_autodiff(case, dtype, jit):
    layer, params, x, ctx = setup(case, dtype)
    rtol = case.rtol32 if (dtype == jnp.float32 and case.rtol32) else None
    with jax.default_matmul_precision("highest"):
        report = jp.check_layer(layer, params, x, jit=jit, fd=case.fd and dtype == jnp.float64 and not jit,
                                rtol=rtol, **ctx)
    assert report.ok, str(report)
    assert report.dtype == jnp.dtype(dtype).name


@pytest.mark.parametrize("name", ["rnn", "gru", "lstm"])
def test_bad_input_names_layer(name):
    layer, params, x, _ = setup(BY_NAME[name], jnp.float64)
    for bad, what in [(jnp.zeros((3, 4, 3)), r"\(N, T, 2\).*\(3, 4, 3\)"),       # wrong D
                      (jnp.zeros((3, 2)), r"\(N, T, 2\).*\(3, 2\)"),             # no time axis
                      (jnp.zeros((3, 0, 2)), r"T >= 1.*\(3, 0, 2\)"),            # empty sequence
                      (jnp.zeros((3, 4, 2), jnp.int32), "floating-point"),
                      (jnp.zeros((3, 4, 2), jnp.float32), "dtype float64")]:
        with pytest.raises(ValueError, match=rf"^{name}\(5\): .*{what}"):
            layer.forward(params, bad)
    with pytest.raises(ValueError, match=rf"^{name}\(5\): params\['w_hh'\] expected shape"):
        layer.forward(dict(params, w_hh=params["w_hh"][:, :-1]), x)
    _, cache = layer.forward(params, x)
    with pytest.raises(ValueError, match="expected dy of shape"):
        layer.backward(cache, jnp.zeros((3, 4, 6)))
    with pytest.raises(ValueError, match=f"{name}: hidden must be a positive int"):
        {"rnn": rnn, "gru": gru, "lstm": lstm}[name](0)
    with pytest.raises(ValueError, match="rnn: activation must be one of"):
        rnn(3, activation="sigmoid")


def test_shapes_and_pytorch_init():
    for kind, g in [(rnn, 1), (gru, 3), (lstm, 4)]:
        out_shape, p = kind(64).init(jax.random.key(0), (8, 12, 5))
        assert out_shape == (8, 12, 64)
        assert jp.output_shape(kind(64, return_sequences=False), (8, 12, 5)) == (8, 64)
        assert {k: v.shape for k, v in p.items()} == {"w_ih": (5, g * 64), "w_hh": (64, g * 64),
                                                     "b_ih": (g * 64,), "b_hh": (g * 64,)}
        for v in p.values():                                # U(-1/sqrt(H), 1/sqrt(H)), as PyTorch
            v = np.asarray(v)
            assert np.abs(v).max() <= 1 / 8 and np.abs(v).max() > 0.9 / 8
            assert abs(v.std() - (1 / 8) / np.sqrt(3)) < 0.15 * (1 / 8) / np.sqrt(3)
    assert jp.output_shape(bidirectional(gru(3), gru(2, reverse=True)), (4, 6, 2)) == (4, 6, 5)


def test_lstm_forget_bias_shifts_only_the_forget_block_of_b_hh():
    """jp.lstm(h, forget_bias=b): PyTorch's draw with b added to b_hh[H:2H] (the f block of i, f, g, o);
    every other parameter is the same draw as forget_bias=0 from the same key."""
    h, shape = 5, (2, 3, 4)
    _, p0 = lstm(h).init(jax.random.key(0), shape)
    _, p1 = lstm(h, forget_bias=1.0).init(jax.random.key(0), shape)
    shift = np.zeros(4 * h)
    shift[h:2 * h] = 1.0
    np.testing.assert_allclose(np.asarray(p1["b_hh"] - p0["b_hh"]), shift, atol=1e-12)
    for k in ("w_ih", "w_hh", "b_ih"):
        np.testing.assert_array_equal(np.asarray(p1[k]), np.asarray(p0[k]))
    assert lstm(h, forget_bias=1.0).name == "lstm(5, forget_bias=1)" and lstm(h).name == "lstm(5)"
    for bad in (float("nan"), "1", True):
        with pytest.raises(ValueError, match="forget_bias must be a finite number"):
            lstm(h, forget_bias=bad)


def test_reverse_and_last_state_semantics():
    """reverse=True reads x backwards, outputs in input order; the final state of a reverse
    layer is its output at t = 0, of a forward layer its output at t = T - 1."""
    x = jax.random.normal(jax.random.key(1), (2, 6, 3))
    _, p = rnn(4).init(jax.random.key(0), x.shape)
    run = jax.jit(lambda x, **kw: rnn(4, **kw).forward(p, x)[0], static_argnames=("return_sequences", "reverse"))
    y, y_rev = run(x), run(x, reverse=True)
    np.testing.assert_allclose(y_rev, run(x[:, ::-1])[:, ::-1], rtol=1e-13)
    np.testing.assert_allclose(run(x, return_sequences=False), y[:, -1], rtol=1e-13)
    np.testing.assert_allclose(run(x, return_sequences=False, reverse=True), y_rev[:, 0], rtol=1e-13)
    # causal: the output at t does not depend on later inputs (and reverse: not on earlier ones)
    x2 = x.at[:, 4:].set(0.0)
    np.testing.assert_array_equal(run(x2)[:, :4], y[:, :4])
    assert not np.allclose(run(x2, reverse=True)[:, :4], y_rev[:, :4])


EXPLODING = {"rnn_relu": lambda: rnn(8, activation="relu"), "gru": lambda: gru(8),
             "lstm": lambda: lstm(8, return_sequences=False)}


@pytest.mark.parametrize("name, dtype", [(k, jnp.float64) for k in EXPLODING] + [("rnn_relu", jnp.float32)],
                         ids=lambda v: v if isinstance(v, str) else jnp.dtype(v).name)
def test_exploding_recurrence_stays_finite_and_equals_jax_grad(name, dtype):
    """W_hh scaled x5, T = 30: the relu RNN's state and gradients grow geometrically (x1e7 here);
    the gated cells saturate. The hand BPTT stays finite and equals jax.grad's (a non-finite
    hand gradient fails check_layer: its error is inf or NaN)."""
    layer = EXPLODING[name]()
    x = jax.random.normal(jax.random.key(1), (4, 30, 3), dtype)
    _, params = layer.init(jax.random.key(0), x.shape)
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
    big = dict(params, w_hh=5.0 * params["w_hh"])
    report = jp.check_layer(layer, big, x, jit=True, fd=False)
    assert report.ok, str(report)
    if name == "rnn_relu":                                    # it really explodes
        @jax.jit
        def max_dw_hh(p):
            y, cache = layer.forward(p, x)
            return jnp.abs(layer.backward(cache, jnp.ones_like(y))[0]["w_hh"]).max()
        assert float(max_dw_hh(big)) > 1e6 * float(max_dw_hh(params))


# ------------------------------------------------------------------------ the scan machinery, a new cell

def leaky_tanh_cell(hidden):
    """A cell written only as its step's forward and backward (output != carry):
    h' = (1 - a) h + a tanh(x W + h U),  y = h'^2, params {"w": (D, H), "u": (H, H)}, a = 0.5."""
    a = 0.5

    def init(key, x_shape):
        k1, k2 = jax.random.split(key)
        return (x_shape[0], hidden), {"w": jax.random.normal(k1, (x_shape[1], hidden)) * 0.5,
                                      "u": jax.random.normal(k2, (hidden, hidden)) * 0.5}

    def step_forward(p, h, x_t):
        t = jnp.tanh(x_t @ p["w"] + h @ p["u"])
        h_new = (1 - a) * h + a * t
        return h_new, h_new * h_new, {"h": h, "x": x_t, "t": t, "h_new": h_new}

    def step_backward(p, c, dh_new, dy_t):
        dh_total = dh_new + 2 * c["h_new"] * dy_t
        ds = a * dh_total * (1 - c["t"] ** 2)
        return ({"w": c["x"].T @ ds, "u": c["h"].T @ ds}, (1 - a) * dh_total + ds @ p["u"].T, ds @ p["w"].T)

    return Cell(init, step_forward, step_backward,
                lambda p, x_t: jnp.zeros((x_t.shape[0], hidden), x_t.dtype), name="leaky")


@pytest.mark.parametrize("return_sequences, reverse", [(True, False), (False, True)], ids=["seq", "last_reverse"])
def test_scan_runs_any_cell(return_sequences, reverse):
    layer = scan(leaky_tanh_cell(4), return_sequences=return_sequences, reverse=reverse)
    out_shape, params = layer.init(jax.random.key(0), (3, 6, 2))
    x = jax.random.normal(jax.random.key(1), (3, 6, 2))
    y, _ = layer.forward(params, x)
    assert y.shape == out_shape == ((3, 6, 4) if return_sequences else (3, 4))
    report = jp.check_layer(layer, params, x, jit=True, fd=False)
    assert report.ok, str(report)


def test_scan_sums_grads_after_the_sweep_when_the_cell_says_how():
    """Cell.sum_grads: a cell whose step_backward returns dparams None and, as its dx_t, the
    pre-activation gradient ds_t (an input projection outside the scan would take it from
    there); dW = sum_t x_t^T ds_t and dU = sum_t h_{t-1}^T ds_t are then one product each
    after the reverse scan. The parameter gradients equal jax.grad's."""
    a, calls = 0.5, []
    base = leaky_tanh_cell(4)

    def step_backward(p, c, dh_new, dy_t):
        dh_total = dh_new + 2 * c["h_new"] * dy_t
        ds = a * dh_total * (1 - c["t"] ** 2)
        return None, (1 - a) * dh_total + ds @ p["u"].T, ds

    def sum_grads(p, caches, dss):
        calls.append(dss.shape)
        x2, h2, d2 = (v.reshape(-1, v.shape[-1]) for v in (caches["x"], caches["h"], dss))
        return {"w": x2.T @ d2, "u": h2.T @ d2}

    layer = scan(base._replace(step_backward=step_backward, sum_grads=sum_grads))
    _, params = layer.init(jax.random.key(0), (3, 6, 2))
    params = jax.tree_util.tree_map(lambda v: v.astype(jnp.float64), params)
    x = jax.random.normal(jax.random.key(1), (3, 6, 2), jnp.float64)
    dy = jax.random.normal(jax.random.key(2), (3, 6, 4), jnp.float64)
    _, cache = layer.forward(params, x)
    grads, _ = layer.backward(cache, dy)              # its dx is ds here, not dJ/dx: not compared
    ref = jax.grad(lambda p: jnp.sum(layer.forward(p, x)[0] * dy))(params)
    assert calls == [(6, 3, 4)]                       # once, with every step's ds stacked (T, N, H)
    for k in ("w", "u"):
        np.testing.assert_allclose(grads[k], ref[k], rtol=1e-10, atol=1e-12)


RECURRENT = [pytest.param(rnn, 1, id="rnn"), pytest.param(gru, 3, id="gru"), pytest.param(lstm, 4, id="lstm")]


def _backward_carry(layer, n, t, d, h):
    _, params = layer.init(jax.random.key(0), (n, t, d))
    _, cache = layer.forward(params, jnp.ones((n, t, d)))
    jaxpr = jax.make_jaxpr(layer.backward)(cache, jnp.ones((n, t, h)))
    scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1
    return [a.shape for a in scans[0].params["jaxpr"].in_avals[scans[0].params["num_consts"]:]
            [:scans[0].params["num_carry"]]]


@pytest.mark.parametrize("make, gates", RECURRENT)
def test_small_batches_sum_the_weight_gradients_outside_the_loop(make, gates):
    """For a small batch (N < 64) the reverse scan of BPTT carries dh only: dW_hh (H, G H) is one
    product after it (Cell.sum_grads), not a running sum in the loop's carry as jax.grad's
    transposed scan keeps. From N = 64 on the same rule runs inside the loop."""
    t, d, h = 5, 3, 6
    assert _backward_carry(make(h), 2, t, d, h) == [(2, h)] * (2 if gates == 4 else 1)   # dh (and dc)
    assert (h, gates * h) in _backward_carry(make(h), 64, t, d, h)


def test_scan_sum_after_forces_the_placement():
    """scan(cell, sum_after=True / False) overrides the batch-size default either way."""
    t, h = 5, 4

    def carry(sum_after, n):                          # the cell alone reads a_t (N, 3H)
        return _backward_carry(scan(gru_cell(h), sum_after=sum_after), n, t, 3 * h, h)

    assert (h, 3 * h) in carry(False, 2) and (h, 3 * h) not in carry(None, 2)
    assert (h, 3 * h) not in carry(True, 64) and (h, 3 * h) in carry(None, 64)


@pytest.mark.parametrize("make, gates", RECURRENT)
def test_weight_gradients_summed_in_the_loop_match_autodiff(make, gates, monkeypatch):
    """The other placement of the cell's sum_grads rule (what N >= 64 gets), checked on a small case."""
    monkeypatch.setattr(sys.modules[scan.__module__], "SUM_AFTER_BELOW_BATCH", 0)
    layer = make(4)
    assert (4, gates * 4) in _backward_carry(layer, 2, 5, 3, 4)
    _, params = layer.init(jax.random.key(0), (2, 5, 3))
    params = jax.tree_util.tree_map(lambda v: v.astype(jnp.float64), params)
    x = jax.random.normal(jax.random.key(1), (2, 5, 3), jnp.float64)
    report = jp.check_layer(layer, params, x, jit=True, fd=False)
    assert report.ok, str(report)


@pytest.mark.parametrize("return_sequences, reverse", [(True, False), (False, True)], ids=["seq", "last_reverse"])
@pytest.mark.parametrize("make, gates", RECURRENT)
def test_the_input_projection_runs_inside_the_forward_loop(make, gates, return_sequences, reverse, monkeypatch):
    """a_t = x_t W_ih + b_ih is computed in the forward scan's step: no product, and so no
    (T, N, G H) array A, outside the loop (A cost a write and two reads of memory). The other placement
    (``PROJECT_IN_LOOP = False``: A for all steps at once, before the scan) gives the same
    output and gradients."""
    import jaxprop.layers.recurrent as recurrent
    n, t, d, h = 2, 5, 3, 4
    layer = make(h, return_sequences=return_sequences, reverse=reverse)
    _, params = layer.init(jax.random.key(0), (n, t, d))
    params = jax.tree_util.tree_map(lambda v: v.astype(jnp.float64), params)
    x = jax.random.normal(jax.random.key(1), (n, t, d), jnp.float64)

    def products_outside_the_loop(lay):
        jaxpr = jax.make_jaxpr(lambda p, xx: lay.forward(p, xx)[0])(params, x).jaxpr
        return [e.outvars[0].aval.shape for e in jaxpr.eqns if e.primitive.name == "dot_general"]

    assert products_outside_the_loop(layer) == []
    y, cache = layer.forward(params, x)
    dy = jax.random.normal(jax.random.key(2), y.shape, jnp.float64)
    grads, dx = layer.backward(cache, dy)
    monkeypatch.setattr(recurrent, "PROJECT_IN_LOOP", False)
    before = make(h, return_sequences=return_sequences, reverse=reverse)
    assert products_outside_the_loop(before) == [(t, n, gates * h)]
    y0, cache0 = before.forward(params, x)
    grads0, dx0 = before.backward(cache0, dy)
    for a, b in zip(jax.tree_util.tree_leaves((y, grads, dx)), jax.tree_util.tree_leaves((y0, grads0, dx0))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)


def test_scan_cache_keeps_weights_once():
    """Params are closed over by the forward scan, never stacked per step: the cache is the
    input, w_ih, the cell's params once, and 7 (T, N, H) arrays per LSTM step (h, c, i, f, g, o, tanh c)."""
    n, t, d, h = 2, 50, 3, 16
    layer = lstm(h)
    _, params = layer.init(jax.random.key(0), (n, t, d))
    _, cache = jax.jit(layer.forward)(params, jnp.ones((n, t, d)))
    shapes = [a.shape for a in jax.tree_util.tree_leaves(cache)]
    assert (t, h, 4 * h) not in shapes and (t, 4 * h) not in shapes
    cell_params = params["w_hh"].size + params["b_hh"].size          # the scan keeps its params once
    assert sum(int(np.prod(s)) for s in shapes) == n * t * d + params["w_ih"].size + cell_params + 7 * t * n * h


# ------------------------------------------------------------------------ PyTorch's modules

def _torch_module(torch, kind, d, h, params, bidir_params=None):
    cls = {"rnn_tanh": torch.nn.RNN, "rnn_relu": torch.nn.RNN, "gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[kind]
    kw = {"nonlinearity": kind[4:]} if kind.startswith("rnn") else {}
    m = cls(d, h, batch_first=True, bidirectional=bidir_params is not None, **kw).double()
    with torch.no_grad():
        for suffix, p in [("", params)] + ([("_reverse", bidir_params)] if bidir_params is not None else []):
            getattr(m, "weight_ih_l0" + suffix).copy_(torch.tensor(np.asarray(p["w_ih"]).T))
            getattr(m, "weight_hh_l0" + suffix).copy_(torch.tensor(np.asarray(p["w_hh"]).T))
            getattr(m, "bias_ih_l0" + suffix).copy_(torch.tensor(np.asarray(p["b_ih"])))
            getattr(m, "bias_hh_l0" + suffix).copy_(torch.tensor(np.asarray(p["b_hh"])))
    return m


def _ours(kind, h, **kw):
    if kind.startswith("rnn"):
        return rnn(h, activation=kind[4:], **kw)
    return {"gru": gru, "lstm": lstm}[kind](h, **kw)


def _torch_grads(torch, m, suffix=""):
    g = lambda n: getattr(m, n + suffix).grad.numpy()      # noqa: E731
    return {"w_ih": g("weight_ih_l0").T, "w_hh": g("weight_hh_l0").T, "b_ih": g("bias_ih_l0"),
            "b_hh": g("bias_hh_l0")}


def _close(a, b, what):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12, err_msg=what)


@pytest.mark.parametrize("return_sequences, reverse", [(True, False), (False, True)], ids=["seq", "last_reverse"])
@pytest.mark.parametrize("kind", ["rnn_tanh", "rnn_relu", "gru", "lstm"])
def test_equals_pytorch(kind, return_sequences, reverse):
    """Same outputs and same gradients (torch autograd, float64) with mapped weights:
    w_ih = weight_ih_l0.T etc. reverse=True equals PyTorch on the time-flipped input. (The
    other two modes follow: test_reverse_and_last_state_semantics.)"""
    torch = pytest.importorskip("torch")
    n, t, d, h = 3, 7, 4, 5
    layer = _ours(kind, h, return_sequences=return_sequences, reverse=reverse)
    _, params = layer.init(jax.random.key(0), (n, t, d))
    x = jax.random.normal(jax.random.key(1), (n, t, d))
    y, cache = jax.jit(layer.forward)(params, x)
    dy = jax.random.normal(jax.random.key(2), y.shape)
    grads, dx = jax.jit(layer.backward)(cache, dy)

    m = _torch_module(torch, kind, d, h, params)
    xt = torch.tensor(np.asarray(x[:, ::-1] if reverse else x), requires_grad=True)
    out, h_n = m(xt)
    h_n = h_n[0] if kind == "lstm" else h_n               # lstm: (h_n, c_n)
    yt = h_n[0] if not return_sequences else (out.flip(1) if reverse else out)
    _close(y, yt.detach().numpy(), f"{kind}: forward")
    (yt * torch.tensor(np.asarray(dy))).sum().backward()
    for k, v in _torch_grads(torch, m).items():
        _close(grads[k], v, f"{kind}: d{k}")
    dxt = xt.grad.numpy()
    _close(dx, dxt[:, ::-1] if reverse else dxt, f"{kind}: dx")


@pytest.mark.parametrize("kind", ["lstm"])
def test_bidirectional_equals_pytorch(kind):
    torch = pytest.importorskip("torch")
    n, t, d, h = 2, 6, 3, 4
    layer = bidirectional(_ours(kind, h), _ours(kind, h, reverse=True))
    _, (p_f, p_b) = layer.init(jax.random.key(0), (n, t, d))
    x = jax.random.normal(jax.random.key(1), (n, t, d))
    y, cache = jax.jit(layer.forward)((p_f, p_b), x)
    dy = jax.random.normal(jax.random.key(2), y.shape)
    (g_f, g_b), dx = jax.jit(layer.backward)(cache, dy)
    m = _torch_module(torch, kind, d, h, p_f, p_b)
    xt = torch.tensor(np.asarray(x), requires_grad=True)
    out, _ = m(xt)
    _close(y, out.detach().numpy(), "forward")
    (out * torch.tensor(np.asarray(dy))).sum().backward()
    for (k, v), (_, vb) in zip(_torch_grads(torch, m).items(), _torch_grads(torch, m, "_reverse").items()):
        _close(g_f[k], v, f"fwd d{k}")
        _close(g_b[k], vb, f"bwd d{k}")
    _close(dx, xt.grad.numpy(), "dx")


# ------------------------------------------------------------------------ training

@pytest.mark.parametrize("cell", ["gru"])        # (lstm: test_sequence_labelling_loss_over_every_position)
def test_training_trajectory_equals_autodiff(cell):
    """serial(embedding, recurrent, dense) trained with optax (clipping included: it is optax's
    job) by the hand BPTT follows autodiff's trajectory in float64."""
    v, n, t, classes = 11, 8, 7, 3
    rec = {"gru": gru, "lstm": lstm}[cell]
    net = serial(embedding(v, 4), rec(6, return_sequences=False), dense(classes))
    loss = softmax_cross_entropy()
    _, params = net.init(jax.random.key(0), (n, t))
    ids = jax.random.randint(jax.random.key(1), (n, t), 0, v)
    labels = jax.random.randint(jax.random.key(2), (n,), 0, classes)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(3e-2))

    def trainer(vg):
        @jax.jit
        def step(p, s):
            value, g = vg(p, ids, labels)
            updates, s = tx.update(g, s, p)
            return optax.apply_updates(p, updates), s, value
        return step

    hand, ref = trainer(jp.value_and_grad(net, loss)), trainer(autodiff.value_and_grad(net, loss))
    p_h = p_r = params
    s_h = s_r = tx.init(params)
    values = []
    for _ in range(6):
        p_h, s_h, v_h = hand(p_h, s_h)
        p_r, s_r, v_r = ref(p_r, s_r)
        np.testing.assert_allclose(v_h, v_r, rtol=1e-11)
        for a, b in zip(jax.tree_util.tree_leaves(p_h), jax.tree_util.tree_leaves(p_r)):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
        values.append(float(v_h))
    assert values[-1] < values[0]                            # and it learns


def test_sequence_labelling_loss_over_every_position():
    """An LSTM language-model shape: logits (N, T, V) against next ids (N, T), J averaged over
    all positions; the hand sweep equals jax.grad."""
    v = 9
    net = serial(embedding(v, 4), lstm(6), dense(v))
    _, params = net.init(jax.random.key(0), (3, 5))
    ids = jax.random.randint(jax.random.key(1), (3, 6), 0, v)
    report = jp.check_gradients(net, softmax_cross_entropy(), params, ids[:, :-1], ids[:, 1:], jit=True, fd=False)
    assert report.ok, str(report)
