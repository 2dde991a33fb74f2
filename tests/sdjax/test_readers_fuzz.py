"""Property-based tests of every reader of untrusted input (hypothesis): the safetensors reader, the
recipe parser, the config readers and the quantized-file reader either load what they are given or
raise the project's own error type; never another exception, never an allocation larger than the file."""
import json
import os
import struct
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

import quant
from quant import io as qio
from sdjax import configs
from sdjax.configs import ConfigError
from sdjax.params import CheckpointError
from sdjax.safetensors_io import Reader, SafetensorsError, write

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20)


def _valid_file(path):
    write(path, {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.int8)}, {"k": "v"})
    return open(path, "rb").read()


def _read_all(path):
    """Open and read every tensor; returns the bytes read. Only SafetensorsError may escape."""
    size = os.path.getsize(path)
    with Reader(path) as r:
        total = 0
        for k in r.keys():
            a = r.get(k)
            assert a.nbytes <= size  # nothing larger than the file could hold
            total += a.nbytes
    return total


def _check_reader(data):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "x.safetensors")
        with open(path, "wb") as f:
            f.write(data)
        try:
            _read_all(path)
        except SafetensorsError as e:
            assert path in str(e)


@FAST
@given(st.binary(max_size=200))
def test_safetensors_reader_random_bytes(data):
    _check_reader(data)


@FAST
@given(json_values)
def test_safetensors_reader_any_json_header(header):
    blob = json.dumps(header).encode()
    _check_reader(struct.pack("<Q", len(blob)) + blob + b"\0" * 64)


@FAST
@given(st.data())
def test_safetensors_reader_mutated_file(data):
    with tempfile.TemporaryDirectory() as d:
        good = bytearray(_valid_file(os.path.join(d, "good.safetensors")))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(good) - 1))
        good[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(good)))
    _check_reader(bytes(good[:cut]))


@pytest.mark.parametrize("header", [[], 3, "x", [{"dtype": "F32"}], None])
def test_a_header_that_is_not_an_object_is_one_clear_error(tmp_path, header):
    blob = json.dumps(header).encode()
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob)
    with pytest.raises(SafetensorsError, match="expected an object of tensor entries"):
        Reader(path)


@FAST
@given(json_values)
def test_recipe_parser_any_json(value):
    try:
        r = quant.parse_recipe(value if isinstance(value, dict) else {"rules": value})
    except quant.RecipeError:
        return
    assert isinstance(r, quant.Recipe)


@FAST
@given(st.dictionaries(st.sampled_from(["pattern", "method", "nbits", "group_size", "kind", "regex",
                                        "components", "threshold", "gptq", "sensitive", "weight_threshold"]),
                       json_values, max_size=5))
@example({"pattern": "0", "method": []})     # an unhashable method once escaped as TypeError
@example({"pattern": "*", "method": "int8", "kind": {}})
def test_recipe_parser_rule_fields(rule):
    try:
        quant.parse_recipe({"rules": [rule]})
    except quant.RecipeError:
        pass


@FAST
@given(st.sampled_from(["unet", "vae", "text_encoder"]), json_values)
def test_config_readers_any_json(component, value):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "config.json")
        with open(path, "w") as f:
            json.dump(value, f)
        try:
            configs.read(component, path)
        except ConfigError as e:
            assert path in str(e)


@FAST
@given(st.sampled_from(["unet", "vae", "text_encoder"]),
       st.dictionaries(st.sampled_from(["block_out_channels", "layers_per_block", "attention_head_dim",
                                        "cross_attention_dim", "in_channels", "hidden_size", "num_hidden_layers",
                                        "down_block_types", "latent_channels", "norm_num_groups", "sample_size",
                                        "num_attention_heads", "intermediate_size", "hidden_act"]),
                       json_values, max_size=4))
def test_config_readers_mutated_fields(component, fields):
    try:
        configs.READERS[component](fields, source="fuzz")
    except ConfigError:
        pass


@pytest.fixture(scope="module")
def quantized_unet(tmp_path_factory):
    """A quantized embedded model's UNet folder (palettized, int8 and float layers)."""
    import sdjax
    pipe = sdjax.load(None, progress=False)
    q = pipe.quantize({"rules": [{"pattern": "down_blocks.*", "method": "palettize", "nbits": 4},
                                 {"pattern": "up_blocks.*", "method": "int8"}]})
    out = tmp_path_factory.mktemp("q") / "model"
    qio.save(q, str(out), progress=False)
    return out / "unet"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_quantized_reader_mutated_file(quantized_unet, data):
    good = bytearray((quantized_unet / qio.WEIGHTS_NAME).read_bytes())
    (n,) = struct.unpack("<Q", bytes(good[:8]))
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, 8 + n - 1))  # the header: names, shapes, offsets, per-layer metadata
        good[i] = data.draw(st.integers(32, 126))
    cut = data.draw(st.sampled_from([len(good), data.draw(st.integers(0, len(good)))]))
    with tempfile.TemporaryDirectory() as d:
        for name in os.listdir(quantized_unet):
            if name != qio.WEIGHTS_NAME:
                with open(quantized_unet / name, "rb") as src, open(os.path.join(d, name), "wb") as dst:
                    dst.write(src.read())
        with open(os.path.join(d, qio.WEIGHTS_NAME), "wb") as f:
            f.write(bytes(good[:cut]))
        try:
            qio.load_component(d, "unet", progress=False)
        except (CheckpointError, ConfigError, SafetensorsError):
            pass
