"""report.html: the files it writes (one sprite sheet per recipe, lossless, difference levels, NaN as
magenta), per-layer bits, refusals that name what is missing and leave nothing half-written, and the page
itself in headless Chromium: no console error, no request off the machine, one plot point per recipe,
hover, sorting, choosing a recipe shows its images (tiles of its sheets, pixel for pixel) and its
per-layer bits."""
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

import headless_chromium
from eval_runs import FLOW, LAYERS, MAGENTA, PROMPTS, SEEDS, SIZE, make_run, results
from sdjax.evaluation import html_report
from sdjax.evaluation.state import State
from sdjax.files import atomic_write_json
from sdjax.version import __version__


def page_json(path):
    text = open(path, encoding="utf-8").read()
    m = re.search(r'<script id="report-data" type="application/json">(.*?)</script>', text, re.S)
    return json.loads(m.group(1))


# ----------------------------------------------------------------------------------------- files


def tiles(path, n):
    """The ``n`` tiles of a sprite sheet (row K // cols, column K % cols), and the sheet's unused tiles."""
    sheet = np.asarray(Image.open(path))
    rows, cols = html_report.sprite_grid(n)
    assert sheet.shape[:2] == (rows * SIZE, cols * SIZE)
    cut = [sheet[r * SIZE:(r + 1) * SIZE, c * SIZE:(c + 1) * SIZE] for r in range(rows) for c in range(cols)]
    return np.stack(cut[:n]), cut[n:]


def test_write_html_writes_the_page_and_one_sprite_sheet_per_recipe(tmp_path):
    res, base = make_run(tmp_path)
    out = html_report.write_html(tmp_path)
    files = tmp_path / "report_files"
    assert out["html"] == str(tmp_path / "report.html") and out["folder"] == str(files)
    n = len(PROMPTS) * len(SEEDS)
    assert html_report.sprite_grid(n) == (2, 3)
    assert sorted(os.listdir(files)) == ["float.png", "plotly.min.js"] + sorted(
        f"r{i:02d}{end}" for i in range(len(res["recipes"])) for end in (".png", "-diff.png"))
    assert out["bytes"] == os.path.getsize(tmp_path / "report.html") + sum(
        os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(files) for f in fs)
    assert np.array_equal(tiles(files / "float.png", n)[0], base)
    for i, r in enumerate(res["recipes"]):
        img, _ = tiles(files / f"r{i:02d}.png", n)
        diff = Image.open(files / f"r{i:02d}-diff.png")
        assert diff.mode == "P" and diff.getpalette()[-3:] == list(MAGENTA)
        levels, _ = tiles(files / f"r{i:02d}-diff.png", n)
        assert (img[:, 1, 1, 0] == base[:, 1, 1, 0] + i + 1).all()         # lossless, this recipe's, each pair's
        assert np.array_equal(img[:, 2:], base[:, 2:]) == r["finite"]
        assert (levels[:, 0, 0] == html_report.DIFF_LEVELS[3]).all() and html_report.DIFF_LEVELS[3] == 64
        assert (levels[:, 1, 1] == html_report.DIFF_LEVELS[i + 1]).all() and (levels[:, 3, 3] == 0).all()
        bad = (img == MAGENTA).all(-1)
        assert bad[:, 4:8, 4:8].all() == (not r["finite"]) and (levels[:, 4:8, 4:8] == 255).all() == (not r["finite"])
        assert not bad[:, 8:].any() and (levels[:, 8:] < 255).all()
    data = page_json(tmp_path / "report.html")
    assert [r["name"] for r in data["recipes"]] == [r["name"] for r in res["recipes"]]
    assert [s["prompt"] for s in data["samples"]] == [p for p in PROMPTS for _ in SEEDS]   # prompt-major
    assert data["recipes"][1]["metrics"]["latent_psnr_1step_db"] == "__nan__"
    assert data["recipes"][3]["metrics"]["latent_psnr_1step_db"] == "__inf__"
    assert [m["key"] for m in data["metrics"]][:3] == ["latent_psnr_1step_db", "final_latent_psnr_db", "image_psnr_db"]
    html = open(tmp_path / "report.html", encoding="utf-8").read()
    assert "<b>bold</b>" not in html and "<i>test</i>" not in html          # data never becomes markup
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html)


def test_layer_bits_in_data_flow_order_with_thresholds_and_notes():
    layers, numel, bits = html_report.layer_bits(results())
    assert layers == FLOW and numel == [LAYERS[k] for k in FLOW]
    assert bits["mixed-4.50"]["bits"] == [6, 6, 16, 4, 2, 8, 16]    # named small layer kept; unnamed conv_out float
    assert bits["mixed-4.50"]["method"][-1] == "float"
    assert bits["palette-6bit"]["bits"] == [16, 6, 6, 6, 6, 6, 16]  # the small layers stay float under "*"
    assert bits["palette-6bit"]["method"][0] == "float (<= 2048 weights)"
    assert bits["w8-int8"]["bits"] == [16, 8, 8, 8, 8, 8, 16]
    assert "kind" in bits["w8-int8conv"]["note"]


def test_large_images_are_shown_shrunk_and_nan_stays_magenta():
    rng = np.random.default_rng(0)
    f = rng.integers(0, 200, (1, 600, 600, 3), dtype=np.uint8)
    q = f.copy()
    q[0, 300, 300] = MAGENTA
    shown, levels = html_report.page_images(f, q, k=3)
    assert shown.shape == (1, 200, 200, 3) and levels.shape == (1, 200, 200)
    assert (shown[0, 100, 100] == MAGENTA).all() and levels[0, 100, 100] == 255
    assert (levels[0] == 255).sum() == 1 and (levels[0] == 0).sum() == 200 * 200 - 1
    assert (html_report.shown_images(q, 3)[0, 100, 100] == MAGENTA).all()   # the float model's sheet alike


def test_sprite_sheets_tile_row_by_row_and_stay_about_square():
    assert [html_report.sprite_grid(n) for n in (1, 2, 4, 5, 48, 49, 50)] == [
        (1, 1), (1, 2), (2, 2), (2, 3), (7, 7), (7, 7), (7, 8)]
    t = np.arange(5 * 2 * 3, dtype=np.uint8).reshape(5, 2, 3)
    sheet = html_report.sprite(t)
    assert sheet.shape == (4, 9)
    for k in range(5):
        r, c = divmod(k, 3)
        assert np.array_equal(sheet[2 * r:2 * r + 2, 3 * c:3 * c + 3], t[k])
    assert not sheet[2:, 6:].any()
    assert html_report.sprite(np.zeros((5, 2, 3, 3), np.uint8)).shape == (4, 9, 3)


# ----------------------------------------------------------------------------------------- refusals


def _listing(folder):
    return sorted((os.path.relpath(os.path.join(d, f), folder), os.path.getmtime(os.path.join(d, f)))
                  for d, _, fs in os.walk(folder) for f in fs)


def _refused(folder, *words):
    before = _listing(folder) if os.path.isdir(folder) else None
    with pytest.raises(html_report.ReportError) as e:
        html_report.write_html(folder)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert (_listing(folder) if os.path.isdir(folder) else None) == before    # nothing written, nothing left
    return str(e.value)


def test_refusals_name_what_is_missing_and_write_nothing(tmp_path):
    _refused(str(tmp_path / "nope"), "no such folder")
    (tmp_path / "empty").mkdir()
    _refused(str(tmp_path / "empty"), "not an evaluation run", "no report.json")

    run = tmp_path / "run"
    res, _ = make_run(run)
    html_report.write_html(run)                                   # a page exists: a refusal must leave it as it was
    os.remove(run / "report.json")
    _refused(str(run), "incomplete", "report.json is missing", "rerun the same `sdjax eval`")

    atomic_write_json(run / "report.json", dict(res, sdjax_version="0.0.1"))
    _refused(str(run), "sdjax 0.0.1", f"this is sdjax {__version__}")
    atomic_write_json(run / "report.json", {k: v for k, v in res.items() if k != "sdjax_version"})
    _refused(str(run), "not written by sdjax eval")
    (run / "report.json").write_text("{\"sdjax_version\": ")
    _refused(str(run), "report.json: unreadable")

    broken = dict(res, float=None, recipes=[{"name": "x"}] + res["recipes"][1:])
    broken["settings"] = {k: v for k, v in res["settings"].items() if k != "seeds"}
    atomic_write_json(run / "report.json", broken)
    _refused(str(run), "missing settings.seeds; float; recipes[0] (x): avg_bits, metrics")

    atomic_write_json(run / "report.json", res)
    os.remove(run / "state" / "recipes" / "palette-2bit.npz")
    os.remove(run / "state" / "float.npz")
    msg = _refused(str(run), "incomplete", "float.npz is missing", "palette-2bit.npz is missing")
    assert "mixed-4.50" not in msg

    make_run(run)
    State(run).save_arrays({"images": np.zeros((2, SIZE, SIZE, 3), np.uint8)}, "recipes", "w8-int8.npz")
    _refused(str(run), "w8-int8.npz: images of shape (2, 16, 16, 3), expected (6, H, W, 3) for 3 prompts x 2 seeds")


# ----------------------------------------------------------------------------------------- in a browser


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if headless_chromium.find_chromium() is None:
        pytest.skip("chromium not found (Debian: apt-get install chromium chromium-driver; .ci/run installs it)")
    driver = headless_chromium.start(str(tmp_path_factory.mktemp("chromium-profile") / "profile"))
    yield driver
    driver.quit()


def open_page(driver, path):
    from selenium.webdriver.support.ui import WebDriverWait
    driver.get("file://" + os.path.abspath(path))
    WebDriverWait(driver, 20).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))


def wait_images(driver):
    """The image panel's tiles as ``[(its sprite sheet's URL, its pair)]``, once every sheet has loaded (a
    broken one fails the wait)."""
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(driver, 20).until(lambda d: d.execute_script(
        "const im = [...document.querySelectorAll('#images .tile img')];"
        "return im.length > 0 && im.every((i) => i.complete && i.naturalWidth > 0);"))
    return [tuple(t) for t in driver.execute_script(
        "return [...document.querySelectorAll('#images .tile')].map((t) => [t.querySelector('img').src, +t.dataset.tile])")]


def shown_tile(driver, j, row):
    """The pixels the page shows for pair ``j`` in image row ``row`` (0 float, 1 recipe, 2 difference),
    its 1-pixel border cut off."""
    import io
    from selenium.webdriver.common.by import By
    tile = driver.find_elements(By.CSS_SELECTOR, f"#images .sample[data-sample='{j}'] .tile")[row]
    return np.asarray(Image.open(io.BytesIO(tile.screenshot_as_png)).convert("RGB"))[1:-1, 1:-1]


def point_of(driver, name):
    """(curve, point, its DOM element) of recipe ``name`` on the quality plot."""
    return driver.execute_script("""
        const p = document.getElementById('plot'), names = arguments[0];
        for (let c = 0; c < p.data.length; c++) {
          const k = (p.data[c].customdata || []).findIndex((i) => JSON.parse(
            document.getElementById('report-data').textContent).recipes[i].name === names);
          if (k >= 0) return [c, k, document.querySelectorAll('#plot .scatterlayer .trace')[c].querySelectorAll('.point')[k]];
        }
        return null;""", name)


def test_the_page_in_headless_chromium(browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    res, base = make_run(tmp_path)
    html_report.write_html(tmp_path)
    headless_chromium.requested_urls(browser), headless_chromium.console_errors(browser)    # start both logs afresh
    open_page(browser, tmp_path / "report.html")
    names = [r["name"] for r in res["recipes"]]

    # one point per recipe: the NaN one at the bottom, the one identical to float at the top
    assert browser.execute_script("return document.querySelectorAll('#plot .scatterlayer .point').length") == len(names)
    plotted = browser.execute_script("return document.getElementById('plot').data.flatMap((t) => t.customdata)")
    assert sorted(plotted) == list(range(len(names)))
    # hover names the recipe, its bits both ways and every reading
    c, k, _ = point_of(browser, "mixed-4.50")
    browser.execute_script("Plotly.Fx.hover('plot', [{curveNumber: arguments[0], pointNumber: arguments[1]}])", c, k)
    hover = browser.execute_script("return document.querySelector('#plot .hoverlayer').textContent")
    for text in ("mixed-4.50", "avg bits 4.50", "Apple bits 4.40", "candidate bits 4.30", "latent PSNR, 1 step (dB): 37.50 dB",
                 "final latent PSNR (dB): 39.50 dB", "image PSNR (dB): 44.00 dB", "SSIM: 0.9900", "adherence (all): 0.900",
                 "Apple's reading (dB): 57.50 dB", "noise PSNR (dB): 42.50 dB"):
        assert text in hover, (text, hover)
    # another reading: palette-2bit has no image PSNR, so one point fewer; Apple bits: w8-int8conv has none
    Select(browser.find_element(By.ID, "metric")).select_by_value("image_psnr_db")
    assert browser.execute_script("return document.querySelectorAll('#plot .scatterlayer .point').length") == len(names) - 1
    Select(browser.find_element(By.ID, "xbits")).select_by_value("apple_bits")
    assert browser.execute_script("return document.querySelectorAll('#plot .scatterlayer .point').length") == len(names) - 2
    assert "w8-int8conv" in browser.find_element(By.ID, "plot-note").text

    # choosing a recipe shows its images beside the float model's, and its per-layer bits
    Select(browser.find_element(By.ID, "recipe")).select_by_visible_text("mixed-4.50")
    shown = wait_images(browser)
    n = len(PROMPTS) * len(SEEDS)
    files = f"file://{tmp_path}/report_files"
    assert shown == [(f"{files}/{sheet}.png", j) for j in range(n) for sheet in ("float", "r02", "r02-diff")]
    assert all(os.path.exists(src[len("file://"):]) for src, _ in shown)
    rows, cols = html_report.sprite_grid(n)
    assert browser.execute_script("return [...new Set([...document.querySelectorAll('#images .tile img')].map("
                                  "(i) => i.naturalWidth + 'x' + i.naturalHeight))]") == [f"{cols * SIZE}x{rows * SIZE}"]
    assert "mixed-4.50" in browser.find_element(By.ID, "images-title").text
    # each tile is its pair's image, shown 6x (16 pixels to at least 96), pixel for pixel
    sheets = [np.asarray(Image.open(tmp_path / "report_files" / f).convert("RGB")) for f in ("r02.png", "r02-diff.png")]

    def up(a, j):
        r, c = divmod(j, cols)
        return a[r * SIZE:(r + 1) * SIZE, c * SIZE:(c + 1) * SIZE].repeat(6, 0).repeat(6, 1)
    for j in (0, 4, n - 1):
        assert np.array_equal(shown_tile(browser, j, 0), base[j].repeat(6, 0).repeat(6, 1))
        assert np.array_equal(shown_tile(browser, j, 1), up(sheets[0], j))
        assert np.array_equal(shown_tile(browser, j, 2), up(sheets[1], j))
        assert shown_tile(browser, j, 2)[0, 0, 0] == 64 and shown_tile(browser, j, 2)[6 * 3, 6 * 3, 0] == 0
    bars = browser.execute_script("const d = document.getElementById('layers').data[0]; return [d.x, d.y]")
    layers, _, bits = html_report.layer_bits(res)
    assert bars[1] == bits["mixed-4.50"]["bits"] and len(bars[0]) == len(layers) == 7
    assert browser.execute_script("return document.querySelectorAll('#layers .point').length") == len(layers)
    # a click on a table row chooses that recipe: the NaN one, its NaN pixels magenta
    browser.find_element(By.CSS_SELECTOR, "#recipes-table tr[data-name='palette-2bit']").click()
    shown = wait_images(browser)
    assert shown[1] == (f"{files}/r01.png", 0) and shown[-1] == (f"{files}/r01-diff.png", n - 1)
    assert (shown_tile(browser, 0, 1)[6 * 4:6 * 8, 6 * 4:6 * 8] == MAGENTA).all()
    assert (shown_tile(browser, 0, 2)[6 * 4:6 * 8, 6 * 4:6 * 8] == MAGENTA).all()
    assert "NaN/Inf: latents: 12 NaN" in browser.find_element(By.ID, "recipe-details").text
    assert "layers by kind" not in browser.find_element(By.ID, "layers-note").text
    # a click on a plot point chooses that recipe
    Select(browser.find_element(By.ID, "xbits")).select_by_value("avg_bits")
    ActionChains(browser).move_to_element(point_of(browser, "w8-int8conv")[2]).click().perform()
    assert browser.find_element(By.ID, "recipe").get_attribute("value") == str(names.index("w8-int8conv"))
    assert wait_images(browser)[1] == (f"{files}/r04.png", 0)
    assert "layers by kind" in browser.find_element(By.ID, "layers-note").text

    # the table sorts by any column, both ways; recipes without a value last
    def order():
        return [tr.get_attribute("data-name") for tr in browser.find_elements(By.CSS_SELECTOR, "#recipes-table tbody tr[data-name]")]
    browser.find_element(By.CSS_SELECTOR, "th[data-key='avg_bits']").click()
    assert order() == [r["name"] for r in sorted(res["recipes"], key=lambda r: r["avg_bits"])]
    browser.find_element(By.CSS_SELECTOR, "th[data-key='avg_bits']").click()
    assert order() == [r["name"] for r in sorted(res["recipes"], key=lambda r: -r["avg_bits"])]
    browser.find_element(By.CSS_SELECTOR, "th[data-key='m:image_psnr_db']").click()
    assert order() == ["mixed-4.50", "palette-6bit", "w8-int8", "w8-int8conv", "palette-2bit"]
    browser.find_element(By.CSS_SELECTOR, "th[data-key='name']").click()
    assert order() == sorted(names)

    # the run's settings, versions and timings
    run = browser.find_element(By.ID, "run").text
    for text in ("dpmpp_2m", "0123456789abcdef", "3 prompts x 2 seeds (0, 1) = 6", "plotly.js", "numpy",
                 "sdjax's per-layer sweep (k-means)", "1.4 min", "Fisher estimate of layer sensitivity"):
        assert text in run, text
    assert browser.execute_script("return document.getElementById('subtitle').textContent").startswith("a <i>test</i> model")

    # no console error, and nothing asked of any other host; the log does see the page's own files
    assert headless_chromium.console_errors(browser) == []
    urls = headless_chromium.requested_urls(browser)
    assert headless_chromium.not_local(urls) == []
    assert any(u.endswith("/report_files/plotly.min.js") for u in urls)
    assert any(u.endswith("/report_files/r04-diff.png") for u in urls)
    browser.save_screenshot(str(tmp_path / "page.png"))
    assert Image.open(tmp_path / "page.png").size[0] > 0
    # and the page's Content-Security-Policy stops what would reach another host before it goes out
    browser.execute_script("const i = document.createElement('img'); i.src = 'http://192.0.2.1/x.png';"
                           "document.body.append(i); fetch('https://192.0.2.1/y').catch(() => null);")
    from selenium.webdriver.support.ui import WebDriverWait
    errors = WebDriverWait(browser, 10).until(lambda d: headless_chromium.console_errors(d) or None)
    assert any("Content Security Policy" in e for e in errors), errors
    assert [(u, why) for u, why in headless_chromium.requests(browser) if u.startswith("http")] == [
        ("http://192.0.2.1/x.png", "csp")]


def test_the_browser_checks_can_fail(browser, tmp_path):
    """The probes above see a console error, a failed load and a request to another host."""
    page = tmp_path / "probe.html"
    page.write_text("<!DOCTYPE html><html><body><img src='http://192.0.2.1/x.png'><img src='missing.png'>"
                    "<script>console.error('probe'); document.body.dataset.ready = '1'</script></body></html>")
    headless_chromium.requested_urls(browser), headless_chromium.console_errors(browser)
    open_page(browser, page)
    errors = headless_chromium.console_errors(browser)
    assert any("probe" in e for e in errors) and any("missing.png" in e for e in errors), errors
    assert headless_chromium.not_local(headless_chromium.requested_urls(browser)) == ["http://192.0.2.1/x.png"]


def test_a_page_without_its_folder_says_so(browser, tmp_path):
    make_run(tmp_path)
    html_report.write_html(tmp_path)
    os.remove(tmp_path / "report_files" / "plotly.min.js")
    headless_chromium.console_errors(browser)
    open_page(browser, tmp_path / "report.html")
    from selenium.webdriver.common.by import By
    assert "plotly.min.js did not load" in browser.find_element(By.ID, "plot").text
    assert len(browser.find_elements(By.CSS_SELECTOR, "#recipes-table tbody tr[data-name]")) == 5
    assert any("plotly.min.js" in e for e in headless_chromium.console_errors(browser))
