"""Prints the logit parity of every checkpoint format against its randomly initialised peer.

    KERAS_BACKEND=jax python weights/parity_report.py

The same comparisons as tests/test_weights.py, printed as figures (max |logit difference|), the
stem adapted to 1 and 4 input channels included, ConvNeXt V2 (timm, official layout, Hugging Face,
an FCMAE-style encoder's features) too. `--v2` prints the V2 rows alone.
"""

import os
import sys
import tempfile
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import torch  # noqa: E402  (before TensorFlow, see tests/conftest.py)
import torchvision  # noqa: E402,F401  (likewise: TensorFlow first segfaults)
import timm  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from peers import (TINY_DEPTHS, TINY_DIMS, hf_model, hf_v2_model, keras_apps_tiny, timm_features,  # noqa: E402
                   timm_model, timm_to_official, torch_logits)

import keras_convnext as kc  # noqa: E402


def main():
    pixels = np.random.default_rng(1).integers(0, 256, (4, 64, 64, 3)).astype("uint8")
    folder = tempfile.mkdtemp()
    rows = []

    def check(label, build, expected):
        ours = keras.ops.convert_to_numpy(build().predict(pixels, verbose=0))
        rows.append((label, float(np.abs(ours - expected).max()), float(np.abs(expected).max())))

    if "--v2" not in sys.argv:
        v1_rows(pixels, folder, rows, check)
    v2_rows(pixels, folder, check)
    print(f"backend {keras.backend.backend()}")
    print("| format | max abs logit diff | max abs logit |")
    print("|---|---|---|")
    for label, diff, scale in rows:
        print(f"| {label} | {diff:.2e} | {scale:.2f} |")


def v2_rows(pixels, folder, check):
    from safetensors.torch import save_file

    for arch, builder in (("convnextv2_atto", kc.ConvNeXtV2Atto), ("convnextv2_tiny", kc.ConvNeXtV2Tiny)):
        peer = timm_model(arch, num_classes=1000)  # GRN weight and bias around 0.5
        state = peer.state_dict()
        expected = torch_logits(peer, pixels)
        torch.save(state, os.path.join(folder, f"{arch}.pth"))
        torch.save({"model": timm_to_official(state)}, os.path.join(folder, f"official_{arch}.pt"))
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, f"{arch}.safetensors"))
        for label, path in ((f"timm {arch} .pth", f"{arch}.pth"), (f"timm {arch} .safetensors", f"{arch}.safetensors"),
                            (f"official-layout {arch} .pt (GRN (1, 1, 1, C))", f"official_{arch}.pt")):
            check(label, lambda p=path, b=builder: b(weights=os.path.join(folder, p), input_shape=(64, 64, 3),
                                                    classifier_activation=None), expected)
        if arch == "convnextv2_atto":
            save_file({k: v.contiguous() for k, v in state.items() if not k.startswith("head.")},
                      os.path.join(folder, "encoder.safetensors"))
            check(f"FCMAE-style {arch} encoder (no head, no norm): stage-3 features", lambda: builder(
                weights=os.path.join(folder, "encoder.safetensors"), include_top=False, input_shape=(64, 64, 3)),
                timm_features(peer, pixels))
    hf = hf_v2_model(num_labels=10)
    hf.save_pretrained(os.path.join(folder, "hf_v2"))
    check("Hugging Face ConvNextV2ForImageClassification", lambda: kc.ConvNeXtV2(
        TINY_DEPTHS, TINY_DIMS, weights=os.path.join(folder, "hf_v2", "model.safetensors"), classes=10,
        input_shape=(64, 64, 3), classifier_activation=None), torch_logits(hf, pixels))


def v1_rows(pixels, folder, rows, check):

    for arch, builder in (("convnext_atto", kc.ConvNeXtAtto), ("convnext_tiny", kc.ConvNeXtTiny)):
        peer = timm_model(arch, num_classes=1000)
        expected = torch_logits(peer, pixels)
        for label, path, obj in ((f"timm {arch} .pth", f"{arch}.pth", peer.state_dict()),
                                 (f"official-layout {arch} .pth", f"official_{arch}.pth",
                                  {"model": timm_to_official(peer.state_dict())})):
            torch.save(obj, os.path.join(folder, path))
            check(label, lambda p=path, b=builder: b(weights=os.path.join(folder, p), input_shape=(64, 64, 3),
                                                    classifier_activation=None), expected)
        if arch == "convnext_atto":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in peer.state_dict().items()}, os.path.join(folder, "a.safetensors"))
            check(f"timm {arch} .safetensors", lambda: builder(weights=os.path.join(folder, "a.safetensors"),
                                                               input_shape=(64, 64, 3), classifier_activation=None),
                  expected)
            # A 3-channel checkpoint into a 1- or 4-channel model: the stem adapted by timm's rule, against
            # timm's own model of that many channels pretrained from the same file (normalised inputs).
            for channels in (1, 4):
                theirs = timm.create_model(arch, pretrained=True, in_chans=channels, num_classes=1000,
                                           pretrained_cfg_overlay={"file": os.path.join(folder, f"{arch}.pth")}).eval()
                x = np.random.default_rng(2).normal(size=(4, 64, 64, channels)).astype("float32")
                with torch.no_grad():
                    expected_n = theirs(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # the note that the stem was adapted
                    ours = builder(weights=os.path.join(folder, f"{arch}.pth"), input_shape=(64, 64, channels),
                                   include_preprocessing=False, classifier_activation=None)
                rows.append((f"timm {arch} .pth into a {channels}-channel model (timm in_chans={channels})",
                             float(np.abs(ours.predict(x, verbose=0) - expected_n).max()),
                             float(np.abs(expected_n).max())))
    hf = hf_model(num_labels=10)
    hf.save_pretrained(os.path.join(folder, "hf"))
    check("Hugging Face ConvNextForImageClassification", lambda: kc.ConvNeXt(
        TINY_DEPTHS, TINY_DIMS, weights=os.path.join(folder, "hf", "model.safetensors"), classes=10,
        input_shape=(64, 64, 3), classifier_activation=None), torch_logits(hf, pixels))
    apps = keras_apps_tiny(os.path.join(folder, "apps.h5"))
    check("keras.applications ConvNeXtTiny .h5", lambda: kc.ConvNeXtTiny(
        weights=os.path.join(folder, "apps.h5"), input_shape=(64, 64, 3), classifier_activation=None),
        keras.ops.convert_to_numpy(apps.predict(pixels, verbose=0)))


if __name__ == "__main__":
    main()
