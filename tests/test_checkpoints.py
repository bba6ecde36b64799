"""Checkpoint readers against hostile files: each attack is built here, in tmp_path, and must end in
a one-line CheckpointError (or the right values), never another exception, a crash or a hang.

Loads that could crash the process run in a subprocess that imports `checkpoints.py` alone
(NumPy and the standard library, no Keras, no torch). torch only writes the honest files.
"""

import collections
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import time
import zipfile

import h5py
import numpy as np
import pytest

from keras_convnext import checkpoints
from keras_convnext.checkpoints import CheckpointError

torch = pytest.importorskip("torch")

PRELUDE = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("checkpoints", {checkpoints.__file__!r})
ck = importlib.util.module_from_spec(spec)
sys.modules["checkpoints"] = ck
spec.loader.exec_module(ck)
"""
REFUSE = PRELUDE + """
import resource
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for path in sys.argv[1:]:
    try:
        ck.load_torch_zip(path)
        print("LOADED")
    except ck.CheckpointError as e:
        print("REFUSED", e)
print("GROWTH_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def isolated(script, *args, timeout=60):
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    return done.stdout


def refused_in_subprocess(*paths):
    """Loads each file in a fresh process: (its refusal messages, its peak memory growth in MB)."""
    lines = isolated(REFUSE, *paths).splitlines()
    assert len(lines) == len(paths) + 1 and all(line.startswith("REFUSED ") for line in lines[:-1]), lines
    return [line[len("REFUSED "):] for line in lines[:-1]], int(lines[-1].split()[1]) / 1024


def torch_values(state):
    """What a state dict's tensors must load as: bfloat16 widened to float32, the rest as they are."""
    return {k: (v.detach().float() if v.dtype == torch.bfloat16 else v.detach()).numpy() for k, v in state.items()}


def assert_same(loaded, expected):
    assert sorted(loaded) == sorted(expected)
    for key, value in expected.items():
        assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape, key
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)


# --- crafting torch zip checkpoints by hand ----------------------------------------------------

class Storage:
    """A storage as its persistent id names it: ('storage', torch.<kind>, key, 'cpu', numel)."""

    def __init__(self, key, numel, kind="FloatStorage"):
        self.key, self.numel, self.kind = key, numel, kind


class View:
    """A tensor as torch.save pickles one, with any geometry: `_rebuild_tensor_v2(storage, offset, size, stride...)`."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (self.storage, self.offset, self.size, self.stride, False,
                                                 collections.OrderedDict())


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return "storage", getattr(torch, obj.kind), obj.key, "cpu", obj.numel
        return None


def write_zip(path, pkl, storages=(), compression=zipfile.ZIP_STORED):
    """A torch zip checkpoint from raw data.pkl bytes and {key: bytes} storages."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        for key, data in dict(storages).items():
            z.writestr(f"archive/data/{key}", data, compress_type=compression)
        z.writestr("archive/version", "3\n")
    return path


def write_pth(path, obj, storages=()):
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(obj)
    return write_zip(path, buffer.getvalue(), storages)


def ops(*parts):
    """A pickle from opcodes: str parts are BINUNICODE strings, (module, name) tuples GLOBALs."""
    out = b"\x80\x02"
    for part in parts:
        if isinstance(part, str):
            out += b"X" + struct.pack("<I", len(part.encode())) + part.encode()
        elif isinstance(part, tuple):
            out += b"c" + f"{part[0]}\n{part[1]}\n".encode()
        else:
            out += part
    return out + b"."


FLOATS = np.arange(4, dtype="<f4").tobytes()


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    """A real torch.save of a real state dict, with every layout a reader must get right."""
    folder = tmp_path_factory.mktemp("honest")
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    state = module.state_dict()  # an OrderedDict with `_metadata`
    base = torch.randn(6, 5)
    fused = torch.randn(3 * 4)
    state.update({
        "half": torch.randn(7).half(), "bf16": torch.randn(2, 3).to(torch.bfloat16), "double": torch.randn(3).double(),
        "transposed": base.t(), "slice": base[2:, 1:4], "bf16_transposed": torch.randn(3, 2).to(torch.bfloat16).t(),
        "q": fused[0:4], "k": fused[4:8], "v": fused[8:], "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
    })
    torch.save(state, folder / "honest.pth")
    return folder / "honest.pth", state


# --- honest files ------------------------------------------------------------------------------

def test_torch_save_round_trips_exactly(honest):
    path, state = honest
    loaded = checkpoints.load_torch_zip(path)
    assert checkpoints.sniff_format(path) == "torch_zip"
    assert_same(loaded, torch_values(state))
    assert type(loaded) is collections.OrderedDict and list(loaded) == list(state)
    assert loaded._metadata == state._metadata
    assert loaded["half"].dtype == np.float16 and loaded["bf16"].dtype == np.float32
    assert loaded["double"].dtype == np.float64 and loaded["transposed"].shape == (5, 6)
    # Views of one storage come out as independent arrays: writing one leaves the others.
    loaded["q"][:] = 0
    np.testing.assert_array_equal(loaded["k"], state["k"].numpy())


@pytest.mark.parametrize("protocol", [4, 5])
def test_newer_pickle_protocols_round_trip(tmp_path, honest, protocol):
    _, state = honest  # FRAME, MEMOIZE, STACK_GLOBAL, SHORT_BINUNICODE instead of protocol 2's opcodes
    torch.save(state, tmp_path / "proto.pth", pickle_protocol=protocol)
    loaded = checkpoints.load_torch_zip(tmp_path / "proto.pth")
    assert_same(loaded, torch_values(state))
    assert loaded._metadata == state._metadata


def test_nested_checkpoint_and_parameters_round_trip(tmp_path, honest):
    _, state = honest
    param = torch.nn.Parameter(torch.randn(3, 2))
    torch.save({"model": state, "param": param, "epoch": 3}, tmp_path / "nested.pth")
    loaded = checkpoints.load_torch_zip(tmp_path / "nested.pth")
    assert loaded["epoch"] == 3
    np.testing.assert_array_equal(loaded["param"], param.detach().numpy())
    assert_same(checkpoints.state_dict_of(loaded, "nested.pth"), torch_values(state))


def test_views_of_one_storage_read_it_once(tmp_path, monkeypatch):
    base = torch.arange(64 * 4, dtype=torch.float32)
    torch.save({f"v{i}": base[4 * i:4 * (i + 1)] for i in range(64)}, tmp_path / "shared.pth")
    with zipfile.ZipFile(tmp_path / "shared.pth") as z:
        assert [n for n in z.namelist() if "/data/" in n] == ["shared/data/0"]  # one storage, 64 references
    opened = collections.Counter()
    real_open = zipfile.ZipFile.open

    def counting_open(self, name, *args, **kwargs):
        opened[getattr(name, "filename", name)] += 1
        return real_open(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", counting_open)
    loaded = checkpoints.load_torch_zip(tmp_path / "shared.pth")
    assert opened["shared/data/0"] == 1
    for i in range(64):
        np.testing.assert_array_equal(loaded[f"v{i}"], np.arange(4 * i, 4 * (i + 1), dtype="f4"))


def test_safetensors_round_trip_every_floating_type(tmp_path):
    from safetensors.torch import save_file

    state = {"f32": torch.randn(3, 4), "f16": torch.randn(5).half(), "bf16": torch.randn(2, 3).to(torch.bfloat16),
             "f64": torch.randn(2).double(), "empty": torch.zeros(0, 2)}
    save_file(state, str(tmp_path / "m.safetensors"))
    assert checkpoints.sniff_format(tmp_path / "m.safetensors") == "safetensors"
    assert_same(checkpoints.load_safetensors(tmp_path / "m.safetensors"), torch_values(state))


def write_legacy_h5(path, weights, layer_names=None):
    """keras.applications' `.h5` layout: layer groups listed in `layer_names`, each with `weight_names`."""
    with h5py.File(path, "w") as f:
        layers = {}
        for name, value in weights.items():
            layer = name.split("/")[0]
            layers.setdefault(layer, []).append(name + ":0")
            f.create_dataset(f"{layer}/{name}:0", data=value)
        f.attrs["layer_names"] = [n.encode() for n in (layer_names or layers)]
        for layer, names in layers.items():
            f[layer].attrs["weight_names"] = [n.encode() for n in names]
    return path


def test_legacy_h5_round_trip(tmp_path):
    weights = {"dense/kernel": np.random.default_rng(0).normal(size=(3, 2)).astype("f4"),
               "dense/bias": np.zeros(2, "f4")}
    path = write_legacy_h5(tmp_path / "legacy.h5", weights)
    assert checkpoints.sniff_format(path) == "keras_h5_legacy"
    loaded = checkpoints.load_keras_h5_legacy(path)
    for name, value in weights.items():
        np.testing.assert_array_equal(loaded[name], value)


# --- views outside their storage: memory disclosure and segfaults in the old reader -------------

VIEWS = {
    "out_of_bounds_offset": ((4,), (1,), 2, r"reaches element 5 of a storage of 4"),
    "out_of_bounds_stride": ((2, 2), (1000, 1), 0, r"reaches element 1001 of a storage of 4"),
    "huge_offset": ((1,), (1,), 2**40, r"reaches element 1099511627776 of a storage of 4"),
    "negative_stride": ((4,), (-1,), 3, r"sizes and strides must be non-negative integers"),
    "negative_size": ((-4,), (1,), 0, r"sizes and strides must be non-negative integers"),
    "float_size": ((4.0,), (1,), 0, r"sizes and strides must be non-negative integers"),
    "mismatched_ndim": ((2, 2), (1,), 0, r"size and stride must be tuples of one length"),
    "stride_zero_expansion": ((2**27,), (0,), 0, r"134217728 elements on a storage of 4; refusing to expand it"),
}


@pytest.mark.parametrize("case", list(VIEWS))
def test_a_view_outside_its_storage_is_refused_in_a_clean_process(tmp_path, case):
    size, stride, offset, message = VIEWS[case]
    path = write_pth(tmp_path / f"{case}.pth", {"w": View(Storage("0", 4), offset, size, stride)}, {"0": FLOATS})
    if case == "stride_zero_expansion":
        assert path.stat().st_size < 1000  # a few hundred bytes describing a 512 MB tensor
    (refusal,), growth_mb = refused_in_subprocess(path)
    assert f"{case}.pth: a tensor of size" in refusal and "\n" not in refusal
    assert growth_mb < 50, growth_mb
    with pytest.raises(CheckpointError, match=message):
        checkpoints.load_torch_zip(path)


def test_storage_size_must_match_its_declaration(tmp_path):
    short = write_pth(tmp_path / "short.pth", {"w": View(Storage("0", 8), 0, (8,), (1,))}, {"0": FLOATS})
    with pytest.raises(CheckpointError, match=r"short.pth: storage '0' declares 8 float32 elements \(32 bytes\) "
                                              r"but its member holds 16 bytes"):
        checkpoints.load_torch_zip(short)
    missing = write_pth(tmp_path / "missing.pth", {"w": View(Storage("7", 4), 0, (4,), (1,))}, {"0": FLOATS})
    with pytest.raises(CheckpointError, match=r"missing.pth: storage '7' has no member archive/data/7"):
        checkpoints.load_torch_zip(missing)
    twice = write_pth(tmp_path / "twice.pth", {"a": View(Storage("0", 4), 0, (4,), (1,)),
                                               "b": View(Storage("0", 2, "DoubleStorage"), 0, (2,), (1,))},
                      {"0": FLOATS})
    with pytest.raises(CheckpointError, match=r"twice.pth: storage '0' is declared twice"):
        checkpoints.load_torch_zip(twice)


def test_many_full_views_of_one_storage_are_refused(tmp_path):
    storage = Storage("0", 4)
    path = write_pth(tmp_path / "amplify.pth", [View(storage, 0, (4,), (1,)) for _ in range(5)], {"0": FLOATS})
    with pytest.raises(CheckpointError, match=r"the views of a storage of 4 elements hold over 4x as many"):
        checkpoints.load_torch_zip(path)


# --- opcodes that would change shared objects for the whole process ---------------------------

SHARED_STATE_ATTACKS = {
    "build_on_storage_class": (ops(("torch", "FloatStorage"), b"}", "dtype", "<i4", b"sb"),
                               r"sets the state of a _StorageClass"),
    "build_slots_on_ordered_dict_class": (ops(("collections", "OrderedDict"), b"N}", "fromkeys", b"Ns\x86b"),
                                          r"sets the state of a _Reconstructor"),
    "build_on_reconstructor": (ops(("torch._utils", "_rebuild_tensor_v2"), b"}", "__defaults__", b")sb"),
                               r"sets the state of a _Reconstructor"),
    "build_on_dtype": (ops(("torch", "float32"), b"}", "numpy", "<i4", b"sb"), r"sets the state of a _DType"),
    "setitem_on_class": (ops(("collections", "OrderedDict"), "a", b"K\x01s"), r"sets items of a _Reconstructor"),
    "append_on_class": (ops(("torch", "HalfStorage"), b"K\x01a"), r"appends to a _StorageClass"),
    "build_on_storage": (ops(b"(", "storage", ("torch", "FloatStorage"), "0", "cpu", b"K\x04tQ}", "numel",
                             b"K\x00sb"), r"sets the state of a _Storage"),
    "build_on_tensor": (ops(("torch._utils", "_rebuild_tensor_v2"), b"((", "storage", ("torch", "FloatStorage"),
                            "0", "cpu", b"K\x04tQK\x00K\x04\x85K\x01\x85\x89", ("collections", "OrderedDict"),
                            b")RtR}", "shape", b"N", b"sb"), r"sets the state of a ndarray"),
    "build_on_plain_dict": (ops(b"}}", "x", b"K\x01sb"), r"sets the state of a dict"),
    "dunder_state_on_ordered_dict": (ops(("collections", "OrderedDict"), b")R}", "__class__", b"Nsb"),
                                     r"an OrderedDict state of"),
    "reduce_on_storage_class": (ops(("torch", "FloatStorage"), b")R"), r"calls a _StorageClass"),
}


@pytest.mark.parametrize("case", list(SHARED_STATE_ATTACKS))
def test_no_opcode_reaches_a_shared_object_and_the_next_load_is_honest(tmp_path, honest, case):
    pkl, message = SHARED_STATE_ATTACKS[case]
    before = repr(checkpoints._GLOBALS)
    evil = write_zip(tmp_path / f"{case}.pth", pkl, {"0": FLOATS})
    with pytest.raises(CheckpointError, match=rf"{case}.pth: .*{message}"):
        checkpoints.load_torch_zip(evil)
    assert repr(checkpoints._GLOBALS) == before
    path, state = honest
    assert_same(checkpoints.load_torch_zip(path), torch_values(state))


def test_code_and_unknown_opcodes_are_refused(tmp_path):
    evil = write_zip(tmp_path / "system.pth", ops(("os", "system"), "touch pwned", b"\x85R"))
    with pytest.raises(CheckpointError, match=r"system.pth: refusing to load 'os.system'.*without running code"):
        checkpoints.load_torch_zip(evil)
    newobj = write_zip(tmp_path / "newobj.pth", ops(("collections", "OrderedDict"), b")\x81"))
    with pytest.raises(CheckpointError, match=r"newobj.pth: pickle opcode NEWOBJ at byte 28: not one torch.save"):
        checkpoints.load_torch_zip(newobj)
    assert not os.path.exists("pwned")


# --- bounds on what a small pickle may build --------------------------------------------------

def nested_lists(depth):
    """[[[...]]] `depth` deep: each new list is appended into the previous one, fetched from the memo."""
    body = b"]r" + struct.pack("<I", 0)
    for i in range(1, depth):
        body += b"j" + struct.pack("<I", i - 1) + b"]r" + struct.pack("<I", i) + b"a0"  # GET, new list, APPEND, POP
    return b"\x80\x02" + body + b"."


BOUNDS = {
    "many_values": (b"\x80\x02](" + b"N" * 1_000_001 + b"e.", r"a pickle building over 1000000 values"),
    "deep_tuples": (b"\x80\x02N" + b"\x85" * 101 + b".", r"tuples nested over 100 deep"),
    "deep_marks": (b"\x80\x02" + b"(" * 101 + b".", r"pickle MARKs nested over 100 deep"),
    "deep_lists": (nested_lists(200), r"containers nested over 100 deep"),
    "tuple_key": (b"\x80\x02}K\x01\x85K\x02s.", r"a dict key of type tuple"),
    "huge_int_key": (b"\x80\x02}\x8a\x09" + b"\x00" * 8 + b"\x01K\x02s.", r"a dict key of type int"),
    "underflow": (b"\x80\x02s.", r"stack runs empty at byte 2"),
    "no_mark": (b"\x80\x02Nt.", r"pickle opcode TUPLE at byte 3 without a MARK"),
    "unstored_memo": (b"\x80\x02h\x05.", r"fetches memo entry 5, never stored"),
    "two_values": (b"\x80\x02NN.", r"stops with 2 values"),
    "no_stop": (b"\x80\x02N", r"cannot read the PyTorch checkpoint \(ValueError: pickle exhausted before seeing STOP"),
    "not_a_pickle": (b"garbage", r"cannot read the PyTorch checkpoint \(ValueError"),
}


@pytest.mark.parametrize("case", list(BOUNDS))
def test_pickle_bounds(tmp_path, case):
    pkl, message = BOUNDS[case]
    path = write_zip(tmp_path / f"{case}.pth", pkl)
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match=rf"{case}.pth: .*{message}") as caught:
        checkpoints.load_torch_zip(path)
    assert time.perf_counter() - started < 5 and "\n" not in str(caught.value)


def test_nested_lists_below_the_bound_load(tmp_path):
    loaded = checkpoints.load_torch_zip(write_zip(tmp_path / "nested.pth", nested_lists(50)))
    for _ in range(49):
        assert type(loaded) is list and len(loaded) == 1
        loaded = loaded[0]
    assert loaded == []


# --- bombs: a small file that would cost gigabytes -------------------------------------------

def deflated_zeros(path, pkl, nbytes, member="archive/data/0"):
    """A zip whose `member` is `nbytes` of zeros, deflated (a few hundred kB on disk)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        if member != "archive/data.pkl":
            z.writestr("archive/data.pkl", pkl, compress_type=zipfile.ZIP_STORED)
        with z.open(member, "w", force_zip64=True) as f:
            chunk = bytes(2**22)
            for _ in range(nbytes // len(chunk)):
                f.write(chunk)
    return path


def test_deflate_bombs_are_refused_before_inflating(tmp_path):
    small = Storage("0", 4)  # declares 16 bytes for a 200 MB member
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump({"w": View(small, 0, (4,), (1,))})
    declared_small = deflated_zeros(tmp_path / "declared_small.pth", buffer.getvalue(), 200 * 2**20)
    honest_size = Storage("0", 64 * 2**20 // 4)  # declares what the member holds, at 1000x compression
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump({"w": View(honest_size, 0, (honest_size.numel,), (1,))})
    inflating = deflated_zeros(tmp_path / "inflating.pth", buffer.getvalue(), 64 * 2**20)
    pickle_bomb = deflated_zeros(tmp_path / "pickle_bomb.pth", b"", 80 * 2**20, member="archive/data.pkl")
    assert max(p.stat().st_size for p in (declared_small, inflating, pickle_bomb)) < 2**20
    started = time.perf_counter()
    refusals, growth_mb = refused_in_subprocess(declared_small, inflating, pickle_bomb)
    assert time.perf_counter() - started < 10
    assert growth_mb < 50, growth_mb  # nothing was inflated
    assert "declared_small.pth: storage '0' declares 4 float32 elements (16 bytes) but its member holds " \
           "209715200 bytes" in refusals[0]
    assert "inflating.pth: member 'archive/data/0' inflates" in refusals[1] and "a zip bomb" in refusals[1]
    assert "pickle_bomb.pth: a data.pkl of 83886080 bytes (at most 16777216)" in refusals[2]


def test_a_huge_zip_directory_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    path = tmp_path / "directory.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", ops(b"N"))
        z.writestr("archive/padding", bytes(17 * 2**20))
    data = bytearray(path.read_bytes())
    end = data.rindex(b"PK\x05\x06")
    data[end + 12:end + 16] = struct.pack("<I", 17 * 2**20)  # the directory's size, as a crafted file states it
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"directory.pth: a zip directory over 16777216 bytes"):
        checkpoints.load_torch_zip(path)
    monkeypatch.setattr(checkpoints, "_MAX_ZIP_MEMBERS", 3)
    many = write_zip(tmp_path / "many.pth", ops(b"N"), {"0": FLOATS, "1": FLOATS})
    with pytest.raises(CheckpointError, match=r"many.pth: a zip archive of 5 members \(at most 3\)"):
        checkpoints.sniff_format(many)


def test_an_hdf5_dataset_declaring_more_than_it_stores_is_refused(tmp_path):
    path = tmp_path / "fill.weights.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("layers/dense/vars/0", shape=(2**15, 2**15), dtype="f4")  # 4 GB of fill value
    assert path.stat().st_size < 2**16
    with pytest.raises(CheckpointError, match=r"fill.weights.h5: dataset '/layers/dense/vars/0' declares "
                                              r"4294967296 bytes but stores 0"):
        checkpoints.sniff_format(path)


# --- types a ConvNeXt cannot hold, and values that are not numbers -----------------------------

@pytest.mark.parametrize("tensor, dtype", [
    (torch.ones(3, dtype=torch.bool), "bool"), (torch.arange(3), "int64"), (torch.ones(2, dtype=torch.uint8), "uint8"),
    (torch.ones(2, dtype=torch.complex64), "complex64"), (torch.ones(2).to(torch.float8_e4m3fn), "float8_e4m3fn"),
])
def test_torch_tensors_of_other_types_are_refused_by_name(tmp_path, tensor, dtype):
    torch.save({"ok": torch.ones(2), "buffers.num_batches_tracked": tensor}, tmp_path / "typed.pth")
    with pytest.raises(CheckpointError, match=rf"typed.pth: tensor 'buffers.num_batches_tracked' has dtype {dtype}; "
                                              r"keras_convnext reads floating tensors only"):
        checkpoints.load_torch_zip(tmp_path / "typed.pth")


@pytest.mark.parametrize("value, dtype", [
    (np.ones(2, bool), "BOOL"), (np.arange(3), "I64"), (np.ones(2, "u1"), "U8"), (np.ones(2, "c8"), "C64"),
    (torch.ones(2).to(torch.float8_e4m3fn), "F8_E4M3"), (torch.ones(2).to(torch.float8_e5m2), "F8_E5M2"),
])
def test_safetensors_of_other_types_are_refused_by_name(tmp_path, value, dtype):
    path = str(tmp_path / "typed.safetensors")
    if isinstance(value, np.ndarray):
        from safetensors.numpy import save_file

        save_file({"ok": np.ones(2, "f4"), "odd": value}, path)
    else:
        from safetensors.torch import save_file

        save_file({"ok": torch.ones(2), "odd": value}, path)
    with pytest.raises(CheckpointError, match=rf"typed.safetensors: tensor 'odd' has dtype '{dtype}'; "
                                              r"keras_convnext reads floating tensors only"):
        checkpoints.load_safetensors(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_by_name_in_every_format(tmp_path, bad):
    from safetensors.numpy import save_file

    value = np.array([1.0, bad, 3.0], "f4")
    torch.save({"stem.0.weight": torch.from_numpy(value)}, tmp_path / "nan.pth")
    save_file({"stem.0.weight": value}, str(tmp_path / "nan.safetensors"))
    write_legacy_h5(tmp_path / "nan.h5", {"stem/kernel": value})
    message = r"tensor '{}' holds NaN or infinite values"
    with pytest.raises(CheckpointError, match=r"nan.pth: " + message.format(r"stem\.0\.weight")):
        checkpoints.load_torch_zip(tmp_path / "nan.pth")
    with pytest.raises(CheckpointError, match=r"nan.safetensors: " + message.format(r"stem\.0\.weight")):
        checkpoints.load_safetensors(tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match=r"nan.h5: " + message.format("stem/kernel")):
        checkpoints.load_keras_h5_legacy(tmp_path / "nan.h5")


def test_check_tensors_passes_floating_arrays_and_names_the_rest():
    good = {"a": np.ones(2, "f2"), "b": np.ones(2, "f4"), "c": np.ones((), "f8")}
    assert checkpoints.check_tensors(good, "x.pth") is good
    with pytest.raises(CheckpointError, match=r"x.pth: tensor 'n' has dtype int32"):
        checkpoints.check_tensors({"n": np.ones(2, "i4")}, "x.pth")
    with pytest.raises(CheckpointError, match=r"x.pth: tensor 'l' has dtype list"):
        checkpoints.check_tensors({"l": [1.0]}, "x.pth")
    with pytest.raises(CheckpointError, match=r"x.pth: tensor 'q' has dtype float128"):
        checkpoints.check_tensors({"q": np.ones(2, np.longdouble)}, "x.pth")


# --- HDF5 that reads other files ---------------------------------------------------------------

SECRET = b"SECRET-PASSWORD!"  # 16 bytes: four float32 values, if a reader copied them into the weights


@pytest.fixture
def secret(tmp_path):
    (tmp_path / "secret.bin").write_bytes(SECRET)
    with h5py.File(tmp_path / "secret.h5", "w") as f:
        f["data"] = np.frombuffer(SECRET, "f4")
    return tmp_path


def hostile_dataset(f, name, kind, folder):
    if kind == "external_storage":
        f.create_dataset(name, shape=(4,), dtype="f4", external=[(str(folder / "secret.bin"), 0, len(SECRET))])
    elif kind == "virtual_dataset":
        layout = h5py.VirtualLayout(shape=(4,), dtype="f4")
        layout[:] = h5py.VirtualSource(str(folder / "secret.h5"), "data", shape=(4,))
        f.create_virtual_dataset(name, layout)
    else:
        f[name] = h5py.ExternalLink(str(folder / "secret.h5"), "/data")


HDF5_ATTACKS = {"external_storage": r"keeps its data in an external file", "virtual_dataset": r"is virtual",
                "external_link": r"is a ExternalLink to another file"}


@pytest.mark.parametrize("kind", list(HDF5_ATTACKS))
def test_hdf5_that_reads_other_files_is_refused_in_every_path(secret, kind):
    from keras_convnext.weights import read_weights

    weights_h5, legacy_h5 = secret / "leak.weights.h5", secret / "leak.h5"
    with h5py.File(weights_h5, "w") as f:
        hostile_dataset(f, "layers/dense/vars/0", kind, secret)
    with h5py.File(legacy_h5, "w") as f:
        hostile_dataset(f, "dense/dense/kernel:0", kind, secret)
        f.attrs["layer_names"] = [b"dense"]
        f["dense"].attrs["weight_names"] = [b"dense/kernel:0"]
    with h5py.File(weights_h5, "r") as f:
        assert f["layers/dense/vars/0"][()].tobytes() == SECRET  # what h5py (and Keras) would read
    keras_file = secret / "leak.keras"
    with zipfile.ZipFile(keras_file, "w") as z:
        z.writestr("config.json", "{}")
        z.write(weights_h5, "model.weights.h5")
    calls = [(checkpoints.sniff_format, weights_h5), (read_weights, weights_h5), (checkpoints.check_hdf5, weights_h5),
             (checkpoints.sniff_format, legacy_h5), (checkpoints.load_keras_h5_legacy, legacy_h5),
             (checkpoints.sniff_format, keras_file)]
    for function, path in calls:
        with pytest.raises(CheckpointError, match=HDF5_ATTACKS[kind]) as caught:
            function(path)
        assert str(caught.value).startswith(str(path)) and "SECRET" not in str(caught.value)


def test_legacy_h5_without_its_names_is_a_checkpoint_error(tmp_path):
    with h5py.File(tmp_path / "no_names.h5", "w") as f:
        f["dense/dense/kernel:0"] = np.ones(2, "f4")
        f.attrs["layer_names"] = [b"dense"]
    with pytest.raises(CheckpointError, match=r"no_names.h5: '/dense' has no 'weight_names' attribute"):
        checkpoints.load_keras_h5_legacy(tmp_path / "no_names.h5")
    with h5py.File(tmp_path / "no_layers.h5", "w") as f:
        f["model_weights/dense/kernel:0"] = np.ones(2, "f4")
    with pytest.raises(CheckpointError, match=r"no_layers.h5: '/model_weights' has no 'layer_names' attribute"):
        checkpoints.load_keras_h5_legacy(tmp_path / "no_layers.h5")
    write_legacy_h5(tmp_path / "nowhere.h5", {"dense/kernel": np.ones(2, "f4")}, layer_names=["dense", "gone"])
    with pytest.raises(CheckpointError, match=r"nowhere.h5: layer 'gone' is listed in 'layer_names' but has no group"):
        checkpoints.load_keras_h5_legacy(tmp_path / "nowhere.h5")
    path = write_legacy_h5(tmp_path / "no_weight.h5", {"dense/kernel": np.ones(2, "f4")})
    with h5py.File(path, "a") as f:
        f["dense"].attrs["weight_names"] = [b"dense/kernel:0", b"dense/bias:0"]
    with pytest.raises(CheckpointError, match=r"no_weight.h5: weight 'dense/bias:0' of layer 'dense' is listed "
                                              r"but has no dataset"):
        checkpoints.load_keras_h5_legacy(path)
    write_legacy_h5(tmp_path / "ints.h5", {"dense/kernel": np.ones(2, "i8")})
    with pytest.raises(CheckpointError, match=r"ints.h5: tensor 'dense/kernel' has dtype int64"):
        checkpoints.load_keras_h5_legacy(tmp_path / "ints.h5")


# --- safetensors headers that lie --------------------------------------------------------------

def safetensors_bytes(header, data=b"", length=None):
    text = json.dumps(header).encode() if isinstance(header, dict) else header
    return struct.pack("<Q", len(text) if length is None else length) + text + data


ENTRY = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
SAFETENSORS_ATTACKS = {
    "huge_header": (safetensors_bytes({"w": ENTRY}, FLOATS, length=2**40),
                    r"a safetensors header of 1099511627776 bytes"),
    "not_json": (safetensors_bytes(b"{not json}", FLOATS), r"cannot read the safetensors file \(JSONDecodeError"),
    "deep_json": (safetensors_bytes(b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}", FLOATS),
                  r"cannot read the safetensors file \(RecursionError"),
    "not_an_object": (safetensors_bytes(b"[1, 2]", FLOATS), r"a safetensors header that is not a JSON object"),
    "duplicate_key": (safetensors_bytes(b'{"w": ' + json.dumps(ENTRY).encode() + b', "w": '
                                        + json.dumps(ENTRY).encode() + b"}", FLOATS),
                      r"a safetensors header naming tensor 'w' twice"),
    "outside_the_file": (safetensors_bytes({"w": dict(ENTRY, data_offsets=[0, 2**40])}, FLOATS),
                         r"tensor 'w' has data offsets \[0, 1099511627776\] outside the 16 data bytes"),
    "negative_offset": (safetensors_bytes({"w": dict(ENTRY, data_offsets=[-16, 0])}, FLOATS),
                        r"tensor 'w' has data offsets \[-16, 0\]"),
    "shape_too_big": (safetensors_bytes({"w": dict(ENTRY, shape=[2**20, 2**20])}, FLOATS),
                      r"tensor 'w' of shape \[1048576, 1048576\] and dtype F32 does not fill its 16 bytes"),
    "negative_shape": (safetensors_bytes({"w": dict(ENTRY, shape=[-2, -2])}, FLOATS),
                       r"tensor 'w' has shape \[-2, -2\]"),
    "overlapping": (safetensors_bytes({"a": ENTRY, "b": dict(ENTRY, shape=[2], data_offsets=[8, 16])}, FLOATS),
                    r"tensors 'a' and 'b' overlap"),
    "no_dtype": (safetensors_bytes({"w": {"shape": [4], "data_offsets": [0, 16]}}, FLOATS),
                 r"tensor 'w' has dtype None"),
    "gap": (safetensors_bytes({"w": dict(ENTRY, shape=[2], data_offsets=[8, 16])}, FLOATS),
            r"the safetensors data is 16 bytes, its tensors cover 8"),
}


@pytest.mark.parametrize("case", list(SAFETENSORS_ATTACKS))
def test_safetensors_headers_are_checked_before_reading(tmp_path, case):
    data, message = SAFETENSORS_ATTACKS[case]
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=rf"{case}.safetensors: .*{message}") as caught:
        checkpoints.load_safetensors(path)
    assert "\n" not in str(caught.value)


# --- damaged archives and other inputs ---------------------------------------------------------

def test_damaged_zips_are_checkpoint_errors(honest, tmp_path):
    good = honest[0].read_bytes()
    (tmp_path / "truncated.pth").write_bytes(good[: len(good) // 2])
    with zipfile.ZipFile(honest[0]) as z:
        offset = z.getinfo("honest/data/0").header_offset
    name_len, extra_len = struct.unpack("<HH", good[offset + 26:offset + 30])  # torch pads the local header
    bad_crc = bytearray(good)
    bad_crc[offset + 30 + name_len + extra_len + 2] ^= 0xFF  # a weight's byte
    (tmp_path / "bad_crc.pth").write_bytes(bytes(bad_crc))
    write_zip(tmp_path / "no_storage.pth", ops(b"(", "storage", ("torch", "FloatStorage"), "9", "cpu", b"K\x04tQ"))
    with zipfile.ZipFile(tmp_path / "two_pickles.pth", "w") as z:
        z.writestr("a/data.pkl", ops(b"N"))
        z.writestr("b/data.pkl", ops(b"N"))
    write_zip(tmp_path / "big_endian.pth", ops(b"N"))
    with zipfile.ZipFile(tmp_path / "big_endian.pth", "w") as z:
        z.writestr("archive/data.pkl", ops(b"N"))
        z.writestr("archive/byteorder", "big")
    with zipfile.ZipFile(tmp_path / "bzip2.pth", "w") as z:
        z.writestr("archive/data.pkl", ops(b"N"), compress_type=zipfile.ZIP_BZIP2)
    expected = {
        "truncated.pth": r"cannot read the (file|PyTorch checkpoint) \(BadZipFile",
        "bad_crc.pth": r"cannot read the PyTorch checkpoint \(BadZipFile: Bad CRC-32 for file 'honest/data/0'\)",
        "no_storage.pth": r"storage '9' has no member archive/data/9",
        "two_pickles.pth": r"a zip archive with 2 data.pkl members, not one",
        "big_endian.pth": r"a big-endian PyTorch checkpoint is not supported",
        "bzip2.pth": r"member 'archive/data.pkl' uses zip compression method 12",
    }
    for name, message in expected.items():
        with pytest.raises(CheckpointError, match=rf"{name}: {message}") as caught:
            if name == "truncated.pth":
                checkpoints.sniff_format(tmp_path / name)
            checkpoints.load_torch_zip(tmp_path / name)
        assert "\n" not in str(caught.value)


def test_a_state_dict_keyed_by_anything_but_names_is_refused():
    with pytest.raises(CheckpointError, match=r"x.pth: entry 3 is a ndarray, not a named tensor"):
        checkpoints.state_dict_of({3: np.ones(2, "f4")}, "x.pth")
    with pytest.raises(CheckpointError, match=r"x.pth: entry 'w' is a str, not a named tensor"):
        checkpoints.state_dict_of({"w": "x"}, "x.pth")


@pytest.mark.parametrize("text, message", [
    (b'{"layer_norm_eps": 1e-6, "hidden_sizes": [8]}', None),
    (b"{not json", r"cannot read the Hugging Face config \(JSONDecodeError"),
    (b"[1]", r"a config.json that is not a JSON object"),
    (b'{"layer_norm_eps": "big"}', r"layer_norm_eps is 'big', not a small positive number"),
    (b'{"layer_norm_eps": NaN}', r"layer_norm_eps is nan"),
    (b'{"a": "' + b"x" * (2**20 + 10) + b'"}', r"a config.json over 1048576 bytes"),
    (b"\xff\xfe{", r"cannot read the Hugging Face config \((UnicodeDecodeError|JSONDecodeError)"),
])
def test_read_hf_config(tmp_path, text, message):
    (tmp_path / "config.json").write_bytes(text)
    weights = tmp_path / "model.safetensors"
    if message is None:
        assert checkpoints.read_hf_config(weights) == {"layer_norm_eps": 1e-6, "hidden_sizes": [8]}
    else:
        with pytest.raises(CheckpointError, match=rf"config.json: {message}"):
            checkpoints.read_hf_config(weights)
    assert checkpoints.read_hf_config(tmp_path / "elsewhere" / "model.safetensors") == {}


# --- fuzzing: a valid .pth and .safetensors, mutated ------------------------------------------

FUZZ = PRELUDE + r'''
import collections, io, json, os, pickletools, random, struct, time, traceback, zipfile
import numpy as np

pth, st, work, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rng = random.Random(seed)


def flat(obj):
    found, seen, todo = {}, set(), [("", obj)]
    while todo:
        name, value = todo.pop()
        if isinstance(value, np.ndarray):
            found[name] = value
        elif isinstance(value, (dict, list, tuple)) and id(value) not in seen:
            seen.add(id(value))
            todo.extend((f"{name}.{k}", v) for k, v in (value.items() if isinstance(value, dict) else enumerate(value)))
    return found


def load(path):
    fmt = ck.sniff_format(path)
    if fmt not in ("torch_zip", "safetensors"):
        raise AssertionError(f"sniffed as {fmt}")
    return flat(ck.load_torch_zip(path) if fmt == "torch_zip" else ck.load_safetensors(path))


def same(a, b):
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


expected = {"pth": load(pth), "st": load(st)}
stats, failures, slowest = collections.Counter(), [], 0.0


def case(kind, data, exact=None):
    """Loads mutated bytes: a CheckpointError, or finite floating arrays no larger than the file
    (the right values, where the mutation cannot have changed them)."""
    global slowest
    stats["cases"] += 1
    path = os.path.join(work, "case.bin")
    with open(path, "wb") as f:
        f.write(data)
    started = time.perf_counter()
    try:
        out = load(path)
    except ck.CheckpointError as e:
        stats[kind + " refused"] += 1
        if "\n" in str(e) or not str(e).startswith(path):
            failures.append((kind, "message", str(e)[:300]))
    except BaseException as e:
        failures.append((kind, type(e).__name__, traceback.format_exc()[-1500:]))
    else:
        stats[kind + " loaded"] += 1
        sizes = [a.size for a in out.values()]
        if any(a.dtype not in (np.float16, np.float32, np.float64) or not np.isfinite(a).all() for a in out.values()):
            failures.append((kind, "not finite floats", str({k: a.dtype for k, a in out.items()})))
        if sum(sizes) > 4 * len(data):
            failures.append((kind, "amplified", sum(sizes)))
        if exact is not None and not same(out, expected[exact]):
            failures.append((kind, "wrong values", sorted(out)))
    slowest = max(slowest, time.perf_counter() - started)


def flip(data, lo=0, hi=None, count=None):
    data = bytearray(data)
    for _ in range(count or rng.randint(1, 4)):
        data[rng.randrange(lo, hi or len(data))] = rng.randrange(256)
    return bytes(data)


raw = open(pth, "rb").read()
with zipfile.ZipFile(pth) as z:
    members = [(info.filename, z.read(info)) for info in z.infolist()]
pkl_at = next(i for i, (name, _) in enumerate(members) if name.endswith("/data.pkl"))
pkl = members[pkl_at][1]
storages = [i for i, (name, _) in enumerate(members) if "/data/" in name]
ops = [pos for _, _, pos in pickletools.genops(pkl)] + [len(pkl)]
ops = list(zip(ops, ops[1:]))
ints = [(s, e) for s, e in ops if pkl[s:s + 1] in (b"K", b"M", b"J", b"\x8a")]  # BININT1/2, BININT, LONG1
INSERTS = [b"b", b"s", b"u", b"a", b"e", b"R", b"Q", b"t", b"\x85", b"\x86", b"}", b"]", b")", b"(", b"N", b"0",
           b"1", b"\x81", b"\x94", b"\x93", b"h\x00", b"h\x03", b"K\x00", b"J\xff\xff\xff\xff", b"J\xff\xff\xff\x7f",
           b"\x8a\x09" + b"\xff" * 9, b"ctorch\nFloatStorage\n", b"cos\nsystem\n", b"ccollections\nOrderedDict\n",
           b"ctorch._utils\n_rebuild_tensor_v2\n", b"X\xff\xff\xff\x7f", b"\x8c\x05hello"]


def rezip(index, data):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for i, (name, old) in enumerate(members):
            z.writestr(name, data if i == index else old)
    return buffer.getvalue()


def mutate_ops():
    s, e = rng.choice(ops)
    s2, e2 = ops[min(ops.index((s, e)) + 1, len(ops) - 1)]
    choice = rng.randrange(5)
    if choice == 0:
        return pkl[:s] + pkl[e:]  # drop an opcode
    if choice == 1:
        return pkl[:e] + pkl[s:e] + pkl[e:]  # repeat it
    if choice == 2:
        return pkl[:s] + pkl[s2:e2] + pkl[s:e] + pkl[e2:] if e == s2 else pkl  # swap it with the next
    if choice == 3:
        return pkl[:s] + rng.choice(INSERTS) + pkl[s:]  # insert one
    s, e = rng.choice(ints)  # an integer (offset, size, stride, numel, key) set to another value
    width = e - s - 1 if pkl[s:s + 1] != b"\x8a" else e - s - 2
    value = rng.choice([0, 1, 2**(8 * width) - 1, rng.randrange(2**(8 * width))]).to_bytes(width, "little")
    return pkl[:e - width] + value + pkl[e:]


started = time.perf_counter()
for _ in range(120):
    case("pkl bytes", rezip(pkl_at, flip(pkl)))
for _ in range(150):
    case("pkl opcodes", rezip(pkl_at, mutate_ops()))
for _ in range(30):
    i = rng.choice(storages)
    case("storage bytes", rezip(i, flip(members[i][1]) if members[i][1] else b"\x00"))
for _ in range(100):
    case("raw bytes", flip(raw, count=rng.randint(1, 3)), exact="pth")  # no CRC fixed: the right values or refused
for _ in range(30):
    case("raw truncation", raw[:rng.randrange(len(raw))], exact="pth")

blob = open(st, "rb").read()
n = int.from_bytes(blob[:8], "little")
header = json.loads(blob[8:8 + n])


def mutate_header():
    h = json.loads(json.dumps(header))
    name = rng.choice([k for k in h if k != "__metadata__"])
    field = rng.choice(["dtype", "shape", "data_offsets", "drop", "extra"])
    if field == "dtype":
        h[name]["dtype"] = rng.choice(["F32", "F16", "BF16", "F64", "I64", "BOOL", "F8_E4M3", "C64", "?", 3, None])
    elif field == "shape":
        h[name]["shape"] = rng.choice([[], [0], [-1], [2**62, 2**62], [rng.randrange(9)] * rng.randrange(4), "4", [.5]])
    elif field == "data_offsets":
        h[name]["data_offsets"] = [rng.randrange(-4, len(blob)), rng.randrange(-4, 2 * len(blob))]
    elif field == "drop":
        del h[name][rng.choice(list(h[name]))]
    else:
        h[rng.choice(["__metadata__", "x"])] = rng.choice([{"a": 1}, [1], "s", {"dtype": "F32", "shape": [1],
                                                                              "data_offsets": [0, 4]}])
    text = json.dumps(h).encode()
    return struct.pack("<Q", len(text)) + text + blob[8 + n:]


for _ in range(60):
    case("st header bytes", flip(blob, 0, 8 + n))
for _ in range(100):
    case("st header fields", mutate_header())
for _ in range(40):
    case("st data bytes", flip(blob, 8 + n))
for _ in range(20):
    length = rng.choice([0, 1, n - 1, n + 1, 2**63, rng.randrange(2**64)])
    case("st length", struct.pack("<Q", length) + blob[8:])
for _ in range(20):
    case("st truncation", blob[:rng.randrange(len(blob))])
print(json.dumps({"cases": stats.pop("cases"), "seconds": time.perf_counter() - started, "slowest": slowest,
                  "stats": stats, "failures": failures[:10], "torch": "torch" in sys.modules}))
'''


def test_fuzzed_checkpoints_load_right_or_fail_cleanly(honest, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    save_file({"f32": torch.randn(3, 4), "f16": torch.randn(5).half(), "bf16": torch.randn(2, 3).to(torch.bfloat16),
               "f64": torch.randn(2).double()}, str(tmp_path / "fuzz.safetensors"))
    started = time.perf_counter()
    out = isolated(FUZZ, honest[0], tmp_path / "fuzz.safetensors", tmp_path, 0, timeout=300)
    report = json.loads(out.splitlines()[-1])
    print(f"fuzz: {report['cases']} cases in {report['seconds']:.1f} s (slowest {report['slowest'] * 1000:.0f} ms, "
          f"{time.perf_counter() - started:.1f} s with the subprocess): {report['stats']}")
    assert report["failures"] == [] and not report["torch"]
    assert report["cases"] == 670 and report["slowest"] < 2
    stats = collections.Counter({k.rsplit(" ", 1)[0]: v for k, v in report["stats"].items() if k.endswith("loaded")})
    assert stats["pkl opcodes"] > 0 and stats["raw bytes"] > 0  # some mutations leave a readable file


# --- review findings: each attack below got through (or crashed) before its fix -----------------

NANS = np.array([1.0, np.nan, 2.0, 3.0], "<f4").tobytes()


@pytest.mark.parametrize("kind, data, message", [
    ("FloatStorage", NANS, r"tensor 'model\.x' holds NaN or infinite values"),
    ("IntStorage", np.arange(4, dtype="<i4").tobytes(), r"tensor 'model\.x' has dtype int32"),
])
def test_a_tensor_under_the_dotted_name_of_another_is_checked_too(tmp_path, kind, data, message):
    # {"model": {"x": bad}, "model.x": good}: both are named 'model.x'; state_dict_of returns the first.
    good, bad = View(Storage("0", 4), 0, (4,), (1,)), View(Storage("1", 4, kind), 0, (4,), (1,))
    path = write_pth(tmp_path / "twins.pth", {"model": {"x": bad}, "model.x": good}, {"0": FLOATS, "1": data})
    with pytest.raises(CheckpointError, match=rf"twins.pth: {message}"):
        checkpoints.state_dict_of(checkpoints.load_torch_zip(path), path)


@pytest.mark.parametrize("state, message", [
    (b"}X\x03\x00\x00\x00get]s", r"an OrderedDict state of \{'get': \[\]\}"),  # would shadow OrderedDict.get
    (b"}X\x05\x00\x00\x00itemsNs", r"an OrderedDict state of \{'items': None\}"),
    (b"}X\t\x00\x00\x00_metadatactorch\nFloatStorage\ns", r"an OrderedDict state of \{'_metadata': "),
])
def test_build_gives_an_ordered_dict_its_metadata_and_nothing_else(tmp_path, state, message):
    pkl = ops(("collections", "OrderedDict"), b")R", state, b"b")
    path = write_zip(tmp_path / "build.pth", pkl)
    with pytest.raises(CheckpointError, match=rf"build.pth: {message}"):
        checkpoints.load_torch_zip(path)
    metadata = ops(("collections", "OrderedDict"), b")R}", "_metadata", b"}", "", b"}", "version", b"K\x01sss" b"b")
    loaded = checkpoints.load_torch_zip(write_zip(tmp_path / "metadata.pth", metadata))
    assert loaded == {} and loaded._metadata == {"": {"version": 1}}


def test_build_refuses_a_tensor_in_the_metadata(tmp_path):
    tensor = View(Storage("0", 4), 0, (4,), (1,))
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(tensor)
    body = buffer.getvalue()[2:-1]  # the tensor's opcodes, without PROTO and STOP
    pkl = ops(("collections", "OrderedDict"), b")R}", "_metadata", body + b"sb")
    path = write_zip(tmp_path / "metatensor.pth", pkl, {"0": FLOATS})
    with pytest.raises(CheckpointError, match=r"metatensor.pth: an OrderedDict state of"):
        checkpoints.load_torch_zip(path)


@pytest.mark.parametrize("case", ["not_json", "deep_json", "duplicate_key", "not_utf8"])
def test_safetensors_header_itself_raises_only_checkpoint_errors(tmp_path, case):
    data = (safetensors_bytes(b"\xff\xfe{}", FLOATS) if case == "not_utf8" else SAFETENSORS_ATTACKS[case][0])
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=rf"^{path}: ") as caught:
        checkpoints.safetensors_header(path)
    assert "\n" not in str(caught.value)
    if case == "duplicate_key":
        assert "naming tensor 'w' twice" in str(caught.value)


def many_deflated_storages(path, count, nbytes):
    """A .pth of `count` storages, each `nbytes` of deflated zeros: small on disk, large in memory."""
    storages = [Storage(str(i), nbytes // 4) for i in range(count)]
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump({f"w{i}": View(s, 0, (s.numel,), (1,)) for i, s in enumerate(storages)})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buffer.getvalue())
        for s in storages:
            z.writestr(f"archive/data/{s.key}", bytes(nbytes), compress_type=zipfile.ZIP_DEFLATED)
    return path


def test_many_small_bombs_share_one_budget_per_load(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "_EXPANSION_FLOOR", 2**16)  # each member passes on its own
    ok = many_deflated_storages(tmp_path / "ok.pth", 1, 2**15)
    assert len(checkpoints.load_torch_zip(ok)) == 1
    bomb = many_deflated_storages(tmp_path / "bomb.pth", 60, 2**16)  # 3.9 MB from a ~13 kB file
    size = bomb.stat().st_size
    assert 60 * 2**16 > 100 * size
    for function in (checkpoints.load_torch_zip, checkpoints.check_zip):
        with pytest.raises(CheckpointError, match=rf"bomb.pth: its zip members inflate to over {100 * size} bytes "
                                                  rf"\(at most 100x the file's {size}"):
            function(bomb)


def test_many_fill_value_datasets_share_one_budget_per_file(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "_EXPANSION_FLOOR", 2**20)  # each dataset passes on its own
    path = tmp_path / "fills.weights.h5"
    with h5py.File(path, "w") as f:
        for i in range(40):
            f.create_dataset(f"layers/dense_{i}/vars/0", shape=(2**18,), dtype="f4")  # 1 MiB of fill value each
    size = path.stat().st_size
    assert 40 * 2**20 > 100 * size
    with pytest.raises(CheckpointError, match=rf"fills.weights.h5: its datasets declare over {100 * size} bytes "
                                              rf"\(at most 100x the file's {size}"):
        checkpoints.check_hdf5(path)
    keras_file = tmp_path / "fills.keras"
    with zipfile.ZipFile(keras_file, "w") as z:
        z.writestr("config.json", "{}")
        z.write(path, "model.weights.h5")
    with pytest.raises(CheckpointError, match=r"fills.keras \(model.weights.h5\): its datasets declare over"):
        checkpoints.sniff_format(keras_file)


def test_a_deflated_model_weights_h5_is_refused(tmp_path):
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.save(tmp_path / "m.keras")
    with zipfile.ZipFile(tmp_path / "m.keras") as z:
        assert z.getinfo("model.weights.h5").compress_type == zipfile.ZIP_STORED  # what Keras writes
        members = [(info.filename, z.read(info)) for info in z.infolist()]
    assert checkpoints.sniff_format(tmp_path / "m.keras") == "keras"
    with zipfile.ZipFile(tmp_path / "deflated.keras", "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in members:
            z.writestr(name, data)
    with pytest.raises(CheckpointError, match=r"deflated.keras: member 'model.weights.h5' is compressed"):
        checkpoints.sniff_format(tmp_path / "deflated.keras")


def test_a_member_claiming_more_compressed_bytes_than_the_file_holds_is_refused(tmp_path):
    path = write_zip(tmp_path / "claims.pth", ops(b"N"), {"0": FLOATS})
    data = bytearray(path.read_bytes())
    entry = data.index(b"PK\x01\x02")  # the directory entry of archive/data.pkl, the first member
    data[entry + 20:entry + 24] = struct.pack("<I", 10**8)  # compressed size, as the directory states it
    path.write_bytes(bytes(data))
    for function in (checkpoints.load_torch_zip, checkpoints.check_zip):
        with pytest.raises(CheckpointError, match=r"claims.pth: member 'archive/data.pkl' claims 100000000 "
                                                  r"compressed bytes from offset 0 of a \d+-byte file"):
            function(path)


def test_check_zip_reads_every_member_through_its_crc(honest, tmp_path):
    checkpoints.check_zip(honest[0])
    good = honest[0].read_bytes()
    with zipfile.ZipFile(honest[0]) as z:
        info = z.getinfo("honest/data/0")
    name_len, extra_len = struct.unpack("<HH", good[info.header_offset + 26:info.header_offset + 30])
    flipped = bytearray(good)
    flipped[info.header_offset + 30 + name_len + extra_len + 2] ^= 0xFF
    (tmp_path / "flipped.pth").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"flipped.pth: zip member 'honest/data/0' fails its CRC check"):
        checkpoints.check_zip(tmp_path / "flipped.pth")
    with zipfile.ZipFile(tmp_path / "twice.zip", "w") as z:
        z.writestr("a", b"1")
        with pytest.warns(UserWarning, match="Duplicate name"):
            z.writestr("a", b"2")
    with pytest.raises(CheckpointError, match=r"twice.zip: a zip archive listing a member twice"):
        checkpoints.check_zip(tmp_path / "twice.zip")
    (tmp_path / "cut.zip").write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match=r"cut.zip: cannot read the zip archive \(BadZipFile"):
        checkpoints.check_zip(tmp_path / "cut.zip")


def test_reason_is_one_line():
    assert checkpoints.reason(ValueError("x\n\n  y\tz")) == "ValueError: x y z"
    assert len(checkpoints.reason(ValueError("z" * 400))) == len("ValueError: ") + 300
