"""Base checkpoint files read as tensors: safetensors (one file or shards and their index),
``pytorch_model.bin`` and MiniMind ``.pth`` files, with no model in sight.

Nothing is unpickled: safetensors is read as is and a ``.pth`` / ``.bin`` goes through
``torch.load(..., weights_only=True)``. Every damaged or hostile file is a ``WeightsError`` naming
it; a missing one is a ``FileNotFoundError``.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from minilora.core.errors import WeightsError
from minilora.core.files import read_json, regular_file, torch_load_reason

# Wrappers a training script leaves in front of every key: DDP's `module.`, torch.compile's
# `_orig_mod.`.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
INDEX_NAME = "model.safetensors.index.json"


# safetensors dtype names -> torch dtypes: every one safetensors writes, so that a weight of a
# dtype no model computes with (int8, bool, complex64) is read and then refused by name, not
# reported as a damaged file
_ST_DTYPES = {name: getattr(torch, dtype) for name, dtype in {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "C64": "complex64",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}.items() if hasattr(torch, dtype)}
_ELEMENT_BYTES = {dtype: torch.empty(0, dtype=dtype).element_size()
                  for dtype in _ST_DTYPES.values()}


def safetensors_source(path: Path) -> tuple[Path, list[Path], dict[str, str] | None] | None:
    """(source, shard files, index weight_map) when path holds safetensors; else None."""
    if path.is_dir():
        if (path / INDEX_NAME).is_file():
            return safetensors_source(path / INDEX_NAME)
        if (path / "model.safetensors").is_file():
            return path / "model.safetensors", [path / "model.safetensors"], None
        return None
    if path.name.endswith(".index.json"):
        weight_map = read_index(path)
        return path, [path.parent / s for s in sorted(set(weight_map.values()))], weight_map
    if path.suffix == ".safetensors":
        return path, [path], None
    return None


def read_state_dict(path: Path) -> tuple[dict[str, Tensor], Path]:
    """The tensors at path and the file (or index) they came from.

    Args:
        path: a folder, a .safetensors file, an index, or a .pth / .pt / .bin file.

    Raises:
        FileNotFoundError: a folder without a weights file, or an index naming a missing shard.
        WeightsError: a damaged or refused file (a pickle that needs code), or not tensors.
    """
    if path.is_dir():
        for name in ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return read_state_dict(path / name)
        pths = sorted(p for p in path.iterdir() if p.suffix in TORCH_SUFFIXES)
        if len(pths) == 1:
            return read_state_dict(pths[0])
        raise FileNotFoundError(f"{path}: no model.safetensors, model.safetensors.index.json, "
                                f"pytorch_model.bin or single .pth file here")
    if path.name.endswith(".index.json"):
        weight_map = read_index(path)
        sd: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            sd.update(_load_safetensors(path.parent / shard))
        check_index_keys(path, weight_map, set(sd))
        return sd, path
    regular_file(path, "a weights file")  # a FIFO or a device would never end
    if path.suffix == ".safetensors":
        return _load_safetensors(path), path
    if path.suffix in TORCH_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refuses pickled code with an UnpicklingError
            raise WeightsError(f"{path}: not a plain tensor state dict that loads with "
                               f"weights_only=True ({torch_load_reason(e)})") from None
        if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
            obj = obj["model"]  # a training checkpoint {"model": state_dict, "optimizer": ...}
        if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
            raise WeightsError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
        return obj, path
    raise WeightsError(f"{path}: unknown checkpoint type (expected a folder, .safetensors, "
                       f".index.json, {', '.join(TORCH_SUFFIXES)})")


def safetensors_header(path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """The tensors' entries of a safetensors header and where the data starts; a WeightsError
    for a torn or damaged file.

    The shards are read with plain reads, not safetensors' memory map: a mapped shard's pages
    stay resident (and counted in the process's RSS) after its tensors are copied out.
    """
    try:  # safetensors' own checks of the header first (it maps the file, reads no data)
        with safe_open(str(path), framework="pt", device="cpu"):
            pass
    except Exception as e:  # SafetensorError: torn or damaged
        raise WeightsError(f"{path}: not a readable safetensors file, truncated or damaged "
                           f"({e})") from None
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= size - 8:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for key, info in header.items():
            begin, end = info["data_offsets"]
            if info["dtype"] not in _ST_DTYPES or not 0 <= begin <= end <= size - 8 - n:
                raise ValueError(f"tensor {key}: dtype {info['dtype']}, bytes {begin}..{end}")
    except (ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file, truncated or damaged "
                           f"({e})") from None
    return header, 8 + n


def read_tensor(f: io.BufferedReader, path: Path, key: str, info: dict[str, Any],
                start: int) -> Tensor:
    """Tensor `key` (its header entry `info`) of the open safetensors file `f`, whose data
    starts at byte `start`; a WeightsError when the file is cut short."""
    begin, end = info["data_offsets"]
    dtype = _ST_DTYPES[info["dtype"]]
    data = torch.empty(end - begin, dtype=torch.uint8)
    f.seek(start + begin)
    if f.readinto(data.numpy().data) != end - begin:
        raise WeightsError(f"{path}: tensor {key} is cut short (truncated file)")
    return data.view(dtype).reshape(info["shape"])


def read_rows(f: io.BufferedReader, path: Path, key: str, info: dict[str, Any], start: int,
              rows: tuple[int, int]) -> Tensor:
    """Rows ``rows[0]`` to ``rows[1]`` (end excluded) along the first dimension of tensor `key`,
    read alone: a row-major tensor's rows are one run of bytes, so nothing else of it is read.

    Raises:
        WeightsError: the file is cut short.
    """
    begin, _ = info["data_offsets"]
    dtype = _ST_DTYPES[info["dtype"]]
    shape = list(info["shape"])
    row_bytes = _ELEMENT_BYTES[dtype]
    for n in shape[1:]:
        row_bytes *= n
    first, stop = rows
    data = torch.empty((stop - first) * row_bytes, dtype=torch.uint8)
    f.seek(start + begin + first * row_bytes)
    if f.readinto(data.numpy().data) != data.numel():
        raise WeightsError(f"{path}: tensor {key} is cut short (truncated file)")
    return data.view(dtype).reshape([stop - first, *shape[1:]])


def read_index(path: Path) -> dict[str, str]:
    """A model.safetensors.index.json's weight_map, its shards checked to be in its folder."""
    try:  # bounded: an endless or huge index is refused before it is parsed
        index: Any = read_json(path, "a safetensors index", error=WeightsError)  # any JSON value
        weight_map = index["weight_map"]
    except (KeyError, TypeError) as e:
        raise WeightsError(f"{path}: expected a JSON object with a 'weight_map' ({e})") from e
    if not isinstance(weight_map, dict):
        raise WeightsError(f"{path}: 'weight_map' is a {type(weight_map).__name__}; expected "
                           f"an object of tensor name -> shard file name")
    outside = sorted({repr(s) for s in weight_map.values() if not _plain_file_name(s)})
    if outside:  # "../x" or "/x" would read a file the folder does not hold
        raise WeightsError(f"{path}: weight_map names shards {', '.join(outside)}; expected "
                           f"file names inside {path.parent} (no folders, no absolute paths)")
    for shard in sorted(set(weight_map.values())):
        if not (path.parent / shard).is_file():
            raise FileNotFoundError(f"{path}: names shard {shard}, which is not in "
                                    f"{path.parent}")
    return weight_map


def check_index_keys(path: Path, weight_map: dict[str, str], found: set[str]) -> None:
    """A WeightsError naming the keys the index lists that no shard holds."""
    absent = sorted(set(weight_map) - found)
    if absent:
        raise WeightsError(f"{path}: keys listed in the index but not in their shard: "
                           f"{listing(absent)}")


def _plain_file_name(name: object) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..") and "\\" not in name
            and Path(name).name == name)


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(path)
    except Exception as e:  # SafetensorError (neither OSError nor ValueError): torn or damaged
        raise WeightsError(f"{path}: not a readable safetensors file, truncated or damaged "
                           f"({e})") from None


V = TypeVar("V")


def strip_wrappers(sd: dict[str, V]) -> dict[str, V]:
    """`sd` with the wrappers a training script leaves in front of every key removed."""
    out = {}
    for key, value in sd.items():
        name = key
        while name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        out[name] = value
    return out


def listing(keys: list[str], limit: int = 12) -> str:
    """The first `limit` keys and how many more, for an error message."""
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def sliceable(path: Path) -> bool:
    """Whether ``BaseSlices`` reads the base at ``path`` a slice at a time: safetensors, or a
    ``.pth`` / ``.bin`` saved in torch's zip format (which maps; the legacy format does not)."""
    if safetensors_source(path) is not None:
        return True
    file = _torch_file(path)
    return file is not None and file.is_file() and zipfile.is_zipfile(file)


def mapped_state_dict(path: Path) -> tuple[dict[str, Tensor], Path]:
    """A ``.pth`` / ``.bin`` state dict mapped, not read (``torch.load(mmap=True,
    weights_only=True)``): a tensor's bytes are read from the file when touched, so a slice of
    it costs its own pages only. Wrappers are stripped from the keys.

    Raises:
        FileNotFoundError: path holds no zip-format torch file (see ``sliceable``).
        WeightsError: a damaged or refused file, or not a dict of tensors.
    """
    file = _torch_file(path)
    if file is None or not file.is_file() or not zipfile.is_zipfile(file):
        raise FileNotFoundError(f"{path}: no .pth / .bin file in torch's zip format to map")
    regular_file(file, "a weights file")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # weights_only refuses pickled code with an UnpicklingError
        raise WeightsError(f"{file}: not a plain tensor state dict that loads with "
                           f"weights_only=True ({torch_load_reason(e)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # a training checkpoint {"model": state_dict, "optimizer": ...}
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsError(f"{file}: expected a dict of tensors, got {type(obj).__name__}")
    return strip_wrappers(obj), file


def _torch_file(path: Path) -> Path | None:
    """The .pth / .pt / .bin file ``read_state_dict`` reads at path, if that is one."""
    if path.is_dir():
        if (path / "model.safetensors").is_file() or (path / INDEX_NAME).is_file():
            return None
        if (path / "pytorch_model.bin").is_file():
            return path / "pytorch_model.bin"
        pths = sorted(p for p in path.iterdir() if p.suffix in TORCH_SUFFIXES)
        return pths[0] if len(pths) == 1 else None
    return path if path.suffix in TORCH_SUFFIXES else None


class BaseSlices:
    """A base read a tensor or a range of its rows at a time, by the names the model gives its
    parameters (wrappers stripped): safetensors (one file, or shards and their index) with plain
    reads of those bytes, or a zip-format ``.pth`` / ``.bin`` mapped (``mapped_state_dict``), of
    which only the pages touched are read.

    What FSDP needs to fill each process's shards: only the rows a process keeps are read
    (``bytes_read`` counts them).

    Raises:
        FileNotFoundError: path holds neither (a legacy-format torch file, or nothing).
        WeightsError: a damaged file, or an index listing keys its shards do not hold.
    """

    def __init__(self, path: Path) -> None:
        self.bytes_read = 0
        self._where: dict[str, tuple[Path, str, dict[str, Any], int]] = {}
        self._mapped: dict[str, Tensor] | None = None
        found = safetensors_source(path)
        if found is None:
            self._mapped, self.source = mapped_state_dict(path)
            return
        self.source, shards, weight_map = found
        for shard in shards:
            header, start = safetensors_header(shard)
            for key, info in header.items():
                self._where[strip_wrappers({key: None}).popitem()[0]] = (shard, key, info, start)
        if weight_map is not None:
            check_index_keys(self.source, weight_map,
                             {key for _, key, _, _ in self._where.values()})

    def __contains__(self, name: str) -> bool:
        return name in (self._where if self._mapped is None else self._mapped)

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of tensor ``name``."""
        if self._mapped is not None:
            return tuple(self._mapped[name].shape)
        return tuple(self._where[name][2]["shape"])

    def read(self, name: str, rows: tuple[int, int] | None = None) -> Tensor:
        """Tensor ``name`` as stored, or only its rows ``rows[0]`` to ``rows[1]`` (end excluded)
        along the first dimension.

        Raises:
            KeyError: no tensor of that name.
            WeightsError: the file is cut short.
        """
        if self._mapped is not None:
            t = self._mapped[name]
            t = (t if rows is None else t[rows[0]:rows[1]]).clone()  # its pages only
            self.bytes_read += t.numel() * t.element_size()
            return t
        shard, key, info, start = self._where[name]
        with open(shard, "rb") as f:
            if rows is None:
                t = read_tensor(f, shard, key, info, start)
            else:
                t = read_rows(f, shard, key, info, start, rows)
        self.bytes_read += t.numel() * t.element_size()
        return t
