//! Matrix products on weights kept in llama.cpp's GGUF block layouts (`Q4_0`, `Q4_1`, `Q8_0`),
//! read in place (a memory-mapped file or an owned buffer), with the input rows quantized to 8 bits
//! per value in blocks of 32 ([`Q8Rows`], llama.cpp's `Q8_0` / `Q8_1` activations) and integer
//! dot products, as llama.cpp's ggml does on the CPU.
//!
//! `Q5_0` is read natively from repacked tiles (its 5-bit values unsigned, `−16 Σ q_x` added: the
//! integer dot product of llama.cpp's `ggml_vec_dot_q5_0_q8_0`, 5.5 bits per weight in memory).
//! `Q4_K` is transcoded exactly once at load (submodule `transcode`) into an internal `Q4_1`-like
//! kind with f32 sub-block scales and offsets (`d·sc`, `−dmin·m`), 6 bits per weight, which
//! dequantizes to the file's values bit for bit; its sub-blocks of 32 meet the activation blocks
//! of 32 (llama.cpp quantizes `Q4_K`'s activations in blocks of 256, `Q8_K`, so its products are
//! close to, not bit-identical with, these). Other types are not read here ([`supports`]).
//!
//! The kernels, chosen at run time: AVX2 (with FMA and F16C); the same with AVX-512 VNNI's
//! `vpdpbusd` for the integer dot products where the CPU has it (with AVX-512 VL and BW), which
//! gives the AVX2 kernel's results bit for bit; and a portable scalar path. All compute, for every
//! block of 32 values, `d_w · d_x · Σ q_w q_x` in integers and floats, plus the offset term
//! `c_w · s_x` of the 4-bit types (`c_w = m` for `Q4_1`, `-8 · d_w` for `Q4_0`, whose nibbles are
//! multiplied unsigned), where `s_x = d_x · Σ q_x`.
//!
//! The environment variable `KILN_QUANT_KERNEL` (`portable`, `avx2` or `vnni`), read once per
//! process, caps the choice for benchmarks and tests: the named kernel, or the best below it that
//! the CPU runs.
//!
//! `Q4_0`, `Q5_0` and `Q8_0` weights are repacked when the matrix is built, into tiles of 16 rows whose
//! blocks are interleaved (submodule `packed`), so that the kernels multiply 16 weight rows by several
//! input rows per loop, with the input values broadcast and no horizontal sums.
//!
//! For `Q4_1` (and weights kept in rows), a tile of input rows is multiplied by one or two weight rows at a time,
//! so each weight block is loaded and unpacked once per tile, and the weight rows a task works on
//! are taken in chunks that stay in the L2 cache while every tile of input rows passes over them.

use std::fmt;
use std::sync::{Arc, OnceLock};

use half::f16;
use kiln_gguf::GgmlType;
use rayon::prelude::*;

use crate::linear::{KernelError, LinearKernel};

mod packed;
mod transcode;

/// Shared bytes that outlive the matrix (a memory-mapped GGUF file or an owned buffer).
pub type SharedBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// Values per block (`QK` in GGML).
const QK: usize = 32;

/// Whether [`QuantMatrix`] multiplies weights of type `ty` natively (one of
/// [`QuantMatrix::SUPPORTED`]); [`QuantMatrix::new`] declines the others.
pub fn supports(ty: GgmlType) -> bool {
    QuantMatrix::SUPPORTED.contains(&ty)
}

/// The weight formats, as const-generic parameters of the kernels.
const Q4_0: u8 = 0;
const Q4_1: u8 = 1;
const Q8_0: u8 = 2;
/// `Q4_1`'s math with f32 scale and offset (`d: f32, m: f32, qs: [u8; 16]`, value `d · q + m`):
/// what `Q4_K`'s sub-blocks are transcoded into (submodule `transcode`); no GGUF type.
const Q4F: u8 = 3;
/// `Q5_0` (`d: f16, qh: u32, qs: [u8; 16]`, value `d · (q − 16)`): only ever in [`packed`]'s
/// tiles, which have its kernels (the kernels in rows do not read it).
const Q5_0: u8 = 4;

/// Bytes per block of a weight format.
const fn block_bytes(kind: u8) -> usize {
    match kind {
        Q4_0 => 18,
        Q4_1 => 20,
        Q5_0 => 22,
        Q4F => 24,
        _ => 34,
    }
}

/// Offset of the quantized values in a block.
const fn qs_offset(kind: u8) -> usize {
    match kind {
        Q4_1 => 4,
        Q5_0 => 6,
        Q4F => 8,
        _ => 2,
    }
}

fn kind_of(ty: GgmlType) -> Option<u8> {
    match ty {
        GgmlType::Q4_0 => Some(Q4_0),
        GgmlType::Q4_1 => Some(Q4_1),
        GgmlType::Q8_0 => Some(Q8_0),
        GgmlType::Q5_0 => Some(Q5_0),
        _ => None,
    }
}

/// Fewest output rows a parallel task computes (smaller tasks cost more in wake-ups than they save).
const MIN_ROWS_PER_TASK: usize = 32;

/// Products with fewer multiply-adds than this run on the calling thread.
const SERIAL_MACS: usize = 1 << 18;

/// Input blocks quantized per parallel task (below this, [`Q8Rows::quantize`] runs serially).
const QUANTIZE_BLOCKS_PER_TASK: usize = 4096;

/// Whether an `n × rows × cols` product is worth splitting across threads.
pub(crate) fn worth_splitting(n: usize, rows: usize, cols: usize) -> bool {
    n.saturating_mul(rows).saturating_mul(cols) >= SERIAL_MACS && rows >= 2 * MIN_ROWS_PER_TASK
}

/// Output features per task when `rows` of them are split over `threads` threads.
pub(crate) fn rows_per_task(rows: usize, threads: usize) -> usize {
    rows.div_ceil(threads)
        .max(MIN_ROWS_PER_TASK)
        .next_multiple_of(packed::TILE)
        .min(rows)
}

/// Weight rows per task of a single input row (decoding) beyond which the work is cut into more
/// tasks than threads, so that a thread held up elsewhere (or woken late) is made up for by the
/// others taking its share.
const DECODE_ROWS_PER_TASK: usize = 4096;

/// [`rows_per_task`] for an `n`-row product: one task per thread, except for one input row
/// through many weight rows (the output head), cut into tasks of about
/// [`DECODE_ROWS_PER_TASK`] rows (at most 8 per thread).
fn task_rows(n: usize, rows: usize, threads: usize) -> usize {
    let per_thread = if n == 1 {
        (rows / threads / DECODE_ROWS_PER_TASK).clamp(1, 8)
    } else {
        1
    };
    rows_per_task(rows, threads * per_thread)
}

// ---------------------------------------------------------------------------------------------
// Activations.

/// Input rows quantized once to 8 bits per value in blocks of 32 (f32 scale d, i8 values, and
/// s = d * sum(values) for Q4_1's offset term), reused by every matrix that reads the same input.
///
/// Each block is llama.cpp's `quantize_row_q8_1`: `d = max|x| / 127`, `q = round(x · 127 / max|x|)`
/// (ties to even, as its AVX2 path), with `d` and `s` kept in f32. The values of each row's whole
/// groups of 8 blocks are stored interleaved (32-bit word `l` of each 32 bytes from block `l`), the
/// layout the kernels multiply 8 blocks at once in.
pub struct Q8Rows {
    rows: usize,
    cols: usize,
    /// `rows × cols` values, row-major.
    qs: Vec<i8>,
    /// One scale per block, `rows × cols / 32`.
    d: Vec<f32>,
    /// `d · Σ q` per block.
    s: Vec<f32>,
    /// `-8 · Σ q` per block: `Q4_0`'s offset in integers (16 times it `Q8_0`'s), for the
    /// kernels that multiply weights unsigned and add the offset before scaling ([`packed`]).
    off: Vec<i32>,
}

impl fmt::Debug for Q8Rows {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Q8Rows")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish_non_exhaustive()
    }
}

impl Q8Rows {
    /// Quantizes `n` rows of `cols` values (`x` is `[n, cols]`, row-major); `cols` must be a
    /// multiple of 32, else [`KernelError::Shape`].
    pub fn quantize(x: &[f32], n: usize, cols: usize) -> Result<Self, KernelError> {
        let mut q = Self {
            rows: 0,
            cols: 0,
            qs: Vec::new(),
            d: Vec::new(),
            s: Vec::new(),
            off: Vec::new(),
        };
        q.requantize(x, n, cols)?;
        Ok(q)
    }

    /// [`quantize`](Self::quantize) into this value's buffers (no allocation once they are large
    /// enough).
    pub fn requantize(&mut self, x: &[f32], n: usize, cols: usize) -> Result<(), KernelError> {
        let shape = KernelError::Shape {
            rows: n,
            cols,
            len: x.len(),
        };
        if !cols.is_multiple_of(QK) || n.checked_mul(cols) != Some(x.len()) {
            return Err(shape);
        }
        let blocks = x.len() / QK;
        self.rows = n;
        self.cols = cols;
        self.qs.resize(x.len(), 0);
        self.d.resize(blocks, 0.0);
        self.s.resize(blocks, 0.0);
        self.off.resize(blocks, 0);
        if blocks == 0 {
            return Ok(());
        }
        let f = quantize_fn();
        let nb = cols / QK;
        let rows_per_task = QUANTIZE_BLOCKS_PER_TASK.div_ceil(nb);
        if n <= rows_per_task {
            f(x, &mut self.qs, &mut self.d, &mut self.s, &mut self.off, nb);
        } else {
            x.par_chunks(rows_per_task * cols)
                .zip(self.qs.par_chunks_mut(rows_per_task * cols))
                .zip(self.d.par_chunks_mut(rows_per_task * nb))
                .zip(self.s.par_chunks_mut(rows_per_task * nb))
                .zip(self.off.par_chunks_mut(rows_per_task * nb))
                .for_each(|((((x, q), d), s), o)| f(x, q, d, s, o, nb));
        }
        Ok(())
    }

    /// Input rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Values per row.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The quantized rows back in f32 (`d · q`), row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let nb = self.cols / QK;
        let mut out = vec![0f32; self.qs.len()];
        for (r, out) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
            let q = &self.qs[r * self.cols..(r + 1) * self.cols];
            for (b, out) in out.chunks_exact_mut(QK).enumerate() {
                let d = self.d[r * nb + b];
                for (v, o) in out.iter_mut().enumerate() {
                    *o = d * f32::from(q[act_index(nb / 8 * 8, b, v)]);
                }
            }
        }
        out
    }
}

/// Quantizes whole rows of `nb` blocks: `x.len() == q.len() == 32 · d.len() == 32 · s.len()`
/// `== 32 · off.len()`, a multiple of `32 · nb`.
type QuantizeFn = fn(&[f32], &mut [i8], &mut [f32], &mut [f32], &mut [i32], usize);

fn quantize_fn() -> QuantizeFn {
    match kernel() {
        // SAFETY: `kernel` picks these only where the CPU has AVX2, FMA and F16C.
        #[cfg(target_arch = "x86_64")]
        AVX2 | VNNI => |x, q, d, s, o, nb| unsafe { quantize_avx2(x, q, d, s, o, nb) },
        _ => quantize_portable,
    }
}

fn quantize_portable(
    x: &[f32],
    q: &mut [i8],
    d: &mut [f32],
    s: &mut [f32],
    off: &mut [i32],
    nb: usize,
) {
    let grouped = nb / 8 * 8;
    for ((((x, q), d), s), off) in x
        .chunks_exact(nb * QK)
        .zip(q.chunks_exact_mut(nb * QK))
        .zip(d.chunks_exact_mut(nb))
        .zip(s.chunks_exact_mut(nb))
        .zip(off.chunks_exact_mut(nb))
    {
        for (b, (((x, d), s), off)) in x.chunks_exact(QK).zip(d).zip(s).zip(off).enumerate() {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = amax / 127.0;
            let inv = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            let mut sum = 0i32;
            for (v, &x) in x.iter().enumerate() {
                let r = ((x * inv).round_ties_even() as i32).clamp(-128, 127);
                q[act_index(grouped, b, v)] = r as i8;
                sum += r;
            }
            (*d, *s) = stored_scales(scale, sum);
            *off = -8 * sum;
        }
    }
}

/// A block's scale rounded to f16 as llama.cpp stores it in its `Q8_0`/`Q8_1` blocks, so that the
/// products see the activations llama.cpp's kernels see, and `scale · Σq` of those activations.
fn stored_scales(scale: f32, sum: i32) -> (f32, f32) {
    let d = f16::from_f32(scale).to_f32();
    (d, d * sum as f32)
}

/// The kernels' instruction sets, as const-generic parameters and as [`kernel`]'s choice:
/// portable code.
const PORTABLE: u8 = 0;
/// AVX2 with FMA and F16C.
const AVX2: u8 = 1;
/// [`AVX2`] plus AVX-512 VNNI, VL and BW (`vpdpbusd` for the integer dot products).
const VNNI: u8 = 2;

/// The instruction set the quantizer and the products use, chosen once per process: the best this
/// CPU runs, capped by `KILN_QUANT_KERNEL` (`portable`, `avx2`, `vnni`; other values are ignored).
fn kernel() -> u8 {
    static KERNEL: OnceLock<u8> = OnceLock::new();
    *KERNEL.get_or_init(|| {
        let best = best_kernel();
        match std::env::var("KILN_QUANT_KERNEL").as_deref() {
            Ok("portable") => PORTABLE,
            Ok("avx2") => best.min(AVX2),
            Ok("vnni") => best.min(VNNI),
            _ => best,
        }
    })
}

/// The best instruction set this CPU runs.
fn best_kernel() -> u8 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2") && has!("fma") && has!("f16c") {
            return if has!("avx512vnni") && has!("avx512vl") && has!("avx512bw") {
                VNNI
            } else {
                AVX2
            };
        }
    }
    PORTABLE
}

/// [`quantize_portable`] in AVX2 (the same operations, so the same values).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn quantize_avx2(
    x: &[f32],
    q: &mut [i8],
    d: &mut [f32],
    s: &mut [f32],
    off: &mut [i32],
    nb: usize,
) {
    use std::arch::x86_64::*;
    let blocks = d.len();
    assert!(
        x.len() >= blocks * QK
            && q.len() >= blocks * QK
            && s.len() >= blocks
            && off.len() >= blocks
            && nb > 0,
        "quantize buffers disagree"
    );
    let grouped = nb / 8 * 8;
    let sign = _mm256_set1_ps(-0.0);
    let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for b in 0..blocks {
        // SAFETY: `(b + 1) · 32 <= x.len(), q.len()` by the assert above; unaligned accesses.
        unsafe {
            let xp = x.as_ptr().add(b * QK);
            let v0 = _mm256_loadu_ps(xp);
            let v1 = _mm256_loadu_ps(xp.add(8));
            let v2 = _mm256_loadu_ps(xp.add(16));
            let v3 = _mm256_loadu_ps(xp.add(24));
            let m = _mm256_max_ps(
                _mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)),
            );
            let m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
            let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
            let amax = _mm_cvtss_f32(m4);
            let scale = amax / 127.0;
            let inv = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
            const ROUND: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
            let i0 = _mm256_cvtps_epi32(_mm256_round_ps::<ROUND>(_mm256_mul_ps(v0, inv)));
            let i1 = _mm256_cvtps_epi32(_mm256_round_ps::<ROUND>(_mm256_mul_ps(v1, inv)));
            let i2 = _mm256_cvtps_epi32(_mm256_round_ps::<ROUND>(_mm256_mul_ps(v2, inv)));
            let i3 = _mm256_cvtps_epi32(_mm256_round_ps::<ROUND>(_mm256_mul_ps(v3, inv)));
            let sum = hsum_epi32(_mm256_add_epi32(
                _mm256_add_epi32(i0, i1),
                _mm256_add_epi32(i2, i3),
            ));
            let p01 = _mm256_packs_epi32(i0, i1);
            let p23 = _mm256_packs_epi32(i2, i3);
            let p = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23), perm);
            let (row, rb) = (b / nb, b % nb);
            if rb < grouped {
                // Interleaved: 32-bit word `k` of the block goes to word `rb % 8` of the group's
                // `k`-th 32 bytes.
                let mut words = [0i32; 8];
                _mm256_storeu_si256(words.as_mut_ptr().cast(), p);
                let base = q
                    .as_mut_ptr()
                    .add(row * nb * QK + (rb / 8) * 256 + (rb % 8) * 4);
                for (k, &word) in words.iter().enumerate() {
                    base.add(32 * k).cast::<i32>().write_unaligned(word);
                }
            } else {
                _mm256_storeu_si256(q.as_mut_ptr().add(b * QK).cast(), p);
            }
            // `stored_scales` with F16C's conversions (the same rounding, to nearest even).
            let rounded =
                _mm_cvtph_ps(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(scale)));
            let d16 = _mm_cvtss_f32(rounded);
            *d.get_unchecked_mut(b) = d16;
            *s.get_unchecked_mut(b) = d16 * sum as f32;
            *off.get_unchecked_mut(b) = -8 * sum;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum_epi32(v: std::arch::x86_64::__m256i) -> i32 {
    use std::arch::x86_64::*;
    let x = _mm_add_epi32(_mm256_extracti128_si256(v, 1), _mm256_castsi256_si128(v));
    let x = _mm_add_epi32(x, _mm_unpackhi_epi64(x, x));
    let x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0b01));
    _mm_cvtsi128_si32(x)
}

// ---------------------------------------------------------------------------------------------
// Weights.

/// A `rows × cols` weight matrix (`rows` output features, one row per output) in a GGUF block
/// layout ([`SUPPORTED`](Self::SUPPORTED)), read in place (each row is `cols / 32` consecutive
/// blocks), except `Q4_0` and `Q8_0`, whose blocks are repacked into an owned buffer of
/// interleaved tiles of 16 rows when the matrix is built (the same values; see submodule `packed`),
/// as are `Q5_0`'s, and `Q4_K`, transcoded exactly into an owned buffer (see the module docs).
#[derive(Clone)]
pub struct QuantMatrix {
    ty: GgmlType,
    kind: u8,
    rows: usize,
    cols: usize,
    data: SharedBytes,
    offset: usize,
    len: usize,
    /// The blocks are in [`packed`]'s tiles (`offset` at a tile), not in rows.
    packed: bool,
}

impl fmt::Debug for QuantMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuantMatrix")
            .field("ty", &self.ty)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("offset", &self.offset)
            .field("bytes", &self.len)
            .field("packed", &self.packed)
            .finish()
    }
}

impl QuantMatrix {
    /// Types this kernel multiplies: `Q4_0`, `Q4_1`, `Q5_0` and `Q8_0` read as stored (`Q4_0`,
    /// `Q5_0` and `Q8_0` repacked), `Q4_K` transcoded exactly at load (see the module docs).
    pub const SUPPORTED: [GgmlType; 5] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q5_0,
        GgmlType::Q4_K,
    ];

    /// `rows × cols` weights of type `ty` at `bytes[offset..offset + len]` (no copy, except
    /// `Q4_0`'s, `Q5_0`'s and `Q8_0`'s, repacked into tiles, and `Q4_K`'s, transcoded), `len`
    /// being the matrix's size in that type. [`KernelError::Declined`] for a type not in
    /// [`SUPPORTED`](Self::SUPPORTED) (see [`supports`]); [`KernelError::Shape`] when `cols` is not
    /// whole blocks of the type (32 values, 256 for `Q4_K`) or the bytes are too short (its `len`
    /// is then the number of values the bytes hold).
    pub fn new(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        bytes: SharedBytes,
        offset: usize,
    ) -> Result<Self, KernelError> {
        let plain = if transcode::target(ty).is_some() {
            let all = (*bytes).as_ref();
            let Some(from) = all.get(offset..) else {
                return Err(KernelError::Shape { rows, cols, len: 0 });
            };
            let (kind, owned) = transcode::transcode(ty, rows, cols, from)?;
            Self::with_kind(ty, kind, rows, cols, Arc::new(owned), 0)?
        } else {
            Self::in_rows(ty, rows, cols, bytes, offset)?
        };
        Ok(if packed::packs(plain.kind) {
            plain.repacked()
        } else {
            plain
        })
    }

    /// [`new`](Self::new) without the repacking: the blocks in rows, as stored.
    fn in_rows(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        bytes: SharedBytes,
        offset: usize,
    ) -> Result<Self, KernelError> {
        let kind = kind_of(ty).ok_or(KernelError::Declined)?;
        Self::with_kind(ty, kind, rows, cols, bytes, offset)
    }

    /// Blocks of format `kind` in rows, as stored, for weights of type `ty`.
    fn with_kind(
        ty: GgmlType,
        kind: u8,
        rows: usize,
        cols: usize,
        bytes: SharedBytes,
        offset: usize,
    ) -> Result<Self, KernelError> {
        let available = (*bytes).as_ref().len().saturating_sub(offset);
        let bs = block_bytes(kind);
        let shape = KernelError::Shape {
            rows,
            cols,
            len: available / bs * QK,
        };
        if !cols.is_multiple_of(QK) {
            return Err(shape);
        }
        let len = rows
            .checked_mul(cols / QK)
            .and_then(|b| b.checked_mul(bs))
            .ok_or(shape.clone())?;
        if offset > (*bytes).as_ref().len() || len > available {
            return Err(shape);
        }
        Ok(Self {
            ty,
            kind,
            rows,
            cols,
            data: bytes,
            offset,
            len,
            packed: false,
        })
    }

    /// This matrix's rows (in rows) repacked into tiles, in a new buffer.
    fn repacked(&self) -> Self {
        let bytes = packed::repack(self.kind, self.data(), self.rows, self.cols / QK);
        Self {
            offset: 0,
            len: bytes.len(),
            data: Arc::new(bytes),
            packed: true,
            ..*self
        }
    }

    /// The blocks of rows `rows`, one row after another (in GGUF's layout).
    fn rows_bytes(&self, rows: std::ops::Range<usize>) -> Vec<u8> {
        if self.packed {
            packed::plain_rows(self.kind, self.data(), self.cols / QK, rows)
        } else {
            let rb = self.row_bytes();
            self.data()[rows.start * rb..rows.end * rb].to_vec()
        }
    }

    /// [`new`](Self::new) owning its bytes (`bytes` holds exactly the matrix, or more after it).
    pub fn from_vec(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        bytes: Vec<u8>,
    ) -> Result<Self, KernelError> {
        Self::new(ty, rows, cols, Arc::new(bytes), 0)
    }

    /// The matrix cut into consecutive row ranges of `rows[j]` rows each: views of the same bytes
    /// (no copy; for repacked types, when every cut falls between tiles of 16 rows, else each part
    /// repacked on its own). [`KernelError::Shape`] unless the counts add up to the matrix's rows.
    pub fn split_rows<const N: usize>(&self, rows: [usize; N]) -> Result<[Self; N], KernelError> {
        if rows.iter().sum::<usize>() != self.rows {
            return Err(KernelError::Shape {
                rows: rows.iter().sum(),
                cols: self.cols,
                len: self.rows * self.cols,
            });
        }
        if self.packed {
            let tile_bytes = self.cols / QK * packed::tile_block(self.kind);
            let mut start = 0;
            let whole_tiles = rows[..N.saturating_sub(1)].iter().all(|&n| {
                start += n;
                start.is_multiple_of(packed::TILE)
            });
            let mut start = 0;
            return Ok(rows.map(|n| {
                let range = start..start + n;
                start += n;
                if whole_tiles {
                    Self {
                        rows: n,
                        offset: self.offset + range.start / packed::TILE * tile_bytes,
                        len: packed::packed_len(self.kind, n, self.cols / QK),
                        data: Arc::clone(&self.data),
                        ..*self
                    }
                } else {
                    let bytes = self.rows_bytes(range);
                    let part = Self {
                        rows: n,
                        offset: 0,
                        len: bytes.len(),
                        data: Arc::new(bytes),
                        packed: false,
                        ..*self
                    };
                    part.repacked()
                }
            }));
        }
        let row_bytes = self.len / self.rows.max(1);
        let mut start = 0;
        Ok(rows.map(|n| {
            let part = Self {
                rows: n,
                offset: self.offset + start * row_bytes,
                len: n * row_bytes,
                data: Arc::clone(&self.data),
                ..*self
            };
            start += n;
            part
        }))
    }

    /// The weights' type (in the file; `Q4_K` is held transcoded).
    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of weights in memory (with a repacked matrix's padding to whole tiles of 16 rows, and
    /// a transcoded matrix's blocks in the layout it was transcoded into).
    pub fn bytes(&self) -> usize {
        self.len
    }

    /// The matrix's blocks.
    fn data(&self) -> &[u8] {
        &(*self.data).as_ref()[self.offset..self.offset + self.len]
    }

    /// Bytes per row.
    fn row_bytes(&self) -> usize {
        self.cols / QK * block_bytes(self.kind)
    }

    /// `out[r * out_stride + out_offset + o] = x_r · W_o` for every input row `r` and output `o`
    /// (so several matrices can write side by side into one output, e.g. fused Q|K|V); the other
    /// values of `out` are left as they are. [`KernelError::Shape`] unless `x.cols() == cols`,
    /// `out_offset + rows <= out_stride` and `out.len() == x.rows() * out_stride`.
    pub fn matmul_q8(
        &self,
        x: &Q8Rows,
        out: &mut [f32],
        out_stride: usize,
        out_offset: usize,
    ) -> Result<(), KernelError> {
        self.check(x, out, out_stride, out_offset)?;
        let n = x.rows;
        if n == 0 || self.rows == 0 {
            return Ok(());
        }
        let out_ptr = OutPtr(out.as_mut_ptr());
        let threads = rayon::current_num_threads();
        if threads <= 1 || !worth_splitting(n, self.rows, self.cols) {
            self.run(x, out_ptr, out_stride, out_offset, 0..self.rows);
            return Ok(());
        }
        // One task per thread: decoding calls this ~200 times per token, and each extra task is a
        // thread wake-up. (Within a task, the rows are taken in chunks that fit the L2 cache.)
        let per_task = task_rows(n, self.rows, threads);
        let tasks = self.rows.div_ceil(per_task);
        (0..tasks).into_par_iter().for_each(|t| {
            let first = t * per_task;
            let rows = first..(first + per_task).min(self.rows);
            self.run(x, out_ptr, out_stride, out_offset, rows);
        });
        Ok(())
    }

    /// The shape checks of [`matmul_q8`](Self::matmul_q8).
    fn check(
        &self,
        x: &Q8Rows,
        out: &[f32],
        out_stride: usize,
        out_offset: usize,
    ) -> Result<(), KernelError> {
        if x.cols != self.cols {
            return Err(KernelError::Shape {
                rows: x.rows,
                cols: self.cols,
                len: x.qs.len(),
            });
        }
        let n = x.rows;
        if out_offset
            .checked_add(self.rows)
            .is_none_or(|end| end > out_stride)
            || n.checked_mul(out_stride) != Some(out.len())
        {
            return Err(KernelError::Shape {
                rows: n,
                cols: out_stride,
                len: out.len(),
            });
        }
        Ok(())
    }

    /// Output features `rows` of a checked product, written through `out`.
    fn run(
        &self,
        x: &Q8Rows,
        out: OutPtr,
        out_stride: usize,
        out_offset: usize,
        rows: std::ops::Range<usize>,
    ) {
        if self.packed {
            packed::tiles_fn(self.kind)(&packed::Job {
                w: self.data(),
                nb: self.cols / QK,
                rows,
                x,
                out,
                stride: out_stride,
                offset: out_offset,
            });
            return;
        }
        let row_bytes = self.row_bytes();
        rows_fn(self.kind)(&Job {
            w: &self.data()[rows.start * row_bytes..rows.end * row_bytes],
            rows: rows.len(),
            nb: self.cols / QK,
            x,
            out,
            stride: out_stride,
            col0: out_offset + rows.start,
        });
    }

    /// Rows `ids` dequantized to f32, one after another (embedding lookups):
    /// [`KernelError::Shape`] unless `out.len() == ids.len() * cols`,
    /// [`KernelError::RowOutOfRange`] for an id not below `rows`.
    pub fn dequantize_rows(&self, ids: &[usize], out: &mut [f32]) -> Result<(), KernelError> {
        if ids.len().checked_mul(self.cols) != Some(out.len()) {
            return Err(KernelError::Shape {
                rows: ids.len(),
                cols: self.cols,
                len: out.len(),
            });
        }
        if let Some(&index) = ids.iter().find(|&&id| id >= self.rows) {
            return Err(KernelError::RowOutOfRange {
                index,
                rows: self.rows,
            });
        }
        let data = self.data();
        let row_bytes = self.row_bytes();
        for (&id, out) in ids.iter().zip(out.chunks_exact_mut(self.cols.max(1))) {
            if self.packed {
                packed::decode_row(self.kind, data, self.cols / QK, id, out);
            } else {
                decode_row(self.kind, &data[id * row_bytes..(id + 1) * row_bytes], out);
            }
        }
        Ok(())
    }

    /// The whole matrix in f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        if out.is_empty() {
            return out;
        }
        if self.packed {
            out.par_chunks_mut(self.cols)
                .enumerate()
                .with_min_len(64)
                .for_each(|(r, out)| {
                    packed::decode_row(self.kind, self.data(), self.cols / QK, r, out)
                });
            return out;
        }
        let row_bytes = self.row_bytes();
        out.par_chunks_mut(self.cols)
            .zip(self.data().par_chunks(row_bytes))
            .with_min_len(64)
            .for_each(|(out, w)| decode_row(self.kind, w, out));
        out
    }
}

impl LinearKernel for QuantMatrix {
    fn in_features(&self) -> usize {
        self.cols
    }

    fn out_features(&self) -> usize {
        self.rows
    }

    fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]) -> Result<(), KernelError> {
        let q = Q8Rows::quantize(x, rows, self.cols)?;
        self.matmul_q8(&q, out, self.rows, 0)
    }

    fn weight_bytes(&self) -> usize {
        self.bytes()
    }

    fn dequantize_rows(&self, ids: &[usize], out: &mut [f32]) -> Result<(), KernelError> {
        QuantMatrix::dequantize_rows(self, ids, out)
    }
}

/// `parts` stacked along their outputs (part 0's first; all of `x`'s width) times every row of
/// `x`, into `out` (`[x.rows(), Σ rows]`), with one split of the work across threads for all
/// parts together: fused projections cost one fork-join, not one per part.
pub(crate) fn matmul_stacked(
    parts: &[QuantMatrix],
    x: &Q8Rows,
    out: &mut [f32],
) -> Result<(), KernelError> {
    let total: usize = parts.iter().map(QuantMatrix::rows).sum();
    let mut offset = 0;
    for part in parts {
        part.check(x, out, total, offset)?;
        offset += part.rows;
    }
    let (n, cols) = (x.rows, x.cols);
    if n == 0 || total == 0 {
        return Ok(());
    }
    let out_ptr = OutPtr(out.as_mut_ptr());
    // Output features `range` of the stack, part by part.
    let run = |range: std::ops::Range<usize>| {
        let mut first = 0;
        for part in parts {
            let rows = range.start.max(first)..range.end.min(first + part.rows);
            if !rows.is_empty() {
                let local = rows.start - first..rows.end - first;
                part.run(x, out_ptr, total, first, local);
            }
            first += part.rows;
        }
    };
    let threads = rayon::current_num_threads();
    if threads <= 1 || !worth_splitting(n, total, cols) {
        run(0..total);
        return Ok(());
    }
    let per_task = task_rows(n, total, threads);
    (0..total.div_ceil(per_task))
        .into_par_iter()
        .for_each(|t| run(t * per_task..((t + 1) * per_task).min(total)));
    Ok(())
}

/// Reads a little-endian f16 at `b[0..2]`.
#[inline(always)]
fn f16_at(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Reads a little-endian f32 at `b[0..4]`.
#[inline(always)]
fn f32_at(b: &[u8]) -> f32 {
    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Decodes one row of blocks (the same operations as `kiln_gguf::blocks`, so the same floats).
fn decode_row(kind: u8, w: &[u8], out: &mut [f32]) {
    let bs = block_bytes(kind);
    for (b, o) in w.chunks_exact(bs).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(b);
        let (lo, hi) = o.split_at_mut(QK / 2);
        match kind {
            Q4_0 => {
                for ((&q, l), h) in b[2..18].iter().zip(lo).zip(hi) {
                    *l = f32::from((q & 0x0F) as i8 - 8) * d;
                    *h = f32::from((q >> 4) as i8 - 8) * d;
                }
            }
            Q4_1 => {
                let m = f16_at(&b[2..]);
                for ((&q, l), h) in b[4..20].iter().zip(lo).zip(hi) {
                    *l = f32::from(q & 0x0F) * d + m;
                    *h = f32::from(q >> 4) * d + m;
                }
            }
            Q5_0 => {
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                for (j, ((&q, l), h)) in b[6..22].iter().zip(lo).zip(hi).enumerate() {
                    let (bl, bh) = (((qh >> j) & 1) as u8, ((qh >> (j + 16)) & 1) as u8);
                    *l = f32::from(((q & 0x0F) | (bl << 4)) as i8 - 16) * d;
                    *h = f32::from(((q >> 4) | (bh << 4)) as i8 - 16) * d;
                }
            }
            Q4F => {
                // `Q4_K`'s `d1 · q − m1` (the offset is `−m1`, and `a + (−b)` is `a − b`).
                let (d, m) = (f32_at(b), f32_at(&b[4..]));
                for ((&q, l), h) in b[8..24].iter().zip(lo).zip(hi) {
                    *l = d * f32::from(q & 0x0F) + m;
                    *h = d * f32::from(q >> 4) + m;
                }
            }
            _ => {
                for (o, &q) in o.iter_mut().zip(&b[2..34]) {
                    *o = f32::from(q as i8) * d;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The product.

/// The output pointer, shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint output columns (see `Job`), and the borrow of `out` outlives them.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

/// One task: weight rows `w` (`rows` rows of `nb` blocks) times every input row, written to
/// `out[r · stride + col0 + j]` for input row `r` and weight row `j`. `matmul_q8` checked that
/// those elements are inside `out` and that no other task writes them.
struct Job<'a> {
    w: &'a [u8],
    rows: usize,
    nb: usize,
    x: &'a Q8Rows,
    out: OutPtr,
    stride: usize,
    col0: usize,
}

type RowsFn = fn(&Job);

/// The version [`kernel`] chose, for weight format `kind`.
fn rows_fn(kind: u8) -> RowsFn {
    match kernel() {
        // SAFETY: `kernel` picks VNNI only where the CPU has its features and AVX2's.
        #[cfg(target_arch = "x86_64")]
        VNNI => match kind {
            Q4_0 => |j| unsafe { rows_vnni::<Q4_0>(j) },
            Q4_1 => |j| unsafe { rows_vnni::<Q4_1>(j) },
            Q4F => |j| unsafe { rows_vnni::<Q4F>(j) },
            _ => |j| unsafe { rows_vnni::<Q8_0>(j) },
        },
        // SAFETY: `kernel` picks AVX2 only where the CPU has AVX2, FMA and F16C.
        #[cfg(target_arch = "x86_64")]
        AVX2 => match kind {
            Q4_0 => |j| unsafe { rows_avx2::<Q4_0>(j) },
            Q4_1 => |j| unsafe { rows_avx2::<Q4_1>(j) },
            Q4F => |j| unsafe { rows_avx2::<Q4F>(j) },
            _ => |j| unsafe { rows_avx2::<Q8_0>(j) },
        },
        _ => portable_rows_fn(kind),
    }
}

fn portable_rows_fn(kind: u8) -> RowsFn {
    match kind {
        Q4_0 => rows_portable::<Q4_0>,
        Q4_1 => rows_portable::<Q4_1>,
        Q4F => rows_portable::<Q4F>,
        _ => rows_portable::<Q8_0>,
    }
}

fn rows_portable<const K: u8>(job: &Job) {
    drive::<K, PORTABLE>(job);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn rows_avx2<const K: u8>(job: &Job) {
    if job.x.rows == 1 && job.nb <= SCRATCH {
        // SAFETY: this function runs with AVX2, FMA and F16C.
        unsafe { gemv_x86::<K, AVX2>(job) };
    } else {
        drive::<K, AVX2>(job);
    }
}

/// [`rows_avx2`] with VNNI's dot products.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn rows_vnni<const K: u8>(job: &Job) {
    if job.x.rows == 1 && job.nb <= SCRATCH {
        // SAFETY: this function runs with VNNI's features and AVX2's.
        unsafe { gemv_x86::<K, VNNI>(job) };
    } else {
        drive::<K, VNNI>(job);
    }
}

/// Bytes ahead of the weight row being multiplied that [`gemv_x86`] prefetches.
const PREFETCH_BYTES: usize = 1024;

/// [`drive`] for one input row in AVX2 or VNNI (`I`) (decoding): the same floating-point
/// operations as [`tile_x86`] with one input row, so the same results, with the weight scales
/// converted inside the loop instead of in a pass ahead of it, the weights prefetched ahead of the
/// loop, and four weight rows' sums reduced and stored together.
///
/// # Safety
/// The CPU has the features of `I` ([`AVX2`] or [`VNNI`]); inlined into a function that enables
/// them.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn gemv_x86<const K: u8, const I: u8>(job: &Job) {
    use std::arch::x86_64::*;
    let bs = block_bytes(K);
    let nb = job.nb;
    let row_bytes = nb * bs;
    let x = job.x;
    assert!(
        x.rows == 1
            && nb <= SCRATCH
            && job.w.len() >= job.rows * row_bytes
            && x.qs.len() >= nb * QK
            && x.d.len() >= nb
            && x.s.len() >= nb,
        "operands shorter than their shapes"
    );
    let w = job.w.as_ptr();
    let end = job.rows * row_bytes;
    let xs = XRow {
        qs: x.qs.as_ptr(),
        d: x.d.as_ptr(),
        s: x.s.as_ptr(),
        nb,
    };
    // SAFETY: `matmul_q8` checked `out` holds `col0 + j` for every row `j` of this task, which
    // only this task writes.
    let out = unsafe { job.out.0.add(job.col0) };
    let prefetch = |j: usize| {
        // Rows `j..j + 4` plus the distance, line by line, inside the weights.
        let from = (j * row_bytes + PREFETCH_BYTES).min(end);
        let to = ((j + 4) * row_bytes + PREFETCH_BYTES).min(end);
        let mut a = from & !63;
        while a < to {
            // SAFETY: a prefetch of an address inside the weights (no access is made).
            unsafe { _mm_prefetch::<_MM_HINT_T0>(w.add(a).cast()) };
            a += 64;
        }
    };
    let mut j = 0;
    // SAFETY: the CPU has the features of `I` (caller); row `j` of `job.w` holds `nb` blocks
    // (assert), `xs` is one input row of `nb` blocks, and outputs `j..job.rows` are this task's
    // (above).
    unsafe {
        while j + 4 <= job.rows {
            prefetch(j);
            let r: [__m256; 4] = if I == VNNI {
                // Four copies of the row kernel inlined (faster than calls to one on Zen 5).
                let row = |k: usize| w.add((j + k) * row_bytes);
                [
                    gemv_row::<K, I>(row(0), &xs),
                    gemv_row::<K, I>(row(1), &xs),
                    gemv_row::<K, I>(row(2), &xs),
                    gemv_row::<K, I>(row(3), &xs),
                ]
            } else {
                // One copy of the row kernel, called four times (the AVX2 kernel as it was tuned).
                std::array::from_fn(|k| gemv_row_avx2::<K>(w.add((j + k) * row_bytes), &xs))
            };
            // The reduction of `tile_x86`, four weight rows at once (each lane's additions are the
            // same).
            let h = _mm256_hadd_ps(_mm256_hadd_ps(r[0], r[1]), _mm256_hadd_ps(r[2], r[3]));
            let sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
            _mm_storeu_ps(out.add(j), sums);
            j += 4;
        }
        while j < job.rows {
            let r = if I == VNNI {
                gemv_row::<K, I>(w.add(j * row_bytes), &xs)
            } else {
                gemv_row_avx2::<K>(w.add(j * row_bytes), &xs)
            };
            let z = _mm256_setzero_ps();
            let h = _mm256_hadd_ps(_mm256_hadd_ps(r, z), _mm256_hadd_ps(z, z));
            let sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
            *out.add(j) = _mm_cvtss_f32(sums);
            j += 1;
        }
    }
}

/// [`gemv_row`] in AVX2, as a function with AVX2's target features (so that a closure, which does
/// not get its caller's, can call it).
///
/// # Safety
/// As [`gemv_row`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn gemv_row_avx2<const K: u8>(w: *const u8, x: &XRow) -> std::arch::x86_64::__m256 {
    // SAFETY: forwarded from the caller; this function runs with AVX2, FMA and F16C.
    unsafe { gemv_row::<K, AVX2>(w, x) }
}

/// One input row of [`Q8Rows`]: `nb` blocks.
struct XRow {
    qs: *const i8,
    d: *const f32,
    s: *const f32,
    nb: usize,
}

/// The first 4 bytes of each of the 8 blocks at `p`, `p + bs`, … (their `d`, and `m` for
/// `Q4_1`): blocks `0..4` in the first vector, `4..8` in the second; lanes of blocks past `count`
/// zero.
///
/// # Safety
/// Blocks `0..count` at `p` are readable, and a block is at least 4 bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn block_heads(
    p: *const u8,
    bs: usize,
    count: usize,
) -> (std::arch::x86_64::__m128i, std::arch::x86_64::__m128i) {
    use std::arch::x86_64::*;
    // SAFETY: only blocks `< count` are read (caller).
    let l = |k: usize| unsafe {
        if k < count {
            _mm_cvtsi32_si128(p.add(k * bs).cast::<i32>().read_unaligned())
        } else {
            _mm_setzero_si128()
        }
    };
    let a01 = _mm_unpacklo_epi32(l(0), l(1));
    let a23 = _mm_unpacklo_epi32(l(2), l(3));
    let a45 = _mm_unpacklo_epi32(l(4), l(5));
    let a67 = _mm_unpacklo_epi32(l(6), l(7));
    (_mm_unpacklo_epi64(a01, a23), _mm_unpacklo_epi64(a45, a67))
}

/// The scales `d` and offset coefficients (as [`scales_avx2`]) of the 8 blocks whose first
/// 4 bytes [`block_heads`] read.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn head_scales<const K: u8>(
    (a, b): (std::arch::x86_64::__m128i, std::arch::x86_64::__m128i),
) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256) {
    use std::arch::x86_64::*;
    // Each vector's four `d`s to its low 8 bytes, its four `m`s to the high 8.
    let split = _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
    let (a, b) = (_mm_shuffle_epi8(a, split), _mm_shuffle_epi8(b, split));
    let d = _mm256_cvtph_ps(_mm_unpacklo_epi64(a, b));
    let c = match K {
        Q4_0 => _mm256_mul_ps(d, _mm256_set1_ps(-8.0)),
        Q4_1 => _mm256_cvtph_ps(_mm_unpackhi_epi64(a, b)),
        _ => _mm256_setzero_ps(),
    };
    (d, c)
}

/// The scales `d` and offset coefficients of the (up to) 8 blocks at `p`, `p + bs`, … (lanes of
/// blocks past `count` zero): [`head_scales`] of their heads, or [`Q4F`]'s f32 fields.
///
/// # Safety
/// Blocks `0..count` at `p` are readable.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn group_scales<const K: u8>(
    p: *const u8,
    bs: usize,
    count: usize,
) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256) {
    use std::arch::x86_64::*;
    if K == Q4F {
        let (mut d, mut c) = ([0f32; 8], [0f32; 8]);
        for (k, (d, c)) in d.iter_mut().zip(&mut c).enumerate().take(count) {
            // SAFETY: block `k < count` is readable (caller), and it starts with two f32.
            unsafe {
                let b = p.add(k * bs);
                *d = b.cast::<f32>().read_unaligned();
                *c = b.add(4).cast::<f32>().read_unaligned();
            }
        }
        // SAFETY: 8 floats each.
        unsafe { (_mm256_loadu_ps(d.as_ptr()), _mm256_loadu_ps(c.as_ptr())) }
    } else {
        // SAFETY: forwarded from the caller.
        head_scales::<K>(unsafe { block_heads(p, bs, count) })
    }
}

/// The 16 bytes at `lo` and at `hi` as the low and high halves of a vector, read as a 32-byte
/// load blended with a broadcast (not an insert, which only one of Zen 3's vector pipes runs).
///
/// # Safety
/// The 32 bytes at `lo` and 16 at `hi` are readable.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load_pair(lo: *const u8, hi: *const u8) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // SAFETY: forwarded from the caller.
    unsafe {
        _mm256_blend_epi32::<0xF0>(
            _mm256_loadu_si256(lo.cast()),
            _mm256_broadcastsi128_si256(_mm_loadu_si128(hi.cast())),
        )
    }
}

/// [`row_x86`] with one input row, for the weight row at `w`, converting its scales as it goes.
///
/// # Safety
/// `w` is a row of `x.nb` blocks; `x` an input row of as many; the CPU has the features of `I`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn gemv_row<const K: u8, const I: u8>(w0: *const u8, x: &XRow) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let bs = block_bytes(K);
    let qo = qs_offset(K);
    let groups = x.nb / 8;
    // SAFETY: every pointer below stays inside the row and the input row, and the CPU has the
    // features of `I` (caller).
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let nib = _mm256_set1_epi8(0x0F);
        let mut acc = _mm256_setzero_ps();
        for g in 0..groups {
            let b = 8 * g;
            let wb = w0.add(b * bs);
            let w = wb.add(qo);
            let (dw, cw) = group_scales::<K>(wb, bs, 8);
            let y = x.qs.add(b * QK);
            let dx = _mm256_loadu_ps(x.d.add(b));
            if I == VNNI {
                // (The group's blocks follow its first four.)
                let (wv, neg) = group_operands_vnni::<K, true>(w, bs);
                let p = _mm256_cvtepi32_ps(group_dot_vnni(wv, neg, y));
                acc = _mm256_fmadd_ps(p, _mm256_mul_ps(dx, dw), acc);
                if K != Q8_0 {
                    acc = _mm256_fmadd_ps(cw, _mm256_loadu_ps(x.s.add(b)), acc);
                }
            } else if K == Q8_0 {
                let mut sum = _mm256_setzero_si256();
                for half in 0..2 {
                    let h = 16 * half;
                    // (Blocks `m + 1`, `m + 2` are in the group.)
                    let v = group_words::<true>(w.add(h), bs);
                    for (m, &v) in v.iter().enumerate() {
                        let a = _mm256_sign_epi8(v, v);
                        let yv = _mm256_loadu_si256(y.add(32 * (4 * half + m)).cast());
                        let p = _mm256_maddubs_epi16(a, _mm256_sign_epi8(yv, v));
                        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(p, ones));
                    }
                }
                let p = _mm256_cvtepi32_ps(sum);
                acc = _mm256_fmadd_ps(p, _mm256_mul_ps(dx, dw), acc);
            } else {
                // (Blocks `m + 1`, `m + 2` are in the group.)
                let v = group_words::<true>(w, bs);
                let mut sum = _mm256_setzero_si256();
                for (m, &v) in v.iter().enumerate() {
                    let lo = _mm256_and_si256(v, nib);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), nib);
                    let ylo = _mm256_loadu_si256(y.add(32 * m).cast());
                    let yhi = _mm256_loadu_si256(y.add(32 * (4 + m)).cast());
                    sum = _mm256_add_epi16(sum, _mm256_maddubs_epi16(lo, ylo));
                    sum = _mm256_add_epi16(sum, _mm256_maddubs_epi16(hi, yhi));
                }
                let sx = _mm256_loadu_ps(x.s.add(b));
                let p = _mm256_cvtepi32_ps(_mm256_madd_epi16(sum, ones));
                acc = _mm256_fmadd_ps(p, _mm256_mul_ps(dx, dw), acc);
                acc = _mm256_fmadd_ps(cw, sx, acc);
            }
        }
        // The blocks after the whole groups, as `row_x86` takes them.
        let first = 8 * groups;
        if first < x.nb {
            let rest = x.nb - first;
            let wf = w0.add(first * bs);
            let (dws, cw) = group_scales::<K>(wf, bs, rest);
            if K != Q8_0 {
                let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(rest as i32), lanes);
                let cw = _mm256_and_ps(cw, _mm256_castsi256_ps(mask));
                let sx = _mm256_maskload_ps(x.s.add(first), mask);
                acc = _mm256_fmadd_ps(cw, sx, acc);
            }
            let mut dw = [0f32; 8];
            _mm256_storeu_ps(dw.as_mut_ptr(), dws);
            for (k, &dw) in dw.iter().enumerate().take(rest) {
                let b = first + k;
                let p = wf.add(k * bs + qo);
                let (wv, wa) = block_operands::<K>(p, nib);
                let y = _mm256_loadu_si256(x.qs.add(b * QK).cast());
                let p = if K == Q8_0 {
                    block_dot::<I>(wa, _mm256_sign_epi8(y, wv), ones)
                } else {
                    block_dot::<I>(wv, y, ones)
                };
                let p = _mm256_cvtepi32_ps(p);
                let dx = _mm256_broadcast_ss(&*x.d.add(b));
                acc = _mm256_fmadd_ps(p, _mm256_mul_ps(dx, _mm256_set1_ps(dw)), acc);
            }
        }
        acc
    }
}

/// Bytes `0..16` at `p` of the 8 blocks at `p`, `p + bs`, … transposed ([`transpose4`]): 32-bit
/// lane `l` of vector `k` holds bytes `4k..4k + 4` of block `l`. `PAIR` reads them with
/// [`load_pair`], else with 16-byte loads.
///
/// # Safety
/// Those bytes are readable, and with `PAIR` 16 more after each of the first four blocks' 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn group_words<const PAIR: bool>(
    p: *const u8,
    bs: usize,
) -> [std::arch::x86_64::__m256i; 4] {
    use std::arch::x86_64::*;
    // SAFETY: forwarded from the caller.
    let r = std::array::from_fn(|m| unsafe {
        let (lo, hi) = (p.add(m * bs), p.add((m + 4) * bs));
        if PAIR {
            load_pair(lo, hi)
        } else {
            _mm256_loadu2_m128i(hi.cast(), lo.cast())
        }
    });
    transpose4(r)
}

/// One block's dot products per 32-bit lane (four products of unsigned bytes `a` and signed bytes
/// `b` each): one `vpdpbusd` with [`VNNI`], else `maddubs` (exact while each pair of products fits
/// in i16) and `madd` with `ones` (`_mm256_set1_epi16(1)`).
///
/// # Safety
/// The CPU has the features of `I`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn block_dot<const I: u8>(
    a: std::arch::x86_64::__m256i,
    b: std::arch::x86_64::__m256i,
    ones: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // SAFETY: the CPU has the features of `I` (caller).
    unsafe {
        if I == VNNI {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b)
        } else {
            _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), ones)
        }
    }
}

/// A group's weight values (the 8 blocks at `w`, `w + bs`, …, `w` at their values) as the
/// unsigned operands of [`group_dot_vnni`]: four vectors of 64 bytes in the order of the group's
/// activations (32-bit lane `l` of each half from block `l`), with masks of the bytes whose
/// activations are negated. `Q8_0`: `|w|` and the signs of `w` (the sign trick); 4-bit: the low
/// nibbles, then the high ones, and no masks.
///
/// # Safety
/// The group's blocks are readable, and with `PAIR` (see [`group_words`]) the 16 bytes after the
/// first four blocks' values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn group_operands_vnni<const K: u8, const PAIR: bool>(
    w: *const u8,
    bs: usize,
) -> (
    [std::arch::x86_64::__m512i; 4],
    [std::arch::x86_64::__mmask64; 4],
) {
    use std::arch::x86_64::*;
    let join = |a, b| _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b);
    // SAFETY: forwarded from the caller (`Q8_0`: bytes 16..32 of each value are in its block).
    let v = unsafe { group_words::<PAIR>(w, bs) };
    if K == Q8_0 {
        // SAFETY: as above.
        let u = unsafe { group_words::<PAIR>(w.add(16), bs) };
        let q = [
            join(v[0], v[1]),
            join(v[2], v[3]),
            join(u[0], u[1]),
            join(u[2], u[3]),
        ];
        (
            q.map(|q| _mm512_abs_epi8(q)),
            q.map(|q| _mm512_movepi8_mask(q)),
        )
    } else {
        let nib = _mm512_set1_epi8(0x0F);
        let (a, b) = (join(v[0], v[1]), join(v[2], v[3]));
        let hi = |x| _mm512_and_si512(_mm512_srli_epi16::<4>(x), nib);
        let lo = |x| _mm512_and_si512(x, nib);
        ([lo(a), lo(b), hi(a), hi(b)], [0; 4])
    }
}

/// A group's eight blocks' dot products (lane `l`: block `l`) of weights `w` from
/// [`group_operands_vnni`] and the 256 bytes of activations at `y` (negated where `neg` says):
/// four 512-bit `vpdpbusd`, then the two halves' sums added.
///
/// # Safety
/// The 256 bytes at `y` are readable.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn group_dot_vnni(
    w: [std::arch::x86_64::__m512i; 4],
    neg: [std::arch::x86_64::__mmask64; 4],
    y: *const i8,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let zero = _mm512_setzero_si512();
    let mut sum = zero;
    for k in 0..4 {
        // SAFETY: inside the 256 bytes at `y` (caller).
        let yk = unsafe { _mm512_loadu_si512(y.add(64 * k).cast()) };
        let yk = _mm512_mask_sub_epi8(yk, neg[k], zero, yk);
        sum = _mm512_dpbusd_epi32(sum, w[k], yk);
    }
    _mm256_add_epi32(
        _mm512_castsi512_si256(sum),
        _mm512_extracti64x4_epi64::<1>(sum),
    )
}

/// Floats of weight scales a task converts ahead of the products (per array, on the stack).
const SCRATCH: usize = 2048;
/// Input rows per tile.
const TILE_M: usize = 4;

/// Pointers and strides of one pass of `RM` input rows over a chunk of weight rows. `tile_*`
/// read `kb` blocks of `rows` weight rows, their converted scales (at least `kb` rounded up to
/// 8 each), and `kb` blocks of `RM` input rows (`qs + i · q_stride` and `d`/`s + i · b_stride`).
struct Tile {
    w: *const u8,
    dw: *const f32,
    cw: *const f32,
    /// Weight rows (`w + j · w_stride`, `dw`/`cw + j · sc_stride`).
    rows: usize,
    w_stride: usize,
    sc_stride: usize,
    /// Results: `out + i · out_stride + j`, added to what is there unless `store`.
    out: *mut f32,
    out_stride: usize,
    store: bool,
    qs: *const i8,
    q_stride: usize,
    d: *const f32,
    s: *const f32,
    b_stride: usize,
    kb: usize,
    /// Whole groups of 8 blocks at the start of the `kb` (their values interleaved, see
    /// [`Q8Rows`]); the blocks after them are plain.
    groups: usize,
}

/// The task's loops: for each chunk of blocks (normally the whole row) and chunk of weight rows
/// (sized so their scales fit the scratch and their blocks the L2 cache), convert the weight
/// scales once, then pass every tile of input rows over those weight rows.
#[inline(always)]
fn drive<const K: u8, const I: u8>(job: &Job) {
    let bs = block_bytes(K);
    let nb = job.nb;
    let row_bytes = nb * bs;
    let n = job.x.rows;
    let x = job.x;
    assert!(
        job.w.len() >= job.rows * row_bytes
            && x.qs.len() >= n * nb * QK
            && x.d.len() >= n * nb
            && x.s.len() >= n * nb,
        "operands shorter than their shapes"
    );
    // Blocks in whole groups of 8 (interleaved in `x`).
    let grouped = nb / 8 * 8;
    let mut dw = [0f32; SCRATCH];
    let mut cw = [0f32; SCRATCH];
    // A multiple of 8, so chunks start at a group.
    let kc = nb.min(SCRATCH);
    let mut k0 = 0;
    while k0 < nb {
        let kb = kc.min(nb - k0);
        let kbp = kb.next_multiple_of(8);
        let groups = grouped.saturating_sub(k0).min(kb) / 8;
        let chunk_rows = (SCRATCH / kbp).max(1);
        let mut c0 = 0;
        while c0 < job.rows {
            let cr = chunk_rows.min(job.rows - c0);
            for j in 0..cr {
                let w =
                    &job.w[(c0 + j) * row_bytes + k0 * bs..(c0 + j) * row_bytes + (k0 + kb) * bs];
                let (dw, cw) = (
                    &mut dw[j * kbp..(j + 1) * kbp],
                    &mut cw[j * kbp..(j + 1) * kbp],
                );
                #[cfg(target_arch = "x86_64")]
                if I != PORTABLE {
                    // SAFETY: `drive::<_, AVX2 | VNNI>` only runs where AVX2, FMA and F16C are.
                    unsafe { scales_avx2::<K>(w, dw, cw) };
                    continue;
                }
                scales_portable::<K>(w, dw, cw);
            }
            let mut i0 = 0;
            while i0 < n {
                let rm = TILE_M.min(n - i0);
                let tile = Tile {
                    w: job.w[c0 * row_bytes + k0 * bs..].as_ptr(),
                    dw: dw.as_ptr(),
                    cw: cw.as_ptr(),
                    rows: cr,
                    w_stride: row_bytes,
                    sc_stride: kbp,
                    // SAFETY: `matmul_q8` checked `out` holds every `(r, col0 + o)` of this task,
                    // and only this task writes them.
                    out: unsafe { job.out.0.add(i0 * job.stride + job.col0 + c0) },
                    out_stride: job.stride,
                    store: k0 == 0,
                    qs: x.qs[i0 * nb * QK + k0 * QK..].as_ptr(),
                    q_stride: nb * QK,
                    d: x.d[i0 * nb + k0..].as_ptr(),
                    s: x.s[i0 * nb + k0..].as_ptr(),
                    b_stride: nb,
                    kb,
                    groups,
                };
                // SAFETY: the rows, blocks, scales and outputs are in bounds (asserted above, by
                // the loop bounds and by `matmul_q8`), and `rm <= TILE_M`.
                unsafe { run_tile::<K, I>(rm, &tile) };
                i0 += rm;
            }
            c0 += cr;
        }
        k0 += kb;
    }
}

/// Runs the tile kernel for `rm` input rows.
///
/// # Safety
/// `t` describes valid operands for `rm` input rows; on x86-64, the CPU has the features of `I`.
#[inline(always)]
unsafe fn run_tile<const K: u8, const I: u8>(rm: usize, t: &Tile) {
    macro_rules! dispatch {
        ($($m:literal)*) => {
            match rm {
                $($m => {
                    #[cfg(target_arch = "x86_64")]
                    match I {
                        // SAFETY: forwarded from the caller.
                        VNNI => return unsafe { tile_vnni::<K, $m>(t) },
                        // SAFETY: forwarded from the caller.
                        AVX2 => return unsafe { tile_avx2::<K, $m>(t) },
                        _ => {}
                    }
                    // SAFETY: forwarded from the caller.
                    unsafe { tile_portable::<K, $m>(t) };
                })*
                _ => unreachable!("tiles have at most TILE_M rows"),
            }
        };
    }
    dispatch!(1 2 3 4);
}

/// Converts a row's block scales to f32: `dw[b] = d`, and the offset coefficient `cw[b]` (`m`
/// for `Q4_1`, `-8 · d` for `Q4_0`); `dw` and `cw` hold `w`'s blocks rounded up to 8, the
/// padding set to zero.
fn scales_portable<const K: u8>(w: &[u8], dw: &mut [f32], cw: &mut [f32]) {
    dw.fill(0.0);
    cw.fill(0.0);
    for ((b, dw), cw) in w.chunks_exact(block_bytes(K)).zip(dw).zip(cw) {
        if K == Q4F {
            (*dw, *cw) = (f32_at(b), f32_at(&b[4..]));
            continue;
        }
        *dw = f16_at(b);
        *cw = match K {
            Q4_0 => -8.0 * *dw,
            Q4_1 => f16_at(&b[2..]),
            _ => 0.0,
        };
    }
}

/// Position in a row of [`Q8Rows`] values of value `v` of block `b`, for a row of blocks whose
/// first `grouped` blocks are interleaved in groups of 8.
#[inline(always)]
fn act_index(grouped: usize, b: usize, v: usize) -> usize {
    if b < grouped {
        (b / 8) * 256 + (v / 4) * 32 + (b % 8) * 4 + v % 4
    } else {
        b * QK + v
    }
}

/// `RM` input rows times each weight row in portable code: integer dot products per block,
/// scaled and summed in f32.
///
/// # Safety
/// `t` describes valid operands for `RM` input rows.
unsafe fn tile_portable<const K: u8, const RM: usize>(t: &Tile) {
    for j in 0..t.rows {
        // SAFETY: forwarded from the caller, for weight row `j`.
        let acc = unsafe { row_portable::<K, RM>(t, j) };
        for (i, &v) in acc.iter().enumerate() {
            // SAFETY: output `(i, j)` is in bounds (caller).
            unsafe {
                let p = t.out.add(i * t.out_stride + j);
                if t.store { *p = v } else { *p += v }
            }
        }
    }
}

/// [`tile_portable`] for weight row `j`.
///
/// # Safety
/// As [`tile_portable`], `j < t.rows`.
unsafe fn row_portable<const K: u8, const RM: usize>(t: &Tile, j: usize) -> [f32; RM] {
    let bs = block_bytes(K);
    let mut acc = [0f32; RM];
    for b in 0..t.kb {
        // SAFETY: block `b` of the weight row and its scales are in bounds (caller).
        let (blk, dw, cw) = unsafe {
            (
                std::slice::from_raw_parts(t.w.add(j * t.w_stride + b * bs), bs),
                *t.dw.add(j * t.sc_stride + b),
                *t.cw.add(j * t.sc_stride + b),
            )
        };
        let mut wq = [0i8; QK];
        let qs = &blk[qs_offset(K)..];
        if K == Q8_0 {
            for (w, &q) in wq.iter_mut().zip(qs) {
                *w = q as i8;
            }
        } else {
            let (lo, hi) = wq.split_at_mut(QK / 2);
            for ((&q, l), h) in qs[..QK / 2].iter().zip(lo).zip(hi) {
                *l = (q & 0x0F) as i8;
                *h = (q >> 4) as i8;
            }
        }
        for (i, acc) in acc.iter_mut().enumerate() {
            // SAFETY: the values and scales of block `b` of input row `i` are in bounds
            // (caller); the block's group starts at `(b / 8) · 256` and spans 256 bytes.
            let (y, dx, sx) = unsafe {
                let row = t.qs.add(i * t.q_stride);
                let mut y = [0i8; QK];
                for (v, y) in y.iter_mut().enumerate() {
                    *y = *row.add(act_index(8 * t.groups, b, v));
                }
                (
                    y,
                    *t.d.add(i * t.b_stride + b),
                    *t.s.add(i * t.b_stride + b),
                )
            };
            let dot: i32 = wq
                .iter()
                .zip(y)
                .map(|(&w, y)| i32::from(w) * i32::from(y))
                .sum();
            *acc += dw * dx * dot as f32 + cw * sx;
        }
    }
    acc
}

/// [`scales_portable`] in AVX2: the scales of 8 blocks converted at once with F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn scales_avx2<const K: u8>(w: &[u8], dw: &mut [f32], cw: &mut [f32]) {
    use std::arch::x86_64::*;
    if K == Q4F {
        // f32 already: copies, the same values either way.
        return scales_portable::<K>(w, dw, cw);
    }
    let bs = block_bytes(K);
    let kb = w.len() / bs;
    assert!(
        dw.len() >= kb.next_multiple_of(8) && cw.len() >= kb.next_multiple_of(8),
        "scale scratch too short"
    );
    let low = _mm256_set1_epi32(0xFFFF);
    let mut v = 0;
    while v < kb {
        // The first 4 bytes of each of 8 blocks (`d`, and `m` for `Q4_1`), zero past the end.
        let mut h = [0i32; 8];
        for (l, h) in h.iter_mut().enumerate().take(kb - v) {
            // SAFETY: block `v + l < kb` is inside `w`, and a block is more than 4 bytes.
            *h = unsafe { w.as_ptr().add((v + l) * bs).cast::<i32>().read_unaligned() };
        }
        // SAFETY: the stores are within `dw`/`cw` (assert above); `h` is 8 values.
        unsafe {
            let g = _mm256_loadu_si256(h.as_ptr().cast());
            let d = half8(_mm256_and_si256(g, low));
            _mm256_storeu_ps(dw.as_mut_ptr().add(v), d);
            let c = match K {
                Q4_0 => _mm256_mul_ps(d, _mm256_set1_ps(-8.0)),
                Q4_1 => half8(_mm256_srli_epi32::<16>(g)),
                _ => _mm256_setzero_ps(),
            };
            _mm256_storeu_ps(cw.as_mut_ptr().add(v), c);
        }
        v += 8;
    }
}

/// Eight f16 bit patterns (the low halves of eight 32-bit lanes) to f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn half8(v: std::arch::x86_64::__m256i) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let p = _mm256_packus_epi32(v, v);
    let p = _mm256_permute4x64_epi64::<0b1000>(p);
    _mm256_cvtph_ps(_mm256_castsi256_si128(p))
}

/// One weight block at `p` as `maddubs` operands `(multiplier, unsigned)`: Q8_0's signed bytes
/// and their absolute values (the sign trick moves the signs onto the activations), or a 4-bit
/// block's nibbles, low halves first, twice.
///
/// # Safety
/// `p` points at a block's values: 32 readable bytes for Q8_0, 16 for the 4-bit types.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn block_operands<const K: u8>(
    p: *const u8,
    nib: std::arch::x86_64::__m256i,
) -> (std::arch::x86_64::__m256i, std::arch::x86_64::__m256i) {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees the bytes read here.
    unsafe {
        if K == Q8_0 {
            let v = _mm256_loadu_si256(p.cast());
            (v, _mm256_sign_epi8(v, v))
        } else {
            let q = _mm_loadu_si128(p.cast());
            let v = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(q), q), nib);
            (v, v)
        }
    }
}

/// [`tile_x86`] in AVX2.
///
/// # Safety
/// `t` describes valid operands for `RM` input rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_avx2<const K: u8, const RM: usize>(t: &Tile) {
    // SAFETY: forwarded from the caller; this function runs with AVX2, FMA and F16C.
    unsafe { tile_x86::<K, RM, AVX2>(t) }
}

/// [`tile_x86`] with VNNI's dot products.
///
/// # Safety
/// `t` describes valid operands for `RM` input rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile_vnni<const K: u8, const RM: usize>(t: &Tile) {
    // SAFETY: forwarded from the caller; this function runs with VNNI's features and AVX2's.
    unsafe { tile_x86::<K, RM, VNNI>(t) }
}

/// A tile in AVX2, or with VNNI's dot products (`I`), for `RM` input rows and one weight row.
///
/// The blocks go eight at a time (a group): the eight blocks' values are transposed in registers
/// so that 32-bit lane `l` of vector `k` holds values `4k..4k + 4` of block `l` (the layout
/// [`Q8Rows`] keeps its groups in). Then each `maddubs` (unsigned × signed bytes to i16 pairs)
/// works on eight blocks at once, the 4-bit products are summed in i16 over the whole group (at
/// most 16 · 15 · 128 per lane), and one `madd` with ones, one conversion and one multiply-add
/// with the eight blocks' combined scales `d_w · d_x` finish the group. `Q8_0` weights use the
/// sign trick (`|w|` × `sign(x, w)`) and sum in i32. The 4-bit weights are multiplied as
/// unsigned nibbles, their offset added as `Σ_b c_w · s_x`, eight blocks per multiply-add. The
/// blocks after the last whole group go one at a time.
///
/// With VNNI, a group's weight values are joined into four 64-byte vectors in the order of its
/// activations ([`group_operands_vnni`]; `Q8_0`'s signs kept as masks and moved onto the
/// activations by a masked subtraction), and each input row's group takes four 512-bit `vpdpbusd`
/// (unsigned × signed bytes, four products added into each i32 lane) and one addition of the
/// halves ([`group_dot_vnni`]); the blocks after the groups take one 256-bit `vpdpbusd` each. The
/// integer sums are the same, and so are the floating-point operations and the results.
///
/// # Safety
/// `t` describes valid operands for `RM` input rows; the CPU has the features of `I`, and this is
/// inlined into a function that enables them.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tile_x86<const K: u8, const RM: usize, const I: u8>(t: &Tile) {
    use std::arch::x86_64::*;
    for j in 0..t.rows {
        // SAFETY: forwarded from the caller, for weight row `j`; `v` holds 4 floats, and output
        // `(i, j)` is in bounds (caller).
        unsafe {
            let acc = row_x86::<K, RM, I>(t, j);
            // Four sums per 128-bit lane pair: `hadd` twice, then the two halves added. Every
            // tile size sums a row's lanes in this same order, so an input row's result does not
            // depend on how many rows share its tile (a sequence decodes alike alone and in a
            // batch).
            let zero = _mm256_setzero_ps();
            let a = |i: usize| if i < RM { acc[i] } else { zero };
            let h = _mm256_hadd_ps(_mm256_hadd_ps(a(0), a(1)), _mm256_hadd_ps(a(2), a(3)));
            let sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
            let mut v = [0f32; 4];
            _mm_storeu_ps(v.as_mut_ptr(), sums);
            for (i, &v) in v.iter().enumerate().take(RM) {
                let p = t.out.add(i * t.out_stride + j);
                if t.store { *p = v } else { *p += v }
            }
        }
    }
}

/// [`tile_x86`] for weight row `j`: `RM` accumulators whose lanes sum to the products.
///
/// # Safety
/// As [`tile_x86`], `j < t.rows`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn row_x86<const K: u8, const RM: usize, const I: u8>(
    t: &Tile,
    j: usize,
) -> [std::arch::x86_64::__m256; RM] {
    use std::arch::x86_64::*;
    let bs = block_bytes(K);
    let qo = qs_offset(K);
    // SAFETY: weight row `j` and its scales are in bounds, every pointer below stays inside the
    // operands `t` describes, and the CPU has the features of `I` (caller); the masked loads
    // touch only blocks `< kb`.
    unsafe {
        let (w0, dw0, cw0) = (
            t.w.add(j * t.w_stride),
            t.dw.add(j * t.sc_stride),
            t.cw.add(j * t.sc_stride),
        );
        let ones = _mm256_set1_epi16(1);
        let nib = _mm256_set1_epi8(0x0F);
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let mut acc = [_mm256_setzero_ps(); RM];
        for g in 0..t.groups {
            let b = 8 * g;
            let w = w0.add(b * bs + qo);
            let dw = _mm256_loadu_ps(dw0.add(b));
            if I == VNNI {
                let (wv, neg) = group_operands_vnni::<K, false>(w, bs);
                let cw = _mm256_loadu_ps(cw0.add(b));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let sum = group_dot_vnni(wv, neg, t.qs.add(i * t.q_stride + b * QK));
                    let dx = _mm256_loadu_ps(t.d.add(i * t.b_stride + b));
                    let p = _mm256_cvtepi32_ps(sum);
                    *acc = _mm256_fmadd_ps(p, _mm256_mul_ps(dx, dw), *acc);
                    if K != Q8_0 {
                        let sx = _mm256_loadu_ps(t.s.add(i * t.b_stride + b));
                        *acc = _mm256_fmadd_ps(cw, sx, *acc);
                    }
                }
            } else if K == Q8_0 {
                let mut sums = [_mm256_setzero_si256(); RM];
                for half in 0..2 {
                    let h = 16 * half;
                    let v = group_words::<false>(w.add(h), bs);
                    for (m, &v) in v.iter().enumerate() {
                        let a = _mm256_sign_epi8(v, v);
                        for (i, sum) in sums.iter_mut().enumerate() {
                            let y = _mm256_loadu_si256(
                                t.qs.add(i * t.q_stride + b * QK + 32 * (4 * half + m))
                                    .cast(),
                            );
                            let p = _mm256_maddubs_epi16(a, _mm256_sign_epi8(y, v));
                            *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(p, ones));
                        }
                    }
                }
                for (i, acc) in acc.iter_mut().enumerate() {
                    let dx = _mm256_loadu_ps(t.d.add(i * t.b_stride + b));
                    let p = _mm256_cvtepi32_ps(sums[i]);
                    *acc = _mm256_fmadd_ps(p, _mm256_mul_ps(dx, dw), *acc);
                }
            } else {
                let v = group_words::<false>(w, bs);
                let mut sums = [_mm256_setzero_si256(); RM];
                for (m, &v) in v.iter().enumerate() {
                    let lo = _mm256_and_si256(v, nib);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), nib);
                    for (i, sum) in sums.iter_mut().enumerate() {
                        let y = t.qs.add(i * t.q_stride + b * QK);
                        let ylo = _mm256_loadu_si256(y.add(32 * m).cast());
                        let yhi = _mm256_loadu_si256(y.add(32 * (4 + m)).cast());
                        *sum = _mm256_add_epi16(*sum, _mm256_maddubs_epi16(lo, ylo));
                        *sum = _mm256_add_epi16(*sum, _mm256_maddubs_epi16(hi, yhi));
                    }
                }
                let cw = _mm256_loadu_ps(cw0.add(b));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let dx = _mm256_loadu_ps(t.d.add(i * t.b_stride + b));
                    let sx = _mm256_loadu_ps(t.s.add(i * t.b_stride + b));
                    let p = _mm256_cvtepi32_ps(_mm256_madd_epi16(sums[i], ones));
                    *acc = _mm256_fmadd_ps(p, _mm256_mul_ps(dx, dw), *acc);
                    *acc = _mm256_fmadd_ps(cw, sx, *acc);
                }
            }
        }
        // The blocks after the whole groups, one at a time (their values are not interleaved).
        let first = 8 * t.groups;
        if first < t.kb {
            if K != Q8_0 {
                let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((t.kb - first) as i32), lanes);
                let cw = _mm256_maskload_ps(cw0.add(first), mask);
                for (i, acc) in acc.iter_mut().enumerate() {
                    let sx = _mm256_maskload_ps(t.s.add(i * t.b_stride + first), mask);
                    *acc = _mm256_fmadd_ps(cw, sx, *acc);
                }
            }
            for b in first..t.kb {
                let p = w0.add(b * bs + qo);
                let dw = _mm256_broadcast_ss(&*dw0.add(b));
                let (wv, wa) = block_operands::<K>(p, nib);
                for (i, acc) in acc.iter_mut().enumerate() {
                    let y = _mm256_loadu_si256(t.qs.add(i * t.q_stride + b * QK).cast());
                    let p = if K == Q8_0 {
                        block_dot::<I>(wa, _mm256_sign_epi8(y, wv), ones)
                    } else {
                        block_dot::<I>(wv, y, ones)
                    };
                    let p = _mm256_cvtepi32_ps(p);
                    let dx = _mm256_broadcast_ss(&*t.d.add(i * t.b_stride + b));
                    *acc = _mm256_fmadd_ps(p, _mm256_mul_ps(dx, dw), *acc);
                }
            }
        }
        acc
    }
}

/// Transposes 32-bit lanes within each 128-bit half: from `r[m]` = (lanes 0..4 of block `m`,
/// lanes 0..4 of block `m + 4`) to `v[k]` = lane `k` of blocks `0..8`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn transpose4(r: [std::arch::x86_64::__m256i; 4]) -> [std::arch::x86_64::__m256i; 4] {
    use std::arch::x86_64::*;
    let t0 = _mm256_unpacklo_epi32(r[0], r[1]);
    let t1 = _mm256_unpackhi_epi32(r[0], r[1]);
    let t2 = _mm256_unpacklo_epi32(r[2], r[3]);
    let t3 = _mm256_unpackhi_epi32(r[2], r[3]);
    [
        _mm256_unpacklo_epi64(t0, t2),
        _mm256_unpackhi_epi64(t0, t2),
        _mm256_unpacklo_epi64(t1, t3),
        _mm256_unpackhi_epi64(t1, t3),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_gguf::blocks;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let v = (i as u32)
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(seed.wrapping_mul(40_503))
                    >> 8;
                (v % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// `cols` rounded up to whole blocks of `ty` (256 values for `Q4_K`).
    fn fit(ty: GgmlType, cols: usize) -> usize {
        cols.next_multiple_of(ty.block_size())
    }

    fn matrix(ty: GgmlType, rows: usize, cols: usize, seed: u32) -> QuantMatrix {
        let w = values(rows * cols, seed);
        let bytes = blocks::quantize(ty, &w).unwrap();
        QuantMatrix::from_vec(ty, rows, cols, bytes).unwrap()
    }

    /// `Σ w x` in f64 over the dequantized weights and activations, and `Σ |w x|`.
    fn reference(w: &[f32], x: &[f32], rows: usize, cols: usize, n: usize) -> Vec<(f64, f64)> {
        let mut out = Vec::with_capacity(n * rows);
        for r in 0..n {
            for o in 0..rows {
                let (mut s, mut a) = (0f64, 0f64);
                for i in 0..cols {
                    let p = f64::from(x[r * cols + i]) * f64::from(w[o * cols + i]);
                    s += p;
                    a += p.abs();
                }
                out.push((s, a));
            }
        }
        out
    }

    fn close(got: f32, (want, mag): (f64, f64)) -> bool {
        (f64::from(got) - want).abs() <= 1e-5 * (want.abs() + mag) + 1e-6
    }

    #[test]
    fn split_rows_are_views_of_the_whole() {
        for ty in QuantMatrix::SUPPORTED {
            let c64 = fit(ty, 64);
            let whole = matrix(ty, 9, c64, 4);
            let all = whole.dequantize();
            let [a, b, c] = whole.split_rows([2, 4, 3]).unwrap();
            assert_eq!(a.dequantize(), all[..2 * c64], "{ty}");
            assert_eq!(b.dequantize(), all[2 * c64..6 * c64], "{ty}");
            assert_eq!(c.dequantize(), all[6 * c64..], "{ty}");
            // The parts multiply as the rows of the whole.
            let x = Q8Rows::quantize(&values(3 * c64, 5), 3, c64).unwrap();
            let mut want = vec![0f32; 3 * 9];
            whole.matmul_q8(&x, &mut want, 9, 0).unwrap();
            let mut got = vec![0f32; 3 * 9];
            for (p, first) in [(&a, 0), (&b, 2), (&c, 6)] {
                p.matmul_q8(&x, &mut got, 9, first).unwrap();
            }
            assert_eq!(got, want, "{ty}");
            assert!(whole.split_rows([2, 2]).is_err());
        }
    }

    #[test]
    fn splits_between_tiles_are_views() {
        for ty in [GgmlType::Q4_0, GgmlType::Q8_0, GgmlType::Q5_0] {
            split_case(ty);
        }
    }

    fn split_case(ty: GgmlType) {
        let (rows, cols, n) = (40, 96, 3);
        let whole = matrix(ty, rows, cols, 4);
        let all = whole.dequantize();
        let x = Q8Rows::quantize(&values(n * cols, 2), n, cols).unwrap();
        let mut want = vec![0f32; n * rows];
        whole.matmul_q8(&x, &mut want, rows, 0).unwrap();
        // Cuts at tiles: views of the same buffer; elsewhere: parts of their own.
        for (cuts, shared) in [([16, 16, 8], true), ([16, 10, 14], false)] {
            let parts = whole.split_rows(cuts).unwrap();
            let mut start = 0;
            for (p, &m) in parts.iter().zip(&cuts) {
                assert!(p.packed);
                assert_eq!(Arc::ptr_eq(&p.data, &whole.data), shared, "{cuts:?}");
                assert_eq!(p.dequantize(), all[start * cols..(start + m) * cols]);
                let mut got = vec![0f32; n * m];
                p.matmul_q8(&x, &mut got, m, 0).unwrap();
                for i in 0..n {
                    let want = &want[i * rows + start..i * rows + start + m];
                    assert_eq!(&got[i * m..(i + 1) * m], want, "{cuts:?}");
                }
                start += m;
            }
        }
    }

    /// `q`'s blocks in rows, as the file stores them (a repacked matrix unpacked).
    fn in_rows(q: &QuantMatrix) -> QuantMatrix {
        let bytes = q.rows_bytes(0..q.rows);
        let plain =
            QuantMatrix::with_kind(q.ty, q.kind, q.rows, q.cols, Arc::new(bytes), 0).unwrap();
        assert!(!plain.packed);
        plain
    }

    /// `f`'s product of rows `rows` of the repacked `q` and `x`, into outputs `offset..` of rows of
    /// `stride` that start as `7.0`.
    fn packed_product(
        f: packed::TilesFn,
        q: &QuantMatrix,
        x: &Q8Rows,
        rows: std::ops::Range<usize>,
        stride: usize,
        offset: usize,
    ) -> Vec<f32> {
        assert!(q.packed && offset + q.rows <= stride);
        let mut out = vec![7f32; x.rows() * stride];
        f(&packed::Job {
            w: q.data(),
            nb: q.cols / QK,
            rows,
            x,
            out: OutPtr(out.as_mut_ptr()),
            stride,
            offset,
        });
        out
    }

    #[test]
    fn packed_kernels_equal_the_kernels_in_rows() {
        // Rows in whole tiles of 16, with a rest, fewer than a tile; blocks fewer than a group,
        // in whole groups, with a rest; one input row (decoding) to more than a tile of them.
        let shapes = [
            (1, 1),
            (7, 7),
            (16, 8),
            (17, 9),
            (37, 18),
            (45, 25),
            (70, 48),
        ];
        for (ty, (rows, nb)) in [GgmlType::Q4_0, GgmlType::Q8_0, GgmlType::Q5_0]
            .into_iter()
            .flat_map(|ty| shapes.map(|s| (ty, s)))
        {
            let cols = nb * QK;
            let kind = kind_of(ty).unwrap();
            let kernels = packed::all_tiles_fns(kind);
            for (m, q) in [matrix(ty, rows, cols, 3), raw_matrix(ty, rows, cols, 4)]
                .iter()
                .enumerate()
            {
                assert!(q.packed);
                let plain = in_rows(q);
                assert_eq!(q.dequantize(), plain.dequantize());
                for n in [1, 2, 5, 8, 9, 19] {
                    let x = Q8Rows::quantize(&values(n * cols, 7 + n as u32), n, cols).unwrap();
                    let what = format!("{ty} matrix {m} {rows}×{cols} n={n}");
                    let reference = reference(&plain.dequantize(), &x.dequantize(), rows, cols, n);
                    // The existing kernels, on the blocks in rows (none for Q5_0).
                    let mut kernels_in_rows = Vec::new();
                    if kind != Q5_0 {
                        kernels_in_rows.push(product(portable_rows_fn(kind), &plain, &x));
                    }
                    #[cfg(target_arch = "x86_64")]
                    if best_kernel() >= AVX2 && kind != Q5_0 {
                        // SAFETY: the CPU has AVX2, FMA and F16C (above).
                        let f: RowsFn = if kind == Q8_0 {
                            |j| unsafe { rows_avx2::<Q8_0>(j) }
                        } else {
                            |j| unsafe { rows_avx2::<Q4_0>(j) }
                        };
                        kernels_in_rows.push(product(f, &plain, &x));
                    }
                    let want = packed_product(kernels[0].1, q, &x, 0..rows, rows, 0);
                    for (k, &got) in want.iter().enumerate() {
                        assert!(
                            close(got, reference[k]),
                            "{what} [{k}]: {got} vs {:?}",
                            reference[k]
                        );
                        for theirs in &kernels_in_rows {
                            let (r, mag) = reference[k];
                            let tight = 2e-6 * (r.abs() + mag) + 1e-7;
                            assert!(
                                (f64::from(got) - f64::from(theirs[k])).abs() <= tight,
                                "{what} [{k}]: {got} vs {}",
                                theirs[k]
                            );
                        }
                    }
                    for &(name, f) in &kernels {
                        // Bit for bit the portable kernel's, whole and for a range of rows
                        // written beside other outputs.
                        let got = packed_product(f, q, &x, 0..rows, rows, 0);
                        assert_eq!(got, want, "{name} {what}");
                        let (first, stride, offset) = (rows / 3, rows + 21, 5);
                        let got = packed_product(f, q, &x, first..rows, stride, offset);
                        for i in 0..n {
                            for c in 0..stride {
                                let v = got[i * stride + c];
                                if (offset + first..offset + rows).contains(&c) {
                                    assert_eq!(v, want[i * rows + c - offset], "{name} {what}");
                                } else {
                                    assert_eq!(v, 7.0, "{name} {what}: [{i}, {c}] written");
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn dequantize_equals_gguf_codec() {
        for ty in QuantMatrix::SUPPORTED {
            let (rows, cols) = (7, fit(ty, 96));
            let w = values(rows * cols, 3);
            let bytes = blocks::quantize(ty, &w).unwrap();
            let want = blocks::dequantize_to_vec(ty, &bytes, w.len()).unwrap();
            let q = QuantMatrix::from_vec(ty, rows, cols, bytes).unwrap();
            assert_eq!(q.dequantize(), want, "{ty}");
            let mut two = vec![0f32; 2 * cols];
            q.dequantize_rows(&[5, 2], &mut two).unwrap();
            assert_eq!(two[..cols], want[5 * cols..6 * cols]);
            assert_eq!(two[cols..], want[2 * cols..3 * cols]);
            // Q4_0, Q5_0 and Q8_0 are repacked into tiles of 16 rows, Q4_K transcoded into blocks
            // of 24 bytes per 32 values.
            let (stored, block) = match ty {
                GgmlType::Q4_1 => (rows, 20),
                GgmlType::Q4_K => (rows, 24),
                GgmlType::Q4_0 => (16, 18),
                GgmlType::Q5_0 => (16, 22),
                _ => (16, 34),
            };
            assert_eq!(q.bytes(), block * stored * cols / 32, "{ty}");
        }
    }

    /// `Q5_0` (in tiles) and `Q4_K` (transcoded at load): products equal the f64 product of the file's own
    /// weights (kiln-gguf's dequantizer) and the quantized activations, for one input row and
    /// many, odd row counts and parts of the matrix; lookups give the file's values.
    #[test]
    fn q5_0_and_q4_k_multiply_the_files_weights() {
        // (rows, cols, input rows): SmolLM2's `ffn_down` (1536 wide), a row of 9 super-blocks.
        let shapes = [
            (1, 256, 1),
            (37, 512, 1),
            (65, 1536, 1),
            (65, 1536, 15),
            (130, 768, 5),
            (9, 2304, 3),
            (17, 256, 38),
        ];
        for ty in [GgmlType::Q5_0, GgmlType::Q4_K] {
            for (rows, cols, n) in shapes {
                let w = values(rows * cols, 13);
                let file = blocks::quantize(ty, &w).unwrap();
                let weights = blocks::dequantize_to_vec(ty, &file, rows * cols).unwrap();
                // At an offset in a larger buffer, as in a mapped file.
                let mut mapped = vec![0xA5u8; 40];
                mapped.extend_from_slice(&file);
                let q = QuantMatrix::new(ty, rows, cols, Arc::new(mapped), 40).unwrap();
                assert_eq!(q.dequantize(), weights, "{ty} {rows}×{cols}");
                let ids: Vec<usize> = (0..rows).rev().step_by(3).collect();
                let mut looked = vec![0f32; ids.len() * cols];
                q.dequantize_rows(&ids, &mut looked).unwrap();
                for (&id, got) in ids.iter().zip(looked.chunks(cols)) {
                    assert_eq!(got, &weights[id * cols..(id + 1) * cols], "{ty} row {id}");
                }
                let x = Q8Rows::quantize(&values(n * cols, 3 + n as u32), n, cols).unwrap();
                let want = reference(&weights, &x.dequantize(), rows, cols, n);
                let mut out = vec![0f32; n * rows];
                q.matmul_q8(&x, &mut out, rows, 0).unwrap();
                for (k, (&got, &want)) in out.iter().zip(&want).enumerate() {
                    assert!(
                        close(got, want),
                        "{ty} {rows}×{cols} n={n} [{}, {}]: {got} vs {want:?}",
                        k / rows,
                        k % rows
                    );
                }
                // Parts of the matrix (an odd cut), side by side in one output.
                let cut = rows / 3 + 1;
                let [a, b] = q.split_rows([cut, rows - cut]).unwrap();
                let mut parts = vec![0f32; n * rows];
                a.matmul_q8(&x, &mut parts, rows, 0).unwrap();
                b.matmul_q8(&x, &mut parts, rows, cut).unwrap();
                assert_eq!(parts, out, "{ty} {rows}×{cols} n={n} in parts");
            }
        }
    }

    #[test]
    fn new_types_stay_small() {
        let (rows, cols) = (64, 1536);
        let w = values(rows * cols, 1);
        let size = |ty| {
            let q = QuantMatrix::from_vec(ty, rows, cols, blocks::quantize(ty, &w).unwrap());
            q.unwrap().bytes() as f64 * 8.0 / (rows * cols) as f64
        };
        // Bits per weight in memory: Q4_K's 4.5 become 6 (f32 sub-block scales), Q5_0 stays 5.5.
        assert_eq!(size(GgmlType::Q4_K), 6.0);
        assert_eq!(size(GgmlType::Q5_0), 5.5);
        assert_eq!(size(GgmlType::Q8_0), 8.5);
    }

    #[test]
    fn q5_0_and_q4_k_reject_bad_shapes() {
        let q4k = Arc::new(blocks::quantize(GgmlType::Q4_K, &values(4 * 512, 2)).unwrap());
        let q50 = Arc::new(blocks::quantize(GgmlType::Q5_0, &values(4 * 64, 2)).unwrap());
        // (type, rows, cols, byte offset): rows not whole super-blocks (Q4_K) or blocks (Q5_0);
        // bytes too short, past the end, overflowing sizes.
        let bad = [
            (GgmlType::Q4_K, 8, 256 + 32, 0),
            (GgmlType::Q5_0, 8, 48, 0),
            (GgmlType::Q4_K, 5, 512, 0),
            (GgmlType::Q4_K, 4, 512, 1),
            (GgmlType::Q4_K, 1, 256, 100_000),
            (GgmlType::Q4_K, usize::MAX, 512, 0),
            (GgmlType::Q5_0, 5, 64, 0),
            (GgmlType::Q5_0, usize::MAX / 2, 64, 0),
        ];
        for (ty, rows, cols, offset) in bad {
            let bytes = if ty == GgmlType::Q4_K { &q4k } else { &q50 };
            let made = QuantMatrix::new(ty, rows, cols, bytes.clone(), offset);
            assert!(
                matches!(made, Err(KernelError::Shape { .. })),
                "{ty:?} {rows}×{cols} at {offset}"
            );
        }
        // Exactly the bytes, or a tail of them: fine.
        assert!(QuantMatrix::new(GgmlType::Q4_K, 4, 512, q4k.clone(), 0).is_ok());
        assert!(QuantMatrix::new(GgmlType::Q4_K, 2, 512, q4k, 4 * 144).is_ok());
        assert!(QuantMatrix::new(GgmlType::Q5_0, 4, 64, q50, 0).is_ok());
        // Types neither read nor transcoded.
        for ty in [
            GgmlType::Q5_1,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
            GgmlType::F16,
        ] {
            let bytes = Arc::new(vec![0u8; 1 << 16]);
            assert_eq!(
                QuantMatrix::new(ty, 4, 256, bytes, 0).unwrap_err(),
                KernelError::Declined,
                "{ty}"
            );
            assert!(!supports(ty));
        }
        assert!(supports(GgmlType::Q5_0) && supports(GgmlType::Q4_K));
    }

    #[test]
    fn q8_rows_are_llama_q8_blocks() {
        // 3 rows of 18 blocks: two interleaved groups of 8 and 2 plain blocks each.
        let (n, cols) = (3, 576);
        let x = values(n * cols, 7);
        let q = Q8Rows::quantize(&x, n, cols).unwrap();
        assert_eq!((q.rows(), q.cols()), (n, cols));
        let back = q.dequantize();
        for (b, xb) in x.chunks(32).enumerate() {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(q.d[b], f16::from_f32(amax / 127.0).to_f32());
            let inv = 127.0 / amax;
            let mut sum = 0;
            for (i, &v) in xb.iter().enumerate() {
                let want = (v * inv).round_ties_even();
                assert_eq!(back[b * 32 + i], q.d[b] * want, "block {b} value {i}");
                sum += want as i32;
            }
            assert_eq!(q.s[b], q.d[b] * sum as f32);
        }
        // The portable quantizer gives the same bytes.
        let blocks = n * cols / 32;
        let (mut qs, mut d, mut s) = (vec![0i8; x.len()], vec![0f32; blocks], vec![0f32; blocks]);
        let mut off = vec![0i32; blocks];
        quantize_portable(&x, &mut qs, &mut d, &mut s, &mut off, cols / 32);
        assert_eq!(
            (qs, d, s, off),
            (q.qs.clone(), q.d.clone(), q.s.clone(), q.off.clone())
        );
        for (b, &o) in q.off.iter().enumerate() {
            let sum: i32 = (0..32)
                .map(|v| i32::from(q.qs[b / 18 * cols + act_index(16, b % 18, v)]))
                .sum();
            assert_eq!(o, -8 * sum, "block {b}");
        }
        // All zeros; reuse of the buffers.
        let mut z = Q8Rows::quantize(&[0.0; 32], 1, 32).unwrap();
        assert_eq!(z.dequantize(), vec![0.0; 32]);
        z.requantize(&x, n, cols).unwrap();
        assert_eq!(z.dequantize(), back);
    }

    #[test]
    fn matmul_equals_the_dequantized_product() {
        let shapes = [
            (1, 32, 1),
            (130, 576, 1),
            (200, 96, 16),
            (65, 1536, 15),
            (576, 576, 128),
            (70, 64, 3),
            (33, 160, 7),
            (257, 320, 5),
        ];
        for ty in QuantMatrix::SUPPORTED {
            for &(rows, cols, n) in &shapes {
                let cols = fit(ty, cols);
                let q = matrix(ty, rows, cols, 11);
                let w = q.dequantize();
                let x = Q8Rows::quantize(&values(n * cols, 5), n, cols).unwrap();
                let want = reference(&w, &x.dequantize(), rows, cols, n);
                let mut out = vec![0f32; n * rows];
                q.matmul_q8(&x, &mut out, rows, 0).unwrap();
                for (k, (&got, &want)) in out.iter().zip(&want).enumerate() {
                    assert!(
                        close(got, want),
                        "{ty} {rows}×{cols} n={n} [{}, {}]: {got} vs {want:?}",
                        k / rows,
                        k % rows
                    );
                }
                // The portable kernel agrees (on the blocks in rows for Q4_0's plain kernels;
                // Q5_0's kernels are on tiles only, see `packed_kernels_equal_the_kernels_in_rows`).
                if q.kind == Q5_0 {
                    continue;
                }
                let q = in_rows(&q);
                let mut portable = vec![0f32; n * rows];
                portable_rows_fn(q.kind)(&Job {
                    w: q.data(),
                    rows,
                    nb: cols / 32,
                    x: &x,
                    out: OutPtr(portable.as_mut_ptr()),
                    stride: rows,
                    col0: 0,
                });
                for (k, (&got, &want)) in portable.iter().zip(&want).enumerate() {
                    assert!(close(got, want), "portable {ty} {rows}×{cols} n={n} [{k}]");
                }
            }
        }
    }

    #[test]
    fn a_rows_result_does_not_depend_on_the_rows_beside_it() {
        // Serving batches sequences that decode alone elsewhere: bit-identical results.
        // (One input row takes its own kernel: whole groups of 8 blocks and blocks after them,
        // and weight rows in fours and after them.)
        for (ty, (rows, cols)) in QuantMatrix::SUPPORTED
            .into_iter()
            .flat_map(|ty| [(150, 320), (70, 576), (41, 64), (9, 96)].map(|s| (ty, s)))
        {
            let cols = fit(ty, cols);
            let m = matrix(ty, rows, cols, 5);
            let x = values(7 * cols, 8);
            let mut batch = vec![0f32; 7 * rows];
            m.forward(&x, 7, &mut batch).unwrap();
            for (r, want) in batch.chunks(rows).enumerate() {
                let mut alone = vec![0f32; rows];
                m.forward(&x[r * cols..(r + 1) * cols], 1, &mut alone)
                    .unwrap();
                assert_eq!(alone, want, "{ty:?} {rows}×{cols} row {r}");
            }
        }
    }

    /// `rows × cols` weights of type `ty` whose quantized values are random bytes (every nibble,
    /// and `-128` for `Q8_0`), with fixed scales.
    fn raw_matrix(ty: GgmlType, rows: usize, cols: usize, seed: u32) -> QuantMatrix {
        let (per, bs) = (ty.block_size(), ty.type_size().unwrap());
        let mut data = random_bytes(rows * cols / per * bs, seed);
        for (b, block) in data.chunks_exact_mut(bs).enumerate() {
            let d = f16::from_f32(0.01 + b as f32 * 1e-4).to_le_bytes();
            block[..2].copy_from_slice(&d);
            match ty {
                GgmlType::Q4_1 => block[2..4].copy_from_slice(&f16::from_f32(-0.05).to_le_bytes()),
                // `d` and `dmin`; the 6-bit scales and mins random.
                GgmlType::Q4_K => block[2..4].copy_from_slice(&f16::from_f32(0.003).to_le_bytes()),
                _ => {}
            }
        }
        QuantMatrix::from_vec(ty, rows, cols, data).unwrap()
    }

    fn random_bytes(len: usize, seed: u32) -> Vec<u8> {
        values(len, seed)
            .into_iter()
            .map(|v| (v * 1000.0) as i32 as u8)
            .collect()
    }

    /// `rows × cols` weights of the internal kind [`Q4F`] (which `Q4_K` is transcoded into) with
    /// random nibbles and f32 scales and offsets that no f16 holds; any number of blocks per row.
    fn raw_q4f(rows: usize, cols: usize, seed: u32) -> QuantMatrix {
        let mut data = random_bytes(rows * cols / 32 * 24, seed);
        for (b, block) in data.chunks_exact_mut(24).enumerate() {
            let d = 0.012_345_6 * (1.0 + b as f32 * 1e-3);
            let m = -0.054_321_9 - b as f32 * 1.3e-5;
            block[..4].copy_from_slice(&d.to_le_bytes());
            block[4..8].copy_from_slice(&m.to_le_bytes());
        }
        QuantMatrix::with_kind(GgmlType::Q4_K, Q4F, rows, cols, Arc::new(data), 0).unwrap()
    }

    /// `f`'s product of `q` and `x` as one task.
    fn product(f: RowsFn, q: &QuantMatrix, x: &Q8Rows) -> Vec<f32> {
        let mut out = vec![0f32; x.rows() * q.rows()];
        f(&Job {
            w: q.data(),
            rows: q.rows(),
            nb: q.cols() / QK,
            x,
            out: OutPtr(out.as_mut_ptr()),
            stride: q.rows(),
            col0: 0,
        });
        out
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn vnni_equals_avx2() {
        if best_kernel() < VNNI {
            return;
        }
        // SAFETY: the CPU has VNNI's features and AVX2's (above).
        let fns = |kind: u8| -> (RowsFn, RowsFn) {
            match kind {
                Q4_0 => (
                    |j| unsafe { rows_avx2::<Q4_0>(j) },
                    |j| unsafe { rows_vnni::<Q4_0>(j) },
                ),
                Q4_1 => (
                    |j| unsafe { rows_avx2::<Q4_1>(j) },
                    |j| unsafe { rows_vnni::<Q4_1>(j) },
                ),
                Q4F => (
                    |j| unsafe { rows_avx2::<Q4F>(j) },
                    |j| unsafe { rows_vnni::<Q4F>(j) },
                ),
                _ => (
                    |j| unsafe { rows_avx2::<Q8_0>(j) },
                    |j| unsafe { rows_vnni::<Q8_0>(j) },
                ),
            }
        };
        // One input row (its own kernel) to a prefill.
        for q in kernel_cases() {
            let (rows, cols) = (q.rows, q.cols);
            let (avx2, vnni) = fns(q.kind);
            for n in [1, 2, 3, 4, 5, 37] {
                let x = Q8Rows::quantize(&values(n * cols, 7 + n as u32), n, cols).unwrap();
                let want = product(avx2, &q, &x);
                let what = format!("{} kind {} {rows}×{cols} n={n}", q.ty, q.kind);
                assert_eq!(product(vnni, &q, &x), want, "{what}");
                let reference = reference(&q.dequantize(), &x.dequantize(), rows, cols, n);
                let portable = product(portable_rows_fn(q.kind), &q, &x);
                for (k, ((&got, &p), &r)) in want.iter().zip(&portable).zip(&reference).enumerate()
                {
                    assert!(
                        close(got, r) && close(p, r),
                        "{what} [{k}]: {got}, {p} vs {r:?}"
                    );
                }
            }
        }
    }

    /// The matrices of [`vnni_equals_avx2`]: every type with kernels in rows, as encoded and with
    /// random bytes, and the internal kind [`Q4F`] with any number of blocks, in rows; weight rows
    /// in fours and not, blocks fewer than a group, in whole groups, with a rest, and more than
    /// the scale scratch holds.
    fn kernel_cases() -> Vec<QuantMatrix> {
        let shapes = [
            (1, 1),
            (7, 7),
            (13, 8),
            (37, 9),
            (70, 18),
            (45, 25),
            (9, 48),
            (3, SCRATCH + 9),
        ];
        let mut cases = Vec::new();
        // (Q5_0 has kernels on tiles only: `packed_kernels_equal_the_kernels_in_rows`.)
        for ty in QuantMatrix::SUPPORTED
            .into_iter()
            .filter(|&t| t != GgmlType::Q5_0)
        {
            for (rows, nb) in shapes {
                let cols = fit(ty, nb * QK);
                cases.push(matrix(ty, rows, cols, 3));
                cases.push(raw_matrix(ty, rows, cols, 4));
                if ty == GgmlType::Q4_K {
                    cases.push(raw_q4f(rows, nb * QK, 5));
                }
            }
        }
        cases.iter().map(in_rows).collect()
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_and_portable_equal_the_dequantized_product() {
        if best_kernel() < AVX2 {
            return;
        }
        for q in kernel_cases() {
            // SAFETY: the CPU has AVX2, FMA and F16C (above).
            let avx2: RowsFn = match q.kind {
                Q4_0 => |j| unsafe { rows_avx2::<Q4_0>(j) },
                Q4_1 => |j| unsafe { rows_avx2::<Q4_1>(j) },
                Q4F => |j| unsafe { rows_avx2::<Q4F>(j) },
                _ => |j| unsafe { rows_avx2::<Q8_0>(j) },
            };
            let (rows, cols) = (q.rows, q.cols);
            for n in [1, 2, 5, 37] {
                let x = Q8Rows::quantize(&values(n * cols, 7 + n as u32), n, cols).unwrap();
                let what = format!("{} kind {} {rows}×{cols} n={n}", q.ty, q.kind);
                let reference = reference(&q.dequantize(), &x.dequantize(), rows, cols, n);
                let got = product(avx2, &q, &x);
                let portable = product(portable_rows_fn(q.kind), &q, &x);
                for (k, ((&got, &p), &r)) in got.iter().zip(&portable).zip(&reference).enumerate() {
                    assert!(
                        close(got, r) && close(p, r),
                        "{what} [{k}]: {got}, {p} vs {r:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn strided_output_leaves_other_columns() {
        for ty in QuantMatrix::SUPPORTED {
            let (rows, cols, n) = (100, fit(ty, 128), 6);
            let q = matrix(ty, rows, cols, 2);
            let x = Q8Rows::quantize(&values(n * cols, 9), n, cols).unwrap();
            let mut plain = vec![0f32; n * rows];
            q.matmul_q8(&x, &mut plain, rows, 0).unwrap();
            let (stride, offset) = (rows + 37, 21);
            let mut out = vec![7f32; n * stride];
            q.matmul_q8(&x, &mut out, stride, offset).unwrap();
            for r in 0..n {
                for c in 0..stride {
                    let got = out[r * stride + c];
                    if (offset..offset + rows).contains(&c) {
                        assert_eq!(got, plain[r * rows + c - offset]);
                    } else {
                        assert_eq!(got, 7.0);
                    }
                }
            }
        }
    }

    #[test]
    fn large_rows_chunk_the_blocks() {
        // More blocks per row than the scale scratch holds, so the blocks are taken in chunks.
        let (rows, cols, n) = (3, 32 * (SCRATCH + 40), 2);
        assert!(cols.is_multiple_of(256));
        for ty in QuantMatrix::SUPPORTED {
            let q = matrix(ty, rows, cols, 4);
            let x = Q8Rows::quantize(&values(n * cols, 1), n, cols).unwrap();
            let want = reference(&q.dequantize(), &x.dequantize(), rows, cols, n);
            let mut out = vec![0f32; n * rows];
            q.matmul_q8(&x, &mut out, rows, 0).unwrap();
            for (&got, &want) in out.iter().zip(&want) {
                assert!(close(got, want), "{ty}: {got} vs {want:?}");
            }
        }
    }

    #[test]
    fn close_to_the_float_product() {
        for ty in QuantMatrix::SUPPORTED {
            let (rows, cols, n) = (64, 256, 4);
            let w = values(rows * cols, 8);
            let x = values(n * cols, 6);
            let q =
                QuantMatrix::from_vec(ty, rows, cols, blocks::quantize(ty, &w).unwrap()).unwrap();
            let mut out = vec![0f32; n * rows];
            q.forward(&x, n, &mut out).unwrap();
            let want = reference(&w, &x, rows, cols, n);
            let err: f64 = out
                .iter()
                .zip(&want)
                .map(|(&g, &(w, _))| (f64::from(g) - w).powi(2))
                .sum::<f64>()
                .sqrt();
            let norm: f64 = want.iter().map(|&(w, _)| w * w).sum::<f64>().sqrt();
            let bound = if ty == GgmlType::Q8_0 { 0.02 } else { 0.1 };
            assert!(err / norm < bound, "{ty}: relative error {}", err / norm);
        }
    }

    #[test]
    fn errors() {
        let bytes = blocks::quantize(GgmlType::Q4_1, &values(4 * 64, 1)).unwrap();
        let shared: SharedBytes = Arc::new(bytes.clone());
        // Not whole blocks per row.
        assert!(matches!(
            QuantMatrix::new(GgmlType::Q4_1, 8, 32 + 16, shared.clone(), 0),
            Err(KernelError::Shape { .. })
        ));
        // Bytes too short, or past the end.
        assert!(QuantMatrix::new(GgmlType::Q4_1, 5, 64, shared.clone(), 0).is_err());
        assert!(QuantMatrix::new(GgmlType::Q4_1, 4, 64, shared.clone(), 1).is_err());
        assert!(QuantMatrix::new(GgmlType::Q4_1, 1, 64, shared.clone(), 1000).is_err());
        assert!(QuantMatrix::new(GgmlType::Q4_1, usize::MAX, 64, shared.clone(), 0).is_err());
        // Unsupported types are declined.
        assert_eq!(
            QuantMatrix::new(GgmlType::Q6_K, 4, 256, shared.clone(), 0).unwrap_err(),
            KernelError::Declined
        );
        assert!(!supports(GgmlType::F32) && supports(GgmlType::Q8_0));
        let q = QuantMatrix::new(GgmlType::Q4_1, 4, 64, shared.clone(), 0).unwrap();
        assert!(QuantMatrix::new(GgmlType::Q4_1, 2, 64, shared, 80).is_ok());
        assert!(format!("{q:?}").len() < 200);
        // Input shapes.
        assert!(Q8Rows::quantize(&[0.0; 48], 1, 48).is_err());
        assert!(Q8Rows::quantize(&[0.0; 63], 1, 64).is_err());
        let x = Q8Rows::quantize(&[0.5; 128], 2, 64).unwrap();
        let x32 = Q8Rows::quantize(&[0.5; 64], 2, 32).unwrap();
        let mut out = [0f32; 8];
        assert!(q.matmul_q8(&x32, &mut out, 4, 0).is_err());
        assert!(q.matmul_q8(&x, &mut out[..7], 4, 0).is_err());
        assert!(q.matmul_q8(&x, &mut out, 4, 1).is_err());
        assert!(q.matmul_q8(&x, &mut out, 3, 0).is_err());
        assert!(q.matmul_q8(&x, &mut out, 4, usize::MAX).is_err());
        assert!(q.matmul_q8(&x, &mut out, 4, 0).is_ok());
        let empty = Q8Rows::quantize(&[], 0, 64).unwrap();
        assert!(q.matmul_q8(&empty, &mut [], 4, 0).is_ok());
        assert!(q.forward(&[0.0; 64], 1, &mut [0.0; 3]).is_err());
        assert!(q.forward(&[0.0; 60], 1, &mut [0.0; 4]).is_err());
        // Embedding lookups.
        assert_eq!(
            q.dequantize_rows(&[4], &mut [0.0; 64]),
            Err(KernelError::RowOutOfRange { index: 4, rows: 4 })
        );
        let mut row = [0f32; 64];
        LinearKernel::dequantize_rows(&q, &[3], &mut row).unwrap();
        assert_eq!(row[..], q.dequantize()[3 * 64..]);
        assert!(q.dequantize_rows(&[1], &mut [0.0; 63]).is_err());
        assert!(q.dequantize_rows(&[], &mut []).is_ok());
    }
}
