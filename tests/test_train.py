"""jaxprop.train / models / autodiff: the step, the loop, evaluation, determinism."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprop as jp
from jaxprop import autodiff, data, models, train
from jaxprop.core import Layer


def running_scale() -> Layer:
    """A toy stateful layer: y = x * w; state = running mean of x (0.9 / 0.1).
    dW = sum_n dy_n * x_n, dx = dy * w."""

    def init(key, in_shape):
        return tuple(in_shape), {"w": 1.0 + 0.1 * jax.random.normal(key, in_shape[1:])}

    def forward(params, x, *, state, train=True):
        del state, train
        return x * params["w"][None, :], {"x": x, "w": params["w"]}

    def backward(cache, dy):
        return {"w": jnp.sum(dy * cache["x"], axis=0)}, dy * cache["w"][None, :]

    def init_state(in_shape):
        return {"mean": jnp.zeros(in_shape[1:])}

    def update_state(state, cache):
        return {"mean": 0.9 * state["mean"] + 0.1 * jnp.mean(cache["x"], axis=0)}

    return Layer(init, forward, backward, "running_scale", init_state, update_state)


def _batch(seed, n=8, d=3, c=4, dtype=jnp.float64):
    rng = np.random.default_rng(seed)          # NumPy: no compilation per test
    return jnp.asarray(rng.standard_normal((n, d)), dtype), jnp.asarray(rng.integers(0, c, n))


def _init(net, shape, seed=1):
    return jax.jit(lambda k: net.init(k, shape)[1])(jax.random.key(seed))


NETS = {
    "mlp": lambda: models.build_model("mlp:5-6:tanh", 4),
    "dropout": lambda: models.build_model("mlp:5:relu:dropout=0.3", 4),
    "stateful": lambda: jp.serial(running_scale(), jp.dense(5), jp.tanh(), jp.dense(4)),
}


# ----------------------------------------------------------------------------- models

def test_build_model_specs():
    def init(net, shape):                  # shapes only: no compilation
        return jax.eval_shape(lambda k: net.init(k, shape)[1], jax.random.key(0)), jp.output_shape(net, shape)

    params, shape = init(models.build_model("linear", 10), (2, 40))
    assert shape == (2, 10) and params["w"].shape == (40, 10)
    net = models.build_model("mlp:100-100:relu", 10)
    params, shape = init(net, (2, 40))
    assert shape == (2, 10)
    assert [p["w"].shape for p in params if p] == [(40, 100), (100, 100), (100, 10)]
    assert "relu" in net.name and not net.stochastic
    assert models.build_model("mlp:8:tanh:dropout=0.5:init=he", 3).stochastic
    for bad, msg in [("resnet:3", "unknown model 'resnet'"), ("mlp", "hidden widths"),
                     ("mlp:a-b", "integers"), ("mlp:8:swish", "unknown activation"),
                     ("mlp:8:relu:p=1", "unknown option")]:
        with pytest.raises(ValueError, match=msg):
            models.build_model(bad, 3)


def test_models_registry_accepts_new_builders(monkeypatch):
    monkeypatch.setitem(models.MODELS, "twice", lambda args, n: jp.serial(jp.dense(int(args)), jp.dense(n)))
    assert jp.output_shape(models.build_model("twice:7", 2), (1, 3)) == (1, 2)


# ----------------------------------------------------------------------------- autodiff reference

@pytest.mark.parametrize("kind,dtype,tol", [(k, jnp.float64, 1e-9) for k in sorted(NETS)]
                         + [("dropout", jnp.float32, 1e-4)])
def test_autodiff_reference_matches_hand_written(kind, dtype, tol):
    net = NETS[kind]()
    x, y = _batch(1, dtype=dtype)
    params = _init(net, x.shape, 2)
    params = train.cast_floating(params, dtype)
    loss = jp.softmax_cross_entropy()
    kw = {"key": jax.random.key(3)} if net.stochastic else {}
    if net.stateful:
        kw["state"] = train.cast_floating(jp.init_state(net, x.shape), dtype)
    # one jitted function computes both (the layers' own tests check them jitted and not)
    hand, ref = jp.value_and_grad(net, loss), autodiff.value_and_grad(net, loss)
    both = jax.jit(lambda p, x, y, kw: (hand(p, x, y, **kw), ref(p, x, y, **kw)))
    (vh, gh), (vr, gr) = both(params, x, y, kw)
    if net.stateful:
        (vh, sh), (vr, sr) = vh, vr
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), sh, sr)
        assert float(jnp.abs(sh[0]["mean"]).max()) > 0        # the state did move
    np.testing.assert_allclose(vh, vr, rtol=tol)
    for a, b in zip(jax.tree_util.tree_leaves(gh), jax.tree_util.tree_leaves(gr)):
        assert a.dtype == dtype
        assert float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) <= tol


# ----------------------------------------------------------------------------- make_train_step

def test_train_step_is_one_optax_update_and_donates():
    net = NETS["mlp"]()
    x, y = _batch(0)
    params = _init(net, x.shape)
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)
    loss = jp.softmax_cross_entropy()

    @jax.jit
    def by_hand(params, opt_state):          # the three lines the step must run
        value, grads = jp.value_and_grad(net, loss)(params, x, y)
        updates, new_state = tx.update(grads, opt_state, params)
        return value, optax.apply_updates(params, updates), new_state

    value, want, want_state = by_hand(params, opt_state)
    step = train.make_train_step(jp.value_and_grad(net, loss), tx)
    old_leaf = jax.tree_util.tree_leaves(params)[0]
    p2, s2, v2 = step(params, opt_state, x, y)
    assert old_leaf.is_deleted()                                  # params buffers were donated
    np.testing.assert_allclose(v2, value, rtol=1e-12)
    for a, b in zip(jax.tree_util.tree_leaves((p2, s2)), jax.tree_util.tree_leaves((want, want_state))):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


def test_train_step_takes_plain_jax_value_and_grad():
    net = NETS["mlp"]()
    loss = jp.softmax_cross_entropy()
    x, y = _batch(0)
    params = _init(net, x.shape)

    def cost(p, x, y):
        return loss.forward(jp.call_forward(net, p, x)[0], y)[0]

    tx = optax.sgd(0.1)
    hand = train.make_train_step(jp.value_and_grad(net, loss), tx, donate=False)
    auto = train.make_train_step(jax.value_and_grad(cost), tx, donate=False)
    ph, _, vh = hand(params, tx.init(params), x, y)
    pa, _, va = auto(params, tx.init(params), x, y)
    np.testing.assert_allclose(vh, va, rtol=1e-12)
    for a, b in zip(jax.tree_util.tree_leaves(ph), jax.tree_util.tree_leaves(pa)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
        assert not np.allclose(a, jax.tree_util.tree_leaves(params)[0]) if a.shape == (3, 5) else True


def test_train_step_stateful_and_stochastic():
    loss = jp.softmax_cross_entropy()
    x, y = _batch(0)
    net = NETS["stateful"]()
    params = _init(net, x.shape)
    state = jp.init_state(net, x.shape)
    tx = optax.sgd(0.1)
    step = train.make_train_step(jp.value_and_grad(net, loss), tx, net=net, donate=False)
    _, _, (value, new_state) = step(params, tx.init(params), x, y, state=state)
    np.testing.assert_allclose(new_state[0]["mean"], 0.1 * np.mean(np.asarray(x), axis=0), rtol=1e-12)
    with pytest.raises(ValueError, match="pass state="):
        step(params, tx.init(params), x, y)

    net = NETS["dropout"]()
    params = _init(net, x.shape)
    step = train.make_train_step(jp.value_and_grad(net, loss), tx, net=net, donate=False)
    with pytest.raises(ValueError, match="pass key="):
        step(params, tx.init(params), x, y)
    a = step(params, tx.init(params), x, y, key=jax.random.key(5))[2]
    b = step(params, tx.init(params), x, y, key=jax.random.key(5))[2]
    c = step(params, tx.init(params), x, y, key=jax.random.key(6))[2]
    assert float(a) == float(b) and float(a) != float(c)


# ----------------------------------------------------------------------------- evaluation

def test_evaluate_matches_numpy():
    net = NETS["mlp"]()
    x, y = _batch(0, n=23)
    params = _init(net, x.shape)
    loss = jp.softmax_cross_entropy()
    res = train.evaluate(train.make_eval_fn(net, loss), params, (), x, y, y, batch_size=10)
    logits = np.asarray(jp.call_forward(net, params, x)[0])
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    np.testing.assert_allclose(res["loss"], -logp[np.arange(23), np.asarray(y)].mean(), rtol=1e-12)
    assert res["accuracy"] == np.mean(logits.argmax(1) == np.asarray(y))


def test_loss_specs():
    moons = data.load("moons")
    s = train.loss_spec("bce", moons)
    assert s.n_outputs == 1 and s.targets(moons.y_train).shape == (100, 1)
    s = train.loss_spec("mse", moons)
    np.testing.assert_array_equal(s.targets(np.array([1, 0])), [[0, 1], [1, 0]])
    assert train.loss_spec(None, data.load("sine")).name == "mse"
    with pytest.raises(ValueError, match="classification"):
        train.loss_spec("ce", data.load("sine"))
    with pytest.raises(ValueError, match="two-class"):
        train.loss_spec("bce", data.load("spirals"))
    with pytest.raises(ValueError, match="unknown loss"):
        train.loss_spec("hinge", moons)


# ----------------------------------------------------------------------------- fit

def test_fit_learns_and_writes_metrics_as_produced(tmp_path):
    ds = data.load("spirals")
    net = models.build_model("mlp:32-32:relu", 3)
    path = tmp_path / "m.jsonl"
    r = train.fit(net, "ce", optax.adam(2e-2), ds, steps=400, batch_size=100, eval_every=100,
                  progress=False, metrics_path=str(path), dtype="float64")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == r.history and len(rows) == 5
    assert rows[0]["train_accuracy"] < 0.6 and rows[-1]["train_accuracy"] > 0.95
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] / 5
    assert set(rows[-1]) >= {"step", "epoch", "batch_loss", "train_loss", "train_accuracy",
                             "test_loss", "test_accuracy", "elapsed_s", "steps_per_s"}
    assert jax.tree_util.tree_leaves(r.params)[0].dtype == jnp.float64
    with pytest.raises(ValueError, match="not empty"):                  # never appends to another run
        train.fit(net, "ce", optax.adam(2e-2), ds, steps=10, batch_size=100, progress=False,
                  metrics_path=str(path))


def test_fit_hand_and_autodiff_agree_in_float64_with_state():
    ds = data.load("circles")
    net = jp.serial(running_scale(), jp.dense(8), jp.tanh(), jp.dense(2))
    kw = dict(steps=50, batch_size=25, eval_every=50, progress=False, dtype="float64")
    tx = optax.adam(1e-2)
    h = train.fit(net, None, tx, ds, grad="hand", **kw)
    a = train.fit(net, None, tx, ds, grad="autodiff", **kw)
    for x, y in zip(jax.tree_util.tree_leaves((h.params, h.model_state)),
                    jax.tree_util.tree_leaves((a.params, a.model_state))):
        np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12)
    assert float(jnp.abs(h.model_state[0]["mean"]).max()) > 0


LINEAR, FROZEN = models.build_model("linear", 2), optax.sgd(0.0)


def test_fit_early_stopping_and_validation():
    ds = data.load("moons").validation_split(0.2, seed=0)
    r = train.fit(LINEAR, None, FROZEN, ds, steps=100, batch_size=20, eval_every=10,
                  early_stopping=2, progress=False)
    assert r.stopped_early and r.step == 20                     # lr 0: no improvement after step 0
    assert "val_accuracy" in r.history[-1] and "test_accuracy" not in r.history[-1]
    assert r.best == {"value": r.history[0]["val_accuracy"], "step": 0}


def test_fit_rejects_bad_arguments():
    ds = data.load("moons")
    net = models.build_model("linear", 2)
    with pytest.raises(ValueError, match="batch_size"):
        train.fit(net, None, optax.sgd(0.1), ds, steps=1, batch_size=101, progress=False)
    with pytest.raises(ValueError, match="exactly one of steps= and epochs="):
        train.fit(net, None, optax.sgd(0.1), ds, progress=False)
    with pytest.raises(ValueError, match="grad must be"):
        train.fit(net, None, optax.sgd(0.1), ds, steps=1, grad="numeric", progress=False)
    for bad in (0, -5, 2.5):                    # once silently replaced by the default
        with pytest.raises(ValueError, match=rf"eval_every must be an int >= 1 .*got {bad}"):
            train.fit(net, None, optax.sgd(0.1), ds, steps=1, eval_every=bad, progress=False)


def test_progress_bar_shows_loss_accuracy_and_speed(capsys):
    import io
    buf = io.StringIO()
    train.fit(LINEAR, None, FROZEN, data.load("moons"),
              epochs=3, batch_size=20, eval_every=5, progress=True, progress_file=buf)
    out = buf.getvalue()
    assert "15/15" in out and "loss=" in out and "test_acc=" in out and "steps/s=" in out


# ----------------------------------------------------------------------------- token ids, sequence outputs

def bigram(vocab: int) -> Layer:
    """A user layer on integer token ids: logits y[n, t] = E[x[n, t]], (N, T) -> (N, T, V).
    dE[v] = sum of dy[n, t] over the positions with x[n, t] = v; no dx (the input is not float)."""

    def init(key, in_shape):
        return tuple(in_shape) + (vocab,), {"E": 0.1 * jax.random.normal(key, (vocab, vocab))}

    def forward(params, x):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"bigram: expected integer token ids, got {x.dtype}")
        return params["E"][x], {"x": x, "E": params["E"]}

    def backward(cache, dy):
        dE = jnp.zeros_like(cache["E"]).at[cache["x"]].add(dy)        # forward was: y = E[x]
        return {"E": dE}, None

    return Layer(init, forward, backward, "bigram")


def _token_data(seed, n, t=6, vocab=5):
    """Next-token prediction of the rule x -> (x + 1) mod V, labels at every position."""
    x = np.random.default_rng(seed).integers(0, vocab, (n, t)).astype(np.int32)
    return x, (x + 1) % vocab


def test_bigram_hand_gradient_matches_jax_grad():
    net, loss = bigram(5), jp.softmax_cross_entropy()
    x, y = (jnp.asarray(a) for a in _token_data(0, 8))
    params = _init(net, x.shape)
    params = {"E": params["E"] + jnp.asarray(np.random.default_rng(1).standard_normal((5, 5)))}
    cost = lambda p: loss.forward(net.forward(p, x)[0], y)[0]              # noqa: E731
    for f in (jp.value_and_grad(net, loss), jax.jit(jp.value_and_grad(net, loss))):
        value, grads = f(params, x, y)
        np.testing.assert_allclose(value, cost(params), rtol=1e-12)
        np.testing.assert_allclose(grads["E"], jax.grad(cost)(params)["E"], rtol=1e-9, atol=1e-12)


def test_accuracy_counts_predicted_positions():
    rng = np.random.default_rng(0)
    logits, labels = jnp.asarray(rng.standard_normal((4, 3, 5))), jnp.asarray(rng.integers(0, 5, (4, 3)))
    want = np.mean(np.asarray(logits).argmax(-1) == np.asarray(labels))          # over N T = 12 positions
    assert float(train.accuracy(logits, labels)) == want
    correct, positions = train.count_correct(logits, labels)
    assert (int(correct), positions) == (round(want * 12), 12)
    one_col = jnp.asarray([[0.3], [-1.0], [2.0]])                                 # a sigmoid logit
    assert float(train.accuracy(one_col, jnp.asarray([1, 1, 1]))) == 2 / 3
    with pytest.raises(ValueError, match=r"labels of shape \(4,\) do not match predictions \(4, 3, 5\)"):
        train.accuracy(logits, labels[:, 0])


def test_evaluate_sequence_accuracy_is_over_positions():
    net = bigram(5)
    x, y = (jnp.asarray(a) for a in _token_data(2, 40))
    perfect = {"E": jnp.asarray(np.roll(np.eye(5), 1, axis=1))}       # predicts (x + 1) mod V everywhere
    ev = train.make_eval_fn(net, jp.softmax_cross_entropy())
    assert train.evaluate(ev, perfect, (), x, y, y)["accuracy"] == 1.0          # not T = 6
    assert train.evaluate(ev, perfect, (), x, y, y, batch_size=16)["accuracy"] == 1.0


def test_fit_keeps_token_ids_integer_and_accuracy_is_per_position():
    x_tr, y_tr = _token_data(1, 64)
    x_te, y_te = _token_data(2, 40)
    ds = {"name": "bigram", "x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te, "n_classes": 5}
    net = bigram(5)
    r = train.fit(net, "ce", optax.adam(0.1), ds, steps=40, batch_size=16, eval_every=20, progress=False,
                  dtype="float64")
    assert r.params["E"].dtype == jnp.float64
    first, last = r.history[0], r.history[-1]
    for row in r.history:
        assert 0.0 <= row["train_accuracy"] <= 1.0 and 0.0 <= row["test_accuracy"] <= 1.0
    # the rows are accuracies over N T positions: recompute the last one from the parameters
    pred = np.asarray(net.forward(r.params, jnp.asarray(x_te))[0])
    assert last["test_accuracy"] == np.mean(pred.argmax(-1) == y_te)
    assert first["train_accuracy"] < 0.6 and last["train_accuracy"] == 1.0         # it learnt the rule
    assert last["train_loss"] < first["train_loss"] / 5
    res = train.evaluate(train.make_eval_fn(net, jp.softmax_cross_entropy()), r.params, (),
                         jnp.asarray(x_te), jnp.asarray(y_te), jnp.asarray(y_te), batch_size=16)
    assert res["accuracy"] == last["test_accuracy"]                              # in chunks: the same
    np.testing.assert_allclose(res["loss"], last["test_loss"], rtol=1e-12)


@pytest.mark.parametrize("split, value", [("y_train", 2), ("y_test", -1)])
def test_fit_checks_every_label_eagerly_before_training(split, value):
    """Under jit an out-of-range label can only make the loss NaN; fit looks at the whole data set
    once, before the first step, and names the split."""
    ds = data.load("moons")
    y = np.array(getattr(ds, split))
    y[3] = value
    bad = dict(x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test, n_classes=2)
    bad[split] = y
    net = models.build_model("linear", 2)
    with pytest.raises(ValueError, match=rf"{split} has 1 label\(s\) outside \[0, 2\)"):
        train.fit(net, None, optax.sgd(0.1), bad, steps=1, batch_size=10, progress=False)
