"""The shapes dataset and its read-back detector (the prompt-adherence metric)."""
import numpy as np
import pytest

from sdjax import shapes


def test_stream_is_a_function_of_seed_and_index():
    a, sa = shapes.sample(7, 123)
    b, sb = shapes.sample(7, 123)
    c, _ = shapes.sample(8, 123)
    assert sa == sb and np.array_equal(a, b)
    assert not np.array_equal(a, c)
    imgs, caps = shapes.batch(7, 120, 5)
    assert np.array_equal(imgs[3], a) and caps[3] == sa.caption
    assert imgs.shape == (5, shapes.RESOLUTION, shapes.RESOLUTION, 3) and imgs.dtype == np.float32
    assert 0 <= imgs.min() and imgs.max() <= 1


def test_captions_name_every_attribute_and_parse_back():
    scenes = shapes.all_scenes()
    assert len(scenes) == 2 * 6 * 3 * 5 * 3
    assert len({s.caption for s in scenes}) == len(scenes)
    for s in scenes[::17]:
        assert shapes.parse_caption(s.caption) == s
        words = set(s.caption.split())
        assert {s.color, s.shape, s.size, s.background} <= words and words <= set(shapes.WORDS)
    with pytest.raises(ValueError, match="not a caption"):
        shapes.parse_caption("a photo of a cat")


def test_detector_reads_dataset_images():
    images, caps = shapes.batch(2024, 0, 300)
    acc = shapes.score(images, caps)
    assert acc["n"] == 300
    assert min(acc[a] for a in shapes.ATTRIBUTES) >= 0.98, acc
    noisy = np.clip(images + np.random.default_rng(0).normal(0, 0.05, images.shape), 0, 1)
    assert shapes.score(noisy, caps)["all"] >= 0.95


def test_detector_notices_wrong_images():
    img = shapes.render(shapes.Scene("large", "red", "circle", "center", "white"))
    assert shapes.detect(img) == dict(size="large", color="red", shape="circle", position="center",
                                      background="white")
    other = shapes.render(shapes.Scene("small", "blue", "triangle", "top right", "black"))
    got = shapes.detect(other)
    assert got == dict(size="small", color="blue", shape="triangle", position="top right", background="black")
    # a blank image has no foreground: nothing but the background can be read
    blank = np.full((64, 64, 3), 0.5, np.float32)
    assert shapes.detect(blank)["shape"] is None
    acc = shapes.score([img, other], [shapes.Scene("large", "red", "square", "center", "white").caption,
                                      shapes.Scene("small", "blue", "triangle", "top right", "black").caption])
    assert acc["shape"] == 0.5 and acc["color"] == 1.0 and acc["all"] == 0.5


def test_detector_takes_uint8_and_rejects_bad_shapes():
    img = shapes.render(shapes.Scene("small", "green", "square", "bottom left", "gray"))
    assert shapes.detect((img * 255).round().astype(np.uint8))["shape"] == "square"
    with pytest.raises(ValueError, match="RGB"):
        shapes.detect(np.zeros((64, 64)))


def test_shape_fit_tells_drawn_corners_from_blobs():
    """shape_fit reads the asked shape's template overlap: rendered large shapes fit their own shape
    best, and a square with rounded corners (what an undertrained model draws) fits a square
    less well than the crisp square does, while detect may still call it a square."""
    for shape in shapes.SHAPES:
        img = shapes.render(shapes.Scene("large", "red", shape, "center", "white"))
        fits = {s: shapes.shape_fit(img, s) for s in shapes.SHAPES}
        assert max(fits, key=fits.get) == shape and fits[shape] >= 0.9, (shape, fits)
    square = shapes.render(shapes.Scene("large", "red", "square", "center", "white"))
    yy, xx = (np.mgrid[:64, :64] + 0.5 - 32) / 16
    rounded = np.abs(xx) ** 4 + np.abs(yy) ** 4 <= 1          # a superellipse: a square with round corners
    blob = np.where(rounded[..., None], np.float32([0.86, 0.16, 0.16]), np.float32([0.96, 0.96, 0.96]))
    assert shapes.detect(blob)["shape"] == "square"
    assert shapes.shape_fit(blob, "square") < 0.95 < 0.99 <= shapes.shape_fit(square, "square")
    assert shapes.shape_fit(np.ones((64, 64, 3), np.float32), "circle") == 0.0
    with pytest.raises(ValueError, match="hexagon"):
        shapes.shape_fit(square, "hexagon")
    with pytest.raises(ValueError, match="shape_fit expects an RGB image"):
        shapes.shape_fit(square[..., 0], "square")


def test_box_fill_tells_pinched_sides_from_round_corners():
    """A crisp square fills its box everywhere; a rounded one (superellipse) misses its corners only; a
    pinched, four-lobed one (a square with a bite out of each side) misses the middle of its sides, as small squares
    drawn by the reference model do (README)."""
    bg, red = np.float32([0.96, 0.96, 0.96]), np.float32([0.86, 0.16, 0.16])
    yy, xx = (np.mgrid[:64, :64] + 0.5 - 32) / 16
    paint = lambda mask: np.where(mask[..., None], red, bg)
    crisp = shapes.box_fill(paint((np.abs(xx) <= 1) & (np.abs(yy) <= 1)))
    rounded = shapes.box_fill(paint(np.abs(xx) ** 4 + np.abs(yy) ** 4 <= 1))
    bites = [(xx - cx) ** 2 + (yy - cy) ** 2 <= 0.5 ** 2 for cx, cy in ((1.3, 0), (-1.3, 0), (0, 1.3), (0, -1.3))]
    pinched = shapes.box_fill(paint((np.abs(xx) <= 1) & (np.abs(yy) <= 1) & ~np.any(bites, axis=0)))
    assert crisp == {"corners": 1.0, "sides": 1.0}
    assert rounded["sides"] == 1.0 and rounded["corners"] < 0.9
    assert pinched["corners"] == 1.0 and pinched["sides"] < 0.9
    assert rounded["sides"] - pinched["sides"] > 0.1
    empty = shapes.box_fill(np.ones((64, 64, 3), np.float32))
    assert np.isnan(empty["corners"]) and np.isnan(empty["sides"])
    with pytest.raises(ValueError, match="patch"):
        shapes.box_fill(paint(np.abs(xx) <= 1), patch=0.0)
    with pytest.raises(ValueError, match="box_fill expects an RGB image"):
        shapes.box_fill(np.zeros((8, 8)))
