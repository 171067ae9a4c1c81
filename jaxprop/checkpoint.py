"""Atomic checkpoints: pytrees of arrays and a JSON header in one ``.npz`` file.

Format: ``DIR/ckpt-<step:09d>.npz``, a NumPy zip archive (no pickle) holding
every array leaf as ``<group>/<index>`` (flatten order of the pytree) and
``__meta__``: UTF-8 JSON bytes with the step, the caller's metadata and, per
group, each leaf's path, shape and dtype. Restoring needs a *template* with
the same pytree structure (e.g. freshly initialised params and optimizer
state); shapes and dtypes are checked against it.

Atomicity: ``save`` writes to a temp file in the same folder, flushes,
``fsync``\\ s, then ``os.replace``\\ s it to its final name (atomic on POSIX and
Windows) and ``fsync``\\ s the folder. A process killed at any moment leaves
either the new checkpoint complete or no file under the final name -- plus,
at worst, a stray ``.tmp-*`` file that :func:`latest` ignores and the next
``save`` removes. Older checkpoints are pruned only after the new one is in
place, so the latest complete checkpoint is never lost.

Integrity: the header also holds a SHA-256 digest of every group's leaves
(dtype, shape, bytes); :func:`restore` recomputes them and raises
:class:`CorruptCheckpoint` when one differs (a file changed after it was
written), as it does for a file that cannot be read at all. Checkpoints
written before digests existed are accepted without them.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np

_NAME = re.compile(r"^ckpt-(\d{9})\.npz$")
_META = "__meta__"


class CorruptCheckpoint(ValueError):
    """A checkpoint file that cannot be read, or whose content does not match
    the digests in its own header. A run falls back to the one before it."""


class RecoveryWarning(UserWarning):
    """A run recovered from a damaged file: an unusable checkpoint skipped in
    favour of the previous one, a garbage line skipped in a metrics file."""


def _file_mode() -> int:
    """The permissions ``open(path, "w")`` gives a new file: 0666 minus the umask (read once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


_MODE = _file_mode()


def atomic_write(path: str, write, *, binary: bool = False, prefix: str = ".tmp-"):
    """Write a file so that a kill at any moment leaves the old file or the new
    one, never a torn one: ``write(f)`` fills a temp file in the same folder,
    which is flushed, ``fsync``-ed and ``os.replace``-d onto ``path``. The
    only trace a kill can leave is a stray ``.tmp-*`` file. The file gets the
    permissions of an ordinary new file (0666 minus the umask, usually 0644).
    An ``OSError`` (a full disk) names ``path`` when it names no file itself."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=os.path.splitext(path)[1], dir=folder)
        os.fchmod(fd, _MODE)
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(e, OSError) and e.filename is None and e.errno is not None:
            e.filename = path
        raise


def digest(leaves) -> str:
    """SHA-256 (first 16 hex digits) of arrays' dtypes, shapes and bytes, in order."""
    h = hashlib.sha256()
    for leaf in leaves:
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{a.dtype.name}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def path_for(directory: str, step: int) -> str:
    return os.path.join(directory, f"ckpt-{int(step):09d}.npz")


def list_steps(directory: str) -> list:
    """Steps of the complete checkpoints in ``directory``, ascending."""
    if not os.path.isdir(directory):
        return []
    steps = []
    for name in os.listdir(directory):
        m = _NAME.match(name)
        if m:
            steps.append(int(m.group(1)))
    return sorted(steps)


def _fsync_dir(directory: str):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:                    # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(directory: str, step: int, trees: Dict[str, Any], meta: Optional[dict] = None,
         keep: int = 2) -> str:
    """Write ``trees`` (name -> pytree of arrays) and ``meta`` (JSON-able) atomically.

    Returns the checkpoint's path. Keeps the newest ``keep`` checkpoints
    (``keep <= 0``: all).
    """
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):          # leftovers of a killed save
        if name.startswith(".tmp-ckpt-"):
            try:
                os.unlink(os.path.join(directory, name))
            except OSError:
                pass
    arrays, layout, digests = {}, {}, {}
    for group, tree in trees.items():
        if "/" in group or group == _META:
            raise ValueError(f"checkpoint.save: invalid group name {group!r}")
        leaves_with_paths = jax.tree_util.tree_flatten_with_path(tree)[0]
        entries = []
        for i, (path, leaf) in enumerate(leaves_with_paths):
            a = np.asarray(leaf)
            if a.dtype == object:
                raise ValueError(f"checkpoint.save: leaf {group}{jax.tree_util.keystr(path)} is not an array")
            arrays[f"{group}/{i}"] = a
            entries.append([jax.tree_util.keystr(path), list(a.shape), a.dtype.name])
        layout[group] = entries
        digests[group] = digest(arrays[f"{group}/{i}"] for i in range(len(entries)))
    header = {"format": "jaxprop-checkpoint-1", "step": int(step), "meta": meta or {}, "layout": layout,
              "digests": digests}
    arrays[_META] = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)

    final = path_for(directory, step)
    atomic_write(final, lambda f: np.savez(f, **arrays), binary=True, prefix=".tmp-ckpt-")
    _fsync_dir(directory)
    if keep > 0:
        for old in list_steps(directory)[:-keep]:
            if old != step:
                try:
                    os.unlink(path_for(directory, old))
                except OSError:
                    pass
    return final


def read(path: str) -> Tuple[dict, Dict[str, list]]:
    """The header and the raw leaves (``group -> [np.ndarray]``) of one checkpoint."""
    with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as f:
        header = json.loads(bytes(f[_META]).decode("utf-8"))
        groups = {}
        for group, entries in header["layout"].items():
            groups[group] = [f[f"{group}/{i}"] for i in range(len(entries))]
    return header, groups


def read_verified(path: str) -> Tuple[dict, Dict[str, list]]:
    """:func:`read`, raising :class:`CorruptCheckpoint` when the file cannot be
    read or a group's arrays do not match the digest in its header."""
    try:
        header, groups = read(path)
    except Exception as e:              # noqa: BLE001 - a torn zip, a bad header, a missing array ...
        raise CorruptCheckpoint(f"checkpoint {path} is unreadable ({type(e).__name__}: {e})") from e
    for group, expected in header.get("digests", {}).items():
        if group in groups and digest(groups[group]) != expected:
            raise CorruptCheckpoint(f"checkpoint {path}: the arrays of '{group}' do not match the digest "
                                    "in its header (the file was changed after it was written)")
    return header, groups


def restore(path: str, templates: Dict[str, Any]) -> Tuple[Dict[str, Any], dict]:
    """Load ``path`` into the structures of ``templates`` (name -> pytree).

    Returns ``(trees, header)``; ``header["meta"]`` is what ``save`` got.
    Raises :class:`CorruptCheckpoint` when the file is unreadable or its
    arrays do not match their digests, and a plain ValueError when the
    checkpoint's layout (leaf count, shapes, dtypes) differs from a template.
    """
    header, groups = read_verified(path)
    out = {}
    for group, template in templates.items():
        if group not in groups:
            raise ValueError(f"checkpoint {path}: has no '{group}' (has {sorted(groups)})")
        leaves, treedef = jax.tree_util.tree_flatten(template)
        got = groups[group]
        if len(got) != len(leaves):
            raise ValueError(f"checkpoint {path}: '{group}' has {len(got)} arrays, the model expects "
                             f"{len(leaves)} (a different model or optimizer?)")
        for (pth, _, _), a, t in zip(header["layout"][group], got, leaves):
            t_shape = np.shape(t)
            t_dtype = np.dtype(t.dtype) if hasattr(t, "dtype") else np.asarray(t).dtype
            if a.shape != t_shape or a.dtype != t_dtype:
                raise ValueError(f"checkpoint {path}: {group}{pth} is {a.dtype}{list(a.shape)}, "
                                 f"expected {t_dtype}{list(t_shape)}")
        out[group] = jax.tree_util.tree_unflatten(treedef, got)
    return out, header


def latest(directory: str) -> Optional[str]:
    """Path of the newest readable checkpoint in ``directory``, or None.

    A checkpoint that fails to read or to match its digests (it should not
    happen: files appear only complete) is skipped in favour of the one
    before it, with a :class:`RecoveryWarning` naming it.
    """
    for step in reversed(list_steps(directory)):
        path = path_for(directory, step)
        try:
            read_verified(path)
        except CorruptCheckpoint as e:
            warnings.warn(f"{e}; skipping it", RecoveryWarning, stacklevel=2)
            continue
        return path
    return None
