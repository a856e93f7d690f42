//! GPTQ: post-training quantization that rounds one input column at a time and moves each
//! column's rounding error onto the columns not yet rounded, so that the layer's *output* on
//! calibration data changes as little as possible (Frantar, Ashkboos, Hoefler, Alistarh, 2022,
//! "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
//! arXiv:2210.17323, Algorithm 1).
//!
//! For a weight `W` (`rows × cols`, one output per row) and calibration inputs `X` (`n × cols`),
//! GPTQ minimises `‖(W − Ŵ) Xᵀ‖²`, whose Hessian per row is `H = 2/n · XᵀX` ([`Hessian`]). With
//! `U` the upper Cholesky factor of `H⁻¹`, columns are rounded left to right; rounding column `j`
//! to `q` leaves the error `e = (w_j − q) / U_jj`, and the columns `k > j` absorb it as
//! `w_k −= e · U_jk`, the optimal (OBS) correction given the columns still free. The updates are
//! applied immediately inside a batch of columns and lazily, as one rank-`B` update, to the
//! columns after the batch (the paper's "lazy batch updates"), which keeps the work cache-bound.
//!
//! The quantization grid is the GGUF block of the target type (32 columns for the legacy types,
//! 256 for the K-quants). When the sweep reaches the first column of a block, the block's scales
//! and mins are fixed per row by encoding the block's *current* (already error-updated) weights
//! with llama.cpp's round-to-nearest reference quantizer ([`kiln_gguf::blocks::quantize`]);
//! each element is then rounded on that fixed grid with exactly llama.cpp's element rule, and the
//! chosen integers are packed into the block over the reference encoder's scale bytes. So the
//! output is byte-for-byte the layout `kiln_gguf::blocks::quantize` writes, and with a Hessian
//! proportional to the identity (no error feedback) it *is* llama.cpp's output.
//!
//! Numerics: `H` is accumulated in `f64`, damped (`H += damp · mean(diag H) · I`, dead inputs
//! with `H_ii = 0` get `H_ii = 1` and a zero weight), normalised to unit mean diagonal, and
//! factored in `f64` with blocked, parallel algorithms. `U` is obtained without forming `H⁻¹`:
//! with `H = Ũ Ũᵀ` (`Ũ` upper triangular, the Cholesky factor of the index-reversed `H`),
//! `H⁻¹ = Ũ⁻ᵀ Ũ⁻¹`, so by uniqueness of the Cholesky factorisation `U = Ũ⁻¹` is exactly
//! `torch.linalg.cholesky(H⁻¹, upper=True)` of the reference implementation. The weight sweep runs
//! in `f32`, as the reference does: the factor is well conditioned after damping, the per-column
//! corrections are small against the quantization step, `f32` halves the memory traffic of the
//! `rows × cols²/2` multiply-adds that dominate the run time, and it vectorises twice as wide.
//! Rows are independent given `U` and are swept in parallel tiles; every row's arithmetic is done
//! in a fixed order, so results do not depend on the thread count.
//!
//! With [`GptqSettings::act_order`] the columns are visited in order of decreasing `H_ii`; every
//! block's parameters are then fixed up front from the original weights ("static groups"), since
//! a permuted sweep would otherwise reach blocks with only part of their columns updated.

use half::f16;
use kiln_gguf::GgmlType;
use kiln_gguf::blocks::{self, BlockError, QK, QK_K};
use rayon::prelude::*;

/// The types [`quantize`] supports.
pub const GPTQ_TYPES: [GgmlType; 8] = [
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Why GPTQ could not run.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GptqError {
    /// Calibration input that is not whole rows of the Hessian's dimension.
    #[error("calibration input of {len} values is not a whole number of {dim}-feature rows")]
    InputShape {
        /// Values given.
        len: usize,
        /// Features per row (the Hessian's dimension).
        dim: usize,
    },
    /// A calibration input is NaN or infinite.
    #[error("calibration input {index} is not finite")]
    NonFiniteInput {
        /// Index of the first offending value.
        index: usize,
    },
    /// Two dimensions that must agree do not (Hessians merged, or Hessian and weight columns).
    #[error("dimension mismatch: expected {expected}, found {found}")]
    DimensionMismatch {
        /// The dimension required.
        expected: usize,
        /// The dimension given.
        found: usize,
    },
    /// A `dim × dim` Hessian does not fit in memory.
    #[error("a {dim} × {dim} Hessian does not fit in memory")]
    HessianTooLarge {
        /// The dimension.
        dim: usize,
    },
    /// The weight is not `rows × cols` values.
    #[error("weight has {len} values, not {rows} × {cols}")]
    WeightShape {
        /// Values given.
        len: usize,
        /// Rows claimed.
        rows: usize,
        /// Columns claimed.
        cols: usize,
    },
    /// A weight is NaN or infinite.
    #[error("weight {index} is not finite")]
    NonFiniteWeight {
        /// Index of the first offending value.
        index: usize,
    },
    /// The Hessian has seen no calibration rows.
    #[error("the Hessian has seen no calibration rows")]
    EmptyHessian,
    /// GPTQ does not produce this type.
    #[error(
        "GPTQ does not support {ty} (supported: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)"
    )]
    Unsupported {
        /// The type asked for.
        ty: GgmlType,
    },
    /// A setting is out of range.
    #[error("invalid GPTQ settings: {reason}")]
    InvalidSettings {
        /// What is wrong.
        reason: &'static str,
    },
    /// The damped Hessian could not be factored, even after raising the damping.
    #[error("the Hessian is not positive definite, even with damping {damp}")]
    NotPositiveDefinite {
        /// The last (largest) relative damping tried.
        damp: f64,
    },
    /// A block scale or a quantized value overflowed (the weights are too large for the type's
    /// `f16` scales, or the error feedback diverged).
    #[error("row {row}, column {col}: the value overflows the type's f16 scales")]
    Overflow {
        /// Weight row.
        row: usize,
        /// Weight column.
        col: usize,
    },
    /// The block codec refused the shape (e.g. columns that are not whole blocks).
    #[error(transparent)]
    Block(#[from] BlockError),
}

/// Accumulates `H = 2/n · Σ xᵀx` over calibration rows `x` (the layer inputs), in `f64`.
///
/// The whole of `Σ xᵀx` is accumulated (one matrix product per [`add`](Self::add)); the matrix is allocated on the first non-empty
/// [`add`](Self::add) or [`merge`](Self::merge), so an unused `Hessian` costs nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct Hessian {
    dim: usize,
    /// `Σ xᵢ xⱼ` at `i * dim + j` (row-major); empty until the first rows arrive.
    sum: Vec<f64>,
    rows: usize,
}

impl Hessian {
    /// An empty accumulator for inputs of `dim` features.
    pub fn new(dim: usize) -> Self {
        Self {
            dim,
            sum: Vec::new(),
            rows: 0,
        }
    }

    /// Features per calibration row (the weight's column count).
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Calibration rows seen.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The whole matrix `H = 2/n · Σ xᵀx` (`dim × dim`, row-major; zeros before any rows).
    pub fn to_dense(&self) -> Vec<f64> {
        let n = self.dim;
        let mut out = vec![0.0; n * n];
        if self.sum.is_empty() || self.rows == 0 {
            return out;
        }
        let scale = 2.0 / self.rows as f64;
        for i in 0..n {
            for j in i..n {
                let v = scale * self.sum[i * n + j];
                out[i * n + j] = v;
                out[j * n + i] = v;
            }
        }
        out
    }

    /// Adds calibration rows: `x` is `n` rows of [`dim`](Self::dim) features, row-major. Errors
    /// (adding nothing) if `x.len()` is not a multiple of `dim` or a value is not finite.
    pub fn add(&mut self, x: &[f32]) -> Result<(), GptqError> {
        let dim = self.dim;
        if x.is_empty() {
            return Ok(());
        }
        if dim == 0 || !x.len().is_multiple_of(dim) {
            return Err(GptqError::InputShape { len: x.len(), dim });
        }
        if let Some(index) = x.iter().position(|v| !v.is_finite()) {
            return Err(GptqError::NonFiniteInput { index });
        }
        self.allocate()?;
        let n = x.len() / dim;
        let x64: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        // sum += xᵀ·x, the whole matrix (the upper triangle is what the factorisation reads): one
        // matrix product, which keeps the sum's tiles in cache across all `n` rows.
        // SAFETY: `sum` is `dim × dim` (row stride `dim`), `x64` is `n × dim` row-major and read as
        // its transpose (`dim × n`: column stride `dim`, row stride 1) and as itself; every index
        // stays inside the slices, and `sum` is borrowed mutably, so it aliases neither operand.
        unsafe {
            gemm::gemm(
                dim,
                dim,
                n,
                self.sum.as_mut_ptr(),
                1,
                dim as isize,
                true,
                x64.as_ptr(),
                dim as isize,
                1,
                x64.as_ptr(),
                1,
                dim as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(rayon::current_num_threads()),
            );
        }
        self.rows = self.rows.saturating_add(x.len() / dim);
        Ok(())
    }

    /// Adds the rows another accumulator has seen (e.g. from another thread or shard).
    pub fn merge(&mut self, other: &Hessian) -> Result<(), GptqError> {
        if other.dim != self.dim {
            return Err(GptqError::DimensionMismatch {
                expected: self.dim,
                found: other.dim,
            });
        }
        if !other.sum.is_empty() {
            if self.sum.is_empty() {
                self.sum.clone_from(&other.sum);
            } else {
                self.sum
                    .par_iter_mut()
                    .zip(other.sum.par_iter())
                    .for_each(|(a, &b)| *a += b);
            }
        }
        self.rows = self.rows.saturating_add(other.rows);
        Ok(())
    }

    /// Allocates the zeroed sum if it is not yet.
    fn allocate(&mut self) -> Result<(), GptqError> {
        if self.sum.is_empty() {
            self.sum = zeroed_square(self.dim)?;
        }
        Ok(())
    }
}

/// A zeroed `dim × dim` matrix, or [`GptqError::HessianTooLarge`] if its size overflows.
fn zeroed_square(dim: usize) -> Result<Vec<f64>, GptqError> {
    match dim.checked_mul(dim) {
        Some(n) if n <= isize::MAX as usize / size_of::<f64>() => Ok(vec![0.0; n]),
        _ => Err(GptqError::HessianTooLarge { dim }),
    }
}

/// GPTQ's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GptqSettings {
    /// Damping added to the Hessian's diagonal, as a fraction of its mean diagonal (default
    /// `0.1`: on SmolLM2-135M, 0.1 gave a lower perplexity than the paper's 0.01 and than 1;
    /// docs/quantize.md). If the damped Hessian is still not positive definite, it is retried with 10×, 100×
    /// and 1000× this (a damping of 0 is tried once).
    pub damp: f64,
    /// Columns per lazy batch (default 128); rounded up to whole GGUF blocks of the target type,
    /// so that a block's parameters are always fixed from fully updated weights.
    pub block_columns: usize,
    /// Visit columns in order of decreasing Hessian diagonal, with every block's parameters fixed
    /// up front from the original weights (static groups). Default `true`: without it, GPTQ's
    /// perplexity on SmolLM2-135M was *above* round to nearest's (docs/quantize.md).
    pub act_order: bool,
}

impl Default for GptqSettings {
    fn default() -> Self {
        Self {
            damp: 0.1,
            block_columns: 128,
            act_order: true,
        }
    }
}

/// Quantizes `weight` (`rows` output rows × `cols` input columns, row-major; each row is one GGUF
/// row of `cols` elements, so the input dimension is the block dimension) to `ty` with GPTQ under
/// the calibration statistics `hessian` (of dimension `cols`). Returns the tensor's GGUF bytes:
/// `rows × cols / block_size` blocks, exactly the layout `kiln_gguf::blocks::quantize(ty, weight)`
/// returns.
pub fn quantize(
    ty: GgmlType,
    weight: &[f32],
    rows: usize,
    cols: usize,
    hessian: &Hessian,
    settings: &GptqSettings,
) -> Result<Vec<u8>, GptqError> {
    if !GPTQ_TYPES.contains(&ty) {
        return Err(GptqError::Unsupported { ty });
    }
    if settings.block_columns == 0 {
        return Err(GptqError::InvalidSettings {
            reason: "block_columns must be positive",
        });
    }
    if !(settings.damp >= 0.0 && settings.damp.is_finite()) {
        return Err(GptqError::InvalidSettings {
            reason: "damp must be finite and non-negative",
        });
    }
    if rows.checked_mul(cols) != Some(weight.len()) {
        return Err(GptqError::WeightShape {
            len: weight.len(),
            rows,
            cols,
        });
    }
    let block = ty.block_size();
    if !cols.is_multiple_of(block) {
        return Err(BlockError::PartialBlock {
            ty,
            n_elements: cols,
            block,
        }
        .into());
    }
    if hessian.dim != cols {
        return Err(GptqError::DimensionMismatch {
            expected: cols,
            found: hessian.dim,
        });
    }
    if hessian.rows == 0 || hessian.sum.len() != cols * cols {
        return Err(GptqError::EmptyHessian);
    }
    if let Some(index) = weight.iter().position(|v| !v.is_finite()) {
        return Err(GptqError::NonFiniteWeight { index });
    }
    let type_size = ty.type_size().ok_or(GptqError::Unsupported { ty })?;
    let row_bytes = cols / block * type_size;
    let mut out = vec![0u8; rows * row_bytes];
    if rows == 0 {
        return Ok(out);
    }
    let batch = settings
        .block_columns
        .div_ceil(block)
        .saturating_mul(block)
        .min(cols);
    let prepared = prepare(hessian, settings, batch)?;
    let sweep = Sweep {
        ty,
        cols,
        block,
        type_size,
        row_bytes,
        batch,
        act_order: settings.act_order,
        prepared: &prepared,
    };
    weight
        .par_chunks(SWEEP_TILE * cols)
        .zip(out.par_chunks_mut(SWEEP_TILE * row_bytes))
        .enumerate()
        .try_for_each(|(t, (w, o))| sweep.run(t * SWEEP_TILE, w, o))?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The factorisation: U = chol(H⁻¹, upper), packed per lazy batch.

/// Rows per diagonal block of the blocked factorisations.
const PANEL: usize = 64;
/// Width of the column strips the inner kernels keep in registers.
const LANES: usize = 16;
/// Rows per parallel task in the factorisations' trailing updates.
const FACTOR_TILE: usize = 32;

/// `U`'s rows for one lazy batch of (visiting-order) columns `start..start + len`.
struct Batch {
    start: usize,
    len: usize,
    /// `U[start + a][start + b]` at `a * len + b` (zero below the diagonal).
    diag: Vec<f32>,
    /// `U[start + a][start + len + LANES * c + l]` at `[c * len + a][l]` (zero past the end).
    tail: Vec<[f32; LANES]>,
}

/// What the sweep needs from the Hessian.
struct Prepared {
    /// `perm[j]` is the weight column visited `j`-th.
    perm: Vec<usize>,
    /// Inputs that were always zero (their weights are zeroed).
    dead: Vec<bool>,
    batches: Vec<Batch>,
}

/// Dead-input fix, ordering, damping and factorisation of the Hessian.
fn prepare(h: &Hessian, settings: &GptqSettings, batch: usize) -> Result<Prepared, GptqError> {
    let n = h.dim;
    let scale = 2.0 / h.rows as f64;
    let sum = &h.sum;
    let mut diag: Vec<f64> = (0..n).map(|i| scale * sum[i * n + i]).collect();
    let dead: Vec<bool> = diag.iter().map(|&d| d == 0.0).collect();
    for (d, &z) in diag.iter_mut().zip(&dead) {
        if z {
            *d = 1.0;
        }
    }
    let mut perm: Vec<usize> = (0..n).collect();
    if settings.act_order {
        perm.sort_by(|&a, &b| diag[b].total_cmp(&diag[a]));
    }
    let mean = diag.iter().sum::<f64>() / n as f64;
    let attempts = if settings.damp > 0.0 { 4 } else { 1 };
    let mut damp = settings.damp;
    for attempt in 0..attempts {
        if attempt > 0 {
            damp *= 10.0;
        }
        let lambda = damp * mean;
        let norm = mean + lambda;
        // The damped, normalised Hessian in visiting order, index-reversed (lower triangle).
        let mut a = vec![0.0f64; n * n];
        a.par_chunks_mut(n).enumerate().for_each(|(p, row)| {
            let op = perm[n - 1 - p];
            for (q, v) in row.iter_mut().enumerate().take(p + 1) {
                let oq = perm[n - 1 - q];
                *v = if p == q {
                    (diag[op] + lambda) / norm
                } else {
                    scale * sum[op.min(oq) * n + op.max(oq)] / norm
                };
            }
        });
        if cholesky_lower(&mut a, n) {
            invert_lower(&mut a, n);
            if let Some(batches) = pack_batches(&a, n, batch) {
                return Ok(Prepared {
                    perm,
                    dead,
                    batches,
                });
            }
        }
    }
    Err(GptqError::NotPositiveDefinite { damp })
}

/// `target −= Σₜ coef[t] · panel[t]` over a strip of at most [`LANES`] columns (`f64` for the
/// factorisation, `f32` for the sweep's lazy updates).
#[inline(always)]
fn strip_update<T>(target: &mut [T], coef: &[T], panel: &[[T; LANES]])
where
    T: Copy + Default + std::ops::SubAssign + std::ops::Mul<Output = T>,
{
    #[inline(always)]
    fn kernel<T>(acc: &mut [T; LANES], coef: &[T], panel: &[[T; LANES]])
    where
        T: Copy + std::ops::SubAssign + std::ops::Mul<Output = T>,
    {
        for (&x, p) in coef.iter().zip(panel) {
            for (a, &b) in acc.iter_mut().zip(p) {
                *a -= x * b;
            }
        }
    }
    if let Ok(full) = <&mut [T; LANES]>::try_from(&mut *target) {
        // A fixed-size copy stays in registers.
        let mut acc = *full;
        kernel(&mut acc, coef, panel);
        *full = acc;
    } else {
        let mut acc = [T::default(); LANES];
        for (a, &t) in acc.iter_mut().zip(target.iter()) {
            *a = t;
        }
        kernel(&mut acc, coef, panel);
        for (t, &a) in target.iter_mut().zip(&acc) {
            *t = a;
        }
    }
}

/// `Σ a[i] b[i]`.
fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Overwrites the lower triangle of `a` (`n × n`, row-major) with its Cholesky factor `L`
/// (`a = L Lᵀ`); the upper triangle is ignored and left unspecified. Blocked right-looking
/// algorithm: factor a diagonal block, solve the panel below it, update the trailing matrix (in
/// parallel). Returns `false` if `a` is not (numerically) positive definite.
fn cholesky_lower(a: &mut [f64], n: usize) -> bool {
    let mut panel: Vec<[f64; LANES]> = Vec::new();
    let mut k0 = 0;
    while k0 < n {
        let k1 = (k0 + PANEL).min(n);
        let nb = k1 - k0;
        let (top, bottom) = a.split_at_mut(k1 * n);
        let block = &mut top[k0 * n..];
        for j in 0..nb {
            let (head, tail) = block.split_at_mut((j + 1) * n);
            let rowj = &mut head[j * n..];
            let s = rowj[k0 + j] - dot(&rowj[k0..k0 + j], &rowj[k0..k0 + j]);
            if !(s > 0.0 && s.is_finite()) {
                return false;
            }
            let d = s.sqrt();
            rowj[k0 + j] = d;
            let rowj = &head[j * n..];
            for rowi in tail.chunks_exact_mut(n) {
                let v = (rowi[k0 + j] - dot(&rowi[k0..k0 + j], &rowj[k0..k0 + j])) / d;
                rowi[k0 + j] = v;
            }
        }
        let block = &top[k0 * n..];
        bottom.par_chunks_mut(n).for_each(|row| {
            for (j, rowj) in block.chunks_exact(n).enumerate() {
                let v = (row[k0 + j] - dot(&row[k0..k0 + j], &rowj[k0..k0 + j])) / rowj[k0 + j];
                row[k0 + j] = v;
            }
        });
        let m = n - k1;
        if m > 0 {
            // The panel L[k1.., k0..k1], transposed into strips of LANES rows.
            panel.clear();
            panel.resize(m.div_ceil(LANES) * nb, [0.0; LANES]);
            for (jj, row) in bottom.chunks_exact(n).enumerate() {
                let strip = &mut panel[jj / LANES * nb..][..nb];
                for (p, &v) in strip.iter_mut().zip(&row[k0..k1]) {
                    p[jj % LANES] = v;
                }
            }
            let panel = &panel;
            bottom
                .par_chunks_mut(FACTOR_TILE * n)
                .enumerate()
                .for_each(|(t, tile)| {
                    let first = t * FACTOR_TILE;
                    let last = first + tile.len() / n - 1;
                    for (c, strip) in panel.chunks_exact(nb).enumerate().take(last / LANES + 1) {
                        let c0 = c * LANES;
                        let c1 = (c0 + LANES).min(m);
                        for (r, row) in tile.chunks_exact_mut(n).enumerate() {
                            if first + r >= c0 {
                                let (left, right) = row.split_at_mut(k1);
                                strip_update(&mut right[c0..c1], &left[k0..k1], strip);
                            }
                        }
                    }
                });
        }
        k0 = k1;
    }
    true
}

/// Overwrites the lower triangle of `a` (holding a Cholesky factor `L`) with `L⁻¹`. Blocked
/// forward substitution: each diagonal block's rows are solved (in parallel over column strips),
/// then the rows below take the block's contribution (in parallel over rows).
fn invert_lower(a: &mut [f64], n: usize) {
    let mut strips: Vec<[f64; LANES]> = Vec::new();
    let mut lblock = vec![0.0f64; PANEL * PANEL];
    let mut r0 = 0;
    while r0 < n {
        let r1 = (r0 + PANEL).min(n);
        let nb = r1 - r0;
        let (top, bottom) = a.split_at_mut(r1 * n);
        let block = &mut top[r0 * n..];
        // Pack the block's L (lower) and its rows of the right-hand side over columns 0..r1: the
        // accumulated contributions left of the block and the identity inside it.
        lblock.fill(0.0);
        strips.clear();
        strips.resize(r1.div_ceil(LANES) * nb, [0.0; LANES]);
        for (i, row) in block.chunks_exact(n).enumerate() {
            lblock[i * PANEL..=i * PANEL + i].copy_from_slice(&row[r0..=r0 + i]);
            for (c, &v) in row[..r0].iter().enumerate() {
                strips[c / LANES * nb + i][c % LANES] = v;
            }
            strips[(r0 + i) / LANES * nb + i][(r0 + i) % LANES] = 1.0;
        }
        let lb = &lblock;
        strips.par_chunks_mut(nb).for_each(|strip| {
            for i in 0..nb {
                let (done, rest) = strip.split_at_mut(i);
                if let Some(target) = rest.first_mut() {
                    let mut acc = *target;
                    for (&x, p) in lb[i * PANEL..i * PANEL + i].iter().zip(done.iter()) {
                        for (a, &b) in acc.iter_mut().zip(p) {
                            *a -= x * b;
                        }
                    }
                    let d = lb[i * PANEL + i];
                    for a in acc.iter_mut() {
                        *a /= d;
                    }
                    *target = acc;
                }
            }
        });
        for (i, row) in block.chunks_exact_mut(n).enumerate() {
            for (c, v) in row[..r1].iter_mut().enumerate() {
                *v = strips[c / LANES * nb + i][c % LANES];
            }
        }
        if r1 < n {
            let strips = &strips;
            bottom.par_chunks_mut(FACTOR_TILE * n).for_each(|tile| {
                let mut coefs = vec![0.0f64; tile.len() / n * nb];
                for (row, cf) in tile.chunks_exact_mut(n).zip(coefs.chunks_exact_mut(nb)) {
                    cf.copy_from_slice(&row[r0..r1]);
                    row[r0..r1].fill(0.0);
                }
                for (c, strip) in strips.chunks_exact(nb).enumerate() {
                    let c0 = c * LANES;
                    let c1 = (c0 + LANES).min(r1);
                    for (row, cf) in tile.chunks_exact_mut(n).zip(coefs.chunks_exact(nb)) {
                        strip_update(&mut row[c0..c1], cf, strip);
                    }
                }
            });
        }
        r0 = r1;
    }
}

/// Packs `U = J M J` (`M` = the inverse factor in `m`'s lower triangle, `J` the reversal) per
/// lazy batch, in `f32`. `None` if a value is not finite or a diagonal is not positive.
fn pack_batches(m: &[f64], n: usize, batch: usize) -> Option<Vec<Batch>> {
    let u = |j: usize, k: usize| m[(n - 1 - j) * n + (n - 1 - k)] as f32;
    (0..n.div_ceil(batch))
        .into_par_iter()
        .map(|b| {
            let start = b * batch;
            let end = (start + batch).min(n);
            let len = end - start;
            let mut diag = vec![0.0f32; len * len];
            for (a, row) in diag.chunks_exact_mut(len).enumerate() {
                for (k, v) in row.iter_mut().enumerate().skip(a) {
                    *v = u(start + a, start + k);
                }
                if row[a].is_nan() || row[a] <= 0.0 {
                    return None;
                }
            }
            let mut tail = vec![[0.0f32; LANES]; (n - end).div_ceil(LANES) * len];
            for (c, strip) in tail.chunks_exact_mut(len).enumerate() {
                for (a, lanes) in strip.iter_mut().enumerate() {
                    for (l, v) in lanes.iter_mut().enumerate() {
                        let k = end + c * LANES + l;
                        if k < n {
                            *v = u(start + a, k);
                        }
                    }
                }
            }
            let finite =
                diag.iter().all(|v| v.is_finite()) && tail.iter().flatten().all(|v| v.is_finite());
            finite.then_some(Batch {
                start,
                len,
                diag,
                tail,
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The sweep.

/// Weight rows per parallel task of the sweep.
const SWEEP_TILE: usize = 16;

/// One quantization call's shared state.
struct Sweep<'a> {
    ty: GgmlType,
    cols: usize,
    block: usize,
    type_size: usize,
    row_bytes: usize,
    batch: usize,
    act_order: bool,
    prepared: &'a Prepared,
}

impl Sweep<'_> {
    /// GPTQ on the weight rows `first..` held in `weight`, writing their blocks to `out`.
    fn run(&self, first: usize, weight: &[f32], out: &mut [u8]) -> Result<(), GptqError> {
        let Self {
            ty,
            cols,
            block,
            type_size,
            row_bytes,
            batch,
            act_order,
            prepared,
        } = *self;
        let Prepared {
            perm,
            dead,
            batches,
        } = prepared;
        let nr = weight.len() / cols;
        let groups = cols / block;
        // Working copy in visiting order, dead inputs zeroed.
        let mut w = vec![0.0f32; nr * cols];
        for (dst, src) in w.chunks_exact_mut(cols).zip(weight.chunks_exact(cols)) {
            for (d, &p) in dst.iter_mut().zip(perm) {
                *d = if dead[p] { 0.0 } else { src[p] };
            }
        }
        let mut grids = vec![Grid::Q8_0 { inv: 0.0, d: 0.0 }; nr * groups];
        if act_order {
            // Static groups: every block's parameters from the original weights.
            let mut values = vec![0.0f32; block];
            for (r, src) in weight.chunks_exact(cols).enumerate() {
                for g in 0..groups {
                    for (k, v) in values.iter_mut().enumerate() {
                        let c = g * block + k;
                        *v = if dead[c] { 0.0 } else { src[c] };
                    }
                    let bytes = &mut out[r * row_bytes + g * type_size..][..type_size];
                    grids[r * groups + g] = make_grid(ty, &values, bytes, (first + r, g * block))?;
                }
            }
        }
        let mut errs = vec![0.0f32; nr * batch];
        for b in batches {
            let (start, len) = (b.start, b.len);
            let end = start + len;
            for (a, urow) in b.diag.chunks_exact(len).enumerate() {
                let j = start + a;
                if !act_order && j.is_multiple_of(block) {
                    // The block's parameters, from its current (error-updated) weights.
                    let g = j / block;
                    for r in 0..nr {
                        let values = &w[r * cols + j..][..block];
                        let bytes = &mut out[r * row_bytes + g * type_size..][..type_size];
                        grids[r * groups + g] = make_grid(ty, values, bytes, (first + r, j))?;
                    }
                }
                let c = perm[j];
                let (g, k) = (c / block, c % block);
                let ujj = urow[a];
                for r in 0..nr {
                    let wr = &mut w[r * cols..(r + 1) * cols];
                    let x = wr[j];
                    let grid = &grids[r * groups + g];
                    let q = grid.select(k, x);
                    if let Some(q) = q {
                        set_q(
                            ty,
                            &mut out[r * row_bytes + g * type_size..][..type_size],
                            k,
                            q,
                        );
                    }
                    let e = (x - grid.value(k, q.unwrap_or(0))) / ujj;
                    if !e.is_finite() {
                        return Err(GptqError::Overflow {
                            row: first + r,
                            col: c,
                        });
                    }
                    errs[r * batch + a] = e;
                    for (wk, &u) in wr[j + 1..end].iter_mut().zip(&urow[a + 1..]) {
                        *wk -= e * u;
                    }
                }
            }
            // Lazy update of the columns after the batch, one register strip at a time.
            for (s, strip) in b.tail.chunks_exact(len).enumerate() {
                let c0 = end + s * LANES;
                let c1 = (c0 + LANES).min(cols);
                for (wr, e) in w.chunks_exact_mut(cols).zip(errs.chunks_exact(batch)) {
                    strip_update(&mut wr[c0..c1], &e[..len], strip);
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Block grids: the reference encoder's parameters and llama.cpp's per-element rounding rule.

/// One row's parameters for one block: how llama.cpp's reference quantizer rounds an element
/// given the block's scales, and the value the decoder produces for an integer.
#[derive(Clone, Copy, Debug)]
enum Grid {
    /// Q8_0: `q = round(x · inv)` (half away from zero), value `q · d`.
    Q8_0 { inv: f32, d: f32 },
    /// Q4_0 / Q5_0: `q = ⌊x · id + zero + ½⌋`, value `(q − zero) · d`.
    Sym {
        id: f32,
        d: f32,
        zero: i32,
        qmax: i32,
    },
    /// Q4_1 / Q5_1: `q = ⌊(x − min) · id + ½⌋`, value `q · d + m`.
    Affine {
        id: f32,
        min: f32,
        d: f32,
        m: f32,
        qmax: i32,
    },
    /// Q4_K / Q5_K, per 32-element sub-block: `q = nearest((x + dm) / dl)`, value `dl · q − dm`.
    K {
        dl: [f32; 8],
        dm: [f32; 8],
        qmax: i32,
    },
    /// Q6_K, per 16-element sub-block: `q − 32 = nearest(x / dl)`, value `dl · (q − 32)`.
    Q6K { dl: [f32; 16] },
}

impl Grid {
    /// The stored integer for element `k` of value `x`, or `None` where the sub-block's scale is
    /// zero (every integer decodes alike; the reference encoder's integer is kept).
    #[inline]
    fn select(&self, k: usize, x: f32) -> Option<i32> {
        match *self {
            Grid::Q8_0 { inv, .. } => Some((x * inv).round().clamp(-128.0, 127.0) as i32),
            Grid::Sym { id, zero, qmax, .. } => {
                let offset = zero as f32 + 0.5;
                Some((x * id + offset).floor().clamp(0.0, qmax as f32) as i32)
            }
            Grid::Affine { id, min, qmax, .. } => {
                Some(((x - min) * id + 0.5).floor().clamp(0.0, qmax as f32) as i32)
            }
            Grid::K { dl, dm, qmax } => {
                let (dl, dm) = (dl[k / 32], dm[k / 32]);
                (dl != 0.0).then(|| nearest((x + dm) / dl, 0, qmax))
            }
            Grid::Q6K { dl } => {
                let dl = dl[k / 16];
                (dl != 0.0).then(|| nearest(x / dl, -32, 31) + 32)
            }
        }
    }

    /// The decoded value of element `k` stored as `q`, computed as llama.cpp's decoder does.
    #[inline]
    fn value(&self, k: usize, q: i32) -> f32 {
        match *self {
            Grid::Q8_0 { d, .. } => q as f32 * d,
            Grid::Sym { d, zero, .. } => (q - zero) as f32 * d,
            Grid::Affine { d, m, .. } => q as f32 * d + m,
            Grid::K { dl, dm, .. } => dl[k / 32] * q as f32 - dm[k / 32],
            Grid::Q6K { dl } => dl[k / 16] * (q - 32) as f32,
        }
    }

    fn is_finite(&self) -> bool {
        match self {
            Grid::Q8_0 { d, .. } | Grid::Sym { d, .. } => d.is_finite(),
            Grid::Affine { d, m, .. } => d.is_finite() && m.is_finite(),
            Grid::K { dl, dm, .. } => dl.iter().chain(dm).all(|v| v.is_finite()),
            Grid::Q6K { dl } => dl.iter().all(|v| v.is_finite()),
        }
    }
}

/// llama.cpp's `nearest_int` (round half to even) of `v` clamped to `lo..=hi`.
#[inline]
fn nearest(v: f32, lo: i32, hi: i32) -> i32 {
    // Clamping first keeps the bit trick in its exact range; in-range values are unaffected.
    let v = v.clamp(lo as f32 - 1.0, hi as f32 + 1.0);
    let bits = (v + 12_582_912.0).to_bits() as i32;
    ((bits & 0x007f_ffff) - 0x0040_0000).clamp(lo, hi)
}

/// The element of largest magnitude (the first on ties) and that magnitude.
fn signed_amax(x: &[f32]) -> (f32, f32) {
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    (max, amax)
}

/// The smallest and largest element, as `quantize_row_q4_1_ref` finds them.
fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

/// Little-endian `f16` at `off` of `b`, as `f32` (NaN if out of range).
fn f16_at(b: &[u8], off: usize) -> f32 {
    match (b.get(off), b.get(off + 1)) {
        (Some(&lo), Some(&hi)) => f16::from_le_bytes([lo, hi]).to_f32(),
        _ => f32::NAN,
    }
}

/// The eight 6-bit `(scale, min)` pairs of Q4_K / Q5_K's 12 packed bytes (`get_scale_min_k4`).
fn scale_min_k4(s: &[u8; 12]) -> [(u8, u8); 8] {
    let mut out = [(0, 0); 8];
    for j in 0..4 {
        out[j] = (s[j] & 63, s[j + 4] & 63);
        out[j + 4] = (
            (s[j + 8] & 0xF) | ((s[j] >> 6) << 4),
            (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4),
        );
    }
    out
}

/// Encodes `values` (one block) with the reference quantizer into `out` and returns the grid it
/// fixes; [`GptqError::Overflow`] at `(row, col)` if its scales are not finite.
fn make_grid(
    ty: GgmlType,
    values: &[f32],
    out: &mut [u8],
    (row, col): (usize, usize),
) -> Result<Grid, GptqError> {
    let overflow = GptqError::Overflow { row, col };
    let bytes = blocks::quantize(ty, values)?;
    for (o, &b) in out.iter_mut().zip(&bytes) {
        *o = b;
    }
    let legacy_id = |d: f32| if d != 0.0 { 1.0 / d } else { 0.0 };
    let grid = match ty {
        GgmlType::Q8_0 => {
            let amax = values
                .iter()
                .fold(0f32, |m, v| if m > v.abs() { m } else { v.abs() });
            Grid::Q8_0 {
                inv: legacy_id(amax / 127.0),
                d: f16_at(&bytes, 0),
            }
        }
        GgmlType::Q4_0 | GgmlType::Q5_0 => {
            let zero = if ty == GgmlType::Q4_0 { 8 } else { 16 };
            let (max, _) = signed_amax(values);
            Grid::Sym {
                id: legacy_id(max / -(zero as f32)),
                d: f16_at(&bytes, 0),
                zero,
                qmax: 2 * zero - 1,
            }
        }
        GgmlType::Q4_1 | GgmlType::Q5_1 => {
            let qmax = if ty == GgmlType::Q4_1 { 15 } else { 31 };
            let (min, max) = min_max(values);
            Grid::Affine {
                id: legacy_id((max - min) / qmax as f32),
                min,
                d: f16_at(&bytes, 0),
                m: f16_at(&bytes, 2),
                qmax,
            }
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let (d, dmin) = (f16_at(&bytes, 0), f16_at(&bytes, 2));
            let mut packed = [0u8; 12];
            for (p, &b) in packed.iter_mut().zip(bytes.iter().skip(4)) {
                *p = b;
            }
            let (mut dl, mut dm) = ([0.0f32; 8], [0.0f32; 8]);
            for ((l, m), (sc, mn)) in dl.iter_mut().zip(&mut dm).zip(scale_min_k4(&packed)) {
                *l = d * f32::from(sc);
                *m = dmin * f32::from(mn);
            }
            let qmax = if ty == GgmlType::Q4_K { 15 } else { 31 };
            if !(d.is_finite() && dmin.is_finite()) {
                return Err(overflow);
            }
            Grid::K { dl, dm, qmax }
        }
        GgmlType::Q6_K => {
            let d = f16_at(&bytes, 208);
            if !d.is_finite() {
                return Err(overflow);
            }
            let mut dl = [0.0f32; 16];
            for (l, &s) in dl.iter_mut().zip(bytes.iter().skip(192)) {
                *l = d * f32::from(s as i8);
            }
            Grid::Q6K { dl }
        }
        _ => return Err(GptqError::Unsupported { ty }),
    };
    if grid.is_finite() {
        Ok(grid)
    } else {
        Err(overflow)
    }
}

/// Sets the bits `mask` of byte `i` of `block` to those of `bits`.
#[inline]
fn put(block: &mut [u8], i: usize, mask: u8, bits: u8) {
    if let Some(b) = block.get_mut(i) {
        *b = (*b & !mask) | (bits & mask);
    }
}

/// Stores the integer `q` of element `k` into `block`, in `ty`'s layout (`ggml-common.h`).
fn set_q(ty: GgmlType, block: &mut [u8], k: usize, q: i32) {
    let q = q as u8;
    // Legacy nibbles: byte `off + k % 16`, low nibble for the first 16 elements.
    let legacy_nibble = |block: &mut [u8], off: usize| {
        if k < QK / 2 {
            put(block, off + k, 0x0F, q);
        } else {
            put(block, off + k - QK / 2, 0xF0, q << 4);
        }
    };
    // K-quant nibbles: byte `off + 32c + k % 32` of 64-element chunk `c`, high nibble for its
    // second half.
    let (chunk, within) = (k / 64, k % 64);
    let k_nibble = |block: &mut [u8], off: usize| {
        let i = off + 32 * chunk + within % 32;
        if within < 32 {
            put(block, i, 0x0F, q);
        } else {
            put(block, i, 0xF0, q << 4);
        }
    };
    match ty {
        GgmlType::Q8_0 => put(block, 2 + k, 0xFF, q),
        GgmlType::Q4_0 => legacy_nibble(block, 2),
        GgmlType::Q4_1 => legacy_nibble(block, 4),
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let (qh, qs) = if ty == GgmlType::Q5_0 { (2, 6) } else { (4, 8) };
            legacy_nibble(block, qs);
            let bit = (k % 8) as u32;
            put(block, qh + k / 8, 1 << bit, ((q >> 4) & 1) << bit);
        }
        GgmlType::Q4_K => k_nibble(block, 16),
        GgmlType::Q5_K => {
            k_nibble(block, 48);
            let bit = (2 * chunk + within / 32) as u32;
            put(block, 16 + within % 32, 1 << bit, ((q >> 4) & 1) << bit);
        }
        GgmlType::Q6_K => {
            let (half, l) = (k / 128, k % 128);
            let (quarter, i) = (l / 32, l % 32);
            let ql = 64 * half + 32 * (quarter % 2) + i;
            if quarter < 2 {
                put(block, ql, 0x0F, q);
            } else {
                put(block, ql, 0xF0, q << 4);
            }
            let shift = 2 * quarter as u32;
            put(
                block,
                128 + 32 * half + i,
                3 << shift,
                ((q >> 4) & 3) << shift,
            );
        }
        _ => {}
    }
}

// The K-quant layouts above assume 256-element super-blocks.
const _: () = assert!(QK_K == 256 && QK == 32);

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_gguf::blocks::dequantize_to_vec;

    /// xorshift64* with uniform and normal samples.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        /// Uniform in (0, 1].
        fn unit(&mut self) -> f64 {
            ((self.next() >> 11) + 1) as f64 / (1u64 << 53) as f64
        }

        fn normal(&mut self) -> f32 {
            let (u1, u2) = (self.unit(), self.unit());
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        }
    }

    fn normals(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| rng.normal() * scale).collect()
    }

    /// A Hessian of `n` scaled identity rows: `H ∝ I`.
    fn identity_hessian(n: usize) -> Hessian {
        let mut x = vec![0.0f32; n * n];
        for i in 0..n {
            x[i * n + i] = 0.5;
        }
        let mut h = Hessian::new(n);
        h.add(&x).unwrap();
        h
    }

    /// Strongly correlated inputs: every feature a random mix of all the latent ones (a full-rank
    /// but far from isotropic covariance) plus a little noise, and a few 10× outlier channels.
    fn correlated_inputs(rng: &mut Rng, n: usize, cols: usize) -> Vec<f32> {
        let z = normals(rng, n * cols, 1.0);
        let a = normals(rng, cols * cols, 1.0 / (cols as f32).sqrt());
        let mut x = normals(rng, n * cols, 0.05);
        for (xr, zr) in x.chunks_exact_mut(cols).zip(z.chunks_exact(cols)) {
            for (&zk, ar) in zr.iter().zip(a.chunks_exact(cols)) {
                for (v, &av) in xr.iter_mut().zip(ar) {
                    *v += zk * av;
                }
            }
            for c in [3, 77, 200, 301, 450] {
                if c < cols {
                    xr[c] *= 10.0;
                }
            }
        }
        x
    }

    /// `‖(W − Ŵ) Xᵀ‖²` of the decoded `bytes`.
    fn output_error(ty: GgmlType, w: &[f32], bytes: &[u8], x: &[f32], cols: usize) -> f64 {
        let wq = dequantize_to_vec(ty, bytes, w.len()).unwrap();
        let delta: Vec<f64> = w.iter().zip(&wq).map(|(a, b)| f64::from(a - b)).collect();
        let mut total = 0.0;
        for dr in delta.chunks_exact(cols) {
            for xr in x.chunks_exact(cols) {
                let y: f64 = dr.iter().zip(xr).map(|(d, &v)| d * f64::from(v)).sum();
                total += y * y;
            }
        }
        total
    }

    #[test]
    fn identity_hessian_reproduces_round_to_nearest_exactly() {
        let mut rng = Rng(0x1234_5678);
        let (rows, cols) = (24, 512);
        let mut w = normals(&mut rng, rows * cols, 1.0);
        // Rows of very different scales, and a few outliers.
        for (r, row) in w.chunks_exact_mut(cols).enumerate() {
            let s = 10f32.powi(r as i32 % 5 - 2);
            row.iter_mut().for_each(|v| *v *= s);
            row[(r * 37) % cols] *= 8.0;
        }
        let h = identity_hessian(cols);
        for ty in GPTQ_TYPES {
            let rtn = blocks::quantize(ty, &w).unwrap();
            for settings in [
                GptqSettings::default(),
                GptqSettings {
                    block_columns: 1,
                    ..Default::default()
                },
                GptqSettings {
                    block_columns: 1000,
                    damp: 0.0,
                    act_order: true,
                },
            ] {
                let got = quantize(ty, &w, rows, cols, &h, &settings).unwrap();
                assert_eq!(got.len(), rtn.len(), "{ty}");
                let differing = got.iter().zip(&rtn).filter(|(a, b)| a != b).count();
                assert_eq!(differing, 0, "{ty} {settings:?}: {differing} bytes differ");
            }
        }
    }

    #[test]
    fn gptq_lowers_the_output_error_on_correlated_inputs() {
        let mut rng = Rng(42);
        let (rows, cols, n) = (64, 512, 1024);
        let x = correlated_inputs(&mut rng, n, cols);
        let w = normals(&mut rng, rows * cols, 0.05);
        let mut h = Hessian::new(cols);
        // In two parts, merged, to exercise `merge`.
        let (x1, x2) = x.split_at(300 * cols);
        h.add(x1).unwrap();
        let mut h2 = Hessian::new(cols);
        h2.add(x2).unwrap();
        h.merge(&h2).unwrap();
        assert_eq!(h.rows(), n);
        for ty in GPTQ_TYPES {
            let rtn = output_error(ty, &w, &blocks::quantize(ty, &w).unwrap(), &x, cols);
            for act_order in [false, true] {
                let settings = GptqSettings {
                    act_order,
                    ..Default::default()
                };
                let bytes = quantize(ty, &w, rows, cols, &h, &settings).unwrap();
                let ratio = output_error(ty, &w, &bytes, &x, cols) / rtn;
                println!("{ty:>5} act_order={act_order:<5}: GPTQ / RTN output error {ratio:.3}");
                assert!(ratio < 0.6, "{ty} act_order={act_order}: ratio {ratio}");
            }
        }
    }

    /// Checks that every decoded value of `bytes` lies on its block's grid, from the block's own
    /// scale fields: `(v − offset) / step` is an integer in the type's range.
    fn assert_on_grid(ty: GgmlType, bytes: &[u8], n: usize) {
        let values = dequantize_to_vec(ty, bytes, n).unwrap();
        let size = ty.type_size().unwrap();
        let bs = ty.block_size();
        for (blk, vals) in bytes.chunks_exact(size).zip(values.chunks_exact(bs)) {
            for (k, &v) in vals.iter().enumerate() {
                assert!(v.is_finite());
                // (step, offset, qmin, qmax) with v = step · q + offset.
                let (step, offset, lo, hi) = match ty {
                    GgmlType::Q8_0 => (f16_at(blk, 0), 0.0, -128, 127),
                    GgmlType::Q4_0 => (f16_at(blk, 0), 0.0, -8, 7),
                    GgmlType::Q5_0 => (f16_at(blk, 0), 0.0, -16, 15),
                    GgmlType::Q4_1 => (f16_at(blk, 0), f16_at(blk, 2), 0, 15),
                    GgmlType::Q5_1 => (f16_at(blk, 0), f16_at(blk, 2), 0, 31),
                    GgmlType::Q4_K | GgmlType::Q5_K => {
                        let packed: [u8; 12] = blk[4..16].try_into().unwrap();
                        let (sc, m) = scale_min_k4(&packed)[k / 32];
                        let hi = if ty == GgmlType::Q4_K { 15 } else { 31 };
                        (
                            f16_at(blk, 0) * f32::from(sc),
                            -(f16_at(blk, 2) * f32::from(m)),
                            0,
                            hi,
                        )
                    }
                    GgmlType::Q6_K => (
                        f16_at(blk, 208) * f32::from(blk[192 + k / 16] as i8),
                        0.0,
                        -32,
                        31,
                    ),
                    _ => unreachable!(),
                };
                if step == 0.0 {
                    assert_eq!(v, offset, "{ty}");
                    continue;
                }
                let t = (v - offset) / step;
                let q = t.round();
                assert!((t - q).abs() < 1e-3, "{ty}: {v} is off the grid ({t})");
                assert!(q >= lo as f32 && q <= hi as f32, "{ty}: q = {q}");
            }
        }
    }

    #[test]
    fn output_is_valid_blocks_on_the_grid() {
        let mut rng = Rng(7);
        let (rows, cols) = (20, 768);
        let mut x = correlated_inputs(&mut rng, 512, cols);
        // Two dead inputs.
        for xr in x.chunks_exact_mut(cols) {
            xr[5] = 0.0;
            xr[300] = 0.0;
        }
        let mut h = Hessian::new(cols);
        h.add(&x).unwrap();
        let w = normals(&mut rng, rows * cols, 0.3);
        for ty in GPTQ_TYPES {
            for act_order in [false, true] {
                let settings = GptqSettings {
                    act_order,
                    block_columns: 96,
                    ..Default::default()
                };
                let bytes = quantize(ty, &w, rows, cols, &h, &settings).unwrap();
                assert_eq!(bytes.len(), blocks::quantize(ty, &w).unwrap().len());
                let mut out = vec![0.0f32; rows * cols];
                blocks::dequantize(ty, &bytes, &mut out).unwrap();
                assert_on_grid(ty, &bytes, rows * cols);
                if ty == GgmlType::Q8_0 {
                    // Dead inputs get zero weights, which Q8_0 represents exactly.
                    for r in 0..rows {
                        assert_eq!(out[r * cols + 5], 0.0);
                        assert_eq!(out[r * cols + 300], 0.0);
                    }
                }
            }
        }
    }

    #[test]
    fn set_q_matches_the_decoder_layout() {
        let mut rng = Rng(99);
        for ty in GPTQ_TYPES {
            let bs = ty.block_size();
            let values = normals(&mut rng, bs, 1.0);
            let mut block = vec![0u8; ty.type_size().unwrap()];
            let grid = make_grid(ty, &values, &mut block, (0, 0)).unwrap();
            let qmax = match ty {
                GgmlType::Q8_0 => 255,
                GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4_K => 15,
                GgmlType::Q6_K => 63,
                _ => 31,
            };
            let qs: Vec<i32> = (0..bs)
                .map(|_| {
                    let q = (rng.next() % (qmax + 1)) as i32;
                    if ty == GgmlType::Q8_0 { q - 128 } else { q }
                })
                .collect();
            for (k, &q) in qs.iter().enumerate() {
                set_q(ty, &mut block, k, q);
            }
            let decoded = dequantize_to_vec(ty, &block, bs).unwrap();
            for (k, (&q, &v)) in qs.iter().zip(&decoded).enumerate() {
                assert_eq!(v.to_bits(), grid.value(k, q).to_bits(), "{ty} element {k}");
            }
        }
    }

    #[test]
    fn factor_is_the_upper_cholesky_factor_of_the_inverse() {
        let mut rng = Rng(3);
        let n = 150; // not a multiple of PANEL or LANES
        let x = correlated_inputs(&mut rng, 400, n);
        let mut h = Hessian::new(n);
        h.add(&x).unwrap();
        let batch = 40;
        let p = prepare(&h, &TEXTBOOK, batch).unwrap();
        // Rebuild U and the damped, normalised H the factor was made from.
        let mut u = vec![0.0f64; n * n];
        for b in &p.batches {
            for a in 0..b.len {
                for k in a..b.len {
                    u[(b.start + a) * n + b.start + k] = f64::from(b.diag[a * b.len + k]);
                }
                for (s, strip) in b.tail.chunks_exact(b.len).enumerate() {
                    for (l, &v) in strip[a].iter().enumerate() {
                        let k = b.start + b.len + s * LANES + l;
                        if k < n {
                            u[(b.start + a) * n + k] = f64::from(v);
                        }
                    }
                }
            }
        }
        let s = 2.0 / h.rows() as f64;
        let full = |i: usize, j: usize| s * h.sum[i.min(j) * n + i.max(j)];
        let mean = (0..n).map(|i| full(i, i)).sum::<f64>() / n as f64;
        let hn = |i: usize, j: usize| {
            (full(i, j) + if i == j { 0.01 * mean } else { 0.0 }) / (1.01 * mean)
        };
        // U H Uᵀ = I  ⇔  H⁻¹ = Uᵀ U with U upper triangular with a positive diagonal.
        let mut uh = vec![0.0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                uh[i * n + j] = (i..n).map(|k| u[i * n + k] * hn(k, j)).sum();
            }
        }
        let mut worst = 0.0f64;
        for i in 0..n {
            assert!(u[i * n + i] > 0.0);
            for j in 0..n {
                let v: f64 = (j..n).map(|k| uh[i * n + k] * u[j * n + k]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                worst = worst.max((v - want).abs());
            }
        }
        assert!(worst < 1e-4, "U H Uᵀ deviates from I by {worst}");
    }

    /// The paper's settings, which [`naive_gptq`] implements: damping 0.01, columns in order.
    const TEXTBOOK: GptqSettings = GptqSettings {
        damp: 0.01,
        block_columns: 128,
        act_order: false,
    };

    /// Textbook GPTQ in f64: explicit `H⁻¹`, `U = chol(H⁻¹)ᵀ`, no lazy batches.
    fn naive_gptq(ty: GgmlType, w: &[f32], rows: usize, cols: usize, h: &Hessian) -> Vec<u8> {
        let n = cols;
        let s = 2.0 / h.rows() as f64;
        let mut hm: Vec<f64> = (0..n * n)
            .map(|p| {
                let (i, j) = (p / n, p % n);
                s * h.sum[i.min(j) * n + i.max(j)]
            })
            .collect();
        let dead: Vec<bool> = (0..n).map(|i| hm[i * n + i] == 0.0).collect();
        for i in 0..n {
            if dead[i] {
                hm[i * n + i] = 1.0;
            }
        }
        let mean = (0..n).map(|i| hm[i * n + i]).sum::<f64>() / n as f64;
        for i in 0..n {
            hm[i * n + i] += 0.01 * mean;
        }
        let chol = |a: &[f64]| {
            let mut l = vec![0.0f64; n * n];
            for j in 0..n {
                let s: f64 = (0..j).map(|k| l[j * n + k] * l[j * n + k]).sum();
                l[j * n + j] = (a[j * n + j] - s).sqrt();
                for i in j + 1..n {
                    let s: f64 = (0..j).map(|k| l[i * n + k] * l[j * n + k]).sum();
                    l[i * n + j] = (a[i * n + j] - s) / l[j * n + j];
                }
            }
            l
        };
        // H⁻¹ column by column from L Lᵀ x = e.
        let l = chol(&hm);
        let mut inv = vec![0.0f64; n * n];
        for c in 0..n {
            let mut y = vec![0.0f64; n];
            for i in 0..n {
                let e = if i == c { 1.0 } else { 0.0 };
                let s: f64 = (0..i).map(|k| l[i * n + k] * y[k]).sum();
                y[i] = (e - s) / l[i * n + i];
            }
            for i in (0..n).rev() {
                let s: f64 = (i + 1..n).map(|k| l[k * n + i] * inv[k * n + c]).sum();
                inv[i * n + c] = (y[i] - s) / l[i * n + i];
            }
        }
        let l2 = chol(&inv);
        let u = |j: usize, k: usize| l2[k * n + j];
        let (bs, size) = (ty.block_size(), ty.type_size().unwrap());
        let mut out = vec![0u8; rows * cols / bs * size];
        for (src, o) in w
            .chunks_exact(cols)
            .zip(out.chunks_exact_mut(cols / bs * size))
        {
            let mut wr: Vec<f64> = (0..n)
                .map(|c| if dead[c] { 0.0 } else { f64::from(src[c]) })
                .collect();
            let mut grid = None;
            for j in 0..n {
                let (g, k) = (j / bs, j % bs);
                let block = &mut o[g * size..(g + 1) * size];
                if k == 0 {
                    let vals: Vec<f32> = wr[j..j + bs].iter().map(|&v| v as f32).collect();
                    grid = make_grid(ty, &vals, block, (0, j)).ok();
                }
                let grid = grid.unwrap();
                let x = wr[j] as f32;
                let q = grid.select(k, x);
                if let Some(q) = q {
                    set_q(ty, block, k, q);
                }
                let e = (wr[j] - f64::from(grid.value(k, q.unwrap_or(0)))) / u(j, j);
                for (kk, wk) in wr.iter_mut().enumerate().skip(j + 1) {
                    *wk -= e * u(j, kk);
                }
            }
        }
        out
    }

    #[test]
    fn matches_textbook_gptq_and_ignores_the_batch_size() {
        let mut rng = Rng(11);
        let (rows, cols) = (12, 512);
        let mut x = correlated_inputs(&mut rng, 600, cols);
        for xr in x.chunks_exact_mut(cols) {
            xr[17] = 0.0;
        }
        let mut h = Hessian::new(cols);
        h.add(&x).unwrap();
        let w = normals(&mut rng, rows * cols, 0.1);
        for ty in GPTQ_TYPES {
            let base = quantize(ty, &w, rows, cols, &h, &TEXTBOOK).unwrap();
            // Every element sees the same updates in the same order whatever the batch size.
            for block_columns in [1, 32, 100, 300, 5000] {
                let settings = GptqSettings {
                    block_columns,
                    ..TEXTBOOK
                };
                let other = quantize(ty, &w, rows, cols, &h, &settings).unwrap();
                assert!(other == base, "{ty}: block_columns {block_columns}");
            }
            // The f64 textbook algorithm makes the same choices but for rare near-ties (in the
            // reference encoder's scale search, a tie changes a whole sub-block).
            let naive = naive_gptq(ty, &w, rows, cols, &h);
            let a = dequantize_to_vec(ty, &base, w.len()).unwrap();
            let b = dequantize_to_vec(ty, &naive, w.len()).unwrap();
            let differ = a.iter().zip(&b).filter(|(a, b)| a != b).count();
            let (ea, eb) = (
                output_error(ty, &w, &base, &x, cols),
                output_error(ty, &w, &naive, &x, cols),
            );
            println!(
                "{ty:>5}: {differ} of {} values differ from f64 textbook GPTQ; output error ratio {:.4}",
                w.len(),
                ea / eb
            );
            assert!(differ * 20 <= w.len(), "{ty}: {differ} values differ");
            assert!((ea / eb - 1.0).abs() < 0.03, "{ty}: {ea} vs {eb}");
        }
    }

    #[test]
    fn hessian_accumulates_two_over_n_xtx() {
        let x = [1.0f32, 2.0, 3.0, 4.0, -1.0, 0.5];
        let mut h = Hessian::new(2);
        h.add(&x).unwrap();
        assert_eq!(h.rows(), 3);
        assert_eq!(h.dim(), 2);
        // Upper triangle of Σ xᵀx.
        assert_eq!(h.sum[0], 1.0 + 9.0 + 1.0);
        assert_eq!(h.sum[1], 2.0 + 12.0 - 0.5);
        assert_eq!(h.sum[3], 4.0 + 16.0 + 0.25);
        let mut parts = Hessian::new(2);
        parts.add(&x[..2]).unwrap();
        let mut rest = Hessian::new(2);
        rest.add(&x[2..]).unwrap();
        parts.merge(&rest).unwrap();
        parts.merge(&Hessian::new(2)).unwrap();
        assert_eq!(parts, h);
        let mut empty = Hessian::new(2);
        empty.merge(&h).unwrap();
        assert_eq!(empty, h);
        h.add(&[]).unwrap();
        assert_eq!(h.rows(), 3);
    }

    #[test]
    fn bad_input_is_an_error() {
        use GptqError as E;
        let d = GptqSettings::default();
        let mut h = Hessian::new(4);
        assert_eq!(h.add(&[0.0; 6]), Err(E::InputShape { len: 6, dim: 4 }));
        assert_eq!(
            Hessian::new(0).add(&[1.0]),
            Err(E::InputShape { len: 1, dim: 0 })
        );
        assert_eq!(
            h.add(&[0.0, f32::NAN, 0.0, 0.0]),
            Err(E::NonFiniteInput { index: 1 })
        );
        assert_eq!(h.rows(), 0);
        assert_eq!(
            h.merge(&Hessian::new(5)),
            Err(E::DimensionMismatch {
                expected: 4,
                found: 5
            })
        );
        assert_eq!(
            zeroed_square(1 << 33),
            Err(E::HessianTooLarge { dim: 1 << 33 })
        );

        let h32 = identity_hessian(32);
        let w = vec![0.5f32; 64];
        let q = |ty, w: &[f32], rows, cols, h: &Hessian, s: &GptqSettings| {
            quantize(ty, w, rows, cols, h, s).unwrap_err()
        };
        assert_eq!(
            q(GgmlType::Q2_K, &w, 2, 32, &h32, &d),
            E::Unsupported { ty: GgmlType::Q2_K }
        );
        assert_eq!(
            q(GgmlType::F16, &w, 2, 32, &h32, &d),
            E::Unsupported { ty: GgmlType::F16 }
        );
        let bad = GptqSettings {
            block_columns: 0,
            ..d
        };
        assert!(matches!(
            q(GgmlType::Q4_0, &w, 2, 32, &h32, &bad),
            E::InvalidSettings { .. }
        ));
        for damp in [-0.1, f64::NAN, f64::INFINITY] {
            let bad = GptqSettings { damp, ..d };
            assert!(matches!(
                q(GgmlType::Q4_0, &w, 2, 32, &h32, &bad),
                E::InvalidSettings { .. }
            ));
        }
        assert_eq!(
            q(GgmlType::Q4_0, &w[..63], 2, 32, &h32, &d),
            E::WeightShape {
                len: 63,
                rows: 2,
                cols: 32
            }
        );
        assert!(matches!(
            q(GgmlType::Q4_0, &w, usize::MAX, 2, &h32, &d),
            E::WeightShape { .. }
        ));
        let e = q(GgmlType::Q4_0, &w[..48], 1, 48, &Hessian::new(48), &d);
        assert_eq!(
            e,
            E::Block(BlockError::PartialBlock {
                ty: GgmlType::Q4_0,
                n_elements: 48,
                block: 32
            })
        );
        assert_eq!(
            e.to_string(),
            "48 elements is not a whole number of 32-element Q4_0 blocks"
        );
        assert_eq!(
            q(GgmlType::Q4_K, &w, 2, 32, &h32, &d),
            E::Block(BlockError::PartialBlock {
                ty: GgmlType::Q4_K,
                n_elements: 32,
                block: 256
            })
        );
        assert_eq!(
            q(GgmlType::Q4_0, &w, 1, 64, &h32, &d),
            E::DimensionMismatch {
                expected: 64,
                found: 32
            }
        );
        assert_eq!(
            q(GgmlType::Q4_0, &w, 2, 32, &Hessian::new(32), &d),
            E::EmptyHessian
        );
        let mut nan = w.clone();
        nan[40] = f32::INFINITY;
        assert_eq!(
            q(GgmlType::Q4_0, &nan, 2, 32, &h32, &d),
            E::NonFiniteWeight { index: 40 }
        );
        // A rank-one Hessian without damping cannot be factored.
        let mut singular = Hessian::new(32);
        singular.add(&[1.0; 64]).unwrap();
        let undamped = GptqSettings { damp: 0.0, ..d };
        assert_eq!(
            q(GgmlType::Q4_0, &w, 2, 32, &singular, &undamped),
            E::NotPositiveDefinite { damp: 0.0 }
        );
        // With damping it can.
        assert!(quantize(GgmlType::Q4_0, &w, 2, 32, &singular, &d).is_ok());
        // Weights beyond the f16 scales (1e10 / 127 > 65504, and 1e10² is still finite).
        let huge = vec![1e10f32; 64];
        for ty in GPTQ_TYPES {
            let h = identity_hessian(ty.block_size());
            let w = vec![1e10f32; 2 * ty.block_size()];
            assert_eq!(
                q(ty, &w, 2, ty.block_size(), &h, &d),
                E::Overflow { row: 0, col: 0 },
                "{ty}"
            );
        }
        assert!(matches!(
            q(
                GgmlType::Q8_0,
                &huge,
                2,
                32,
                &h32,
                &GptqSettings {
                    act_order: true,
                    ..d
                }
            ),
            E::Overflow { .. }
        ));
        // Empty shapes are fine.
        assert_eq!(
            quantize(GgmlType::Q4_0, &[], 0, 32, &h32, &d),
            Ok(Vec::new())
        );
    }
}
