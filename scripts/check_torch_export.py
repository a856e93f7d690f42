#!/usr/bin/env python3
"""Checks a PyTorch checkpoint file with real torch, the way a user would load it.

Loads FILE with `torch.load(FILE, weights_only=True)` (torch's restricted unpickler: only
tensors, storages, OrderedDict and plain containers/scalars) and again with `mmap=True`, asserts
that both give the same contents, checks the zip layout torch's mmap path relies on (every entry
stored, every storage's data 64-byte aligned in the file) and prints a JSON summary of the
contents on stdout (the encoding of `summarize` below, shared with make_torch_fixtures.py and
compared by the Rust tests).

With mmap it also loads with `calculate_storage_offsets` (PyTorch computes each record's
offset from the layout its own writer produces instead of reading local headers) under
TORCH_SERIALIZATION_DEBUG=1, which asserts that every computed offset is the real one.

Usage: python3 scripts/check_torch_export.py FILE [--legacy] [--no-offset-arithmetic]
  --legacy: FILE is the pre-1.6 non-zip format (no zip checks, no mmap).
  --no-offset-arithmetic: skip the calculate_storage_offsets load (for archives that use
      ZIP64 fields below 4 GiB, which PyTorch's arithmetic does not expect).
Exit status 0 when the file loads and every check passes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import zipfile

import torch

try:  # PyTorch >= 2.5
    from torch.utils.serialization import config as serialization_config
except ImportError:
    serialization_config = None

DTYPE_NAMES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

# Tensors with at most this many elements carry all their values in the summary; larger ones
# carry the first HEAD values, the element count, the sum and the sum of absolute values.
FULL_VALUES = 64
HEAD = 16


def _float(x: float):
    """JSON has no inf/nan: those become strings."""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


class Summarizer:
    """Turns a loaded checkpoint into plain JSON data; storages are numbered by first use, so
    tensors that share one have the same number."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def __call__(self, obj):
        if obj is None:
            return None
        if isinstance(obj, torch.Tensor):
            return {"tensor": self.tensor(obj)}
        if isinstance(obj, bool):
            return {"bool": obj}
        if isinstance(obj, int):
            return {"int": obj}
        if isinstance(obj, float):
            return {"float": _float(obj)}
        if isinstance(obj, str):
            return {"str": obj}
        if isinstance(obj, (bytes, bytearray)):
            return {"bytes": bytes(obj).hex()}
        if isinstance(obj, tuple):
            return {"tuple": [self(v) for v in obj]}
        if isinstance(obj, list):
            return {"list": [self(v) for v in obj]}
        if isinstance(obj, dict):
            for k in obj:
                if not isinstance(k, (str, int)) or isinstance(k, bool):
                    raise TypeError(f"dict key {k!r} is not a str or an int")
            return {"dict": [[k, self(v)] for k, v in obj.items()]}
        raise TypeError(f"unexpected {type(obj).__name__} in a checkpoint: {obj!r}")

    def tensor(self, t: torch.Tensor) -> dict:
        storage = t.untyped_storage()
        # Empty storages have no address to tell them apart: they get no number.
        sid = None
        if storage.nbytes() > 0:
            sid = self.storages.setdefault(storage.data_ptr(), len(self.storages))
        values = [_float(float(v)) for v in t.detach().reshape(-1).double().tolist()]
        out = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "stride": list(t.stride()),
            "offset": t.storage_offset(),
            "storage": sid,
            "storage_bytes": storage.nbytes(),
            "requires_grad": t.requires_grad,
            "numel": t.numel(),
        }
        if len(values) <= FULL_VALUES:
            out["values"] = values
        else:
            flat = t.detach().reshape(-1).double().tolist()
            out["head"] = values[:HEAD]
            out["sum"] = _float(math.fsum(flat))
            out["abs_sum"] = _float(math.fsum(abs(v) for v in flat))
        return out


def summarize(obj):
    """The JSON summary of a loaded checkpoint."""
    return Summarizer()(obj)


def check_zip_layout(path: str) -> None:
    """Every entry stored; every storage record's data starts at a multiple of 64."""
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        names = z.namelist()
        prefix = names[0].split("/")[0] + "/"
        for required in ("data.pkl", "version", "byteorder"):
            assert prefix + required in names, f"missing {prefix}{required}"
        assert z.read(prefix + "byteorder") == b"little"
        for info in z.infolist():
            assert info.compress_type == zipfile.ZIP_STORED, f"{info.filename} is compressed"
            f.seek(info.header_offset + 26)
            name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
            start = info.header_offset + 30 + name_len + extra_len
            if info.filename.startswith(prefix + "data/"):
                assert start % 64 == 0, f"{info.filename}: data at {start} is not 64-aligned"
        bad = z.testzip()
        assert bad is None, f"CRC mismatch in {bad}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file")
    parser.add_argument("--legacy", action="store_true")
    parser.add_argument("--no-offset-arithmetic", action="store_true")
    args = parser.parse_args()
    if not args.no_offset_arithmetic:
        # Every zip load (not only calculate_storage_offsets) then asserts that PyTorch's
        # computed record offsets are the real ones.
        os.environ["TORCH_SERIALIZATION_DEBUG"] = "1"

    obj = torch.load(args.file, weights_only=True)
    summary = summarize(obj)
    if not args.legacy:
        check_zip_layout(args.file)
        mapped = torch.load(args.file, weights_only=True, mmap=True)
        assert summarize(mapped) == summary, "mmap=True loads different contents"
        config = serialization_config
        if not args.no_offset_arithmetic and config is not None:
            config.load.calculate_storage_offsets = True
            try:
                computed = torch.load(args.file, weights_only=True, mmap=True)
            finally:
                config.load.calculate_storage_offsets = False
            assert summarize(computed) == summary, "calculate_storage_offsets loads differently"
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
