//! Quantized GGUF files run from their blocks: every projection and the token embedding (also the
//! tied output head) keep the file's blocks as [`QuantLinear`] kernels, memory-mapped with no copy
//! where the kernels read the type in place (`Q4_1`; `Q4_0`, `Q5_0` and `Q8_0` repacked into
//! tiles), `Q4_K` transcoded exactly into 6-bit blocks with f32 sub-block scales (the file's
//! weights, bit for bit); other types (`Q5_1`, `Q5_K`, `Q6_K`, floats, …) are converted to `Q8_0`
//! once at load (a second rounding). Norms, biases and learned positions are f32. The f32 weights
//! are made (dequantized) only if a path asks for them: a backend without host kernels, or
//! training. The Llama family and llama.cpp's `gpt2` both.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Shape, Tensor, TensorData};
use kiln_gguf::blocks::{dequantize_to_vec, quantize};
use kiln_gguf::{GgmlType, GgufFile, TensorInfo};
use kiln_kernels::quant::supports;
use kiln_kernels::{QuantLinear, QuantMatrix, SharedBytes};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::gguf_gpt2::{gpt2_tensors, tensors_from_gpt2_except};
use crate::gguf_model::{GgufLayout, config_from_gguf, interleaved_to_half_split, load, shaped};
use crate::linear::Projection;
use crate::load::{LoadedModel, with_gguf_tokenizer};
use crate::model::Transformer;
use crate::norm::Norm;
use crate::weights::apply_except;

/// Whether `file` is a model whose weights are quantized (its first down projection is in a block
/// type), so that [`load_gguf_quantized`] keeps it smaller than f32 weights would.
pub fn gguf_is_quantized(file: &GgufFile) -> bool {
    let known = file
        .get_str("general.architecture")
        .is_ok_and(|a| a == "gpt2" || GgufLayout::of(a).is_some());
    known
        && file
            .tensor("blk.0.ffn_down.weight")
            .is_some_and(|t| in_blocks(t.ty))
}

/// Whether `ty` is a block type (not a float one).
fn in_blocks(ty: GgmlType) -> bool {
    !matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
}

/// A GGUF model whose projections and token embedding stay in the file's quantized blocks (see
/// the module docs). Same model and outputs as [`load_gguf`](crate::load_gguf) up to the
/// kernels' 8-bit rounding of activations, in a fraction of the memory.
pub fn load_gguf_quantized<B: Backend>(
    path: impl AsRef<Path>,
    device: &B::Device,
) -> Result<LoadedModel<B>> {
    let path = path.as_ref();
    let file = Arc::new(GgufFile::open(path)?);
    let config = config_from_gguf(&file)?;
    let source = path.display().to_string();
    let reader = Reader {
        file: &file,
        bytes: Arc::clone(&file) as SharedBytes,
        source: &source,
    };
    let model = if config.architecture == "gpt2" {
        reader.gpt2::<B>(&config, device)?
    } else {
        // Lazily initialized: the random weights `init` describes are never made.
        let mut model = config.init::<B>(device)?;
        reader.fill(&mut model, &config, device)?;
        model
    };
    with_gguf_tokenizer(model, path, &file)
}

struct Reader<'a> {
    file: &'a GgufFile,
    bytes: SharedBytes,
    source: &'a str,
}

impl Reader<'_> {
    fn fill<B: Backend>(
        &self,
        model: &mut Transformer<B>,
        config: &ModelConfig,
        device: &B::Device,
    ) -> Result<()> {
        let (d, ff, v, hd) = (
            config.d_model,
            config.d_ff,
            config.vocab_size,
            config.head_dim(),
        );
        let (q_out, kv_out) = (config.n_heads * hd, config.n_kv_heads * hd);
        let (_, layout) = GgufLayout::of_file(self.file)?;
        self.embedding_and_head(model, v, d, device)?;
        self.norm(&mut model.norm_f, "output_norm.weight", d, device)?;
        for (i, block) in model.blocks.iter_mut().enumerate() {
            let name = |s: &str| format!("blk.{i}.{s}.weight");
            self.norm(&mut block.norm1, &name("attn_norm"), d, device)?;
            self.norm(&mut block.norm2, &name("ffn_norm"), d, device)?;
            let qkv = if layout.fused_qkv {
                self.linear(&[(&name("attn_qkv"), q_out + 2 * kv_out, d, None)])?
            } else {
                // Q and K rows reordered for half-split RoPE where llama.cpp permuted them.
                let rope = layout.permuted_qk.then_some(hd);
                self.linear(&[
                    (&name("attn_q"), q_out, d, rope),
                    (&name("attn_k"), kv_out, d, rope),
                    (&name("attn_v"), kv_out, d, None),
                ])?
            };
            let attn = &mut block.attn;
            attn.kv_f16 = true;
            let qkv_bias = attn.qkv.bias.take();
            attn.qkv = Projection::from_quantized(qkv, attn.qkv.weight.id, device);
            if let Some(bias) = qkv_bias {
                let mut values = Vec::with_capacity(q_out + 2 * kv_out);
                for (s, n) in [("attn_q", q_out), ("attn_k", kv_out), ("attn_v", kv_out)] {
                    values.extend(load(
                        self.file,
                        &format!("blk.{i}.{s}.bias"),
                        &[n],
                        self.source,
                    )?);
                }
                let tensor =
                    Tensor::from_data(TensorData::new(values, [q_out + 2 * kv_out]), device);
                attn.qkv.bias = Some(Param::initialized(bias.id, tensor.require_grad()));
            }
            let proj = self.linear(&[(&name("attn_output"), d, q_out, None)])?;
            attn.proj = Projection::from_quantized(proj, attn.proj.weight.id, device);
            let mlp = &mut block.mlp;
            let (gate_kernel, up) = if layout.fused_gate_up {
                // One `[2·ff, d]` tensor, gate rows first: two views of the same blocks.
                let both = self.matrix(&name("ffn_up"), 2 * ff, d, None)?;
                let [gate, up] = both
                    .split_rows([ff, ff])
                    .map_err(|e| ModelError::BadTensor {
                        name: name("ffn_up"),
                        reason: e.to_string(),
                    })?;
                (
                    Some(self.stack(vec![gate], &name("ffn_up"))?),
                    self.stack(vec![up], &name("ffn_up"))?,
                )
            } else {
                (None, self.linear(&[(&name("ffn_up"), ff, d, None)])?)
            };
            if let Some(gate) = &mut mlp.gate {
                let kernel = match gate_kernel {
                    Some(kernel) => kernel,
                    None => self.linear(&[(&name("ffn_gate"), ff, d, None)])?,
                };
                // Gate and up stacked as well: the same blocks, shared, not copied.
                let parts = [kernel.parts(), up.parts()].concat();
                mlp.gate_up = Some(Arc::new(QuantLinear::new(parts).map_err(|e| {
                    ModelError::BadTensor {
                        name: name("ffn_gate"),
                        reason: e.to_string(),
                    }
                })?));
                *gate = Projection::from_quantized(kernel, gate.weight.id, device);
            }
            mlp.up = Projection::from_quantized(up, mlp.up.weight.id, device);
            let down = self.linear(&[(&name("ffn_down"), d, ff, None)])?;
            mlp.down = Projection::from_quantized(down, mlp.down.weight.id, device);
        }
        Ok(())
    }

    /// A `gpt2` model: projections, the token embedding and an untied head from their blocks
    /// (those the file stores in a block type), positions, norms and biases in f32.
    fn gpt2<B: Backend>(&self, config: &ModelConfig, device: &B::Device) -> Result<Transformer<B>> {
        let (d, v) = (config.d_model, config.vocab_size);
        let blocks = |name: &str| self.file.tensor(name).is_some_and(|t| in_blocks(t.ty));
        let matrices: Vec<_> = gpt2_tensors(config)
            .into_iter()
            .filter(|t| {
                (t.linear.is_some() || t.theirs == "token_embd.weight") && blocks(&t.theirs)
            })
            .collect();
        let theirs: HashSet<&str> = matrices.iter().map(|t| t.theirs.as_str()).collect();
        let ours: HashSet<&str> = matrices.iter().map(|t| t.ours.as_str()).collect();
        let tensors = tensors_from_gpt2_except(self.file, config, self.source, &|name| {
            theirs.contains(name)
        })?;
        let mut model = config.init::<B>(device)?;
        apply_except(&mut model, tensors, self.source, &|path| {
            ours.contains(path)
        })?;
        if theirs.contains("token_embd.weight") {
            let embedding = self.embedding(&mut model, v, d, device)?;
            if model.lm_head.is_none() {
                model.tied_head_kernel = Some(embedding);
            }
        }
        if let Some(head) = &mut model.lm_head
            && theirs.contains("output.weight")
        {
            let kernel = self.linear(&[("output.weight", v, d, None)])?;
            *head = Projection::from_quantized(kernel, head.weight.id, device);
        }
        for (i, block) in model.blocks.iter_mut().enumerate() {
            let projections = [
                (&mut block.attn.qkv, "attn_qkv"),
                (&mut block.attn.proj, "attn_output"),
                (&mut block.mlp.up, "ffn_up"),
                (&mut block.mlp.down, "ffn_down"),
            ];
            for (projection, name) in projections {
                let name = format!("blk.{i}.{name}.weight");
                if !theirs.contains(name.as_str()) {
                    continue;
                }
                let (inp, out) = (projection.in_features(), projection.out_features());
                let kernel = self.linear(&[(&name, out, inp, None)])?;
                let bias = projection.bias.take();
                *projection = Projection::from_quantized(kernel, projection.weight.id, device);
                projection.bias = bias;
            }
        }
        Ok(model)
    }

    /// The token embedding from its blocks (`[v, d]`), and the output head: its own blocks, or
    /// the embedding's when tied.
    fn embedding_and_head<B: Backend>(
        &self,
        model: &mut Transformer<B>,
        v: usize,
        d: usize,
        device: &B::Device,
    ) -> Result<()> {
        let embedding = self.embedding(model, v, d, device)?;
        match &mut model.lm_head {
            Some(head) => {
                let kernel = self.linear(&[("output.weight", v, d, None)])?;
                *head = Projection::from_quantized(kernel, head.weight.id, device);
            }
            None => model.tied_head_kernel = Some(embedding),
        }
        Ok(())
    }

    /// The token embedding (`[v, d]`) from its blocks: lookups read them, and the f32 table is
    /// made only if a path asks for it.
    fn embedding<B: Backend>(
        &self,
        model: &mut Transformer<B>,
        v: usize,
        d: usize,
        device: &B::Device,
    ) -> Result<Arc<QuantLinear>> {
        let embedding = Arc::new(self.linear(&[("token_embd.weight", v, d, None)])?);
        let table = Arc::clone(&embedding);
        model.tok_emb.weight = Param::uninitialized(
            model.tok_emb.weight.id,
            move |device: &B::Device, require_grad| {
                let w = Tensor::from_data(TensorData::new(table.dequantize(), [v, d]), device);
                if require_grad { w.require_grad() } else { w }
            },
            device.clone(),
            true,
            Shape::new([v, d]),
        );
        model.tok_emb_kernel = Some(embedding.clone());
        Ok(embedding)
    }

    /// Norm weight `name` (`[d]`, f32) into `norm`.
    fn norm<B: Backend>(
        &self,
        norm: &mut Norm<B>,
        name: &str,
        d: usize,
        device: &B::Device,
    ) -> Result<()> {
        let values = load(self.file, name, &[d], self.source)?;
        let tensor = Tensor::from_data(TensorData::new(values, [d]), device);
        norm.weight = Param::initialized(norm.weight.id, tensor.require_grad());
        Ok(())
    }

    /// Tensors `(name, rows, cols, rope head_dim)` stacked along their outputs; Q and K (with a
    /// head size) get their rows reordered for half-split RoPE, as [`load_gguf`](crate::load_gguf)
    /// does.
    fn linear(&self, parts: &[(&str, usize, usize, Option<usize>)]) -> Result<QuantLinear> {
        let matrices = parts
            .iter()
            .map(|&(name, rows, cols, head_dim)| self.matrix(name, rows, cols, head_dim))
            .collect::<Result<Vec<_>>>()?;
        self.stack(matrices, parts[0].0)
    }

    /// `matrices` stacked along their outputs, errors naming tensor `name`.
    fn stack(&self, matrices: Vec<QuantMatrix>, name: &str) -> Result<QuantLinear> {
        QuantLinear::new(matrices).map_err(|e| ModelError::BadTensor {
            name: name.to_owned(),
            reason: e.to_string(),
        })
    }

    fn matrix(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        head_dim: Option<usize>,
    ) -> Result<QuantMatrix> {
        let info = shaped(self.file, name, &[rows, cols], self.source)?;
        let bad = |reason: String| ModelError::BadTensor {
            name: name.to_owned(),
            reason,
        };
        let matrix = if supports(info.ty) && cols.is_multiple_of(info.ty.block_size()) {
            match head_dim {
                None => {
                    QuantMatrix::new(info.ty, rows, cols, Arc::clone(&self.bytes), offset(info))
                }
                Some(hd) => {
                    let bytes = self.file.tensor_data(info).to_vec();
                    let row_bytes = bytes.len() / rows.max(1);
                    let bytes = interleaved_to_half_split(bytes, hd, row_bytes);
                    QuantMatrix::from_vec(info.ty, rows, cols, bytes)
                }
            }
        } else {
            // Types the kernels do not take (Q5_1, K-quants but Q4_K, floats) become Q8_0 once.
            let mut values = dequantize_to_vec(info.ty, self.file.tensor_data(info), rows * cols)
                .map_err(|source| ModelError::Dequant {
                tensor: name.to_owned(),
                source,
            })?;
            if let Some(hd) = head_dim {
                values = interleaved_to_half_split(values, hd, cols);
            }
            let bytes = quantize(GgmlType::Q8_0, &values).map_err(|e| bad(e.to_string()))?;
            QuantMatrix::from_vec(GgmlType::Q8_0, rows, cols, bytes)
        };
        matrix.map_err(|e| bad(e.to_string()))
    }
}

/// Where `info`'s bytes start in the file.
fn offset(info: &TensorInfo) -> usize {
    info.offset as usize
}
