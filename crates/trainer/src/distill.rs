//! Knowledge distillation (Hinton et al., 2015; DistilBERT's recipe): the student learns from a
//! teacher's softened predictions as well as from the data,
//! `loss = α · T² · KL(softmax(teacher / T) ‖ softmax(student / T)) + (1 − α) · cross-entropy`.
//! The T² keeps the soft term's gradients on the scale of the hard term's as T grows. The teacher
//! runs forward only, on the backend's inner (non-autodiff) backend, so it records no graph.

use std::path::PathBuf;

use burn::tensor::Tensor;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use kiln_bpe::Tokenizer;
use kiln_transformer::{Transformer, load_model};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// Distillation settings (`[distill]` in a training config, or `kiln distill`'s flags).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillConfig {
    /// The teacher: a `.gguf` file or a model directory, with the student's tokenizer.
    pub teacher: PathBuf,
    /// Softmax temperature T (DistilBERT: 2).
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Weight α of the soft (teacher) term; 1 − α weighs the cross-entropy (DistilBERT: 0.5).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
}

fn default_temperature() -> f64 {
    2.0
}

fn default_alpha() -> f64 {
    0.5
}

impl DistillConfig {
    /// Checks the numbers.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(TrainError::Config(format!(
                "distillation temperature must be positive, not {}",
                self.temperature
            )));
        }
        if !(0.0..=1.0).contains(&self.alpha) {
            return Err(TrainError::Config(format!(
                "distillation alpha must be in [0, 1], not {}",
                self.alpha
            )));
        }
        Ok(())
    }
}

/// A loaded teacher and how to weigh it.
pub struct Teacher<B: AutodiffBackend> {
    model: Transformer<B::InnerBackend>,
    temperature: f64,
    alpha: f64,
}

impl<B: AutodiffBackend> std::fmt::Debug for Teacher<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Teacher")
            .field("config", self.model.config())
            .field("temperature", &self.temperature)
            .field("alpha", &self.alpha)
            .finish()
    }
}

impl<B: AutodiffBackend> Teacher<B> {
    /// Loads the teacher of `config` for a student of `vocab_size` tokens whose tokenizer is
    /// `student_tokenizer` (if known): the vocabularies must be the same, token for token.
    pub fn load(
        config: &DistillConfig,
        vocab_size: usize,
        student_tokenizer: Option<&Tokenizer>,
        device: &B::Device,
    ) -> Result<Self> {
        config.validate()?;
        let loaded = load_model::<B::InnerBackend>(&config.teacher, device)?;
        let teacher_vocab = loaded.model.config().vocab_size;
        let path = config.teacher.display();
        if teacher_vocab != vocab_size {
            return Err(TrainError::Config(format!(
                "the teacher {path} has a vocabulary of {teacher_vocab} tokens and the student \
                 {vocab_size}: distillation needs the same tokenizer for both"
            )));
        }
        if let (Some(ours), Some(theirs)) = (student_tokenizer, loaded.tokenizer.as_ref())
            && let Some(id) =
                (0..vocab_size as u32).find(|&id| ours.token_bytes(id) != theirs.token_bytes(id))
        {
            return Err(TrainError::Config(format!(
                "the teacher {path} and the student have different tokenizers (token {id} differs): \
                 distillation needs the same tokenizer for both"
            )));
        }
        Ok(Self {
            model: loaded.model,
            temperature: config.temperature,
            alpha: config.alpha,
        })
    }

    /// The teacher's configuration.
    pub fn model(&self) -> &Transformer<B::InnerBackend> {
        &self.model
    }

    /// The distillation loss for `student_logits` (`[rows, seq, vocab]`) on `inputs`, given the
    /// student's cross-entropy `hard`: `α · T² · KL + (1 − α) · hard`.
    pub fn loss(
        &self,
        inputs: Tensor<B, 2, burn::tensor::Int>,
        student_logits: Tensor<B, 3>,
        hard: Tensor<B, 1>,
    ) -> Result<Tensor<B, 1>> {
        let teacher_logits = Tensor::<B, 3>::from_inner(self.model.forward(inputs.inner())?);
        let [rows, seq, vocab] = student_logits.dims();
        let soft = kl_divergence(
            student_logits.reshape([rows * seq, vocab]),
            teacher_logits.reshape([rows * seq, vocab]),
            self.temperature,
        );
        let t2 = self.temperature * self.temperature;
        Ok(soft.mul_scalar(self.alpha * t2) + hard.mul_scalar(1.0 - self.alpha))
    }
}

/// Mean over rows of `KL(softmax(teacher / t) ‖ softmax(student / t))` (PyTorch's `kl_div` with
/// `reduction="batchmean"`, a row being a token). `teacher` carries no gradient.
pub fn kl_divergence<B: Backend>(
    student: Tensor<B, 2>,
    teacher: Tensor<B, 2>,
    t: f64,
) -> Tensor<B, 1> {
    let log_student = log_softmax(student.div_scalar(t), 1);
    let log_teacher = log_softmax(teacher.div_scalar(t), 1);
    let p_teacher = log_teacher.clone().exp();
    (p_teacher * (log_teacher - log_student)).sum_dim(1).mean()
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    use super::*;

    #[test]
    fn kl_divergence_matches_the_definition() {
        let s = [[1.0f32, 2.0, 0.5], [0.0, -1.0, 3.0]];
        let t = [[0.5f32, 2.5, 1.0], [1.0, 1.0, 1.0]];
        let temperature = 2.0;
        let device = Default::default();
        let tensor = |v: [[f32; 3]; 2]| Tensor::<Flex, 2>::from_data(TensorData::from(v), &device);
        let got = kl_divergence(tensor(s), tensor(t), temperature).into_scalar();
        let softmax = |row: [f32; 3]| {
            let e: Vec<f64> = row
                .iter()
                .map(|&x| (f64::from(x) / temperature).exp())
                .collect();
            let z: f64 = e.iter().sum();
            e.into_iter().map(|v| v / z).collect::<Vec<_>>()
        };
        let want = (0..2)
            .map(|r| {
                let (p, q) = (softmax(t[r]), softmax(s[r]));
                p.iter().zip(&q).map(|(p, q)| p * (p / q).ln()).sum::<f64>()
            })
            .sum::<f64>()
            / 2.0;
        assert!((f64::from(got) - want).abs() < 1e-6, "{got} vs {want}");
        let zero = kl_divergence(tensor(t), tensor(t), temperature).into_scalar();
        assert!(zero.abs() < 1e-7);
    }

    #[test]
    fn settings_are_checked() {
        let ok = DistillConfig {
            teacher: "t".into(),
            temperature: 2.0,
            alpha: 0.5,
        };
        assert!(ok.validate().is_ok());
        for (temperature, alpha) in [(0.0, 0.5), (f64::NAN, 0.5), (2.0, 1.5), (2.0, -0.1)] {
            let bad = DistillConfig {
                temperature,
                alpha,
                ..ok.clone()
            };
            assert!(bad.validate().is_err(), "{temperature} {alpha}");
        }
    }
}
