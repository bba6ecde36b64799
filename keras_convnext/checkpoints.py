"""Reading checkpoint files of every ConvNeXt ecosystem into NumPy, without running their code.

Formats are detected from content, never from the file name. PyTorch pickles (`.pth`, `.bin`)
are read by a restricted unpickler that builds tensors and plain containers only: the standard
`torch.load(weights_only=True)` would do the same but needs torch, and this must work without it.
"""

import io
import json
import os
import pickle
import zipfile
from collections import OrderedDict

import numpy as np

ZIP_MAGIC = b"PK\x03\x04"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""


def sniff_format(path):
    """Returns one of "torch_zip", "safetensors", "keras", "keras_weights_h5", "keras_h5_legacy"."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(ZIP_MAGIC):
        try:
            names = zipfile.ZipFile(path).namelist()
        except zipfile.BadZipFile as e:
            raise CheckpointError(f"{path}: a damaged zip archive ({e}).") from e
        if "config.json" in names and "model.weights.h5" in names:
            return "keras"
        if any(n.endswith("/data.pkl") for n in names):
            return "torch_zip"
        raise CheckpointError(f"{path}: a zip archive that is neither a PyTorch checkpoint nor a .keras file.")
    if head.startswith(HDF5_MAGIC):
        import h5py

        with h5py.File(path, "r") as f:
            if "layer_names" in f.attrs or "model_weights" in f:
                return "keras_h5_legacy"
            if "layers" in f or "vars" in f:
                return "keras_weights_h5"
        raise CheckpointError(f"{path}: an HDF5 file without Keras weights in it.")
    if len(head) >= 9 and head[8:9] == b"{":
        header_len = int.from_bytes(head[:8], "little")
        if 0 < header_len < os.path.getsize(path):
            return "safetensors"
    if head[:1] == b"\x80":
        raise CheckpointError(
            f"{path}: a PyTorch file in the legacy (pre-1.6) pickle format. Re-save it with "
            "torch.save(obj, path) from a recent PyTorch, or convert it to safetensors."
        )
    raise CheckpointError(
        f"{path}: not a checkpoint format keras_convnext reads (PyTorch .pth/.bin, safetensors, "
        f"Keras .keras/.weights.h5, keras.applications .h5). First bytes: {head[:8]!r}"
    )


# --- PyTorch zip pickles, read without torch --------------------------------------------------

class _Storage:
    """Marks a torch storage class in the pickle; `dtype` is how its bytes are read."""

    def __init__(self, dtype, bfloat16=False):
        self.dtype = np.dtype(dtype)
        self.bfloat16 = bfloat16


_STORAGES = {
    "FloatStorage": _Storage("<f4"), "DoubleStorage": _Storage("<f8"),
    "HalfStorage": _Storage("<f2"), "BFloat16Storage": _Storage("<u2", bfloat16=True),
    "LongStorage": _Storage("<i8"), "IntStorage": _Storage("<i4"), "ShortStorage": _Storage("<i2"),
    "CharStorage": _Storage("i1"), "ByteStorage": _Storage("u1"), "BoolStorage": _Storage("?"),
}


def _rebuild_tensor(storage, offset, size, stride, *unused):
    data, bfloat16 = storage
    itemsize = data.dtype.itemsize
    array = np.lib.stride_tricks.as_strided(
        data[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
    ).copy()
    if bfloat16:  # bfloat16 is the top half of a float32
        array = (array.astype("<u4") << 16).view("<f4")
    return array


def _rebuild_parameter(data, *unused):
    return data


_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): storage for name, storage in _STORAGES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data, archive, prefix, path):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.path = archive, prefix, path

    def find_class(self, module, name):
        if (module, name) in _GLOBALS:
            return _GLOBALS[(module, name)]
        raise CheckpointError(
            f"{self.path}: refusing to load '{module}.{name}': the file asks to run code that is "
            "not a tensor or a plain container, and checkpoints are read without running code. "
            "Load it yourself only if you trust it, and re-save its state_dict with safetensors."
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise CheckpointError(f"{self.path}: unexpected persistent id {pid!r}.")
        storage, key = pid[1], pid[2]
        if not isinstance(storage, _Storage):
            raise CheckpointError(f"{self.path}: unexpected storage type {storage!r}.")
        raw = self.archive.read(f"{self.prefix}/data/{key}")
        return np.frombuffer(raw, dtype=storage.dtype), storage.bfloat16


def load_torch_zip(path):
    with zipfile.ZipFile(path) as archive:
        pkl = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
        prefix = pkl[: -len("/data.pkl")]
        byteorder = f"{prefix}/byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
            raise CheckpointError(f"{path}: a big-endian PyTorch checkpoint is not supported.")
        try:
            return _RestrictedUnpickler(archive.read(pkl), archive, prefix, path).load()
        except CheckpointError:
            raise
        except Exception as e:  # a damaged pickle raises anything from EOFError to KeyError
            raise CheckpointError(f"{path}: cannot read the PyTorch checkpoint ({type(e).__name__}: {e}).") from e


def load_safetensors(path):
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except (SafetensorError, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read the safetensors file ({e}).") from e


def load_keras_h5_legacy(path):
    """keras.applications' released `.h5`: {weight name without ':0': array}."""
    import h5py

    tensors = {}
    with h5py.File(path, "r") as f:
        group = f["model_weights"] if "model_weights" in f else f
        for layer in group.attrs["layer_names"]:
            layer = layer.decode() if isinstance(layer, bytes) else layer
            for weight in group[layer].attrs["weight_names"]:
                weight = weight.decode() if isinstance(weight, bytes) else weight
                tensors[weight.split(":")[0]] = np.asarray(group[layer][weight])
    return tensors


def state_dict_of(obj, path):
    """The flat {name: array} of a loaded checkpoint, unwrapping `{"model": ...}` and the like."""
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: holds no state dict (found {type(obj).__name__}).")
    out = {}
    for key, value in obj.items():
        if not isinstance(value, np.ndarray):
            raise CheckpointError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor."
            )
        out[key[len("module."):] if key.startswith("module.") else key] = value
    return out


def read_hf_config(path):
    """A Hugging Face `config.json` beside the weights file, if there is one."""
    config = os.path.join(os.path.dirname(os.fspath(path)), "config.json")
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            return json.load(f)
    return {}
