"""Reading checkpoint files of every ConvNeXt ecosystem into NumPy, treating every file as hostile.

Formats are detected from content, never from the file name. Nothing in a file runs or steers
code: a PyTorch pickle (`.pth`, `.bin`) is run by a small interpreter that knows plain data,
OrderedDicts and tensors and nothing else (`torch.load(weights_only=True)` would do the same but
needs torch, and this must work without it); a safetensors header and an HDF5 file are checked
before any tensor is read. Every loader returns finite floating arrays only (float16, float32,
float64; bfloat16 as float32), through `check_tensors`, and every way a file can be wrong is a
one-line `CheckpointError` naming the file.
"""

import contextlib
import dataclasses
import io
import json
import math
import os
import pickletools
import reprlib
import struct
import zipfile
from collections import OrderedDict

import numpy as np

from keras_convnext.checks import reason

ZIP_MAGIC = b"PK\x03\x04"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"

# Bounds on what a file may ask for, each far above what a real checkpoint needs.
_MAX_ZIP_DIRECTORY = 16 * 2**20  # bytes of zip central directory: ~100k members
_MAX_ZIP_MEMBERS = 100_000
_MAX_PICKLE_BYTES = 16 * 2**20  # a ConvNeXt's data.pkl is ~30 kB
_MAX_PICKLE_OBJECTS = 1_000_000  # values a pickle may push (a tensor costs ~20)
_MAX_MARKS = 100  # MARK nesting: torch.save's is 3
_MAX_NESTING = 100  # containers inside containers
_MAX_NDIM = 64
_MAX_VIEW_FACTOR = 4  # the views of one storage hold at most 4x its elements together
_MAX_EXPANSION = 100  # a zip member or HDF5 dataset inflating more than 100x ...
_EXPANSION_FLOOR = 16 * 2**20  # ... to over 16 MiB is a bomb (Keras's .keras reader uses 100x too); so are
# all the members one load inflates, or all the datasets of one HDF5 file, together over 100x the file
_MAX_SAFETENSORS_HEADER = 100 * 2**20
_MAX_CONFIG_BYTES = 2**20
_FLOATING = "floating tensors only (float16, bfloat16, float32, float64)"

_quote = reprlib.Repr()
_quote.maxstring = _quote.maxother = 120
quote = _quote.repr  # a name or value from a file, in a message: repr, cut to 120 characters


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""


@contextlib.contextmanager
def reading(path, what):
    """Turns anything a damaged file raises (EOFError, KeyError, zlib.error...) into a CheckpointError."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the {what} ({reason(e)}).") from e


def sniff_format(path):
    """One of "torch_zip", "safetensors", "keras", "keras_weights_h5", "keras_h5_legacy".

    HDF5 data (a `.h5`, a `.weights.h5`, the weights inside a `.keras`) is checked here by
    `check_hdf5`, because Keras reads `.weights.h5` and `.keras` files itself, later.
    """
    path = os.fspath(path)
    with reading(path, "file"):
        with open(path, "rb") as f:
            head = f.read(16)
        if head.startswith(ZIP_MAGIC):
            with _open_zip(path) as archive:
                names = set(archive.namelist())
                if "config.json" in names and "model.weights.h5" in names:
                    _check_hdf5_member(archive, "model.weights.h5", path)
                    return "keras"
                if any(n.endswith("/data.pkl") for n in names):
                    return "torch_zip"
            raise CheckpointError(f"{path}: a zip archive that is neither a PyTorch checkpoint nor a .keras file.")
        if head.startswith(HDF5_MAGIC):
            import h5py

            check_hdf5(path)
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


def check_tensors(tensors, path):
    """Refuses, by name, any tensor of {name: tensor} that is not a finite floating array."""
    for name, value in tensors.items():
        _check_tensor(name, value, path)
    return tensors


def _check_tensor(name, value, path):
    dtype = value.dtype if isinstance(value, (np.ndarray, _Unreadable)) else type(value).__name__
    if not isinstance(value, np.ndarray) or value.dtype.kind != "f" or value.dtype.itemsize not in (2, 4, 8):
        raise CheckpointError(f"{path}: tensor {_quote.repr(name)} has dtype {dtype}; "
                              f"keras_convnext reads {_FLOATING}.")
    if not np.isfinite(value).all():
        raise CheckpointError(f"{path}: tensor {_quote.repr(name)} holds NaN or infinite values.")


# --- zip archives -----------------------------------------------------------------------------

class _CappedFile(io.FileIO):
    """A file refusing any single read over `limit` bytes (while set).

    zipfile reads the central directory in one read, so a cap while it opens the archive refuses
    a directory of millions of members before it is parsed into ZipInfo objects.
    """

    limit = None

    def read(self, size=-1):
        if self.limit is not None:
            if size is None or size < 0:
                size = os.fstat(self.fileno()).st_size - self.tell()
            if size > self.limit:
                raise CheckpointError(f"{self.name}: a zip directory over {self.limit} bytes; refusing to parse it.")
        return super().read(size)


class _Zip(zipfile.ZipFile):
    """An archive open for one load, with one budget for all the bytes its members inflate to.

    Each member is bounded by its own size too, but a thousand members of 16 MiB of deflated
    zeros would each pass that and together cost 16 GiB.
    """

    def __init__(self, file, path):
        super().__init__(file)
        self.path, self.size = path, os.fstat(file.fileno()).st_size
        self.budget, self.inflated = max(_EXPANSION_FLOOR, _MAX_EXPANSION * self.size), 0

    def check_member(self, info):
        """Refuses, before anything is inflated, a member that cannot be what its directory entry says."""
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise CheckpointError(f"{self.path}: member {info.filename!r} uses zip compression method "
                                  f"{info.compress_type}; only stored and deflated members are read.")
        if info.header_offset + info.compress_size > self.size:
            raise CheckpointError(f"{self.path}: member {info.filename!r} claims {info.compress_size} compressed "
                                  f"bytes from offset {info.header_offset} of a {self.size}-byte file.")
        if info.file_size > max(_EXPANSION_FLOOR, _MAX_EXPANSION * info.compress_size):
            raise CheckpointError(f"{self.path}: member {info.filename!r} inflates {info.compress_size} bytes to "
                                  f"{info.file_size}: a zip bomb, refused before inflating it.")

    def charge(self, info):
        """Checks `info` and counts its bytes against the budget, before they are inflated."""
        self.check_member(info)
        self.inflated += info.file_size
        if self.inflated > self.budget:
            raise CheckpointError(
                f"{self.path}: its zip members inflate to over {self.budget} bytes (at most {_MAX_EXPANSION}x "
                f"the file's {self.size}, or {_EXPANSION_FLOOR}): a zip bomb, refused before inflating "
                f"{info.filename!r}."
            )


@contextlib.contextmanager
def _open_zip(path):
    with _CappedFile(path, "r") as raw:
        raw.limit = _MAX_ZIP_DIRECTORY
        with _Zip(raw, path) as archive:
            raw.limit = None
            names = archive.namelist()
            if len(names) > _MAX_ZIP_MEMBERS:
                raise CheckpointError(f"{path}: a zip archive of {len(names)} members (at most {_MAX_ZIP_MEMBERS}).")
            if len(set(names)) != len(names):
                raise CheckpointError(f"{path}: a zip archive listing a member twice: which one is read is ambiguous.")
            yield archive


def check_zip(path):
    """Refuses a zip archive that is damaged or a bomb: every member read through its CRC, in chunks.

    The same opener and limits as every load here (directory size, member count, names once,
    one inflation budget), so a download is checked by the rules it will be read by.
    """
    path = os.fspath(path)
    with reading(path, "zip archive"), _open_zip(path) as archive:
        for info in archive.infolist():
            archive.charge(info)
            done = 0
            with archive.open(info) as f:
                try:
                    while chunk := f.read(2**24):
                        done += len(chunk)
                except zipfile.BadZipFile as e:  # what zipfile raises for a CRC that does not match
                    raise CheckpointError(f"{path}: zip member {info.filename!r} fails its CRC check "
                                          f"({reason(e)}).") from e
            if done != info.file_size:
                raise CheckpointError(f"{path}: member {info.filename!r} holds {done} bytes, its directory entry "
                                      f"says {info.file_size}.")


def _read_member(archive, info, path):
    """A member's bytes as a fresh uint8 array: in chunks, one copy, never past its `file_size`.

    zipfile stops inflating at the directory's `file_size` and checks the CRC there.
    """
    archive.charge(info)
    out = np.empty(info.file_size, np.uint8)
    done = 0
    with archive.open(info) as f:
        while done < info.file_size:
            chunk = f.read(min(info.file_size - done, 2**24))
            if not chunk:
                break
            out[done:done + len(chunk)] = np.frombuffer(chunk, np.uint8)
            done += len(chunk)
    if done != info.file_size:
        raise CheckpointError(f"{path}: member {info.filename!r} holds {done} bytes, its directory entry says "
                              f"{info.file_size}.")
    return out


# --- PyTorch zip pickles, read without torch --------------------------------------------------
#
# torch.save writes `<name>/data.pkl`, a protocol-2 pickle, and each storage as `<name>/data/<key>`.
# The pickle names its tensors `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
# requires_grad, hooks[, metadata])` (`_rebuild_tensor_v3(..., dtype)` for types without a legacy
# storage class, e.g. float8), a storage by the persistent id ('storage', torch.FloatStorage, key,
# location, numel), and wraps the state dict in `collections.OrderedDict` with BUILD {'_metadata'}.

@dataclasses.dataclass(frozen=True)
class _DType:
    """A torch element type: `numpy` is how its bytes read, None where NumPy has no such type."""

    name: str
    numpy: str | None
    itemsize: int


@dataclasses.dataclass(frozen=True)
class _StorageClass:
    name: str
    dtype: _DType


@dataclasses.dataclass(frozen=True)
class _Reconstructor:
    method: str  # the `_TorchPickle` method that checks the arguments and builds the value


@dataclasses.dataclass(frozen=True)
class _Unreadable:
    """A tensor of a type NumPy cannot hold (float8...), kept only to be refused by name."""

    dtype: str
    shape: tuple


_DTYPES = {d.name: d for d in (
    _DType("float16", "<f2", 2), _DType("bfloat16", "<u2", 2), _DType("float32", "<f4", 4),
    _DType("float64", "<f8", 8), _DType("int8", "i1", 1), _DType("uint8", "u1", 1), _DType("int16", "<i2", 2),
    _DType("uint16", "<u2", 2), _DType("int32", "<i4", 4), _DType("uint32", "<u4", 4), _DType("int64", "<i8", 8),
    _DType("uint64", "<u8", 8), _DType("bool", "?", 1), _DType("complex64", "<c8", 8),
    _DType("complex128", "<c16", 16), _DType("float8_e4m3fn", None, 1), _DType("float8_e5m2", None, 1),
    _DType("float8_e4m3fnuz", None, 1), _DType("float8_e5m2fnuz", None, 1), _DType("float8_e8m0fnu", None, 1),
)}
_STORAGE_CLASSES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "UntypedStorage": "uint8",
}
# Every global a pickle may name, each an immutable marker: nothing a load does can change one.
_GLOBALS = {
    ("collections", "OrderedDict"): _Reconstructor("ordered_dict"),
    ("torch._utils", "_rebuild_tensor_v2"): _Reconstructor("tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"): _Reconstructor("tensor_v3"),
    ("torch._utils", "_rebuild_parameter"): _Reconstructor("parameter"),
    ("torch.storage", "UntypedStorage"): _StorageClass("UntypedStorage", _DTYPES["uint8"]),
    **{("torch", name): _StorageClass(name, _DTYPES[dtype]) for name, dtype in _STORAGE_CLASSES.items()},
    **{("torch", name): dtype for name, dtype in _DTYPES.items()},
}
_LITERALS = {"BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT", "BINUNICODE", "SHORT_BINUNICODE",
             "BINUNICODE8", "SHORT_BINBYTES", "BINBYTES"}
_CONSTANTS = {"NONE": lambda: None, "NEWTRUE": lambda: True, "NEWFALSE": lambda: False,
              "EMPTY_TUPLE": tuple, "EMPTY_LIST": list, "EMPTY_DICT": dict}


class _Storage:
    """One storage of one load, read once and shared by all its views."""

    def __init__(self, key, kind, numel, data):
        self.key, self.kind, self.numel, self.data = key, kind, numel, data  # data: numel * itemsize uint8
        self.claimed = False  # handed out whole (no copy) as one tensor
        self.viewed = 0  # elements of all its views so far

    def __repr__(self):
        return f"<{self.kind.name} {self.key!r} of {self.numel}>"


class _TorchPickle:
    """Runs one data.pkl: plain data, OrderedDicts and tensors, nothing else.

    An interpreter of the opcodes torch.save emits, not `pickle.Unpickler`: the globals it knows
    are frozen markers, SETITEM/APPEND/BUILD apply only to dicts, lists and OrderedDicts this load
    built, and each reconstructor checks its arguments (a view inside its storage) before touching
    memory. One load cannot change what the next one reads.
    """

    def __init__(self, archive, prefix, path):
        self.archive, self.prefix, self.path = archive, prefix, path
        self.members = {info.filename: info for info in archive.infolist()}
        self.storages = {}  # key -> _Storage
        self.depths = {}  # id -> (tuple, nesting) of tuples holding tuples: hashing one recurses in C

    def fail(self, message):
        return CheckpointError(f"{self.path}: {message}")

    def load(self, data):
        stack, marks, memo, pushed = [], [], {}, 0
        for op, arg, pos in pickletools.genops(data):
            name = op.name
            if name in ("PROTO", "FRAME"):
                continue
            if name == "STOP":
                if marks or len(stack) != 1:
                    raise self.fail(f"the pickle stops with {len(stack)} values and {len(marks)} open MARKs.")
                return stack[0]
            if name in _LITERALS:
                value = arg
            elif name in _CONSTANTS:
                value = _CONSTANTS[name]()
            elif name == "MARK":
                if len(marks) >= _MAX_MARKS:
                    raise self.fail(f"pickle MARKs nested over {_MAX_MARKS} deep.")
                marks.append(stack)
                stack = []
                continue
            elif name in ("TUPLE", "LIST", "DICT", "APPENDS", "SETITEMS"):
                if not marks:
                    raise self.fail(f"pickle opcode {name} at byte {pos} without a MARK.")
                items, stack = stack, marks.pop()
                if name == "TUPLE":
                    value = self.make_tuple(items)
                elif name == "LIST":
                    value = items
                elif name == "DICT":
                    value = self.set_items({}, items)
                elif name == "APPENDS":
                    self.list_of(self.top(stack, pos)).extend(items)
                    continue
                else:
                    self.set_items(self.top(stack, pos), items)
                    continue
            elif name == "POP":
                self.pop(stack, 1, pos)
                continue
            elif name == "POP_MARK":
                if not marks:
                    raise self.fail(f"pickle opcode POP_MARK at byte {pos} without a MARK.")
                stack = marks.pop()
                continue
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                value = self.make_tuple(self.pop(stack, int(name[-1]), pos))
            elif name == "APPEND":
                item, = self.pop(stack, 1, pos)
                self.list_of(self.top(stack, pos)).append(item)
                continue
            elif name == "SETITEM":
                items = self.pop(stack, 2, pos)
                self.set_items(self.top(stack, pos), items)
                continue
            elif name in ("BINPUT", "LONG_BINPUT", "MEMOIZE"):
                if len(memo) >= _MAX_PICKLE_OBJECTS:
                    raise self.fail(f"a pickle memo of over {_MAX_PICKLE_OBJECTS} entries.")
                memo[len(memo) if name == "MEMOIZE" else arg] = self.top(stack, pos)
                continue
            elif name in ("BINGET", "LONG_BINGET"):
                if arg not in memo:
                    raise self.fail(f"pickle opcode {name} at byte {pos} fetches memo entry {arg}, never stored.")
                value = memo[arg]
            elif name in ("GLOBAL", "STACK_GLOBAL"):
                module, qualname = arg.split(" ", 1) if name == "GLOBAL" else self.pop(stack, 2, pos)
                value = self.find_global(module, qualname)
            elif name == "BINPERSID":
                value = self.persistent_load(*self.pop(stack, 1, pos))
            elif name == "REDUCE":
                value = self.call(*self.pop(stack, 2, pos))
            elif name == "BUILD":
                state, = self.pop(stack, 1, pos)
                self.build(self.top(stack, pos), state)
                continue
            else:
                raise self.fail(f"pickle opcode {name} at byte {pos}: not one torch.save writes, so not read.")
            pushed += 1
            if pushed > _MAX_PICKLE_OBJECTS:
                raise self.fail(f"a pickle building over {_MAX_PICKLE_OBJECTS} values.")
            stack.append(value)
        raise self.fail("the pickle has no STOP.")  # genops raises first; kept for clarity

    def pop(self, stack, n, pos):
        items = self.peek(stack, n, pos)
        del stack[-n:]
        return items

    def top(self, stack, pos):
        return self.peek(stack, 1, pos)[0]

    def peek(self, stack, n, pos):
        if len(stack) < n:
            raise self.fail(f"the pickle's stack runs empty at byte {pos}.")
        return stack[-n:]

    def make_tuple(self, items):
        depth = 1 + max((self.depths.get(id(x), (None, 1))[1] for x in items if type(x) is tuple), default=0)
        if depth > _MAX_NESTING:
            raise self.fail(f"tuples nested over {_MAX_NESTING} deep.")
        value = tuple(items)
        if depth > 1:
            self.depths[id(value)] = (value, depth)
        return value

    def list_of(self, target):
        if type(target) is not list:
            raise self.fail(f"the pickle appends to a {type(target).__name__}, not a list it built.")
        return target

    def set_items(self, target, items):
        if type(target) not in (dict, OrderedDict):
            raise self.fail(f"the pickle sets items of a {type(target).__name__}, not a dict it built.")
        if len(items) % 2:
            raise self.fail("the pickle sets a dict item without a value.")
        for key, value in zip(items[::2], items[1::2]):
            # str and int keys only: other types (tuples, big ints) can be crafted to collide in hash.
            if not (type(key) is str or (type(key) is int and abs(key) < 2**61)):
                raise self.fail(f"a dict key of type {type(key).__name__}; checkpoints key by names and indices.")
            target[key] = value
        return target

    def build(self, target, state):
        """BUILD: only an OrderedDict this load built takes state: a state dict's `_metadata`, plain data.

        Any other attribute would shadow a method (`get`, `items`) that `state_dict_of` calls.
        """
        if type(target) is not OrderedDict:
            raise self.fail(f"the pickle sets the state of a {type(target).__name__}; only an OrderedDict "
                            "it built may take state.")
        if state is None:
            return
        if type(state) is not dict or set(state) - {"_metadata"} or not _plain(state):
            raise self.fail(f"an OrderedDict state of {_quote.repr(state)}; a state dict takes only its "
                            "'_metadata' (plain data).")
        vars(target).update(state)

    def find_global(self, module, qualname):
        marker = _GLOBALS.get((module, qualname))
        if marker is None:
            raise self.fail(
                f"refusing to load '{module}.{qualname}': the file asks to run code that is not a tensor "
                "or a plain container, and checkpoints are read without running code. Load it yourself "
                "only if you trust it, and re-save its state_dict with safetensors."
            )
        return marker

    def persistent_load(self, pid):
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"):
            raise self.fail(f"unexpected persistent id {_quote.repr(pid)}.")
        _, kind, key, location, numel = pid
        if type(kind) is not _StorageClass or type(key) is not str or type(location) is not str:
            raise self.fail(f"unexpected persistent id {_quote.repr(pid)}.")
        if type(numel) is not int or numel < 0:
            raise self.fail(f"storage {key!r} declares {_quote.repr(numel)} elements.")
        storage = self.storages.get(key)
        if storage is not None:
            if (storage.kind, storage.numel) != (kind, numel):
                raise self.fail(f"storage {key!r} is declared twice, as {storage.numel} {storage.kind.name} "
                                f"and as {numel} {kind.name}.")
            return storage
        info = self.members.get(f"{self.prefix}/data/{key}")
        if info is None:
            raise self.fail(f"storage {key!r} has no member {self.prefix}/data/{key} in the archive.")
        nbytes = numel * kind.dtype.itemsize
        if info.file_size != nbytes:  # checked before inflating anything
            raise self.fail(f"storage {key!r} declares {numel} {kind.dtype.name} elements ({nbytes} bytes) "
                            f"but its member holds {info.file_size} bytes.")
        storage = self.storages[key] = _Storage(key, kind, numel, _read_member(self.archive, info, self.path))
        return storage

    def call(self, function, args):
        if type(function) is not _Reconstructor:
            raise self.fail(f"the pickle calls a {type(function).__name__}, not a tensor or container reconstructor.")
        if type(args) is not tuple:
            raise self.fail(f"the pickle calls {function.method} with {type(args).__name__} arguments.")
        return getattr(self, function.method)(args)

    def ordered_dict(self, args):
        if args == ():
            return OrderedDict()
        if len(args) == 1 and type(args[0]) is list and all(type(p) in (list, tuple) and len(p) == 2 for p in args[0]):
            return self.set_items(OrderedDict(), [x for pair in args[0] for x in pair])
        raise self.fail(f"OrderedDict built from {_quote.repr(args)}.")

    def tensor_v2(self, args):
        if len(args) not in (6, 7) or type(args[0]) is not _Storage:
            raise self.fail(f"a tensor rebuilt from {_quote.repr(args)}.")
        return self.view(*args[:4], args[0].kind.dtype)

    def tensor_v3(self, args):
        if len(args) not in (7, 8) or type(args[0]) is not _Storage or type(args[6]) is not _DType:
            raise self.fail(f"a tensor rebuilt from {_quote.repr(args)}.")
        return self.view(*args[:4], args[6])

    def parameter(self, args):
        if len(args) != 3 or type(args[0]) not in (np.ndarray, _Unreadable):
            raise self.fail(f"a parameter rebuilt from {_quote.repr(args)}.")
        return args[0]

    def view(self, storage, offset, size, stride, dtype):
        """The (size, stride) view at `offset` of `storage`, checked to lie inside it, as a fresh array."""
        geometry = f"a tensor of size {_quote.repr(size)}, stride {_quote.repr(stride)}, offset {_quote.repr(offset)}"
        if not (type(size) is tuple and type(stride) is tuple and len(size) == len(stride) <= _MAX_NDIM):
            raise self.fail(f"{geometry}: size and stride must be tuples of one length.")
        if not all(type(n) is int and n >= 0 for n in (offset, *size, *stride)):
            raise self.fail(f"{geometry}: offset, sizes and strides must be non-negative integers.")
        length = storage.data.size // dtype.itemsize  # elements of `dtype` in the storage
        numel = math.prod(size)
        if numel > length:
            # Only an expand-like view (stride 0) has more elements than its storage: no state dict holds one.
            raise self.fail(f"{geometry}: {numel} elements on a storage of {length}; refusing to expand it.")
        last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if numel else offset - 1
        if last >= length or offset > length:
            raise self.fail(f"{geometry} reaches element {last} of a storage of {length}.")
        storage.viewed += numel
        if storage.viewed > _MAX_VIEW_FACTOR * length:
            raise self.fail(f"the views of a storage of {length} elements hold over {_MAX_VIEW_FACTOR}x as many.")
        if dtype.numpy is None:
            return _Unreadable(dtype.name, size)
        if not numel:
            return np.zeros(size, "<f4" if dtype.name == "bfloat16" else dtype.numpy)
        elements = storage.data[: length * dtype.itemsize].view(dtype.numpy)
        array = np.ndarray(size, dtype.numpy, buffer=elements, offset=offset * dtype.itemsize,
                           strides=[s * dtype.itemsize if n > 1 else 0 for n, s in zip(size, stride)])
        if dtype.name == "bfloat16":  # bfloat16 is the top half of a float32
            return (array.astype("<u4") << 16).view("<f4")
        if not storage.claimed and offset == 0 and numel == length and array.flags.c_contiguous:
            storage.claimed = True  # the whole storage, once: no copy
            return array
        return array.copy()


def _plain(obj):
    """Whether `obj` holds only containers, strings and numbers (no tensor, storage or marker)."""
    seen, todo = set(), [obj]
    while todo:
        value = todo.pop()
        if type(value) in (dict, OrderedDict, list, tuple):
            if id(value) not in seen:  # each a live object of the load: ids stay unique
                seen.add(id(value))
                todo.extend([*value.keys(), *value.values()] if isinstance(value, dict) else value)
        elif type(value) not in (str, int, float, bool, bytes, type(None)):
            return False
    return True


def _tensors_in(obj, path):
    """(dotted name, tensor) of every place a tensor sits in a loaded pickle.

    A list, not a dict: `{"model.x": a, "model": {"x": b}}` names two tensors 'model.x', and both
    must be checked (`state_dict_of` returns `b`).
    """
    found, seen, todo = [], set(), [("", obj, 0)]
    while todo:
        name, value, depth = todo.pop()
        if type(value) in (np.ndarray, _Unreadable):
            found.append((name or "<root>", value))
        elif type(value) in (dict, OrderedDict, list, tuple) and id(value) not in seen:
            if depth >= _MAX_NESTING:
                raise CheckpointError(f"{path}: containers nested over {_MAX_NESTING} deep.")
            seen.add(id(value))
            items = value.items() if isinstance(value, dict) else enumerate(value)
            todo.extend((f"{name}.{key}" if name else str(key), item, depth + 1) for key, item in items)
    return found


def load_torch_zip(path):
    """The object a PyTorch zip checkpoint holds (a state dict, or a dict around one), tensors as arrays."""
    path = os.fspath(path)
    with reading(path, "PyTorch checkpoint"), _open_zip(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: a zip archive with {len(pickles)} data.pkl members, not one.")
        prefix = pickles[0][: -len("/data.pkl")]
        if f"{prefix}/byteorder" in archive.namelist():
            byteorder = archive.getinfo(f"{prefix}/byteorder")
            if byteorder.file_size > 16 or _read_member(archive, byteorder, path).tobytes().strip() != b"little":
                raise CheckpointError(f"{path}: a big-endian PyTorch checkpoint is not supported.")
        info = archive.getinfo(pickles[0])
        if info.file_size > _MAX_PICKLE_BYTES:
            raise CheckpointError(f"{path}: a data.pkl of {info.file_size} bytes (at most {_MAX_PICKLE_BYTES}).")
        obj = _TorchPickle(archive, prefix, path).load(_read_member(archive, info, path).tobytes())
        for name, value in _tensors_in(obj, path):
            _check_tensor(name, value, path)
    return obj


# --- safetensors ------------------------------------------------------------------------------

_SAFETENSORS_FLOATS = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}


def _no_duplicates(pairs, path):
    names = set()
    for name, _ in pairs:
        if name in names:
            raise CheckpointError(f"{path}: a safetensors header naming tensor {_quote.repr(name)} twice.")
        names.add(name)
    return dict(pairs)


def safetensors_header(path):
    """{name: (dtype, shape, begin, end)}, file offsets, of a header checked to describe the file.

    Every way the header can be wrong (not JSON, nested too deep, a name twice) is a CheckpointError.
    """
    path = os.fspath(path)
    with reading(path, "safetensors file"):
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            n = int.from_bytes(prefix, "little")
            if len(prefix) < 8 or not 2 <= n <= min(_MAX_SAFETENSORS_HEADER, size - 8):
                raise CheckpointError(f"{path}: a safetensors header of {n} bytes in a file of {size} "
                                      f"(at most {_MAX_SAFETENSORS_HEADER}).")
            header = json.loads(f.read(n), object_pairs_hook=lambda pairs: _no_duplicates(pairs, path))
    if type(header) is not dict:
        raise CheckpointError(f"{path}: a safetensors header that is not a JSON object.")
    entries, data_start = {}, 8 + n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, offsets = (entry.get(k) if type(entry) is dict else None
                                 for k in ("dtype", "shape", "data_offsets"))
        if type(dtype) is not str or dtype not in _SAFETENSORS_FLOATS:
            raise CheckpointError(f"{path}: tensor {_quote.repr(name)} has dtype {_quote.repr(dtype)}; "
                                  f"keras_convnext reads {_FLOATING}.")
        if type(shape) is not list or len(shape) > _MAX_NDIM or not all(type(d) is int and d >= 0 for d in shape):
            raise CheckpointError(f"{path}: tensor {_quote.repr(name)} has shape {_quote.repr(shape)}.")
        if not (type(offsets) is list and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= size - data_start):
            raise CheckpointError(f"{path}: tensor {_quote.repr(name)} has data offsets {_quote.repr(offsets)} "
                                  f"outside the {size - data_start} data bytes.")
        if math.prod(shape) * _SAFETENSORS_FLOATS[dtype] != offsets[1] - offsets[0]:
            raise CheckpointError(f"{path}: tensor {_quote.repr(name)} of shape {shape} and dtype {dtype} "
                                  f"does not fill its {offsets[1] - offsets[0]} bytes.")
        entries[name] = (dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])
    spans = sorted((begin, end, name) for name, (_, _, begin, end) in entries.items())
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise CheckpointError(f"{path}: tensors {_quote.repr(first)} and {_quote.repr(second)} overlap.")
    covered = sum(end - begin for begin, end, _ in spans)
    if covered != size - data_start:  # the format has no holes: a gap or a tail is a damaged or padded file
        raise CheckpointError(f"{path}: the safetensors data is {size - data_start} bytes, its tensors cover "
                              f"{covered}.")
    return entries


def load_safetensors(path):
    """{name: array} of a safetensors file; its header is checked before the package reads it."""
    from safetensors import safe_open

    path = os.fspath(path)
    with reading(path, "safetensors file"):
        header = safetensors_header(path)
        tensors = {}
        with safe_open(path, framework="np") as f:
            for name, (dtype, shape, begin, end) in header.items():
                if dtype == "BF16":  # NumPy has no bfloat16, so safetensors.numpy neither: the top half of a float32
                    bits = np.fromfile(path, "<u2", count=(end - begin) // 2, offset=begin)
                    tensors[name] = (bits.astype("<u4") << 16).view("<f4").reshape(shape)
                else:
                    tensors[name] = f.get_tensor(name)
                if tensors[name].shape != shape:
                    raise CheckpointError(f"{path}: tensor {_quote.repr(name)} read as {tensors[name].shape}, "
                                          f"its header says {shape}.")
        return check_tensors(tensors, path)


# --- HDF5 -------------------------------------------------------------------------------------

def check_hdf5(path):
    """Refuses an HDF5 file that would make h5py read other files, or far more memory than it holds.

    External links, external raw storage and virtual datasets read other files of this machine
    (a weights file could carry any of them into a model); a dataset declaring much more data
    than it stores (fill values, a compression bomb) costs memory the file does not hold. Walks
    every group before Keras or h5py read any data.
    """
    import h5py

    path = os.fspath(path)
    with reading(path, "HDF5 file"), h5py.File(path, "r") as f:
        _walk_hdf5(f, path, os.path.getsize(path))


def _walk_hdf5(root, where, size):
    import h5py

    seen, todo = set(), [root]
    budget, declared = max(_EXPANSION_FLOOR, _MAX_EXPANSION * size), 0
    while todo:
        group = todo.pop()
        for name in group:
            link = group.get(name, getlink=True)
            full = f"{group.name.rstrip('/')}/{name}"
            if isinstance(link, h5py.SoftLink):
                continue  # a path inside this file: its target is walked where it is hard-linked
            if not isinstance(link, h5py.HardLink):
                raise CheckpointError(f"{where}: {full!r} is a {type(link).__name__} to another file; "
                                      "refusing to follow it.")
            obj = group[name]
            address = h5py.h5o.get_info(obj.id).addr
            if address in seen:
                continue
            seen.add(address)
            if isinstance(obj, h5py.Group):
                todo.append(obj)
            elif isinstance(obj, h5py.Dataset):
                declared += _check_dataset(obj, full, where)
                if declared > budget:
                    raise CheckpointError(f"{where}: its datasets declare over {budget} bytes (at most "
                                          f"{_MAX_EXPANSION}x the file's {size}, or {_EXPANSION_FLOOR}); "
                                          "refusing to inflate them.")


def _check_dataset(dataset, name, where):
    """Checks one dataset; returns the bytes it declares."""
    if dataset.is_virtual:
        raise CheckpointError(f"{where}: dataset {name!r} is virtual (it maps other files); refusing it.")
    if dataset.id.get_create_plist().get_external_count():
        raise CheckpointError(f"{where}: dataset {name!r} keeps its data in an external file; refusing it.")
    declared = math.prod(dataset.shape or ()) * dataset.dtype.itemsize
    stored = dataset.id.get_storage_size()
    if declared > max(_EXPANSION_FLOOR, _MAX_EXPANSION * stored):
        raise CheckpointError(f"{where}: dataset {name!r} declares {declared} bytes but stores {stored}; "
                              "refusing to inflate it.")
    return declared


class _StoredMember(io.RawIOBase):
    """A stored (uncompressed) zip member, read in place.

    h5py seeks back and forth; a `ZipFile.open` stream answers each backward seek by re-reading
    (re-inflating) the member from its start (Python 3.11), which is why a deflated one is refused.
    """

    def __init__(self, path, info):
        super().__init__()
        self.file = open(path, "rb")
        self.file.seek(info.header_offset)
        local = self.file.read(30)
        if len(local) < 30 or local[:4] != ZIP_MAGIC:
            self.file.close()
            raise CheckpointError(f"{path}: member {info.filename!r} has no local header.")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        self.start, self.size, self.pos = info.header_offset + 30 + name_len + extra_len, info.file_size, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, offset, whence=io.SEEK_SET):
        self.pos = max(0, (0, self.pos, self.size)[whence] + offset)
        return self.pos

    def readinto(self, buffer):
        self.file.seek(self.start + self.pos)
        data = self.file.read(max(0, min(len(buffer), self.size - self.pos)))
        memoryview(buffer).cast("B")[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def close(self):
        self.file.close()
        super().close()


def _check_hdf5_member(archive, name, path):
    """`check_hdf5` for the HDF5 file inside a `.keras` archive, read in place."""
    import h5py

    info = archive.getinfo(name)
    archive.check_member(info)
    if info.compress_type != zipfile.ZIP_STORED:  # Keras always stores it
        raise CheckpointError(f"{path}: member {name!r} is compressed; Keras stores it uncompressed, and "
                              "keras_convnext reads it only so (in place).")
    with _StoredMember(path, info) as member, h5py.File(member, "r") as f:
        _walk_hdf5(f, f"{path} ({name})", info.file_size)


def _names(group, attribute, path):
    names = group.attrs.get(attribute)
    if names is None:
        raise CheckpointError(f"{path}: {group.name!r} has no {attribute!r} attribute: not a keras.applications .h5.")
    names = [n.decode("utf-8") if isinstance(n, bytes) else n for n in np.asarray(names).reshape(-1)]
    if not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{path}: {group.name!r} has a {attribute!r} attribute that is not a list of names.")
    return names


def load_keras_h5_legacy(path):
    """keras.applications' released `.h5`: {weight name without ':0': array}."""
    import h5py

    path = os.fspath(path)
    check_hdf5(path)
    tensors = {}
    with reading(path, "Keras .h5 file"), h5py.File(path, "r") as f:
        group = f.get("model_weights", f)
        if not isinstance(group, h5py.Group):
            raise CheckpointError(f"{path}: 'model_weights' is not a group.")
        for layer in _names(group, "layer_names", path):
            layer_group = group.get(layer)
            if not isinstance(layer_group, h5py.Group):
                raise CheckpointError(f"{path}: layer {layer!r} is listed in 'layer_names' but has no group.")
            for weight in _names(layer_group, "weight_names", path):
                dataset = layer_group.get(weight)
                if not isinstance(dataset, h5py.Dataset):
                    raise CheckpointError(f"{path}: weight {weight!r} of layer {layer!r} is listed but has no dataset.")
                key = weight.split(":")[0]
                if key in tensors:
                    raise CheckpointError(f"{path}: weight {key!r} is listed twice.")
                if dataset.dtype.kind != "f" or dataset.dtype.itemsize not in (2, 4, 8):  # refused before reading
                    raise CheckpointError(f"{path}: tensor {key!r} has dtype {dataset.dtype}; "
                                          f"keras_convnext reads {_FLOATING}.")
                tensors[key] = np.asarray(dataset)
        return check_tensors(tensors, path)


# --- what a loaded file holds -----------------------------------------------------------------

class OnceEach:
    """{name: value} under new names, each filled once: "every source tensor consumed" holds only
    if no two source keys land on one name, so a second one is refused, naming both."""

    def __init__(self, path):
        self.path, self.values, self.sources = path, {}, {}

    def put(self, name, value, source):
        if name in self.sources:
            raise CheckpointError(f"{self.path}: tensors {_quote.repr(self.sources[name])} and {_quote.repr(source)} "
                                  f"both become {_quote.repr(name)}; a checkpoint holds each weight once.")
        self.sources[name], self.values[name] = source, value


def state_dict_of(obj, path):
    """The flat {name: array} of a loaded checkpoint, unwrapping `{"model": ...}` and the like."""
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: holds no state dict (found {type(obj).__name__}).")
    out = OnceEach(path)
    for key, value in obj.items():
        if type(key) is not str or not isinstance(value, np.ndarray):
            raise CheckpointError(
                f"{path}: entry {_quote.repr(key)} is a {type(value).__name__}, not a named tensor."
            )
        out.put(key[len("module."):] if key.startswith("module.") else key, value, key)
    return out.values


def read_hf_config(path):
    """A Hugging Face `config.json` beside the weights file, if there is one."""
    config = os.path.join(os.path.dirname(os.fspath(path)), "config.json")
    if not os.path.isfile(config):
        return {}
    with reading(config, "Hugging Face config"):
        with open(config, "rb") as f:
            raw = f.read(_MAX_CONFIG_BYTES + 1)
        if len(raw) > _MAX_CONFIG_BYTES:
            raise CheckpointError(f"{config}: a config.json over {_MAX_CONFIG_BYTES} bytes.")
        data = json.loads(raw)
    if type(data) is not dict:
        raise CheckpointError(f"{config}: a config.json that is not a JSON object.")
    eps = data.get("layer_norm_eps")
    if eps is not None and not (type(eps) in (int, float) and math.isfinite(eps) and 0 < eps < 1):
        raise CheckpointError(f"{config}: layer_norm_eps is {_quote.repr(eps)}, not a small positive number.")
    return data
