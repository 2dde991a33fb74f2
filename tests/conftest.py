import gc
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The suite compiles thousands of XLA programs of tiny models, and for them LLVM's optimisation takes longer than
# the programs run: at -O0 the backend compile time of tests/sdjax/test_generate.py fell from 109 s to 70 s and a
# mixed subset ran 23% faster (README, under the two commands). The HLO passes are the same; float rounding can differ by FMA
# contraction (an embedded-model image: 1 of 255 in some pixels), which every tolerance here covers.
# SDJAX_TEST_XLA_OPT=default compiles as users do. Set before JAX starts; the tests' subprocesses inherit it.


def _add_xla_flag(flag):
    """Append ``flag`` to XLA_FLAGS once (xdist's workers inherit the controller's environment and load this file too)."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    if flag not in flags:
        os.environ["XLA_FLAGS"] = " ".join(flags + [flag])


if os.environ.get("SDJAX_TEST_XLA_OPT") != "default":
    _add_xla_flag("--xla_backend_optimization_level=0")


def _one_thread_per_worker():
    """Under pytest-xdist with as many workers as cores (CI: -n 2 on 2 cores), each worker computes on one
    thread: XLA's Eigen pool, PyTorch's and OpenBLAS's OpenMP pools would otherwise each start a thread per
    core in every worker, and the workers' threads fight over the cores. On test_generate.py +
    test_sdxl_generate.py alone with -n 2 this took the wall time from 226-254 s to 156 s; over the whole suite
    about 10% (README). Set before JAX, torch or NumPy's BLAS start; the tests' subprocesses inherit it. A single
    process keeps every core."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers < max(1, os.cpu_count() or 1):
        return
    _add_xla_flag("--xla_cpu_multi_thread_eigen=false")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    if "torch" in sys.modules:  # imported before this file (a plugin): its pool exists already
        sys.modules["torch"].set_num_threads(1)


_one_thread_per_worker()

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


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """After each test module, drop JAX's compiled programs and traces: a worker otherwise keeps
    every program of every module it ran (7-8 GiB RSS per worker by the end of the suite, on a
    24 GiB CI machine that runs two workers beside the CLI tests' subprocesses)."""
    yield
    import jax
    jax.clear_caches()
    gc.collect()
