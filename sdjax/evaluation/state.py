"""OUT/state/ of ``sdjax eval``: the resumable store, the folder's manifest, and the refusal type."""
from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np

from sdjax import nn
from sdjax.files import Store, StoreError


class EvalError(StoreError):
    """A bad evaluation request or output folder (names the argument, file or setting)."""

def fingerprint(params):
    """A hash of every array of ``params`` (names, shapes, dtypes, bytes)."""
    h = hashlib.sha256()
    for comp in sorted(params):
        for k, v in sorted(nn.flatten(params[comp]).items()):
            a = np.asarray(v)
            h.update(f"{comp}/{k}/{a.shape}/{a.dtype}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]

def _safe(name):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)

class State(Store):
    """OUT/state/: what a rerun reuses."""
    error = EvalError

    def __init__(self, out_dir, writer=True):
        # writer=False (every process but the first under jax.distributed): reads, never writes
        super().__init__(os.path.join(out_dir, "state"), writer)
        if writer:
            os.makedirs(self.path("recipes"), exist_ok=True)

def _check_manifest(state, manifest, out_dir):
    old = state.read("manifest.json")
    if old is None:
        state.write(manifest, "manifest.json")
        return
    for key, what in (("fingerprint", "model"), ("settings", "prompt/seed/sampler settings"),
                      ("mixed", "mixed-bit candidate settings")):
        if old.get(key) != manifest.get(key):
            raise EvalError(f"{out_dir} holds an evaluation of another {what} ({key} differs: "
                            f"{json.dumps(old.get(key))[:200]} vs {json.dumps(manifest.get(key))[:200]}); "
                            f"use another output folder or delete {out_dir}")
