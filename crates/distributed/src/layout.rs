//! [`ParallelLayout`]: how a run's ranks split into data-, tensor- and pipeline-parallel groups,
//! and the checks that a model and a micro-batch count fit the split.
//!
//! Ranks are numbered as in Megatron-LM: tensor-parallel rank fastest, then data-parallel, then
//! pipeline stage, `rank = (stage · data + replica) · tensor + shard`. The ranks of one
//! tensor-parallel group are consecutive, so with `--nproc` ranks per node a group that fits on a
//! node stays on it (tensor parallelism sends the most bytes); the stages of one pipeline are the
//! farthest apart (they send the fewest).

use kiln_transformer::ModelConfig;

use crate::error::{DistError, Result};

/// A rank's place in the layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RankCoords {
    /// Replica: which share of each batch the rank reads.
    pub data: usize,
    /// Which shard of every layer's heads and hidden units it holds.
    pub tensor: usize,
    /// Which pipeline stage it runs.
    pub stage: usize,
}

/// The sizes of the three kinds of groups; their product is the world size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParallelLayout {
    /// Model replicas (data parallel).
    pub data: usize,
    /// Ranks that split each layer (tensor parallel, `T`).
    pub tensor: usize,
    /// Pipeline stages (`P`).
    pub pipeline: usize,
}

impl ParallelLayout {
    /// The layout of `world` ranks with `tensor`-way tensor and `pipeline`-way pipeline
    /// parallelism; the rest is data parallel.
    pub fn new(world: usize, tensor: usize, pipeline: usize) -> Result<Self> {
        if tensor == 0 || pipeline == 0 || world == 0 || !world.is_multiple_of(tensor * pipeline) {
            return Err(DistError::Config(format!(
                "{world} ranks do not split into tensor_parallel = {tensor} × pipeline_parallel = \
                 {pipeline} × a whole number of data-parallel replicas"
            )));
        }
        Ok(Self {
            data: world / (tensor * pipeline),
            tensor,
            pipeline,
        })
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.data * self.tensor * self.pipeline
    }

    /// Where `rank` sits.
    pub fn coords(&self, rank: usize) -> RankCoords {
        RankCoords {
            tensor: rank % self.tensor,
            data: (rank / self.tensor) % self.data,
            stage: rank / (self.tensor * self.data),
        }
    }

    /// The rank at `coords`.
    pub fn rank(&self, coords: RankCoords) -> usize {
        (coords.stage * self.data + coords.data) * self.tensor + coords.tensor
    }

    /// The ranks that hold the other shards of `rank`'s layers, in shard order (`rank` included).
    pub fn tensor_group(&self, rank: usize) -> Vec<usize> {
        let c = self.coords(rank);
        (0..self.tensor)
            .map(|tensor| self.rank(RankCoords { tensor, ..c }))
            .collect()
    }

    /// The ranks that hold the same parameters as `rank` (its replicas), in replica order.
    pub fn data_group(&self, rank: usize) -> Vec<usize> {
        let c = self.coords(rank);
        (0..self.data)
            .map(|data| self.rank(RankCoords { data, ..c }))
            .collect()
    }

    /// The stages of `rank`'s pipeline, first to last.
    pub fn pipeline_group(&self, rank: usize) -> Vec<usize> {
        let c = self.coords(rank);
        (0..self.pipeline)
            .map(|stage| self.rank(RankCoords { stage, ..c }))
            .collect()
    }

    /// Every rank of `rank`'s model replica (all its shards and stages): the group over which a
    /// replica's loss and gradient norm add up.
    pub fn model_group(&self, rank: usize) -> Vec<usize> {
        let data = self.coords(rank).data;
        (0..self.world_size())
            .filter(|&r| self.coords(r).data == data)
            .collect()
    }

    /// Checks that `config` splits `tensor` ways and `pipeline` ways and that `micro_batches`
    /// keeps the pipeline busy; every error names the numbers that do not fit.
    pub fn check(&self, config: &ModelConfig, micro_batches: usize) -> Result<()> {
        let t = self.tensor;
        let bad = |msg: String| Err(DistError::Config(msg));
        if !config.n_heads.is_multiple_of(t) {
            return bad(format!(
                "tensor_parallel = {t} does not divide the model's {} attention heads",
                config.n_heads
            ));
        }
        if !config.n_kv_heads.is_multiple_of(t) {
            return bad(format!(
                "tensor_parallel = {t} does not divide the model's {} key/value heads \
                 (grouped-query attention splits whole KV heads)",
                config.n_kv_heads
            ));
        }
        if !config.d_ff.is_multiple_of(t) {
            return bad(format!(
                "tensor_parallel = {t} does not divide the MLP width d_ff = {}",
                config.d_ff
            ));
        }
        if self.pipeline > config.n_layers {
            return bad(format!(
                "pipeline_parallel = {} is more stages than the model's {} layers",
                self.pipeline, config.n_layers
            ));
        }
        if self.pipeline > 1 && micro_batches < self.pipeline {
            return bad(format!(
                "micro_batches = {micro_batches} is fewer than the {} pipeline stages: \
                 some stages would never run at the same time (use at least P, ideally ≥ 4·P)",
                self.pipeline
            ));
        }
        if micro_batches == 0 {
            return bad("micro_batches must be at least 1".into());
        }
        Ok(())
    }
}

/// Splits `layer_costs` (one per layer, e.g. parameter counts) into `stages` runs of consecutive
/// layers, at least one layer each, minimizing the largest stage's cost; `first_extra` and
/// `last_extra` are added to the first and last stage (embeddings, output head). Returns the
/// number of layers per stage.
pub fn balance_stages(
    layer_costs: &[u64],
    first_extra: u64,
    last_extra: u64,
    stages: usize,
) -> Result<Vec<usize>> {
    let n = layer_costs.len();
    if stages == 0 || stages > n {
        return Err(DistError::Config(format!(
            "{stages} pipeline stages cannot split {n} layers"
        )));
    }
    // best[s][i]: smallest possible largest cost when layers i.. form stages s.. (stage s first).
    let cost = |s: usize, range: std::ops::Range<usize>| -> u64 {
        let mut c: u64 = layer_costs[range].iter().sum();
        if s == 0 {
            c += first_extra;
        }
        if s == stages - 1 {
            c += last_extra;
        }
        c
    };
    let mut best = vec![vec![u64::MAX; n + 1]; stages + 1];
    let mut cut = vec![vec![0usize; n + 1]; stages + 1];
    best[stages][n] = 0;
    for s in (0..stages).rev() {
        // Stage s starts at layer i and leaves at least one layer for each later stage.
        for i in s..=n - (stages - s) {
            for end in i + 1..=n - (stages - s - 1) {
                let rest = best[s + 1][end];
                if rest == u64::MAX {
                    continue;
                }
                let worst = cost(s, i..end).max(rest);
                if worst < best[s][i] {
                    best[s][i] = worst;
                    cut[s][i] = end;
                }
            }
        }
    }
    let mut sizes = Vec::with_capacity(stages);
    let mut i = 0;
    for row in cut.iter().take(stages) {
        let end = row[i];
        sizes.push(end - i);
        i = end;
    }
    Ok(sizes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_and_groups_follow_megatron_order() {
        let layout = ParallelLayout::new(8, 2, 2).unwrap();
        assert_eq!(layout.data, 2);
        for rank in 0..8 {
            assert_eq!(layout.rank(layout.coords(rank)), rank);
        }
        assert_eq!(layout.tensor_group(5), vec![4, 5]);
        assert_eq!(layout.data_group(5), vec![5, 7]);
        assert_eq!(layout.pipeline_group(5), vec![1, 5]);
        assert_eq!(layout.model_group(5), vec![0, 1, 4, 5]);
        assert!(ParallelLayout::new(6, 4, 1).is_err());
    }

    #[test]
    fn balanced_stages_minimize_the_largest_stage() {
        assert_eq!(balance_stages(&[1; 4], 0, 0, 2).unwrap(), vec![2, 2]);
        // A heavy embedding pushes layers to the later stages.
        assert_eq!(balance_stages(&[1; 6], 4, 0, 2).unwrap(), vec![1, 5]);
        assert_eq!(
            balance_stages(&[5, 1, 1, 1, 1, 1], 0, 0, 2).unwrap(),
            vec![1, 5]
        );
        assert_eq!(balance_stages(&[1; 3], 0, 0, 3).unwrap(), vec![1, 1, 1]);
        assert!(balance_stages(&[1; 3], 0, 0, 4).is_err());
    }

    #[test]
    fn configs_that_do_not_split_are_refused_before_training() {
        let config = ModelConfig {
            n_layers: 2,
            n_heads: 6,
            n_kv_heads: 2,
            d_model: 48,
            d_ff: 96,
            ..ModelConfig::gpt2_124m()
        };
        let err = |t, p, m| {
            ParallelLayout::new(t * p, t, p)
                .unwrap()
                .check(&config, m)
                .unwrap_err()
                .to_string()
        };
        assert!(
            err(4, 1, 1).contains("6 attention heads"),
            "{}",
            err(4, 1, 1)
        );
        assert!(err(3, 1, 1).contains("2 key/value heads"));
        assert!(err(1, 3, 4).contains("2 layers"));
        assert!(err(1, 2, 1).contains("micro_batches = 1"));
        ParallelLayout::new(4, 2, 2)
            .unwrap()
            .check(&config, 2)
            .unwrap();
    }
}
