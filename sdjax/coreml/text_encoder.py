"""The CLIP text encoder (``sdjax.clip.apply``) as a Core ML ML program.

    from sdjax.coreml import text_encoder
    text_encoder.export(pipe.params["text_encoder"], pipe.configs["text_encoder"],
                        "TextEncoder.mlpackage", compute_precision="float16")

Input ``input_ids`` float32 ``(1, seq_len)`` (token ids as floats: apple/ml-stable-diffusion's
Swift ``TextEncoder`` feeds ``Float32`` ids; the program casts them to int32); outputs ``last_hidden_state`` ``(1, seq_len,
hidden)`` and ``pooled_outputs`` ``(1, hidden)`` (the names apple/ml-stable-diffusion's Swift
package reads). Inside, activations are ``(1, hidden, 1, seq_len)`` with linear layers as 1x1
convs (``sdjax.coreml.mil``). Quantized params (``quant.apply_recipe``) export as constexpr
weights holding sdjax's LUTs/indices or int8 data/scales.

SDXL (``xl=True``): the outputs are ``hidden_embeds`` ``(1, seq_len, hidden)``, the penultimate
hidden state (``hidden_states[-2]`` of ``sdjax.clip.apply``: the output of all layers but the last,
without the final layer norm) and ``pooled_outputs``: for a ``with_projection`` encoder
(text_encoder_2, CLIPTextModelWithProjection) the projected ``text_embeds`` ``(1,
projection_dim)``, else the final-layer-normed EOS state ``(1, hidden)`` (``pooler_output``, which
the Swift pipeline reads but does not use for text_encoder). These are the names and values of
apple/ml-stable-diffusion's XL conversion (``torch2coreml.convert_text_encoder`` with
``xl_version``: ``hidden_states[-2]`` and ``text_embeds`` or ``pooler_output``) and of what
``swift/StableDiffusion/pipeline/TextEncoderXL.swift`` reads (``hidden_embeds``,
``pooled_outputs``; both TextEncoder.mlmodelc and TextEncoder2.mlmodelc are TextEncoderXL there).

The pooled position is ``argmax`` as in ``sdjax.clip.apply`` (first maximal id for legacy
configs with ``eos_token_id == 2``, else the first ``eos_token_id``; 0 when absent), computed
with int32 arithmetic and ``reduce_max`` (key * L + (L - 1 - i) has a unique maximum at the
first maximal key) instead of ``reduce_argmax``, whose tie-breaking Core ML does not document
(and which sdjax.coreml.interp does not evaluate).
"""
from __future__ import annotations

import contextlib
import contextvars
import os

import numpy as np

from ..files import staged_path
from . import mil

MASK_VALUE = -1e4  # finite: -inf scores can give NaN on some Core ML backends; exp underflows to 0 anyway
FP16_PASSES = ["common::add_fp16_cast", "common::const_elimination", "common::cast_optimization",
               "common::dead_code_elimination"]
OPS_PER_FP16_ROUND = 8000  # above this, FP16_PASSES run in rounds over consecutive shares of the ops


def fp16_pass_names(n_ops: int, ops_per_round: int | None = None) -> list:
    """FP16_PASSES for a program of ``n_ops`` top-level ops, in ``ceil(n_ops / ops_per_round)``
    rounds. ``common::add_fp16_cast`` gives each op a cast per float32 input and output and keeps
    the float32 op until the pass ends; the casts meet in fp16->fp32->fp16 pairs that only the
    later ``cast_optimization`` removes, so one round over a full-size SDXL UNet in
    ``split_einsum_v2`` form (~45k ops) held 2.2 GB of transient ops. Round ``i`` of ``k`` converts
    the first ``i/k`` of the ops (those an earlier round converted already have float16 inputs and
    are left alone; a value an earlier round cast to float16 reuses that cast, as one round's cache
    would), each round followed by the three clean-up passes: the same program (tested), a ``k``-th
    of the transient ops. One round is FP16_PASSES itself."""
    per = OPS_PER_FP16_ROUND if ops_per_round is None else int(ops_per_round)
    k = max(1, -(-int(n_ops) // per))
    if k == 1:
        return list(FP16_PASSES)
    return [name for i in range(1, k + 1) for name in [_fp16_share_pass(i, k)] + FP16_PASSES[1:]]


def _fp16_share_pass(i: int, k: int) -> str:
    """The name of a registered ``add_fp16_cast`` that converts only the first ``i/k`` of the main
    function's top-level ops (all of them when ``i == k``) and reuses the float16 casts earlier
    rounds made (registered on first use)."""
    from coremltools.converters.mil.mil.passes.defs.quantization import add_fp16_cast
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    name = f"add_fp16_cast_round_{i}_of_{k}"
    if f"sdjax::{name}" not in PASS_REGISTRY:
        class _Round(add_fp16_cast):
            def apply(self, prog):
                ops = list(prog.functions["main"].operations)
                self._made = {op.name: op.outputs[0] for op in ops
                              if op.op_type == "cast" and op.dtype.val == self.target_dtype}
                if i < k:
                    chosen = {id(op) for op in ops[:len(ops) * i // k]}
                    self.op_selector = lambda op: id(op) in chosen
                super().apply(prog)

            def current_cache_vars(self):
                cache = self._cache_vars[-1]
                if len(self._cache_vars) == 1:  # the main function's block: earlier rounds' casts
                    for n, v in self._made.items():
                        cache.setdefault(n, v)
                return cache

        PASS_REGISTRY.add("sdjax", _Round, override=False, name=name)
    return f"sdjax::{name}"


def opset(target=None):
    """The opset a builder uses for deployment target ``target`` (a ``ct.target``; None: iOS16,
    the first with the constexpr weight ops)."""
    import coremltools as ct
    if target is None:
        return ct.target.iOS16
    if not isinstance(target, ct.target) or target < ct.target.iOS16:
        raise ValueError(f"minimum deployment target {target!r}: the constexpr weight ops need "
                         f"ct.target.iOS16 / macOS13 or later")
    return target


XL_HIDDEN_LAYER = -2  # the hidden state SDXL's text encoders hand the UNet (torch2coreml's hidden_layer)


def build(params, config, seq_len: int = 77, attention: str = "split_einsum_v2", dtype="float32", target=None,
          xl: bool = False):
    """MIL Program computing ``sdjax.clip.apply(params, config, input_ids)``'s last hidden state
    and pooled output for one sequence of ``seq_len`` ids (projected for a ``with_projection``
    config); with ``xl`` the penultimate hidden state ``hidden_embeds`` instead of the last one
    (module docstring).

    dtype: the float type quantization tables (LUTs, int8 scales) are written in: "float32" for
    a float32 export (empty pass pipeline), "float16" for a float16 one (see ``export``).
    target: the ``ct.target`` whose opset the program uses (default iOS16; iOS18 for grouped
    LUTs and per-channel scales, see ``mil.weight``)."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    dtype = mil.tables_dtype(dtype)
    if attention not in mil.ATTENTION_MODES:
        raise ValueError(f"attention {attention!r}; supported: {mil.ATTENTION_MODES}")
    emb = params["embeddings"]
    tok = np.asarray(emb["token_embedding"]["weight"], np.float32)
    pos_table = np.asarray(emb["position_embedding"]["weight"], np.float32)
    if seq_len > pos_table.shape[0]:
        raise ValueError(f"seq_len {seq_len} exceeds the {pos_table.shape[0]} position embeddings")
    eps = config.layer_norm_eps
    n_layers = config.num_hidden_layers
    xl_index = n_layers + 1 + XL_HIDDEN_LAYER  # into sdjax.clip.apply's hidden_states (0: the embeddings)
    if xl and xl_index < 0:
        raise ValueError(f"an XL text encoder outputs hidden_states[{XL_HIDDEN_LAYER}]: {n_layers} layers are too few")
    causal = np.where(np.tril(np.ones((seq_len, seq_len), bool)), 0.0, MASK_VALUE).astype(np.float32)
    mask = causal.T  # mil.attention takes (keys, queries)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, seq_len), dtype=ct.converters.mil.mil.types.fp32)],
                opset_version=opset(target))
    def prog(input_ids):
        # the Swift package feeds token ids as Float32 (TextEncoder.swift); exact up to 2**24
        input_ids = mb.cast(x=input_ids, dtype="int32", name="input_ids_int")
        x = mb.gather(x=tok, indices=input_ids, axis=0, name="tok_emb")            # (1, L, D)
        x = mb.add(x=x, y=pos_table[:seq_len][None], name="emb")
        x = mb.transpose(x=x, perm=[0, 2, 1], name="emb_t")                       # (1, D, L)
        x = mb.expand_dims(x=x, axes=[2], name="emb_bc1s")                         # (1, D, 1, L)
        hidden = None
        for i in range(n_layers):
            if xl and i == xl_index:
                hidden = _bcs_to_bld(x, "hidden_embeds")
            p = params["encoder"]["layers"][str(i)]
            a = p["self_attn"]
            n = f"l{i}"
            h = mil.layer_norm_channels(x, p["layer_norm1"]["weight"], p["layer_norm1"]["bias"], eps, n + "_ln1")
            q, k, v = (mil.linear_as_conv(h, a[m]["weight"], a[m].get("bias"), f"{n}_{m}", dtype)
                       for m in ("q_proj", "k_proj", "v_proj"))
            o = mil.attention(q, k, v, config.num_attention_heads, mask=mask, mode=attention, name=n + "_attn")
            o = mil.linear_as_conv(o, a["out_proj"]["weight"], a["out_proj"].get("bias"), n + "_out_proj", dtype)
            x = mb.add(x=x, y=o, name=n + "_res1")
            h = mil.layer_norm_channels(x, p["layer_norm2"]["weight"], p["layer_norm2"]["bias"], eps, n + "_ln2")
            h = mil.linear_as_conv(h, p["mlp"]["fc1"]["weight"], p["mlp"]["fc1"].get("bias"), n + "_fc1", dtype)
            h = mil.activation(h, config.hidden_act, n + "_act")
            h = mil.linear_as_conv(h, p["mlp"]["fc2"]["weight"], p["mlp"]["fc2"].get("bias"), n + "_fc2", dtype)
            x = mb.add(x=x, y=h, name=n + "_res2")
        fl = params["final_layer_norm"]
        x = mil.layer_norm_channels(x, fl["weight"], fl["bias"], eps, "final_ln")
        last = _bcs_to_bld(x, "last_hidden_state" if not xl else "final_bld")    # (1, L, D)

        # first position of the maximal key, by int32 arithmetic (see the module docstring)
        if config.eos_token_id == 2:
            key = input_ids
        else:  # 1 where id == eos: 1 - min(|id - eos|, 1)
            diff = mb.sub(x=input_ids, y=np.int32(config.eos_token_id), name="eos_diff")
            absd = mb.maximum(x=diff, y=mb.mul(x=diff, y=np.int32(-1), name="eos_neg"), name="eos_abs")
            key = mb.sub(x=np.int32(1), y=mb.minimum(x=absd, y=np.int32(1), name="eos_ne"), name="eos_eq")
        rev = np.arange(seq_len - 1, -1, -1, dtype=np.int32)[None]                 # L - 1 - i
        score = mb.add(x=mb.mul(x=key, y=np.int32(seq_len), name="key_l"), y=rev, name="pool_score")
        best = mb.reduce_max(x=score, axes=[1], keep_dims=False, name="pool_best")       # (1,)
        top = mb.reduce_max(x=key, axes=[1], keep_dims=False, name="pool_key")           # (1,)
        off = mb.sub(x=best, y=mb.mul(x=top, y=np.int32(seq_len), name="pool_key_l"), name="pool_off")
        pos = mb.sub(x=np.int32(seq_len - 1), y=off, name="pool_pos")                   # (1,)
        if not config.with_projection:
            pooled = mb.gather(x=last, indices=pos, axis=1, batch_dims=1, name="pooled_outputs")  # (1, D)
        else:  # CLIPTextModelWithProjection's text_embeds: text_projection (no bias) of the pooled state
            pooled = mb.gather(x=last, indices=pos, axis=1, batch_dims=1, name="pooled_state")
            d = int(pooled.shape[-1])
            pooled = mb.reshape(x=pooled, shape=[1, d, 1, 1], name="pooled_bc11")
            pooled = mil.linear_as_conv(pooled, params["text_projection"]["weight"], None, "text_projection", dtype)
            pooled = mb.reshape(x=pooled, shape=[1, config.projection_dim], name="pooled_outputs")  # (1, P)
        return (hidden if xl else last), pooled

    return prog


def _bcs_to_bld(x, name):
    """``(1, D, 1, L)`` -> ``(1, L, D)``, the last op named ``name``."""
    from coremltools.converters.mil import Builder as mb
    x = mb.squeeze(x=x, axes=[2], name=name + "_bdl")
    return mb.transpose(x=x, perm=[0, 2, 1], name=name)


def convert(prog, compute_precision="float32", minimum_deployment_target=None):
    """``ct.convert`` of ``prog`` with the pass pipeline sdjax.coreml.interp documents: empty
    for float32, the four fp16 passes for float16 (in rounds for big programs: ``fp16_pass_names``).

    The passes change ``prog`` in place, so convert a freshly built program each time
    (``copy.deepcopy`` of a whole encoder overflows Python's recursion limit)."""
    import coremltools as ct

    target = minimum_deployment_target or ct.target.iOS16
    if compute_precision == "float32":
        precision, pipeline = ct.precision.FLOAT32, ct.PassPipeline.EMPTY
    elif compute_precision == "float16":
        precision = ct.precision.FLOAT16
        n_ops = sum(len(f.operations) for f in prog.functions.values())
        pipeline = ct.PassPipeline(pass_names=fp16_pass_names(n_ops), pipeline_name="fp16")
    else:
        raise ValueError(f"compute_precision must be 'float32' or 'float16', got {compute_precision!r}")
    # skip_model_load: the package is only saved here; on a Mac, loading would compile it for the
    # device first (minutes and gigabytes for a full-size UNet)
    return ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=target,
                      compute_precision=precision, pass_pipeline=pipeline, skip_model_load=True)


def save_atomically(model, path, overwrite=False):
    """Save an MLModel to ``path`` (an .mlpackage) whole or not at all (``sdjax.files.staged_path``)."""
    with staged_path(path, overwrite) as staged:
        model.save(staged)
    return os.path.abspath(os.fspath(path))


def export(params, config, path, compute_precision="float32", minimum_deployment_target=None,
           overwrite=False, seq_len: int = 77, attention: str = "split_einsum_v2", xl: bool = False):
    """Build, convert and save the text encoder to ``path`` (an .mlpackage); returns the path.
    ``xl``: SDXL's outputs (``hidden_embeds``, ``pooled_outputs``; see ``build``).

    minimum_deployment_target: a ``ct.target`` (default iOS16, what the constexpr weight ops
    need). Refuses an existing ``path`` unless ``overwrite``; never leaves a half-written package
    at ``path``."""
    return export_program(lambda tables, target: build(params, config, seq_len=seq_len, attention=attention, dtype=tables,
                                                       target=target, xl=xl),
                          path, compute_precision, minimum_deployment_target, overwrite)


_PHASE_HOOK = contextvars.ContextVar("sdjax_coreml_phase_hook", default=None)


@contextlib.contextmanager
def phase_hook(fn):
    """Within the block, every ``export_program`` calls ``fn(package path, phase)`` as it starts
    each phase: "build" (the MIL program), "convert" (``ct.convert``), "save" (``sdjax export-coreml``'s
    progress bar shows them)."""
    token = _PHASE_HOOK.set(fn)
    try:
        yield
    finally:
        _PHASE_HOOK.reset(token)


def _phase(path, name):
    fn = _PHASE_HOOK.get()
    if fn is not None:
        fn(path, name)


def export_program(build_fn, path, compute_precision="float32", minimum_deployment_target=None, overwrite=False):
    """``build_fn(tables dtype, target) -> Program``, converted and saved atomically to ``path``; an
    existing ``path`` is refused unless ``overwrite``. Shared by every component's export."""
    path = os.fspath(path)
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    tables = "float16" if compute_precision == "float16" else "float32"
    target = opset(minimum_deployment_target)
    _phase(path, "build")
    prog = build_fn(tables, target)
    _phase(path, "convert")
    model = convert(prog, compute_precision, target)
    del prog
    _phase(path, "save")
    return save_atomically(model, path, overwrite=overwrite)
