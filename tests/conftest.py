import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def pipeline_dirs(tmp_path_factory):
    """{style: (folder, diffusers pipeline)} built once per test session."""
    cache = {}

    def get(style):
        if style not in cache:
            folder = str(tmp_path_factory.mktemp(style))
            build = tiny_models.build_sdxl_pipeline if style in tiny_models.SDXL_STYLES else tiny_models.build_pipeline
            cache[style] = (folder, build(folder, style))
        return cache[style]
    return get
