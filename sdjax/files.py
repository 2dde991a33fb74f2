"""Files written whole or not at all, and the resumable store of long jobs.

Every writer goes to a temporary name in the same folder (``<name>.tmp-<pid>``), flushes and
fsyncs, then ``os.replace``s it onto the name, so a run killed midway leaves each file either old
or complete, never half-written; the temporary is removed when the writer raises. Folders are
built under a temporary name and renamed (``atomic_folder``).

JSON: non-finite floats are written as Python's ``json`` writes them (``Infinity``, ``NaN``), which
``json.load`` reads back; numpy scalars and arrays become numbers and lists.

``Store``: a folder of JSON records and ``.npz`` arrays that a rerun reads back (``sdjax eval``'s
state, ``sdjax export-coreml``'s interrupted export), refusing records made under other settings.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

import numpy as np


def _tmp_name(path):
    return f"{path}.tmp-{os.getpid()}"


def atomic_write(path, write, mode="wb"):
    """Call ``write(file)`` on a temporary file and move it onto ``path``. Returns ``path``."""
    path = os.fspath(path)
    tmp = _tmp_name(path)
    try:
        with open(tmp, mode, **({"encoding": "utf-8", "newline": "\n"} if "b" not in mode else {})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_text(path, text):
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(text), mode="w")


def json_default(obj):
    """numpy / jax scalars and arrays -> Python numbers and lists; anything else is an error."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray) or (hasattr(obj, "__array__") and hasattr(obj, "shape")):
        return np.asarray(obj).tolist()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def atomic_write_json(path, obj, indent=1):
    """Write ``obj`` as JSON to ``path`` atomically (see the module docstring for values)."""
    def write(f):
        json.dump(obj, f, indent=indent, allow_nan=True, default=json_default)
        f.write("\n")
    return atomic_write(path, write, mode="w")


def atomic_save_figure(fig, path, dpi=100):
    """Save a matplotlib figure as PNG to ``path`` atomically."""
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))


def atomic_save_image(image, path, **save_kwargs):
    """Save a PIL image as PNG to ``path`` atomically (``save_kwargs``: e.g. ``pnginfo``)."""
    return atomic_write(path, lambda f: image.save(f, format="PNG", **save_kwargs))


def atomic_save_npy(path, array):
    """Write one array as ``.npy`` atomically."""
    return atomic_write(path, lambda f: np.save(f, np.asarray(array)))


def atomic_save_npz(path, arrays):
    """Write ``{name: array}`` as ``.npz`` atomically."""
    return atomic_write(path, lambda f: np.savez(f, **arrays))


@contextlib.contextmanager
def staged_path(path, overwrite=False):
    """``with staged_path(out) as p:`` create ``p`` (a file or a folder; it has ``out``'s base name, in
    a temporary folder beside ``out``); on success it replaces ``out`` (an existing ``out`` only with
    ``overwrite``: FileExistsError otherwise); on error nothing of it stays."""
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path}: already exists (pass overwrite=True to replace it)")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    try:
        staged = os.path.join(tmp, os.path.basename(path))
        yield staged
        if os.path.lexists(path):  # move the old one aside first; it goes with the temporary folder
            os.rename(path, os.path.join(tmp, "old"))
        os.rename(staged, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(path, overwrite=False):
    """``with atomic_folder(out) as tmp:`` fill the folder ``tmp``; on success it replaces ``out`` (an
    existing ``out`` only with ``overwrite``: FileExistsError otherwise); on error it is removed."""
    with staged_path(path, overwrite) as staged:
        os.makedirs(staged)
        yield staged


def replace_folder(src, dst):
    """Move the folder ``src`` onto ``dst``, an existing ``dst`` moved aside first and then removed."""
    if os.path.lexists(dst):
        old = _tmp_name(dst) + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
        os.rename(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(src, dst)


class StoreError(ValueError):
    """A record of a store is unreadable or was made under other settings (names the file)."""


class Store:
    """A folder of JSON records and ``.npz`` arrays that a rerun reads back.

    ``writer=False`` (every process but the first under ``jax.distributed``) reads and never writes.
    Every file is written atomically; a record written after its arrays marks them complete.
    ``error``: the exception type raised for unreadable or mismatched records."""
    error = StoreError

    def __init__(self, folder, writer=True):
        self.dir, self.writer = os.fspath(folder), writer
        if writer:
            os.makedirs(self.dir, exist_ok=True)

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    def read(self, *parts):
        """The JSON record, or None when it does not exist."""
        try:
            with open(self.path(*parts), encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except ValueError as e:
            raise self.error(f"{self.path(*parts)}: unreadable ({e}); delete it to recompute") from None

    def write(self, obj, *parts):
        if self.writer:
            path = self.path(*parts)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write_json(path, obj)

    def save_arrays(self, arrays, *parts):
        if self.writer:
            path = self.path(*parts)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_save_npz(path, arrays)

    def load_arrays(self, *parts):
        try:
            with np.load(self.path(*parts)) as z:
                return {k: z[k] for k in z.files}
        except FileNotFoundError:
            return None

    def check_settings(self, record, settings, what, remedy=None):
        """Compare the JSON ``record`` with ``settings``: write it when missing; raise StoreError
        naming the fields that differ when it holds other settings. Returns True when it existed."""
        old = self.read(record)
        if old is None:
            self.write(settings, record)
            return False
        if old != settings:
            diff = sorted(k for k in set(settings) | set(old) if old.get(k) != settings.get(k))
            raise self.error(f"{self.path(record)}: {what} ({', '.join(diff)} differ); "
                             f"{remedy or f'use another folder or delete {self.dir}'}")
        return True

    def load_recorded(self, record, arrays, meta, what):
        """The arrays saved in ``arrays`` when the JSON ``record`` beside them holds ``meta`` (None when
        either is missing). A record of other settings is refused, naming the fields that differ: what
        was derived from those arrays is stale too, so the whole store goes."""
        old = self.read(record)
        if old is None:
            return None
        if old != meta:
            diff = sorted(k for k in meta if old.get(k) != meta[k])
            raise self.error(f"{self.path(record)}: {what} ({', '.join(diff)} differ); use another output folder "
                             f"or delete {self.dir}")
        return self.load_arrays(arrays)

    def save_recorded(self, record, arrays, meta, values):
        """Save ``values`` as ``arrays`` and then ``meta`` as ``record``, whose presence marks them done."""
        self.save_arrays(values, arrays)
        self.write(meta, record)
