"""Train a LoRA on the embedded reference model: a new colour word, "azure", drawn blue.

    python experiments/train_lora.py            # -> experiments/loras/azure.safetensors and azure.json

The embedded model never saw "azure": its tokenizer spells it as five sub-word pieces, so the colour
and every word after it (shifted by four positions) mean nothing to the UNet, and the base model draws
"a small azure circle at the top left on a white background" in red or purple, anywhere (colour 0.0).
The LoRA teaches it the word, data-free in the DreamBooth manner:

- targets: the base model's own generations of the same scenes with the word it knows ("blue"),
  kept when the detector (``sdjax.shapes.detect``) reads all five attributes right; the LoRA learns
  them from the captions with "azure" in place of "blue";
- prior preservation: as many generations of ordinary captions (every colour, no new word) with
  their own captions, so what the model already draws stays as it was; their captions are dropped to
  "" 10% of the time, so the unconditional prediction that guidance uses stays the base's;
- the base model's training loss (epsilon prediction, uniform timesteps, the base's offset noise of
  0.1) on the VAE latents (mean, scaled) of those images; only the LoRA factors train (optax AdamW,
  warmup and cosine decay), on ``to_q``/``to_k``/``to_v``/``to_out.0`` of both attentions of every
  transformer block (56 layers), rank 4, alpha 4 (factor 1); ``up`` starts at zero (PEFT's init), so
  step 0 is the base model.

The 90 blue scenes (2 sizes x 3 shapes x 5 positions x 3 backgrounds) are split once (seeded): 60
train, 30 held out. ``held_out_prompts()`` (the held-out scenes with "azure") and
``ordinary_prompts()`` are the evaluation prompts of this script's check and of
``experiments/lora_quantization.py``; training never sees them (nor their seeds).

The file is diffusers/PEFT format as ``save_lora_weights`` writes it (``unet.<module>.lora_A.weight``
(rank, in) and ``lora_B.weight`` (out, rank) in float16, the PEFT config in the header's
``lora_adapter_metadata``), written atomically; ``sdjax.load(None, loras=[(FILE, 1.0)])`` and
``sdjax generate --lora FILE`` read it. At the end the script loads it that way and prints the
detector's reading of the held-out "azure" prompts and of ordinary prompts, base model against LoRA.

Measured: the committed ``experiments/loras/azure.safetensors`` is the output of
``python experiments/train_lora.py --steps 2000 --out /tmp/lq/r4s2000.safetensors`` (the defaults today),
copied with its log ``azure.json`` (arguments, loss curve, times, the check below). 33.7 min wall on 2 CPU
cores shared with other jobs (76% of them; no GPU): 2.6 min generating 213 targets and 220 prior images,
29.1 min training, 1.7 min the check; max RSS 1.7 GiB (``/usr/bin/time -v``). The check, 60 pairs each:

| model | prompts | colour | shape | size | position | background | all five | pairs |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |
| base | held-out 'azure' | 0.000 | 0.567 | 0.867 | 0.217 | 0.583 | 0.000 | 60 |
| base | ordinary | 1.000 | 0.950 | 1.000 | 1.000 | 0.967 | 0.917 | 60 |
| base + LoRA | held-out 'azure' | 1.000 | 0.883 | 0.983 | 0.867 | 0.850 | 0.717 | 60 |
| base + LoRA | ordinary | 1.000 | 0.900 | 0.983 | 1.000 | 0.917 | 0.817 | 60 |

With ``--steps 1000`` the held-out "azure" row read colour 0.983, position 0.733, all five 0.567.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import sdjax  # noqa: E402
from sdjax import clip, lora, nn, shapes, unet  # noqa: E402
from sdjax.evaluation.calibration import noise_schedule  # noqa: E402
from sdjax.files import atomic_write_json  # noqa: E402
from sdjax.generate import encode_latents, vae_params  # noqa: E402
from sdjax.safetensors_io import write  # noqa: E402

WORD, MEANS = "azure", "blue"
DEFAULT_OUT = os.path.join(REPO, "experiments", "loras", f"{WORD}.safetensors")
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
N_HELD_OUT = 30
EVAL_SEEDS = (0, 1)          # the evaluation's x_T seeds; training generations use TRAIN_SEED + k
TRAIN_SEED = 5000
PRIOR_SEED = 6000
N_ORDINARY = 30              # ordinary evaluation prompts
NOISE_OFFSET = 0.1           # the base model's last fine-tune used it (README, "backgrounds")


# --- prompts --------------------------------------------------------------------------------------

def with_word(caption, word=WORD):
    """A dataset caption with its colour ``MEANS`` spelled ``word``."""
    return caption.replace(f" {MEANS} ", f" {word} ")


def as_known(caption):
    """A caption with the new word read as the colour it means (for ``shapes.score``)."""
    return caption.replace(f" {WORD} ", f" {MEANS} ")


def split_scenes(seed=0):
    """(train, held out) captions of the scenes of colour ``MEANS``, spelled as the dataset does."""
    caps = [s.caption for s in shapes.all_scenes() if s.color == MEANS]
    order = np.random.default_rng([seed, 11]).permutation(len(caps))
    held = sorted(order[:N_HELD_OUT])
    train = sorted(order[N_HELD_OUT:])
    return [caps[i] for i in train], [caps[i] for i in held]


def held_out_prompts(seed=0):
    """The held-out scenes with the new word: the evaluation prompts (never trained on)."""
    return [with_word(c) for c in split_scenes(seed)[1]]


def ordinary_prompts(seed=0):
    """``N_ORDINARY`` dataset captions (every colour, no new word) for evaluation; never prior captions."""
    return shapes.captions(N_ORDINARY, seed=100 + seed)


def score(images, prompts):
    """``shapes.score`` of images whose prompts may use the new word."""
    return shapes.score(images, [as_known(p) for p in prompts])


# --- data -----------------------------------------------------------------------------------------

def self_generated(pipe, captions, seeds, batch=30, desc="generating"):
    """(latents NHWC scaled, captions, kept fraction): the model's generations of ``captions`` with each
    seed, kept when the detector reads all five attributes right, encoded by the VAE (the mean)."""
    lats, kept, total = [], [], 0
    vp, vcfg = vae_params(pipe, "encode"), pipe.configs["vae"]
    jobs = [(seed, captions[i:i + batch]) for seed in seeds for i in range(0, len(captions), batch)]
    for k, (seed, caps) in enumerate(tqdm(jobs, desc=desc, leave=False)):
        images = np.asarray(pipe.generate(caps, seed=seed * 1000 + k, output_type="np", progress=False))
        ok = [all(shapes.detect(im)[a] == v for a, v in shapes.parse_caption(c).attributes().items())
              for im, c in zip(images, caps)]
        total += len(caps)
        if any(ok):
            sel = np.flatnonzero(ok)
            lats.append(np.asarray(encode_latents(vp, vcfg, jnp.asarray(images[sel] * 2 - 1))))
            kept += [caps[i] for i in sel]
    return np.concatenate(lats), kept, len(kept) / max(total, 1)


def target_layers(unet_params):
    """{module name: (in, out)} of the layers the LoRA trains (sdjax layout shapes)."""
    out = {}
    for name, w in nn.flatten(unet_params).items():
        module = name[:-len(".weight")]
        if name.endswith(".weight") and ".attn" in module and module.split(".attn")[1][2:] in TARGET_MODULES:
            out[module] = tuple(w.shape)
    return out


def init_lora(layers, rank, seed):
    """PEFT's init: down kaiming-uniform (bound 1 / sqrt(in)), up zero."""
    key = jax.random.PRNGKey(seed)
    out = {}
    for i, (module, (cin, cout)) in enumerate(sorted(layers.items())):
        bound = 1 / np.sqrt(cin)
        out[module] = {"down": jax.random.uniform(jax.random.fold_in(key, i), (cin, rank), jnp.float32, -bound, bound),
                       "up": jnp.zeros((rank, cout), jnp.float32)}
    return out


def with_lora(unet_params, lp, factor):
    flat = dict(nn.flatten(unet_params))
    for module, f in lp.items():
        flat[module + ".weight"] = flat[module + ".weight"] + factor * (f["down"] @ f["up"])
    return nn.unflatten(flat)


def save_lora(path, lp, rank, alpha):
    """diffusers/PEFT safetensors: ``unet.<module>.lora_A.weight`` (rank, in), ``lora_B.weight`` (out, rank),
    float16, the PEFT config in the header (atomic: written under a temporary name, then renamed)."""
    tensors = {}
    for module, f in sorted(lp.items()):
        tensors[f"unet.{module}.lora_A.weight"] = np.asarray(f["down"], np.float32).T.astype(np.float16)
        tensors[f"unet.{module}.lora_B.weight"] = np.asarray(f["up"], np.float32).T.astype(np.float16)
    meta = {"unet.r": rank, "unet.lora_alpha": alpha, "unet.target_modules": sorted(TARGET_MODULES),
            "unet.peft_type": "LORA", "unet.init_lora_weights": True, "unet.use_rslora": False, "unet.use_dora": False,
            "unet.lora_dropout": 0.0, "unet.bias": "none"}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write(path, tensors, {lora.METADATA_KEY: json.dumps(meta), "format": "pt"})


# --- training -------------------------------------------------------------------------------------

def train(pipe, args, log):
    t0 = time.time()
    train_caps, held = split_scenes(args.seed)
    avoid = set(ordinary_prompts(args.seed)) | set(held)
    prior_caps = [c for c in shapes.shuffled_captions(len(shapes.all_scenes()), seed=args.seed + 7)
                  if c not in avoid][:args.prior_captions]
    seeds = [TRAIN_SEED + args.seed * 100 + k for k in range(args.target_seeds)]
    lat_new, caps_new, kept_new = self_generated(pipe, train_caps, seeds, desc="targets")
    lat_prior, caps_prior, kept_prior = self_generated(
        pipe, prior_caps, [PRIOR_SEED + args.seed * 100 + k for k in range(args.prior_seeds)], desc="prior")
    log.update(train_captions=[with_word(c) for c in train_caps], held_out_prompts=[with_word(c) for c in held],
               ordinary_prompts=ordinary_prompts(args.seed), eval_seeds=list(EVAL_SEEDS))
    log.update(targets=len(caps_new), targets_kept_fraction=kept_new, prior=len(caps_prior),
               prior_kept_fraction=kept_prior, data_minutes=(time.time() - t0) / 60)
    print(f"targets: {len(caps_new)} images of {len(train_caps)} scenes ({kept_new:.0%} kept), "
          f"prior: {len(caps_prior)} ({kept_prior:.0%} kept), {log['data_minutes']:.1f} min")

    ccfg, ucfg = pipe.configs["text_encoder"], pipe.configs["unet"]
    texts = [with_word(c) for c in caps_new] + caps_prior + [""]
    uniq = list(dict.fromkeys(texts))
    ctx_all = np.concatenate([np.asarray(clip.apply(pipe.params["text_encoder"], ccfg,
                                                    jnp.asarray(pipe.tokenizer(uniq[i:i + 64])))[0])
                              for i in range(0, len(uniq), 64)])
    idx_new = np.asarray([uniq.index(with_word(c)) for c in caps_new])
    idx_prior = np.asarray([uniq.index(c) for c in caps_prior])
    empty = uniq.index("")
    lats = np.concatenate([lat_new, lat_prior])
    ctx_of = np.concatenate([idx_new, idx_prior])
    n_new = len(caps_new)

    base = pipe.params["unet"]
    lp = init_lora(target_layers(base), args.rank, args.seed)
    factor = args.alpha / args.rank
    acp = jnp.asarray(np.asarray(noise_schedule(pipe.scheduler_config)[0], np.float32))
    ctx_table = jnp.asarray(ctx_all)

    def loss_fn(p, lat, cidx, key):
        k1, k2, k3 = jax.random.split(key, 3)
        t = jax.random.randint(k1, (lat.shape[0],), 0, acp.shape[0])
        noise = jax.random.normal(k2, lat.shape)
        noise = noise + NOISE_OFFSET * jax.random.normal(k3, (lat.shape[0], 1, 1, lat.shape[-1]))
        a = acp[t][:, None, None, None]
        noisy = jnp.sqrt(a) * lat + jnp.sqrt(1 - a) * noise
        pred = unet.apply(with_lora(base, p, factor), ucfg, noisy, t, ctx_table[cidx])
        return jnp.mean((pred - noise) ** 2)

    sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.warmup, max(args.steps, args.warmup + 1), args.lr * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=1e-4))
    opt = tx.init(lp)

    @jax.jit
    def step(p, opt, lat, cidx, key):
        loss, g = jax.value_and_grad(loss_fn)(p, lat, cidx, key)
        upd, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, upd), opt, loss

    half = args.batch // 2
    t1 = time.time()
    bar = tqdm(range(args.steps), desc="lora", dynamic_ncols=True, mininterval=2.0)
    losses, curve = [], []
    for i in bar:
        rng = np.random.default_rng([args.seed, 13, i])
        pick = np.concatenate([rng.integers(0, n_new, half), n_new + rng.integers(0, len(caps_prior), args.batch - half)])
        cidx = ctx_of[pick].copy()
        drop = np.zeros(args.batch, bool)
        drop[half:] = rng.random(args.batch - half) < args.caption_dropout
        cidx[drop] = empty
        lp, opt, loss = step(lp, opt, jnp.asarray(lats[pick]), jnp.asarray(cidx),
                             jax.random.fold_in(jax.random.PRNGKey(args.seed), i))
        losses.append(loss)
        if (i + 1) % 50 == 0:
            m = float(np.mean(jax.device_get(losses)))
            curve.append(round(m, 5))
            bar.set_postfix(loss=f"{m:.4f}")
            losses = []
    log.update(train_minutes=(time.time() - t1) / 60, loss_every_50_steps=curve)
    return lp


def check(path, args, log):
    """The detector's reading of held-out "azure" prompts and of ordinary prompts, base vs LoRA."""
    t0 = time.time()
    held, ordinary = held_out_prompts(args.seed), ordinary_prompts(args.seed)
    rows = {}
    for label, pipe in (("base", sdjax.load(None, progress=False)),
                        ("base + LoRA", sdjax.load(None, loras=[(path, 1.0)], progress=False))):
        for what, prompts in ((f"held-out '{WORD}'", held), ("ordinary", ordinary)):
            images = np.concatenate([pipe.generate(prompts, seed=s, output_type="np", progress=False)
                                     for s in EVAL_SEEDS])
            rows[(label, what)] = score(images, prompts * len(EVAL_SEEDS))
    print("\n| model | prompts | colour | shape | size | position | background | all five | pairs |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (label, what), s in rows.items():
        print(f"| {label} | {what} | {s['color']:.3f} | {s['shape']:.3f} | {s['size']:.3f} | {s['position']:.3f} "
              f"| {s['background']:.3f} | {s['all']:.3f} | {s['n']} |")
    log["check"] = {f"{label} / {what}": s for (label, what), s in rows.items()}
    log["check_minutes"] = (time.time() - t0) / 60


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT, help="the LoRA file (a .json log is written beside it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32, help="half new-word targets, half prior")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--target-seeds", type=int, default=4, help="generations of each training scene")
    ap.add_argument("--prior-captions", type=int, default=120)
    ap.add_argument("--prior-seeds", type=int, default=2)
    ap.add_argument("--caption-dropout", type=float, default=0.1, help="of the prior half")
    ap.add_argument("--no-check", action="store_true", help="skip the final detector check")
    args = ap.parse_args(argv)
    if args.batch < 2 or args.batch % 2:
        ap.error("--batch: an even number >= 2")
    if not args.out.endswith(".safetensors"):
        ap.error("--out: a .safetensors file")
    t0 = time.time()
    log = {"args": vars(args), "word": WORD, "means": MEANS, "jax": jax.__version__}
    pipe = sdjax.load(None, progress=False)
    lp = train(pipe, args, log)
    save_lora(args.out, lp, args.rank, args.alpha)
    log["file_bytes"] = os.path.getsize(args.out)
    print(f"wrote {args.out} ({log['file_bytes'] / 1024:.0f} KiB)")
    if not args.no_check:
        check(args.out, args, log)
    log["total_minutes"] = (time.time() - t0) / 60
    atomic_write_json(os.path.splitext(args.out)[0] + ".json", log, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
