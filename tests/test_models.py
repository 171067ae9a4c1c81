"""The runner's sequence-model specs (gru, lstm, rnn, gpt), the tied-weights combinator, and the
optimizer knobs of the issues' recipes (clipping, weight decay on matrices, the schedule's end)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprop as jp
from jaxprop.combinators.tied import tied
from jaxprop.layers.embedding import embedding
from jaxprop.runner import optimizers
from jaxprop.runner.models import build_model
from jaxprop.testing import assert_gradients_match
from helpers import init_params

V, T = 7, 6
SIGNAL_SPECS = ["gru:6", "lstm:5-4", "rnn:5:relu", "gru:4:in=5x2"]
TEXT_SPECS = ["gru:6:emb=4", "gru:6-5:emb=4:drop=0.3", "lstm:5:emb=3", "rnn:4:tanh:emb=3", "gpt:2-8-2",
              "gpt:2-8-2:tied", "gpt:2-8-4:tied:save=lse:remat", "gpt:2-8-2:scan:tied", "gpt:2-8-2:tied:block=2"]
# jitted: the layers inside are checked eagerly by the registry (tests/test_layers.py); an eager scan
# compiles on every call
DTYPES = [pytest.param(jnp.float64, True, id="float64-jit"), pytest.param(jnp.float32, True, id="float32-jit")]


def _ids(n=3, t=T, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (n, t)), jnp.int32)


@pytest.mark.parametrize("dtype, jit", DTYPES)
@pytest.mark.parametrize("spec", SIGNAL_SPECS)
def test_signal_specs_match_autodiff(spec, dtype, jit):
    net = build_model(spec, 3)
    out, _ = net.init(jax.random.key(0), (4, 10))
    assert out == (4, 3)                              # last state -> dense(n_outputs)
    assert_gradients_match(net, jp.softmax_cross_entropy(), in_shape=(4, 10), dtype=dtype, jit=jit, fd=False)


@pytest.mark.parametrize("spec, dtype, jit", [(s, jnp.float64, True) for s in TEXT_SPECS] + [
    (s, jnp.float32, True) for s in ("gru:6:emb=4", "gpt:2-8-2:tied", "gpt:2-8-4:tied:save=lse:remat")])
def test_text_specs_match_autodiff(spec, dtype, jit):
    net = build_model(spec, V, vocab_size=V, context=T)
    out, _ = net.init(jax.random.key(0), (3, T))
    assert out == (3, T, V)                           # next-character logits at every position
    x = _ids(t=T if jit else T - 2)                   # any T <= the context
    report = assert_gradients_match(net, jp.softmax_cross_entropy(), x=x, dtype=dtype, jit=jit, fd=False)
    assert report.ok


def test_specs_are_what_they_say():
    assert build_model("gru:128", 10).name == "serial(reshape((-1, 1)), gru(128, return_sequences=False), dense(10))"
    assert build_model("gru:64-32:emb=16", V, vocab_size=V).name == \
        f"serial(embedding({V}, 16), gru(64), gru(32), dense({V}))"
    assert build_model("gru:8-6:emb=4:drop=0.25", V, vocab_size=V).name == (
        f"serial(embedding({V}, 4), dropout(0.25), gru(8), dropout(0.25), gru(6), dropout(0.25), dense({V}))")
    assert build_model("lstm:8:drop=0.5", 3).name == \
        "serial(reshape((-1, 1)), lstm(8, return_sequences=False), dropout(0.5), dense(3))"
    assert "dropout" not in build_model("gru:8:emb=4:drop=0", V, vocab_size=V).name
    net = build_model("gpt:2-64-4:tied:save=lse", V, vocab_size=V, context=128)
    assert net.name == "gpt(2-64-4, tied, save=lse, ctx=128)"
    _, params = net.init(jax.random.key(0), (2, 128))
    assert params[0]["w"].shape == (V, 64) and params[1]["w"].shape == (128, 64)
    assert params[-1]["w"] == () and params[-1]["b"].shape == (V,)     # tied: the head keeps its bias only
    assert build_model("lstm:8-6:emb=4:fbias=1", V, vocab_size=V).name == \
        f"serial(embedding({V}, 4), lstm(8, forget_bias=1), lstm(6, forget_bias=1), dense({V}))"
    assert build_model("gpt:2-64-4:block=32", V, vocab_size=V, context=128).name == \
        "gpt(2-64-4, save=probs, block=32, ctx=128)"
    short = build_model("gpt:1-8-2:ctx=32", V, vocab_size=V, context=128)
    assert short.init(jax.random.key(0), (2, 16))[1][1]["w"].shape == (32, 8)


@pytest.mark.parametrize("spec, kw, match", [
    ("gpt:2-64-4", {}, "needs a text data set"),
    ("gpt:2-64-5", dict(vocab_size=V, context=8), "must divide"),
    ("gpt:2-64", dict(vocab_size=V, context=8), "L-D-H"),
    ("gpt:2-64-4:fast", dict(vocab_size=V, context=8), "unknown option"),
    ("gpt:2-64-4", dict(vocab_size=V), "context length is unknown"),
    ("gpt:2-64-4:block=0", dict(vocab_size=V, context=8), "block= must be a positive integer"),
    ("gpt:2-64-4:block=x", dict(vocab_size=V, context=8), "block= must be a positive integer"),
    ("mlp:10", dict(vocab_size=V), "does not take token ids"),
    ("gru:8:emb=4", {}, "needs a text data set"),
    ("gru:8:in=5x2", dict(vocab_size=V), "in= is for signals"),
    ("gru", {}, "give the hidden size"),
    ("lstm:8-x", {}, "integers"),
    ("gru:8:drop=1", {}, "drop= must be in"),
    ("gru:8:fbias=1", {}, "unknown option 'fbias=1'"),
    ("lstm:8:fbias=x", {}, "fbias= must be a number"),
])
def test_bad_specs_are_value_errors(spec, kw, match):
    with pytest.raises(ValueError, match=match):
        build_model(spec, V, **kw)


def test_gpt_initialisation_is_gpt2s():
    L, D = 4, 64
    for spec in (f"gpt:{L}-{D}-4", f"gpt:{L}-{D}-4:scan"):
        _, p = init_params(build_model(spec, V, vocab_size=V, context=32), jax.random.key(1), (2, 32))
        blocks = p[2:2 + L] if "scan" not in spec else [p[2]]
        std = lambda a: float(jnp.std(a))                                    # noqa: E731
        res = 0.02 / math.sqrt(2 * L)
        for (ln1, attn), (ln2, fc, _, proj) in blocks:
            for w in ("wq", "wk", "wv"):
                assert std(attn[w]) == pytest.approx(0.02, rel=0.1)
            assert std(attn["wo"]) == pytest.approx(res, rel=0.1) and std(proj["w"]) == pytest.approx(res, rel=0.1)
            assert std(fc["w"]) == pytest.approx(0.02, rel=0.1)
            for b in (attn["bq"], attn["bo"], fc["b"], proj["b"], ln1["offset"]):
                assert not jnp.any(b)
            assert jnp.all(ln2["scale"] == 1)
        if "scan" in spec:
            assert blocks[0][0][1]["wq"].shape == (L, D, D)                   # stacked for the scan
        assert std(p[0]["w"]) == pytest.approx(0.02, rel=0.1) and std(p[-1]["w"]) == pytest.approx(0.02, rel=0.1)


# ------------------------------------------------------------------ tied weights

def _lm(d=5):
    return jp.serial(embedding(V, d), jp.tanh(), jp.dense(V))


@pytest.mark.parametrize("dtype, jit", DTYPES)
def test_tied_gradient_matches_autodiff(dtype, jit):
    net = tied(_lm(), source=(0, "w"), target=(2, "w"), transpose=True)
    assert_gradients_match(net, jp.softmax_cross_entropy(), x=_ids(), dtype=dtype, jit=jit)
    # not transposed: two (4, 4) dense layers sharing one matrix
    square = tied(jp.serial(jp.dense(4), jp.tanh(), jp.dense(4)), (0, "w"), (2, "w"))
    assert_gradients_match(square, jp.mse(), in_shape=(3, 4), dtype=dtype, jit=jit)


def test_tied_gradient_is_the_sum_of_both_uses():
    inner = _lm()
    net = tied(inner, (0, "w"), (2, "w"), transpose=True)
    _, params = net.init(jax.random.key(0), (3, T))
    assert params[2]["w"] == () and params[2]["b"].shape == (V,)
    full = (params[0], params[1], dict(params[2], w=params[0]["w"].T))     # what the forward uses
    x, y = _ids(), _ids(seed=1)
    loss = jp.softmax_cross_entropy()
    value, grads = jp.value_and_grad(net, loss)(params, x, y)
    value_untied, g = jp.value_and_grad(inner, loss)(full, x, y)
    assert value == value_untied
    np.testing.assert_allclose(grads[0]["w"], g[0]["w"] + g[2]["w"].T, rtol=1e-12, atol=1e-15)
    assert grads[2]["w"] == () and np.array_equal(grads[2]["b"], g[2]["b"])
    assert not np.allclose(grads[0]["w"], g[0]["w"])                      # the head's use counts
    ref = jax.grad(lambda p: loss.forward(inner.forward(
        (p[0], p[1], dict(p[2], w=p[0]["w"].T)), x)[0], y)[0])(params)
    np.testing.assert_allclose(grads[0]["w"], ref[0]["w"], rtol=1e-9, atol=1e-15)


def test_tied_errors():
    with pytest.raises(ValueError, match="needs"):
        tied(_lm(), (0, "w"), (2, "w")).init(jax.random.key(0), (3, T))       # (V, D) vs (D, V)
    with pytest.raises(ValueError, match="no parameter at path"):
        tied(_lm(), (0, "w"), (5, "w"), transpose=True).init(jax.random.key(0), (3, T))
    with pytest.raises(ValueError, match="two different"):
        tied(_lm(), (0, "w"), (0, "w"))


# ------------------------------------------------------------------ optimizer knobs

def _cfg(**kw):
    return dict(dict(optimizer="adamw", lr=2e-2, steps=100, schedule="warmup_cosine", warmup_steps=10,
                     end_lr=2e-3, clip_norm=0.0, opt_args={}), **kw)


def test_schedule_ends_at_end_lr():
    lr = optimizers.schedule(_cfg())
    assert float(lr(0)) == 0.0 and float(lr(10)) == pytest.approx(2e-2) and float(lr(100)) == pytest.approx(2e-3)
    assert float(optimizers.schedule(_cfg(schedule="cosine"))(100)) == pytest.approx(2e-3)
    assert float(optimizers.schedule(_cfg(schedule="linear"))(100)) == pytest.approx(2e-3)
    assert float(optimizers.schedule(_cfg(schedule="cosine", end_lr=None))(100)) == 0.0


def test_weight_decay_on_matrices_only_and_clipping():
    net = build_model("gpt:1-8-2:tied", V, vocab_size=V, context=4)
    _, params = init_params(net, jax.random.key(0), (2, 4))
    mask = optimizers.matrices(params)
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    decayed = sorted(k for k, v in flat.items() if v)
    assert all(k.endswith(("['w']", "['wq']", "['wk']", "['wv']", "['wo']")) for k in decayed)
    assert len(decayed) == 2 + 4 + 2                # embedding, positions; Wq Wk Wv Wo; the MLP's two
    assert not any(v for k, v in flat.items() if k.endswith(("['b']", "['scale']", "['offset']", "['bq']")))
    # zero gradients: AdamW's update is then the decay alone, -lr * wd * param, on the masked leaves
    tx = optimizers.make_optimizer(_cfg(schedule="constant", opt_args={"weight_decay": 0.1, "mask": "matrices"}))
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
        p = params
        for k in path:
            p = p[k.key if hasattr(k, "key") else k.idx]
        expect = -2e-2 * 0.1 * p if flat[jax.tree_util.keystr(path)] else jnp.zeros_like(p)
        np.testing.assert_allclose(u, expect, rtol=1e-6, atol=1e-12)
    with pytest.raises(ValueError, match="mask=everything"):
        optimizers.make_optimizer(_cfg(opt_args={"mask": "everything"}))
    # clipping: a huge gradient leaves SGD's step at lr * clip_norm in global norm
    sgd = optimizers.make_optimizer(_cfg(optimizer="sgd", schedule="constant", clip_norm=1.0))
    big = jax.tree_util.tree_map(lambda a: 1e3 * jnp.ones_like(a), params)
    step, _ = jax.jit(sgd.update)(big, sgd.init(params), params)
    norm = math.sqrt(sum(float(jnp.sum(u ** 2)) for u in jax.tree_util.tree_leaves(step)))
    assert norm == pytest.approx(2e-2, rel=1e-5)
    with pytest.raises(ValueError, match="clip-norm"):
        optimizers.make_optimizer(_cfg(clip_norm=-1.0))
