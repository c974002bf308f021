"""Open a GGUF with the `gguf` package (memory-mapped, zero copy) and validate it before any compute.

A `GGUFFile` holds the metadata as plain Python values and the tensors as `QTensor`s: views of raw
GGML blocks in the mmap. Nothing is read from disk until a kernel touches a tensor's bytes.
Split models (`name-00001-of-00003.gguf`) open as one file set.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .errors import GGUFError
from .quant.formats import get_format


def readonly(a: np.ndarray) -> np.ndarray:
    """Weights are read-only wherever they live (map, copy, expert slot), so a kernel sees one array type
    and is compiled once: two compilations of a fast-math kernel need not round alike."""
    a.flags.writeable = False
    return a

GGUF_MAGIC = b"GGUF"
SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<idx>\d{5})-of-(?P<n>\d{5})\.gguf$")


def pread_full(fd: int, view: memoryview, offset: int, direct: bool = False) -> int:
    """Read len(view) bytes at offset into view (pread, retried after short reads); returns the bytes read,
    fewer only where the file ends. `direct`: fd is O_DIRECT, where a short read means the end of the file
    (a retry would start at an unaligned offset)."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            break
        got += n
        if direct and got % ALIGN:
            break
    return got


ALIGN = 4096  # O_DIRECT reads: file offset, length and buffer address all multiples of this
_BOUNCE = 1 << 20


def aligned_empty(shape: tuple[int, ...], offset: int) -> np.ndarray:
    """An uninitialised uint8 array whose address is congruent to `offset` modulo ALIGN, so that a RawReader
    reads file bytes from `offset` (and from offset + k * ALIGN) straight into it."""
    n = int(np.prod(shape))
    raw = np.empty(n + ALIGN, dtype=np.uint8)
    shift = (offset - raw.ctypes.data) % ALIGN
    return raw[shift:shift + n].reshape(shape)


class RawReader:
    """Reads byte ranges of one file into arrays, past the page cache (O_DIRECT) where the system allows it:
    no copy through kernel pages, no readahead, nothing left cached to drop. `benchmarks/disk_reads.py` on
    this VM, 1.2 MB reads on 8 threads: 0.14 CPU s per GB read straight into place, 0.22-0.23 through the
    bounce buffer (when the destination's address does not line up with the file offset), 0.35-0.39 through
    the page cache; CPU time that decode needs when reads overlap compute. Elsewhere (macOS, tmpfs): pread with readahead off and the
    pages dropped after each read. Thread-safe."""

    def __init__(self, path, direct: bool = True):
        self.path = str(path)
        self.fd = os.open(self.path, os.O_RDONLY)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
        self.dfd = self._open_direct() if direct else None
        self._local = threading.local()

    def _open_direct(self) -> int | None:
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            return None
        try:
            dfd = os.open(self.path, os.O_RDONLY | flag)
        except OSError:
            return None
        try:  # some filesystems accept the flag and refuse the reads
            with mmap.mmap(-1, ALIGN) as probe:
                os.preadv(dfd, [memoryview(probe)], 0)
        except OSError:
            os.close(dfd)
            return None
        return dfd

    @property
    def direct(self) -> bool:
        return self.dfd is not None

    def read(self, dst: np.ndarray, offset: int) -> int:
        """Fill the contiguous uint8 array dst with the file's bytes at offset; returns the bytes read (fewer
        only where the file ends)."""
        if not dst.flags.c_contiguous:
            raise ValueError("RawReader.read needs a contiguous array")
        view = memoryview(dst.reshape(-1))
        n = len(view)
        if self.dfd is None:
            got = pread_full(self.fd, view, offset)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self.fd, offset, n, os.POSIX_FADV_DONTNEED)
            return got
        a0 = -(-offset // ALIGN) * ALIGN
        a1 = (offset + n) // ALIGN * ALIGN
        if (dst.ctypes.data - offset) % ALIGN or a1 <= a0:
            return self._bounce(view, offset)
        got = pread_full(self.dfd, view[a0 - offset:a1 - offset], a0, direct=True)
        if got < a1 - a0:  # the file ends inside the aligned middle
            return self._bounce(view[:a0 - offset], offset) + got
        return self._bounce(view[:a0 - offset], offset) + got + self._bounce(view[a1 - offset:], a1)

    def _bounce(self, view: memoryview, offset: int) -> int:
        """Through this thread's aligned buffer, in aligned pieces."""
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = memoryview(mmap.mmap(-1, _BOUNCE))
        got = 0
        while got < len(view):
            pos = offset + got
            start = pos // ALIGN * ALIGN
            want = min(len(view) - got, _BOUNCE - (pos - start))
            span = -(-(pos - start + want) // ALIGN) * ALIGN
            k = max(min(want, pread_full(self.dfd, buf[:span], start, direct=True) - (pos - start)), 0)
            view[got:got + k] = buf[pos - start:pos - start + k]
            got += k
            if k < want:
                break
        return got

    def close(self) -> None:
        for fd in (self.fd, self.dfd):
            if fd is not None:
                os.close(fd)
        self.fd = self.dfd = None


@dataclass(frozen=True)
class QTensor:
    """One weight as stored: raw GGML blocks, a view of the file's memory map or a read-only copy of it.

    shape is in numpy order (ggml's ne reversed): a matrix is (out, in), experts are (E, out, in).
    data is a uint8 view of shape (*shape[:-1], row_bytes).
    """

    name: str
    ggml_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray
    file_offset: int
    path: str

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def type_name(self) -> str:
        return self.ggml_type.name

    def dequantize(self) -> np.ndarray:
        """float32 array of `shape` (reads every byte of the tensor)."""
        fmt = get_format(self.ggml_type)
        blocks = np.ascontiguousarray(self.data).reshape(-1, fmt.type_size)
        return fmt.dequantize_blocks(blocks).reshape(self.shape)

    def rows(self, start: int, stop: int) -> "QTensor":
        """Rows start..stop of a matrix, as a view."""
        row_bytes = self.data.shape[-1]
        return QTensor(f"{self.name}[{start}:{stop}]", self.ggml_type, (stop - start, *self.shape[1:]),
                       self.data[start:stop], self.file_offset + start * row_bytes, self.path)

    def __getitem__(self, index: int) -> "QTensor":
        """Slice along the first axis: one expert of an `*_exps` tensor (a contiguous byte range)."""
        data = self.data[index]
        offset = self.file_offset + index * int(np.prod(self.data.shape[1:]))
        return QTensor(f"{self.name}[{index}]", self.ggml_type, self.shape[1:], data, offset, self.path)


_SCALARS = {  # GGUF value type -> struct format
    gguf.GGUFValueType.UINT8: "<B", gguf.GGUFValueType.INT8: "<b", gguf.GGUFValueType.UINT16: "<H",
    gguf.GGUFValueType.INT16: "<h", gguf.GGUFValueType.UINT32: "<I", gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.FLOAT32: "<f", gguf.GGUFValueType.BOOL: "<?", gguf.GGUFValueType.UINT64: "<Q",
    gguf.GGUFValueType.INT64: "<q", gguf.GGUFValueType.FLOAT64: "<d",
}


GGML_MAX_DIMS = 4
INT64_MAX = 2 ** 63 - 1
MAX_COUNT = 1 << 32  # more keys, tensors or array items than any GGUF holds (a vocabulary has ~10^5 tokens)
_VERSIONS = tuple(gguf.READER_SUPPORTED_VERSIONS)  # 2 and 3: GGUF v1 is gone from llama.cpp too


class _Truncated(Exception):
    """The header goes on past the end of the file: `need` bytes at least."""

    def __init__(self, need: int):
        super().__init__(need)
        self.need = need


class _Corrupt(Exception):
    """A header field no writer produces; the message names it."""


class _Header:
    """A GGUF header parsed straight into Python values (struct on a memoryview, every read bounds-checked):
    metadata, tensor infos, alignment and the start of the data section.

    gguf-py's GGUFReader builds numpy views per array item (about 6 s for the 151,936-token vocabulary) and
    fails with numpy's own message on a truncated or corrupt file; here a read past the end is _Truncated
    (how far the header needs the file to go) and an impossible field is _Corrupt, naming the field.
    Little-endian files only, as llama.cpp writes them.
    """

    def __init__(self, mv: memoryview):
        self.mv, self.size = mv, len(mv)
        (version,) = self.unpack("<I", 4)
        if version & 0xFFFF == 0 and version:
            raise _Corrupt("big-endian")
        if version not in _VERSIONS:
            raise _Corrupt(f"version {version}")
        self.version = version
        n_tensors, n_kv = self.unpack("<QQ", 8)
        o = 24
        # the smallest key/value (empty key, a uint8) takes 13 bytes, the smallest tensor info 24: counts that
        # could not fit in any file are corruption, smaller ones that do not fit this file truncation
        need = o + n_kv * 13 + n_tensors * 24
        if need > self.size:
            if max(n_kv, n_tensors) > MAX_COUNT:
                raise _Corrupt(f"a header that claims {n_kv:,} metadata keys and {n_tensors:,} tensors, more than "
                               f"its {self.size:,} bytes can hold")
            raise _Truncated(need)
        self.values: dict[str, Any] = {}
        for _ in range(n_kv):
            key, o = self.string(o)
            (vtype,) = self.unpack("<I", o)
            if key in self.values:
                raise _Corrupt(f"metadata key {key} twice")
            self.values[key], o = self.value(o + 4, vtype, key)
            if key == "general.alignment":
                self.alignment_type = vtype
        self.alignment = gguf.GGUF_DEFAULT_ALIGNMENT
        if "general.alignment" in self.values:
            a = self.values["general.alignment"]
            if self.alignment_type != gguf.GGUFValueType.UINT32 or a <= 0 or a & (a - 1):
                raise _Corrupt(f"general.alignment = {a!r} (a uint32 power of two is needed)")
            self.alignment = a
        self.tensor_infos: list[tuple[str, list[int], int, int]] = []
        for _ in range(n_tensors):
            name, o = self.string(o)
            (n_dims,) = self.unpack("<I", o)
            if n_dims > GGML_MAX_DIMS:
                raise _Corrupt(f"tensor {name} with {n_dims} dimensions (GGUF allows at most {GGML_MAX_DIMS})")
            dims = list(self.unpack(f"<{n_dims}Q", o + 4))
            raw_type, offset = self.unpack("<IQ", o + 4 + 8 * n_dims)
            o += 16 + 8 * n_dims
            self.tensor_infos.append((name, dims or [1], raw_type, offset))
        self.data_offset = -(-o // self.alignment) * self.alignment if n_tensors else o

    def unpack(self, fmt: str, o: int) -> tuple:
        end = o + struct.calcsize(fmt)
        if end > self.size:
            raise _Truncated(end)
        return struct.unpack_from(fmt, self.mv, o)

    def string(self, o: int) -> tuple[str, int]:
        (n,) = self.unpack("<Q", o)
        if o + 8 + n > self.size:
            raise _Truncated(o + 8 + n)
        return bytes(self.mv[o + 8:o + 8 + n]).decode("utf-8", errors="replace"), o + 8 + n

    def value(self, o: int, vtype: int, key: str):
        if vtype == gguf.GGUFValueType.STRING:
            return self.string(o)
        if vtype == gguf.GGUFValueType.ARRAY:
            itype, n = self.unpack("<IQ", o)
            o += 12
            if itype in _SCALARS:
                fmt = _SCALARS[gguf.GGUFValueType(itype)]
                end = o + n * struct.calcsize(fmt)
                if end > self.size:
                    if n > MAX_COUNT:
                        raise _Corrupt(f"metadata key {key} with {n:,} items, more than the file can hold")
                    raise _Truncated(end)
                return np.frombuffer(self.mv[o:end], dtype=np.dtype(fmt)).tolist(), end
            if itype not in (gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY):
                raise _Corrupt(f"metadata key {key} with unknown array item type {itype}")
            if o + n * 8 > self.size:  # every string or array item takes 8 bytes at least
                if n > MAX_COUNT:
                    raise _Corrupt(f"metadata key {key} with {n:,} items, more than the file can hold")
                raise _Truncated(o + n * 8)
            items = []
            for _ in range(n):
                item, o = self.value(o, itype, key)
                items.append(item)
            return items, o
        if vtype not in _SCALARS:
            raise _Corrupt(f"metadata key {key} with unknown value type {vtype}")
        fmt = _SCALARS[gguf.GGUFValueType(vtype)]
        return self.unpack(fmt, o)[0], o + struct.calcsize(fmt)


def split_paths(path: Path) -> list[Path]:
    """All shards of a split model given any one of them (or the path itself when not split)."""
    m = SPLIT_RE.match(path.name)
    if not m:
        return [path]
    n = int(m.group("n"))
    paths = [path.with_name(f"{m.group('stem')}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise GGUFError(f"split model is missing {len(missing)} of {n} parts ({', '.join(missing[:3])}); "
                        f"download every part into {path.parent}")
    return paths


def _open_one(path: Path) -> tuple[dict[str, Any], list[QTensor], np.memmap]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise GGUFError(f"cannot read {path}: {e.strerror}; check the path and permissions") from None
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF'); "
                        "pass a .gguf model file (convert safetensors with `localcoder convert`)")
    fix = "re-download or re-convert it"
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise GGUFError(f"cannot map {path}: {e}; check the path and permissions") from None
    try:
        header = _Header(memoryview(data))
    except _Truncated as e:
        raise GGUFError(f"{path} is truncated at byte {size:,} of at least {e.need:,} (its GGUF header goes on past "
                        f"the end of the file); {fix}") from None
    except _Corrupt as e:
        what = str(e)
        if what == "big-endian":
            raise GGUFError(f"{path} is a big-endian GGUF; localcoder reads little-endian GGUFs (as llama.cpp writes "
                            "them): convert it with gguf-py's `gguf-convert-endian FILE little`") from None
        if what.startswith("version "):
            raise GGUFError(f"{path} is GGUF {what}; localcoder reads GGUF versions "
                            f"{', '.join(map(str, _VERSIONS))}: re-convert it with a current converter") from None
        raise GGUFError(f"{path} is corrupt: it has {what}; {fix}") from None
    metadata = dict(header.values)
    align = header.alignment
    tensors, infos, expected = [], [], 0
    for name, dims, raw_type, offset in header.tensor_infos:
        try:
            ggml_type = gguf.GGMLQuantizationType(raw_type)
        except ValueError:
            raise GGUFError(f"tensor {name} in {path.name} has unknown ggml type {raw_type}; "
                            "the file is corrupt or needs a newer localcoder") from None
        fmt = get_format(ggml_type)  # raises UnsupportedQuantType with the list of supported types
        shape = tuple(reversed(dims))
        if any(d <= 0 for d in shape) or shape[-1] % fmt.block_size:
            raise GGUFError(f"tensor {name} in {path.name} has shape {list(dims)} that does not fit "
                            f"{fmt.name} blocks of {fmt.block_size}; the file is corrupt")
        if math.prod(shape) > INT64_MAX:  # Python ints: no wrap-around (ggml refuses these as well)
            raise GGUFError(f"tensor {name} in {path.name} has shape {list(dims)}, too large for any file "
                            f"(its element count overflows 64 bits); the file is corrupt: {fix}")
        row_bytes = shape[-1] // fmt.block_size * fmt.type_size
        nbytes = math.prod(shape[:-1]) * row_bytes
        # as ggml's gguf.cpp: tensor data follows in the order of the infos, each padded to the alignment
        if offset != expected:
            raise GGUFError(f"tensor {name} in {path.name} has data offset {offset:,}, expected {expected:,} "
                            f"(tensor data follows in order, each aligned to {align} bytes); the file is corrupt: "
                            f"{fix}")
        expected += -(-nbytes // align) * align
        infos.append((name, ggml_type, shape, header.data_offset + offset, nbytes, row_bytes))
    end = max((o + n for _, _, _, o, n, _ in infos), default=header.data_offset)
    if end > size:
        raise GGUFError(f"{path} is truncated at byte {size:,} of {end:,} (its tensor data is incomplete); {fix}")
    for name, ggml_type, shape, offset, nbytes, row_bytes in infos:
        view = data[offset:offset + nbytes].reshape(*shape[:-1], row_bytes)
        tensors.append(QTensor(name, ggml_type, shape, view, offset, str(path)))
    return metadata, tensors, data


class GGUFFile:
    """The metadata and tensors of a GGUF model (one file or all parts of a split one)."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path).expanduser()
        if not path.exists():
            raise GGUFError(f"model file not found: {path}; check the path or download the GGUF "
                            "(see `localcoder chat --help`)")
        if path.is_dir():
            raise GGUFError(f"{path} is a directory; pass the .gguf file inside it "
                            "(or convert a safetensors folder with `localcoder convert`)")
        self.paths = split_paths(path)
        self.path = self.paths[0]
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, QTensor] = {}
        self.maps: list[np.memmap] = []
        for p in self.paths:
            meta, tensors, mapping = _open_one(p)
            self.maps.append(mapping)
            if not self.metadata:
                self.metadata = meta
            for t in tensors:
                if t.name in self.tensors:
                    raise GGUFError(f"tensor {t.name} appears twice in {p.name}; the file is corrupt")
                self.tensors[t.name] = t
        self.file_size = sum(p.stat().st_size for p in self.paths)

    def release_pages(self) -> None:
        """Drop this process's mapped pages of the file (they stay in the page cache for others): after the
        dense weights were copied out, nothing reads the map, and its pages need not count against RSS."""
        for m in self.maps:
            mm = getattr(m, "_mmap", None)
            if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
                mm.madvise(mmap.MADV_DONTNEED)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def quant_mix(self) -> dict[str, tuple[int, int]]:
        """{type name: (tensor count, bytes)}, largest first."""
        mix: dict[str, list[int]] = {}
        for t in self.tensors.values():
            entry = mix.setdefault(t.type_name, [0, 0])
            entry[0] += 1
            entry[1] += t.nbytes
        return {k: (v[0], v[1]) for k, v in sorted(mix.items(), key=lambda kv: -kv[1][1])}
