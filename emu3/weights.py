"""Checkpoint files: reading and writing safetensors, and loading them into cells strictly.

A checkpoint directory holds `config.json` plus either one `model.safetensors` or shards listed
in `model.safetensors.index.json` (BAAI's Emu3-Gen ships 7). Shards are memory-mapped and read
one at a time, each tensor cast to its parameter's dtype as it goes, so loading never holds two
full copies of the model. Every problem (missing directory or file, truncated shard, index entry
pointing nowhere, missing / unexpected / wrongly shaped tensors) raises `WeightsError` naming
the file and the keys; a model is never left half-loaded without saying so.
"""

import contextlib
import json
import mmap
import os
import secrets
import struct
from pathlib import Path
from typing import Callable, Iterator

import ml_dtypes
import mindspore as ms
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"

_NP_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_ST_DTYPES = {v: k for k, v in _NP_DTYPES.items()}
_MS_TO_NP = {
    ms.float32: np.float32, ms.float16: np.float16, ms.float64: np.float64,
    ms.bfloat16: ml_dtypes.bfloat16, ms.int64: np.int64, ms.int32: np.int32, ms.bool_: np.bool_,
}
# Show this many names per problem in an error; the total count is always given.
_MAX_LISTED = 20


class WeightsError(ValueError):
    """A checkpoint directory or file that cannot be loaded as asked."""


def _listing(title: str, names) -> str:
    names = sorted(names)
    shown = ", ".join(names[:_MAX_LISTED])
    more = f" ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return f"  {title} ({len(names)}): {shown}{more}"


def read_json(path, what: str) -> dict:
    """A JSON object from `path`; any problem raises WeightsError naming the file."""
    try:
        value = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise WeightsError(f"{path} must hold a JSON object ({what}), got {type(value).__name__}")
    return value


def read_config(directory) -> dict:
    """The parsed `config.json` of a checkpoint directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise WeightsError(f"checkpoint directory {directory} does not exist")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise WeightsError(f"{path} is missing: a checkpoint directory needs a {CONFIG_FILE}")
    return read_json(path, "the model's configuration")


def weight_files(directory) -> list[Path]:
    """The safetensors files of a checkpoint directory, validated against its index if sharded."""
    directory = Path(directory)
    if not directory.is_dir():
        raise WeightsError(f"checkpoint directory {directory} does not exist")
    weight_map = index_weight_map(directory)
    if weight_map is not None:
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise WeightsError(f"{directory / INDEX_FILE} lists shard files that do not exist:\n"
                               + _listing("missing shards", missing))
        return [directory / s for s in shards]
    single = directory / SINGLE_FILE
    if single.is_file():
        return [single]
    raise WeightsError(f"{directory} holds neither {SINGLE_FILE} nor {INDEX_FILE}")


def index_weight_map(directory) -> dict | None:
    """name -> shard file from the index, or None for a single-file checkpoint."""
    index = Path(directory) / INDEX_FILE
    if not index.is_file():
        return None
    weight_map = read_json(index, "a safetensors index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in weight_map.items()):
        raise WeightsError(f"{index} is not a valid safetensors index: it needs a \"weight_map\" object of "
                           "tensor name -> shard file name")
    return weight_map


def _tensor_entry(path: Path, name: str, info, data_size: int):
    """(dtype, shape, begin, end) of one header entry, checked against the data it points at."""
    if not isinstance(info, dict) or info.get("dtype") not in _NP_DTYPES:
        dtype = info.get("dtype") if isinstance(info, dict) else info
        raise WeightsError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if (not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                               for d in shape)
            or not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise WeightsError(f"{path}: tensor {name!r} has a malformed header entry {info}")
    begin, end = offsets
    if end > data_size:
        raise WeightsError(f"{path} is truncated: tensor {name!r} ends at byte {end} of the data, the file holds "
                           f"{data_size} bytes of data")
    dtype = _NP_DTYPES[info["dtype"]]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if end - begin != expected:
        raise WeightsError(f"{path}: tensor {name!r} of shape {shape} and dtype {info['dtype']} needs {expected} "
                           f"bytes, its data_offsets give {end - begin}")
    return dtype, shape, begin, end


def read_safetensors(path) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file as read-only arrays over a memory map."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path} is truncated: too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise WeightsError(f"{path} is truncated or not a safetensors file (header length {header_len})")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise WeightsError(f"{path} is not a safetensors file (unreadable header)") from None
        if not isinstance(header, dict):
            raise WeightsError(f"{path} is not a safetensors file (its header is not a JSON object)")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else b""
    header.pop("__metadata__", None)
    base = 8 + header_len
    tensors = {}
    for name, info in header.items():
        dtype, shape, begin, end = _tensor_entry(path, name, info, size - base)
        arr = np.frombuffer(buf, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=base + begin)
        tensors[name] = arr.reshape(shape)
    return tensors


def iter_checkpoint(directory) -> Iterator[tuple[Path, dict[str, np.ndarray]]]:
    """(file, tensors) for each safetensors file of a checkpoint directory, one file at a time."""
    weight_map = index_weight_map(directory)
    for path in weight_files(directory):
        tensors = read_safetensors(path)
        if weight_map is not None:
            listed = {k for k, v in weight_map.items() if v == path.name}
            absent = listed - tensors.keys()
            if absent:
                raise WeightsError(
                    f"{path} lacks tensors that {INDEX_FILE} places in it:\n" + _listing("absent", absent)
                )
        yield path, tensors


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb"):
    """Open `path` for writing so that it appears whole or not at all: the data goes to a
    temporary file beside it, is flushed to disk, and only then renamed over `path`. A failed
    write (a full disk, an exception, Ctrl-C) leaves the previous `path` as it was. The temporary
    name is unique to this writer, so concurrent writers never write into one file; the last
    rename wins, and every version that ever appears at `path` is whole."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        # "x": create, never open another writer's file.
        with open(tmp, mode.replace("w", "x")) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_safetensors(tensors: dict[str, np.ndarray], path, metadata: dict | None = None) -> None:
    """Write arrays as one safetensors file, atomically (a temporary file renamed into place)."""
    path = Path(path)
    header, offset = {}, 0
    arrays = {}
    for name in sorted(tensors):
        # ascontiguousarray turns a 0-d array (e.g. BatchNorm's num_batches_tracked) into shape (1,).
        arr = np.ascontiguousarray(tensors[name]).reshape(np.shape(tensors[name]))
        if arr.dtype not in _ST_DTYPES:
            raise WeightsError(f"cannot write tensor {name!r} of dtype {arr.dtype} to safetensors")
        header[name] = {"dtype": _ST_DTYPES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        arrays[name] = arr
        offset += arr.nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned
    with atomic_open(path) as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for arr in arrays.values():
            f.write(arr.tobytes())


def write_checkpoint(tensors: dict[str, np.ndarray], directory, config: dict,
                     max_shard_bytes: int | None = None) -> None:
    """Write `config.json` and the weights (one file, or shards plus an index past max_shard_bytes)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    total = sum(a.nbytes for a in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        write_safetensors(tensors, directory / SINGLE_FILE, {"format": "np"})
    else:
        shards, current, size = [], {}, 0
        for name in sorted(tensors):
            if current and size + tensors[name].nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[name] = tensors[name]
            size += tensors[name].nbytes
        shards.append(current)
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(shard, directory / fname, {"format": "np"})
            weight_map.update({k: fname for k in shard})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _write_text_atomic(directory / INDEX_FILE, json.dumps(index, indent=2, sort_keys=True))
    _write_text_atomic(directory / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True))


def _write_text_atomic(path: Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def to_numpy(param) -> np.ndarray:
    """A parameter's value as a numpy array in its own dtype (bf16 through ml_dtypes)."""
    if param.dtype == ms.bfloat16:
        return param.astype(ms.float32).asnumpy().astype(ml_dtypes.bfloat16)
    return param.asnumpy()


def _to_tensor(arr: np.ndarray, dtype) -> ms.Tensor:
    if dtype == ms.bfloat16:
        return ms.Tensor(np.asarray(arr, dtype=np.float32)).astype(ms.bfloat16)
    return ms.Tensor(np.array(arr, dtype=_MS_TO_NP[dtype]))


def load_into(cell, directory, rename: Callable[[str], str | None],
              transform: Callable[[str, np.ndarray], np.ndarray] | None = None) -> None:
    """Load a checkpoint directory into `cell`'s parameters, strictly.

    `rename(file_name)` maps a tensor name in the files to a parameter name of the cell, or None
    for a tensor that is known and deliberately not loaded. `transform(param_name, array)` may
    reshape an array to the parameter's layout. Each tensor is cast to its parameter's dtype.
    Raises WeightsError listing every missing, unexpected or wrongly shaped tensor.
    """
    params = dict(cell.parameters_and_names())
    loaded, unexpected, mismatched = set(), [], []
    files = []
    for path, tensors in iter_checkpoint(directory):
        files.append(path.name)
        for name, arr in tensors.items():
            target = rename(name)
            if target is None:
                continue
            if target not in params:
                unexpected.append(name)
                continue
            if transform is not None:
                arr = transform(target, arr)
            param = params[target]
            if tuple(arr.shape) != tuple(param.shape):
                mismatched.append(f"{name} {tuple(arr.shape)} vs expected {tuple(param.shape)}")
                continue
            param.set_data(_to_tensor(arr, param.dtype))
            loaded.add(target)
        del tensors
    missing = [n for n in params if n not in loaded]
    if missing or unexpected or mismatched:
        lines = [f"checkpoint {directory} ({', '.join(files)}) does not match {type(cell).__name__}:"]
        if missing:
            lines.append(_listing("missing tensors", missing))
        if unexpected:
            lines.append(_listing("unexpected tensors", unexpected))
        if mismatched:
            lines.append(_listing("wrongly shaped tensors", mismatched))
        raise WeightsError("\n".join(lines))
