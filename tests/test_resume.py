"""Resume: a killed or failed run continues to bit-identical parameters.

In-process: failures injected between checkpoints and in the middle of a
save. Subprocess: the runner killed with SIGKILL after a checkpoint appears,
then ``--resume``; the final ``params_fingerprint`` must equal an
uninterrupted run's.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import optax
import pytest

from jaxprop import checkpoint as ckpt
from jaxprop import cli, data, models, train

ROOT = Path(__file__).resolve().parents[1]
NET = models.build_model("mlp:8:tanh:dropout=0.1", 2)        # stochastic: keys must resume too
TX = optax.adam(1e-2)
KW = dict(steps=60, batch_size=20, eval_every=10, checkpoint_every=7, progress=False, seed=3)
TIMING = ("elapsed_s", "steps_per_s")


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(scope="module")
def moons():
    return data.load("moons")


@pytest.fixture(scope="module")
def reference(moons, tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    r = train.fit(NET, None, TX, moons, checkpoint_dir=str(d / "ck"), metrics_path=str(d / "m.jsonl"), **KW)
    return r


def test_same_seed_same_run_bit_for_bit(moons, reference):
    again = train.fit(NET, None, TX, moons, **KW)
    other = train.fit(NET, None, TX, moons, **dict(KW, seed=4))
    assert again.params_fingerprint == reference.params_fingerprint == train.params_fingerprint(again.params)
    assert _strip(again.history) == _strip(reference.history)
    assert other.params_fingerprint != reference.params_fingerprint
    assert [r["step"] for r in reference.history] == [0, 10, 20, 30, 40, 50, 60]
    assert reference.finished and not reference.stopped_early
    assert str(np.asarray(reference.params[0]["w"]).dtype) == "float32"       # float32 by default


class Boom(Exception):
    pass


def test_failure_between_checkpoints_then_resume(moons, reference, tmp_path):
    def failing(row, params):               # dies in the evaluation at step 20, after its row is written
        if row["step"] == 20:
            raise Boom()

    paths = dict(checkpoint_dir=str(tmp_path / "ck"), metrics_path=str(tmp_path / "m.jsonl"))
    with pytest.raises(Boom):
        train.fit(NET, None, TX, moons, **paths, **KW, callback=failing)
    assert ckpt.list_steps(paths["checkpoint_dir"]) == [7, 14]      # killed at step 20: 14 is the latest
    assert [r["step"] for r in train.read_jsonl(paths["metrics_path"])] == [0, 10, 20]
    with pytest.raises(ValueError, match="resume=True"):             # never silently restarts over it
        train.fit(NET, None, TX, moons, **paths, **KW)
    r = train.fit(NET, None, TX, moons, resume=True, **paths, **KW)
    assert r.resumed_from == 14
    assert r.params_fingerprint == reference.params_fingerprint
    # the rows after the checkpoint (step 20) were dropped and written again, once
    assert _strip(train.read_jsonl(paths["metrics_path"])) == _strip(reference.history)


def test_failure_in_the_middle_of_a_save_then_resume(moons, reference, tmp_path, monkeypatch):
    real = np.savez
    calls = {"n": 0}

    def dies_half_way(f, **arrays):          # the 4th save (step 28) writes some bytes, then dies
        calls["n"] += 1
        if calls["n"] == 4:
            f.write(b"PK\x03\x04 half a checkpoint")
            raise Boom()
        return real(f, **arrays)

    monkeypatch.setattr(ckpt.np, "savez", dies_half_way)
    paths = dict(checkpoint_dir=str(tmp_path / "ck"), metrics_path=str(tmp_path / "m.jsonl"))
    with pytest.raises(Boom):
        train.fit(NET, None, TX, moons, **paths, **KW)
    monkeypatch.setattr(ckpt.np, "savez", real)
    assert ckpt.list_steps(paths["checkpoint_dir"]) == [14, 21]
    assert os.path.basename(ckpt.latest(paths["checkpoint_dir"])) == "ckpt-000000021.npz"
    r = train.fit(NET, None, TX, moons, resume=True, **paths, **KW)
    assert r.resumed_from == 21 and r.params_fingerprint == reference.params_fingerprint
    assert _strip(r.history) == _strip(reference.history)


def test_resume_without_checkpoint_starts_from_scratch_and_finished_run_is_untouched(moons, reference, tmp_path):
    paths = dict(checkpoint_dir=str(tmp_path / "ck"), metrics_path=str(tmp_path / "m.jsonl"))
    (tmp_path / "m.jsonl").write_text('{"step": 0, "partial": tr')       # killed before any checkpoint
    r = train.fit(NET, None, TX, moons, resume=True, **paths, **KW)
    assert r.resumed_from is None and r.params_fingerprint == reference.params_fingerprint
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    again = train.fit(NET, None, TX, moons, resume=True, **paths, **KW)
    assert again.finished and again.params_fingerprint == reference.params_fingerprint
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == files
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == before
    with pytest.raises(ValueError, match="seed"):
        train.fit(NET, None, TX, moons, resume=True, **paths, **dict(KW, seed=4))


# ----------------------------------------------------------------------------- the runner

ARGS = ["--dataset", "spirals", "--model", "mlp:16:tanh", "--batch-size", "50", "--eval-every", "200",
        "--no-progress"]


def test_runner_refuses_to_overwrite_and_checks_resumed_options(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(ARGS + ["--steps", "40", "--checkpoint-every", "20", "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"config.json", "metrics.jsonl", "summary.json", "learning_curves.png", "checkpoints", ".lock"}
    summary = json.loads((out / "summary.json").read_text())
    for key in ("steps", "final_test_accuracy", "best_test_accuracy", "final_train_loss", "wall_time_s",
                "steps_per_s", "device", "params_fingerprint"):
        assert summary[key] is not None, key
    assert summary["steps"] == 40
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert cli.main(ARGS + ["--steps", "40", "--out", str(out)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert cli.main(["--resume", "--out", str(out), "--lr", "0.5"]) == 2
    assert "--lr was 0.01, now 0.5" in capsys.readouterr().err
    assert cli.main(["--resume", "--out", str(out)]) == 0             # finished: nothing changes
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


RUN = ["--steps", "1500", "--checkpoint-every", "100", "--dtype", "float64"]


def test_sigkill_then_resume_gives_identical_parameters(tmp_path):
    killed, full = tmp_path / "killed", tmp_path / "full"
    proc = subprocess.Popen([sys.executable, str(ROOT / "experiments" / "train.py")] + ARGS + RUN
                            + ["--out", str(killed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=str(ROOT))
    ckdir = killed / "checkpoints"
    seen = {}

    def kill_after_first_checkpoint():
        deadline = time.monotonic() + 120
        while not ckpt.list_steps(str(ckdir)) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        seen["steps"] = ckpt.list_steps(str(ckdir))
        proc.send_signal(signal.SIGKILL)

    killer = threading.Thread(target=kill_after_first_checkpoint)
    killer.start()
    # meanwhile, the uninterrupted run in this process (x64 is on here, as --dtype float64 turns it on there)
    assert cli.main(ARGS + RUN + ["--out", str(full)]) == 0
    killer.join()
    err = proc.communicate()[1].decode()[-2000:]
    assert seen["steps"], f"no checkpoint appeared: {err}"
    assert proc.returncode == -signal.SIGKILL, err
    assert not (killed / "summary.json").exists()
    assert ckpt.list_steps(str(ckdir))[-1] < 1500            # really killed mid-run
    res = subprocess.run([sys.executable, str(ROOT / "experiments" / "train.py"), "--resume",
                          "--out", str(killed), "--no-progress"], capture_output=True, cwd=str(ROOT))
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    a = json.loads((killed / "summary.json").read_text())
    b = json.loads((full / "summary.json").read_text())
    assert a["params_fingerprint"] == b["params_fingerprint"] and a["steps"] == b["steps"] == 1500
    rows_a, rows_b = train.read_jsonl(str(killed / "metrics.jsonl")), train.read_jsonl(str(full / "metrics.jsonl"))
    assert _strip(rows_a) == _strip(rows_b)                 # no duplicated or missing rows
