"""The streaming safetensors reader and writer against the safetensors library (which we did not
write): each reads what the other wrote, every dtype, metadata; bad input is one clear error."""
import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sdjax import safetensors_io as sio

DTYPES = [np.float64, np.float32, np.float16, ml_dtypes.bfloat16, np.int64, np.int32, np.int16, np.int8,
          np.uint8, np.uint16, np.uint32, np.uint64, np.bool_]


def _tensors():
    rng = np.random.default_rng(0)
    out = {}
    for i, dt in enumerate(DTYPES):
        shape = [(3, 5), (7,), (2, 1, 4), (0, 3), ()][i % 5]
        out[f"t{i}.{np.dtype(dt).name}"] = np.asarray(rng.standard_normal(shape) * 50).astype(dt)
    return out


def test_the_library_reads_what_we_write(tmp_path):
    tensors = _tensors()
    sio.write(tmp_path / "a.safetensors", tensors, metadata={"format": "pt", "n": 3})
    got = load_file(tmp_path / "a.safetensors")
    assert set(got) == set(tensors)
    for k, a in tensors.items():
        assert got[k].dtype == a.dtype and got[k].shape == a.shape
        np.testing.assert_array_equal(got[k], a)
    from safetensors import safe_open
    with safe_open(tmp_path / "a.safetensors", "np") as f:
        assert f.metadata() == {"format": "pt", "n": "3"}


def test_we_read_what_the_library_writes(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "b.safetensors", metadata={"format": "pt"})
    with sio.Reader(tmp_path / "b.safetensors") as r:
        assert sorted(r.keys()) == sorted(tensors) and r.metadata == {"format": "pt"}
        for k, a in tensors.items():
            assert r.shape(k) == a.shape and r.dtype(k) == a.dtype
            np.testing.assert_array_equal(r.get(k), a)


def test_lazy_tensors_are_made_when_written(tmp_path):
    made = []
    lazy = sio.Lazy((2, 3), np.float32, lambda: made.append(1) or np.full((2, 3), 7, np.float32))
    sio.write(tmp_path / "c.safetensors", [("x", lazy)])
    assert made == [1]
    np.testing.assert_array_equal(load_file(tmp_path / "c.safetensors")["x"], np.full((2, 3), 7))


def test_a_failed_write_leaves_no_file(tmp_path):
    path = tmp_path / "d.safetensors"

    def boom():
        raise RuntimeError("conversion failed")
    with pytest.raises(RuntimeError, match="conversion failed"):
        sio.write(path, {"a": np.zeros(3, np.float32), "b": sio.Lazy((2,), np.float32, boom)})
    assert os.listdir(tmp_path) == []
    with pytest.raises(sio.SafetensorsError, match="cannot store dtype complex64 of 'z'"):
        sio.write(path, {"z": np.zeros(2, np.complex64)})


def _raw(header, data=b""):
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


@pytest.mark.parametrize("content,message", [
    (b"", "not a safetensors file"),
    (struct.pack("<Q", 10 ** 12), "corrupt or truncated"),
    (struct.pack("<Q", 4) + b"{{{{", r"corrupt safetensors header \(not JSON\)"),
    (_raw([1, 2]), "a JSON list"),
    (_raw({"__metadata__": {"a": 1}}), "__metadata__ must map strings"),
    (_raw({"w": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "corrupt header entry for 'w'"),
    (_raw({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), "corrupt header entry for 'w'"),
    (_raw({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), "has 4 bytes for shape"),
    (_raw({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4), "truncated: tensor 'w'"),
])
def test_bad_files_are_one_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(sio.SafetensorsError, match=message) as e:
        sio.Reader(path)
    assert str(e.value).startswith(str(path))
    with pytest.raises(sio.SafetensorsError, match="file not found"):
        sio.Reader(tmp_path / "missing.safetensors")
