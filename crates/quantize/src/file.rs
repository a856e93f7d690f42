//! Quantizing a GGUF model file into another: every tensor decoded to f32 and encoded in the type
//! the [`Scheme`] picks for it (round to nearest with llama.cpp's reference quantizers, or GPTQ
//! where calibration statistics are given), every metadata pair kept (architecture, tokenizer,
//! chat template) apart from the file type, which is updated.

use std::collections::HashMap;

use kiln_gguf::blocks::{dequantize_to_vec, quantize};
use kiln_gguf::{GgmlType, GgufFile, GgufValue, GgufWriter, TensorInfo};

use crate::error::QuantizeError;
use crate::gptq::{self, GptqSettings, Hessian};
use crate::scheme::{Role, Scheme};

/// How to quantize a file.
#[derive(Debug, Default)]
pub struct FileOptions {
    /// Calibration statistics (the inputs' second moments) by GGUF tensor name; the tensors that
    /// have one and whose type GPTQ supports are quantized with GPTQ, the rest round to nearest.
    pub hessians: HashMap<String, Hessian>,
    /// GPTQ's settings.
    pub gptq: GptqSettings,
}

/// What happened to one tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorReport {
    /// GGUF name.
    pub name: String,
    /// Its type in the source.
    pub from: GgmlType,
    /// Its type in the output.
    pub to: GgmlType,
    /// Elements.
    pub elements: u64,
    /// Bytes in the output.
    pub bytes: u64,
    /// Whether GPTQ chose its values (else round to nearest, or a plain copy).
    pub gptq: bool,
}

/// What [`quantize_file`] wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileReport {
    /// Every tensor, in file order.
    pub tensors: Vec<TensorReport>,
}

impl FileReport {
    /// Tensor bytes of the output.
    pub fn bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.bytes).sum()
    }

    /// Average bits per weight over every tensor.
    pub fn bits_per_weight(&self) -> f64 {
        let elements: u64 = self.tensors.iter().map(|t| t.elements).sum();
        8.0 * self.bytes() as f64 / elements.max(1) as f64
    }

    /// How many tensors went to each type, e.g. `"q4_K 120, q6_K 31, f32 61"`.
    pub fn type_counts(&self) -> String {
        let mut counts: Vec<(GgmlType, usize)> = Vec::new();
        for t in &self.tensors {
            match counts.iter_mut().find(|(ty, _)| *ty == t.to) {
                Some((_, n)) => *n += 1,
                None => counts.push((t.to, 1)),
            }
        }
        counts.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
        counts
            .iter()
            .map(|(ty, n)| format!("{} {n}", ty.name()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Quantizes every tensor of `source` by `scheme` into a writer holding the new file (write it
/// with [`GgufWriter::write`], which is atomic). `progress(done, total, name)` is called before
/// each tensor. Nothing is written here, so a failure leaves no partial file.
pub fn quantize_file(
    source: &GgufFile,
    scheme: Scheme,
    options: &FileOptions,
    mut progress: impl FnMut(usize, usize, &str),
) -> Result<(GgufWriter, FileReport), QuantizeError> {
    let layers = source
        .tensors
        .iter()
        .filter(|t| matches!(Role::of(&t.name), Role::AttnV(_) | Role::FfnDown(_)))
        .map(|t| match Role::of(&t.name) {
            Role::AttnV(i) | Role::FfnDown(i) => i + 1,
            _ => 0,
        })
        .max()
        .unwrap_or(0);
    let tied = source.tensor("output.weight").is_none();
    let mut writer = GgufWriter::new();
    for (key, value) in &source.metadata {
        if key != "general.file_type" && key != "general.quantization_version" {
            writer.add_metadata(key.clone(), value.clone())?;
        }
    }
    writer.add_metadata("general.file_type", GgufValue::U32(scheme.file_type()))?;
    writer.add_metadata("general.quantization_version", GgufValue::U32(2))?;

    let mut report = FileReport::default();
    let total = source.tensors.len();
    for (i, info) in source.tensors.iter().enumerate() {
        progress(i, total, &info.name);
        let to = scheme.tensor_type(&info.name, &info.dims, info.ty, layers, tied);
        let (bytes, used_gptq) = encode_tensor(source, info, to, options)?;
        report.tensors.push(TensorReport {
            name: info.name.clone(),
            from: info.ty,
            to,
            elements: info.n_elements(),
            bytes: bytes.len() as u64,
            gptq: used_gptq,
        });
        writer.add_tensor(info.name.clone(), &info.dims, to, bytes)?;
    }
    progress(total, total, "");
    Ok((writer, report))
}

/// `info`'s data in type `to`, and whether GPTQ made it.
fn encode_tensor(
    source: &GgufFile,
    info: &TensorInfo,
    to: GgmlType,
    options: &FileOptions,
) -> Result<(Vec<u8>, bool), QuantizeError> {
    let data = source.tensor_data(info);
    if to == info.ty {
        return Ok((data.to_vec(), false));
    }
    let block = |source| QuantizeError::Block {
        name: info.name.clone(),
        source,
    };
    let elements = usize::try_from(info.n_elements())
        .map_err(|_| QuantizeError::Invalid(format!("tensor `{}` is too large", info.name)))?;
    let values = dequantize_to_vec(info.ty, data, elements).map_err(block)?;
    if values.iter().any(|v| !v.is_finite()) {
        return Err(QuantizeError::NonFinite(info.name.clone()));
    }
    let cols = info.dims.first().copied().unwrap_or(1) as usize;
    if let Some(hessian) = options.hessians.get(&info.name)
        && gptq::GPTQ_TYPES.contains(&to)
        && hessian.dim() == cols
    {
        let rows = elements / cols.max(1);
        let bytes =
            gptq::quantize(to, &values, rows, cols, hessian, &options.gptq).map_err(|source| {
                QuantizeError::Gptq {
                    name: info.name.clone(),
                    source,
                }
            })?;
        return Ok((bytes, true));
    }
    Ok((quantize(to, &values).map_err(block)?, false))
}
