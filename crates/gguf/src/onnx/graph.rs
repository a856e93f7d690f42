//! Builds the ONNX graph of a [`ModelSpec`] with its [`Weights`].
//!
//! The graph computes what Kiln's `Transformer` computes, op for op where it matters for
//! numerics: RoPE angles from `f64` tables (`pos · θ^(-2k/head_dim)`, stored per position as
//! initializers), RMSNorm as `x · 1/sqrt(mean(x²) + eps) · w`, attention scaled by
//! `1/√head_dim` after `QKᵀ`, grouped-query heads by broadcasting each key/value head over its
//! group of query heads (no copies), the tied head as `Gemm(h, tok_emb, transB=1)`.
//!
//! Everything shape-dependent is computed in the graph (`Shape`, `Range`), so batch and
//! sequence lengths are free. Masked attention scores are set to `f32::MIN` rather than `-inf`,
//! so a fully masked row (a left-padding query) gives finite values instead of NaNs that would
//! reach later tokens through the cache.

use std::collections::HashSet;

use super::error::OnnxError;
use super::proto::{
    AttributeProto, DataType, Dim, GraphProto, ModelProto, NodeProto, OperatorSetId, TensorData,
    TensorProto, ValueInfoProto, check_size,
};
use super::spec::{ExportOptions, Mlp, ModelSpec, Norm, Position, RopePairing, Weights};

/// The default-domain operator set the graph uses (`LayerNormalization` needs 17).
pub const OPSET: i64 = 17;
/// The IR version of ONNX 1.12, the release that introduced opset 17.
pub const IR_VERSION: i64 = 8;

/// Name of the token-id input, `int64 [batch, sequence]`.
pub const INPUT_IDS: &str = "input_ids";
/// Name of the attention-mask input of a KV-cache export, `int64 [batch, total_sequence]`
/// (1 = attend, 0 = padding).
pub const ATTENTION_MASK: &str = "attention_mask";
/// Name of the position-id input of a KV-cache export, `int64 [batch, sequence]`.
pub const POSITION_IDS: &str = "position_ids";
/// Name of the output, `float [batch, sequence, vocab]`.
pub const LOGITS: &str = "logits";

/// Name of layer `layer`'s past `key` or `value` input (`past_key_values.0.key`).
pub fn past_name(layer: usize, which: &str) -> String {
    format!("past_key_values.{layer}.{which}")
}

/// Name of layer `layer`'s present `key` or `value` output (`present.0.key`).
pub fn present_name(layer: usize, which: &str) -> String {
    format!("present.{layer}.{which}")
}

/// Builds the ONNX model of `spec` with `weights` (consumed: their data moves into the model's
/// initializers). Every weight of [`ModelSpec::weight_shapes`] must be present with that shape,
/// and no other.
pub fn build(
    spec: &ModelSpec,
    mut weights: Weights,
    options: &ExportOptions,
) -> Result<ModelProto, OnnxError> {
    spec.validate()?;
    // Refuse a model past the protobuf limit before building anything (the RoPE tables of an
    // absurd context length included).
    let rope_bytes = match spec.position {
        Position::Rope { .. } => (spec.context_length as u64)
            .saturating_mul(spec.head_dim() as u64 / 2)
            .saturating_mul(8),
        Position::Learned => 0,
    };
    let weight_bytes = spec
        .weight_shapes()
        .iter()
        .map(|(_, shape)| shape.iter().fold(4u64, |n, &d| n.saturating_mul(d as u64)))
        .fold(0u64, u64::saturating_add);
    check_size(weight_bytes.saturating_add(rope_bytes))?;
    let mut b = Builder::default();
    for (name, expected) in spec.weight_shapes() {
        let w = weights
            .remove(&name)
            .ok_or_else(|| OnnxError::MissingWeight {
                name: name.clone(),
                expected: expected.clone(),
            })?;
        if w.shape != expected {
            return Err(OnnxError::ShapeMismatch {
                name,
                expected,
                found: w.shape,
            });
        }
        b.initializer(&name, &w.shape, TensorData::F32(w.data));
    }
    if let Some(extra) = weights.names().next() {
        return Err(OnnxError::UnexpectedWeight(extra.to_owned()));
    }
    let graph = Graph::new(spec, options.kv_cache, b).build();
    let kv = if options.kv_cache { "true" } else { "false" };
    Ok(ModelProto {
        ir_version: IR_VERSION,
        producer_name: "kiln".into(),
        producer_version: options.producer_version.clone(),
        doc_string: String::new(),
        graph,
        opset_import: vec![OperatorSetId {
            domain: String::new(),
            version: OPSET,
        }],
        metadata_props: vec![
            ("architecture".into(), spec.architecture.clone()),
            ("kv_cache".into(), kv.into()),
            ("num_layers".into(), spec.n_layers.to_string()),
            ("num_key_value_heads".into(), spec.n_kv_heads.to_string()),
            ("head_dim".into(), spec.head_dim().to_string()),
            ("context_length".into(), spec.context_length.to_string()),
        ],
    })
}

/// Nodes and initializers under construction, with fresh value names.
#[derive(Default)]
struct Builder {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    /// Names of the `const.*` initializers made so far (each is made once and shared).
    constants: HashSet<String>,
    scope: String,
    next: usize,
}

impl Builder {
    fn initializer(&mut self, name: &str, shape: &[usize], data: TensorData) -> String {
        self.initializers.push(TensorProto {
            dims: shape.iter().map(|&d| d as i64).collect(),
            name: name.to_owned(),
            data,
        });
        name.to_owned()
    }

    /// The constant `const.{name}`, made on first use (a name always holds the same value).
    fn constant(
        &mut self,
        name: &str,
        shape: &[usize],
        data: impl FnOnce() -> TensorData,
    ) -> String {
        let name = format!("const.{name}");
        if self.constants.insert(name.clone()) {
            self.initializer(&name, shape, data());
        }
        name
    }

    fn const_i64(&mut self, name: &str, values: &[i64]) -> String {
        self.constant(name, &[values.len()], || TensorData::I64(values.to_vec()))
    }

    fn scalar_i64(&mut self, name: &str, v: i64) -> String {
        self.constant(name, &[], || TensorData::I64(vec![v]))
    }

    fn scalar_f32(&mut self, name: &str, v: f32) -> String {
        self.constant(name, &[], || TensorData::F32(vec![v]))
    }

    /// A node with `n` outputs, named `/{scope}/{op}_{k}`; `outputs` overrides the names.
    fn node_n(
        &mut self,
        op: &str,
        inputs: &[&str],
        attributes: Vec<AttributeProto>,
        outputs: Vec<String>,
    ) -> Vec<String> {
        let name = format!("/{}/{op}_{}", self.scope, self.next);
        self.next += 1;
        self.nodes.push(NodeProto {
            inputs: inputs.iter().map(|s| (*s).to_owned()).collect(),
            outputs: outputs.clone(),
            name,
            op_type: op.into(),
            attributes,
            domain: String::new(),
        });
        outputs
    }

    fn op(&mut self, op: &str, inputs: &[&str], attributes: Vec<AttributeProto>) -> String {
        let out = format!("/{}/{op}_{}_output", self.scope, self.next);
        self.node_n(op, inputs, attributes, vec![out]).remove(0)
    }

    /// An op whose output is a graph output (`name`).
    fn op_named(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>, name: String) {
        self.node_n(op, inputs, attrs, vec![name]);
    }
}

/// The model graph and the values shared by every layer.
struct Graph<'s> {
    spec: &'s ModelSpec,
    kv_cache: bool,
    b: Builder,
    /// `[*, 1, T, head_dim]` RoPE factors and the head-dimension permutation, for rotary models.
    rope: Option<(String, String, String)>,
    /// `bool`, true where attention is masked: `[T, S]`, or `[B, 1, 1, T, S]` with a cache.
    mask: String,
    neg: String,
}

impl<'s> Graph<'s> {
    fn new(spec: &'s ModelSpec, kv_cache: bool, b: Builder) -> Self {
        Self {
            spec,
            kv_cache,
            b,
            rope: None,
            mask: String::new(),
            neg: String::new(),
        }
    }

    fn build(mut self) -> GraphProto {
        let spec = self.spec;
        let (hd, kvh) = (spec.head_dim() as i64, spec.n_kv_heads as i64);
        self.b.scope = "embed".into();
        let mut x = self.prologue();
        for layer in 0..spec.n_layers {
            x = self.block(layer, &x);
        }
        self.b.scope = "head".into();
        let h = self.norm("norm_f", &x);
        self.head(&h);

        let dynamic = |s: &str| Dim::Param(s.into());
        let tensor = |name: String, elem_type, dims: Vec<Dim>| ValueInfoProto {
            name,
            elem_type,
            shape: Some(dims),
        };
        let mut inputs = vec![tensor(
            INPUT_IDS.into(),
            DataType::Int64,
            vec![dynamic("batch"), dynamic("sequence")],
        )];
        let mut outputs = vec![tensor(
            LOGITS.into(),
            DataType::Float,
            vec![
                dynamic("batch"),
                dynamic("sequence"),
                Dim::Value(spec.vocab_size as i64),
            ],
        )];
        if self.kv_cache {
            inputs.push(tensor(
                ATTENTION_MASK.into(),
                DataType::Int64,
                vec![dynamic("batch"), dynamic("total_sequence")],
            ));
            inputs.push(tensor(
                POSITION_IDS.into(),
                DataType::Int64,
                vec![dynamic("batch"), dynamic("sequence")],
            ));
            let kv_dims = |seq: &str| {
                vec![
                    dynamic("batch"),
                    Dim::Value(kvh),
                    dynamic(seq),
                    Dim::Value(hd),
                ]
            };
            for layer in 0..spec.n_layers {
                for which in ["key", "value"] {
                    inputs.push(tensor(
                        past_name(layer, which),
                        DataType::Float,
                        kv_dims("past_sequence"),
                    ));
                    outputs.push(tensor(
                        present_name(layer, which),
                        DataType::Float,
                        kv_dims("total_sequence"),
                    ));
                }
            }
        }
        GraphProto {
            nodes: self.b.nodes,
            name: format!("kiln_{}", spec.architecture),
            initializers: self.b.initializers,
            doc_string: String::new(),
            inputs,
            outputs,
        }
    }

    /// Embeddings, positions, RoPE factors and the attention mask; returns `x` `[B, T, d]`.
    fn prologue(&mut self) -> String {
        let spec = self.spec;
        let b = &mut self.b;
        let zero = b.scalar_i64("zero", 0);
        let one = b.scalar_i64("one", 1);
        let idx1 = b.scalar_i64("index_1", 1);
        let ids_shape = b.op("Shape", &[INPUT_IDS], vec![]);
        let t = b.op("Gather", &[&ids_shape, &idx1], vec![]);
        // Past length P, total length S = P + T, positions of the new tokens.
        let (p, positions) = if self.kv_cache {
            let idx2 = b.scalar_i64("index_2", 2);
            let past_shape = b.op("Shape", &[&past_name(0, "key")], vec![]);
            let p = b.op("Gather", &[&past_shape, &idx2], vec![]);
            (p, POSITION_IDS.to_owned())
        } else {
            let axis0 = b.const_i64("axes_0", &[0]);
            let range = b.op("Range", &[&zero, &t, &one], vec![]);
            (zero.clone(), b.op("Unsqueeze", &[&range, &axis0], vec![]))
        };
        let s = b.op("Add", &[&p, &t], vec![]);

        let mut x = b.op("Gather", &["tok_emb.weight", INPUT_IDS], vec![]);
        match spec.position {
            Position::Learned => {
                let pe = b.op("Gather", &["pos_emb.weight", &positions], vec![]);
                x = b.op("Add", &[&x, &pe], vec![]);
            }
            Position::Rope { theta, pairing } => {
                self.rope = Some(rope_factors(b, spec, theta, pairing, &positions));
            }
        }

        // Query i (absolute position P + i) must not see key j > P + i.
        let b = &mut self.b;
        let rows = b.op("Range", &[&p, &s, &one], vec![]);
        let axis1 = b.const_i64("axes_1", &[1]);
        let rows = b.op("Unsqueeze", &[&rows, &axis1], vec![]);
        let cols = b.op("Range", &[&zero, &s, &one], vec![]);
        let mut mask = b.op("Greater", &[&cols, &rows], vec![]);
        if self.kv_cache {
            let pad = b.op("Equal", &[ATTENTION_MASK, &zero], vec![]);
            let axes = b.const_i64("axes_1_2_3", &[1, 2, 3]);
            let pad = b.op("Unsqueeze", &[&pad, &axes], vec![]);
            mask = b.op("Or", &[&mask, &pad], vec![]);
        }
        self.mask = mask;
        self.neg = b.scalar_f32("masked_score", f32::MIN);
        x
    }

    /// `x + attn(norm1(x))`, then `+ mlp(norm2(x))`.
    fn block(&mut self, layer: usize, x: &str) -> String {
        let p = format!("blocks.{layer}");
        self.b.scope = format!("{p}/attn");
        let h = self.norm(&format!("{p}.norm1"), x);
        let a = self.attention(layer, &h);
        let x = self.b.op("Add", &[x, &a], vec![]);
        self.b.scope = format!("{p}/mlp");
        let h = self.norm(&format!("{p}.norm2"), &x);
        let m = self.mlp(&p, &h);
        self.b.op("Add", &[&x, &m], vec![])
    }

    fn norm(&mut self, prefix: &str, x: &str) -> String {
        let weight = format!("{prefix}.weight");
        match self.spec.norm {
            Norm::LayerNorm { eps } => {
                let bias = format!("{prefix}.bias");
                let mut inputs = vec![x, weight.as_str()];
                if self.spec.bias {
                    inputs.push(&bias);
                }
                self.b.op(
                    "LayerNormalization",
                    &inputs,
                    vec![
                        AttributeProto::int("axis", -1),
                        AttributeProto::float("epsilon", eps as f32),
                    ],
                )
            }
            Norm::RmsNorm { eps } => {
                let b = &mut self.b;
                let eps = b.scalar_f32(&format!("{prefix}.eps"), eps as f32);
                let sq = b.op("Mul", &[x, x], vec![]);
                let ms = b.op(
                    "ReduceMean",
                    &[&sq],
                    vec![
                        AttributeProto::ints("axes", &[-1]),
                        AttributeProto::int("keepdims", 1),
                    ],
                );
                let ms = b.op("Add", &[&ms, &eps], vec![]);
                let rms = b.op("Sqrt", &[&ms], vec![]);
                let inv = b.op("Reciprocal", &[&rms], vec![]);
                let y = b.op("Mul", &[x, &inv], vec![]);
                b.op("Mul", &[&y, &weight], vec![])
            }
        }
    }

    fn linear(&mut self, prefix: &str, x: &str, bias: bool) -> String {
        let y = self
            .b
            .op("MatMul", &[x, &format!("{prefix}.weight")], vec![]);
        if bias {
            self.b.op("Add", &[&y, &format!("{prefix}.bias")], vec![])
        } else {
            y
        }
    }

    fn attention(&mut self, layer: usize, x: &str) -> String {
        let spec = self.spec;
        let (h, kvh, hd) = (
            spec.n_heads as i64,
            spec.n_kv_heads as i64,
            spec.head_dim() as i64,
        );
        let p = format!("blocks.{layer}.attn");
        let qkv = self.linear(&format!("{p}.qkv"), x, spec.bias || spec.qkv_bias);
        let b = &mut self.b;
        let sizes = b.const_i64(&format!("{p}.split"), &[h * hd, kvh * hd, kvh * hd]);
        let outs: Vec<String> = (0..3)
            .map(|k| format!("/{}/Split_{}_output_{k}", b.scope, b.next))
            .collect();
        let parts = b.node_n(
            "Split",
            &[&qkv, &sizes],
            vec![AttributeProto::int("axis", 2)],
            outs,
        );
        // [B, T, heads·hd] → [B, heads, T, hd]
        let heads = |b: &mut Builder, x: &str, n: i64, tag: &str| {
            let shape = b.const_i64(&format!("{p}.{tag}_shape"), &[0, 0, n, hd]);
            let y = b.op("Reshape", &[x, &shape], vec![]);
            b.op(
                "Transpose",
                &[&y],
                vec![AttributeProto::ints("perm", &[0, 2, 1, 3])],
            )
        };
        let mut q = heads(b, &parts[0], h, "q");
        let mut k = heads(b, &parts[1], kvh, "k");
        let mut v = heads(b, &parts[2], kvh, "v");
        if let Some((cos, sin, perm)) = &self.rope {
            q = rotate(b, &q, cos, sin, perm);
            k = rotate(b, &k, cos, sin, perm);
        }
        if self.kv_cache {
            let attrs = || vec![AttributeProto::int("axis", 2)];
            let (pk, pv) = (present_name(layer, "key"), present_name(layer, "value"));
            b.op_named(
                "Concat",
                &[&past_name(layer, "key"), &k],
                attrs(),
                pk.clone(),
            );
            b.op_named(
                "Concat",
                &[&past_name(layer, "value"), &v],
                attrs(),
                pv.clone(),
            );
            (k, v) = (pk, pv);
        }
        // Grouped-query attention without copying keys/values: queries [B, kvh, rep, T, hd]
        // against keys [B, kvh, 1, S, hd] (query head j uses key/value head j / rep).
        let q_shape = b.const_i64(&format!("{p}.q_groups"), &[0, kvh, h / kvh, -1, hd]);
        let q = b.op("Reshape", &[&q, &q_shape], vec![]);
        let axis2 = b.const_i64("axes_2", &[2]);
        let k = b.op("Unsqueeze", &[&k, &axis2], vec![]);
        let v = b.op("Unsqueeze", &[&v, &axis2], vec![]);
        let kt = b.op(
            "Transpose",
            &[&k],
            vec![AttributeProto::ints("perm", &[0, 1, 2, 4, 3])],
        );
        let scores = b.op("MatMul", &[&q, &kt], vec![]);
        let scale = b.scalar_f32(
            &format!("{p}.scale"),
            (1.0 / (spec.head_dim() as f64).sqrt()) as f32,
        );
        let scores = b.op("Mul", &[&scores, &scale], vec![]);
        let scores = b.op("Where", &[&self.mask, &self.neg, &scores], vec![]);
        let probs = b.op("Softmax", &[&scores], vec![AttributeProto::int("axis", -1)]);
        let y = b.op("MatMul", &[&probs, &v], vec![]);
        // [B, kvh, rep, T, hd] → [B, h, T, hd] → [B, T, h, hd] → [B, T, h·hd]
        let shape = b.const_i64(&format!("{p}.heads_shape"), &[0, h, -1, hd]);
        let y = b.op("Reshape", &[&y, &shape], vec![]);
        let y = b.op(
            "Transpose",
            &[&y],
            vec![AttributeProto::ints("perm", &[0, 2, 1, 3])],
        );
        let shape = b.const_i64(&format!("{p}.merge_shape"), &[0, 0, h * hd]);
        let y = b.op("Reshape", &[&y, &shape], vec![]);
        self.linear(&format!("{p}.proj"), &y, spec.bias)
    }

    fn mlp(&mut self, block: &str, x: &str) -> String {
        let spec = self.spec;
        let p = format!("{block}.mlp");
        let hidden = match spec.mlp {
            Mlp::SwiGlu => {
                let g = self.linear(&format!("{p}.gate"), x, spec.bias);
                let u = self.linear(&format!("{p}.up"), x, spec.bias);
                let b = &mut self.b;
                let sig = b.op("Sigmoid", &[&g], vec![]);
                let silu = b.op("Mul", &[&g, &sig], vec![]);
                b.op("Mul", &[&silu, &u], vec![])
            }
            Mlp::GeluTanh => {
                let u = self.linear(&format!("{p}.up"), x, spec.bias);
                let b = &mut self.b;
                // 0.5·u·(1 + tanh(√(2/π)·(u + 0.044715·u³)))
                let c = b.scalar_f32("gelu_cubic", 0.044715);
                let k = b.scalar_f32(
                    "gelu_sqrt_2_over_pi",
                    (2.0 / std::f64::consts::PI).sqrt() as f32,
                );
                let half = b.scalar_f32("half", 0.5);
                let one = b.scalar_f32("one_f32", 1.0);
                let u2 = b.op("Mul", &[&u, &u], vec![]);
                let u3 = b.op("Mul", &[&u2, &u], vec![]);
                let cu3 = b.op("Mul", &[&u3, &c], vec![]);
                let inner = b.op("Add", &[&u, &cu3], vec![]);
                let inner = b.op("Mul", &[&inner, &k], vec![]);
                let t = b.op("Tanh", &[&inner], vec![]);
                let t1 = b.op("Add", &[&t, &one], vec![]);
                let hu = b.op("Mul", &[&u, &half], vec![]);
                b.op("Mul", &[&hu, &t1], vec![])
            }
            Mlp::Gelu => {
                let u = self.linear(&format!("{p}.up"), x, spec.bias);
                let b = &mut self.b;
                // 0.5·u·(1 + erf(u/√2))
                let r = b.scalar_f32("sqrt_2", std::f64::consts::SQRT_2 as f32);
                let half = b.scalar_f32("half", 0.5);
                let one = b.scalar_f32("one_f32", 1.0);
                let z = b.op("Div", &[&u, &r], vec![]);
                let e = b.op("Erf", &[&z], vec![]);
                let e1 = b.op("Add", &[&e, &one], vec![]);
                let hu = b.op("Mul", &[&u, &half], vec![]);
                b.op("Mul", &[&hu, &e1], vec![])
            }
        };
        self.linear(&format!("{p}.down"), &hidden, spec.bias)
    }

    /// `logits` from the final-norm hidden states `[B, T, d]`.
    fn head(&mut self, h: &str) {
        let spec = self.spec;
        let b = &mut self.b;
        if !spec.tied_embeddings {
            b.op_named("MatMul", &[h, "lm_head.weight"], vec![], LOGITS.into());
            return;
        }
        // Gemm reads tok_emb [vocab, d] transposed in place; it takes 2-D operands.
        let flat = b.const_i64("flat_shape", &[-1, spec.d_model as i64]);
        let rows = b.op("Reshape", &[h, &flat], vec![]);
        let y = b.op(
            "Gemm",
            &[&rows, "tok_emb.weight"],
            vec![AttributeProto::int("transB", 1)],
        );
        let bt = b.op(
            "Shape",
            &[h],
            vec![
                AttributeProto::int("start", 0),
                AttributeProto::int("end", 2),
            ],
        );
        let vocab = b.const_i64("vocab", &[spec.vocab_size as i64]);
        let shape = b.op(
            "Concat",
            &[&bt, &vocab],
            vec![AttributeProto::int("axis", 0)],
        );
        b.op_named("Reshape", &[&y, &shape], vec![], LOGITS.into());
    }
}

/// RoPE factors for `positions` (`[1 or B, T]`): `cos` and signed `sin` `[*, 1, T, head_dim]`
/// laid out so that `rope(x) = x·cos + x[..., perm]·sin`, and the permutation `perm`.
///
/// The tables hold `cos`/`sin` of `pos · θ^(-2k/head_dim)` computed in `f64` for every position
/// below `context_length`, as Kiln computes them.
fn rope_factors(
    b: &mut Builder,
    spec: &ModelSpec,
    theta: f32,
    pairing: RopePairing,
    positions: &str,
) -> (String, String, String) {
    let hd = spec.head_dim();
    let half = hd / 2;
    let inv_freq: Vec<f64> = (0..half)
        .map(|k| f64::from(theta).powf(-2.0 * k as f64 / hd as f64))
        .collect();
    let n = spec.context_length * half;
    let (mut cos, mut sin) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for p in 0..spec.context_length {
        for f in &inv_freq {
            let angle = p as f64 * f;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    let cos_t = b.initializer(
        "rope.cos",
        &[spec.context_length, half],
        TensorData::F32(cos),
    );
    let sin_t = b.initializer(
        "rope.sin",
        &[spec.context_length, half],
        TensorData::F32(sin),
    );
    // Head dimension i takes frequency `freq[i]` with sign `sign[i]` on the partner `perm[i]`:
    // interleaved pairs (2k, 2k+1): out[2k] = x[2k]·c − x[2k+1]·s, out[2k+1] = x[2k+1]·c + x[2k]·s;
    // half split (k, k+half): out[k] = x[k]·c − x[k+half]·s, out[k+half] = x[k+half]·c + x[k]·s.
    let (freq, perm, sign): (Vec<i64>, Vec<i64>, Vec<f32>) = match pairing {
        RopePairing::Interleaved => (
            (0..hd).map(|i| (i / 2) as i64).collect(),
            (0..hd).map(|i| (i ^ 1) as i64).collect(),
            (0..hd)
                .map(|i| if i % 2 == 0 { -1.0 } else { 1.0 })
                .collect(),
        ),
        RopePairing::HalfSplit => (
            (0..hd).map(|i| (i % half) as i64).collect(),
            (0..hd).map(|i| ((i + half) % hd) as i64).collect(),
            (0..hd).map(|i| if i < half { -1.0 } else { 1.0 }).collect(),
        ),
    };
    let freq = b.const_i64("rope.freq_index", &freq);
    let perm = b.const_i64("rope.partner", &perm);
    let sign = b.constant("rope.sign", &[hd], || TensorData::F32(sign));
    let axis1 = b.const_i64("axes_1", &[1]);
    let factor = |b: &mut Builder, table: &str| {
        let t = b.op("Gather", &[table, positions], vec![]); // [*, T, half]
        let t = b.op("Gather", &[&t, &freq], vec![AttributeProto::int("axis", 2)]); // [*, T, hd]
        b.op("Unsqueeze", &[&t, &axis1], vec![]) // [*, 1, T, hd]
    };
    let cos = factor(b, &cos_t);
    let sin = factor(b, &sin_t);
    let sin = b.op("Mul", &[&sin, &sign], vec![]);
    (cos, sin, perm)
}

/// `x·cos + x[..., perm]·sin` for `x` `[B, heads, T, hd]`.
fn rotate(b: &mut Builder, x: &str, cos: &str, sin: &str, perm: &str) -> String {
    let partner = b.op("Gather", &[x, perm], vec![AttributeProto::int("axis", 3)]);
    let straight = b.op("Mul", &[x, cos], vec![]);
    let turned = b.op("Mul", &[&partner, sin], vec![]);
    b.op("Add", &[&straight, &turned], vec![])
}
