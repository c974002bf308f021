"""localcoder.quant.formats against gguf-py's dequantizers, bit for bit.

gguf.quants is only the oracle here: formats.py has its own implementation of every layout.
"""

import pathlib
import re

import gguf
import gguf.quants
import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

from localcoder.errors import GGUFError, UnsupportedQuantType
from localcoder.quant import formats
from localcoder.quant.formats import FORMATS, dequantize, get_format, row_bytes

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K",
         "IQ4_NL", "IQ4_XS", "MXFP4"]

# byte offsets of the f16 scale fields (d, and m / dmin where present) in each block
F16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q4_K": [0, 2],
              "Q5_K": [0, 2], "Q6_K": [208], "IQ4_NL": [0], "IQ4_XS": [0]}

# extreme-but-finite halves: max, smallest subnormal, smallest normal, zeros, ones, both signs
EXTREME_F16 = np.array([65504.0, -65504.0, 6e-8, -6e-8, 6.104e-5, -6.104e-5, 0.0, -0.0, 1.0, -1.0,
                        0.5, 1e-3, 1000.0], dtype=np.float16)

N_BLOCKS = 1536


def assert_bit_identical(ours: np.ndarray, ref: np.ndarray):
    assert ours.dtype == np.float32 and ref.dtype == np.float32
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)  # NaNs in the same places compare equal here
    # and bit for bit: +0 vs -0 and NaN payloads must agree too
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))


def random_blocks(name: str, rng: np.random.Generator, n: int = N_BLOCKS) -> np.ndarray:
    """Random bytes for the quant part; scale fields set to extreme and random finite values."""
    fmt = get_format(name)
    blocks = rng.integers(0, 256, size=(n, fmt.type_size), dtype=np.uint8)
    for at in F16_FIELDS.get(name, []):
        rand = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
        rand = np.where((rand & 0x7C00) == 0x7C00, rand & ~np.uint16(0x4000), rand)  # no inf/NaN
        vals = np.where(rng.random(n) < 0.5, EXTREME_F16[rng.integers(0, len(EXTREME_F16), n)],
                        rand.view(np.float16))
        blocks[:, at:at + 2] = vals.astype("<f2").view(np.uint8).reshape(n, 2)
    if name == "MXFP4":
        blocks[:, 0] = np.arange(n) % 256  # every E8M0 exponent, 0 and 255 included
    return blocks


@pytest.mark.parametrize("name", TYPES)
@np.errstate(over="ignore")  # MXFP4 with E8M0 = 255 overflows to inf (in gguf-py too)
def test_random_blocks_bit_identical(name, monkeypatch):
    rng = np.random.default_rng(sum(map(ord, name)))
    fmt = get_format(name)
    blocks = random_blocks(name, rng)
    ref = gguf.quants.dequantize(blocks, T[name]).reshape(N_BLOCKS, fmt.block_size)

    assert_bit_identical(fmt.dequantize_blocks(blocks), ref)
    # a strided slice of blocks (as a memmap row range would be) gives the same values
    assert_bit_identical(fmt.dequantize_blocks(blocks[1::3]), ref[1::3])
    # whole-tensor entry point, as (rows, row_bytes) and as flat bytes, in many chunks
    monkeypatch.setattr(formats, "_CHUNK_WEIGHTS", 4096)
    rows = N_BLOCKS * fmt.block_size // 768 if fmt.block_size > 1 else 8
    shape = (rows, N_BLOCKS * fmt.block_size // rows)
    assert fmt.nbytes(shape) == blocks.nbytes
    raw2d = blocks.reshape(rows, -1)
    assert raw2d.shape[1] == row_bytes(T[name], shape[1])
    assert_bit_identical(dequantize(raw2d, T[name], shape), ref.reshape(shape))
    assert_bit_identical(dequantize(blocks.reshape(-1), int(T[name]), shape), ref.reshape(shape))


@pytest.mark.parametrize("name", ["F32", "F16", "BF16", "Q4_0", "Q4_K", "Q6_K", "IQ4_XS"])
def test_fully_random_bytes(name):
    """Scales too are random bytes here, so inf/NaN inputs (and NaN outputs) occur."""
    rng = np.random.default_rng(7)
    fmt = get_format(name)
    blocks = rng.integers(0, 256, size=(512, fmt.type_size), dtype=np.uint8)
    with np.errstate(all="ignore"):  # inf * 0 = NaN
        ref = gguf.quants.dequantize(blocks, T[name]).reshape(512, fmt.block_size)
        ours = fmt.dequantize_blocks(blocks)
    np.testing.assert_array_equal(ours, ref)  # equal_nan is the default


def test_mxfp4_scale_convention():
    """E8M0 e and FP4 code c decode to 2**(e - 127) * e2m1[c]; e = 255 is not NaN (as in ggml): it scales
    by 2**128, so +-1.0 and up overflow to inf while +-0.5 stays finite."""
    fmt = get_format(T.MXFP4)
    blocks = np.zeros((4, 17), dtype=np.uint8)
    blocks[:, 0] = [127, 128, 0, 255]
    blocks[:, 1] = 0x92  # weight 0: code 2 (+1.0), weight 16: code 9 (-0.5)
    blocks[:, 2] = 0x07  # weight 1: code 7 (+6.0)
    with np.errstate(over="ignore"):
        w = fmt.dequantize_blocks(blocks)
    np.testing.assert_array_equal(w[:, 0], [1.0, 2.0, 2.0 ** -127, np.inf])
    np.testing.assert_array_equal(w[:, 16], [-0.5, -1.0, -(2.0 ** -128), -(2.0 ** 127)])
    np.testing.assert_array_equal(w[:, 1], [6.0, 12.0, 6 * 2.0 ** -127, np.inf])
    assert not np.signbit(w[:, 3:16]).any()  # code 0 is +0.0


FIXTURE_FILES = ["BF16", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]


@pytest.mark.parametrize("quant", FIXTURE_FILES)
def test_fixture_tensors_bit_identical(fixtures_dir, quant):
    path = fixtures_dir / "qwen3next-tiny" / "gguf" / f"qwen3next-tiny-{quant}.gguf"
    if not path.exists():
        pytest.skip(f"{path} not found")
    reader = gguf.GGUFReader(path)
    assert reader.tensors
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml ne -> numpy order
        ref = gguf.quants.dequantize(t.data, t.tensor_type)
        ours = dequantize(t.data, t.tensor_type, shape)
        assert ours.shape == shape, t.name
        assert_bit_identical(ours, ref.reshape(shape).astype(np.float32, copy=False))


def test_registry_matches_ggml_sizes():
    assert {t.name for t in FORMATS} == set(TYPES)
    for t, fmt in FORMATS.items():
        assert isinstance(t, T) and fmt.ggml_type is t and fmt.name == t.name
        assert (fmt.block_size, fmt.type_size) == GGML_QUANT_SIZES[t]
        assert get_format(t) is fmt and get_format(int(t)) is fmt and get_format(t.name) is fmt


def test_formats_does_not_use_gguf_quants():
    src = pathlib.Path(formats.__file__).read_text()
    imports = [ln for ln in src.splitlines() if re.match(r"\s*(import|from)\s", ln)]
    assert imports and not any("quants" in ln for ln in imports), imports


def test_unsupported_type_message():
    with pytest.raises(UnsupportedQuantType) as e:
        get_format(T.IQ2_XXS)
    msg = str(e.value)
    assert "\n" not in msg and "IQ2_XXS" in msg and "16" in msg
    assert "Q4_K" in msg and "MXFP4" in msg  # says what is supported
    assert isinstance(e.value, GGUFError)

    with pytest.raises(UnsupportedQuantType) as e:
        get_format(999)
    msg = str(e.value)
    assert "\n" not in msg and "999" in msg and "Q8_0" in msg

    with pytest.raises(UnsupportedQuantType):
        row_bytes(T.Q2_K, 256)
    with pytest.raises(UnsupportedQuantType):
        dequantize(np.zeros(84, np.uint8), T.Q2_K, (256,))


def test_row_bytes():
    assert row_bytes(T.Q4_K, 512) == 288
    assert row_bytes(T.Q8_0, 64) == 68
    assert row_bytes(T.BF16, 3) == 6
    assert row_bytes(T.F32, 5) == 20
    assert get_format(T.Q6_K).nbytes((3, 2, 256)) == 6 * 210
    with pytest.raises(GGUFError, match="256"):
        row_bytes(T.Q4_K, 100)
    with pytest.raises(GGUFError, match="32"):
        row_bytes(T.Q4_0, 48)


def test_dequantize_rejects_wrong_byte_count():
    with pytest.raises(GGUFError, match="bytes"):
        dequantize(np.zeros(100, np.uint8), T.Q8_0, (2, 32))
    with pytest.raises(GGUFError):
        dequantize(np.zeros(68, np.uint8), T.Q8_0, (2, 33))
