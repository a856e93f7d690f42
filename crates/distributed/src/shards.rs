//! ZeRO's optimizer state in checkpoints: each rank writes the AdamW moments of the rows it owns to
//! `zero-rank-R-of-N.safetensors` (tensors `<parameter path>.exp_avg` / `.exp_avg_sq`, the row
//! ranges and the step count in the metadata), beside the consolidated f32 model that rank 0
//! writes. Loading reads every rank's file and copies the rows this rank now owns, whatever the
//! world size that wrote them: a run saved by 2 ranks resumes on 1, 2 or 4 (as torchtitan's
//! distributed checkpoints reshard). The master weights come back from the consolidated model.
//!
//! With ranks on several machines the checkpoint directory must be on a shared filesystem.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

use crate::error::{DistError, Result};
use crate::partition::Partition;
use crate::zero::Shard;

/// A parameter's moments being assembled from the shard files, and the rows found so far.
struct Assembling {
    moment1: Vec<f32>,
    moment2: Vec<f32>,
    covered: usize,
}

/// The format tag in each file's metadata.
const FORMAT: &str = "kiln-zero-1";

/// What a shard file says about itself.
#[derive(Serialize, Deserialize)]
struct ShardMeta {
    format: String,
    rank: usize,
    world_size: usize,
    /// AdamW steps taken.
    time: i32,
    /// Rows of each parameter (by path) in this file.
    rows: HashMap<String, [usize; 2]>,
}

/// The file rank `rank` of `world` writes in a checkpoint directory.
pub fn shard_file(dir: &Path, rank: usize, world: usize) -> PathBuf {
    dir.join(format!("zero-rank-{rank:05}-of-{world:05}.safetensors"))
}

fn err(path: &Path, reason: impl Into<String>) -> DistError {
    DistError::Checkpoint {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn to_f32<B: Backend>(t: &Tensor<B, 1>) -> Vec<f32> {
    t.to_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .unwrap_or_default()
}

/// Writes this rank's shard of the optimizer state into `dir`.
pub(crate) fn save<B: Backend>(
    dir: &Path,
    partition: &Partition,
    rank: usize,
    time: i32,
    shards: &[Option<Shard<B>>],
) -> Result<()> {
    let world = partition.world_size();
    let path = shard_file(dir, rank, world);
    let mut rows = HashMap::new();
    let mut buffers: Vec<(String, Vec<u8>, usize)> = Vec::new();
    for (layout, shard) in partition.params().iter().zip(shards) {
        let Some(shard) = shard else { continue };
        rows.insert(layout.path.clone(), [shard.rows.start, shard.rows.end]);
        for (suffix, moment) in [("exp_avg", &shard.moment1), ("exp_avg_sq", &shard.moment2)] {
            if let Some(m) = moment {
                let values = to_f32(m);
                let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                buffers.push((format!("{}.{suffix}", layout.path), bytes, values.len()));
            }
        }
    }
    let views = buffers
        .iter()
        .map(|(name, bytes, len)| {
            TensorView::new(Dtype::F32, vec![*len], bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| err(&path, e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = ShardMeta {
        format: FORMAT.into(),
        rank,
        world_size: world,
        time,
        rows,
    };
    let meta = serde_json::to_string(&meta).map_err(|e| err(&path, e.to_string()))?;
    let bytes = safetensors::serialize(views, Some(HashMap::from([("zero".to_owned(), meta)])))
        .map_err(|e| err(&path, e.to_string()))?;
    kiln_gguf::atomic::write(&path, &bytes).map_err(|e| err(&path, e.to_string()))
}

/// Copies the rows of `from` (a file's rows `file_rows`) that overlap `mine` into `into`.
fn copy_overlap(
    into: &mut [f32],
    mine: &Range<usize>,
    from: &[f32],
    file_rows: &Range<usize>,
    row_len: usize,
) -> usize {
    let start = mine.start.max(file_rows.start);
    let end = mine.end.min(file_rows.end);
    if start >= end {
        return 0;
    }
    let dst = (start - mine.start) * row_len..(end - mine.start) * row_len;
    let src = (start - file_rows.start) * row_len..(end - file_rows.start) * row_len;
    into[dst].copy_from_slice(&from[src]);
    end - start
}

/// Fills this rank's moments from every shard file in `dir`; returns the step count.
pub(crate) fn load<B: Backend>(
    dir: &Path,
    partition: &Partition,
    rank: usize,
    shards: &mut [Option<Shard<B>>],
    device: &B::Device,
) -> Result<i32> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| err(dir, e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("zero-rank-") && n.ends_with(".safetensors"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(err(
            dir,
            "no ZeRO optimizer shards (zero-rank-*.safetensors): the checkpoint was written with \
             zero_stage = 0; resume it with zero_stage = 0",
        ));
    }
    let index: HashMap<&str, usize> = partition
        .params()
        .iter()
        .enumerate()
        .map(|(i, p)| (p.path.as_str(), i))
        .collect();
    // Per parameter: (moment 1, moment 2, rows covered).
    let mut filled: Vec<Option<Assembling>> = shards
        .iter()
        .zip(partition.params())
        .map(|(s, p)| {
            s.as_ref().map(|s| {
                let n = s.rows.len() * p.row_len();
                Assembling {
                    moment1: vec![0.0; n],
                    moment2: vec![0.0; n],
                    covered: 0,
                }
            })
        })
        .collect();
    let mut time = None;
    let mut world_sizes = Vec::new();
    for path in &files {
        let bytes = std::fs::read(path).map_err(|e| err(path, e.to_string()))?;
        let (_, header) =
            SafeTensors::read_metadata(&bytes).map_err(|e| err(path, e.to_string()))?;
        let meta: ShardMeta = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("zero"))
            .ok_or_else(|| err(path, "no `zero` metadata"))
            .and_then(|m| serde_json::from_str(m).map_err(|e| err(path, e.to_string())))?;
        if meta.format != FORMAT {
            return Err(err(
                path,
                format!("format {}, expected {FORMAT}", meta.format),
            ));
        }
        if time.is_some_and(|t| t != meta.time) {
            return Err(err(path, "shards of different steps in one checkpoint"));
        }
        time = Some(meta.time);
        world_sizes.push(meta.world_size);
        let tensors = SafeTensors::deserialize(&bytes).map_err(|e| err(path, e.to_string()))?;
        for (name, [start, end]) in &meta.rows {
            let Some(&i) = index.get(name.as_str()) else {
                return Err(err(path, format!("parameter {name} is not in this model")));
            };
            let (Some(target), Some(shard)) = (filled[i].as_mut(), &shards[i]) else {
                continue;
            };
            let row_len = partition.params()[i].row_len();
            let file_rows = *start..*end;
            let mut covered = 0;
            for (k, suffix) in ["exp_avg", "exp_avg_sq"].iter().enumerate() {
                let Ok(view) = tensors.tensor(&format!("{name}.{suffix}")) else {
                    continue;
                };
                if view.dtype() != Dtype::F32 || view.data().len() != file_rows.len() * row_len * 4
                {
                    return Err(err(
                        path,
                        format!("{name}.{suffix}: not {} f32 rows", file_rows.len()),
                    ));
                }
                let values: Vec<f32> = view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                let into = if k == 0 {
                    &mut target.moment1
                } else {
                    &mut target.moment2
                };
                covered = copy_overlap(into, &shard.rows, &values, &file_rows, row_len);
            }
            target.covered += covered;
        }
    }
    let time = time.unwrap_or(0);
    let world = world_sizes.first().copied().unwrap_or(0);
    if world_sizes.len() != world || world_sizes.iter().any(|&w| w != world) {
        return Err(err(
            dir,
            format!("{} shard files for a world of {world}", world_sizes.len()),
        ));
    }
    for (i, (shard, f)) in shards.iter_mut().zip(filled).enumerate() {
        let (
            Some(shard),
            Some(Assembling {
                moment1: m1,
                moment2: m2,
                covered,
            }),
        ) = (shard.as_mut(), f)
        else {
            continue;
        };
        if time == 0 {
            shard.moment1 = None;
            shard.moment2 = None;
            continue;
        }
        if covered != shard.rows.len() {
            return Err(err(
                dir,
                format!(
                    "rows {:?} of {} missing from the shards (rank {rank})",
                    shard.rows,
                    partition.params()[i].path
                ),
            ));
        }
        let n = m1.len();
        shard.moment1 = Some(Tensor::from_data(TensorData::new(m1, [n]), device));
        shard.moment2 = Some(Tensor::from_data(TensorData::new(m2, [n]), device));
    }
    Ok(time)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_rows_are_copied_to_their_place() {
        let mut into = vec![0.0; 6];
        // This rank owns rows 2..5 (row length 2); a file holds rows 0..4.
        let from: Vec<f32> = (0..8).map(|v| v as f32).collect();
        assert_eq!(copy_overlap(&mut into, &(2..5), &from, &(0..4), 2), 2);
        assert_eq!(into, vec![4.0, 5.0, 6.0, 7.0, 0.0, 0.0]);
        assert_eq!(copy_overlap(&mut into, &(2..5), &from, &(5..9), 2), 0);
    }
}
