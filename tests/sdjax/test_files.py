"""Files written whole or not at all, folders built aside and swapped in, and the resumable Store
that refuses records made under other settings."""
import json
import math
import os

import numpy as np
import pytest

from sdjax import files


def test_atomic_write_keeps_old_file(tmp_path):
    path = tmp_path / "report.json"
    files.atomic_write_json(path, {"ok": [1.0, math.inf, math.nan]})
    before = path.read_bytes()
    # json.dump has streamed the big list into the temporary file when it meets the object
    with pytest.raises(TypeError):
        files.atomic_write_json(path, {"a": list(range(20000)), "b": object()})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["report.json"]
    loaded = json.loads(before)
    assert loaded["ok"][1] == math.inf and math.isnan(loaded["ok"][2])
    # numpy values are written as numbers
    files.atomic_write_json(path, {"x": np.float32(1.5), "y": np.arange(3), "z": np.int64(2)})
    assert json.loads(path.read_text()) == {"x": 1.5, "y": [0, 1, 2], "z": 2}

    class Boom:
        def savefig(self, f, **kw):
            f.write(b"partial")
            raise RuntimeError("killed")
    fig_path = tmp_path / "plot.png"
    fig_path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        files.atomic_save_figure(Boom(), fig_path)
    assert fig_path.read_bytes() == b"old" and not (tmp_path / "plot.png.tmp").exists()
    files.atomic_write_text(tmp_path / "a.md", "héllo\n")
    assert (tmp_path / "a.md").read_text(encoding="utf-8") == "héllo\n"


def test_atomic_folder_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "out"
    with files.atomic_folder(out) as tmp:
        with open(os.path.join(tmp, "a.txt"), "w") as f:
            f.write("one")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "one"
    with pytest.raises(FileExistsError, match="already exists"):
        with files.atomic_folder(out):
            pass
    with pytest.raises(RuntimeError):
        with files.atomic_folder(out, overwrite=True) as tmp:
            open(os.path.join(tmp, "b.txt"), "w").close()
            raise RuntimeError("killed midway")
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(out) == ["a.txt"]  # the old folder stays
    with files.atomic_folder(out, overwrite=True) as tmp:
        open(os.path.join(tmp, "c.txt"), "w").close()
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(out) == ["c.txt"]


def test_store_records_arrays_and_settings(tmp_path):
    store = files.Store(tmp_path / "state")
    assert store.read("missing.json") is None and store.load_arrays("missing.npz") is None
    assert store.check_settings("settings.json", {"steps": 4, "seed": 0}, "made with other settings") is False
    assert store.check_settings("settings.json", {"steps": 4, "seed": 0}, "made with other settings") is True
    with pytest.raises(files.StoreError, match=r"settings.json: made with other settings \(seed, steps differ\)"):
        store.check_settings("settings.json", {"steps": 5, "seed": 1}, "made with other settings")

    store.save_recorded("h.json", "h.npz", {"n": 2}, {"a": np.arange(3)})
    np.testing.assert_array_equal(store.load_recorded("h.json", "h.npz", {"n": 2}, "x")["a"], np.arange(3))
    with pytest.raises(files.StoreError, match=r"h.json: statistics of another run \(n differ\).*delete"):
        store.load_recorded("h.json", "h.npz", {"n": 3}, "statistics of another run")
    # arrays without their record are not done yet
    store.save_arrays({"b": np.ones(2)}, "sub", "g.npz")
    assert store.load_recorded("sub/g.json", "sub/g.npz", {}, "x") is None

    (tmp_path / "state" / "broken.json").write_text("{half")
    with pytest.raises(files.StoreError, match="broken.json: unreadable.*delete it to recompute"):
        store.read("broken.json")

    reader = files.Store(tmp_path / "state", writer=False)  # another process of a distributed run
    reader.write({"x": 1}, "other.json")
    assert reader.read("other.json") is None and reader.read("settings.json") == {"steps": 4, "seed": 0}
