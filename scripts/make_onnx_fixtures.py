#!/usr/bin/env python3
"""Generates the protobuf fixtures of kiln-gguf's `onnx` module with the real `onnx` package.

Writes under crates/gguf/tests/fixtures/onnx/ (read by crates/gguf/src/onnx/tests.rs, which
builds the same messages with Kiln's encoder and compares the bytes):

  tensor_f32.pb    TensorProto "w", FLOAT [2, 3], raw_data (incl. -0.0, 1e-30, -3.4e38)
  tensor_i64.pb    TensorProto "const.shape", INT64 [4] = [0, 0, -1, 64], raw_data
  scalar_i64.pb    TensorProto "const.one", INT64 0-dim = 1, raw_data
  node.pb          NodeProto Gemm a,b -> y named "/head/Gemm_3" with attributes of every kind
                   Kiln writes (sorted by name, as onnx.helper.make_node orders them):
                   alpha=0.5 (FLOAT), mode="constant" (STRING), perm=[0, 2, 1, -1] (INTS),
                   scales=[1.0, -2.5] (FLOATS), transB=1 (INT), value=TensorProto (TENSOR)
  value_info.pb    ValueInfoProto "past_key_values.0.key", FLOAT ["batch", 3, "past_sequence", 64]
  model.onnx       ModelProto: ir_version 8, producer "kiln" 0.1.0, opset ("", 17), graph "tiny"
                   y = Add(x, b) with initializer b = [0.5, -1.0, 2.0], x FLOAT ["batch", 3],
                   metadata_props architecture=gpt2, kv_cache=false

Usage: python3 scripts/make_onnx_fixtures.py   (needs `pip install onnx numpy`)
"""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

OUT = Path(__file__).resolve().parent.parent / "crates" / "gguf" / "tests" / "fixtures" / "onnx"


def raw_tensor(name, dtype, dims, values, np_dtype):
    return helper.make_tensor(name, dtype, dims, np.asarray(values, dtype=np_dtype).tobytes(), raw=True)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    w = raw_tensor("w", TensorProto.FLOAT, [2, 3], [1.0, -0.0, 1e-30, -3.4e38, 0.25, 7.0], "<f4")
    shape = raw_tensor("const.shape", TensorProto.INT64, [4], [0, 0, -1, 64], "<i8")
    one = raw_tensor("const.one", TensorProto.INT64, [], [1], "<i8")
    node = helper.make_node(
        "Gemm",
        ["a", "b"],
        ["y"],
        name="/head/Gemm_3",
        alpha=0.5,
        mode="constant",
        perm=[0, 2, 1, -1],
        scales=[1.0, -2.5],
        transB=1,
        value=shape,
    )
    vi = helper.make_tensor_value_info(
        "past_key_values.0.key", TensorProto.FLOAT, ["batch", 3, "past_sequence", 64]
    )
    b = raw_tensor("b", TensorProto.FLOAT, [3], [0.5, -1.0, 2.0], "<f4")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["y"], name="/Add_0")],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[b],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17)],
        producer_name="kiln",
        producer_version="0.1.0",
        ir_version=8,
    )
    helper.set_model_props(model, {"architecture": "gpt2", "kv_cache": "false"})
    onnx.checker.check_model(model, full_check=True)
    for name, msg in [
        ("tensor_f32.pb", w),
        ("tensor_i64.pb", shape),
        ("scalar_i64.pb", one),
        ("node.pb", node),
        ("value_info.pb", vi),
        ("model.onnx", model),
    ]:
        (OUT / name).write_bytes(msg.SerializeToString())
        print(f"{name}: {len(msg.SerializeToString())} bytes")


if __name__ == "__main__":
    main()
