"""Rewrite a traced sdjax function into primitives OpenVINO's JAX frontend converts.

OpenVINO 2026.4's JAX frontend (``openvino.convert_model(closed_jaxpr)``) converts a flat jaxpr of
basic primitives. It has no rule for nested ``jit`` (every ``jnp.where``, ``jnp.clip``, ``jnp.pad``,
``jax.nn.silu`` is one), ``custom_jvp_call``/``custom_vjp_call``, ``split``, ``scan``/``while``,
``min``, ``clamp``, ``dynamic_slice``/``dynamic_update_slice``, nor ``sin``/``cos``/``iota``
(probed one primitive at a time; ``max``, ``exp``, ``erf``, ``logistic``, ``tanh``, ``dot_general``,
``conv_general_dilated``, ``reduce_max``/``reduce_sum``, ``concatenate``, ``select_n`` convert).

``flatten(closed_jaxpr)`` re-traces the jaxpr through an evaluator (``jax.make_jaxpr`` over a
function that walks the equations) with these rules:

- ``jit``/``pjit``/``closed_call``/``custom_jvp_call``/``custom_vjp_call``/``checkpoint``: the
  inner jaxpr is evaluated in place (inlined); a forward pass does not need the custom rules.
- ``split``: one ``slice`` per piece.
- ``min(a, b)`` -> ``-max(-a, -b)``; ``clamp(lo, x, hi)`` -> ``min(max(x, lo), hi)`` (negation is
  exact, so the values are the same bits).
- ``scan`` (what ``fori_loop`` with static bounds becomes): unrolled. Scalar operations on
  concrete values (a loop counter) are computed at trace time, so ``dynamic_slice`` and
  ``dynamic_update_slice`` at a concrete index become ``slice`` and ``concatenate``. A ``while``
  whose trip count is not static cannot be unrolled: a ValueError says so.

Every rewrite keeps the values bit for bit: the rewritten jaxpr, run by JAX, gives the same bits
as the original (tests/sdjax/ov_backend/test_openvino_backend.py checks it).

``split_host(closed_jaxpr, host_argnums)`` cuts off the part of a flat jaxpr that depends only on
the given inputs (the UNet's timestep embedding: ``iota``, ``exp``, ``sin``, ``cos`` of ``t``) into a
prefix that JAX runs; its results become extra inputs of the part OpenVINO runs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax import lax
from jax.extend import core as jcore

_INLINE = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
           "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
           "custom_vjp_call_jaxpr": "fun_jaxpr", "checkpoint": "jaxpr", "remat": "jaxpr"}
_FOLD_MAX_SIZE = 16  # concrete operands up to this many elements are computed at trace time


def _is_concrete(v):
    return not isinstance(v, jax.core.Tracer)


def _jaxpr_and_consts(j):
    """(open jaxpr, consts) of a ClosedJaxpr or an open Jaxpr."""
    if hasattr(j, "consts"):
        return j.jaxpr, j.consts
    return j, ()


def eval_jaxpr(jaxpr, consts, *args):
    """Evaluate an open ``jaxpr`` with the rewriting rules (call it under ``jax.make_jaxpr``)."""
    env = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, a in zip(jaxpr.constvars, consts):
        env[v] = a
    for v, a in zip(jaxpr.invars, args):
        env[v] = a
    for eqn in jaxpr.eqns:
        outs = _eval_eqn(eqn, [read(v) for v in eqn.invars])
        for v, o in zip(eqn.outvars, outs):
            if not isinstance(v, jcore.DropVar):
                env[v] = o
    return [read(v) for v in jaxpr.outvars]


def _eval_eqn(eqn, invals):
    name = eqn.primitive.name
    if name in _INLINE:
        inner = eqn.params.get(_INLINE[name])
        if inner is None:
            raise ValueError(f"cannot inline {name}: no {_INLINE[name]!r} parameter")
        j, consts = _jaxpr_and_consts(inner)
        return eval_jaxpr(j, consts, *invals)
    rule = _RULES.get(name)
    if rule is not None:
        outs = rule(eqn, invals)
        return outs if eqn.primitive.multiple_results else [outs]
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns, params = params if isinstance(params, tuple) else ((), params)  # jax < 0.9: (subfuns, params)
    if (not subfuns and invals and all(_is_concrete(v) and np.size(v) <= _FOLD_MAX_SIZE for v in invals)):
        with jax.ensure_compile_time_eval():
            outs = eqn.primitive.bind(*invals, **params)
    else:
        outs = eqn.primitive.bind(*subfuns, *invals, **params)
    return outs if eqn.primitive.multiple_results else [outs]


def _split(eqn, invals):
    (x,) = invals
    axis, start, outs = eqn.params["axis"], 0, []
    for size in eqn.params["sizes"]:
        outs.append(lax.slice_in_dim(x, start, start + int(size), axis=axis))
        start += int(size)
    return outs


def _min(a, b):
    return lax.neg(lax.max(lax.neg(a), lax.neg(b)))


def _clamp(eqn, invals):
    lo, x, hi = invals
    lo = jnp.broadcast_to(jnp.asarray(lo, x.dtype), x.shape) if np.ndim(lo) != np.ndim(x) else lo
    hi = jnp.broadcast_to(jnp.asarray(hi, x.dtype), x.shape) if np.ndim(hi) != np.ndim(x) else hi
    return _min(lax.max(x, lo), hi)


def _concrete_index(idx, name):
    if not all(_is_concrete(i) for i in idx):
        raise ValueError(f"{name} at an index computed from the inputs cannot be converted for "
                         "OpenVINO (its index must be static after unrolling)")
    return [int(np.asarray(i)) for i in idx]


def _dynamic_slice(eqn, invals):
    x, *idx = invals
    sizes = eqn.params["slice_sizes"]
    # JAX clamps start indices into range
    start = [min(max(i, 0), d - s) for i, d, s in zip(_concrete_index(idx, "dynamic_slice"), x.shape, sizes)]
    return lax.slice(x, start, [s + n for s, n in zip(start, sizes)])


def _dynamic_update_slice(eqn, invals):
    x, upd, *idx = invals
    start = [min(max(i, 0), d - s) for i, d, s in
             zip(_concrete_index(idx, "dynamic_update_slice"), x.shape, upd.shape)]
    return _place(x, upd.astype(x.dtype), start, 0)


def _place(x, upd, start, axis):
    """``x`` with ``upd`` written at ``start``: [before | update | after] along each axis."""
    if axis == x.ndim:
        return upd
    s, n, d = start[axis], upd.shape[axis], x.shape[axis]
    inner = _place(lax.slice_in_dim(x, s, s + n, axis=axis) if n < d else x, upd, start, axis + 1)
    parts = ([lax.slice_in_dim(x, 0, s, axis=axis)] if s > 0 else []) + [inner]
    if s + n < d:
        parts.append(lax.slice_in_dim(x, s + n, d, axis=axis))
    return lax.concatenate(parts, axis) if len(parts) > 1 else inner


def _scan(eqn, invals):
    p = eqn.params
    body, consts = _jaxpr_and_consts(p["jaxpr"])
    nc, ncar = p["num_consts"], p["num_carry"]
    loop_consts, carry, xs = invals[:nc], list(invals[nc:nc + ncar]), invals[nc + ncar:]
    steps = range(p["length"] - 1, -1, -1) if p["reverse"] else range(p["length"])
    ys = []
    for i in steps:
        x_i = [lax.index_in_dim(x, i, keepdims=False) for x in xs]
        outs = eval_jaxpr(body, consts, *loop_consts, *carry, *x_i)
        carry, y = list(outs[:ncar]), outs[ncar:]
        ys.append(y)
    if p["reverse"]:
        ys.reverse()
    n_ys = len(body.outvars) - ncar
    stacked = []
    for k in range(n_ys):
        parts = [lax.broadcast_in_dim(y[k], (1,) + tuple(np.shape(y[k])), tuple(range(1, np.ndim(y[k]) + 1)))
                 for y in ys]
        stacked.append(lax.concatenate(parts, 0) if parts else None)
    return carry + stacked


def _pad(eqn, invals):
    """``pad`` without interior padding as slices (negative edges) and concatenations."""
    x, value = invals
    cfg = eqn.params["padding_config"]
    if any(int(i) != 0 for _, _, i in cfg):
        return eqn.primitive.bind(x, value, **eqn.params)
    for axis, (lo, hi, _) in enumerate(cfg):
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi < 0:
            x = lax.slice_in_dim(x, max(0, -lo), x.shape[axis] - max(0, -hi), axis=axis)
        parts = []
        for n in (max(lo, 0), max(hi, 0)):
            shape = list(x.shape)
            shape[axis] = n
            parts.append(lax.broadcast_in_dim(jnp.asarray(value, x.dtype), shape, ()) if n else None)
        if parts[0] is not None or parts[1] is not None:
            x = lax.concatenate([p for p in (parts[0], x, parts[1]) if p is not None], axis)
    return x


def _select_n(eqn, invals):
    """``select_n`` of scalars on shape (1,) (the frontend's rule fails on rank 0)."""
    if all(np.ndim(v) == 0 for v in invals) and not all(_is_concrete(v) for v in invals):
        ones = [lax.reshape(jnp.asarray(v), (1,)) for v in invals]
        return lax.reshape(lax.select_n(*ones), ())
    if all(_is_concrete(v) and np.size(v) <= _FOLD_MAX_SIZE for v in invals):
        with jax.ensure_compile_time_eval():
            return lax.select_n(*invals)
    return lax.select_n(*invals)


def _while(eqn, invals):
    raise ValueError("a while loop whose trip count is not static cannot be unrolled for OpenVINO; "
                     "use lax.fori_loop with Python-int bounds (it becomes a scan)")


_RULES = {
    "split": _split,
    "min": lambda eqn, v: _min(*v),
    "clamp": _clamp,
    "dynamic_slice": _dynamic_slice,
    "dynamic_update_slice": _dynamic_update_slice,
    "scan": _scan,
    "pad": _pad,
    "select_n": _select_n,
    "while": _while,
}


def flatten(closed):
    """The ClosedJaxpr ``closed`` rewritten as described in the module docstring."""
    avals = [v.aval for v in closed.jaxpr.invars]
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals]
    return jax.make_jaxpr(lambda *xs: eval_jaxpr(closed.jaxpr, closed.consts, *xs))(*args)


def primitives(closed):
    """The set of primitive names in ``closed`` (nested jaxprs included)."""
    out = set()

    def walk(j):
        for eqn in j.eqns:
            out.add(eqn.primitive.name)
            for v in eqn.params.values():
                for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                    if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
                        walk(sub.jaxpr if hasattr(sub, "jaxpr") else sub)
    walk(closed.jaxpr)
    return out


def split_host(closed, host_argnums):
    """Cut a flat jaxpr into a JAX prefix over the inputs ``host_argnums`` and the rest.

    An equation is in the prefix when each of its non-literal inputs is a host input or a prefix
    result, and it has at least one (or none at all: ``iota``). Returns ``(prefix, main,
    device_argnums)``: ``prefix(*host_args)`` -> the prefix results the rest needs (a jitted JAX
    function), ``main`` the ClosedJaxpr of the rest, taking the inputs not in ``host_argnums`` (in
    order, ``device_argnums``) followed by the prefix results."""
    j = closed.jaxpr
    host_in = [j.invars[i] for i in host_argnums]
    host = set(host_in)
    host_eqns = []
    for eqn in j.eqns:
        vars_in = [v for v in eqn.invars if not isinstance(v, jcore.Literal)]
        if all(v in host for v in vars_in) and (vars_in or not eqn.invars):
            host_eqns.append(eqn)
            host.update(eqn.outvars)
    host_eqn_ids = {id(e) for e in host_eqns}
    main_eqns = [e for e in j.eqns if id(e) not in host_eqn_ids]
    boundary, seen = [], set()
    for v in [v for e in main_eqns for v in e.invars] + list(j.outvars):
        if not isinstance(v, jcore.Literal) and v in host and v not in seen and v not in host_in:
            boundary.append(v)
            seen.add(v)
    device_argnums = [i for i in range(len(j.invars)) if i not in host_argnums]
    # host inputs that the rest reads directly pass through as prefix results too
    boundary += [v for v in host_in if any(v in e.invars for e in main_eqns) or v in j.outvars]

    def prefix(*host_args):
        env = dict(zip(host_in, host_args))

        def read(v):
            return v.val if isinstance(v, jcore.Literal) else env[v]
        for eqn in host_eqns:
            for v, o in zip(eqn.outvars, _eval_eqn(eqn, [read(v) for v in eqn.invars])):
                env[v] = o
        return [env[v] for v in boundary]

    def rest(*args):
        env = dict(zip(j.constvars, closed.consts))
        env.update(zip([j.invars[i] for i in device_argnums] + boundary, args))

        def read(v):
            return v.val if isinstance(v, jcore.Literal) else env[v]
        for eqn in main_eqns:
            for v, o in zip(eqn.outvars, _eval_eqn(eqn, [read(v) for v in eqn.invars])):
                env[v] = o
        return [read(v) for v in j.outvars]

    avals = [j.invars[i].aval for i in device_argnums] + [v.aval for v in boundary]
    main = jax.make_jaxpr(rest)(*[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals])
    return jax.jit(prefix), main, device_argnums
