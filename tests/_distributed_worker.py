"""Code the distributed tests run in subprocesses (pytest does not collect this file).

JAX reads ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` once, when
its CPU backend starts, and the test process has started it already; so the
many-device checks run here, in a fresh interpreter, and write what they
measured to a JSON file that tests/test_distributed.py asserts on.

    python tests/_distributed_worker.py emulated OUT.json
        (run with XLA_FLAGS=--xla_force_host_platform_device_count=8)
    python tests/_distributed_worker.py process PID NPROC PORT OUT_DIR
        one of NPROC processes on 127.0.0.1:PORT (jax.distributed.initialize)

The functions that build the problem are imported by the tests too, so the
single-process references are computed from the very same data.
"""
from __future__ import annotations

import json
import os
import re
import sys

import numpy as np

from helpers import with_test_xla_flags

N, D_IN, N_CLASSES = 64, 12, 5          # 64 appears in no parameter shape (HLO check below)
STEPS = 20
LR = 1e-2


def clean_env(n_devices: int) -> dict:
    """The environment for a worker: this one, minus proxies and XLA flags,
    with ``n_devices`` emulated CPU devices."""
    env = {k: v for k, v in os.environ.items()
           if "proxy" not in k.lower() and k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["XLA_FLAGS"] = with_test_xla_flags(f"--xla_force_host_platform_device_count={n_devices}")
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def net_and_loss(dropout: bool = False):
    import jaxprop as jp
    layers = [jp.dense(32), jp.tanh(), jp.dense(16), jp.relu()]
    if dropout:
        layers.append(jp.dropout(0.25))
    return jp.serial(*layers, jp.dense(N_CLASSES)), jp.softmax_cross_entropy()


def data(seed: int = 0, n: int = N):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, D_IN)), rng.integers(0, N_CLASSES, n).astype(np.int32)


def init_params(net, seed: int = 0):
    """Params of ``net`` drawn with NumPy (U(-1, 1) / sqrt(fan_in)): no JAX
    computation to compile, so the workers start quickly."""
    import jax
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda k: net.init(k, (N, D_IN))[1], jax.random.key(0))
    return jax.tree_util.tree_map(
        lambda s: rng.uniform(-1.0, 1.0, s.shape) / np.sqrt(s.shape[0]), shapes)


def zeros_state(tx, params):
    """``tx.init(params)`` for optimizers whose state starts at zero (SGD
    momentum, Adam), built on the host."""
    import jax
    return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(tx.init, params))


def plain_step(grad_fn, tx, stochastic: bool = False):
    """The single-device reference step (one jit, no sharding)."""
    import jax
    import optax

    def step(params, opt_state, x, y, key=None):
        value, grads = grad_fn(params, x, y, **({"key": key} if stochastic else {}))
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return jax.jit(step)


def autodiff_value_and_grad(net, loss):
    """jax.value_and_grad of the same forward: the reference (verification code)."""
    import jax
    import jaxprop as jp

    def f(params, x, y, key=None, **_):
        def cost(p):
            pred, _ = jp.call_forward(net, p, x, key=key)
            return loss.forward(pred, y)[0]
        return jax.value_and_grad(cost)(params)

    return f


def batch_indices(step: int, n: int, batch: int, seed: int = 1) -> np.ndarray:
    """The global batch of ``step``: the same in every process."""
    return np.random.default_rng([seed, step]).permutation(n)[:batch]


def max_diff(a, b) -> float:
    import jax
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v)))) for u, v in zip(la, lb))


def _setup_jax():
    import jax
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_numpy_rank_promotion", "raise")
    return jax


# --------------------------------------------------------------------------- emulated devices

def _run(step, params, opt_state, x, y, steps=STEPS, keys=None):
    values = []
    for s in range(steps):
        extra = () if keys is None else (keys[s],)
        params, opt_state, value = step(params, opt_state, x, y, *extra)
        values.append(float(value))
    return params, values


def _hlo_facts(text: str) -> dict:
    """Collectives of a compiled (per-device) HLO module, and any array whose
    leading axis is the global batch N (a gathered batch would be one)."""
    op = re.compile(r"\s(all-reduce|all-gather)(-start)?\(")
    ar = [ln for ln in text.splitlines() if (m := op.search(ln)) and m.group(1) == "all-reduce"]
    ag = [ln for ln in text.splitlines() if (m := op.search(ln)) and m.group(1) == "all-gather"]
    shapes = sorted({m for ln in ar for m in re.findall(r"f64\[[0-9,]*\]", op.split(ln)[0])})
    groups = sorted({m.group(1).strip() for ln in ar
                     for m in [re.search(r"replica_groups=(.*?)(, use_global|, to_apply|$)", ln)] if m})
    return {"all_reduce_count": len(ar), "all_reduce_shapes": shapes, "replica_groups": groups,
            "all_gather_count": len(ag),
            "global_batch_shapes": sorted(set(re.findall(rf"[a-z0-9]+\[{N}(?:,[0-9]+)*\]", text)))}


RUNNER_ARGS = ["--dataset", "spirals", "--steps", "12", "--eval-every", "6", "--dtype", "float64",
               "--no-progress", "--batch-size", "96"]


def _read_rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def emulated(out_path: str):
    jax = _setup_jax()
    import optax
    import jaxprop as jp
    from jaxprop import distributed as dist

    res = {"device_count": jax.device_count()}
    out_dir = os.path.dirname(os.path.abspath(out_path))
    net, loss = net_and_loss()
    params = init_params(net)
    x, y = data()
    tx = optax.adam(LR)
    hand = jp.value_and_grad(net, loss)
    auto = autodiff_value_and_grad(net, loss)

    ref_params, ref_values = _run(plain_step(hand, tx), params, zeros_state(tx, params), x, y)
    res["loss_first_last"] = [ref_values[0], ref_values[-1]]

    def compiled(step, p, o, xs, ys):
        """Compile once; run the steps with that executable and read its HLO."""
        c = step.lower(p, o, xs, ys).compile()
        return (lambda *a: c(*a, None, None)), _hlo_facts(c.as_text())

    for d in (2, 8):                        # hand-written, sharded over d devices vs one device
        mesh = dist.make_mesh(d)
        step = dist.data_parallel_step(hand, tx, mesh, net=net)
        p, o = dist.replicate((params, zeros_state(tx, params)), mesh)
        xs, ys = dist.shard_batch((x, y), mesh)
        if d == 8:
            step, res["hlo_hand_8"] = compiled(step, p, o, xs, ys)
        p_out, values = _run(step, p, o, xs, ys)
        res[f"hand_{d}"] = {
            "param_diff": max_diff(p_out, ref_params),
            "loss_diff": max(abs(a - b) for a, b in zip(values, ref_values)),
            "x_spec": str(xs.sharding.spec), "x_devices": len(xs.sharding.device_set),
            "param_spec": str(jax.tree_util.tree_leaves(p_out)[0].sharding.spec),
            "batch_sizes": dist.batch_sizes(N, mesh),
            "process_rows": [dist.process_rows(N, mesh).start, dist.process_rows(N, mesh).stop]}
    res["param_shapes"] = sorted({f"f64[{','.join(map(str, np.shape(a)))}]"
                                  for a in jax.tree_util.tree_leaves(params)})

    # sharded hand-written vs sharded jax.grad, same 8-device mesh
    astep = dist.data_parallel_step(auto, tx, mesh)
    pa, oa = dist.replicate((params, zeros_state(tx, params)), mesh)
    astep, res["hlo_autodiff_8"] = compiled(astep, pa, oa, xs, ys)
    a_out, a_values = _run(astep, pa, oa, xs, ys)
    res["hand_vs_autodiff_8"] = {"param_diff": max_diff(p_out, a_out),
                                 "loss_diff": max(abs(a - b) for a, b in zip(values, a_values))}

    # explicit pmean under shard_map
    pstep = dist.data_parallel_step(hand, tx, mesh, method="psum")
    pp, po = dist.replicate((params, zeros_state(tx, params)), mesh)
    pstep, res["hlo_psum_8"] = compiled(pstep, pp, po, xs, ys)
    ps_out, ps_values = _run(pstep, pp, po, xs, ys)
    res["psum_8"] = {"param_diff": max_diff(ps_out, ref_params),
                     "loss_diff": max(abs(a - b) for a, b in zip(ps_values, ref_values))}

    # dropout: a replicated key gives the same masks as on one device
    dnet, _ = net_and_loss(dropout=True)
    dparams = init_params(dnet)
    dhand = jp.value_and_grad(dnet, loss)
    keys = list(jax.random.split(jax.random.key(7), STEPS))
    dref, dref_values = _run(plain_step(dhand, tx, stochastic=True), dparams, zeros_state(tx, dparams),
                             x, y, keys=keys)
    mesh = dist.make_mesh(8)
    dstep = dist.data_parallel_step(dhand, tx, mesh, net=dnet)
    p, o = dist.replicate((dparams, zeros_state(tx, dparams)), mesh)
    xs, ys = dist.shard_batch((x, y), mesh)
    d_out, d_values = _run(dstep, p, o, xs, ys, keys=dist.put(keys, dist.replicated(mesh)))
    res["dropout_8"] = {"param_diff": max_diff(d_out, dref),
                        "loss_diff": max(abs(a - b) for a, b in zip(d_values, dref_values))}

    # batch norm: statistics over the global batch, so the state and params match one device
    from jaxprop.train import make_train_step
    bnet = jp.serial(jp.dense(32), jp.batch_norm(), jp.relu(), jp.dense(N_CLASSES))
    bparams = init_params(bnet)
    bstate = jax.tree_util.tree_map(np.asarray, jp.init_state(bnet, (N, D_IN)))
    bhand = jp.value_and_grad(bnet, loss)
    ref_step = jax.jit(make_train_step(bhand, tx, net=bnet, jit=False))
    p1, o1, s1, v1 = bparams, zeros_state(tx, bparams), bstate, []
    mesh = dist.make_mesh(8)
    bstep = dist.data_parallel_step(bhand, tx, mesh, net=bnet)
    p8, o8, s8 = dist.replicate((bparams, zeros_state(tx, bparams), bstate), mesh)
    xs, ys = dist.shard_batch((x, y), mesh)
    v8 = []
    for _ in range(STEPS):
        p1, o1, (value, s1) = ref_step(p1, o1, x, y, state=s1)
        v1.append(float(value))
        p8, o8, (value, s8) = bstep(p8, o8, xs, ys, state=s8)
        v8.append(float(value))
    res["batch_norm_8"] = {"param_diff": max_diff(p8, p1), "state_diff": max_diff(s8, s1),
                           "loss_diff": max(abs(a - b) for a, b in zip(v8, v1)),
                           "state_moved": max_diff(s1, bstate)}

    # tensor parallelism: a 4 x 2 (data, model) mesh, wide layers split on "model"
    mesh = dist.make_mesh(8, model=2)
    tstep = dist.data_parallel_step(hand, tx, mesh, tensor_parallel=True, min_features=16)
    p, o = dist.replicate((params, zeros_state(tx, params)), mesh, tensor_parallel=True, min_features=16)
    xs, ys = dist.shard_batch((x, y), mesh)
    t_out, t_values = _run(tstep, p, o, xs, ys)
    res["tensor_parallel_4x2"] = {
        "param_diff": max_diff(t_out, ref_params),
        "loss_diff": max(abs(a - b) for a, b in zip(t_values, ref_values)),
        "param_specs": [str(a.sharding.spec) for a in jax.tree_util.tree_leaves(t_out)],
        "opt_specs": [str(a.sharding.spec) for a in jax.tree_util.tree_leaves(o)]}

    # the runner (jaxprop.cli -> train.fit(mesh=...)): default = all 8 devices, vs --devices 1
    from jaxprop import cli
    runs = {}
    for name, extra in (("8", []), ("1", ["--devices", "1"])):
        runs[name] = cli.run(RUNNER_ARGS + extra + ["--out", os.path.join(out_dir, f"run-{name}")])
        runs[name]["rows"] = _read_rows(os.path.join(out_dir, f"run-{name}", "metrics.jsonl"))
    res["runner"] = runs

    # errors
    errors = {}
    errors["runner_batch_100"] = None
    bad_out = os.path.join(out_dir, "run-bad")
    try:
        cli.run(RUNNER_ARGS[:-2] + ["--batch-size", "100", "--out", bad_out])
    except ValueError as e:
        errors["runner_batch_100"] = str(e)
    res["runner_bad_out_exists"] = os.path.exists(bad_out)
    mesh = dist.make_mesh(8)
    for name, fn in {"check_batch_30": lambda: dist.check_batch(30, mesh),
                     "shard_batch_30": lambda: dist.shard_batch((x[:30], y[:30]), mesh),
                     "step_batch_30": lambda: dist.data_parallel_step(hand, tx, mesh)(
                         *dist.replicate((params, zeros_state(tx, params)), mesh), x[:30], y[:30]),
                     "mesh_model_3": lambda: dist.make_mesh(8, model=3),
                     "mesh_16": lambda: dist.make_mesh(16),
                     "psum_dropout": lambda: dist.data_parallel_step(dhand, tx, mesh, net=dnet,
                                                                     method="psum")}.items():
        try:
            fn()
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    res["errors"] = errors

    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)


# --------------------------------------------------------------------------- several processes

MP_STEPS, MP_BATCH, MP_N = 5, 32, 96


def reference_multiprocess():
    """The single-process run the multi-process test must reproduce (params, losses)."""
    import optax
    import jaxprop as jp
    net, loss = net_and_loss()
    params = init_params(net)
    x, y = data(seed=3, n=MP_N)
    tx = optax.sgd(0.1, momentum=0.9)
    step = plain_step(jp.value_and_grad(net, loss), tx)
    opt_state, values = zeros_state(tx, params), []
    for s in range(MP_STEPS):
        idx = batch_indices(s, MP_N, MP_BATCH)
        params, opt_state, value = step(params, opt_state, x[idx], y[idx])
        values.append(float(value))
    return params, values


def process(pid: int, nproc: int, port: int, out_dir: str):
    """One of ``nproc`` processes: first the runner with its multi-process
    options (it calls jax.distributed.initialize; only process 0 may write
    its run folder), then a library-level run where each process loads only
    its rows of every batch and process 0 alone writes the checkpoint."""
    jax = _setup_jax()
    from jaxprop import cli
    from jaxprop import distributed as dist
    runner = cli.run(RUNNER_ARGS + ["--out", os.path.join(out_dir, f"run-{pid}"),
                                    "--coordinator-address", f"127.0.0.1:{port}",
                                    "--num-processes", str(nproc), "--process-id", str(pid)])
    import optax
    import jaxprop as jp

    net, loss = net_and_loss()
    x, y = data(seed=3, n=MP_N)             # every process could read only its rows; see below
    tx = optax.sgd(0.1, momentum=0.9)
    mesh = dist.make_mesh()                 # all global devices
    step = dist.data_parallel_step(jp.value_and_grad(net, loss), tx, mesh)
    params = init_params(net)
    params, opt_state = dist.replicate((params, zeros_state(tx, params)), mesh)
    rows = dist.process_rows(MP_BATCH, mesh)
    values = []
    for s in range(MP_STEPS):
        mine = batch_indices(s, MP_N, MP_BATCH)[rows]       # this process's examples only
        xs, ys = dist.shard_batch((x[mine], y[mine]), mesh)
        params, opt_state, value = step(params, opt_state, xs, ys)
        values.append(float(value))
    host = dist.to_host(params)
    report = {"process_index": jax.process_index(), "process_count": jax.process_count(),
              "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
              "rows": [rows.start, rows.stop], "losses": values,
              "x_global_shape": list(xs.shape), "x_fully_addressable": bool(xs.is_fully_addressable),
              "batch_sizes": dist.batch_sizes(MP_BATCH, mesh), "primary": dist.is_primary(),
              "runner": runner}
    with open(os.path.join(out_dir, f"process-{pid}.json"), "w", encoding="utf-8") as f:
        json.dump(report, f)
    if dist.is_primary():                   # the checkpoint: written once
        leaves = jax.tree_util.tree_leaves(host)
        np.savez(os.path.join(out_dir, "checkpoint.npz"), **{f"leaf{i}": a for i, a in enumerate(leaves)})
    jax.distributed.shutdown()


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "emulated":
        emulated(sys.argv[2])
    elif mode == "process":
        process(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
