#!/usr/bin/env python3
"""Generates the block-codec reference fixtures of kiln-gguf.

Writes crates/gguf/tests/fixtures/quant_reference.bin (records read by
crates/gguf/tests/quant_reference.rs) and quant_reference.json (what each record is and
where its reference came from).

References:
  * gguf-py (`pip install gguf numpy`): numpy `dequantize` for every decoded type but Q8_K,
    numpy `quantize` for F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1.
  * llama.cpp's own C code (optional, `pip install llama-cpp-python`, which builds llama.cpp):
    called through ctypes in the package's libggml-base: `dequantize_row_*` for every type,
    `quantize_row_*_ref` (round to nearest) and `ggml_quantize_chunk` with an importance matrix
    (the weighted path) for the K-quants and legacy types. The committed fixture needs it; with
    --gguf-py-only the script writes only the gguf-py records (a partial fixture that the Rust
    tests reject).

Where both exist the script asserts that they agree, so every record is checked against two
implementations where two exist. Seeded: rerunning it rewrites identical files.

Usage: python3 scripts/make_quant_fixtures.py [--gguf-py-only] [--ggml-lib PATH]
  --ggml-lib: a libggml-base shared library to use instead of llama-cpp-python's.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import struct
import sys
from pathlib import Path

import numpy as np

import gguf
from gguf.quants import dequantize, quantize
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

OUT_DIR = Path(__file__).resolve().parent.parent / "crates" / "gguf" / "tests" / "fixtures"
MAGIC = b"KQF1"

DECODED = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
           "Q8_K", "IQ4_NL", "IQ4_XS"]
# Byte offsets of each block's f16 scale fields (kept finite so outputs compare bit for bit).
F16_FIELDS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
    "IQ4_NL": [0], "IQ4_XS": [0],
}
ENCODED_RTN = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K",
               "Q5_K", "Q6_K", "Q8_K"]
GGUF_PY_QUANTIZES = {"F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"}
WEIGHTED = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
ROW_LEN = 512


def random_f16_scales(rng: np.random.Generator, n: int) -> np.ndarray:
    """Finite f16 scales: mostly typical magnitudes, some extreme (subnormal, max, zero)."""
    typical = (rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 0, n)).astype(np.float16)
    bits = rng.integers(0, 0x7C00, n, dtype=np.uint16) | (rng.integers(0, 2, n, dtype=np.uint16) << 15)
    extreme = bits.view(np.float16)
    pick = rng.uniform(size=n) < 0.3
    out = np.where(pick, extreme, typical)
    out[0] = np.float16(0.0)
    if n > 1:
        out[1] = np.float16(65504.0)
    if n > 2:
        out[2] = np.float16(-6e-8)  # smallest subnormal
    return out


def dequant_blocks(rng: np.random.Generator, name: str) -> np.ndarray:
    block, size = GGML_QUANT_SIZES[T[name]]
    n_blocks = 6 if block == 256 else 24
    data = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    if name == "Q8_K":
        d = (rng.standard_normal(n_blocks) * 10.0 ** rng.uniform(-6, 2, n_blocks)).astype(np.float32)
        d[0] = 0.0
        data[:, 0:4] = d.view(np.uint8).reshape(n_blocks, 4)
    else:
        for off in F16_FIELDS[name]:
            data[:, off:off + 2] = random_f16_scales(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    if name in ("Q4_0", "Q8_0", "Q4_K", "Q6_K"):
        data[3, :] = 0  # an all-zero block
    return data.reshape(-1)


def quant_rows(rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    n = ROW_LEN
    i = np.arange(n, dtype=np.float32)
    rows: list[tuple[str, np.ndarray]] = [
        ("synthetic 0.1 + 2 cos(i) (test-quantize-fns)", np.float32(0.1) + np.float32(2.0) * np.cos(i)),
        ("standard normal", rng.standard_normal(n)),
        ("normal * 0.02 (typical weights)", rng.standard_normal(n) * 0.02),
        ("all zeros", np.zeros(n)),
        ("constant 0.5 then constant -3", np.concatenate([np.full(n // 2, 0.5), np.full(n // 2, -3.0)])),
        ("tiny: normal * 1e-20 then normal * 1e-30", np.concatenate([rng.standard_normal(n // 2) * 1e-20,
                                                                    rng.standard_normal(n // 2) * 1e-30])),
        ("small: normal * 1e-6", rng.standard_normal(n) * 1e-6),
        ("huge: normal * 1e4 then normal * 1e5", np.concatenate([rng.standard_normal(n // 2) * 1e4,
                                                                rng.standard_normal(n // 2) * 1e5])),
        ("negative only", -np.abs(rng.standard_normal(n))),
        ("positive only, offset 1", np.abs(rng.standard_normal(n)) + 1.0),
        ("normal * 0.1 with +-20 outliers", np.where(rng.uniform(size=n) < 0.02,
                                                   rng.choice([-20.0, 20.0], n),
                                                   rng.standard_normal(n) * 0.1)),
        ("sparse: 95% zeros", np.where(rng.uniform(size=n) < 0.05, rng.standard_normal(n), 0.0)),
        ("uniform [-1, 1]", rng.uniform(-1, 1, n)),
        ("mixed magnitudes per 16 elements", rng.standard_normal(n) * np.repeat(10.0 ** rng.uniform(-3, 1, n // 16), 16)),
        ("half-step ties: (k + 0.5) / 4", (rng.integers(-16, 16, n) + 0.5) / 4.0),
    ]
    names = [r[0] for r in rows]
    return np.stack([r[1].astype(np.float32) for r in rows]).reshape(-1), names


def importance(rng: np.random.Generator) -> np.ndarray:
    w = np.exp(rng.standard_normal(ROW_LEN) * 1.5).astype(np.float32)
    w[100:132] = 0.0  # an unused input feature range
    w[7] = 1e4
    return w


class Ggml:
    """llama.cpp's quantization functions, from llama-cpp-python's libggml-base."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]

    @staticmethod
    def load(path: str | None) -> "Ggml | None":
        if path:
            return Ggml(ctypes.CDLL(path))
        # Locate the package without importing it (only its libggml-base is needed).
        import importlib.util

        spec = importlib.util.find_spec("llama_cpp")
        if spec is None or spec.origin is None:
            return None
        libdir = Path(spec.origin).resolve().parent / "lib"
        for cand in sorted(libdir.glob("libggml-base.so*")):
            return Ggml(ctypes.CDLL(str(cand)))
        return None

    def dequantize(self, name: str, data: np.ndarray, n: int) -> np.ndarray:
        out = np.zeros(n, dtype=np.float32)
        f = getattr(self.lib, f"dequantize_row_{name.lower().replace('_k', '_K')}")
        f.restype = None
        f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        data = np.ascontiguousarray(data)
        f(data.ctypes.data, out.ctypes.data, n)
        return out

    def quantize_ref(self, name: str, x: np.ndarray) -> np.ndarray:
        block, size = GGML_QUANT_SIZES[T[name]]
        out = np.zeros(x.size // block * size, dtype=np.uint8)
        f = getattr(self.lib, f"quantize_row_{name.lower().replace('_k', '_K')}_ref")
        f.restype = None
        f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        x = np.ascontiguousarray(x, dtype=np.float32)
        f(x.ctypes.data, out.ctypes.data, x.size)
        return out

    def quantize_chunk(self, name: str, x: np.ndarray, row_len: int, imatrix: np.ndarray | None) -> np.ndarray:
        block, size = GGML_QUANT_SIZES[T[name]]
        out = np.zeros(x.size // block * size, dtype=np.uint8)
        x = np.ascontiguousarray(x, dtype=np.float32)
        im = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
        written = self.lib.ggml_quantize_chunk(int(T[name]), x.ctypes.data, out.ctypes.data, 0,
                                               x.size // row_len, row_len,
                                               None if im is None else im.ctypes.data)
        assert written == out.size, (name, written, out.size)
        return out


def same_floats(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.all(a.view(np.uint32) == b.view(np.uint32)))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf-py-only", action="store_true", help="write only the gguf-py records")
    ap.add_argument("--ggml-lib", help="path of a libggml-base shared library")
    args = ap.parse_args()
    ggml = Ggml.load(args.ggml_lib)
    if args.gguf_py_only:
        ggml = None
    elif ggml is None:
        print("llama.cpp not found: `pip install llama-cpp-python`, or pass --ggml-lib "
              "(or --gguf-py-only for a partial fixture)", file=sys.stderr)
        return 1

    rng = np.random.default_rng(20240611)
    records: list[tuple[str, bytes]] = []
    manifest: dict = {
        "gguf_py": getattr(gguf, "__version__", None) or _dist_version("gguf"),
        "llama_cpp_python": (_dist_version("llama-cpp-python") or "libggml-base given by --ggml-lib") if ggml else None,
        "row_len": ROW_LEN,
        "records": {},
    }

    def add(name: str, data: bytes, source: str) -> None:
        records.append((name, data))
        manifest["records"][name] = {"bytes": len(data), "source": source}

    # Decoding: random blocks with finite scales.
    for name in DECODED:
        data = dequant_blocks(rng, name)
        block, size = GGML_QUANT_SIZES[T[name]]
        n = data.size // size * block
        if name == "Q8_K":
            blocks = data.reshape(-1, size)
            d = blocks[:, :4].copy().view(np.float32)
            q = blocks[:, 4:4 + 256].view(np.int8).astype(np.float32)
            expected = (d * q).reshape(-1).astype(np.float32)
            source = "numpy d * q (gguf-py has no Q8_K)"
        else:
            expected = dequantize(data, T[name]).reshape(-1).astype(np.float32)
            source = "gguf-py dequantize"
        if ggml is not None:
            ref = ggml.dequantize(name, data, n)
            assert same_floats(ref, expected), f"llama.cpp and {source} disagree on {name}"
            source += " == llama.cpp dequantize_row"
        add(f"dequant/{name}/data", data.tobytes(), "random blocks, finite f16 scales")
        add(f"dequant/{name}/expected", expected.tobytes(), source)

    # Encoding.
    x, row_names = quant_rows(rng)
    w = importance(rng)
    manifest["quant_rows"] = row_names
    add("quant/input", x.tobytes(), "f32 rows of row_len")
    add("quant/importance", w.tobytes(), "per-column importance for the weighted records")
    for name in ENCODED_RTN:
        sources = []
        ref = None
        if name in GGUF_PY_QUANTIZES:
            ref = quantize(x.reshape(-1, ROW_LEN), T[name]).reshape(-1).view(np.uint8)
            sources.append("gguf-py quantize")
        if ggml is not None and name not in ("F16", "BF16"):
            c = ggml.quantize_ref(name, x)
            if name != "Q8_K":
                assert np.array_equal(c, ggml.quantize_chunk(name, x, ROW_LEN, None)), name
            if ref is not None and not np.array_equal(ref, c):
                diff = int(np.count_nonzero(ref != c))
                print(f"note: gguf-py and llama.cpp differ on {name} in {diff} bytes; keeping llama.cpp's")
                sources = []
            ref = c
            sources.append("llama.cpp quantize_row_ref")
        if ref is None:
            continue
        add(f"quant/{name}/rtn", ref.tobytes(), " == ".join(sources))
    if ggml is not None:
        for name in WEIGHTED:
            c = ggml.quantize_chunk(name, x, ROW_LEN, w)
            add(f"quant/{name}/weighted", c.tobytes(), "llama.cpp ggml_quantize_chunk with imatrix")

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with open(OUT_DIR / "quant_reference.bin", "wb") as f:
        f.write(MAGIC)
        for name, data in records:
            nb = name.encode()
            f.write(struct.pack("<H", len(nb)) + nb + struct.pack("<I", len(data)) + data)
    with open(OUT_DIR / "quant_reference.json", "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    total = (OUT_DIR / "quant_reference.bin").stat().st_size
    print(f"wrote {len(records)} records, {total} bytes")
    return 0


def _dist_version(dist: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
