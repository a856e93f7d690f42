//! The encoder against bytes from Python's `onnx` package (`tests/fixtures/onnx`, made by
//! `scripts/make_onnx_fixtures.py`), the graph's structure, and the errors.
//!
//! The numerics (onnxruntime's logits against an independent numpy forward pass, KV-cache
//! greedy decoding) are checked by `tests/onnx_export.rs` through `scripts/check_onnx_export.py`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use super::proto::{
    AttributeProto, AttributeValue, DataType, Dim, Encode, GraphProto, ModelProto, NodeProto,
    OperatorSetId, PROTOBUF_LIMIT, TensorData, TensorProto, ValueInfoProto, check_size,
};
use super::*;

fn fixture(name: &str) -> Vec<u8> {
    let path: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/onnx")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn i64_tensor(name: &str, dims: &[i64], values: &[i64]) -> TensorProto {
    TensorProto {
        dims: dims.to_vec(),
        name: name.into(),
        data: TensorData::I64(values.to_vec()),
    }
}

#[test]
fn tensors_encode_as_python_onnx_does() {
    let w = TensorProto {
        dims: vec![2, 3],
        name: "w".into(),
        data: TensorData::F32(vec![1.0, -0.0, 1e-30, -3.4e38, 0.25, 7.0]),
    };
    assert_eq!(w.encode_to_vec(), fixture("tensor_f32.pb"));
    let shape = i64_tensor("const.shape", &[4], &[0, 0, -1, 64]);
    assert_eq!(shape.encode_to_vec(), fixture("tensor_i64.pb"));
    let one = i64_tensor("const.one", &[], &[1]);
    assert_eq!(one.encode_to_vec(), fixture("scalar_i64.pb"));
}

#[test]
fn nodes_and_attributes_encode_as_python_onnx_does() {
    let node = NodeProto {
        inputs: vec!["a".into(), "b".into()],
        outputs: vec!["y".into()],
        name: "/head/Gemm_3".into(),
        op_type: "Gemm".into(),
        attributes: vec![
            AttributeProto::float("alpha", 0.5),
            AttributeProto {
                name: "mode".into(),
                value: AttributeValue::String("constant".into()),
            },
            AttributeProto::ints("perm", &[0, 2, 1, -1]),
            AttributeProto {
                name: "scales".into(),
                value: AttributeValue::Floats(vec![1.0, -2.5]),
            },
            AttributeProto::int("transB", 1),
            AttributeProto {
                name: "value".into(),
                value: AttributeValue::Tensor(i64_tensor("const.shape", &[4], &[0, 0, -1, 64])),
            },
        ],
        domain: String::new(),
    };
    assert_eq!(node.encode_to_vec(), fixture("node.pb"));
}

#[test]
fn value_infos_encode_as_python_onnx_does() {
    let vi = ValueInfoProto {
        name: "past_key_values.0.key".into(),
        elem_type: DataType::Float,
        shape: Some(vec![
            Dim::Param("batch".into()),
            Dim::Value(3),
            Dim::Param("past_sequence".into()),
            Dim::Value(64),
        ]),
    };
    assert_eq!(vi.encode_to_vec(), fixture("value_info.pb"));
}

fn tiny_model() -> ModelProto {
    let x = |name: &str| ValueInfoProto {
        name: name.into(),
        elem_type: DataType::Float,
        shape: Some(vec![Dim::Param("batch".into()), Dim::Value(3)]),
    };
    ModelProto {
        ir_version: 8,
        producer_name: "kiln".into(),
        producer_version: "0.1.0".into(),
        doc_string: String::new(),
        graph: GraphProto {
            nodes: vec![NodeProto {
                inputs: vec!["x".into(), "b".into()],
                outputs: vec!["y".into()],
                name: "/Add_0".into(),
                op_type: "Add".into(),
                ..NodeProto::default()
            }],
            name: "tiny".into(),
            initializers: vec![TensorProto {
                dims: vec![3],
                name: "b".into(),
                data: TensorData::F32(vec![0.5, -1.0, 2.0]),
            }],
            doc_string: String::new(),
            inputs: vec![x("x")],
            outputs: vec![x("y")],
        },
        opset_import: vec![OperatorSetId {
            domain: String::new(),
            version: 17,
        }],
        metadata_props: vec![
            ("architecture".into(), "gpt2".into()),
            ("kv_cache".into(), "false".into()),
        ],
    }
}

#[test]
fn a_model_encodes_as_python_onnx_does_and_saves_atomically() {
    let model = tiny_model();
    let bytes = model.to_bytes().unwrap();
    assert_eq!(bytes, fixture("model.onnx"));
    assert_eq!(model.encoded_len(), bytes.len() as u64);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/tiny.onnx");
    model.save(&path).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    let mut streamed = Vec::new();
    model.write_to(&mut streamed).unwrap();
    assert_eq!(streamed, bytes);
}

#[test]
fn large_tensors_are_streamed_with_correct_lengths() {
    // Over 64 values the data is a borrowed chunk; lengths of the enclosing messages must
    // still count it (varint lengths of 2 and 3 bytes).
    for n in [65usize, 40_000] {
        let values: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 3.0).collect();
        let mut model = tiny_model();
        model.graph.initializers[0] = TensorProto {
            dims: vec![n as i64],
            name: "b".into(),
            data: TensorData::F32(values.clone()),
        };
        let bytes = model.to_bytes().unwrap();
        assert_eq!(bytes.len() as u64, model.encoded_len());
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let at = bytes
            .windows(raw.len())
            .position(|w| w == raw.as_slice())
            .expect("raw data present");
        // raw_data (field 9, wire type 2) then the varint length 4n, right before the data.
        let mut len = Vec::new();
        let mut v = 4 * n as u64;
        while v >= 0x80 {
            len.push((v as u8) | 0x80);
            v >>= 7;
        }
        len.push(v as u8);
        assert_eq!(&bytes[at - len.len() - 1..at - len.len()], &[0x4a]);
        assert_eq!(&bytes[at - len.len()..at], len.as_slice());
    }
}

#[test]
fn a_model_past_the_protobuf_limit_is_refused_before_it_is_built() {
    // 1024 layers of width 4096 need about 200 GB; no weight is read or allocated.
    let spec = ModelSpec {
        n_layers: 1024,
        d_model: 4096,
        d_ff: 11008,
        n_heads: 32,
        n_kv_heads: 32,
        ..llama_spec()
    };
    let err = build(&spec, Weights::new(), &ExportOptions::default()).unwrap_err();
    assert!(
        matches!(err, OnnxError::TooLarge { bytes, limit } if bytes > 200_000_000_000 && limit == PROTOBUF_LIMIT),
        "{err:?}"
    );
    // RoPE tables for an absurd context length count too.
    let spec = ModelSpec {
        context_length: MAX_DIM,
        ..llama_spec()
    };
    let err = build(&spec, Weights::new(), &ExportOptions::default()).unwrap_err();
    assert!(matches!(err, OnnxError::TooLarge { .. }), "{err:?}");
    let spec = ModelSpec {
        context_length: MAX_DIM + 1,
        ..llama_spec()
    };
    let err = build(&spec, Weights::new(), &ExportOptions::default()).unwrap_err();
    assert!(matches!(err, OnnxError::InvalidSpec(_)), "{err:?}");
}

#[test]
fn the_2gib_protobuf_limit_is_a_typed_error() {
    assert!(check_size(PROTOBUF_LIMIT).is_ok());
    let err = check_size(PROTOBUF_LIMIT + 1).unwrap_err();
    assert!(matches!(
        err,
        OnnxError::TooLarge { bytes, limit } if bytes == PROTOBUF_LIMIT + 1 && limit == PROTOBUF_LIMIT
    ));
    assert!(err.to_string().contains("external data"), "{err}");
}

// --- Graphs --------------------------------------------------------------------------------------

pub(super) fn gpt2_spec() -> ModelSpec {
    ModelSpec {
        architecture: "gpt2".into(),
        vocab_size: 37,
        context_length: 16,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 4,
        d_model: 16,
        d_ff: 64,
        position: Position::Learned,
        norm: Norm::LayerNorm { eps: 1e-5 },
        mlp: Mlp::GeluTanh,
        bias: true,
        qkv_bias: false,
        tied_embeddings: true,
    }
}

pub(super) fn llama_spec() -> ModelSpec {
    ModelSpec {
        architecture: "llama".into(),
        vocab_size: 41,
        context_length: 32,
        n_layers: 3,
        n_heads: 6,
        n_kv_heads: 2,
        d_model: 24,
        d_ff: 40,
        position: Position::Rope {
            theta: 10_000.0,
            pairing: RopePairing::Interleaved,
        },
        norm: Norm::RmsNorm { eps: 1e-5 },
        mlp: Mlp::SwiGlu,
        bias: false,
        qkv_bias: false,
        tied_embeddings: false,
    }
}

fn weights_for(spec: &ModelSpec) -> Weights {
    let mut w = Weights::new();
    for (i, (name, shape)) in spec.weight_shapes().into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let data = (0..n).map(|j| ((i * 31 + j) % 17) as f32 * 0.01).collect();
        w.insert(name, shape, data).unwrap();
    }
    w
}

fn graph_of(spec: &ModelSpec, kv_cache: bool) -> GraphProto {
    let options = ExportOptions {
        kv_cache,
        ..ExportOptions::default()
    };
    build(spec, weights_for(spec), &options).unwrap().graph
}

fn count(g: &GraphProto, op: &str) -> usize {
    g.nodes.iter().filter(|n| n.op_type == op).count()
}

/// Every node input is defined before use, every value is defined once, every output is made.
fn assert_well_formed(g: &GraphProto) {
    let mut defined: HashSet<&str> = g.inputs.iter().map(|v| v.name.as_str()).collect();
    let mut initializers = HashSet::new();
    for t in &g.initializers {
        assert!(
            initializers.insert(t.name.as_str()),
            "initializer {} twice",
            t.name
        );
        assert!(
            defined.insert(t.name.as_str()),
            "{} is an input and an initializer",
            t.name
        );
        let n: i64 = t.dims.iter().product();
        assert_eq!(n as usize, t.data.len(), "{}", t.name);
    }
    let mut names = HashSet::new();
    for node in &g.nodes {
        assert!(
            names.insert(node.name.as_str()),
            "node name {} twice",
            node.name
        );
        for input in &node.inputs {
            assert!(
                defined.contains(input.as_str()),
                "{} uses undefined {input}",
                node.name
            );
        }
        for output in &node.outputs {
            assert!(defined.insert(output.as_str()), "{output} defined twice");
        }
    }
    for out in &g.outputs {
        assert!(
            defined.contains(out.name.as_str()),
            "output {} never made",
            out.name
        );
    }
    // Every initializer is used.
    let used: HashSet<&str> = g
        .nodes
        .iter()
        .flat_map(|n| n.inputs.iter().map(String::as_str))
        .collect();
    for t in &g.initializers {
        assert!(
            used.contains(t.name.as_str()),
            "initializer {} unused",
            t.name
        );
    }
}

fn dims(v: &ValueInfoProto) -> Vec<String> {
    v.shape
        .as_ref()
        .unwrap()
        .iter()
        .map(|d| match d {
            Dim::Value(n) => n.to_string(),
            Dim::Param(p) => p.clone(),
        })
        .collect()
}

#[test]
fn gpt2_graph_has_dynamic_axes_layernorm_and_a_tied_head() {
    let spec = gpt2_spec();
    let g = graph_of(&spec, false);
    assert_well_formed(&g);
    assert_eq!(g.inputs.len(), 1);
    assert_eq!(g.inputs[0].name, "input_ids");
    assert_eq!(g.inputs[0].elem_type, DataType::Int64);
    assert_eq!(dims(&g.inputs[0]), ["batch", "sequence"]);
    assert_eq!(g.outputs.len(), 1);
    assert_eq!(g.outputs[0].name, "logits");
    assert_eq!(dims(&g.outputs[0]), ["batch", "sequence", "37"]);
    assert_eq!(count(&g, "LayerNormalization"), 2 * spec.n_layers + 1);
    for n in g.nodes.iter().filter(|n| n.op_type == "LayerNormalization") {
        assert_eq!(n.inputs.len(), 3, "LayerNorm with bias");
        assert!(
            n.attributes
                .contains(&AttributeProto::float("epsilon", 1e-5))
        );
    }
    assert_eq!(count(&g, "ReduceMean"), 0);
    assert_eq!(count(&g, "Tanh"), spec.n_layers);
    assert_eq!(count(&g, "Softmax"), spec.n_layers);
    // The tied head reads the token embedding transposed, without a copy.
    let gemm: Vec<_> = g.nodes.iter().filter(|n| n.op_type == "Gemm").collect();
    assert_eq!(gemm.len(), 1);
    assert_eq!(gemm[0].inputs[1], "tok_emb.weight");
    assert!(
        gemm[0]
            .attributes
            .contains(&AttributeProto::int("transB", 1))
    );
    let inits: HashMap<&str, &TensorProto> = g
        .initializers
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    assert_eq!(inits["pos_emb.weight"].dims, [16, 16]);
    assert_eq!(inits["blocks.1.attn.qkv.weight"].dims, [16, 48]);
    assert!(!inits.contains_key("lm_head.weight"));
    assert!(!inits.contains_key("rope.cos"));
}

#[test]
fn llama_graph_has_rmsnorm_ops_rope_tables_gqa_and_an_untied_head() {
    let spec = llama_spec();
    let g = graph_of(&spec, false);
    assert_well_formed(&g);
    assert_eq!(count(&g, "LayerNormalization"), 0);
    assert_eq!(count(&g, "ReduceMean"), 2 * spec.n_layers + 1);
    assert_eq!(count(&g, "Sigmoid"), spec.n_layers);
    assert_eq!(count(&g, "Gemm"), 0);
    let logits = g.nodes.iter().find(|n| n.outputs == ["logits"]).unwrap();
    assert_eq!(
        (logits.op_type.as_str(), logits.inputs[1].as_str()),
        ("MatMul", "lm_head.weight")
    );
    let inits: HashMap<&str, &TensorProto> = g
        .initializers
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    // head_dim 4: qkv = (6 + 2·2)·4 = 40 wide; query groups of 3 heads per key/value head.
    assert_eq!(inits["blocks.0.attn.qkv.weight"].dims, [24, 40]);
    assert_eq!(
        inits["const.blocks.0.attn.q_groups"].data,
        TensorData::I64(vec![0, 2, 3, -1, 4])
    );
    assert_eq!(inits["rope.cos"].dims, [32, 2]);
    // Interleaved pairs: dimension i's partner is i ^ 1, sines signed −, +.
    assert_eq!(
        inits["const.rope.partner"].data,
        TensorData::I64(vec![1, 0, 3, 2])
    );
    assert_eq!(
        inits["const.rope.freq_index"].data,
        TensorData::I64(vec![0, 0, 1, 1])
    );
    assert_eq!(
        inits["const.rope.sign"].data,
        TensorData::F32(vec![-1.0, 1.0, -1.0, 1.0])
    );
    // Position 3, frequency 1: θ^(-2/4) = 0.01.
    let TensorData::F32(cos) = &inits["rope.cos"].data else {
        panic!("f32 table")
    };
    assert_eq!(cos[3 * 2 + 1], (3.0f64 * 0.01).cos() as f32);
    assert!(!inits.contains_key("pos_emb.weight"));

    let half_split = ModelSpec {
        position: Position::Rope {
            theta: 10_000.0,
            pairing: RopePairing::HalfSplit,
        },
        ..spec
    };
    let g = graph_of(&half_split, false);
    let inits: HashMap<&str, &TensorProto> = g
        .initializers
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    assert_eq!(
        inits["const.rope.partner"].data,
        TensorData::I64(vec![2, 3, 0, 1])
    );
    assert_eq!(
        inits["const.rope.freq_index"].data,
        TensorData::I64(vec![0, 1, 0, 1])
    );
}

#[test]
fn kv_cache_graph_takes_past_and_returns_present_in_optimum_naming() {
    let spec = llama_spec();
    let g = graph_of(&spec, true);
    assert_well_formed(&g);
    let inputs: Vec<&str> = g.inputs.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(
        inputs[..5],
        [
            "input_ids",
            "attention_mask",
            "position_ids",
            "past_key_values.0.key",
            "past_key_values.0.value"
        ]
    );
    assert_eq!(inputs.len(), 3 + 2 * spec.n_layers);
    assert_eq!(dims(&g.inputs[1]), ["batch", "total_sequence"]);
    assert_eq!(dims(&g.inputs[3]), ["batch", "2", "past_sequence", "4"]);
    let outputs: Vec<&str> = g.outputs.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(outputs[..3], ["logits", "present.0.key", "present.0.value"]);
    assert_eq!(outputs.len(), 1 + 2 * spec.n_layers);
    assert_eq!(dims(&g.outputs[6]), ["batch", "2", "total_sequence", "4"]);
    for layer in 0..spec.n_layers {
        for which in ["key", "value"] {
            let node = g
                .nodes
                .iter()
                .find(|n| n.outputs == [present_name(layer, which)])
                .unwrap();
            assert_eq!(node.op_type, "Concat");
            assert_eq!(node.inputs[0], past_name(layer, which));
            assert!(node.attributes.contains(&AttributeProto::int("axis", 2)));
        }
    }
    // Padding from the attention mask joins the causal mask.
    assert_eq!(count(&g, "Or"), 1);
    assert!(
        g.nodes
            .iter()
            .any(|n| n.op_type == "Equal" && n.inputs[0] == "attention_mask")
    );
}

#[test]
fn models_record_opset_17_and_metadata() {
    let model = build(
        &gpt2_spec(),
        weights_for(&gpt2_spec()),
        &ExportOptions::default(),
    )
    .unwrap();
    assert_eq!((model.ir_version, model.opset_import[0].version), (8, 17));
    assert_eq!(model.opset_import[0].domain, "");
    assert!(
        model
            .metadata_props
            .contains(&("kv_cache".into(), "false".into()))
    );
    let bytes = to_bytes(
        &gpt2_spec(),
        weights_for(&gpt2_spec()),
        &ExportOptions::default(),
    )
    .unwrap();
    assert_eq!(bytes, model.to_bytes().unwrap());
    let dir = tempfile::tempdir().unwrap();
    save(
        dir.path().join("m.onnx"),
        &gpt2_spec(),
        weights_for(&gpt2_spec()),
        &ExportOptions::default(),
    )
    .unwrap();
    assert_eq!(std::fs::read(dir.path().join("m.onnx")).unwrap(), bytes);
}

#[test]
fn qkv_bias_alone_adds_only_the_qkv_bias() {
    let spec = ModelSpec {
        qkv_bias: true,
        ..llama_spec()
    };
    let names: Vec<String> = spec.weight_shapes().into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"blocks.2.attn.qkv.bias".to_owned()));
    assert!(
        !names
            .iter()
            .any(|n| n.ends_with("proj.bias") || n.contains("mlp") && n.ends_with(".bias"))
    );
    assert_well_formed(&graph_of(&spec, true));
}

// --- Errors -------------------------------------------------------------------------------------

#[test]
fn a_missing_weight_is_named_with_its_shape() {
    let spec = llama_spec();
    let mut w = weights_for(&spec);
    w.remove("blocks.1.mlp.gate.weight").unwrap();
    let err = build(&spec, w, &ExportOptions::default()).unwrap_err();
    assert!(
        matches!(&err, OnnxError::MissingWeight { name, expected }
            if name == "blocks.1.mlp.gate.weight" && expected == &[24, 40]),
        "{err:?}"
    );
    assert!(err.to_string().contains("blocks.1.mlp.gate.weight"));
}

#[test]
fn a_weight_of_the_wrong_shape_is_named() {
    let spec = gpt2_spec();
    let mut w = weights_for(&spec);
    w.remove("blocks.0.attn.proj.weight").unwrap();
    // Transposed ([out, in], PyTorch's layout) instead of Kiln's [in, out]: same size.
    w.insert("blocks.0.attn.proj.weight", [16, 16], vec![0.0; 256])
        .unwrap();
    w.remove("blocks.0.mlp.up.weight").unwrap();
    w.insert("blocks.0.mlp.up.weight", [64, 16], vec![0.0; 1024])
        .unwrap();
    let err = build(&spec, w, &ExportOptions::default()).unwrap_err();
    assert!(
        matches!(&err, OnnxError::ShapeMismatch { name, expected, found }
            if name == "blocks.0.mlp.up.weight" && expected == &[16, 64] && found == &[64, 16]),
        "{err:?}"
    );
}

#[test]
fn weights_the_spec_does_not_use_are_refused() {
    let spec = gpt2_spec();
    let mut w = weights_for(&spec);
    w.insert("lm_head.weight", [16, 37], vec![0.0; 16 * 37])
        .unwrap();
    let err = build(&spec, w, &ExportOptions::default()).unwrap_err();
    assert!(
        matches!(&err, OnnxError::UnexpectedWeight(n) if n == "lm_head.weight"),
        "{err:?}"
    );
}

#[test]
fn weights_reject_bad_lengths_and_duplicates() {
    let mut w = Weights::new();
    let err = w.insert("a", [2, 3], vec![0.0; 5]).unwrap_err();
    assert!(
        matches!(
            err,
            OnnxError::DataLength {
                expected: 6,
                found: 5,
                ..
            }
        ),
        "{err:?}"
    );
    let err = w.insert("a", [usize::MAX, 3], vec![]).unwrap_err();
    assert!(matches!(err, OnnxError::DataLength { .. }), "{err:?}");
    w.insert("a", [2], vec![1.0, 2.0]).unwrap();
    let err = w.insert("a", [2], vec![1.0, 2.0]).unwrap_err();
    assert!(matches!(&err, OnnxError::DuplicateWeight(n) if n == "a"));
    assert_eq!(w.get("a").unwrap().data, [1.0, 2.0]);
}

#[test]
fn inconsistent_specs_are_refused() {
    let cases: Vec<(ModelSpec, &str)> = vec![
        (
            ModelSpec {
                n_heads: 5,
                ..llama_spec()
            },
            "multiple of n_heads",
        ),
        (
            ModelSpec {
                n_kv_heads: 4,
                ..llama_spec()
            },
            "multiple of n_kv_heads",
        ),
        (
            ModelSpec {
                vocab_size: 0,
                ..llama_spec()
            },
            "vocab_size",
        ),
        (
            ModelSpec {
                d_model: 18,
                n_heads: 6,
                n_kv_heads: 6,
                ..llama_spec()
            },
            "even head dimension",
        ),
        (
            ModelSpec {
                position: Position::Rope {
                    theta: f32::NAN,
                    pairing: RopePairing::HalfSplit,
                },
                ..llama_spec()
            },
            "theta",
        ),
        (
            ModelSpec {
                norm: Norm::LayerNorm { eps: -1.0 },
                ..gpt2_spec()
            },
            "eps",
        ),
    ];
    for (spec, needle) in cases {
        let err = build(&spec, Weights::new(), &ExportOptions::default()).unwrap_err();
        assert!(
            matches!(&err, OnnxError::InvalidSpec(m) if m.contains(needle)),
            "{needle}: {err:?}"
        );
    }
}
