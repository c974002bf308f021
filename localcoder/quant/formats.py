"""GGML tensor formats as data: one class per GGML type, registered by type.

Each `QuantFormat` subclass describes one GGML block layout (weights per block, bytes per block) and
dequantizes whole arrays of blocks at once with vectorised NumPy. These dequantizers are the reference
("oracle") for the compiled kernels: they are bit-identical to gguf-py's `gguf.quants.dequantize`, which
means doing the same float32 operations in the same order (e.g. Q4_K is `(d * sc) * q - (dmin * m)`,
never `d * (sc * q)`; NumPy never fuses a multiply-add, so neither do we).

Dispatch is only ever through `FORMATS` (a dict keyed by `GGMLQuantizationType`): adding a type means
adding a class below, nothing else.

Conventions
    blocks      uint8 (n_blocks, type_size); any strides (a slice of a memmap is fine)
    result      float32 (n_blocks, block_size)
    multi-byte  fields are little-endian (as GGUF stores them), decoded bytewise so the host's byte order
                never matters
    shape       numpy order: the last axis is the row (ggml's ne[0]); a row is a whole number of blocks
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import GGUFError, UnsupportedQuantType

T = GGMLQuantizationType
QK_K = 256  # weights per K-quant super-block

FORMATS: dict[GGMLQuantizationType, "QuantFormat"] = {}

# Blocks dequantized per step by `QuantFormat.dequantize` (about 1M weights), so the temporaries of a
# large tensor stay a few MB; every weight is computed independently, so chunking never changes a bit.
_CHUNK_WEIGHTS = 1 << 20


# ---------------------------------------------------------------------------------------------------------
# Byte-field helpers. All take blocks (n, type_size) uint8 and return arrays with a leading n axis.
# ---------------------------------------------------------------------------------------------------------

def _u16(blocks: np.ndarray, at: int) -> np.ndarray:
    """Little-endian uint16 at byte offset `at` of each block -> (n,) uint16."""
    return blocks[:, at].astype(np.uint16) | (blocks[:, at + 1].astype(np.uint16) << np.uint16(8))


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """IEEE half at byte offset `at` of each block, widened (exactly) to float32 -> (n, 1)."""
    return _u16(blocks, at).view(np.float16).astype(np.float32)[:, None]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, k) packed bytes -> (n, 2k) 4-bit values: all low nibbles first, then all high nibbles.

    This is the 32-weight block layout of Q4_0/Q4_1/Q5_0/Q5_1/IQ4_NL/MXFP4: weight j < 16 is the low
    nibble of byte j, weight j + 16 the high nibble of byte j.
    """
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)


def _bits_le(b: np.ndarray) -> np.ndarray:
    """(n, k) bytes -> (n, 8k) bits, bit i = bit i % 8 of byte i // 8 (a little-endian bit field)."""
    return np.unpackbits(b, axis=-1, bitorder="little")


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins, each (n, 8) uint8.

        byte  0..3   sc[0..3]  in bits 0-5, bits 4-5 of sc[4..7]  in bits 6-7
        byte  4..7   m[0..3]   in bits 0-5, bits 4-5 of m[4..7]   in bits 6-7
        byte  8..11  low 4 bits of sc[4..7] in bits 0-3, low 4 bits of m[4..7] in bits 4-7
    """
    s_lo, m_lo, mix = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([s_lo & 0x3F, (mix & 0x0F) | ((s_lo >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m_lo & 0x3F, (mix >> 4) | ((m_lo >> 2) & 0x30)], axis=-1)
    return sc, mn


# IQ4_NL / IQ4_XS codebook: a 4-bit index selects one of 16 non-uniform int8 levels (denser near 0).
IQ4_KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                       dtype=np.float32)

# MXFP4 element: FP4 E2M1 (sign, 2 exponent bits, 1 mantissa bit) = {0, .5, 1, 1.5, 2, 3, 4, 6} * sign.
# ggml/gguf-py store the table DOUBLED as small integers and halve the E8M0 scale instead, so the product
# is the same value. Index 8 (E2M1 "-0") is an integer 0 here, i.e. +0.0: keep it +0.0 to be bit-exact.
MXFP4_KVALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.float32)


def _e8m0_half(e: np.ndarray) -> np.ndarray:
    """E8M0 scale byte e -> 2**(e - 127) / 2 as float32 (ggml_e8m0_to_fp32_half).

    Built from bits: e >= 2 gives exponent field e - 1; e = 0, 1 give the subnormals 2**-128, 2**-127.
    e = 255 (NaN in the OCP MX spec) is NOT special-cased: the half-scale is 2**127 (a finite float), so
    codes +-6.0 (doubled: +-12) and +-1.0 overflow to +-inf while small codes stay finite, as in ggml.
    """
    e = e.astype(np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - np.uint32(1)) << np.uint32(23))
    return bits.astype(np.uint32).view(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Base class and registry
# ---------------------------------------------------------------------------------------------------------

class QuantFormat(ABC):
    """One GGML type. Subclasses set `ggml_type`, `block_size`, `type_size` and `dequantize_blocks`;
    defining the subclass registers an instance in FORMATS."""

    ggml_type: ClassVar[GGMLQuantizationType]
    name: ClassVar[str]
    block_size: ClassVar[int]  # weights per block (1 for F32/F16/BF16)
    type_size: ClassVar[int]   # bytes per block

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls.name = cls.ggml_type.name
        assert GGML_QUANT_SIZES[cls.ggml_type] == (cls.block_size, cls.type_size), cls.name
        assert cls.ggml_type not in FORMATS, cls.name
        FORMATS[cls.ggml_type] = cls()

    def __repr__(self) -> str:
        return f"<QuantFormat {self.name}: {self.block_size} weights in {self.type_size} bytes>"

    @abstractmethod
    def dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        """blocks: uint8 (n_blocks, type_size) -> float32 (n_blocks, block_size)"""

    def row_bytes(self, n_cols: int) -> int:
        """Bytes of one row of n_cols weights."""
        n_cols = int(n_cols)
        if n_cols < 0 or n_cols % self.block_size:
            raise GGUFError(f"a {self.name} row must be a whole number of {self.block_size}-weight blocks, "
                            f"got a row of {n_cols} weights")
        return n_cols // self.block_size * self.type_size

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of a tensor of numpy-order `shape` (last axis = row)."""
        shape = tuple(int(d) for d in shape) or (1,)
        return math.prod(shape[:-1]) * self.row_bytes(shape[-1])

    def dequantize(self, raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """raw: the tensor's contiguous bytes (uint8 of any shape, or any dtype viewed as bytes)
        -> float32 array of numpy-order `shape`."""
        shape = tuple(int(d) for d in shape)
        expected = self.nbytes(shape)
        raw = np.asarray(raw)
        if raw.nbytes != expected:
            raise GGUFError(f"{self.name} tensor of shape {list(shape)} needs {expected:,} bytes, "
                            f"got {raw.nbytes:,}")
        blocks = np.ascontiguousarray(raw).reshape(-1).view(np.uint8).reshape(-1, self.type_size)
        out = np.empty((blocks.shape[0], self.block_size), dtype=np.float32)
        step = max(1, _CHUNK_WEIGHTS // self.block_size)
        for i in range(0, blocks.shape[0], step):
            out[i:i + step] = self.dequantize_blocks(blocks[i:i + step])
        return out.reshape(shape)


def get_format(ggml_type) -> QuantFormat:
    """The registered format of a GGML type (enum member, its number, or its name)."""
    try:
        if isinstance(ggml_type, str):
            ggml_type = T[ggml_type.upper()]
        return FORMATS[T(ggml_type)]
    except (KeyError, ValueError):
        pass
    supported = ", ".join(f.name for f in FORMATS.values())
    try:
        t = T[ggml_type.upper()] if isinstance(ggml_type, str) else T(ggml_type)
        what = f"{t.name} (ggml type {int(t)})"
    except (KeyError, ValueError, TypeError, AttributeError):
        what = f"{ggml_type!r} (not a ggml type this gguf package knows)"
    raise UnsupportedQuantType(f"tensor type {what} is not supported; localcoder can run {supported} "
                               "(re-quantize the model to one of these)")


def row_bytes(ggml_type, n_cols: int) -> int:
    """Bytes of one row of n_cols weights of `ggml_type`; GGUFError if n_cols is not whole blocks."""
    return get_format(ggml_type).row_bytes(n_cols)


def dequantize(raw: np.ndarray, ggml_type, shape: tuple[int, ...]) -> np.ndarray:
    """raw: uint8 bytes of the tensor (any shape, e.g. a memmap view or (rows, row_bytes));
    shape: numpy-order logical shape (last axis = row). Returns float32 of `shape`."""
    return get_format(ggml_type).dequantize(raw, shape)


# ---------------------------------------------------------------------------------------------------------
# Float types (one weight per "block")
# ---------------------------------------------------------------------------------------------------------

class F32(QuantFormat):
    ggml_type, block_size, type_size = T.F32, 1, 4

    def dequantize_blocks(self, blocks):
        # (n, 4) -> (n, 1); '<f4' so a big-endian host still reads little-endian bytes
        return np.ascontiguousarray(blocks).view("<f4").astype(np.float32)


class F16(QuantFormat):
    ggml_type, block_size, type_size = T.F16, 1, 2

    def dequantize_blocks(self, blocks):
        return _f16(blocks, 0)  # (n, 1); half -> float32 is exact


class BF16(QuantFormat):
    ggml_type, block_size, type_size = T.BF16, 1, 2

    def dequantize_blocks(self, blocks):
        # bfloat16 is the top half of a float32: shift the 16 bits up, the low mantissa bits are zero
        return (_u16(blocks, 0).astype(np.uint32) << np.uint32(16)).view(np.float32)[:, None]


# ---------------------------------------------------------------------------------------------------------
# 32-weight block types
# ---------------------------------------------------------------------------------------------------------

class Q8_0(QuantFormat):
    """d: f16 (2) | qs: int8[32] (32).  w = q * d"""
    ggml_type, block_size, type_size = T.Q8_0, 32, 34

    def dequantize_blocks(self, blocks):
        d = _f16(blocks, 0)                                    # (n, 1)
        q = blocks[:, 2:34].view(np.int8).astype(np.float32)  # (n, 32)
        return q * d


class Q4_0(QuantFormat):
    """d: f16 (2) | qs: 32 nibbles (16).  w = d * (q - 8)"""
    ggml_type, block_size, type_size = T.Q4_0, 32, 18

    def dequantize_blocks(self, blocks):
        d = _f16(blocks, 0)
        q = _nibbles(blocks[:, 2:18]).astype(np.float32) - np.float32(8)  # (n, 32), -8..7
        return d * q


class Q4_1(QuantFormat):
    """d: f16 (2) | m: f16 (2) | qs: 32 nibbles (16).  w = d * q + m"""
    ggml_type, block_size, type_size = T.Q4_1, 32, 20

    def dequantize_blocks(self, blocks):
        d, m = _f16(blocks, 0), _f16(blocks, 2)
        q = _nibbles(blocks[:, 4:20]).astype(np.float32)  # (n, 32), 0..15
        return (d * q) + m


class Q5_0(QuantFormat):
    """d: f16 (2) | qh: uint32 LE, bit j = 5th bit of weight j (4) | qs: 32 low nibbles (16).
    w = d * (q - 16)"""
    ggml_type, block_size, type_size = T.Q5_0, 32, 22

    def dequantize_blocks(self, blocks):
        d = _f16(blocks, 0)
        q = _nibbles(blocks[:, 6:22]) | (_bits_le(blocks[:, 2:6]) << np.uint8(4))  # (n, 32), 0..31
        return d * (q.astype(np.float32) - np.float32(16))


class Q5_1(QuantFormat):
    """d: f16 (2) | m: f16 (2) | qh: uint32 LE (4) | qs: 32 low nibbles (16).  w = d * q + m"""
    ggml_type, block_size, type_size = T.Q5_1, 32, 24

    def dequantize_blocks(self, blocks):
        d, m = _f16(blocks, 0), _f16(blocks, 2)
        q = _nibbles(blocks[:, 8:24]) | (_bits_le(blocks[:, 4:8]) << np.uint8(4))
        return (d * q.astype(np.float32)) + m


class IQ4_NL(QuantFormat):
    """d: f16 (2) | qs: 32 nibbles (16), each an index into IQ4_KVALUES.  w = d * kvalues[q]"""
    ggml_type, block_size, type_size = T.IQ4_NL, 32, 18

    def dequantize_blocks(self, blocks):
        d = _f16(blocks, 0)
        return d * IQ4_KVALUES[_nibbles(blocks[:, 2:18])]


class MXFP4(QuantFormat):
    """e: E8M0 shared exponent (1) | qs: 32 FP4 E2M1 nibbles (16).
    w = e8m0_half(e) * doubled_e2m1[q]   (= 2**(e-127) * e2m1[q])"""
    ggml_type, block_size, type_size = T.MXFP4, 32, 17

    def dequantize_blocks(self, blocks):
        d = _e8m0_half(blocks[:, 0:1])  # (n, 1)
        return d * MXFP4_KVALUES[_nibbles(blocks[:, 1:17])]


# ---------------------------------------------------------------------------------------------------------
# K-quants: 256-weight super-blocks with per-sub-block scales
# ---------------------------------------------------------------------------------------------------------

class Q4_K(QuantFormat):
    """d: f16 (2) | dmin: f16 (2) | scales: 8 x (6-bit sc, 6-bit m) packed (12) | qs: 256 nibbles (128).

    Eight sub-blocks of 32. qs is 4 chunks of 32 bytes: chunk c holds sub-block 2c in its low nibbles
    and sub-block 2c+1 in its high nibbles.   w = (d * sc[j]) * q - (dmin * m[j])
    """
    ggml_type, block_size, type_size = T.Q4_K, QK_K, 144

    def dequantize_blocks(self, blocks):
        n = blocks.shape[0]
        d, dmin = _f16(blocks, 0), _f16(blocks, 2)        # (n, 1)
        sc, mn = _k_scale_min(blocks[:, 4:16])            # (n, 8)
        dl = (d * sc.astype(np.float32))[:, :, None]      # (n, 8, 1)
        ml = (dmin * mn.astype(np.float32))[:, :, None]
        qs = blocks[:, 16:144].reshape(n, 4, 1, 32)
        q = (qs >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & np.uint8(0x0F)  # (n, 4, 2, 32)
        q = q.reshape(n, 8, 32).astype(np.float32)
        return (dl * q - ml).reshape(n, QK_K)


class Q5_K(QuantFormat):
    """d: f16 (2) | dmin: f16 (2) | scales (12, as Q4_K) | qh: 32 bytes (32) | qs: 256 nibbles (128).

    Low 4 bits as Q4_K; the 5th bit of weight l of sub-block j is bit j of qh[l].
    w = (d * sc[j]) * q - (dmin * m[j])
    """
    ggml_type, block_size, type_size = T.Q5_K, QK_K, 176

    def dequantize_blocks(self, blocks):
        n = blocks.shape[0]
        d, dmin = _f16(blocks, 0), _f16(blocks, 2)
        sc, mn = _k_scale_min(blocks[:, 4:16])
        dl = (d * sc.astype(np.float32))[:, :, None]      # (n, 8, 1)
        ml = (dmin * mn.astype(np.float32))[:, :, None]
        qh = blocks[:, 16:48].reshape(n, 1, 32)
        hi = (qh >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & np.uint8(1)  # (n, 8, 32)
        qs = blocks[:, 48:176].reshape(n, 4, 1, 32)
        lo = (qs >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & np.uint8(0x0F)
        q = (lo.reshape(n, 8, 32) | (hi << np.uint8(4))).astype(np.float32)
        return (dl * q - ml).reshape(n, QK_K)


class Q6_K(QuantFormat):
    """ql: 256 low nibbles (128) | qh: 256 x 2 high bits (64) | scales: int8[16] (16) | d: f16 (2).

    Two halves of 128 weights; in half h, with l in 0..31:
        weight l      = ql[64h + l]      low nibble  | bits 0-1 of qh[32h + l]
        weight l + 32 = ql[64h + l + 32] low nibble  | bits 2-3 of qh[32h + l]
        weight l + 64 = ql[64h + l]      high nibble | bits 4-5 of qh[32h + l]
        weight l + 96 = ql[64h + l + 32] high nibble | bits 6-7 of qh[32h + l]
    Sixteen sub-blocks of 16 weights, one int8 scale each.   w = (d * scales[i // 16]) * (q - 32)
    """
    ggml_type, block_size, type_size = T.Q6_K, QK_K, 210

    def dequantize_blocks(self, blocks):
        n = blocks.shape[0]
        ql = blocks[:, 0:128].reshape(n, 2, 1, 64)
        lo = (ql >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & np.uint8(0x0F)    # (n, 2, 2, 64)
        qh = blocks[:, 128:192].reshape(n, 2, 1, 32)
        hi = (qh >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & np.uint8(3)  # (n, 2, 4, 32)
        q = (lo.reshape(n, 8, 32) | (hi.reshape(n, 8, 32) << np.uint8(4))).astype(np.float32) - np.float32(32)
        scales = blocks[:, 192:208].view(np.int8).astype(np.float32)  # (n, 16)
        dl = (_f16(blocks, 208) * scales)[:, :, None]                  # (n, 16, 1)
        return (dl * q.reshape(n, 16, 16)).reshape(n, QK_K)


class IQ4_XS(QuantFormat):
    """d: f16 (2) | scales_h: uint16 LE, 2 bits per sub-block (2) | scales_l: 8 nibbles (4) |
    qs: 8 sub-blocks x 16 bytes (128), low nibbles = weights 0-15, high = 16-31 of the sub-block.

    Sub-block j scale ls = (nibble j of scales_l) | (bits 2j..2j+1 of scales_h) << 4, a 6-bit value.
    w = (d * (ls - 32)) * kvalues[q]
    """
    ggml_type, block_size, type_size = T.IQ4_XS, QK_K, 136

    def dequantize_blocks(self, blocks):
        n = blocks.shape[0]
        d = _f16(blocks, 0)
        sh = _u16(blocks, 2)[:, None] >> (2 * np.arange(8, dtype=np.uint16))  # (n, 8)
        sl = blocks[:, 4:8].reshape(n, 4, 1) >> np.array([0, 4], np.uint8).reshape(1, 1, 2)
        ls = (sl.reshape(n, 8) & np.uint8(0x0F)) | ((sh & np.uint16(3)).astype(np.uint8) << np.uint8(4))
        dl = (d * (ls.astype(np.float32) - np.float32(32)))[:, :, None]  # (n, 8, 1)
        qs = blocks[:, 8:136].reshape(n, 8, 16)
        idx = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)  # (n, 8, 32)
        return (dl * IQ4_KVALUES[idx]).reshape(n, QK_K)


SUPPORTED_TYPES: tuple[GGMLQuantizationType, ...] = tuple(FORMATS)
