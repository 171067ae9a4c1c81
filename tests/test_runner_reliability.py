"""No silent wrong answers from the training loop, the checkpoints and the runner (issue 16,
items 8-15): a diverged loss stops the run naming its step; a checkpoint that lies is detected
and skipped, out loud; a damaged run folder is refused by name; one runner per folder; a full
disk is a one-line error; bad numbers are refused before anything is written; Ctrl-C says how
to continue; the multi-device command of the README runs.
"""
import errno
import io
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optax
import pytest

import jaxprop as jp
from helpers import with_test_xla_flags
from jaxprop import checkpoint as ckpt
from jaxprop import cli, data, train
from jaxprop.runner import rundir
from jaxprop.runner.models import build_model
from jaxprop.train import metrics as metrics_mod

ROOT = Path(__file__).resolve().parents[1]
NET = build_model("mlp:8:tanh", 2)
TX = optax.adam(1e-2)
KW = dict(steps=30, batch_size=20, eval_every=10, checkpoint_every=10, keep_checkpoints=3, progress=False,
          seed=1)
ARGS = ["--dataset", "spirals", "--model", "mlp:16:tanh", "--batch-size", "50", "--no-progress"]


def _strict(text: str):
    """json.loads that refuses NaN and Infinity (what strict parsers do)."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


class Boom(Exception):
    pass


def _dies_at(step):
    def callback(row, params):
        if row["step"] == step:
            raise Boom()
    return callback


@pytest.fixture(scope="module")
def moons():
    return data.load("moons")


@pytest.fixture(scope="module")
def reference(moons):
    return train.fit(NET, None, TX, moons, **KW)


@pytest.fixture
def partial(moons, tmp_path):
    """A run killed at step 25: checkpoints at steps 10 and 20."""
    paths = dict(checkpoint_dir=str(tmp_path / "ck"), metrics_path=str(tmp_path / "m.jsonl"))
    with pytest.raises(Boom):
        train.fit(NET, None, TX, moons, **paths, **dict(KW, eval_every=5), callback=_dies_at(25))
    assert ckpt.list_steps(paths["checkpoint_dir"]) == [10, 20]
    return paths


# ----------------------------------------------------------------------------- 8: non-finite loss

def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(moons, tmp_path):
    net, tx = build_model("mlp:8:relu", 2), optax.sgd(1e5)
    kw = dict(steps=30, batch_size=20, progress=False)
    trace = train.fit(net, None, tx, moons, eval_every=1, stop_on_nonfinite=False, **kw)
    losses = [r["batch_loss"] for r in trace.history[1:]]          # row s: the batch loss of step s
    first_bad = next(s for s, v in enumerate(losses, 1) if not math.isfinite(v))
    d = tmp_path / "ck"
    with pytest.raises(train.NonFiniteLoss, match=rf"NaN or infinite at step {first_bad}\b") as info:
        train.fit(net, None, tx, moons, eval_every=10, checkpoint_dir=str(d), checkpoint_every=2,
                  keep_checkpoints=0, metrics_path=str(tmp_path / "m.jsonl"), **kw)
    e = info.value
    assert e.step == first_bad
    kept = ckpt.list_steps(str(d))
    assert kept and kept[-1] < first_bad and e.checkpoint == ckpt.path_for(str(d), kept[-1])
    assert f"last good checkpoint is kept: {e.checkpoint}" in str(e)
    for step in kept:                                   # every saved state is finite and verifiable
        trees, _ = ckpt.restore(ckpt.path_for(str(d), step), ckpt.read(ckpt.path_for(str(d), step))[1])
    for line in (tmp_path / "m.jsonl").read_text().splitlines():
        _strict(line)


def test_json_outputs_are_strict_with_nonfinite_flagged(moons, tmp_path):
    net, tx = build_model("mlp:8:relu", 2), optax.sgd(1e5)
    path = tmp_path / "m.jsonl"
    train.fit(net, None, tx, moons, steps=20, batch_size=20, eval_every=5, progress=False,
              stop_on_nonfinite=False, metrics_path=str(path))
    rows = [_strict(line) for line in path.read_text().splitlines()]
    flagged = [r for r in rows if r.get("nonfinite")]
    assert flagged and all(r[k] is None for r in flagged for k in r["nonfinite"])
    rundir.write_json_atomic(str(tmp_path / "s.json"), {"final_test_loss": float("nan"), "x": 1.0,
                                                        "nested": {"y": float("inf")}})
    s = _strict((tmp_path / "s.json").read_text())
    assert s["final_test_loss"] is None and s["nested"]["y"] is None
    assert s["nonfinite"] == ["final_test_loss", "nested.y"] and s["x"] == 1.0


def test_cli_diverging_run_exits_1_naming_the_step(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["--model", "mlp:32:relu", "--optimizer", "sgd", "--lr", "1000", "--steps", "60",
                   "--checkpoint-every", "2", "--no-progress", "--out", str(out)])     # MNIST-1D
    err = capsys.readouterr().err
    assert rc == 1, err
    assert re.search(r"error: fit: the training loss became NaN or infinite at step \d+", err), err
    assert "Traceback" not in err and not (out / "summary.json").exists()
    assert "last good checkpoint is kept" in err


# ----------------------------------------------------------------------------- 9: checkpoints that lie

def _rewrite(path, change, fix_header=False):
    """Rewrite checkpoint ``path``'s arrays with ``change(arrays)``, keeping its header
    (``fix_header``: recompute its digests and fingerprints so that only the content is wrong)."""
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: np.array(f[k]) for k in f.files}
    header = json.loads(bytes(arrays["__meta__"]).decode())
    change(arrays)
    if fix_header:
        for group, entries in header["layout"].items():
            leaves = [arrays[f"{group}/{i}"] for i in range(len(entries))]
            header["digests"][group] = ckpt.digest(leaves)
            key = {"params": "params_fingerprint", "opt_state": "opt_state_fingerprint"}.get(group)
            if key:
                header["meta"][key] = ckpt.digest(leaves)
        arrays["__meta__"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _scale_first_param(arrays):
    arrays["params/0"] = arrays["params/0"] * 1.5


def _nan_in_params(arrays):
    arrays["params/0"] = arrays["params/0"].copy()
    arrays["params/0"].flat[3] = np.nan


def _scale_adam_moment(arrays):
    k = next(k for k in sorted(arrays) if k.startswith("opt_state/") and arrays[k].ndim == 2)
    arrays[k] = arrays[k] * 2.0


@pytest.mark.parametrize("corruption,fix_header,reason", [
    ("scaled param", False, r"'params' do not match the digest"),
    ("scaled param, header recomputed without fingerprint", "drop", r"params do not match the params_fingerprint"),
    ("previous checkpoint's arrays", False, r"do not match the digest"),
    ("NaN in params", False, r"'params' do not match the digest"),
    ("NaN in params, header recomputed", True, r"params\[0\]\['b'\] holds NaN"),
    ("optimizer state scaled, header recomputed", "opt", r"opt_state do not match the opt_state_fingerprint"),
    ("truncated file", False, r"is unreadable"),
])
def test_corrupt_newest_checkpoint_falls_back_and_says_so(moons, reference, partial, corruption, fix_header,
                                                          reason):
    d = partial["checkpoint_dir"]
    newest, previous = ckpt.path_for(d, 20), ckpt.path_for(d, 10)
    if corruption == "previous checkpoint's arrays":
        with np.load(previous, allow_pickle=False) as f:
            old = {k: np.array(f[k]) for k in f.files if k != "__meta__"}
        _rewrite(newest, lambda a: a.update(old))
    elif corruption == "truncated file":
        with open(newest, "r+b") as f:
            f.truncate(os.path.getsize(newest) // 2)
    elif fix_header == "drop":                       # an older checkpoint: no digests, only the fingerprint
        _rewrite(newest, _scale_first_param)
        with np.load(newest, allow_pickle=False) as f:
            arrays = {k: np.array(f[k]) for k in f.files}
        header = json.loads(bytes(arrays["__meta__"]).decode())
        del header["digests"]
        arrays["__meta__"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        with open(newest, "wb") as f:
            np.savez(f, **arrays)
    elif fix_header == "opt":
        with np.load(newest, allow_pickle=False) as f:   # keep the original opt fingerprint: only digests fixed
            header = json.loads(bytes(f["__meta__"]).decode())
        want = header["meta"]["opt_state_fingerprint"]
        _rewrite(newest, _scale_adam_moment, fix_header=True)
        with np.load(newest, allow_pickle=False) as f:
            arrays = {k: np.array(f[k]) for k in f.files}
        header = json.loads(bytes(arrays["__meta__"]).decode())
        header["meta"]["opt_state_fingerprint"] = want
        arrays["__meta__"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        with open(newest, "wb") as f:
            np.savez(f, **arrays)
    else:
        _rewrite(newest, _nan_in_params if "NaN" in corruption else _scale_first_param, fix_header=fix_header)
    with pytest.warns(train.RecoveryWarning, match=reason + r".*resuming from .*ckpt-000000010\.npz \(step 10\)"):
        r = train.fit(NET, None, TX, moons, resume=True, **partial, **dict(KW, eval_every=5))
    assert r.resumed_from == 10
    assert r.params_fingerprint == reference.params_fingerprint


def test_resume_refuses_when_no_checkpoint_is_usable(moons, partial, tmp_path, capsys):
    for step in (10, 20):
        _rewrite(ckpt.path_for(partial["checkpoint_dir"], step), _scale_first_param)
    with pytest.raises(ValueError, match=r"none of its 2 checkpoint\(s\) is usable.*ckpt-000000020.*ckpt-000000010"):
        train.fit(NET, None, TX, moons, resume=True, **partial, **KW)
    # the runner: the same refusal, exit status 2, no restart from step 0
    out = tmp_path / "run"
    assert cli.main(ARGS + ["--steps", "40", "--checkpoint-every", "20", "--eval-every", "20",
                            "--out", str(out)]) == 0
    (out / "summary.json").unlink()                    # as if killed at the end
    ck = out / "checkpoints"
    for p in ck.iterdir():
        _rewrite(str(p), _scale_first_param)
    before = sorted(p.name for p in ck.iterdir())
    capsys.readouterr()
    assert cli.main(["--resume", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "none of its" in err and "is usable" in err and "Traceback" not in err
    assert sorted(p.name for p in ck.iterdir()) == before


# ----------------------------------------------------------------------------- 10: damaged run folders

def test_resume_refuses_missing_or_damaged_config(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(ARGS + ["--steps", "20", "--checkpoint-every", "10", "--out", str(out)]) == 0
    (out / "summary.json").unlink()
    config = out / "config.json"
    text = config.read_text()
    capsys.readouterr()
    for damage, expected in [("missing", "config.json is missing"),
                             ("truncated", "config.json is not valid JSON"),
                             ("a list", "holds a list, not a JSON object"),
                             ("no options", "lacks the run's options")]:
        if damage == "missing":
            config.unlink()
        else:
            config.write_text({"truncated": text[:len(text) // 2], "a list": "[1, 2]",
                               "no options": '{"resolved": {}}'}[damage])
        assert cli.main(["--resume", "--out", str(out), "--lr", "0.5"]) == 2, damage
        err = capsys.readouterr().err
        assert str(config) in err and expected in err and "Traceback" not in err, (damage, err)
    assert not (out / "summary.json").exists()


def test_garbage_metrics_line_is_skipped_with_a_warning_and_later_rows_kept(moons, reference, partial):
    path = Path(partial["metrics_path"])
    lines = path.read_text().splitlines(keepends=True)
    assert [json.loads(x)["step"] for x in lines] == [0, 5, 10, 15, 20, 25]
    path.write_text("".join(lines[:2] + ["{garbage\n"] + lines[2:]))
    with pytest.warns(train.RecoveryWarning, match=r"m\.jsonl, line 3: not a metrics row"):
        rows = train.read_jsonl(str(path))
    assert [r["step"] for r in rows] == [0, 5, 10, 15, 20, 25]
    with pytest.warns(train.RecoveryWarning, match="line 3"):
        r = train.fit(NET, None, TX, moons, resume=True, **partial, **dict(KW, eval_every=5))
    assert r.params_fingerprint == reference.params_fingerprint
    assert [x["step"] for x in train.read_jsonl(str(path))] == [0, 5, 10, 15, 20, 25, 30]
    assert "garbage" not in path.read_text()


# ----------------------------------------------------------------------------- 11: one runner per folder

def test_second_runner_on_a_locked_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    lock = rundir.RunLock(str(out))                    # another run holds the folder
    try:
        for argv in (ARGS + ["--steps", "20", "--out", str(out)], ["--resume", "--out", str(out)]):
            assert cli.main(argv) == 2
            err = capsys.readouterr().err
            assert f"{out} is in use by another run (pid {os.getpid()})" in err, err
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    finally:
        lock.release()
    assert cli.main(ARGS + ["--steps", "20", "--out", str(out)]) == 0      # a folder holding only .lock is empty
    assert (out / ".lock").read_text() == ""                                  # released: no stale pid


def test_two_processes_one_folder(tmp_path):
    """A real second process: refused while the first runs (new run and --resume), free after a SIGKILL
    (test_resume's SIGKILL test resumes such a folder to identical parameters)."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "experiments" / "train.py")]
    first = subprocess.Popen(cmd + ARGS + ["--steps", "10000000", "--checkpoint-every", "100", "--out", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=str(ROOT))
    try:
        deadline = time.monotonic() + 120
        while not ckpt.list_steps(str(out / "checkpoints")) and first.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()[1].decode()[-2000:]
        assert (out / ".lock").read_text().strip() == str(first.pid)
        before = sorted(p.name for p in out.iterdir())
        for argv in (ARGS + ["--steps", "10000000", "--out", str(out)], ["--resume", "--out", str(out)]):
            second = subprocess.run(cmd + argv, capture_output=True, cwd=str(ROOT), timeout=120)
            err = second.stderr.decode()
            assert first.poll() is None, "the first runner ended: the test proves nothing"
            assert second.returncode == 2 and f"in use by another run (pid {first.pid})" in err, err
        assert sorted(p.name for p in out.iterdir()) == before
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    assert first.returncode == -signal.SIGKILL and not (out / "summary.json").exists()
    rundir.RunLock(str(out)).release()                 # SIGKILL released it: the folder is free again


# ----------------------------------------------------------------------------- 12: I/O errors

def test_disk_full_during_a_save_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real, calls = np.savez, {"n": 0}

    def full_disk(f, **arrays):
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"PK\x03\x04 part")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(f, **arrays)

    monkeypatch.setattr(ckpt.np, "savez", full_disk)
    rc = cli.main(ARGS + ["--steps", "40", "--checkpoint-every", "20", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1
    lines = [x for x in err.splitlines() if "error" in x]
    assert lines == [f"jaxprop-train: error: {out / 'checkpoints' / 'ckpt-000000040.npz'}: No space left on device"]
    assert "Traceback" not in err
    monkeypatch.setattr(ckpt.np, "savez", real)
    assert ckpt.list_steps(str(out / "checkpoints")) == [20]          # the previous checkpoint is intact
    ckpt.read_verified(ckpt.path_for(str(out / "checkpoints"), 20))
    assert not [p for p in out.rglob(".tmp-*")]


def test_disk_full_writing_the_png_leaves_no_partial_png(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    out = tmp_path / "run"

    def full_disk(self, f, **kw):
        f.write(b"\x89PNG\r\n partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Figure, "savefig", full_disk)
    assert cli.main(ARGS + ["--steps", "20", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"error: {out / 'learning_curves.png'}: No space left on device" in err and "Traceback" not in err
    assert not (out / "learning_curves.png").exists() and not [p for p in out.rglob(".tmp-*")]


def test_outputs_have_ordinary_file_permissions(tmp_path):
    out = tmp_path / "run"
    assert cli.main(ARGS + ["--steps", "20", "--checkpoint-every", "10", "--out", str(out)]) == 0
    probe = tmp_path / "probe"
    probe.write_text("x")                                # what open() gives a new file here
    want = probe.stat().st_mode & 0o777
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: want for p in files}
    assert len(files) >= 6


# ----------------------------------------------------------------------------- 13: numbers, resume, Ctrl-C

@pytest.mark.parametrize("extra,message", [
    (["--lr", "-0.01"], "--lr must be a positive number"),
    (["--lr", "0"], "--lr must be a positive number"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be at least 1 (for full batch give the training set's size)"),
    (["--batch-size", "-3"], "--batch-size must be at least 1"),
    (["--batch-size", "301"], "--batch-size 301 is larger than the training set (300 examples); use "
                              "--batch-size 300 for full batch"),
    (["--eval-every", "0"], "--eval-every must be at least 1, got 0"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints must be at least 1, got 0"),
    (["--checkpoint-every", "-5"], "--checkpoint-every must be 0 (only at the end) or more"),
    (["--schedule", "warmup_cosine", "--warmup-steps", "500", "--steps", "100"],
     "--warmup-steps 500 is more than the run's 100 steps"),
    (["--val-fraction", "1.5"], "--val-fraction must be in [0, 1)"),
    (["--early-stopping", "0"], "--early-stopping must be at least 1"),
])
def test_bad_numbers_are_refused_before_the_folder_exists(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    argv = ARGS + ["--steps", "20"] + extra + ["--out", str(out)] if "--epochs" not in extra \
        else ARGS + extra + ["--out", str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not out.exists()


def test_full_batch_is_explicit(tmp_path):
    r = cli.run(ARGS[:4] + ["--batch-size", "300", "--steps", "3", "--eval-every", "3", "--no-progress",
                            "--out", str(tmp_path / "run")])
    assert r["steps"] == 3
    assert json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]["batch_size"] == 300


@pytest.mark.parametrize("change,what", [
    ("lr", "the optimizer"), ("activation", "the network"), ("loss", "the loss"),
    ("data", "the data set"), ("steps", "the number of steps (30 there, 40 here)"),
])
def test_fit_resume_refuses_a_different_run(moons, partial, change, what):
    net, tx, loss, ds, kw = NET, TX, None, moons, dict(KW)
    if change == "lr":
        tx = optax.adam(2e-2)
    elif change == "activation":
        net = build_model("mlp:8:relu", 2)
    elif change == "loss":
        loss = "mse"
    elif change == "data":
        ds = data.load("moons", seed=7)
        assert ds.n_train == moons.n_train
    else:
        kw["steps"] = 40
    with pytest.raises(train.ResumeMismatch, match=re.escape(what)):
        train.fit(net, loss, tx, ds, resume=True, **partial, **kw)


def test_ctrl_c_in_fit_names_the_step_and_keeps_the_checkpoint(moons, reference, tmp_path):
    paths = dict(checkpoint_dir=str(tmp_path / "ck"), metrics_path=str(tmp_path / "m.jsonl"))

    def ctrl_c(row, params):
        if row["step"] == 20:
            raise KeyboardInterrupt()

    with pytest.raises(train.Interrupted) as info:
        train.fit(NET, None, TX, moons, **paths, **KW, callback=ctrl_c)
    assert info.value.step == 20 and info.value.checkpoint == ckpt.path_for(paths["checkpoint_dir"], 10)
    assert isinstance(info.value, KeyboardInterrupt)
    r = train.fit(NET, None, TX, moons, resume=True, **paths, **KW)
    assert r.resumed_from == 10 and r.params_fingerprint == reference.params_fingerprint


def test_ctrl_c_in_the_runner_prints_how_to_continue(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "experiments" / "train.py")] + ARGS
    # 6000 steps: the Ctrl-C must land mid-run; 1500 steps finished in 1.8 s once compiles got
    # faster (820 steps/s), before the signal arrived
    proc = subprocess.Popen(cmd + ["--steps", "6000", "--checkpoint-every", "100", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(ROOT))
    deadline = time.monotonic() + 120
    while not ckpt.list_steps(str(out / "checkpoints")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 130, err[-2000:]
    assert re.search(rf"jaxprop-train: interrupted at step \d+; continue with --resume --out {re.escape(str(out))}$",
                     err.strip()), err[-2000:]
    assert "Traceback" not in err and ckpt.list_steps(str(out / "checkpoints"))
    res = subprocess.run([sys.executable, str(ROOT / "experiments" / "train.py"), "--resume", "--out", str(out),
                          "--no-progress"], capture_output=True, cwd=str(ROOT), timeout=300)
    assert res.returncode == 0, res.stderr.decode()[-2000:]


# ----------------------------------------------------------------------------- 14: many emulated devices

def _emulated(n, code, timeout):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["XLA_FLAGS"] = with_test_xla_flags(f"--xla_force_host_platform_device_count={n} "
                                           "--xla_cpu_collective_call_terminate_timeout_seconds=20")
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=str(ROOT), env=env,
                          timeout=timeout)


def test_many_steps_between_waits_on_8_emulated_devices_do_not_deadlock():
    """Before the bound on steps in flight, 80 steps of this net without an evaluation in
    between aborted (XLA:CPU all-reduce rendezvous timeout) in 3 of 3 tries on 2 cores."""
    code = ("import optax; from jaxprop import data, distributed as dist, train; "
            "from jaxprop.runner.models import build_model; "
            "r = train.fit(build_model('mlp:512-512:relu', 10), None, optax.adam(1e-3), data.load('mnist1d'), "
            "steps=80, batch_size=256, eval_every=10**6, progress=False, mesh=dist.make_mesh(8)); "
            "print('done', r.step)")
    res = _emulated(8, code, timeout=240)
    assert res.returncode == 0 and b"done 80" in res.stdout, res.stderr.decode()[-3000:]


def test_readme_multi_device_command_runs(tmp_path):
    """The README's command, as written, on 8 emulated devices (about 30 s on 2 cores)."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"XLA_FLAGS=(\S+) \\\n\s+python (experiments/train.py [^\n]+)", text)
    assert m, "the README's multi-device command moved"
    flags, command = m.group(1), shlex.split(m.group(2))
    assert flags == "--xla_force_host_platform_device_count=8"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(XLA_FLAGS=with_test_xla_flags(flags), JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable] + command + ["--out", str(tmp_path / "run"), "--no-progress"],
                         capture_output=True, cwd=str(ROOT), env=env, timeout=240)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (s["devices"], s["per_device_batch_size"], s["steps"]) == (8, 12, 300)


# ----------------------------------------------------------------------------- 15: newcomer points

def test_progress_bar_eta_counts_from_after_the_first_step():
    pytest.importorskip("tqdm")
    bar = metrics_mod.progress_bar(1000, 0, io.StringIO(), "t")
    try:
        time.sleep(0.6)                                   # the first step compiling
        metrics_mod.restart_clock(bar)
        bar.update(1)
        for _ in range(9):
            time.sleep(0.002)
            bar.update(1)
        d = bar.format_dict
        rate = (d["n"] - d["initial"]) / d["elapsed"]
        assert d["elapsed"] < 0.5 and rate > 10             # not 10 steps / 0.6 s of compiling
        assert "<" in bar.__str__() and "?" not in bar.__str__().split("<")[1][:6]
    finally:
        bar.close()


def test_config_command_and_names(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["experiments/train.py"])
    out = tmp_path / "run"
    assert cli.main(ARGS + ["--steps", "5", "--eval-every", "5", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["command"] == "python experiments/train.py " + shlex.join(ARGS + ["--steps", "5", "--eval-every",
                                                                                   "5", "--out", str(out)])
    monkeypatch.setattr(sys, "argv", ["/some/bin/jaxprop-train"])
    assert rundir.entry_point() == ["jaxprop-train"]
    assert jp.conv1d(25, 5, stride=2, padding=1).name == "conv1d(25, 5, stride=2, padding=1)"
    assert jp.conv1d(25, 5).name == "conv1d(25, 5)"
    help_text = cli.build_parser().format_help()
    for spec in ("cnn:", "gru:", "lstm:", "rnn:", "gpt:"):
        assert spec in help_text, spec


def test_readme_layers_table_is_one_table_and_commands_say_where_python_is():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Layers and losses")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    block = section[section.index(rows[0]):section.index(rows[-1])]
    assert "\n\n" not in block, "a blank line splits the layers table"
    assert any("conv1d" in r for r in rows)
    quick = text.split("## Quick start")[1].split("\n## ")[0]
    assert "source .venv/bin/activate" in quick


def test_runner_says_when_it_skips_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(ARGS + ["--steps", "40", "--checkpoint-every", "20", "--eval-every", "20",
                            "--out", str(out)]) == 0
    (out / "summary.json").unlink()
    _rewrite(str(out / "checkpoints" / "ckpt-000000040.npz"), _scale_first_param)
    capsys.readouterr()
    assert cli.main(["--resume", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert re.search(r"^jaxprop-train: warning: checkpoint .*ckpt-000000040\.npz: the arrays of 'params' do not "
                     r"match the digest .*; resuming from .*ckpt-000000020\.npz \(step 20\) instead$", err, re.M), err
