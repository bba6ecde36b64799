"""What importing the package loads, and what each install extra brings for the modules that need it.

The import checks run in a fresh interpreter each: this process has Keras and its backend loaded
(conftest.py), which makes `import keras_convnext` load everything at once.
"""

import ast
import importlib.metadata
import json
import os
import pathlib
import re
import subprocess
import sys
import tomllib

import keras
import pytest

import keras_convnext as kc
from conftest import once

ROOT = pathlib.Path(__file__).resolve().parents[1]
FRAMEWORKS = ("keras", "tensorflow", "jax", "torch")
LOADED = f"import sys; print(json.dumps([m for m in {FRAMEWORKS!r} if m in sys.modules]))"


def fresh_python(code, backend=None, timeout=300):
    """Runs `code` in a new interpreter (KERAS_BACKEND=backend, if given); returns its last stdout line."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    if backend:
        env["KERAS_BACKEND"] = backend
    done = subprocess.run([sys.executable, "-c", "import json\n" + code], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-3000:]}"
    return done.stdout.strip().splitlines()[-1]


# --- the lazy package ---------------------------------------------------------------------------

def test_import_loads_no_framework_until_a_public_name_is_used():
    backend = keras.backend.backend()
    out = fresh_python(
        "import os, sys\n"
        "import keras_convnext as kc\n"
        f"before = [m for m in {FRAMEWORKS!r} if m in sys.modules]\n"
        "kc.ConvNeXtAtto\n"
        "order = list(sys.modules)\n"
        "print(json.dumps({'before': before, 'keras': 'keras' in sys.modules,\n"
        "    'xla_flags': os.environ.get('XLA_FLAGS'),\n"
        "    'backend_ops_first': order.index('keras_convnext.backend_ops') < order.index('keras_convnext.layers')}))",
        backend=backend)
    result = json.loads(out)
    assert result["before"] == [] and result["keras"] and result["backend_ops_first"]
    if backend == "jax":  # backend_ops asked for XLA's memory-ordered schedule before JAX started
        from keras_convnext.backend_ops import XLA_MEMORY_SCHEDULE

        assert result["xla_flags"] == XLA_MEMORY_SCHEDULE


def test_the_light_modules_import_no_framework():
    # What the command line's parser and the standalone checkpoint reader are built from.
    modules = ("checks", "checkpoints", "cli", "names", "presets", "remap", "variants")
    out = fresh_python("".join(f"import keras_convnext.{m}\n" for m in modules) + LOADED,
                       backend=keras.backend.backend())
    assert json.loads(out) == []


NAMES = (  # what the package has always exported, and the core's new layers
    "AdamWLayerDecay", "CheckpointError", "ConvNeXt", "ConvNeXtAtto", "ConvNeXtBase", "ConvNeXtBlock",
    "ConvNeXtDownsample", "ConvNeXtFemto", "ConvNeXtLarge", "ConvNeXtModel", "ConvNeXtNano", "ConvNeXtPico",
    "ConvNeXtPreprocessing", "ConvNeXtSmall", "ConvNeXtStage", "ConvNeXtTiny", "ConvNeXtXLarge", "DownloadError",
    "ImageReadError", "Preset", "Recipe", "StochasticDepth", "VARIANTS", "Variant", "convert", "decode_image_bytes",
    "decode_predictions", "eval_transform", "export", "feature_pyramid", "fetch_preset", "get_preset", "get_recipe",
    "imagenet_classes", "list_presets", "list_recipes", "load_image", "normalize_pixels", "preprocess_input",
)


def test_every_public_name_is_listed_and_resolves():
    assert set(NAMES) <= set(kc.__all__) and "LayerScale" not in kc.__all__
    assert set(kc.__all__) <= set(dir(kc))
    namespace = {}
    exec("from keras_convnext import *", namespace)
    assert set(kc.__all__) <= set(namespace)
    for name in kc.__all__:
        value = getattr(kc, name)
        assert value.__module__.startswith("keras_convnext.") if callable(value) else value, name
    assert callable(kc.export) and kc.export.__module__ == "keras_convnext.export"  # the function, not its module
    with pytest.raises(AttributeError, match="no attribute 'LayerScale'"):
        kc.LayerScale


def test_a_keras_file_loads_when_keras_is_imported_first(tmp_path):
    model = kc.ConvNeXt((1, 1, 1, 1), (8, 16, 24, 32), weights=None, input_shape=(32, 32, 3), classes=3)
    path = str(tmp_path / "tiny.keras")
    model.save(path)
    out = fresh_python(
        "import keras\n"
        "import keras_convnext\n"
        f"model = keras.saving.load_model({path!r})\n"
        "print(json.dumps([type(model).__name__, model.count_params()]))",
        backend=keras.backend.backend())
    assert json.loads(out) == ["ConvNeXtModel", model.count_params()]


@once  # the children choose their backends whatever this process runs
@pytest.mark.parametrize("backend, code", [
    ("tensorflow", "import keras_convnext; keras_convnext.ConvNeXtAtto; import torchvision; import timm"),
    ("tensorflow", "import torchvision; import keras_convnext; keras_convnext.ConvNeXtAtto; import timm"),
    ("jax", "import keras_convnext; keras_convnext.ConvNeXtAtto; import tensorflow; import timm"),  # tf.data, as train
])
def test_tensorflow_and_torchvision_load_in_either_order(backend, code):
    # libtriton.so opened after TensorFlow segfaults (keras_convnext._open_triton_before_tensorflow).
    pytest.importorskip("torchvision")
    pytest.importorskip("timm")
    out = fresh_python(code + "\n" + LOADED, backend=backend)
    assert {"tensorflow", "torch"} <= set(json.loads(out))


# --- the install extras -------------------------------------------------------------------------

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
BACKEND_DISTRIBUTIONS = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
# Each extra -> the modules whose imports it must satisfy, on top of the base dependencies.
FEATURES = {
    "train": ("training", "data", "recipes"),
    "demo": ("demo",),
    "export": ("export",),
    "benchmark": ("benchmark",),
    "hub": ("hub",),
}
# What a module needs that it does not import itself: torch.onnx's exporter imports onnx and onnxscript.
INDIRECT = {"export": {"tensorflow", "torch", "onnx", "onnxscript"}}


def _canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement(text):
    """'jax[cpu]==0.10.2' -> ('jax', ['cpu'], '==0.10.2')."""
    name, extras, spec = re.fullmatch(r"([A-Za-z0-9._-]+)(?:\[([^\]]*)\])?\s*(.*)", text.strip()).groups()
    return _canonical(name), [e.strip() for e in (extras or "").split(",") if e.strip()], spec


def distributions_of(extra):
    """Every distribution an extra installs, through the package's own extras it names: {name: spec}."""
    found, todo, seen = {}, [extra], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for text in EXTRAS[current]:
            name, extras, spec = _requirement(text)
            if name == _canonical(PYPROJECT["project"]["name"]):
                todo.extend(extras)
            else:
                found[name] = spec
    return found


def imported_distributions(*modules):
    """The installed distributions that the keras_convnext `modules` import (anywhere in their code)."""
    owners = importlib.metadata.packages_distributions()
    tops = set()
    for module in modules:
        tree = ast.parse((ROOT / "keras_convnext" / f"{module}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                tops.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                tops.add(node.module.split(".")[0])
    tops -= set(sys.stdlib_module_names) | {"keras_convnext"}
    missing = sorted(t for t in tops if t not in owners)
    assert not missing, f"imported by {modules} but installed by no distribution here: {missing}"
    return {_canonical(owners[t][0]) for t in tops}


BASE = {_requirement(text)[0] for text in PYPROJECT["project"]["dependencies"]}


@pytest.mark.parametrize("extra", sorted(FEATURES))
def test_each_feature_extra_installs_what_its_modules_import(extra):
    needed = imported_distributions(*FEATURES[extra]) | INDIRECT.get(extra, set())
    assert needed - BASE - set(distributions_of(extra)) == set()


@pytest.mark.parametrize("backend", sorted(BACKEND_DISTRIBUTIONS))
def test_each_backend_extra_runs_every_command_but_export_and_benchmark(backend):
    from keras_convnext.cli import _NEEDS_TENSORFLOW

    installed = set(distributions_of(backend))
    assert BACKEND_DISTRIBUTIONS[backend] in installed
    assert not _NEEDS_TENSORFLOW or "tensorflow" in installed  # those commands read through tf.data on every backend
    for feature in ("train", "demo"):
        needed = imported_distributions(*FEATURES[feature]) - BASE
        assert needed <= installed, (feature, needed - installed)


def test_every_distribution_has_one_pin_and_all_installs_every_extra():
    pins = {}
    for extra in EXTRAS:
        for name, spec in distributions_of(extra).items():
            pins.setdefault(name, set()).add(spec)
    assert {name: specs for name, specs in pins.items() if len(specs) > 1} == {}
    everything = set().union(*(distributions_of(e) for e in EXTRAS if e not in ("all", "dev")))
    assert set(distributions_of("all")) == everything


def test_the_package_modules_import_each_other_without_a_cycle():
    # Every import between the package's modules, deferred ones inside functions included.
    import ast
    import pathlib

    import keras_convnext

    root = pathlib.Path(keras_convnext.__file__).parent
    graph = {}
    for path in root.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("keras_convnext."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.ImportFrom) and node.module == "keras_convnext":
                deps |= {alias.name for alias in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("keras_convnext.")}
        graph[path.stem] = deps - {path.stem, "__init__"}
    graph["__init__"] = set()  # the lazy loader imports everything by name, on first use
    assert {"model", "backbone", "weights", "names", "remap", "assign"} <= set(graph)

    def cycle_from(start, path):
        for dep in sorted(graph.get(start, ())):
            if dep in path:
                return path[path.index(dep):] + [dep]
            found = cycle_from(dep, path + [dep])
            if found:
                return found
        return None

    assert [c for c in (cycle_from(m, [m]) for m in sorted(graph)) if c] == []
