//! Named tensors from the files checkpoints come in: one or several safetensors files (with
//! Hugging Face's `model.safetensors.index.json` naming each tensor's shard) and PyTorch state
//! dicts (`pytorch_model.bin`, its shards with `pytorch_model.bin.index.json`, the `model` of
//! nanoGPT's `ckpt.pt`). Loaders ask for a tensor by name and shape and get f32 values.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kiln_gguf::torch::{self, DType, Value};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{ModelError, Result};

/// Where one tensor is.
enum Located {
    /// In the safetensors file of this index in [`TensorFiles::safetensors`].
    Safetensors(usize),
    /// A tensor of a PyTorch state dict (a view of its file's bytes).
    Torch(torch::Tensor),
}

/// Every tensor of a checkpoint, by name, read on request.
pub(crate) struct TensorFiles {
    tensors: HashMap<String, Located>,
    safetensors: Vec<(PathBuf, Mmap)>,
    /// The file or directory, for error messages.
    origin: String,
}

/// Hugging Face's sharded-checkpoint index: which file holds each tensor.
const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";
const TORCH_INDEX: &str = "pytorch_model.bin.index.json";

impl TensorFiles {
    /// The weights of a Hugging Face model directory: `model.safetensors`, the shards its
    /// `model.safetensors.index.json` lists, `pytorch_model.bin`, or the shards
    /// `pytorch_model.bin.index.json` lists (looked for in that order).
    pub(crate) fn open_hf_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        if single.exists() {
            return Self::open_safetensors(&[single], dir);
        }
        if dir.join(SAFETENSORS_INDEX).exists() {
            let shards = shards_of(&dir.join(SAFETENSORS_INDEX))?;
            return Self::open_safetensors(&shards, dir);
        }
        let bin = dir.join("pytorch_model.bin");
        if bin.exists() {
            return Self::open_torch(&[bin], dir);
        }
        if dir.join(TORCH_INDEX).exists() {
            let shards = shards_of(&dir.join(TORCH_INDEX))?;
            return Self::open_torch(&shards, dir);
        }
        Err(ModelError::io(
            dir.join("model.safetensors"),
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "no weights: none of model.safetensors, {SAFETENSORS_INDEX}, \
                     pytorch_model.bin, {TORCH_INDEX}"
                ),
            ),
        ))
    }

    /// The tensors of one or several safetensors files (memory-mapped).
    pub(crate) fn open_safetensors(paths: &[PathBuf], origin: &Path) -> Result<Self> {
        let mut files = Self::empty(origin);
        for path in paths {
            let map = std::fs::File::open(path).and_then(|f| {
                // SAFETY: read-only mapping of a checkpoint nobody writes while it loads (the
                // same contract as `GgufFile::open`).
                unsafe { Mmap::map(&f) }
            });
            let map = map.map_err(|e| ModelError::io(path, e))?;
            let names: Vec<String> = SafeTensors::deserialize(&map)
                .map_err(|e| st_error(path, e))?
                .names()
                .into_iter()
                .map(str::to_owned)
                .collect();
            let index = files.safetensors.len();
            files.safetensors.push((path.clone(), map));
            for name in names {
                files.tensors.insert(name, Located::Safetensors(index));
            }
        }
        Ok(files)
    }

    /// The tensors of one or several PyTorch state-dict files (`torch.save` of a dict of tensors).
    pub(crate) fn open_torch(paths: &[PathBuf], origin: &Path) -> Result<Self> {
        let mut files = Self::empty(origin);
        for path in paths {
            let value = torch::load_mmap(path).map_err(|e| torch_error(path, e))?;
            files.add_state_dict(&value, "", path)?;
        }
        Ok(files)
    }

    /// The tensors of an already loaded state dict, with `strip` removed from the front of each
    /// name that has it (nanoGPT's `_orig_mod.` for a `torch.compile`d model).
    pub(crate) fn from_state_dict(state: &Value, strip: &str, path: &Path) -> Result<Self> {
        let mut files = Self::empty(path);
        files.add_state_dict(state, strip, path)?;
        Ok(files)
    }

    fn empty(origin: &Path) -> Self {
        Self {
            tensors: HashMap::new(),
            safetensors: Vec::new(),
            origin: origin.display().to_string(),
        }
    }

    fn add_state_dict(&mut self, state: &Value, strip: &str, path: &Path) -> Result<()> {
        let dict = state.as_dict().ok_or_else(|| ModelError::BadTensor {
            name: path.display().to_string(),
            reason: "the file does not hold a state dict (a dict of tensors)".into(),
        })?;
        for (key, value) in dict.iter() {
            if let Value::Tensor(t) = value {
                let name = key.to_string();
                let name = name.strip_prefix(strip).unwrap_or(&name).to_owned();
                self.tensors.insert(name, Located::Torch(t.clone()));
            }
        }
        Ok(())
    }

    /// Whether a tensor of this name exists.
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor `name` as f32 in row-major order, checked to have `shape`.
    pub(crate) fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let located = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_owned(),
                file: self.origin.clone(),
            })?;
        let mismatch = |found: &[usize]| ModelError::ShapeMismatch {
            name: name.to_owned(),
            expected: shape.to_vec(),
            found: found.to_vec(),
        };
        let bad = |reason: String| ModelError::BadTensor {
            name: name.to_owned(),
            reason,
        };
        match located {
            Located::Torch(t) => {
                if t.shape() != shape {
                    return Err(mismatch(t.shape()));
                }
                match t.dtype() {
                    DType::F32 | DType::F16 | DType::BF16 | DType::F64 => Ok(t.to_f32_vec()),
                    other => Err(bad(format!(
                        "unsupported dtype {other} (F32, F16, BF16, F64 are)"
                    ))),
                }
            }
            Located::Safetensors(i) => {
                let (path, map) = &self.safetensors[*i];
                let st = SafeTensors::deserialize(map).map_err(|e| st_error(path, e))?;
                let view = st.tensor(name).map_err(|e| st_error(path, e))?;
                if view.shape() != shape {
                    return Err(mismatch(view.shape()));
                }
                let bytes = view.data();
                match view.dtype() {
                    Dtype::F32 => Ok(bytes
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect()),
                    Dtype::F16 => Ok(bytes
                        .chunks_exact(2)
                        .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                        .collect()),
                    Dtype::BF16 => Ok(bytes
                        .chunks_exact(2)
                        .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                        .collect()),
                    other => Err(bad(format!(
                        "unsupported dtype {other:?} (F32, F16, BF16 are)"
                    ))),
                }
            }
        }
    }
}

fn st_error(path: &Path, reason: impl ToString) -> ModelError {
    ModelError::Safetensors {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// A PyTorch file that could not be read, as a model error naming it.
pub(crate) fn torch_error(path: &Path, e: torch::TorchError) -> ModelError {
    ModelError::Torch {
        path: path.to_owned(),
        source: e,
    }
}

/// The shard files a Hugging Face index names (`weight_map`: tensor → file), in first-use order.
fn shards_of(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| ModelError::io(index, e))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Json {
        path: index.to_owned(),
        source: e,
    })?;
    let map = json
        .get("weight_map")
        .and_then(serde_json::Value::as_object)
        .ok_or_else(|| {
            ModelError::InvalidConfig(format!("{}: no `weight_map` object", index.display()))
        })?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut shards: Vec<PathBuf> = Vec::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            ModelError::InvalidConfig(format!(
                "{}: the file of {tensor:?} is not a string",
                index.display()
            ))
        })?;
        // A shard is a plain file name beside the index; anything else would read outside it.
        if file.is_empty() || file.contains(['/', '\\']) || file.starts_with('.') {
            return Err(ModelError::InvalidConfig(format!(
                "{}: shard name {file:?} is not a file beside the index",
                index.display()
            )));
        }
        let path = dir.join(file);
        if !shards.contains(&path) {
            shards.push(path);
        }
    }
    Ok(shards)
}
