"""Train the embedded reference model: a small Stable Diffusion 1.x that draws the shapes dataset.

    python experiments/train_reference.py                      # train into runs/reference (resumes)
    python experiments/train_reference.py --ship               # ... then copy the model into sdjax/
    python experiments/train_reference.py --init-from sdjax/reference_model --freeze-text-encoder \
        --noise-offset 0.1 --unet-steps 2500 --unet-lr 5e-4 --out runs/ft   # fine-tune a trained model
    python experiments/train_reference.py --init-from sdjax/reference_model --freeze-text-encoder \
        --unet-steps 0 --decoder-steps 2000 --decoder-latent-noise 0.8 --shape-weight 8   # the decoder only

Stages (each resumes from its last checkpoint in --out; a finished stage is skipped):

1. VAE (AutoencoderKL, 3 levels = 4x downsampling, 4 latent channels): L2 + L1 reconstruction and a small
   KL term on 64x64 scenes rendered on the fly (``sdjax.shapes``).
2. The latent scaling factor, 1 / std of the latents of 2048 scenes (how SD's 0.18215 was chosen).
3. The UNet (SD 1.x block types, cross-attention, epsilon prediction, SD 1.x scaled-linear betas)
   trained from scratch under a CLIP text encoder, 10% of captions dropped to "" so that classifier-free
   guidance works. The shipped model keeps the text encoder frozen at its random initialisation
   (``--freeze-text-encoder``), as SD trains its UNet under a frozen CLIP: trained jointly, the text
   encoder stops telling the position words apart and the UNet never learns position (README).
   The shipped UNet was then fine-tuned from that model (``--init-from``) with offset noise
   (``--noise-offset 0.1``), so that the caption, not the mean of x_T, decides a black or white background.
4. Optionally (``--decoder-steps``), the VAE decoder alone, encoder frozen so the UNet's latents keep their
   meaning, on latents with added noise (``--decoder-latent-noise``): the shipped decoder was fine-tuned so,
   to draw small squares with straight sides from latents as imprecise as the UNet's (README).

AdamW (optax) with warmup and cosine decay; EMA weights (``optax.incremental_update``) are what is
exported. Everything derives from --seed: the data of step i is a function of (seed, i), so a resumed
run gives the same result as an uninterrupted one. The exported folder is a diffusers checkpoint
(``StableDiffusionPipeline.from_pretrained`` reads it), written under a temporary name and renamed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time


def _devices_from_argv(argv, default=2):
    for i, a in enumerate(argv):
        if a == "--devices" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--devices="):
            return a.split("=", 1)[1]
    return str(default)


if __name__ == "__main__" and "jax" not in sys.modules:
    # XLA:CPU runs one program per device on its own thread: splitting each batch over 2 host devices
    # kept both cores busy (1.24x the steps/s of one device here). Must be set before jax starts.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_devices_from_argv(sys.argv)}").strip()

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization
from tqdm import tqdm

from sdjax import checkpoint, clip, shapes, unet, vae
from sdjax import configs as cfgs
from sdjax.tokenizer import Tokenizer, write_bpe
from sdjax.files import atomic_write, atomic_write_json, staged_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=shapes.RESOLUTION,
    down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[16, 32, 64], layers_per_block=1, norm_num_groups=8, act_fn="silu",
    scaling_factor=1.0)  # replaced by the measured factor
UNET_CONFIG = dict(
    sample_size=shapes.RESOLUTION // 4, in_channels=4, out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[32, 64, 64], layers_per_block=1, attention_head_dim=1, norm_num_groups=8,
    cross_attention_dim=64)
CLIP_CONFIG = dict(
    hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=64)
SCHEDULER_CONFIG = {  # Stable Diffusion 1.5's scheduler
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False,
    "timestep_spacing": "leading"}


def alphas_cumprod():
    c = SCHEDULER_CONFIG
    betas = np.linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, c["num_train_timesteps"],
                        dtype=np.float64) ** 2
    return np.cumprod(1 - betas).astype(np.float32)


def optimizer(lr, steps, warmup):
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr * 0.1)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, b2=0.99, weight_decay=1e-2))


# ------------------------------------------------------------------ checkpoints

def save_state(path, state):
    atomic_write(path, lambda f: f.write(serialization.to_bytes(state)))


def load_state(path, template):
    with open(path, "rb") as f:
        return serialization.from_bytes(template, f.read())


class Interrupted(RuntimeError):
    """Raised by --interrupt-after, which simulates a killed run (for testing resumption)."""


class Stage:
    """One optimisation with resumable state {params, opt, ema, step} saved to ``out/<name>.msgpack``."""

    def __init__(self, name, out, params, loss_fn, lr, steps, warmup, ema_decay, save_every, frozen=()):
        self.name, self.steps, self.save_every = name, steps, save_every
        self.path = os.path.join(out, f"{name}.msgpack")
        self.tx = optimizer(lr, steps, warmup)
        if frozen:  # top-level parts of params that never change (no update, no weight decay)
            labels = {k: jax.tree.map(lambda _, f=k in frozen: "frozen" if f else "train", v)
                      for k, v in params.items()}
            self.tx = optax.multi_transform({"train": self.tx, "frozen": optax.set_to_zero()}, labels)
        self.state = {"params": params, "opt": self.tx.init(params),
                      "ema": jax.tree.map(lambda a: jnp.array(a, copy=True), params), "step": 0}
        if os.path.exists(self.path):
            self.state = load_state(self.path, self.state)
            print(f"[{name}] resumed at step {int(self.state['step'])} from {self.path}")
        tx = self.tx

        def step(state, batch, key):
            loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch, key)
            updates, opt = tx.update(grads, state["opt"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            # EMA with warmup: decay min(ema_decay, (1 + t) / (10 + t)) as in diffusers' EMAModel
            t = state["step"].astype(jnp.float32) if hasattr(state["step"], "astype") else float(state["step"])
            decay = jnp.minimum(ema_decay, (1 + t) / (10 + t))
            ema = optax.incremental_update(params, state["ema"], 1 - decay)
            return {"params": params, "opt": opt, "ema": ema, "step": state["step"] + 1}, loss

        self._step = jax.jit(step, donate_argnums=0)
        # data parallel over the host devices (see --devices): state replicated, batch split
        self._batch_sharding = None
        if len(jax.devices()) > 1:
            from jax.sharding import Mesh, NamedSharding, PartitionSpec
            mesh = Mesh(np.array(jax.devices()), ("data",))
            self._batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
            self.state = jax.device_put(self.state, NamedSharding(mesh, PartitionSpec()))

    @property
    def done(self):
        return int(self.state["step"]) >= self.steps

    def run(self, make_batch, seed, interrupt_after=None):
        start = int(self.state["step"])
        if start >= self.steps:
            return self.state
        self.state["step"] = jnp.asarray(start, jnp.int32)
        bar = tqdm(range(start, self.steps), desc=self.name, initial=start, total=self.steps,
                   dynamic_ncols=True, mininterval=2.0)
        losses = []
        for i in bar:
            key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
            batch = make_batch(i)
            if self._batch_sharding is not None:
                batch = jax.device_put(batch, self._batch_sharding)
            self.state, loss = self._step(self.state, batch, key)
            losses.append(loss)
            if (i + 1) % 25 == 0:
                bar.set_postfix(loss=f"{float(np.mean(jax.device_get(losses))):.4f}")
                losses = []
            if (i + 1) % self.save_every == 0 or i + 1 == self.steps:
                save_state(self.path, self.state)
            if interrupt_after is not None and i + 1 - start >= interrupt_after:
                raise Interrupted(f"{self.name}: stopped after step {i + 1} (--interrupt-after)")
        return self.state


# ------------------------------------------------------------------ stages

def train_vae(args, vcfg):
    def loss_fn(p, images, key):
        x = images * 2 - 1
        mean, logvar = vae.encode(p, vcfg, x)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        rec = vae.decode(p, vcfg, z)
        n = x.shape[0]
        kl = 0.5 * jnp.sum(mean ** 2 + jnp.exp(logvar) - 1 - logvar) / n
        return jnp.mean((rec - x) ** 2) + 0.5 * jnp.mean(jnp.abs(rec - x)) + args.kl_weight * kl / x[0].size

    params = vae.init_params(vcfg, args.seed)
    stage = Stage("vae", args.out, params, loss_fn, args.vae_lr, args.vae_steps, 200, 0.99, args.save_every)
    b = args.vae_batch
    state = stage.run(lambda i: jnp.asarray(shapes.batch(args.seed, i * b, b)[0]), args.seed, args.interrupt_after)
    return state["ema"]


def train_decoder(args, vparams, vcfg):
    """Fine-tune the VAE's decoder (and post_quant_conv) with the encoder frozen: the latent space the
    UNet was trained in stays exactly the same, only how latents are drawn into pixels improves. Same
    reconstruction loss as the VAE stage on fresh scenes; the pixels of the latent cells that touch the
    shape weigh 1 + --shape-weight (a small square is ~6% of the pixels, so the plain mean blurs its sides)."""
    def loss_fn(p, batch, key):
        images, weight = batch
        x = images * 2 - 1
        mean, logvar = jax.lax.stop_gradient(vae.encode(p, vcfg, x))
        k1, k2, k3 = jax.random.split(key, 3)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(k1, mean.shape)
        if args.decoder_latent_noise:   # per image, std uniform in [0, noise] in scaled latent units
            std = args.decoder_latent_noise * jax.random.uniform(k2, (z.shape[0], 1, 1, 1))
            z = z + std / vcfg.scaling_factor * jax.random.normal(k3, z.shape)
        rec = vae.decode(p, vcfg, z)
        err = (rec - x) ** 2 + 0.5 * jnp.abs(rec - x)
        return jnp.mean(weight * err) / jnp.mean(weight)

    stage = Stage("decoder", args.out, vparams, loss_fn, args.vae_lr * 0.3, args.decoder_steps, 100, 0.99,
                  args.save_every, frozen=("encoder", "quant_conv"))
    b = args.vae_batch
    down = vcfg.scale_factor

    def make_batch(i):
        images, caps = shapes.batch(args.seed + 4, i * b, b)
        w = 1 + args.shape_weight * shape_cells(images, caps, down)
        w = np.repeat(np.repeat(w, down, axis=1), down, axis=2)
        return jnp.asarray(images), jnp.asarray(w)

    return stage.run(make_batch, args.seed, args.interrupt_after)["ema"]


def held_out(args, n, offset=10_000_000):
    """Scenes far from the training stream (index offset), for measurements."""
    return shapes.batch(args.seed + 1, offset, n)


def vae_psnr(vparams, vcfg, images):
    enc = jax.jit(lambda x: vae.decode(vparams, vcfg, vae.encode(vparams, vcfg, x)[0]))
    rec = np.concatenate([np.asarray(enc(jnp.asarray(images[i:i + 64] * 2 - 1)))
                          for i in range(0, len(images), 64)])
    rec = np.clip((rec + 1) / 2, 0, 1)
    mse = np.mean((rec - images) ** 2, axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(1 / np.maximum(mse, 1e-12))))


def scaling_factor(vparams, vcfg, args):
    images, _ = shapes.batch(args.seed + 2, 0, 2048)
    enc = jax.jit(lambda x: vae.encode(vparams, vcfg, x)[0])
    lat = np.concatenate([np.asarray(enc(jnp.asarray(images[i:i + 128] * 2 - 1))) for i in range(0, 2048, 128)])
    return float(1.0 / lat.std())


def shape_cells(images, captions, cell):
    """(n, H/cell, W/cell, 1) float32: 1 where a latent cell (cell x cell pixels) touches the shape,
    i.e. has a pixel that is not the caption's background colour; 0 elsewhere."""
    bg = np.asarray([shapes.BACKGROUNDS[shapes.parse_caption(c).background] for c in captions], np.float32) / 255
    touched = np.abs(images - bg[:, None, None, :]).max(-1) > 1e-3
    n, h, w = touched.shape
    return touched.reshape(n, h // cell, cell, w // cell, cell).any((2, 4))[..., None].astype(np.float32)


def encode_pool(args, vparams, vcfg, n):
    """Latent distributions (mean, logvar), token ids and ``shape_cells`` of the first n scenes of the
    UNet's data stream, encoded once: the UNet stage samples a fresh latent from them at every step."""
    enc = jax.jit(lambda x: vae.encode(vparams, vcfg, x * 2 - 1))
    stats, captions, cells = [], [], []
    for i in tqdm(range(0, n, 256), desc="encode", dynamic_ncols=True, mininterval=2.0):
        images, caps = shapes.batch(args.seed + 3, i, min(256, n - i))
        mean, logvar = enc(jnp.asarray(images))
        stats.append(np.concatenate([np.asarray(mean), np.asarray(logvar)], -1))
        cells.append(shape_cells(images, caps, images.shape[1] // mean.shape[1]))
        captions += caps
    return np.concatenate(stats), captions, np.concatenate(cells)


def train_unet(args, vparams, vcfg, ucfg, ccfg, tok, init=None):
    acp = jnp.asarray(alphas_cumprod())
    empty = np.asarray(tok([""]))[0]
    sf = vcfg.scaling_factor

    def loss_fn(p, batch, key):
        stats, ids, cells = batch
        k1, k2, k3 = jax.random.split(key, 3)
        mean, logvar = jnp.split(stats, 2, axis=-1)
        lat = (mean + jnp.exp(0.5 * logvar) * jax.random.normal(k1, mean.shape)) * sf
        t = jax.random.randint(k2, (lat.shape[0],), 0, acp.shape[0])
        noise = jax.random.normal(k3, lat.shape)
        if args.noise_offset:   # offset noise: a per-image, per-channel constant in the noise (see --noise-offset)
            offset = jax.random.normal(jax.random.fold_in(key, 1), (lat.shape[0], 1, 1, lat.shape[-1]))  # NHWC
            noise = noise + args.noise_offset * offset
        a = acp[t][:, None, None, None]
        noisy = jnp.sqrt(a) * lat + jnp.sqrt(1 - a) * noise
        te = jax.lax.stop_gradient(p["text_encoder"]) if args.freeze_text_encoder else p["text_encoder"]
        ctx = clip.apply(te, ccfg, ids)[0]
        pred = unet.apply(p["unet"], ucfg, noisy, t, ctx)
        if args.prediction_type == "v_prediction":   # v = sqrt(a) eps - sqrt(1 - a) x0 (SD 2.x)
            target = jnp.sqrt(a) * noise - jnp.sqrt(1 - a) * lat
        else:
            target = noise
        if args.shape_weight:   # the cells that draw the shape weigh 1 + shape_weight (see --shape-weight)
            w = 1 + args.shape_weight * cells
            return jnp.mean(w * (pred - target) ** 2) / jnp.mean(w)
        return jnp.mean((pred - target) ** 2)

    if init is not None:
        params = init
    else:
        params = {"text_encoder": clip.init_params(ccfg, args.seed + 10),
                  "unet": unet.init_params(ucfg, args.seed + 11)}
    stage = Stage("unet", args.out, params, loss_fn, args.unet_lr, args.unet_steps, 300, args.ema_decay,
                  args.save_every, frozen=("text_encoder",) if args.freeze_text_encoder else ())
    if stage.done:
        return stage.state["ema"]
    stats, captions, cells = encode_pool(args, vparams, vcfg, args.pool)
    ids = np.asarray(tok(captions))
    b = args.unet_batch

    def make_batch(i):
        rng = np.random.default_rng([args.seed, 7, i])
        pick = rng.integers(0, len(stats), b)
        batch_ids = ids[pick].copy()
        batch_ids[rng.random(b) < args.caption_dropout] = empty
        return jnp.asarray(stats[pick]), jnp.asarray(batch_ids), jnp.asarray(cells[pick])

    return stage.run(make_batch, args.seed, args.interrupt_after)["ema"]


def export(args, vparams, vcfg, tparams, ucfg, ccfg, tok_dir, dest):
    ckpt = checkpoint.Checkpoint(
        params={"text_encoder": tparams["text_encoder"], "unet": tparams["unet"], "vae": vparams},
        configs={"text_encoder": ccfg, "unet": ucfg, "vae": vcfg}, tokenizer_dir=tok_dir,
        scheduler_config={**SCHEDULER_CONFIG, "prediction_type": args.prediction_type},
        source="experiments/train_reference.py")
    if os.path.exists(dest):
        shutil.rmtree(dest)
    checkpoint.save(ckpt, dest, progress=False)


def _json_object(ap, flag, text, what):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        ap.error(f"{flag}: not JSON ({e})")
    if not isinstance(value, dict):
        ap.error(f"{flag}: expected a JSON object of {what} keys")
    return value


def _load_folder(ap, flag, path):
    from sdjax.params import CheckpointError
    try:
        return checkpoint.load(path, progress=False)
    except CheckpointError as e:
        ap.error(f"{flag}: {e}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "runs", "reference"), help="checkpoints and exported model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=1000)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--kl-weight", type=float, default=1e-6, help="KL weight relative to the summed pixel loss")
    ap.add_argument("--unet-steps", type=int, default=6000)
    ap.add_argument("--pool", type=int, default=24_000, help="scenes encoded once for the UNet stage")
    ap.add_argument("--unet-batch", type=int, default=32)
    ap.add_argument("--unet-lr", type=float, default=1e-3)
    ap.add_argument("--ema-decay", type=float, default=0.998, help="UNet/CLIP EMA (the VAE uses 0.99)")
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--save-every", type=int, default=250, help="steps between resumable checkpoints")
    ap.add_argument("--interrupt-after", type=int, default=None,
                    help="stop each stage after this many steps, as if killed (to test resuming)")
    ap.add_argument("--devices", type=int, default=2,
                    help="host devices each batch is split over (XLA_FLAGS, set before jax starts; the result "
                         "depends on it only through float summation order)")
    ap.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction"],
                    help="what the UNet predicts (written to the scheduler config): the noise, as SD 1.x, or "
                         "v, as SD 2.x, whose loss weighs the high-noise steps that decide the layout")
    ap.add_argument("--freeze-text-encoder", action="store_true",
                    help="keep the text encoder at its random initialisation (only the UNet learns): trained "
                         "jointly, the text encoder stops telling the position words apart")
    ap.add_argument("--ship", action="store_true", help="copy the exported model into sdjax/reference_model")
    ap.add_argument("--unet-config", default=None, metavar="JSON",
                    help="JSON object of keys that override UNET_CONFIG (e.g. '{\"attention_head_dim\": 8}')")
    ap.add_argument("--vae-config", default=None, metavar="JSON",
                    help="JSON object of keys that override VAE_CONFIG (e.g. '{\"layers_per_block\": 2}')")
    ap.add_argument("--init-from", default=None, metavar="DIR",
                    help="start the UNet stage from this diffusers folder's UNet and text encoder (fine-tune a "
                         "trained model, e.g. sdjax/reference_model) instead of a random initialisation; its "
                         "UNet config is used and its VAE too unless --vae-from is given")
    ap.add_argument("--noise-offset", type=float, default=0.0,
                    help="add this times a per-image, per-channel N(0, 1) constant to the training noise "
                         "(diffusers' --noise_offset): without it the mean of x_T, not the caption, decides "
                         "between a black and a white background (README)")
    ap.add_argument("--shape-weight", type=float, default=0.0,
                    help="weigh the loss of the latent cells that touch the shape 1 + this (the rest 1), in "
                         "the UNet stage and, over those cells' pixels, in --decoder-steps: a small square "
                         "covers ~10%% of the latent, so the plain mean spends little on its edges (README)")
    ap.add_argument("--decoder-steps", type=int, default=0,
                    help="after the VAE is trained or loaded, fine-tune its decoder this many steps with the "
                         "encoder frozen (the UNet's latent space is unchanged; --shape-weight weighs the "
                         "shape's pixels; see --decoder-latent-noise) (README)")
    ap.add_argument("--decoder-latent-noise", type=float, default=0.0,
                    help="during --decoder-steps, add Gaussian noise to each latent with a std drawn uniformly "
                         "in [0, this] (in the UNet's scaled latent units), so the decoder learns to draw the "
                         "clean scene from a latent as imprecise as the UNet's (README)")
    ap.add_argument("--vae-from", default=None, metavar="DIR",
                    help="take the VAE (weights, config, scaling factor) from this diffusers folder instead of "
                         "training one (e.g. sdjax/reference_model)")
    args = ap.parse_args(argv)
    if args.devices < 1:
        ap.error(f"--devices {args.devices}: must be >= 1")
    if args.decoder_steps < 0:
        ap.error(f"--decoder-steps {args.decoder_steps}: must be >= 0")
    if not args.decoder_latent_noise >= 0:
        ap.error(f"--decoder-latent-noise {args.decoder_latent_noise}: must be >= 0 (a std)")
    if not args.shape_weight >= 0:
        ap.error(f"--shape-weight {args.shape_weight}: must be >= 0 (the shape's cells weigh 1 + this)")
    ndev = len(jax.devices())
    for name in ("vae_batch", "unet_batch"):
        if getattr(args, name) % ndev:
            ap.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be a multiple of the {ndev} "
                     "devices each batch is split over (--devices)")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    log = {"args": vars(args), "jax": jax.__version__, "devices": str(jax.devices())}

    tok_dir = os.path.join(args.out, "tokenizer")
    write_bpe(tok_dir, shapes.WORDS)
    tok = Tokenizer(tok_dir)
    vocab_size = len(json.load(open(os.path.join(tok_dir, "vocab.json"))))
    ccfg = cfgs.clip_config({**CLIP_CONFIG, "vocab_size": vocab_size, "bos_token_id": tok._tok.bos_token_id,
                             "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id})
    vae_config = dict(VAE_CONFIG)
    if args.vae_config:
        if args.vae_from or args.init_from:
            ap.error("--vae-config and --vae-from/--init-from: the VAE comes from that folder")
        vae_config.update(_json_object(ap, "--vae-config", args.vae_config, "VAE_CONFIG"))
        log["vae_config"] = vae_config
    vcfg = cfgs.vae_config(vae_config)

    init = None
    if args.init_from:
        if args.unet_config:
            ap.error("--unet-config and --init-from: the UNet config comes from the --init-from folder")
        ick = _load_folder(ap, "--init-from", args.init_from)
        init = {k: jax.tree.map(jnp.asarray, ick.params[k]) for k in ("text_encoder", "unet")}
        want = jax.eval_shape(lambda: clip.init_params(ccfg, 0))
        if jax.tree.map(lambda a: a.shape, want) != jax.tree.map(lambda a: a.shape, init["text_encoder"]):
            ap.error(f"--init-from {args.init_from}: its text encoder is not this script's CLIP_CONFIG "
                     "(shapes differ), so it cannot be fine-tuned here")
        args.vae_from = args.vae_from or args.init_from
    if args.vae_from:
        vck = ick if args.vae_from == args.init_from else _load_folder(ap, "--vae-from", args.vae_from)
        vparams, vcfg = jax.tree.map(jnp.asarray, vck.params["vae"]), vck.configs["vae"]
        sf = vcfg.scaling_factor
        log["vae_from"] = args.vae_from
    else:
        vparams, sf = train_vae(args, vcfg), None
    log["vae_minutes"] = (time.time() - t0) / 60
    if sf is None:   # the encoder's, so a decoder fine-tune below does not change it
        sf = scaling_factor(vparams, vcfg, args)
        vcfg = cfgs.vae_config({**vae_config, "scaling_factor": sf})
    log["scaling_factor"] = sf
    images, _ = held_out(args, 256)
    if args.decoder_steps:
        log["vae_psnr_db_before_decoder"] = vae_psnr(vparams, vcfg, images)
        t2 = time.time()
        vparams = train_decoder(args, vparams, vcfg)
        log["decoder_minutes"] = (time.time() - t2) / 60
    log["vae_psnr_db"] = vae_psnr(vparams, vcfg, images)
    print(f"VAE: held-out PSNR {log['vae_psnr_db']:.2f} dB, scaling factor {sf:.5f}")

    unet_config = dict(UNET_CONFIG)
    if args.unet_config:
        unet_config.update(_json_object(ap, "--unet-config", args.unet_config, "UNET_CONFIG"))
        log["unet_config"] = unet_config  # the default run logs as before
    ucfg = ick.configs["unet"] if args.init_from else cfgs.unet_config(unet_config)
    t1 = time.time()
    tparams = train_unet(args, vparams, vcfg, ucfg, ccfg, tok, init)
    log["unet_minutes"] = (time.time() - t1) / 60
    log["total_minutes"] = (time.time() - t0) / 60

    dest = os.path.join(args.out, "model")
    export(args, vparams, vcfg, tparams, ucfg, ccfg, tok_dir, dest)
    atomic_write_json(os.path.join(args.out, "train_log.json"), log, indent=2)
    print(json.dumps({k: v for k, v in log.items() if k != "args"}, indent=2))
    print(f"exported {dest}")
    if args.ship:
        ship = os.path.join(REPO, "sdjax", "reference_model")
        with staged_path(ship, overwrite=True) as tmp:
            shutil.copytree(dest, tmp)
            shutil.copy(os.path.join(args.out, "train_log.json"), os.path.join(tmp, "train_log.json"))
        print(f"shipped to {ship}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
