"""jaxprop.checkpoint: exact round trip, layout checks, atomic saves, pruning."""
import errno
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxprop import checkpoint as ckpt


def _trees(seed):
    rng = np.random.default_rng(seed)           # NumPy values: no compilation in these tests

    def rand(*shape, dtype=np.float64):
        return jnp.asarray(rng.standard_normal(shape).astype(dtype))

    params = ({"w": rand(3, 4), "b": rand(4, dtype=np.float32)}, (), {"scale": rand()})
    opt_state = optax.adam(1e-3).init(params)
    # give the optimizer state values (an advanced optimizer), keeping its structure and dtypes
    opt_state = jax.tree_util.tree_map(
        lambda a: rand(*a.shape, dtype=a.dtype) if jnp.issubdtype(a.dtype, jnp.floating)
        else jnp.asarray(seed + 5, a.dtype), opt_state)
    return {"params": params, "opt_state": opt_state, "flags": jnp.array([True, False]),
            "key": jnp.asarray(rng.integers(0, 2**32, 2, dtype=np.uint32))}


def _assert_same(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def test_round_trip_is_exact(tmp_path):
    trees = _trees(0)
    path = ckpt.save(str(tmp_path), 7, trees, {"note": "x", "n": 3})
    assert os.path.basename(path) == "ckpt-000000007.npz"
    out, header = ckpt.restore(path, _trees(1))                  # template: other values, same layout
    _assert_same(out, trees)
    assert header["step"] == 7 and header["meta"] == {"note": "x", "n": 3}
    assert ckpt.latest(str(tmp_path)) == path
    with np.load(path, allow_pickle=False) as f:                 # readable without pickle
        assert "__meta__" in f.files


def test_layout_mismatch_is_a_clear_error(tmp_path):
    trees = _trees(0)
    path = ckpt.save(str(tmp_path), 1, trees)
    wrong = dict(trees, params=({"w": jnp.zeros((3, 5)), "b": jnp.zeros(4, jnp.float32)}, (),
                                {"scale": jnp.zeros(())}))
    with pytest.raises(ValueError, match=r"params\[0\]\['w'\].*\[3, 4\].*\[3, 5\]"):
        ckpt.restore(path, wrong)
    with pytest.raises(ValueError, match="has 3 arrays, the model expects 2"):
        ckpt.restore(path, dict(trees, params=(jnp.zeros(1), jnp.zeros(1))))
    with pytest.raises(ValueError, match="has no 'extra'"):
        ckpt.restore(path, {"extra": jnp.zeros(1)})


def test_failure_in_the_middle_of_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    d = str(tmp_path)
    first = ckpt.save(d, 10, _trees(0), {"step": 10})
    real_savez = np.savez

    def half_written(f, **arrays):
        f.write(b"PK\x03\x04 partial zip")                    # some bytes reach the temp file
        f.flush()
        raise OSError("disk full (injected)")

    monkeypatch.setattr(ckpt.np, "savez", half_written)
    with pytest.raises(OSError, match="injected"):
        ckpt.save(d, 20, _trees(1), {"step": 20})
    monkeypatch.setattr(ckpt.np, "savez", real_savez)
    assert not os.path.exists(ckpt.path_for(d, 20))
    assert ckpt.latest(d) == first
    out, header = ckpt.restore(first, _trees(1))
    _assert_same(out, _trees(0))

    # a save killed before its rename leaves only a temp file: ignored, then cleaned up
    with open(os.path.join(d, ".tmp-ckpt-killed.npz"), "wb") as f:
        f.write(b"garbage")
    assert ckpt.latest(d) == first and ckpt.list_steps(d) == [10]
    ckpt.save(d, 30, _trees(2))
    assert not any(n.startswith(".tmp-") for n in os.listdir(d))


def test_unreadable_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    d = str(tmp_path)
    good = ckpt.save(d, 1, _trees(0))
    bad = ckpt.save(d, 2, _trees(1))
    with open(bad, "r+b") as f:                              # simulate on-disk corruption
        f.truncate(100)
    with pytest.warns(ckpt.RecoveryWarning, match=r"ckpt-000000002.npz is unreadable.*skipping it"):
        assert ckpt.latest(d) == good


def test_keep_prunes_old_checkpoints_only_after_the_new_one_exists(tmp_path):
    d = str(tmp_path)
    for s in (1, 2, 3, 4):
        ckpt.save(d, s, _trees(s), keep=2)
    assert ckpt.list_steps(d) == [3, 4]
    ckpt.save(d, 5, _trees(5), keep=0)
    ckpt.save(d, 6, _trees(6), keep=0)
    assert ckpt.list_steps(d) == [3, 4, 5, 6]
    assert ckpt.latest(str(tmp_path / "missing")) is None


def _rewrite(path, change):
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: np.array(f[k]) for k in f.files}
    change(arrays)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def test_changed_arrays_do_not_match_their_digests(tmp_path):
    d = str(tmp_path)
    path = ckpt.save(d, 3, _trees(0))
    header, _ = ckpt.read(path)
    assert set(header["digests"]) == {"params", "opt_state", "flags", "key"}
    _rewrite(path, lambda a: a.update({"opt_state/1": a["opt_state/1"] * 2}))
    with pytest.raises(ckpt.CorruptCheckpoint, match=r"the arrays of 'opt_state' do not match the digest"):
        ckpt.restore(path, _trees(1))
    with pytest.warns(ckpt.RecoveryWarning, match="do not match the digest"):
        assert ckpt.latest(d) is None

    def no_digests(a):                         # a checkpoint written before digests: accepted as it is
        h = json.loads(bytes(a["__meta__"]).decode())
        del h["digests"]
        a["__meta__"] = np.frombuffer(json.dumps(h).encode(), dtype=np.uint8)

    _rewrite(path, no_digests)
    out, _ = ckpt.restore(path, _trees(1))
    assert ckpt.latest(d) == path


def test_unreadable_file_is_a_corrupt_checkpoint_naming_it(tmp_path):
    path = ckpt.save(str(tmp_path), 4, _trees(0))
    with open(path, "wb") as f:
        f.write(b"")
    with pytest.raises(ckpt.CorruptCheckpoint, match=r"ckpt-000000004\.npz is unreadable"):
        ckpt.restore(path, _trees(1))


def test_saved_files_get_ordinary_permissions_and_errors_name_the_file(tmp_path, monkeypatch):
    probe = tmp_path / "probe"
    probe.write_text("x")
    path = ckpt.save(str(tmp_path), 5, _trees(0))
    assert os.stat(path).st_mode & 0o777 == probe.stat().st_mode & 0o777      # not mkstemp's 0600

    def full(f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    target = str(tmp_path / "x.json")
    with pytest.raises(OSError) as info:
        ckpt.atomic_write(target, full)
    assert info.value.filename == target and info.value.errno == errno.ENOSPC
    assert sorted(os.listdir(tmp_path)) == sorted(["probe", os.path.basename(path)])
