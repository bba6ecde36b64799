"""remap.py on plain dicts of small NumPy arrays: every layout's renaming, transposes and refusals, no model."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from keras_convnext import remap
from keras_convnext.checkpoints import CheckpointError


def refused(message):
    """pytest.raises for a CheckpointError whose message is exactly `message`."""
    return pytest.raises(CheckpointError, match=f"^{re.escape(message)}$")


def values(*shapes):
    """Arrays of the given shapes holding distinct numbers, so that a transpose or a swap shows."""
    out, start = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        out.append(np.arange(start, start + size, dtype="float32").reshape(shape))
        start += size
    return out


def renamed(state):
    official, layout, sources = remap.rename_to_official(state, "x.pth")
    for key, source in sources.items():
        assert official[key] is state[source] or official[key].base is state[source]  # no copies, no reordering
    return {sources[key]: key for key in official}, layout


TIMM = {  # one key of each kind of module, as timm names them
    "stem.0.weight": "downsample_layers.0.0.weight",
    "stem.0.bias": "downsample_layers.0.0.bias",
    "stem.1.weight": "downsample_layers.0.1.weight",
    "stages.1.downsample.0.weight": "downsample_layers.1.0.weight",
    "stages.1.downsample.1.bias": "downsample_layers.1.1.bias",
    "stages.0.blocks.0.conv_dw.weight": "stages.0.0.dwconv.weight",
    "stages.0.blocks.0.norm.bias": "stages.0.0.norm.bias",
    "stages.2.blocks.11.mlp.fc1.weight": "stages.2.11.pwconv1.weight",
    "stages.2.blocks.11.mlp.fc2.bias": "stages.2.11.pwconv2.bias",
    "stages.3.blocks.1.gamma": "stages.3.1.gamma",
    "head.norm.weight": "norm.weight",
    "head.fc.bias": "head.bias",
}
HUGGING_FACE = {
    "convnext.embeddings.patch_embeddings.weight": "downsample_layers.0.0.weight",
    "convnext.embeddings.layernorm.bias": "downsample_layers.0.1.bias",
    "convnext.encoder.stages.1.downsampling_layer.0.weight": "downsample_layers.1.0.weight",
    "convnext.encoder.stages.1.downsampling_layer.1.weight": "downsample_layers.1.1.weight",
    "convnext.encoder.stages.0.layers.0.dwconv.bias": "stages.0.0.dwconv.bias",
    "convnext.encoder.stages.0.layers.0.layernorm.weight": "stages.0.0.norm.weight",
    "convnext.encoder.stages.2.layers.7.pwconv1.weight": "stages.2.7.pwconv1.weight",
    "convnext.encoder.stages.2.layers.7.pwconv2.bias": "stages.2.7.pwconv2.bias",
    "convnext.encoder.stages.0.layers.0.layer_scale_parameter": "stages.0.0.gamma",
    "convnext.layernorm.weight": "norm.weight",
    "classifier.weight": "head.weight",
}


def test_timm_keys_become_official_keys():
    state = dict(zip(TIMM, values(*[(2,)] * len(TIMM))))
    assert renamed(state) == (TIMM, "timm")


@pytest.mark.parametrize("prefix", ["convnext.", ""])
def test_hugging_face_keys_become_official_keys_with_or_without_the_backbone_prefix(prefix):
    keys = {k.replace("convnext.", prefix, 1): v for k, v in HUGGING_FACE.items()}
    state = dict(zip(keys, values(*[(2,)] * len(keys))))
    assert renamed(state) == (keys, "huggingface")


def test_official_keys_stay_as_they_are():
    keys = ["downsample_layers.0.0.weight", "stages.1.0.pwconv2.weight", "stages.1.0.gamma", "head.bias"]
    state = dict(zip(keys, values(*[(2,)] * len(keys))))
    assert renamed(state) == ({k: k for k in keys}, "official")


def test_a_layout_is_detected_from_its_keys():
    assert remap.detect_layout({"module.x": 0, "downsample_layers.0.0.weight": 0}) == "official"
    assert remap.detect_layout({"stem.0.weight": 0}) == "timm"
    assert remap.detect_layout({"embeddings.patch_embeddings.weight": 0}) == "huggingface"
    assert remap.detect_layout({"conv1.weight": 0, "fc.weight": 0}) is None
    with refused("x.pth: not a ConvNeXt state dict (no stem or downsample_layers keys). "
                 "First keys: ['conv1.weight']"):
        remap.to_official({"conv1.weight": np.ones(2, "f4")}, "x.pth")


def test_timm_pointwise_convs_become_matrices():
    fc1, fc2 = values((32, 8, 1, 1), (8, 32, 1, 1))
    state, layout = remap.to_official({"stem.0.weight": np.ones((8, 3, 4, 4), "f4"),
                                       "stages.0.blocks.0.mlp.fc1.weight": fc1,
                                       "stages.0.blocks.0.mlp.fc2.weight": fc2}, "x.pth")
    assert layout == "timm"
    np.testing.assert_array_equal(state["stages.0.0.pwconv1.weight"], fc1[:, :, 0, 0])
    np.testing.assert_array_equal(state["stages.0.0.pwconv2.weight"], fc2[:, :, 0, 0])
    assert state["stages.0.0.pwconv1.weight"].shape == (32, 8)
    with refused("x.pth: tensor 'stages.0.blocks.0.mlp.fc1.weight' has shape (32, 8, 3, 3); a timm pointwise conv is "
                 "(out, in, 1, 1)."):
        remap.to_official({"stem.0.weight": np.ones((8, 3, 4, 4), "f4"),
                           "stages.0.blocks.0.mlp.fc1.weight": np.ones((32, 8, 3, 3), "f4")}, "x.pth")


def test_official_layouts_become_keras_layouts():
    stem, down, dw, fc1, fc2, norm, gamma, head = values((5, 3, 4, 4), (6, 5, 2, 2), (5, 1, 7, 7), (20, 5), (5, 20),
                                                         (5,), (5,), (10, 6))
    layers = remap.official_to_flat({
        "downsample_layers.0.0.weight": stem, "downsample_layers.1.1.weight": down,
        "stages.0.0.dwconv.weight": dw, "stages.0.0.pwconv1.weight": fc1, "stages.0.0.pwconv2.weight": fc2,
        "stages.0.0.norm.weight": norm, "stages.0.0.gamma": gamma, "head.weight": head,
    }, "x.pth")
    assert {name: sorted(params) for name, params in layers.items()} == {
        "downsample_layers_0_0": ["weight"], "downsample_layers_1_1": ["weight"], "stages_0_0_dwconv": ["weight"],
        "stages_0_0_pwconv1": ["weight"], "stages_0_0_pwconv2": ["weight"], "stages_0_0_norm": ["weight"],
        "stages_0_0_gamma": ["gamma"], "head": ["weight"]}
    # (O, I, kh, kw) -> (kh, kw, I, O); depthwise (C, 1, kh, kw) -> (kh, kw, C, 1); linear (out, in) -> (in, out)
    np.testing.assert_array_equal(layers["downsample_layers_0_0"]["weight"], np.einsum("oihw->hwio", stem))
    np.testing.assert_array_equal(layers["downsample_layers_1_1"]["weight"], np.einsum("oihw->hwio", down))
    kernel = layers["stages_0_0_dwconv"]["weight"]
    assert kernel.shape == (7, 7, 5, 1) and kernel[2, 3, 4, 0] == dw[4, 0, 2, 3]
    np.testing.assert_array_equal(layers["stages_0_0_pwconv1"]["weight"], fc1.T)
    np.testing.assert_array_equal(layers["stages_0_0_pwconv2"]["weight"], fc2.T)
    np.testing.assert_array_equal(layers["head"]["weight"], head.T)
    assert layers["stages_0_0_norm"]["weight"] is norm and layers["stages_0_0_gamma"]["gamma"] is gamma


def test_keras_applications_h5_names_become_flat_modules():
    names = {
        "convnext_tiny_prestem_normalization/mean": None,  # ImageNet statistics: ConvNeXtPreprocessing's constants
        "convnext_tiny_stem/convnext_tiny_stem_conv/kernel": ("downsample_layers_0_0", "weight", (4, 4, 3, 8)),
        "convnext_tiny_stem/convnext_tiny_stem_conv/bias": ("downsample_layers_0_0", "bias", (8,)),
        "convnext_tiny_stem/convnext_tiny_stem_layernorm/gamma": ("downsample_layers_0_1", "weight", (8,)),
        "convnext_tiny_stem/convnext_tiny_stem_layernorm/beta": ("downsample_layers_0_1", "bias", (8,)),
        "convnext_tiny_downsampling_block_0/convnext_tiny_downsampling_layernorm_0/gamma":
            ("downsample_layers_1_0", "weight", (8,)),
        "convnext_tiny_downsampling_block_0/convnext_tiny_downsampling_conv_0/kernel":
            ("downsample_layers_1_1", "weight", (2, 2, 8, 16)),
        "convnext_tiny_downsampling_block_2/convnext_tiny_downsampling_conv_2/bias":
            ("downsample_layers_3_1", "bias", (16,)),
        "convnext_tiny_stage_1_block_2_depthwise_conv/kernel": ("stages_1_2_dwconv", "weight", (7, 7, 1, 16)),
        "convnext_tiny_stage_1_block_2_layernorm/beta": ("stages_1_2_norm", "bias", (16,)),
        "convnext_tiny_stage_1_block_2_pointwise_conv_1/kernel": ("stages_1_2_pwconv1", "weight", (16, 64)),
        "convnext_tiny_stage_1_block_2_pointwise_conv_2/bias": ("stages_1_2_pwconv2", "bias", (16,)),
        "convnext_tiny_stage_1_block_2_layer_scale/variable_17": ("stages_1_2_gamma", "gamma", (16,)),
        "convnext_tiny_head_layernorm/gamma": ("norm", "weight", (16,)),
        "convnext_tiny_head_dense/kernel": ("head", "weight", (16, 10)),
    }
    shapes = [target[2] if target else (3,) for target in names.values()]
    tensors = dict(zip(names, values(*shapes)))
    layers = remap.keras_apps_to_flat(tensors, "x.h5")
    got = {(name, param): value for name, params in layers.items() for param, value in params.items()}
    assert sorted(got) == sorted(target[:2] for target in names.values() if target)
    for key, target in names.items():
        if target is None:
            continue
        value = got[target[:2]]
        if key.endswith("depthwise_conv/kernel"):  # a grouped Conv2D's (7, 7, 1, C) -> depthwise (7, 7, C, 1)
            np.testing.assert_array_equal(value, tensors[key].transpose(0, 1, 3, 2))
        else:  # already channels-last
            assert value is tensors[key]
    with refused("x.h5: unexpected tensor 'convnext_tiny_extra/kernel' (2,) in the checkpoint."):
        remap.keras_apps_to_flat({"convnext_tiny_extra/kernel": np.ones(2, "f4")}, "x.h5")


def test_architecture_and_stem_of_a_flat_checkpoint():
    layers = {"downsample_layers_0_0": {"weight": np.ones((4, 4, 1, 8))},
              "downsample_layers_1_1": {"weight": np.ones((2, 2, 8, 16))},
              "downsample_layers_2_1": {"weight": np.ones((2, 2, 16, 24))},
              "downsample_layers_3_1": {"weight": np.ones((2, 2, 24, 32))},
              "stages_0_0_dwconv": {}, "stages_1_0_dwconv": {}, "stages_2_0_dwconv": {}, "stages_2_1_dwconv": {},
              "stages_3_0_dwconv": {}, "head": {"weight": np.ones((32, 7))}}
    assert remap.architecture_of(layers) == ((1, 1, 2, 1), (8, 16, 24, 32), 7)
    assert remap.stem_channels(layers) == 1
    del layers["head"]
    assert remap.architecture_of(layers)[2] is None


def test_the_stem_is_adapted_by_timms_rule():
    kernel = values((2, 2, 3, 4))[0]
    r, g, b = kernel[:, :, 0], kernel[:, :, 1], kernel[:, :, 2]
    assert remap.adapt_stem(kernel, 3) is kernel
    np.testing.assert_array_equal(remap.adapt_stem(kernel, 1)[:, :, 0], r + g + b)
    np.testing.assert_array_equal(remap.adapt_stem(kernel, 2), np.stack([r, g], 2) * 1.5)
    np.testing.assert_array_equal(remap.adapt_stem(kernel, 4), np.stack([r, g, b, r], 2) * 0.75)
    np.testing.assert_array_equal(remap.adapt_stem(kernel, 7), np.stack([r, g, b, r, g, b, r], 2) * (3 / 7))


def arrays(*shapes):
    return [np.ones(shape, "f4") for shape in shapes]


@pytest.mark.parametrize("convert, state, first, second, slot", [
    (remap.official_to_flat,
     dict(zip(["stages.0.0.dwconv.weight", "stages_0_0_dwconv.weight"], arrays((8, 1, 7, 7), (8, 1, 7, 7)))),
     "stages.0.0.dwconv.weight", "stages_0_0_dwconv.weight", "stages_0_0_dwconv.weight"),
    (remap.official_to_flat,
     dict(zip(["downsample_layers.0.0.weight", "downsample_layers_0.0.weight"], arrays((8, 3, 4, 4), (8, 3, 4, 4)))),
     "downsample_layers.0.0.weight", "downsample_layers_0.0.weight", "downsample_layers_0_0.weight"),
    (remap.keras_apps_to_flat,
     dict(zip(["a_stem_conv/a_stem_conv/kernel", "b/b_stem_conv/kernel"], arrays((4, 4, 3, 8), (4, 4, 3, 8)))),
     "a_stem_conv/a_stem_conv/kernel", "b/b_stem_conv/kernel", "downsample_layers_0_0.weight"),
    (remap.keras_apps_to_flat,
     dict(zip(["m/m_stage_0_block_0_layer_scale/gamma", "m/m_stage_0_block_0_layer_scale/variable"], arrays(8, 8))),
     "m/m_stage_0_block_0_layer_scale/gamma", "m/m_stage_0_block_0_layer_scale/variable", "stages_0_0_gamma.gamma"),
    (remap.to_official,
     dict(zip(["stem.0.weight", "stages.0.blocks.0.conv_dw.weight", "stages.0.0.dwconv.weight"],
              arrays((8, 3, 4, 4), (8, 1, 7, 7), (8, 1, 7, 7)))),
     "stages.0.blocks.0.conv_dw.weight", "stages.0.0.dwconv.weight", "stages.0.0.dwconv.weight"),
    (remap.to_official,
     dict(zip(["convnext.embeddings.patch_embeddings.weight", "embeddings.patch_embeddings.weight"],
              arrays((8, 3, 4, 4), (8, 3, 4, 4)))),
     "convnext.embeddings.patch_embeddings.weight", "embeddings.patch_embeddings.weight",
     "downsample_layers.0.0.weight"),
])
def test_two_source_tensors_for_one_slot_are_refused_naming_both(convert, state, first, second, slot):
    with refused(f"x.pth: tensors {first!r} and {second!r} both become {slot!r}; "
                 "a checkpoint holds each weight once."):
        convert(state, "x.pth")


@pytest.mark.parametrize("key, shape, slot, rank", [
    ("downsample_layers.0.0.weight", (), "downsample_layers_0_0.weight", 4),
    ("downsample_layers.2.1.weight", (8, 3, 4), "downsample_layers_2_1.weight", 4),
    ("downsample_layers.2.0.weight", (8, 1), "downsample_layers_2_0.weight", 1),
    ("stages.1.3.dwconv.weight", (8, 7, 7), "stages_1_3_dwconv.weight", 4),
    ("stages.1.3.dwconv.bias", (8, 1), "stages_1_3_dwconv.bias", 1),
    ("stages.0.0.pwconv1.weight", (8, 4, 1, 1), "stages_0_0_pwconv1.weight", 2),  # official: no 1x1-conv form
    ("stages.0.0.norm.weight", (2, 2), "stages_0_0_norm.weight", 1),
    ("stages.0.0.gamma", (2, 2), "stages_0_0_gamma.gamma", 1),
    ("head.weight", (), "head.weight", 2),
    ("norm.bias", (3, 1), "norm.bias", 1),
])
def test_a_tensor_of_the_wrong_rank_is_refused_before_any_transpose(key, shape, slot, rank):
    with refused(f"x.pth: tensor {key!r} has shape {shape}; {slot!r} holds a {rank}-D tensor."):
        remap.official_to_flat({key: np.ones(shape, "f4")}, "x.pth")


def test_timm_and_keras_applications_ranks_are_checked_under_the_files_names():
    with refused("x.pth: tensor 'stages.0.blocks.0.conv_dw.weight' has shape (8, 7, 7); 'stages_0_0_dwconv.weight' "
                 "holds a 4-D tensor."):
        remap.torch_to_flat({"stem.0.weight": np.ones((8, 3, 4, 4), "f4"),
                             "stages.0.blocks.0.conv_dw.weight": np.ones((8, 7, 7), "f4")}, "x.pth")
    with refused("x.h5: tensor 'm_stage_0_block_0_depthwise_conv/kernel' has shape (7, 7, 8); "
                 "'stages_0_0_dwconv.weight' holds a 4-D tensor."):
        remap.keras_apps_to_flat({"m_stage_0_block_0_depthwise_conv/kernel": np.ones((7, 7, 8), "f4")}, "x.h5")


@pytest.mark.parametrize("key", ["stages.0.0.dwconv.running_mean", "weight", "stages.0.0.scale"])
def test_a_parameter_outside_the_contract_is_refused_by_name(key):
    with refused(f"x.pth: unexpected tensor {key!r} (3,) in the checkpoint."):
        remap.official_to_flat({key: np.ones(3, "f4")}, "x.pth")


def test_a_flat_checkpoint_is_checked_whole():
    shapes = remap.expected_shapes((1, 1, 1, 1), (2, 3, 4, 5), classes=6)
    layers = {}
    for (name, param), shape in shapes.items():
        layers.setdefault(name, {})[param] = np.zeros(shape, "f4")
    remap.check_complete(layers, "x.pth")
    assert shapes[("downsample_layers_0_0", "weight")] == (4, 4, 3, 2) and shapes[("head", "weight")] == (5, 6)
    del layers["stages_2_0_pwconv2"]["bias"]
    with refused("x.pth: missing tensor 'stages_2_0_pwconv2.bias' (shape (4,) in the ConvNeXt of depths (1, 1, 1, 1) "
                 "and dims (2, 3, 4, 5) it holds)."):
        remap.check_complete(layers, "x.pth")
    layers["stages_2_0_pwconv2"]["bias"] = np.zeros(5, "f4")
    with refused("x.pth: tensor 'stages_2_0_pwconv2.bias' has shape (5,), the ConvNeXt of depths (1, 1, 1, 1) and "
                 "dims (2, 3, 4, 5) it holds expects (4,)."):
        remap.check_complete(layers, "x.pth")
    layers["stages_1_2_dwconv"] = {"weight": np.zeros((7, 7, 3, 1), "f4")}
    with refused("x.pth: missing tensor 'stages_1_1_dwconv.weight' (stage 1 has block 2)."):
        remap.check_complete(layers, "x.pth")


NO_KERAS = r"""
import importlib.abc, sys, types

class NoKeras(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("keras", "tensorflow", "jax", "torch"):
            raise ImportError(f"{name} is blocked in this test")

sys.meta_path.insert(0, NoKeras())
package = types.ModuleType("keras_convnext")  # the package without its __init__, which builds models
package.__path__ = [sys.argv[1]]
sys.modules["keras_convnext"] = package
from keras_convnext import assign, remap
import numpy as np
layers, layout = remap.torch_to_flat({"stem.0.weight": np.ones((8, 3, 4, 4), "f4")}, "x.pth")
print(layout, *sorted(layers))
print(*sorted(m for m in sys.modules if m.startswith("keras")))
"""


def test_remap_and_assign_import_no_keras_and_no_backend():
    folder = os.path.dirname(remap.__file__)
    done = subprocess.run([sys.executable, "-c", NO_KERAS, folder], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-1500:]
    assert done.stdout.splitlines() == ["timm downsample_layers_0_0", "keras_convnext keras_convnext.assign "
                                        "keras_convnext.checkpoints keras_convnext.checks keras_convnext.names "
                                        "keras_convnext.remap keras_convnext.variants"]


# --- ConvNeXt V2 ------------------------------------------------------------------------------

V2_KEYS = {  # the GRN of each layout -> official V2 names; the rest is V1's renaming
    "stages.1.blocks.0.mlp.grn.weight": "stages.1.0.grn.gamma",  # timm, (C,)
    "stages.1.blocks.0.mlp.grn.bias": "stages.1.0.grn.beta",
    "convnextv2.encoder.stages.2.layers.7.grn.weight": "stages.2.7.grn.gamma",  # Hugging Face, (1, 1, 1, C)
    "convnextv2.encoder.stages.2.layers.7.grn.bias": "stages.2.7.grn.beta",
}


def test_timm_v2_keys_become_official_keys():
    keys = {**TIMM, **dict(list(V2_KEYS.items())[:2])}
    del keys["stages.3.blocks.1.gamma"]
    state = dict(zip(keys, values(*[(2,)] * len(keys))))
    assert renamed(state) == (keys, "timm")


@pytest.mark.parametrize("prefix", ["convnextv2.", ""])
def test_hugging_face_v2_keys_become_official_keys_with_or_without_the_backbone_prefix(prefix):
    keys = {k.replace("convnext.", "convnextv2.", 1): v for k, v in HUGGING_FACE.items() if "layer_scale" not in k}
    keys.update(dict(list(V2_KEYS.items())[2:]))
    keys = {k.replace("convnextv2.", prefix, 1): v for k, v in keys.items()}
    state = dict(zip(keys, values(*[(2,)] * len(keys))))
    assert renamed(state) == (keys, "huggingface")


@pytest.mark.parametrize("stored", [(8,), (1, 1, 1, 8)])
def test_a_grn_becomes_one_flat_module_of_c_values(stored):
    gamma, beta = values(stored, stored)
    layers = remap.official_to_flat({"stages.0.3.grn.gamma": gamma, "stages.0.3.grn.beta": beta}, "x.pt")
    assert list(layers) == ["stages_0_3_grn"] and sorted(layers["stages_0_3_grn"]) == ["beta", "gamma"]
    np.testing.assert_array_equal(layers["stages_0_3_grn"]["gamma"], gamma.reshape(8))
    np.testing.assert_array_equal(layers["stages_0_3_grn"]["beta"], beta.reshape(8))
    assert layers["stages_0_3_grn"]["gamma"].shape == (8,)


@pytest.mark.parametrize("shape", [(2, 4), (1, 1, 8, 1), (8, 1, 1, 1), (1, 1, 1, 1, 8), ()])
def test_a_grn_of_any_other_shape_is_refused_by_name(shape):
    with refused(f"x.pt: tensor 'stages.0.3.grn.gamma' has shape {shape}; 'stages_0_3_grn.gamma' holds a 1-D "
                 "tensor (or (1, 1, 1, C))."):
        remap.official_to_flat({"stages.0.3.grn.gamma": np.ones(shape, "f4")}, "x.pt")


@pytest.mark.parametrize("key", ["stages.0.0.grn.weight", "stages.0.0.grn.bias", "stages.0.0.grn.scale"])
def test_a_grn_parameter_outside_the_official_names_is_refused(key):
    with refused(f"x.pt: unexpected tensor {key!r} (3,) in the checkpoint."):
        remap.official_to_flat({key: np.ones(3, "f4")}, "x.pt")


def flat_checkpoint(version, depths=(1, 1, 1, 1), dims=(2, 3, 4, 5), classes=6):
    layers = {}
    for (name, param), shape in remap.expected_shapes(depths, dims, classes, version=version).items():
        layers.setdefault(name, {})[param] = np.zeros(shape, "f4")
    return layers


def test_a_v2_flat_checkpoint_is_checked_whole():
    shapes = remap.expected_shapes((1, 1, 1, 1), (2, 3, 4, 5), classes=6, version=2)
    assert shapes[("stages_2_0_grn", "gamma")] == shapes[("stages_2_0_grn", "beta")] == (16,)
    assert not [name for name, _ in shapes if name.endswith("_gamma")]  # no layer scale in V2
    layers = flat_checkpoint(2)
    remap.check_complete(layers, "x.pt")
    arch = remap.architecture_of(layers)
    assert arch == ((1, 1, 1, 1), (2, 3, 4, 5), 6) and arch.version == 2 and arch.family == "ConvNeXt V2"
    assert remap.architecture_of(flat_checkpoint(1)).version == 1
    del layers["stages_3_0_grn"]["beta"]
    with refused("x.pt: missing tensor 'stages_3_0_grn.beta' (shape (20,) in the ConvNeXt V2 of depths (1, 1, 1, 1) "
                 "and dims (2, 3, 4, 5) it holds)."):
        remap.check_complete(layers, "x.pt")
    layers["stages_3_0_grn"]["beta"] = np.zeros(5, "f4")
    with refused("x.pt: tensor 'stages_3_0_grn.beta' has shape (5,), the ConvNeXt V2 of depths (1, 1, 1, 1) and "
                 "dims (2, 3, 4, 5) it holds expects (20,)."):
        remap.check_complete(layers, "x.pt")


def test_a_checkpoint_mixing_layer_scales_and_grn_is_refused():
    layers = flat_checkpoint(2)
    layers["stages_1_0_gamma"] = {"gamma": np.zeros(3, "f4")}
    message = ("x.pt: holds both ConvNeXt layer scales ('stages_1_0_gamma.gamma') and ConvNeXt V2 GRN tensors "
               "('stages_0_0_grn.gamma'): a checkpoint is of one family.")
    with refused(message):
        remap.check_complete(layers, "x.pt")
    with refused(message):
        remap.architecture_of(layers, "x.pt")


def test_a_v1_checkpoint_without_its_layer_scales_is_not_taken_for_v2():
    layers = flat_checkpoint(1)
    del layers["stages_0_0_gamma"]
    with refused("x.pt: missing tensor 'stages_0_0_gamma.gamma' (shape (2,) in the ConvNeXt of depths (1, 1, 1, 1) "
                 "and dims (2, 3, 4, 5) it holds)."):
        remap.check_complete(layers, "x.pt")
