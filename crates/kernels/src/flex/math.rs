//! Vectorizable `exp` and GELU over slices, compiled for AVX-512 and AVX2 and chosen at run time.
//!
//! The scalar functions are written so that LLVM turns each loop into SIMD code (no calls into
//! libm, branch-free): Cephes' `expf` polynomial (relative error ≈ 2e-7) and Abramowitz–Stegun
//! 7.1.26 for `erf` (absolute error ≤ 1.5e-7).

use std::f32::consts::{FRAC_1_SQRT_2, LOG2_E};

/// `e^x`, branch-free; inputs below −87.3 give 0, above 88.7 give +∞.
#[inline(always)]
fn exp(x: f32) -> f32 {
    let clamped = if x < -87.336_54 { -87.336_54 } else { x };
    let clamped = if clamped > 88.722_84 {
        88.722_84
    } else {
        clamped
    };
    let n = (clamped * LOG2_E + 0.5).floor();
    let r = clamped - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n from the bits of `n + 127 + 2^23`, whose low mantissa bits hold the biased exponent:
    // a float-to-int cast (`as i32`) saturates, which LLVM cannot vectorize.
    let biased = (n + 127.0 + 8_388_608.0).to_bits();
    let scaled = y * f32::from_bits(biased << 23);
    let underflow = if x < -87.336_54 { 0.0 } else { scaled };
    if x > 88.722_84 {
        f32::INFINITY
    } else {
        underflow
    }
}

/// `erf(x)` (Abramowitz–Stegun 7.1.26).
#[inline(always)]
fn erf(x: f32) -> f32 {
    erf_given(x, exp(-x * x))
}

/// `erf(x)` given `e^{−x²}` (which GELU's derivative shares with the normal density).
#[inline(always)]
fn erf_given(x: f32, exp_neg_square: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp_neg_square;
    if x < 0.0 { -y } else { y }
}

/// `Φ(x)`, the standard normal CDF.
#[inline(always)]
fn normal_cdf(x: f32) -> f32 {
    0.5 * (1.0 + erf(x * FRAC_1_SQRT_2))
}

const INV_SQRT_2PI: f32 = 0.398_942_3;

/// `tanh(u)` as `1 − 2/(e^{2u} + 1)`: exact limits ±1 for large |u|.
#[inline(always)]
fn tanh(u: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * u) + 1.0)
}

/// √(2/π).
const SQRT_2_OVER_PI: f32 = 0.797_884_6;

#[inline(always)]
fn gelu_tanh_body(x: &[f32], out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(x) {
        *o = 0.5 * x * (1.0 + tanh(SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)));
    }
}

#[inline(always)]
fn gelu_tanh_backward_body(x: &[f32], grad: &[f32], out: &mut [f32]) {
    for ((o, &x), &g) in out.iter_mut().zip(x).zip(grad) {
        let t = tanh(SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x));
        let du = SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044_715 * x * x);
        *o = g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du);
    }
}

#[inline(always)]
fn exp_in_place_body(values: &mut [f32], shift: f32) {
    for v in values {
        *v = exp(*v - shift);
    }
}

#[inline(always)]
fn gelu_body(x: &[f32], out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(x) {
        *o = x * normal_cdf(x);
    }
}

#[inline(always)]
fn gelu_backward_body(x: &[f32], grad: &[f32], out: &mut [f32]) {
    for ((o, &x), &g) in out.iter_mut().zip(x).zip(grad) {
        // One `e^{−x²/2}` for both Φ(x) = (1 + erf(x/√2))/2 and the density φ(x).
        let e = exp(-0.5 * x * x);
        let cdf = 0.5 * (1.0 + erf_given(x * FRAC_1_SQRT_2, e));
        *o = g * (cdf + x * INV_SQRT_2PI * e);
    }
}

/// Defines `$name` running `$body` with the best instruction set this CPU has.
macro_rules! dispatch {
    ($name:ident, $body:ident, ($($arg:ident: $ty:ty),*)) => {
        pub(crate) fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn avx512($($arg: $ty),*) {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) {
                    $body($($arg),*)
                }
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports the features `avx512` is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports the features `avx2` is compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

dispatch!(exp_shifted_in_place, exp_in_place_body, (values: &mut [f32], shift: f32));
dispatch!(gelu, gelu_body, (x: &[f32], out: &mut [f32]));
dispatch!(gelu_backward, gelu_backward_body, (x: &[f32], grad: &[f32], out: &mut [f32]));
dispatch!(gelu_tanh, gelu_tanh_body, (x: &[f32], out: &mut [f32]));
dispatch!(gelu_tanh_backward, gelu_tanh_backward_body, (x: &[f32], grad: &[f32], out: &mut [f32]));

/// Sum of `values` with eight running partial sums (so the loop vectorizes).
pub(crate) fn sum(values: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let chunks = values.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (l, v) in lanes.iter_mut().zip(chunk) {
            *l += v;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Dot product of two equally long slices (eight partial sums).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm_to_a_few_ulps() {
        let xs: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.04).collect();
        let mut ys = xs.clone();
        exp_shifted_in_place(&mut ys, 0.0);
        for (&x, &y) in xs.iter().zip(&ys) {
            let want = x.exp();
            assert!(
                (y - want).abs() <= 4e-7 * want,
                "exp({x}) = {y}, want {want}"
            );
        }
        let mut edges = [-100.0, f32::NEG_INFINITY, 100.0];
        exp_shifted_in_place(&mut edges, 0.0);
        assert_eq!(edges, [0.0, 0.0, f32::INFINITY]);
    }

    #[test]
    fn gelu_and_its_derivative_match_the_erf_definition() {
        let xs: Vec<f32> = (-600..=600).map(|i| i as f32 * 0.01).collect();
        let mut ys = vec![0.0; xs.len()];
        gelu(&xs, &mut ys);
        let ones = vec![1.0; xs.len()];
        let mut ds = vec![0.0; xs.len()];
        gelu_backward(&xs, &ones, &mut ds);
        for ((&x, &y), &d) in xs.iter().zip(&ys).zip(&ds) {
            let x64 = x as f64;
            let cdf = 0.5 * (1.0 + libm_erf(x64 / std::f64::consts::SQRT_2));
            assert!((y as f64 - x64 * cdf).abs() < 1e-6, "gelu({x})");
            let pdf = (-0.5 * x64 * x64).exp() / (2.0 * std::f64::consts::PI).sqrt();
            assert!((d as f64 - (cdf + x64 * pdf)).abs() < 1e-6, "gelu'({x})");
        }
    }

    #[test]
    fn tanh_gelu_and_its_derivative_match_gpt2s_formula() {
        let xs: Vec<f32> = (-1200..=1200).map(|i| i as f32 * 0.01).collect();
        let mut ys = vec![0.0; xs.len()];
        gelu_tanh(&xs, &mut ys);
        let ones = vec![1.0; xs.len()];
        let mut ds = vec![0.0; xs.len()];
        gelu_tanh_backward(&xs, &ones, &mut ds);
        let c = (2.0 / std::f64::consts::PI).sqrt();
        for ((&x, &y), &d) in xs.iter().zip(&ys).zip(&ds) {
            let x64 = x as f64;
            let t = (c * (x64 + 0.044715 * x64.powi(3))).tanh();
            assert!(
                (y as f64 - 0.5 * x64 * (1.0 + t)).abs() < 2e-6 * x64.abs().max(1.0),
                "gelu_tanh({x})"
            );
            let want = 0.5 * (1.0 + t)
                + 0.5 * x64 * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x64 * x64);
            assert!(
                (d as f64 - want).abs() < 2e-6,
                "gelu_tanh'({x}) = {d}, want {want}"
            );
        }
    }

    /// erf in f64 by its Taylor series (|x| ≤ 3) and continued fraction beyond.
    fn libm_erf(x: f64) -> f64 {
        if x.abs() > 3.0 {
            // erfc(x) ~ e^{-x²}/(x√π) · (1 − 1/(2x²) + 3/(4x⁴)); far below f32 precision here.
            let a = x.abs();
            let erfc = (-a * a).exp() / (a * std::f64::consts::PI.sqrt())
                * (1.0 - 1.0 / (2.0 * a * a) + 3.0 / (4.0 * a.powi(4)));
            return x.signum() * (1.0 - erfc);
        }
        let mut term = x;
        let mut total = x;
        for n in 1..200 {
            term *= -x * x / n as f64;
            total += term / (2 * n + 1) as f64;
        }
        2.0 / std::f64::consts::PI.sqrt() * total
    }
}
