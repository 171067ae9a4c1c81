"""``jax.default_matmul_precision("bfloat16")`` in jaxprop's matmuls (jaxprop.core.matmul and kin).

Under the setting, float32 operands are rounded to bfloat16 and the products
summed in float32, on every backend (XLA:CPU ignores the setting by itself).
The layers' forward and hand-written backward matmuls go through it, so a
step traced under the setting has gradients within bfloat16 rounding of the
float32 ones; outside it nothing changes.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprop as jp
from jaxprop.core import matmul, matmul_nt, matmul_operands, matmul_tn
from helpers import init_params

BF16 = jax.default_matmul_precision("bfloat16")


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _rounded(a):
    return np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float64))


def operands(seed=0, m=48, k=40, n=24, dtype=jnp.float32):
    ka, kb = jax.random.split(jax.random.key(seed))
    return jax.random.normal(ka, (m, k), dtype), jax.random.normal(kb, (k, n), dtype)


def assert_bf16_close(leaves, ref_leaves):
    """Each gradient float32 and within 3e-2 of its own norm of the float32 one
    (bfloat16 rounding; a wrong sign or a factor of 2 is 1 or more). Attention's
    dJ/db_k is exactly 0 (softmax ignores a shift of a row's scores), rounding
    noise only, so a leaf's floor is 1e-3 of the whole gradient's norm. Returns
    the largest of those relative errors (0 would mean nothing was rounded)."""
    assert len(leaves) == len(ref_leaves)
    total = np.sqrt(sum(np.sum(np.square(np.asarray(r, np.float64))) for r in ref_leaves))
    errors = []
    for g, r in zip(leaves, ref_leaves):
        assert g.dtype == jnp.float32
        r = np.asarray(r, np.float64)
        errors.append(np.linalg.norm(np.asarray(g, np.float64) - r) / max(np.linalg.norm(r), 1e-3 * total))
    assert max(errors) < 3e-2, errors
    return max(errors)


FORMS = {  # name: (jaxprop's function, the plain product, its arguments from a (M, K) and b (K, N))
    "matmul": (matmul, lambda a, b: a @ b, lambda a, b: (a, b)),
    "matmul_nt": (matmul_nt, lambda a, b: a @ b.T, lambda a, b: (a, b.T)),
    "matmul_tn": (matmul_tn, lambda a, b: a.T @ b, lambda a, b: (a.T, b)),
}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_without_the_setting_it_is_the_plain_product(form, dtype):
    fn, plain, args = FORMS[form]
    x, w = args(*operands(dtype=dtype))
    for f, g in ((fn, plain), (jax.jit(fn), jax.jit(plain))):     # XLA's and eager kernels may sum apart
        out = f(x, w)
        assert out.dtype == dtype
        np.testing.assert_array_equal(out, g(x, w))


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_under_the_setting_float32_operands_are_rounded_to_bfloat16(form, jit):
    """The product equals the exact product of the bfloat16-rounded operands
    (to float32 summation error), and is visibly not the float32 product."""
    fn, plain, args = FORMS[form]
    x, w = args(*operands())
    f = jax.jit(fn) if jit else fn
    with BF16:
        out = f(x, w)
    assert out.dtype == jnp.float32
    exact_rounded = plain(_rounded(x), _rounded(w))
    exact = plain(np.asarray(x, np.float64), np.asarray(w, np.float64))
    assert rel_l2(out, exact_rounded) < 1e-6
    assert 1e-4 < rel_l2(out, exact) < 1e-2          # the operands' rounding: ~2^-9 each, random signs


def test_float64_and_half_precision_operands_are_left_alone():
    x, w = operands(dtype=jnp.float64)
    with BF16:
        np.testing.assert_array_equal(matmul(x, w), x @ w)
        xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
        out = matmul(xb, wb)
    assert out.dtype == jnp.bfloat16                 # both half precision: the plain product, its dtype
    np.testing.assert_array_equal(out, xb @ wb)


def test_a_bfloat16_operand_with_a_float32_one_gives_float32():
    x, w = operands()
    with BF16:
        out = matmul(x, matmul_operands(w))
    assert out.dtype == jnp.float32
    assert rel_l2(out, _rounded(x) @ _rounded(w)) < 1e-6


def test_matmul_operands_rounds_float32_matrices_only_under_the_setting():
    tree = {"w": jnp.ones((3, 4), jnp.float32), "b": jnp.ones((4,), jnp.float32),
            "w64": jnp.ones((3, 4), jnp.float64)}
    assert matmul_operands(tree) is tree
    with BF16:
        out = matmul_operands(tree)
    assert out["w"].dtype == jnp.bfloat16 and out["b"].dtype == jnp.float32 and out["w64"].dtype == jnp.float64


def test_jit_traces_again_when_the_setting_changes():
    """The setting is part of jit's cache key: a function traced outside it is
    not reused inside it (and back)."""
    x, w = operands()
    f = jax.jit(matmul)
    plain = f(x, w)
    with BF16:
        rounded = f(x, w)
    np.testing.assert_array_equal(f(x, w), plain)
    assert rel_l2(rounded, plain) > 1e-4


@pytest.mark.parametrize("form", list(FORMS))
def test_a_transposed_result_runs_under_the_setting(form):
    """A consumer that transposes the product (the tied head's dW^T, a user's
    ``matmul(a, b).T``): XLA:CPU folds the transpose into the bfloat16 product
    and then has no kernel for it ("Unsupported element type for DotThunk:
    BF16 x BF16 = F32") unless the product is kept whole."""
    fn, plain, args = FORMS[form]
    x, w = args(*operands())
    with BF16:
        out = jax.jit(lambda x, w: fn(x, w).T + 1.0)(x, w)
    assert rel_l2(out, plain(_rounded(x), _rounded(w)).T + 1.0) < 1e-6


def test_a_gpt_with_a_tied_head_trains_under_the_setting():
    """The runner's ``gpt:...:tied`` (head weight = embedding^T) under bfloat16
    matmuls: its hand gradients are the float32 jax.grad's to bfloat16 rounding."""
    from jaxprop.runner.models import build_model
    net = build_model("gpt:1-16-2:tied", 20, vocab_size=20, context=8)
    _, params = net.init(jax.random.key(0), (4, 8))
    params = jp.cast_floating(params, jnp.float32)
    ids = jax.random.randint(jax.random.key(1), (4, 8), 0, 20)
    targets = jax.random.randint(jax.random.key(2), (4, 8), 0, 20)
    loss = jp.softmax_cross_entropy()
    with jax.default_matmul_precision("highest"):
        ref = jax.jit(jax.grad(lambda p: loss.forward(jp.call_forward(net, p, ids)[0], targets)[0]))(params)
    with BF16:
        _, grads = jax.jit(jp.value_and_grad(net, loss))(params, ids, targets)
    leaves = jax.tree_util.tree_leaves(grads)
    assert len(leaves) == 21
    assert_bf16_close(leaves, jax.tree_util.tree_leaves(ref))


NETS = {  # small layers whose matmuls go through jaxprop.core's functions; (N, T, D) inputs
    "dense": (lambda: jp.serial(jp.dense(24), jp.tanh(), jp.dense(5)), (16, 12)),
    "rnn": (lambda: jp.serial(jp.rnn(20), jp.dense(5)), (8, 6, 12)),
    "gru": (lambda: jp.serial(jp.gru(20), jp.dense(5)), (8, 6, 12)),
    "lstm": (lambda: jp.serial(jp.lstm(20), jp.dense(5)), (8, 6, 12)),
    "lstm N=64 (weight sums in the loop)": (lambda: jp.serial(jp.lstm(16), jp.dense(5)), (64, 5, 12)),
    "gru reverse, last state": (lambda: jp.serial(jp.gru(20, return_sequences=False, reverse=True),
                                                  jp.dense(5)), (8, 6, 12)),
    # alone, so that only its own products are rounded: its projections (forward and backward) are;
    # the per-head score and value products stay float32 (not faster in bfloat16 on XLA:CPU)
    "attention, causal": (lambda: jp.attention(2, causal=True), (4, 6, 8)),
    "attention, save=lse": (lambda: jp.attention(2, causal=True, save="lse", block_size=4), (4, 6, 8)),
}


@pytest.mark.parametrize("name", list(NETS))
def test_hand_gradients_under_the_setting_are_the_float32_ones_to_bfloat16_rounding(name):
    """Forward and hand-written backward under the setting, against jax.grad of
    the float32 network without it: within bfloat16 rounding (relative L2 below
    3e-2, where a wrong sign or a factor of 2 is 1 or more), not equal to it (the
    operands were rounded), and every gradient float32, the dtype of its parameter."""
    make, in_shape = NETS[name]
    net = make()
    _, params = init_params(net, jax.random.key(0), in_shape)
    params = jp.cast_floating(params, jnp.float32)
    x = jax.random.normal(jax.random.key(1), in_shape, jnp.float32)
    y, _ = jp.call_forward(net, params, x)
    dy = jax.random.normal(jax.random.key(2), y.shape, jnp.float32)

    def hand(p, x):
        out, cache = jp.call_forward(net, p, x)
        return (out,) + tuple(net.backward(cache, dy))

    with jax.default_matmul_precision("highest"):
        ref = jax.jit(jax.grad(lambda p, x: jnp.vdot(jp.call_forward(net, p, x)[0], dy), argnums=(0, 1)))(params, x)
    with BF16:
        out, grads, dx = jax.jit(hand)(params, x)
    ref_leaves = jax.tree_util.tree_leaves(ref[0])
    leaves = jax.tree_util.tree_leaves(grads)
    assert assert_bf16_close(leaves, ref_leaves) > 1e-4
    assert rel_l2(dx, ref[1]) < 3e-2
    assert rel_l2(out, y) < 3e-2


def test_runner_option_records_and_resumes_with_bfloat16_matmuls(tmp_path):
    """``--matmul-precision bfloat16``: recorded in config.json, it changes the
    trajectory (the products were rounded), and a resumed run traces under it
    again: resuming from step 3 ends bit-identical to the uninterrupted run."""
    import os
    from jaxprop import checkpoint as ckpt
    from jaxprop.runner import cli
    corpus = tmp_path / "corpus.txt"
    rng = np.random.default_rng(0)
    corpus.write_text("\n".join(" ".join(rng.choice(list("abcdefgh"), 6)) for _ in range(80)), encoding="utf-8")
    base = ["--dataset", f"text:{corpus}", "--context", "8", "--model", "lstm:8:emb=4", "--steps", "6",
            "--batch-size", "4", "--eval-every", "3", "--checkpoint-every", "3", "--keep-checkpoints", "5",
            "--no-progress", "--sample-length", "0"]
    plain = cli.run(base + ["--out", str(tmp_path / "plain")])
    out = str(tmp_path / "bf16")
    rounded = cli.run(base + ["--out", out, "--matmul-precision", "bfloat16"])
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["options"]["matmul_precision"] == "bfloat16"
    assert rounded["params_fingerprint"] != plain["params_fingerprint"]
    assert abs(rounded["final_test_loss"] - plain["final_test_loss"]) < 0.05 * plain["final_test_loss"]
    os.remove(os.path.join(out, "summary.json"))
    os.remove(ckpt.path_for(os.path.join(out, "checkpoints"), 6))
    resumed = cli.run(["--resume", "--out", out, "--no-progress"])
    assert resumed["params_fingerprint"] == rounded["params_fingerprint"]
