import atexit
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# JAX's persistent compilation cache, for this run only (a fresh folder, removed at exit), holding every
# program however quickly it compiled: the suite builds the same tiny models again and again (an identical
# rebuild's predict + fit step: 55 s -> 6 s; the harness's V1 tests: 102 s -> 88 s, 2-core AMD EPYC). The
# compiled programs are the same, so no number changes. The environment
# variables reach the child processes the tests start; a user-set cache folder is left alone.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _jax_cache = tempfile.mkdtemp(prefix="keras-convnext-tests-jax-cache-")
    atexit.register(shutil.rmtree, _jax_cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _jax_cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
# On JAX, XLA compiling the tiny test models with LLVM at -O0: compiling, not running, is the JAX suite's
# time (the harness's V1 tests: 102 s -> 61 s on a 2-core EPYC; on TensorFlow, 36 s either way, so it is
# left alone there). XLA CPU does not reassociate floating point at any level (no fast math), so the
# numbers are the ones the optimised build gives; only the long runs (slow tests) run slower.
if os.environ.get("KERAS_BACKEND") == "jax" and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
try:  # torchvision must load before TensorFlow: the reverse order segfaults (TF 2.21, torchvision 0.29)
    import torchvision  # noqa: F401
except ImportError:
    pass

import keras
import numpy as np
import pytest

TINY = dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32))

# Tests whose work does not depend on this process's backend (their child processes choose their own
# backends, or the behaviour is the same Python whatever the backend) run in one backend's run only:
# torch's, not the longest of `make test`'s three runs (docs/testing.md has the figures).
ONCE_BACKEND = "torch"
once = pytest.mark.skipif(keras.backend.backend() != ONCE_BACKEND,
                          reason=f"independent of this process's backend: checked once, on {ONCE_BACKEND}")


def tiny_variant():
    """TINY as a `Variant`: what the training-mechanics tests train (compiling Atto costs 2-3x more)."""
    from keras_convnext.variants import Variant

    return Variant("test_tiny", TINY["depths"], TINY["dims"])


def fake_hardware(monkeypatch, device="cpu", isa="avx2"):
    """Makes `hardware.detect` report `device` and CPU `isa` (the dispatch table's inputs) for this test."""
    from keras_convnext import hardware

    here = dict(hardware.detect(keras.backend.backend()), device=device, isa=isa)
    monkeypatch.setattr(hardware, "detect", lambda backend=None: here)


# The resident size (GB) at which the next test's teardown collects garbage in full.
_collect_at_gb = [4.0]


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(1)
    yield
    keras.config.set_dtype_policy("float32")
    # A full garbage collection costs 1-5 s a test in a process holding TensorFlow, JAX and torch, so it runs
    # only when the process has grown 2 GB since the last one (first at 4 GB): the full-size models weigh
    # gigabytes. A fixed bar does not do: freed memory stays resident, and once past the bar every teardown
    # collected (2026-12-04, 2-core AMD EPYC: 1,173 of the TensorFlow run's 2,073 s, 718 of JAX's 2,052 s).
    collect = _resident_gb() > _collect_at_gb[0]
    keras.backend.clear_session(free_memory=collect)
    if collect:
        _collect_at_gb[0] = _resident_gb() + 2


def _resident_gb():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError):
        return float("inf")  # not Linux: always collect


@pytest.fixture
def images():
    return np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3)).astype("uint8")


# The `slow` marker: `make test` (and CI, through .ci/run) runs `-m "not slow"`, keeping CI under 30 minutes
# on 2 cores; `make test-all` runs everything. The marks are given here, by test file and name (a parametrized case by its id),
# until the owners of the test files put `@pytest.mark.slow` on the tests themselves. Only the digits
# run has a recorded time; the others are judged from what they start. `make test` prints the 20
# slowest tests of each backend (--durations), which is how to check and trim this list.
SLOW = {
    # ConvNeXt-Atto trained 12 epochs on 1,437 digits through `train`: the suite's longest test
    # (556 s on torch in the last fresh-clone CI run: 2-core AMD EPYC, the three backends side by side).
    "test_training.py": {
        "test_train_command_on_digits_from_scratch",
        # Two child processes, each starting the backend, compiling and training 5 epochs (killed,
        # then resumed).
        "test_training_resumes_after_a_kill",
    },
    # The train command's FCMAE pre-training of ConvNeXt V2-Atto (one epoch, 8 images, 64 px): 18 s on torch,
    # 63 s on JAX (XLA compiles Atto and its 512-channel decoder) in this session's 2-core run.
    "test_fcmae.py": {
        "test_train_command_pretrains_on_unlabelled_images",
    },
    # Full size is the point of the parameter counts; Base, Large and XLarge hold 88M-350M parameters
    # (0.35-1.4 GB of float32 each, drawn on the host), which is why the fixture above collects
    # garbage after a big test. Atto..Small stay in the fast run and still check the variant table.
    "test_model.py": {
        "test_parameter_count_of_every_variant[base]",
        "test_parameter_count_of_every_variant[large]",
        "test_parameter_count_of_every_variant[xlarge]",
    },
    # The same for V2: Base, Large and Huge hold 89M-660M parameters (Huge alone: 110 s on torch in a loaded
    # 2-core run); Atto..Small stay in the fast run.
    "test_v2.py": {
        "test_parameter_count_of_every_v2_variant[base]",
        "test_parameter_count_of_every_v2_variant[large]",
        "test_parameter_count_of_every_v2_variant[huge]",
    },
    # UperNet fitting 32 digit scenes for 30 epochs (a learning check: 30 s on JAX alone, 40 s in CI beside the
    # other backends, 191 s on torch there); its mechanics stay in the fast run (one SGD step moves every
    # variable, the main + auxiliary loss formula, the train command's segmentation run).
    "test_upernet.py": {
        "test_a_short_fit_on_digit_scenes_beats_the_all_background_baseline",
    },
    # Three exports in child processes (a JAX parent that starts a TensorFlow child), each killed at a
    # random point of its run, then a complete export.
    "test_export.py": {
        "test_export_killed_at_random_points_keeps_the_live_version_and_leaves_no_orphan",
    },
}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: over a minute on 2 cores, or a full-size model; `make test` and CI (-m 'not slow') "
                   "leave these out, `make test-all` runs them"
    )


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        slow = SLOW.get(item.path.name, ())
        if item.name in slow or getattr(item, "originalname", None) in slow:
            item.add_marker(pytest.mark.slow)


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend {keras.backend.backend()}"
