//! Pipeline schedules: the order in which one stage runs the forward and backward passes of a
//! step's micro-batches.
//!
//! - **GPipe** (Huang et al., 2019): every forward pass, then every backward pass. Each stage keeps
//!   the activations of all `M` micro-batches until their backward pass.
//! - **1F1B** (PipeDream-Flush, Narayanan et al., 2021; Megatron-LM's default): stage `s` of `P`
//!   runs `P − 1 − s` warm-up forward passes, then alternates one forward and one backward, then
//!   drains the remaining backward passes. It keeps at most `P − s` micro-batches of activations.
//!
//! Both leave each stage idle for a fraction `(P − 1)/(M + P − 1)` of the step when every stage
//! takes the same time (the pipeline bubble).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::DistError;

/// Which schedule a pipeline runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PipelineSchedule {
    /// All forward passes, then all backward passes.
    #[serde(rename = "gpipe")]
    GPipe,
    /// One forward, one backward (after a warm-up), as Megatron-LM.
    #[default]
    #[serde(rename = "1f1b")]
    OneFOneB,
}

impl FromStr for PipelineSchedule {
    type Err = DistError;

    fn from_str(s: &str) -> Result<Self, DistError> {
        match s.to_ascii_lowercase().as_str() {
            "gpipe" => Ok(Self::GPipe),
            "1f1b" => Ok(Self::OneFOneB),
            other => Err(DistError::Config(format!(
                "unknown pipeline schedule {other:?} (expected \"gpipe\" or \"1f1b\")"
            ))),
        }
    }
}

impl fmt::Display for PipelineSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::GPipe => "gpipe",
            Self::OneFOneB => "1f1b",
        })
    }
}

/// One step of a stage's schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Forward pass of micro-batch `0`.
    Forward(usize),
    /// Backward pass of micro-batch `0`.
    Backward(usize),
}

impl PipelineSchedule {
    /// Stage `stage` of `stages`' actions for `micro_batches` micro-batches, in order.
    pub fn actions(self, stages: usize, stage: usize, micro_batches: usize) -> Vec<Action> {
        let m = micro_batches;
        match self {
            Self::GPipe => (0..m)
                .map(Action::Forward)
                .chain((0..m).map(Action::Backward))
                .collect(),
            Self::OneFOneB => {
                let warmup = (stages - stage - 1).min(m);
                let mut out: Vec<Action> = (0..warmup).map(Action::Forward).collect();
                for i in 0..m - warmup {
                    out.push(Action::Forward(warmup + i));
                    out.push(Action::Backward(i));
                }
                out.extend((m - warmup..m).map(Action::Backward));
                out
            }
        }
    }
}

/// The idle fraction of an ideal pipeline, `(P − 1)/(M + P − 1)`.
pub fn bubble_fraction(stages: usize, micro_batches: usize) -> f64 {
    (stages as f64 - 1.0) / (micro_batches + stages - 1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The most micro-batches whose forward pass has run and backward pass has not.
    fn peak_in_flight(actions: &[Action]) -> usize {
        let (mut live, mut peak) = (0usize, 0usize);
        for a in actions {
            match a {
                Action::Forward(_) => live += 1,
                Action::Backward(_) => live -= 1,
            }
            peak = peak.max(live);
        }
        peak
    }

    #[test]
    fn every_micro_batch_runs_forward_then_backward_once() {
        for schedule in [PipelineSchedule::GPipe, PipelineSchedule::OneFOneB] {
            for (p, m) in [(1, 1), (2, 2), (2, 5), (4, 4), (4, 16)] {
                for s in 0..p {
                    let actions = schedule.actions(p, s, m);
                    assert_eq!(actions.len(), 2 * m);
                    for i in 0..m {
                        let f = actions.iter().position(|a| *a == Action::Forward(i));
                        let b = actions.iter().position(|a| *a == Action::Backward(i));
                        assert!(f.unwrap() < b.unwrap(), "{schedule} P={p} s={s} M={m}");
                    }
                }
            }
        }
    }

    #[test]
    fn one_f_one_b_keeps_at_most_p_minus_s_in_flight() {
        assert_eq!(
            PipelineSchedule::OneFOneB.actions(2, 0, 3),
            vec![
                Action::Forward(0),
                Action::Forward(1),
                Action::Backward(0),
                Action::Forward(2),
                Action::Backward(1),
                Action::Backward(2)
            ]
        );
        for s in 0..4 {
            assert_eq!(
                peak_in_flight(&PipelineSchedule::OneFOneB.actions(4, s, 8)),
                4 - s
            );
            assert_eq!(peak_in_flight(&PipelineSchedule::GPipe.actions(4, s, 8)), 8);
        }
        assert_eq!(
            "1F1B".parse::<PipelineSchedule>().unwrap(),
            PipelineSchedule::OneFOneB
        );
        assert!("interleaved".parse::<PipelineSchedule>().is_err());
    }
}
