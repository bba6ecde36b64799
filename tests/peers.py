"""Randomly initialised peer models (timm, Hugging Face, keras.applications) and their files.

Every parameter is randomised (norms around 1, layer scales and ConvNeXt V2's GRN weight and bias
around 0.5) so that a conversion error anywhere changes the logits: with the default 1e-6 layer
scale the blocks would vanish, and with GRN's zero initialisation a GRN is the identity.
"""

import numpy as np

TINY_DEPTHS, TINY_DIMS = (1, 1, 2, 1), (8, 16, 24, 32)


def randomize_torch(model, seed=0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            if name.endswith("gamma") or "layer_scale" in name or ".grn." in name:
                p.copy_(0.5 + noise)
            elif ("norm" in name or "layernorm" in name) and name.endswith("weight"):
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)
    return model.eval()


def timm_model(name="convnext_atto", num_classes=10, **kwargs):
    import timm

    return randomize_torch(timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs))


def timm_to_official(state):
    """timm keys -> the official repository's keys (written out independently of the library)."""
    out = {}
    for key, value in state.items():
        value = value.detach().clone()
        parts = key.split(".")
        if parts[0] == "stem":
            new = f"downsample_layers.0.{parts[1]}." + ".".join(parts[2:])
        elif parts[0] == "stages" and parts[2] == "downsample":
            new = f"downsample_layers.{parts[1]}.{parts[3]}." + ".".join(parts[4:])
        elif parts[0] == "stages" and parts[2] == "blocks":
            rest = ".".join(parts[4:]).replace("conv_dw", "dwconv").replace("mlp.fc1", "pwconv1")
            rest = rest.replace("mlp.fc2", "pwconv2")
            if rest.startswith("mlp.grn."):  # V2: the official GRN is channels-last, (1, 1, 1, C), gamma/beta
                rest = {"weight": "grn.gamma", "bias": "grn.beta"}[parts[-1]]
                value = value.reshape(1, 1, 1, -1).contiguous()
            new = f"stages.{parts[1]}.{parts[3]}.{rest}"
            if "pwconv" in new and value.ndim == 4:
                value = value[:, :, 0, 0].contiguous()
        elif parts[0] == "head":
            new = {"norm": "norm", "fc": "head"}[parts[1]] + "." + parts[2]
        else:
            raise KeyError(key)
        out[new] = value
    return out


def torch_logits(model, images):
    """Peer logits for uint8 NHWC images, with the ImageNet normalisation done in float64."""
    import torch

    x = (images.astype("float64") / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    with torch.no_grad():
        out = model(torch.from_numpy(x.transpose(0, 3, 1, 2).astype("float32")))
    return (out.logits if hasattr(out, "logits") else out).numpy()


def hf_model(num_labels=10, layer_norm_eps=1e-12):
    from transformers import ConvNextConfig, ConvNextForImageClassification

    config = ConvNextConfig(hidden_sizes=list(TINY_DIMS), depths=list(TINY_DEPTHS), num_labels=num_labels,
                            layer_norm_eps=layer_norm_eps)
    return randomize_torch(ConvNextForImageClassification(config))


def hf_v2_model(num_labels=10, layer_norm_eps=1e-12):
    from transformers import ConvNextV2Config, ConvNextV2ForImageClassification

    config = ConvNextV2Config(hidden_sizes=list(TINY_DIMS), depths=list(TINY_DEPTHS), num_labels=num_labels,
                              layer_norm_eps=layer_norm_eps)
    return randomize_torch(ConvNextV2ForImageClassification(config))


def timm_features(model, images):
    """A timm model's last stage map (before the head's norm), NHWC, for uint8 NHWC images."""
    import torch

    x = (images.astype("float64") / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    with torch.no_grad():
        out = model.forward_features(torch.from_numpy(x.transpose(0, 3, 1, 2).astype("float32")))
    return out.numpy().transpose(0, 2, 3, 1)


def keras_apps_tiny(path, input_size=64):
    """keras.applications' ConvNeXtTiny, randomised, saved in the legacy `.h5` layout of its files."""
    import h5py
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    model = keras.applications.ConvNeXtTiny(weights=None, input_shape=(input_size, input_size, 3),
                                            classifier_activation=None)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if "prestem" in layer.name:
            continue
        values = []
        for w in layer.weights:
            base = 1.0 if w.name == "gamma" and "layernorm" in w.path else (0.5 if w.name == "gamma" else 0.0)
            values.append((base + 0.1 * rng.standard_normal(w.shape)).astype("float32"))
        layer.set_weights(values)
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    return model
