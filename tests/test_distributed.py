"""Data parallelism on emulated CPU devices and on two local processes.

The many-device checks need ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
before JAX starts, and this pytest process has started JAX already; so they
run in a fresh interpreter (tests/_distributed_worker.py, with a cleaned
environment) that writes its measurements to JSON, and the tests below assert
on them. The two-process test starts two workers that meet through
``jax.distributed.initialize`` on 127.0.0.1 (the coordinator binds to the
loopback address only) and compares their result with a single-process run
computed here. Every subprocess has a time limit and is killed after it.
"""
import json
import os
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

import jaxprop as jp
from jaxprop import distributed as dist

import _distributed_worker as worker

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_distributed_worker.py")
TOL = 1e-10


# --------------------------------------------------------------------------- in this process (1 device)

def test_one_device_mesh_and_step_match_plain_step():
    mesh = dist.make_mesh()
    assert mesh.axis_names == ("data", "model")
    assert dict(mesh.shape) == {"data": jax.device_count(), "model": 1}
    net, loss = worker.net_and_loss()
    params = worker.init_params(net)
    x, y = worker.data()
    tx = optax.sgd(0.1)
    mesh1 = dist.make_mesh(1)
    step = dist.data_parallel_step(jp.value_and_grad(net, loss), tx, mesh1, net=net)
    p, o = dist.replicate((params, tx.init(params)), mesh1)
    p, o, v = step(p, o, *dist.shard_batch((x, y), mesh1))
    rp, _, rv = worker.plain_step(jp.value_and_grad(net, loss), tx)(params, tx.init(params), x, y)
    assert abs(float(v) - float(rv)) < TOL
    assert worker.max_diff(dist.to_host(p), rp) < TOL
    assert dist.is_primary()


def test_batch_sizes_and_rows_on_one_device():
    mesh = dist.make_mesh(1)
    sizes = dist.batch_sizes(48, mesh)
    assert sizes == {"devices": 1, "processes": 1, "mesh": {"data": 1, "model": 1},
                     "global_batch_size": 48, "per_device_batch_size": 48,
                     "per_process_batch_size": 48}
    assert dist.process_rows(48, mesh) == slice(0, 48)
    with pytest.raises(ValueError, match="does not divide"):
        dist.check_batch(0, mesh)


def test_argument_errors():
    mesh = dist.make_mesh(1)
    net, loss = worker.net_and_loss(dropout=True)
    grad_fn = jp.value_and_grad(net, loss)
    with pytest.raises(ValueError, match="method must be"):
        dist.data_parallel_step(grad_fn, optax.sgd(0.1), mesh, method="allreduce")
    with pytest.raises(ValueError, match="pass key="):
        step = dist.data_parallel_step(grad_fn, optax.sgd(0.1), mesh, net=net)
        step({}, (), np.zeros((4, worker.D_IN)), np.zeros((4,), np.int32))
    with pytest.raises(ValueError, match="positive divisor"):
        dist.make_mesh(1, model=0)
    with pytest.raises(ValueError, match="emulate more"):
        dist.make_mesh(jax.device_count() + 1)
    with pytest.raises(ValueError, match="disagree on the batch size"):
        dist.shard_batch((np.zeros((4, 2)), np.zeros((3,))), mesh)


def test_leaf_spec_rule():
    mesh = dist.make_mesh(1)
    assert dist.leaf_spec((256, 512), mesh) == jax.sharding.PartitionSpec()   # model axis of size 1


# --------------------------------------------------------------------------- 8 emulated devices

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """Start the 8-device worker and the two processes at once (they overlap on
    the cores), wait for all with one deadline, kill any that are left."""
    base = tmp_path_factory.mktemp("dist")
    mp_dir = base / "two-process"
    mp_dir.mkdir()
    port = _free_port()
    # one CPU device per process: see docs/scaling.md on XLA:CPU with several devices per process
    mp_env = dict(worker.clean_env(1), JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}")  # loopback only
    commands = {"emulated": (["emulated", str(base / "emulated.json")], worker.clean_env(8))}
    for pid in range(2):
        commands[f"process-{pid}"] = (["process", str(pid), "2", str(port), str(mp_dir)], mp_env)
    procs, logs = {}, {}
    try:
        for name, (args, env) in commands.items():
            logs[name] = open(base / f"{name}.log", "w+", encoding="utf-8")
            procs[name] = subprocess.Popen([sys.executable, WORKER, *args], env=env,
                                           stdout=logs[name], stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 300
        for p in procs.values():
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    finally:
        for p in procs.values():                         # the workers we started, by handle
            if p.poll() is None:
                p.kill()
                p.wait()
        result = {}
        for name, f in logs.items():
            f.seek(0)
            result[name] = {"returncode": procs[name].returncode if name in procs else None,
                            "output": f.read()[-4000:]}
            f.close()
    result["base"], result["mp_dir"] = base, mp_dir
    return result


def _ok(workers, name):
    r = workers[name]
    assert r["returncode"] == 0, f"{name} failed or timed out ({r['returncode']}):\n{r['output']}"


@pytest.fixture(scope="module")
def emulated(workers):
    _ok(workers, "emulated")
    with open(workers["base"] / "emulated.json", encoding="utf-8") as f:
        return json.load(f)


def test_worker_sees_eight_devices(emulated):
    assert emulated["device_count"] == 8
    first, last = emulated["loss_first_last"]
    assert last < 0.7 * first                 # the reference run really trains


@pytest.mark.parametrize("d", [2, 8])
def test_sharded_hand_step_equals_single_device_for_20_steps(emulated, d):
    r = emulated[f"hand_{d}"]
    assert r["x_spec"] == "P('data',)" and r["x_devices"] == d       # the batch really is split
    assert r["param_spec"] == "P()"                                  # params replicated
    assert r["param_diff"] < TOL and r["loss_diff"] < TOL, r
    assert r["batch_sizes"]["per_device_batch_size"] == worker.N // d
    assert r["batch_sizes"]["global_batch_size"] == worker.N


def test_sharded_hand_equals_sharded_autodiff(emulated):
    r = emulated["hand_vs_autodiff_8"]
    assert r["param_diff"] < TOL and r["loss_diff"] < TOL, r


def test_explicit_psum_under_shard_map_matches(emulated):
    r = emulated["psum_8"]
    assert r["param_diff"] < TOL and r["loss_diff"] < TOL, r


def test_dropout_key_replicated_gives_single_device_masks(emulated):
    r = emulated["dropout_8"]
    assert r["param_diff"] < TOL and r["loss_diff"] < TOL, r


def test_batch_norm_uses_global_batch_statistics(emulated):
    r = emulated["batch_norm_8"]
    assert r["state_moved"] > 1e-3                       # the running statistics really change
    assert r["param_diff"] < TOL and r["state_diff"] < TOL and r["loss_diff"] < TOL, r


def test_tensor_parallel_mesh_matches_and_splits_wide_layers(emulated):
    r = emulated["tensor_parallel_4x2"]
    assert r["param_diff"] < TOL and r["loss_diff"] < TOL, r
    # dense(32) and dense(16): w (I, O) split on O, b split; the 5-wide output layer replicated
    assert r["param_specs"] == ["P('model',)", "P(None, 'model')"] * 2 + ["P()", "P()"]
    assert sum("model" in s for s in r["opt_specs"]) == 8           # Adam's mu and nu follow


def _group_size(groups: str) -> int:
    """Devices in one replica group of an HLO all-reduce, in its three spellings."""
    if groups.startswith("{{"):
        return len(groups[2:].split("}")[0].split(","))
    if groups.startswith("mesh["):
        sizes = dict((k, int(v)) for k, v in re.findall(r"'(\w+)'=(\d+)", groups.split("]")[0]))
        chosen = re.findall(r"'(\w+)'", groups.split("]", 1)[1])
        return int(np.prod([sizes[a] for a in chosen]))
    m = re.match(r"\[(\d+),(\d+)\]<=", groups)
    return int(m.group(2)) if m else -1


@pytest.mark.parametrize("which", ["hlo_hand_8", "hlo_autodiff_8", "hlo_psum_8"])
def test_compiled_step_has_gradient_all_reduce_and_no_batch_gather(emulated, which):
    h = emulated[which]
    assert h["all_reduce_count"] >= 1
    for shape in emulated["param_shapes"]:              # every gradient is all-reduced
        rows_cols = shape[4:-1].split(",")
        assert shape in h["all_reduce_shapes"] or \
            f"f64[{','.join(reversed(rows_cols))}]" in h["all_reduce_shapes"], (shape, h)
    assert "f64[]" in h["all_reduce_shapes"]            # and the loss value
    assert all(_group_size(g) == 8 for g in h["replica_groups"]), h["replica_groups"]
    assert h["all_gather_count"] == 0, h
    assert h["global_batch_shapes"] == [], h             # no device ever holds the whole batch


def test_indivisible_batch_errors_clearly(emulated):
    e = emulated["errors"]
    for name in ("check_batch_30", "shard_batch_30", "step_batch_30"):
        assert e[name] and "30" in e[name] and "8 devices" in e[name] and "24 or 32" in e[name], e[name]
    assert "positive divisor" in e["mesh_model_3"]
    assert "emulate more" in e["mesh_16"]
    assert "psum" in e["psum_dropout"]


# --------------------------------------------------------------------------- two processes on 127.0.0.1

def test_two_processes_on_localhost_match_single_process(workers, emulated):
    for pid in range(2):
        _ok(workers, f"process-{pid}")
    tmp_path = workers["mp_dir"]
    reports = []
    for pid in range(2):
        with open(tmp_path / f"process-{pid}.json", encoding="utf-8") as f:
            reports.append(json.load(f))
    for pid, r in enumerate(reports):
        assert r["process_index"] == pid and r["process_count"] == 2
        assert r["device_count"] == 2 and r["local_device_count"] == 1
        assert r["primary"] == (pid == 0)
        assert r["x_global_shape"][0] == worker.MP_BATCH and not r["x_fully_addressable"]
        assert r["batch_sizes"]["per_device_batch_size"] == worker.MP_BATCH // 2
        assert r["batch_sizes"]["per_process_batch_size"] == worker.MP_BATCH // 2
    half = worker.MP_BATCH // 2
    assert [reports[0]["rows"], reports[1]["rows"]] == [[0, half], [half, worker.MP_BATCH]]
    # written once: process 0's run folder and checkpoint; process 1 wrote only its report
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.npz", "process-0.json", "process-1.json", "run-0"]
    assert {"config.json", "metrics.jsonl", "summary.json", "checkpoints"} <= set(os.listdir(tmp_path / "run-0"))

    # the runner across two processes (2 devices) == the runner on one device
    for r in reports:
        run = r["runner"]
        assert (run["devices"], run["processes"], run["mesh"]) == (2, 2, {"data": 2, "model": 1})
        assert (run["global_batch_size"], run["per_device_batch_size"], run["per_process_batch_size"]) \
            == (96, 48, 48)
    with open(tmp_path / "run-0" / "metrics.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert _history_diff(rows, emulated["runner"]["1"]["rows"]) < TOL
    with open(tmp_path / "run-0" / "summary.json", encoding="utf-8") as f:
        assert json.load(f)["processes"] == 2

    ref_params, ref_losses = worker.reference_multiprocess()
    for r in reports:
        assert np.max(np.abs(np.array(r["losses"]) - np.array(ref_losses))) < TOL, (r["losses"], ref_losses)
    with np.load(tmp_path / "checkpoint.npz") as ck:
        saved = [ck[f"leaf{i}"] for i in range(len(ck.files))]
    ref_leaves = [np.asarray(a) for a in jax.tree_util.tree_leaves(ref_params)]
    assert len(saved) == len(ref_leaves)
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(saved, ref_leaves)) < TOL
    assert ref_losses[-1] < ref_losses[0]


# --------------------------------------------------------------------------- the runner

HISTORY_KEYS = ("train_loss", "test_loss", "train_accuracy", "test_accuracy", "batch_loss")


def _history_diff(rows_a, rows_b):
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    return max(abs(a[k] - b[k]) for a, b in zip(rows_a, rows_b) for k in HISTORY_KEYS
               if a.get(k) is not None)


def test_runner_uses_all_devices_by_default_and_matches_one_device(emulated):
    r8, r1 = emulated["runner"]["8"], emulated["runner"]["1"]
    assert (r8["devices"], r8["processes"], r8["mesh"]) == (8, 1, {"data": 8, "model": 1})
    assert (r8["global_batch_size"], r8["per_device_batch_size"]) == (96, 12)
    assert (r1["devices"], r1["global_batch_size"], r1["per_device_batch_size"]) == (1, 96, 96)
    assert len(r8["rows"]) == 3 and r8["rows"][-1]["train_loss"] < r8["rows"][0]["train_loss"]
    assert _history_diff(r8["rows"], r1["rows"]) < TOL


def test_runner_refuses_indivisible_batch_before_writing(emulated):
    e = emulated["errors"]["runner_batch_100"]
    assert e and "100" in e and "8 devices" in e and "96 or 104" in e, e
    assert not emulated["runner_bad_out_exists"]
