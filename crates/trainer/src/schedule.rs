//! The learning-rate schedule: linear warmup, cosine decay to a floor (nanoGPT's `get_lr`).

/// Learning rate at `step`: `lr·(step+1)/(warmup+1)` during warmup, then a cosine from `lr` down to
/// `min_lr` at `decay_steps`, and `min_lr` after that.
pub fn learning_rate(step: u64, lr: f64, min_lr: f64, warmup_steps: u64, decay_steps: u64) -> f64 {
    if step < warmup_steps {
        return lr * (step + 1) as f64 / (warmup_steps + 1) as f64;
    }
    if step > decay_steps || decay_steps <= warmup_steps {
        return min_lr;
    }
    let ratio = (step - warmup_steps) as f64 / (decay_steps - warmup_steps) as f64;
    let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
    min_lr + coeff * (lr - min_lr)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// nanoGPT's `get_lr`, transcribed from its `train.py`, as the reference.
    fn nanogpt(
        it: u64,
        learning_rate: f64,
        min_lr: f64,
        warmup_iters: u64,
        lr_decay_iters: u64,
    ) -> f64 {
        if it < warmup_iters {
            return learning_rate * (it + 1) as f64 / (warmup_iters + 1) as f64;
        }
        if it > lr_decay_iters {
            return min_lr;
        }
        let decay_ratio = (it - warmup_iters) as f64 / (lr_decay_iters - warmup_iters) as f64;
        assert!((0.0..=1.0).contains(&decay_ratio));
        let coeff = 0.5 * (1.0 + (std::f64::consts::PI * decay_ratio).cos());
        min_lr + coeff * (learning_rate - min_lr)
    }

    #[test]
    fn matches_nanogpt() {
        for it in [0, 1, 50, 99, 100, 101, 500, 1999, 2000, 2001, 5000] {
            let want = nanogpt(it, 1e-3, 1e-4, 100, 2000);
            assert!(
                (learning_rate(it, 1e-3, 1e-4, 100, 2000) - want).abs() < 1e-15,
                "step {it}"
            );
        }
        assert!((learning_rate(100, 1e-3, 1e-4, 100, 2000) - 1e-3).abs() < 1e-12);
        assert_eq!(learning_rate(2001, 1e-3, 1e-4, 100, 2000), 1e-4);
    }
}
