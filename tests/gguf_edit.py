"""Helpers for tests that build small GGUFs from a fixture file: rewrite one with changed tensors or metadata
(optionally split into parts, as llama.cpp's gguf-split does), or patch one tensor info in place."""

import shutil
import struct

import gguf
import numpy as np

from localcoder.gguf_file import GGUFFile


def rewrite(src_path, dst_paths, transform=lambda ts: ts, meta=lambda m: m):
    """Write src's metadata (through meta(dict)) and raw tensors (through transform({name: (type, array)}))
    to dst_paths: one file, or the parts of a split model with split.* keys, tensors divided evenly."""
    src = GGUFFile(src_path)
    tensors = transform({n: (t.ggml_type, np.asarray(t.data)) for n, t in src.tensors.items()})
    metadata = meta(dict(src.metadata))
    names = list(tensors)
    parts = np.array_split(np.arange(len(names)), len(dst_paths))
    for i, (path, idx) in enumerate(zip(dst_paths, parts)):
        w = gguf.GGUFWriter(path, arch=metadata.get("general.architecture", "qwen3next"))
        if i == 0:
            for k, v in metadata.items():
                if k.startswith("GGUF.") or k == "general.architecture":
                    continue
                if isinstance(v, list):
                    w.add_array(k, v)
                elif isinstance(v, float):
                    w.add_float32(k, v)
                elif isinstance(v, bool):
                    w.add_bool(k, v)
                elif isinstance(v, int):
                    w.add_uint32(k, v) if 0 <= v < 2 ** 32 else w.add_int64(k, v)
                else:
                    w.add_string(k, v)
        if len(dst_paths) > 1:
            w.add_uint16("split.no", i)
            w.add_uint16("split.count", len(dst_paths))
            w.add_int32("split.tensors.count", len(names))
        for j in idx:
            qtype, raw = tensors[names[j]]
            w.add_tensor(names[j], raw, raw_shape=raw.shape, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return dst_paths


def tensor_info_at(path, name):
    """Byte offset of the n_dims field of tensor `name`'s info, and its n_dims."""
    for t in gguf.GGUFReader(path).tensors:
        if t.name == name:
            data = open(path, "rb").read(t.field.offset + 8)
            p = t.field.offset + 8 + struct.unpack_from("<Q", data, t.field.offset)[0]
            return p, struct.unpack_from("<I", open(path, "rb").read(p + 4), p)[0]
    raise KeyError(name)


def patched(src, dst, name, *, dims=None, offset_delta=None, offset=None, n_dims=None):
    """A copy of src with one tensor info changed: its dims, its data offset (relative or absolute) or n_dims."""
    shutil.copy(src, dst)
    p, nd = tensor_info_at(dst, name)
    b = bytearray(open(dst, "rb").read())
    if dims is not None:
        assert len(dims) == nd
        for i, d in enumerate(dims):
            struct.pack_into("<Q", b, p + 4 + 8 * i, d)
    q = p + 4 + 8 * nd + 4
    if offset_delta is not None:
        struct.pack_into("<Q", b, q, struct.unpack_from("<Q", b, q)[0] + offset_delta)
    if offset is not None:
        struct.pack_into("<Q", b, q, offset)
    if n_dims is not None:
        struct.pack_into("<I", b, p, n_dims)
    open(dst, "wb").write(b)
    return dst
