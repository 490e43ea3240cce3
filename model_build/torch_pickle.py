"""Read a legacy (non-zip) ``torch.save`` state dict into numpy arrays, without torch.

The legacy format is a sequence of pickles followed by raw data:

1. the magic number, 2. the protocol version (1001), 3. system info (endianness, type sizes),
4. the main pickle: the state dict, whose tensors are ``torch._utils._rebuild_tensor_v2`` calls
   on storages given as persistent ids ``("storage", StorageType, key, location, numel, view)``,
5. the list of storage keys, in the order their data follows,
6. per key: an 8-byte little-endian element count, then that many elements of raw data.

Unpickling runs code named by the file, so the unpickler here resolves only the few globals a
state dict needs, each to a harmless local stand-in; any other global raises.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn

import numpy as np

from engine.errors import TorchPickleError

logger = logging.getLogger(__name__)

_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_PROTOCOL_VERSION = 1001

_STORAGE_DTYPES: dict[str, np.dtype[Any]] = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for ``torch.FloatStorage`` and friends: only the element type matters."""

    dtype: np.dtype[Any]


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: np.dtype[Any]
    offset: int  # in elements, non-zero only for storage views
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    """What ``_rebuild_tensor_v2`` returns here: a strided window on a storage read later."""

    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]


def _rebuild_tensor_v2(
    storage: _StorageRef,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    *_ignored: object,  # requires_grad, backward_hooks, (metadata)
) -> _TensorRef:
    if not isinstance(storage, _StorageRef):
        raise TorchPickleError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
    return _TensorRef(storage, int(storage_offset), tuple(map(int, size)), tuple(map(int, stride)))


def _rebuild_parameter(data: _TensorRef, *_ignored: object) -> _TensorRef:
    return data


class _StateDict(dict[str, Any]):
    """Stand-in for the state dict's OrderedDict (dicts keep order); unlike a plain dict it has
    a ``__dict__`` for the ``_metadata`` attribute that the pickle's BUILD sets on it."""


_ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): _StateDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals of a plain torch state dict.

    Raises:
        TorchPickleError: on any other global (e.g. ``os.system``) or an unknown persistent id.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise TorchPickleError(
                f"refusing to unpickle global {module}.{name}: not part of a torch state dict"
            ) from None

    def persistent_load(self, pid: Any) -> _StorageRef:
        match pid:
            case ("storage", _StorageType(dtype=dtype), key, _location, numel, view):
                if view is None:
                    return _StorageRef(str(key), dtype, 0, int(numel))
                # A view of a larger storage: (root key, element offset, view size).
                root_key, view_offset, view_size = view
                return _StorageRef(str(root_key), dtype, int(view_offset), int(view_size))
        raise TorchPickleError(f"unsupported persistent id in torch pickle: {pid!r}")


class _DataOnlyUnpickler(pickle.Unpickler):
    """For the header pickles and the key list, which contain no globals at all."""

    def find_class(self, module: str, name: str) -> NoReturn:
        raise TorchPickleError(f"refusing to unpickle global {module}.{name} in a torch header")


def read_legacy_state_dict(source: Path | IO[bytes]) -> dict[str, np.ndarray]:
    """Read a legacy torch state dict (``torch.save(..., _use_new_zipfile_serialization=False)``).

    Args:
        source: the ``.pth`` file, as a path or a binary file object.

    Returns:
        Tensor name to a fresh C-contiguous numpy array of the stored dtype and shape.

    Raises:
        TorchPickleError: not a legacy torch file, truncated or corrupt, a big-endian file, a
            value that is not a tensor, or a pickle referencing anything but tensor rebuilding.
        OSError: the file cannot be opened.
    """
    if isinstance(source, Path):
        with source.open("rb") as handle:
            return read_legacy_state_dict(handle)
    try:
        return _read(source)
    except TorchPickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError) as exc:
        raise TorchPickleError(f"corrupt legacy torch file: {exc}") from exc


def _read(stream: IO[bytes]) -> dict[str, np.ndarray]:
    try:
        magic = _DataOnlyUnpickler(stream).load()
    except (pickle.UnpicklingError, EOFError, TorchPickleError) as exc:
        raise TorchPickleError(
            "not a legacy torch file (zip-format torch files are not supported)"
        ) from exc
    if magic != _MAGIC_NUMBER:
        raise TorchPickleError("not a legacy torch file: wrong magic number")
    protocol = _DataOnlyUnpickler(stream).load()
    if protocol != _PROTOCOL_VERSION:
        raise TorchPickleError(f"unsupported torch file protocol {protocol!r}")
    sys_info = _DataOnlyUnpickler(stream).load()
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
        raise TorchPickleError("only little-endian torch files are supported")

    state = RestrictedUnpickler(stream).load()
    keys = _DataOnlyUnpickler(stream).load()
    if not isinstance(state, dict) or not isinstance(keys, list):
        raise TorchPickleError("torch file does not hold a state dict")

    refs: dict[str, _TensorRef] = {}
    for name, value in state.items():
        if not isinstance(value, _TensorRef):
            raise TorchPickleError(f"state dict entry {name!r} is not a tensor")
        refs[str(name)] = value
    dtypes = {ref.storage.key: ref.storage.dtype for ref in refs.values()}

    # Elements each storage must hold, from what the tensors (and storage views) claim.
    needed: dict[str, int] = {}
    for ref in refs.values():
        end = ref.storage.offset + ref.storage.numel
        needed[ref.storage.key] = max(needed.get(ref.storage.key, 0), end)
    storages: dict[str, np.ndarray] = {}
    for key in map(str, keys):
        dtype = dtypes.get(key)
        if dtype is None:
            raise TorchPickleError(f"storage {key} listed but used by no tensor")
        numel = int(np.frombuffer(_read_exactly(stream, 8), "<i8")[0])
        if numel < needed[key]:
            raise TorchPickleError(f"storage {key} holds {numel} elements, {needed[key]} used")
        storages[key] = np.frombuffer(_read_exactly(stream, numel * dtype.itemsize), dtype)

    arrays = {name: _materialise(name, ref, storages) for name, ref in refs.items()}
    logger.debug("read %d tensors from %d storages", len(arrays), len(storages))
    return arrays


def _materialise(name: str, ref: _TensorRef, storages: dict[str, np.ndarray]) -> np.ndarray:
    storage = storages.get(ref.storage.key)
    if storage is None:
        raise TorchPickleError(f"tensor {name!r}: storage {ref.storage.key} has no data")
    flat = storage[ref.storage.offset : ref.storage.offset + ref.storage.numel]
    if (
        len(ref.shape) != len(ref.strides)
        or min((*ref.shape, *ref.strides, ref.offset), default=0) < 0
    ):
        raise TorchPickleError(f"tensor {name!r}: invalid shape/stride {ref.shape}/{ref.strides}")
    if 0 in ref.shape:
        return np.zeros(ref.shape, flat.dtype)
    # as_strided does no bounds checking: prove the farthest element lies inside the storage.
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.strides, strict=True))
    if last >= len(flat):
        raise TorchPickleError(f"tensor {name!r} reaches past the end of its storage")
    window = np.lib.stride_tricks.as_strided(
        flat[ref.offset :],
        shape=ref.shape,
        strides=tuple(s * flat.itemsize for s in ref.strides),
        writeable=False,
    )
    return window.copy(order="C")


def _read_exactly(stream: IO[bytes], size: int) -> bytearray:
    # In bounded chunks: a corrupt size must end in "truncated", not in one huge allocation.
    data = bytearray()
    while len(data) < size:
        chunk = stream.read(min(size - len(data), 1 << 26))
        if not chunk:
            raise TorchPickleError(f"truncated torch file: wanted {size} bytes, got {len(data)}")
        data += chunk
    return data
