"""The synthetic captioned dataset the embedded reference model is trained on, and its read-back detector.

A scene is one flat-coloured shape on a flat background, drawn with 4x4 supersampling (soft edges)::

    "a small red circle at the top left on a white background"

Five attributes: size x colour x shape x position x background. Everything is a pure function of
a seed, so the dataset needs no files: ``sample(seed, index)`` is the index-th example of the stream
for that seed, and a batch of it is the same whatever else ran before.

``detect(image)`` reads the attributes back from an image (analytic: background from the border,
foreground by colour distance, colour by nearest palette entry, shape by best template overlap inside
the foreground's bounding box, size from that box, position from the centroid). It is the "prompt
adherence" metric: the fraction of generated images whose read-back attributes match their caption.
"""
from __future__ import annotations

import dataclasses

import numpy as np

RESOLUTION = 64

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (245, 215, 40),
    "purple": (140, 50, 190),
    "orange": (250, 130, 20),
}
BACKGROUNDS = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
SIZES = {"small": 0.25, "large": 0.5}          # side of the shape's bounding box / image side
POSITIONS = {                                    # centre of the shape / image side, (x, y)
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
    "center": (0.5, 0.5),
}
ATTRIBUTES = ("size", "color", "shape", "position", "background")
JITTER_POSITION = 0.03                           # +- fraction of the image side
JITTER_SIZE = 0.08                               # +- relative

# every word a caption can use: the reference model's tokenizer covers exactly these
WORDS = sorted({w for name in (*SHAPES, *COLORS, *BACKGROUNDS, *SIZES, *POSITIONS) for w in name.split()}
               | {"a", "at", "the", "on", "in", "background"})


@dataclasses.dataclass(frozen=True)
class Scene:
    size: str
    color: str
    shape: str
    position: str
    background: str

    @property
    def caption(self) -> str:
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        return f"a {self.size} {self.color} {self.shape} {where} on a {self.background} background"

    def attributes(self) -> dict:
        return dataclasses.asdict(self)


def all_scenes() -> list[Scene]:
    """Every caption the dataset can produce (2 x 6 x 3 x 5 x 3 = 540)."""
    return [Scene(s, c, sh, p, b) for s in SIZES for c in COLORS for sh in SHAPES for p in POSITIONS
            for b in BACKGROUNDS]


def parse_caption(caption: str) -> Scene:
    """The inverse of ``Scene.caption``; raises ValueError naming the caption if it is not one."""
    scene = _CAPTIONS.get(caption.strip().lower())
    if scene is None:
        raise ValueError(f"{caption!r} is not a caption of the shapes dataset "
                         f"(e.g. {all_scenes()[0].caption!r})")
    return scene


_CAPTIONS = {s.caption: s for s in all_scenes()}


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index)])


def random_scene(rng: np.random.Generator) -> Scene:
    return Scene(rng.choice(list(SIZES)), rng.choice(list(COLORS)), rng.choice(SHAPES),
                 rng.choice(list(POSITIONS)), rng.choice(list(BACKGROUNDS)))


def _mask(shape: str, cx: float, cy: float, side: float, res: int, supersample: int = 4) -> np.ndarray:
    """Coverage in [0, 1] of a shape centred at (cx, cy) with bounding-box side ``side`` (pixels)."""
    n = res * supersample
    c = (np.arange(n) + 0.5) / supersample
    x, y = c[None, :], c[:, None]
    h = side / 2
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= h * h
    elif shape == "square":
        inside = (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    elif shape == "triangle":           # isosceles, apex up, base = height = side
        t = (y - (cy - h)) / side       # 0 at the apex, 1 at the base
        inside = (t >= 0) & (t <= 1) & (np.abs(x - cx) <= t * h)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    inside = inside.astype(np.float32)
    return inside.reshape(res, supersample, res, supersample).mean(axis=(1, 3))


def render(scene: Scene, rng: np.random.Generator | None = None, res: int = RESOLUTION) -> np.ndarray:
    """The scene as float32 RGB in [0, 1], (res, res, 3). ``rng`` jitters position and size."""
    px, py = POSITIONS[scene.position]
    side = SIZES[scene.size]
    if rng is not None:
        px += rng.uniform(-JITTER_POSITION, JITTER_POSITION)
        py += rng.uniform(-JITTER_POSITION, JITTER_POSITION)
        side *= 1 + rng.uniform(-JITTER_SIZE, JITTER_SIZE)
    m = _mask(scene.shape, px * res, py * res, side * res, res)[..., None]
    fg = np.asarray(COLORS[scene.color], np.float32) / 255
    bg = np.asarray(BACKGROUNDS[scene.background], np.float32) / 255
    return (m * fg + (1 - m) * bg).astype(np.float32)


def sample(seed: int, index: int, res: int = RESOLUTION) -> tuple[np.ndarray, Scene]:
    """Example ``index`` of the stream for ``seed``: (image float32 HWC in [0, 1], scene)."""
    rng = _rng(seed, index)
    scene = random_scene(rng)
    return render(scene, rng, res), scene


def batch(seed: int, start: int, size: int, res: int = RESOLUTION) -> tuple[np.ndarray, list[str]]:
    """Examples start..start+size-1: images (size, res, res, 3) in [0, 1] and their captions."""
    out = [sample(seed, i, res) for i in range(start, start + size)]
    return np.stack([o[0] for o in out]), [o[1].caption for o in out]


# ---------------------------------------------------------------- detector

def _nearest(rgb: np.ndarray, palette: dict) -> str:
    names = list(palette)
    table = np.asarray([palette[n] for n in names], np.float32) / 255
    return names[int(np.argmin(((table - rgb) ** 2).sum(-1)))]


def detect(image) -> dict:
    """Attributes read back from an RGB image (H, W, 3) in [0, 1] (float) or uint8.

    Returns a dict with the keys of ``ATTRIBUTES``; an attribute that cannot be read (no foreground)
    is ``None``.
    """
    img = _as_rgb(image, "detect")
    h, w, _ = img.shape
    bg_rgb, dist, fg = _foreground(img)
    background = _nearest(bg_rgb, BACKGROUNDS)
    out = dict.fromkeys(ATTRIBUTES)
    out["background"] = background
    if fg.sum() < 4:
        return out
    ys, xs = np.nonzero(fg)
    # colour from the pixels furthest from the background (the shape's interior, not its soft edge)
    core = dist >= np.quantile(dist[fg], 0.5)
    out["color"] = _nearest(np.median(img[core & fg], axis=0), COLORS)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    side = max(x1 - x0, y1 - y0)
    out["size"] = "small" if side < np.sqrt(SIZES["small"] * SIZES["large"]) * w else "large"
    cx, cy = (x0 + x1) / 2 / w, (y0 + y1) / 2 / h
    out["position"] = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    # shape: the template, drawn in the foreground's bounding box, that overlaps the foreground best
    fit = _template_ious(fg[y0:y1, x0:x1])
    out["shape"] = max(SHAPES, key=lambda s: fit[s])
    return out


def _as_rgb(image, caller: str) -> np.ndarray:
    """An RGB image (H, W, 3), float in [0, 1] or uint8, as float32 in [0, 1]."""
    img = np.asarray(image)
    if img.dtype == np.uint8:
        img = img.astype(np.float32) / 255
    img = np.clip(img.astype(np.float32), 0, 1)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"{caller} expects an RGB image (H, W, 3), got shape {img.shape}")
    return img


def _foreground(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(background RGB from the border, distance from it, boolean foreground mask) of a float image in [0, 1]."""
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3),
                             img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    dist = np.sqrt(((img - bg_rgb) ** 2).sum(-1))
    return bg_rgb, dist, dist > 0.5 * max(float(dist.max()), 0.2)


def _template_ious(box: np.ndarray) -> dict:
    bh, bw = box.shape
    box = box.astype(np.float32)
    return {s: float((t * box).sum() / max(float(np.maximum(t, box).sum()), 1e-6))
            for s in SHAPES for t in [_box_template(s, bw, bh)]}


def shape_fit(image, shape: str) -> float:
    """How well the foreground is drawn as ``shape``: IoU of the foreground mask with the shape's
    template drawn in the foreground's bounding box (1.0 for a crisp rendered square; a square drawn
    with rounded corners scores lower as a square). 0.0 when there is no foreground.

    This is the quantity ``detect`` maximises over shapes, read for the asked shape: a detector
    confidence that tells a square with corners from a rounded one that is still nearest a square.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    box = _foreground_box(image, "shape_fit")
    return 0.0 if box is None else _template_ious(box)[shape]


def _foreground_box(image, caller: str):
    """The boolean foreground mask cropped to its bounding box, or None when there is no foreground."""
    _, _, fg = _foreground(_as_rgb(image, caller))
    if fg.sum() < 4:
        return None
    ys, xs = np.nonzero(fg)
    return fg[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def box_fill(image, patch: float = 0.2) -> dict:
    """How full the foreground's bounding box is at its four corners and at the midpoints of its four
    sides: ``{"corners": ..., "sides": ...}``, each the mean foreground share of square patches of side
    ``patch`` x the box's shorter side. A crisp square reads 1.0 on both; a square with rounded corners
    is low on "corners" only; a pinched, four-lobed square (concave sides) is low on "sides", which
    ``shape_fit`` alone does not tell apart. Both are NaN when there is no foreground.
    """
    if not 0 < patch <= 0.5:
        raise ValueError(f"box_fill: patch must be in (0, 0.5], got {patch!r}")
    box = _foreground_box(image, "box_fill")
    if box is None:
        return {"corners": float("nan"), "sides": float("nan")}
    box = box.astype(np.float64)
    h, w = box.shape
    k = max(1, int(round(patch * min(h, w))))
    my, mx = (h - k) // 2, (w - k) // 2
    corners = [box[:k, :k], box[:k, -k:], box[-k:, :k], box[-k:, -k:]]
    sides = [box[:k, mx:mx + k], box[-k:, mx:mx + k], box[my:my + k, :k], box[my:my + k, -k:]]
    return {"corners": float(np.mean([c.mean() for c in corners])),
            "sides": float(np.mean([c.mean() for c in sides]))}


def _box_template(shape: str, bw: int, bh: int) -> np.ndarray:
    ss = 4
    xs = (np.arange(bw * ss) + 0.5) / (bw * ss)
    ys = (np.arange(bh * ss) + 0.5) / (bh * ss)
    x, y = xs[None, :], ys[:, None]
    if shape == "circle":
        inside = (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25
    elif shape == "square":
        inside = np.ones((bh * ss, bw * ss), bool)
    else:
        inside = np.abs(x - 0.5) <= y / 2
    return (inside.astype(np.float32).reshape(bh, ss, bw, ss).mean(axis=(1, 3)) > 0.5).astype(np.float32)


def score(images, captions) -> dict:
    """Per-attribute accuracy of ``detect`` on images against their captions, plus "all" (every
    attribute right). images: (N, H, W, 3) in [0, 1]."""
    hits = {a: 0 for a in ATTRIBUTES}
    all_right = 0
    for img, cap in zip(images, captions):
        want = parse_caption(cap).attributes()
        got = detect(img)
        ok = [got[a] == want[a] for a in ATTRIBUTES]
        for a, o in zip(ATTRIBUTES, ok):
            hits[a] += o
        all_right += all(ok)
    n = max(len(captions), 1)
    return {**{a: hits[a] / n for a in ATTRIBUTES}, "all": all_right / n, "n": len(captions)}


def captions(n: int, seed: int, exclude=()) -> list[str]:
    """``n`` distinct dataset captions, a fixed pick per ``seed`` (sorted in dataset order), none of
    ``exclude``: prompt sets for evaluation and calibration that need no file."""
    skip = set(exclude)
    scenes = [s for s in all_scenes() if s.caption not in skip]
    pick = np.random.default_rng([2026, seed]).choice(len(scenes), min(n, len(scenes)), replace=False)
    return [scenes[i].caption for i in sorted(pick)]


def shuffled_captions(n: int, seed: int, exclude=()) -> list[str]:
    """``n`` dataset captions in a random order of ``seed`` (a sorted pick would be mostly small
    shapes), none of ``exclude``."""
    skip = set(exclude)
    caps = [s.caption for s in all_scenes() if s.caption not in skip]
    return [caps[i] for i in np.random.default_rng([2026, seed]).permutation(len(caps))[:n]]

