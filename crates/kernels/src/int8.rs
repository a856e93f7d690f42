//! Int8 weights with per-block scales (llama.cpp's `Q8_0`), and the CPU kernel that multiplies by
//! them.

use kiln_gguf::blocks::{QK, quantize_q8_0_block};
use rayon::prelude::*;

use crate::linear::{KernelError, LinearKernel};

/// Inputs per scale block (`Q8_0`'s 32).
pub const BLOCK: usize = QK;

/// Fewest output rows a parallel task computes (smaller tasks cost more in wake-ups than they save).
const MIN_ROWS_PER_TASK: usize = 64;

/// A `[rows, cols]` matrix (`rows` = output features, one row per output) as int8 values with one
/// scale per block of [`BLOCK`] consecutive values of a row: `w ≈ scale · q`. The blocks are
/// `kiln-gguf`'s `Q8_0` codec (`scale = max|w| / 127` rounded to f16, round to nearest), laid out
/// planar (values apart from scales, scales widened to f32) so the kernel streams them.
#[derive(Clone, Debug)]
pub struct Int8Matrix {
    rows: usize,
    cols: usize,
    /// Row stride in `values`: `cols` rounded up to a whole number of blocks (zero padded).
    stride: usize,
    values: Vec<i8>,
    scales: Vec<f32>,
}

impl Int8Matrix {
    /// Quantizes a row-major `[rows, cols]` matrix.
    pub fn quantize(data: &[f32], rows: usize, cols: usize) -> Result<Self, KernelError> {
        if data.len() != rows * cols {
            return Err(KernelError::Shape {
                rows,
                cols,
                len: data.len(),
            });
        }
        let stride = cols.div_ceil(BLOCK) * BLOCK;
        let blocks = stride / BLOCK;
        let mut values = vec![0i8; rows * stride];
        let mut scales = vec![0f32; rows * blocks];
        values
            .par_chunks_mut(stride)
            .zip(scales.par_chunks_mut(blocks))
            .zip(data.par_chunks(cols.max(1)))
            .for_each(|((q_row, s_row), w_row)| {
                for (b, (q, s)) in q_row.chunks_mut(BLOCK).zip(s_row).enumerate() {
                    let w = &w_row[(b * BLOCK).min(cols)..((b + 1) * BLOCK).min(cols)];
                    let mut block = [0f32; BLOCK];
                    block[..w.len()].copy_from_slice(w);
                    let (scale, qs) = quantize_q8_0_block(&block);
                    *s = scale.to_f32();
                    q.copy_from_slice(&qs);
                }
            });
        Ok(Self {
            rows,
            cols,
            stride,
            values,
            scales,
        })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of values and scales.
    pub fn bytes(&self) -> usize {
        self.values.len() + 4 * self.scales.len()
    }

    /// The matrix back in f32 (`scale · q`), row-major `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let blocks = self.stride / BLOCK;
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            let q = &self.values[r * self.stride..r * self.stride + self.cols];
            let s = &self.scales[r * blocks..(r + 1) * blocks];
            out.extend(
                q.iter()
                    .enumerate()
                    .map(|(i, &v)| s[i / BLOCK] * f32::from(v)),
            );
        }
        out
    }

    /// `out[r·rows + o] = x[r] · row o` for `n` input rows (`x` is `[n, cols]`, `out` `[n, rows]`).
    pub fn matmul(&self, x: &[f32], n: usize, out: &mut [f32]) -> Result<(), KernelError> {
        if x.len() != n * self.cols {
            return Err(KernelError::Shape {
                rows: n,
                cols: self.cols,
                len: x.len(),
            });
        }
        if out.len() != n * self.rows {
            return Err(KernelError::Shape {
                rows: n,
                cols: self.rows,
                len: out.len(),
            });
        }
        if n == 0 || self.rows == 0 {
            return Ok(());
        }
        // Inputs padded to whole blocks, so the dot product needs no tail handling.
        let mut padded = vec![0f32; n * self.stride];
        for (dst, src) in padded
            .chunks_mut(self.stride)
            .zip(x.chunks(self.cols.max(1)))
        {
            dst[..self.cols].copy_from_slice(src);
        }
        // Each task owns a range of output features. For each weight row it converts every block
        // to f32 once and multiplies it with a group of input rows (register-blocked), so a batch
        // of sequences costs little more weight traffic or conversion work than one sequence.
        // Results land feature-major, then are transposed into `out`.
        let mut by_feature = vec![0f32; self.rows * n];
        let blocks = self.stride / BLOCK;
        let kernel = rows_fn();
        // One task per thread: decoding calls this ~200 times per token, and each extra task is a
        // thread wake-up.
        let per_task = self
            .rows
            .div_ceil(rayon::current_num_threads())
            .max(MIN_ROWS_PER_TASK);
        let stride = self.stride;
        by_feature
            .par_chunks_mut(per_task * n)
            .enumerate()
            .for_each(|(task, chunk)| {
                let first = task * per_task;
                for (i, results) in chunk.chunks_mut(n).enumerate() {
                    let o = first + i;
                    let q = &self.values[o * stride..(o + 1) * stride];
                    let s = &self.scales[o * blocks..(o + 1) * blocks];
                    let mut r = 0;
                    while r < n {
                        let group = [8, 4, 2, 1].into_iter().find(|&g| g <= n - r).unwrap_or(1);
                        let x = &padded[r * stride..(r + group) * stride];
                        kernel(x, stride, q, s, &mut results[r..r + group]);
                        r += group;
                    }
                }
            });
        if n == 1 {
            out.copy_from_slice(&by_feature);
        } else {
            for (o, values) in by_feature.chunks(n).enumerate() {
                for (r, &v) in values.iter().enumerate() {
                    out[r * self.rows + o] = v;
                }
            }
        }
        Ok(())
    }
}

impl LinearKernel for Int8Matrix {
    fn in_features(&self) -> usize {
        self.cols
    }

    fn out_features(&self) -> usize {
        self.rows
    }

    fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]) -> Result<(), KernelError> {
        self.matmul(x, rows, out)
    }

    fn weight_bytes(&self) -> usize {
        self.bytes()
    }
}

/// `out[g] = Σ_b s[b] · x[g][b] · q[b]` for a group of input rows (`x` holds them `stride` apart).
type RowsFn = fn(&[f32], usize, &[i8], &[f32], &mut [f32]);

/// The fastest version this CPU runs.
fn rows_fn() -> RowsFn {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return |x, stride, q, s, out| unsafe { rows_avx512(x, stride, q, s, out) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return |x, stride, q, s, out| unsafe { rows_avx2(x, stride, q, s, out) };
        }
    }
    rows_portable
}

/// Dispatches on the group size so each size gets its own register-blocked loop.
#[inline(always)]
fn rows_any(x: &[f32], stride: usize, q: &[i8], s: &[f32], out: &mut [f32]) {
    match out.len() {
        8 => rows_group::<8>(x, stride, q, s, out),
        4 => rows_group::<4>(x, stride, q, s, out),
        2 => rows_group::<2>(x, stride, q, s, out),
        _ => rows_group::<1>(x, stride, q, s, out),
    }
}

/// One weight row against `R` input rows: each block of 32 weights is widened and scaled once,
/// then multiply-added into `R` accumulators of 16 lanes (written so the compiler vectorizes it).
#[inline(always)]
fn rows_group<const R: usize>(x: &[f32], stride: usize, q: &[i8], s: &[f32], out: &mut [f32]) {
    let mut acc = [[0f32; 16]; R];
    for (b, (qb, &scale)) in q.chunks_exact(BLOCK).zip(s).enumerate() {
        let mut w = [0f32; BLOCK];
        for i in 0..BLOCK {
            w[i] = f32::from(qb[i]) * scale;
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let xb = &x[r * stride + b * BLOCK..r * stride + (b + 1) * BLOCK];
            for i in 0..16 {
                acc[i] += xb[i] * w[i] + xb[i + 16] * w[i + 16];
            }
        }
    }
    for (o, acc) in out.iter_mut().zip(&acc) {
        *o = acc.iter().sum();
    }
}

fn rows_portable(x: &[f32], stride: usize, q: &[i8], s: &[f32], out: &mut [f32]) {
    rows_any(x, stride, q, s, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn rows_avx512(x: &[f32], stride: usize, q: &[i8], s: &[f32], out: &mut [f32]) {
    match out.len() {
        8 => rows_group_avx512::<8>(x, stride, q, s, out),
        4 => rows_group_avx512::<4>(x, stride, q, s, out),
        2 => rows_group_avx512::<2>(x, stride, q, s, out),
        _ => rows_group_avx512::<1>(x, stride, q, s, out),
    }
}

/// [`rows_group`] in AVX-512 intrinsics: per block, 32 `i8` widened to two vectors of f32 and
/// scaled once, then two fused multiply-adds per input row into that row's accumulator.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
fn rows_group_avx512<const R: usize>(
    x: &[f32],
    stride: usize,
    q: &[i8],
    s: &[f32],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let blocks = s.len();
    assert!(
        q.len() >= blocks * BLOCK,
        "weight row shorter than its scales"
    );
    assert!(
        x.len() >= (R - 1) * stride + blocks * BLOCK,
        "input rows shorter than the weight row"
    );
    assert!(out.len() >= R, "fewer outputs than rows");
    let mut acc = [_mm512_setzero_ps(); R];
    for (b, &scale) in s.iter().enumerate() {
        // SAFETY: `b * BLOCK + 32 <= q.len()` and `r * stride + b * BLOCK + 32 <= x.len()` for
        // every `r < R`, by the asserts above; the loads are unaligned.
        unsafe {
            let qp = q.as_ptr().add(b * BLOCK);
            let scale = _mm512_set1_ps(scale);
            let lo = _mm512_cvtepi8_epi32(_mm_loadu_si128(qp.cast()));
            let hi = _mm512_cvtepi8_epi32(_mm_loadu_si128(qp.add(16).cast()));
            let w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(lo), scale);
            let w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(hi), scale);
            for (r, acc) in acc.iter_mut().enumerate() {
                let xp = x.as_ptr().add(r * stride + b * BLOCK);
                *acc = _mm512_fmadd_ps(_mm512_loadu_ps(xp), w0, *acc);
                *acc = _mm512_fmadd_ps(_mm512_loadu_ps(xp.add(16)), w1, *acc);
            }
        }
    }
    for (o, acc) in out.iter_mut().zip(acc) {
        *o = _mm512_reduce_add_ps(acc);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2(x: &[f32], stride: usize, q: &[i8], s: &[f32], out: &mut [f32]) {
    rows_any(x, stride, q, s, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(rows: usize, cols: usize, seed: u32) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| {
                let v = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
                (v % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn round_trip_error_is_within_half_a_step() {
        for cols in [32, 45, 64, 100] {
            let w = matrix(7, cols, 3);
            let q = Int8Matrix::quantize(&w, 7, cols).unwrap();
            let back = q.dequantize();
            for r in 0..7 {
                for b in 0..cols.div_ceil(BLOCK) {
                    let range = r * cols + b * BLOCK..r * cols + ((b + 1) * BLOCK).min(cols);
                    let max = w[range.clone()].iter().fold(0f32, |m, v| m.max(v.abs()));
                    // Half a step, plus what rounding the scale to f16 moves the largest value
                    // (llama.cpp's Q8_0 rounds with the f32 scale and stores it as f16).
                    let step = max / 127.0;
                    let stored = half::f16::from_f32(step).to_f32();
                    let bound = step * 0.5 + 127.0 * (stored - step).abs() + 1e-6;
                    for i in range {
                        assert!((w[i] - back[i]).abs() <= bound, "{} vs {}", w[i], back[i]);
                    }
                }
            }
        }
    }

    #[test]
    fn weights_are_exactly_gguf_q8_0_blocks() {
        use kiln_gguf::{GgmlType, blocks};
        let w = matrix(3, 64, 9);
        let q = Int8Matrix::quantize(&w, 3, 64).unwrap();
        let bytes = blocks::quantize(GgmlType::Q8_0, &w).unwrap();
        let gguf = blocks::dequantize_to_vec(GgmlType::Q8_0, &bytes, w.len()).unwrap();
        assert_eq!(q.dequantize(), gguf);
    }

    #[test]
    fn matmul_equals_the_dequantized_product() {
        for (rows, cols, n) in [
            (1, 32, 1),
            (130, 576, 1),
            (70, 45, 3),
            (200, 96, 16),
            (65, 64, 15),
        ] {
            let w = matrix(rows, cols, 11);
            let x = matrix(n, cols, 5);
            let q = Int8Matrix::quantize(&w, rows, cols).unwrap();
            let deq = q.dequantize();
            let mut out = vec![0f32; n * rows];
            q.matmul(&x, n, &mut out).unwrap();
            for r in 0..n {
                for o in 0..rows {
                    let want: f32 = (0..cols).map(|i| x[r * cols + i] * deq[o * cols + i]).sum();
                    let got = out[r * rows + o];
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{rows}×{cols} n={n} [{r},{o}]: {got} vs {want}"
                    );
                }
            }
            // The portable path agrees with the dispatched one.
            let stride = cols.div_ceil(BLOCK) * BLOCK;
            let mut xp = vec![0f32; stride];
            xp[..cols].copy_from_slice(&x[..cols]);
            let blocks = stride / BLOCK;
            let mut portable = [0f32];
            rows_portable(
                &xp,
                stride,
                &q.values[..stride],
                &q.scales[..blocks],
                &mut portable,
            );
            assert!((portable[0] - out[0]).abs() <= 1e-4 * (1.0 + portable[0].abs()));
        }
    }

    #[test]
    fn shape_errors() {
        assert!(matches!(
            Int8Matrix::quantize(&[1.0; 5], 2, 3),
            Err(KernelError::Shape { .. })
        ));
        let q = Int8Matrix::quantize(&[1.0; 6], 2, 3).unwrap();
        let mut out = [0.0; 2];
        assert!(q.matmul(&[1.0; 4], 1, &mut out).is_err());
        assert!(q.matmul(&[1.0; 3], 1, &mut [0.0; 3]).is_err());
        assert!(q.matmul(&[1.0; 3], 1, &mut out).is_ok());
        assert!(q.matmul(&[], 0, &mut []).is_ok());
    }
}
