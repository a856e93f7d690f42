//! Host matrix products `C = A · B` (f32 in, f32 out) for training's linear layers, with the
//! multiplications taken in f32 or in bf16.
//!
//! The scheme is Goto's (as in BLIS and OpenBLAS): `B` is packed in `KC × NC` blocks of `NR`-wide
//! column panels, `A` in `MC × KC` blocks of `MR`-high row panels, and a register tile of
//! `MR × NR` sums runs over each pair of panels. Packing reads any strides, so `A · B`, `A · Bᵀ`
//! and `Aᵀ · B` (a linear layer's forward pass and both products of its backward pass) are one
//! kernel.
//!
//! - [`Products::Bf16`]: both operands are rounded to bf16 (to nearest, ties to even) while they
//!   are packed, stored as pairs along the summed dimension, and multiplied with AVX512_BF16's
//!   `vdpbf16ps` (two products per f32 lane per instruction, summed in f32): what PyTorch's
//!   CPU autocast and oneDNN do on the same CPUs. It needs AVX-512 with BF16
//!   ([`bf16_products_available`]).
//! - [`Products::F32`]: FMA on the f32 values, with AVX-512.
//!
//! Without the instructions a product needs, [`matmul`] returns [`KernelError::Declined`] and the
//! caller uses the backend's own product.

use rayon::prelude::*;

use crate::KernelError;

/// The precision a product's multiplications are taken in; sums are f32 either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Products {
    /// f32 multiplications.
    F32,
    /// Operands rounded to bf16 (round to nearest even), multiplied in pairs, summed in f32.
    Bf16,
}

/// A read-only `rows × cols` f32 matrix inside a slice: element `(r, c)` is
/// `data[offset + r * row_stride + c * col_stride]`, so a transpose is a view with the strides
/// swapped.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    data: &'a [f32],
    offset: usize,
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A view of `data`; [`KernelError::Shape`] when an element lies past its end.
    pub fn new(
        data: &'a [f32],
        offset: usize,
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Result<Self, KernelError> {
        let last = (rows > 0 && cols > 0)
            .then(|| offset + (rows - 1) * row_stride + (cols - 1) * col_stride);
        if last.is_some_and(|last| last >= data.len()) {
            return Err(KernelError::Shape {
                rows,
                cols,
                len: data.len(),
            });
        }
        Ok(Self {
            data,
            offset,
            rows,
            cols,
            row_stride,
            col_stride,
        })
    }

    /// A contiguous row-major matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Result<Self, KernelError> {
        if data.len() != rows * cols {
            return Err(KernelError::Shape {
                rows,
                cols,
                len: data.len(),
            });
        }
        Self::new(data, 0, rows, cols, cols, 1)
    }

    /// The transpose (a view; nothing is copied).
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }
}

/// Whether this CPU multiplies [`Products::Bf16`] in hardware (AVX-512 F and BF16).
pub fn bf16_products_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU runs [`Products::F32`] here (AVX-512 F).
pub fn f32_products_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether [`matmul`] computes products in `products` on this CPU.
pub fn available(products: Products) -> bool {
    match products {
        Products::F32 => f32_products_available(),
        Products::Bf16 => bf16_products_available(),
    }
}

/// Rows of the register tile.
const MR: usize = 12;
/// Columns of the register tile (two 16-lane vectors).
const NR: usize = 32;
/// Depth steps per packed block (a step is one `k` in f32, a pair of `k` in bf16): a `KC × NR`
/// panel of `B` (24 KiB) stays in the L1 cache while every row panel of `A` passes over it.
const KC: usize = 192;
/// Rows of `A` per packed block (in the L2 cache).
const MC: usize = 144;
/// Columns of `B` per packed block.
const NC: usize = 3072;

/// `C = A · B`, or `C += A · B` with `accumulate`, where `C` is a contiguous row-major
/// `a.rows() × b.cols()` matrix. [`KernelError::Shape`] when the shapes disagree,
/// [`KernelError::Declined`] when this CPU lacks the instructions `products` needs (see
/// [`available`]).
pub fn matmul(
    a: MatRef,
    b: MatRef,
    c: &mut [f32],
    accumulate: bool,
    products: Products,
) -> Result<(), KernelError> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k || c.len() != m * n {
        return Err(KernelError::Shape {
            rows: m,
            cols: n,
            len: c.len(),
        });
    }
    if !available(products) {
        return Err(KernelError::Declined);
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return Ok(());
    }
    // SAFETY: `c` holds the `m × n` initialized values (checked above).
    unsafe { multiply(a, b, c.as_mut_ptr(), accumulate, products) };
    Ok(())
}

/// `A · B` in a new contiguous row-major `a.rows() × b.cols()` matrix, written once by the
/// kernels (no zero-filled buffer first). Errors as [`matmul`].
pub fn product(a: MatRef, b: MatRef, products: Products) -> Result<Vec<f32>, KernelError> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k {
        return Err(KernelError::Shape {
            rows: m,
            cols: n,
            len: 0,
        });
    }
    if !available(products) {
        return Err(KernelError::Declined);
    }
    if k == 0 {
        return Ok(vec![0.0; m * n]);
    }
    let mut c = Vec::with_capacity(m * n);
    // SAFETY: `c` has room for `m × n` values, and without `accumulate` the kernels store every
    // one of them (the first block of the summed dimension covers every tile) before `set_len`.
    unsafe {
        multiply(a, b, c.as_mut_ptr(), false, products);
        c.set_len(m * n);
    }
    Ok(c)
}

/// The blocked product behind [`matmul`] and [`product`], for `k > 0` on a CPU with the
/// instructions `products` needs.
///
/// # Safety
/// `c` points at `a.rows() × b.cols()` writable values, initialized when `accumulate`.
unsafe fn multiply(a: MatRef, b: MatRef, c: *mut f32, accumulate: bool, products: Products) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if m == 0 || n == 0 {
        return;
    }
    let pairs = products == Products::Bf16;
    let kernel: MicroKernel = micro_kernel(products);
    // Depth in packed steps, and `k` values per step.
    let per_step = if pairs { 2 } else { 1 };
    let threads = rayon::current_num_threads().max(1);
    let out = OutPtr(c);
    let mut b_pack = Vec::new();
    for j0 in (0..n).step_by(NC) {
        let nc = NC.min(n - j0);
        let panels_n = nc.div_ceil(NR);
        for k0 in (0..k).step_by(KC * per_step) {
            let depth = Depth {
                k0,
                kc: (KC * per_step).min(k - k0),
                pairs,
            };
            let steps = depth.steps();
            // Stale words in the padding of edge panels only reach tile rows and columns that
            // are not written out, so the buffers are reused without clearing.
            b_pack.resize(panels_n * steps * NR, 0u32);
            // One group of column panels per thread.
            let group = panels_n.div_ceil(threads);
            b_pack
                .par_chunks_mut(group * steps * NR)
                .enumerate()
                .for_each(|(g, panels)| {
                    let col = j0 + g * group * NR;
                    let width = (group * NR).min(j0 + nc - col);
                    pack_block(&b.t(), col, width, NR, depth, panels);
                });
            let store = k0 == 0 && !accumulate;
            // Tasks: row blocks of `A`, split further by column panels when there are fewer row
            // blocks than threads (the small products of small models).
            let mc = MC.min(m.div_ceil(threads).next_multiple_of(MR));
            let blocks_m = m.div_ceil(mc);
            let split_n = (2 * threads).div_ceil(blocks_m).clamp(1, panels_n);
            let panels_per_task = panels_n.div_ceil(split_n);
            let b_pack = &b_pack;
            (0..blocks_m * split_n).into_par_iter().for_each(|task| {
                let (ib, jb) = (task / split_n, task % split_n);
                let i0 = ib * mc;
                let rows = mc.min(m - i0);
                let panels = jb * panels_per_task..((jb + 1) * panels_per_task).min(panels_n);
                if panels.is_empty() {
                    return;
                }
                let panels_m = rows.div_ceil(MR);
                A_PACK.with_borrow_mut(|a_pack| {
                    a_pack.resize(a_pack.len().max(panels_m * steps * MR), 0);
                    let a_pack = &mut a_pack[..panels_m * steps * MR];
                    pack_block(&a, i0, rows, MR, depth, a_pack);
                    for jp in panels {
                        let col = j0 + jp * NR;
                        let width = NR.min(j0 + nc - col);
                        let bp = &b_pack[jp * steps * NR..(jp + 1) * steps * NR];
                        for (ip, ap) in a_pack.chunks(steps * MR).enumerate() {
                            let row = i0 + ip * MR;
                            let height = MR.min(i0 + rows - row);
                            // SAFETY: the tasks write disjoint `(row, col)` tiles of `c`, which holds
                            // `m × n` values (checked above); the panels hold `steps` steps.
                            unsafe {
                                run_tile(
                                    kernel,
                                    steps,
                                    ap,
                                    bp,
                                    out.at(row * n + col),
                                    n,
                                    height,
                                    width,
                                    store,
                                )
                            };
                        }
                    }
                });
            });
        }
    }
}

thread_local! {
    /// Each thread's packed block of `A`, reused from product to product.
    static A_PACK: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The columns of the summed dimension one packed block covers, and how they are stored.
#[derive(Clone, Copy, Debug)]
struct Depth {
    /// First column.
    k0: usize,
    /// Columns.
    kc: usize,
    /// bf16 pairs (two columns per step) rather than f32 values (one per step).
    pairs: bool,
}

impl Depth {
    /// Packed steps.
    fn steps(self) -> usize {
        if self.pairs {
            self.kc.div_ceil(2)
        } else {
            self.kc
        }
    }
}

/// `C`'s base pointer, shared by the tasks that write disjoint tiles of it.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the tasks of one `matmul` write disjoint elements.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The element `offset` places past the base (a method, so closures capture the whole
    /// `Send` wrapper rather than its raw pointer field).
    ///
    /// # Safety
    /// `offset` is inside `C`.
    unsafe fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: forwarded from the caller.
        unsafe { self.0.add(offset) }
    }
}

/// Packs rows `row..row + height` of `src` into consecutive `wide`-row panels (as [`pack`] packs
/// one), over the columns of `depth`.
fn pack_block(src: &MatRef, row: usize, height: usize, wide: usize, depth: Depth, out: &mut [u32]) {
    let Depth { k0, kc, pairs } = depth;
    let steps = depth.steps();
    #[cfg(target_arch = "x86_64")]
    if pairs && src.row_stride == 1 && bf16_products_available() {
        let base = src.offset + row + k0 * src.col_stride;
        // SAFETY: the CPU has AVX-512 F and BF16; the view holds rows `row..row + height` and
        // columns `k0..k0 + kc` (checked by `MatRef::new`), and `out` holds the panels.
        unsafe {
            x86::pack_pairs_across_rows(&src.data[base..], src.col_stride, height, kc, wide, out)
        };
        return;
    }
    for (p, panel) in out.chunks_mut(steps * wide).enumerate() {
        let first = row + p * wide;
        if first >= row + height {
            break;
        }
        pack(
            src,
            first,
            wide.min(row + height - first),
            wide,
            depth,
            panel,
        );
    }
}

/// Packs rows `row..row + height` of `src` into one `wide`-row panel over the columns of `depth`
/// (`k0..k0 + kc`): step `s` holds each row's value at column `k0 + s` (f32 bits), or with `pairs`
/// its bf16 values at columns `k0 + 2s` (low half) and `k0 + 2s + 1` (high half). Rows past
/// `height` are left as they are (their results are never written out).
fn pack(src: &MatRef, row: usize, height: usize, wide: usize, depth: Depth, out: &mut [u32]) {
    let Depth { k0, kc, pairs } = depth;
    let steps = depth.steps();
    let out = &mut out[..steps * wide];
    let base = src.offset + row * src.row_stride + k0 * src.col_stride;
    let data = &src.data[base..];
    let (rs, cs) = (src.row_stride, src.col_stride);
    #[cfg(target_arch = "x86_64")]
    if pairs && cs == 1 && bf16_products_available() {
        // SAFETY: the CPU has AVX-512 F and BF16; the view holds rows `0..height` and columns
        // `0..kc` from `data`'s start (checked by `MatRef::new`), and `out` holds `steps` steps.
        unsafe { x86::pack_pairs_along_rows(data, rs, height, kc, wide, out) };
        return;
    }
    if cs == 1 {
        // Each row's values are contiguous: read a row, write its words down the panel.
        for i in 0..height {
            let x = &data[i * rs..i * rs + kc];
            let column = out.iter_mut().skip(i).step_by(wide);
            if pairs {
                let (whole, rest) = x.split_at(kc / 2 * 2);
                let mut column = column;
                // The source first: `zip` then takes no word past the whole pairs.
                for (p, o) in whole.chunks_exact(2).zip(column.by_ref()) {
                    *o = pair(p[0], p[1]);
                }
                if let (Some(o), [last]) = (column.next(), rest) {
                    *o = u32::from(bf16_bits(*last));
                }
            } else {
                for (o, &v) in column.zip(x) {
                    *o = v.to_bits();
                }
            }
        }
    } else if rs == 1 {
        // Each column's values across the panel are contiguous: one run per (pair of) columns.
        let run = |c: usize| &data[c * cs..c * cs + height];
        for (s, o) in out.chunks_exact_mut(wide).enumerate() {
            let o = &mut o[..height];
            if pairs {
                let lo = run(2 * s);
                if 2 * s + 1 < kc {
                    for ((o, &l), &h) in o.iter_mut().zip(lo).zip(run(2 * s + 1)) {
                        *o = pair(l, h);
                    }
                } else {
                    for (o, &l) in o.iter_mut().zip(lo) {
                        *o = u32::from(bf16_bits(l));
                    }
                }
            } else {
                for (o, &v) in o.iter_mut().zip(run(s)) {
                    *o = v.to_bits();
                }
            }
        }
    } else {
        let at = |r: usize, c: usize| data[r * rs + c * cs];
        for (s, o) in out.chunks_exact_mut(wide).enumerate() {
            for (i, o) in o[..height].iter_mut().enumerate() {
                *o = if !pairs {
                    at(i, s).to_bits()
                } else if 2 * s + 1 < kc {
                    pair(at(i, 2 * s), at(i, 2 * s + 1))
                } else {
                    u32::from(bf16_bits(at(i, 2 * s)))
                };
            }
        }
    }
}

/// Two values rounded to bf16, `lo` in the low half of the word.
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    u32::from(bf16_bits(lo)) | (u32::from(bf16_bits(hi)) << 16)
}

/// `x` rounded to bf16 (to nearest, ties to even; NaN stays NaN), as its bits.
#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16) as u16;
    // Branch-free, so packing loops vectorize.
    if x.is_nan() {
        ((bits >> 16) | 0x40) as u16
    } else {
        rounded
    }
}

/// A register-tile kernel: `steps` packed steps of an `MR`-row panel of `A` and an `NR`-column
/// panel of `B` into the `MR × NR` tile at `c` (row stride `ldc`), stored or added.
type MicroKernel = unsafe fn(usize, *const u32, *const u32, *mut f32, usize, bool);

fn micro_kernel(products: Products) -> MicroKernel {
    #[cfg(target_arch = "x86_64")]
    {
        match products {
            Products::F32 => x86::tile_f32,
            Products::Bf16 => x86::tile_bf16,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = products;
        unreachable!("`available` is false off x86-64")
    }
}

/// Runs `kernel` on one tile; a tile cut by `C`'s edge goes through a full-size scratch tile.
///
/// # Safety
/// `c` points at the tile's first element in a matrix with row stride `ldc` that holds its
/// `height × width` elements; the CPU runs `kernel`.
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn run_tile(
    kernel: MicroKernel,
    steps: usize,
    a: &[u32],
    b: &[u32],
    c: *mut f32,
    ldc: usize,
    height: usize,
    width: usize,
    store: bool,
) {
    if height == MR && width == NR {
        // SAFETY: the full tile is inside `C` (caller).
        unsafe { kernel(steps, a.as_ptr(), b.as_ptr(), c, ldc, store) };
        return;
    }
    let mut tile = [0f32; MR * NR];
    // SAFETY: `tile` holds a full tile with row stride `NR`.
    unsafe { kernel(steps, a.as_ptr(), b.as_ptr(), tile.as_mut_ptr(), NR, true) };
    for i in 0..height {
        for j in 0..width {
            // SAFETY: `(i, j)` is inside the part of the tile within `C` (caller).
            unsafe {
                let p = c.add(i * ldc + j);
                if store {
                    *p = tile[i * NR + j];
                } else {
                    *p += tile[i * NR + j];
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{MR, NR};

    /// Writes (or adds) the 24 accumulators to the tile at `c`.
    #[inline(always)]
    unsafe fn write(acc: &[[__m512; 2]; MR], c: *mut f32, ldc: usize, store: bool) {
        for (i, row) in acc.iter().enumerate() {
            for (h, &v) in row.iter().enumerate() {
                // SAFETY: `c` holds an `MR × NR` tile with row stride `ldc` (caller).
                unsafe {
                    let p = c.add(i * ldc + 16 * h);
                    let v = if store {
                        v
                    } else {
                        _mm512_add_ps(v, _mm512_loadu_ps(p))
                    };
                    _mm512_storeu_ps(p, v);
                }
            }
        }
    }

    /// The bf16 tile: per step, two 32-value vectors of `B` pairs and one broadcast pair of `A`
    /// per row into `vdpbf16ps`.
    ///
    /// # Safety
    /// The CPU has AVX-512 F and BF16; `a` holds `steps · MR` and `b` `steps · NR` words; `c` an
    /// `MR × NR` tile with row stride `ldc`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn tile_bf16(
        steps: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        store: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for s in 0..steps {
            // SAFETY: step `s` of both panels is in bounds (caller); `__m512i` and `__m512bh`
            // are the same 64 bytes.
            unsafe {
                let bp = b.add(s * NR);
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.cast()));
                let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(16).cast()));
                let ap = a.add(s * MR);
                for (i, acc) in acc.iter_mut().enumerate() {
                    let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(i) as i32));
                    acc[0] = _mm512_dpbf16_ps(acc[0], x, b0);
                    acc[1] = _mm512_dpbf16_ps(acc[1], x, b1);
                }
            }
        }
        // SAFETY: forwarded from the caller.
        unsafe { write(&acc, c, ldc, store) };
    }

    /// [`super::pack`] with bf16 pairs for a source whose rows are contiguous: each row's `kc`
    /// values are rounded 32 at a time (16 steps) and written down the panel.
    ///
    /// # Safety
    /// The CPU has AVX-512 F and BF16; `data` holds rows `0..height` (row stride `rs`) of `kc`
    /// contiguous values; `out` holds `kc.div_ceil(2)` steps of `wide >= height` words.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn pack_pairs_along_rows(
        data: &[f32],
        rs: usize,
        height: usize,
        kc: usize,
        wide: usize,
        out: &mut [u32],
    ) {
        let whole = kc / 32 * 32;
        let mut words = [0u32; 16];
        for i in 0..height {
            let x = &data[i * rs..i * rs + kc];
            for c in (0..whole).step_by(32) {
                // SAFETY: `x[c..c + 32]` is in bounds; `words` holds 16 words.
                unsafe {
                    let lo = _mm512_loadu_ps(x.as_ptr().add(c));
                    let hi = _mm512_loadu_ps(x.as_ptr().add(c + 16));
                    // Lanes in order: value `c + j` in bf16 lane `j`, so word `t` is the pair of
                    // values `c + 2t` and `c + 2t + 1`.
                    let b: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                    _mm512_storeu_si512(words.as_mut_ptr().cast(), b);
                }
                let s0 = c / 2;
                for (t, &w) in words.iter().enumerate() {
                    out[(s0 + t) * wide + i] = w;
                }
            }
            for (t, p) in x[whole..].chunks(2).enumerate() {
                let hi = p.get(1).map_or(0, |&h| u32::from(super::bf16_bits(h)));
                out[(whole / 2 + t) * wide + i] = u32::from(super::bf16_bits(p[0])) | (hi << 16);
            }
        }
    }

    /// [`super::pack_block`] with bf16 pairs for a source whose columns are contiguous: per step,
    /// the two columns' values across the whole block are read once, in order, rounded 16 rows at
    /// a time, interleaved and written to each panel's step.
    ///
    /// # Safety
    /// The CPU has AVX-512 F and BF16; `data` holds columns `0..kc` (column stride `cs`) of
    /// `height` contiguous values; `out` holds `height.div_ceil(wide)` panels of
    /// `kc.div_ceil(2)` steps of `wide` words.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn pack_pairs_across_rows(
        data: &[f32],
        cs: usize,
        height: usize,
        kc: usize,
        wide: usize,
        out: &mut [u32],
    ) {
        let steps = kc.div_ceil(2);
        let panel_len = steps * wide;
        for s in 0..steps {
            // The rows are a page or more apart, beyond what the hardware prefetchers follow:
            // fetch the pair of rows `AHEAD` steps on.
            const AHEAD: usize = 8;
            if 2 * (s + AHEAD) + 1 < kc {
                for row in [2 * (s + AHEAD), 2 * (s + AHEAD) + 1] {
                    let ahead = &data[row * cs..row * cs + height];
                    for line in (0..height).step_by(16) {
                        // SAFETY: a prefetch of an address inside `ahead`.
                        unsafe {
                            _mm_prefetch::<_MM_HINT_T0>(ahead.as_ptr().add(line).cast());
                        }
                    }
                }
            }
            let lo = &data[2 * s * cs..2 * s * cs + height];
            let hi = (2 * s + 1 < kc).then(|| &data[(2 * s + 1) * cs..(2 * s + 1) * cs + height]);
            for p0 in (0..height).step_by(wide) {
                let o = &mut out[(p0 / wide) * panel_len + s * wide..][..wide];
                let rows = wide.min(height - p0);
                for i in (0..rows).step_by(16) {
                    let n = 16.min(rows - i);
                    let mask: __mmask16 = if n == 16 { !0 } else { (1u16 << n) - 1 };
                    // SAFETY: the masked loads read rows `p0 + i..p0 + i + n < height` of the
                    // columns, the masked store writes words `i..i + n < wide` of the step.
                    unsafe {
                        let l = _mm512_maskz_loadu_ps(mask, lo.as_ptr().add(p0 + i));
                        let l: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(l));
                        let mut w = _mm512_cvtepu16_epi32(l);
                        if let Some(hi) = hi {
                            let h = _mm512_maskz_loadu_ps(mask, hi.as_ptr().add(p0 + i));
                            let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(h));
                            w = _mm512_or_si512(
                                w,
                                _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)),
                            );
                        }
                        _mm512_mask_storeu_epi32(o.as_mut_ptr().add(i).cast(), mask, w);
                    }
                }
            }
        }
    }

    /// The f32 tile: per step, two 16-value vectors of `B` and one broadcast value of `A` per
    /// row into FMA.
    ///
    /// # Safety
    /// The CPU has AVX-512 F; otherwise as [`tile_bf16`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_f32(
        steps: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        store: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        let (a, b) = (a.cast::<f32>(), b.cast::<f32>());
        for s in 0..steps {
            // SAFETY: step `s` of both panels is in bounds (caller).
            unsafe {
                let bp = b.add(s * NR);
                let b0 = _mm512_loadu_ps(bp);
                let b1 = _mm512_loadu_ps(bp.add(16));
                let ap = a.add(s * MR);
                for (i, acc) in acc.iter_mut().enumerate() {
                    let x = _mm512_set1_ps(*ap.add(i));
                    acc[0] = _mm512_fmadd_ps(x, b0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(x, b1, acc[1]);
                }
            }
        }
        // SAFETY: forwarded from the caller.
        unsafe { write(&acc, c, ldc, store) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    fn round(x: f32) -> f64 {
        f64::from(f32::from_bits(u32::from(bf16_bits(x)) << 16))
    }

    /// `A · B` in f64 from the operands as the kernel sees them (rounded to bf16 for `Bf16`).
    fn reference(a: &MatRef, b: &MatRef, products: Products) -> Vec<f64> {
        let at = |m: &MatRef, r: usize, c: usize| {
            let x = m.data[m.offset + r * m.row_stride + c * m.col_stride];
            match products {
                Products::F32 => f64::from(x),
                Products::Bf16 => round(x),
            }
        };
        let mut out = vec![0.0; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                out[i * b.cols + j] = (0..a.cols).map(|p| at(a, i, p) * at(b, p, j)).sum();
            }
        }
        out
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3F80);
        // 1 + 2⁻⁸ is halfway between 1 and 1 + 2⁻⁷: ties to the even 1.
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3F80);
        // 1 + 3·2⁻⁸ is halfway between 1 + 2⁻⁷ (odd) and 1 + 2⁻⁶: up.
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3F82);
        assert_eq!(bf16_bits(-2.5), half::bf16::from_f32(-2.5).to_bits());
        assert!(f32::from_bits(u32::from(bf16_bits(f32::NAN)) << 16).is_nan());
        assert_eq!(bf16_bits(f32::INFINITY), 0x7F80);
        for x in values(1000, 3) {
            let x = x * 1e3;
            assert_eq!(bf16_bits(x), half::bf16::from_f32(x).to_bits(), "{x}");
        }
    }

    #[test]
    fn products_equal_the_reference_in_every_layout() {
        for products in [Products::F32, Products::Bf16] {
            if !available(products) {
                continue;
            }
            // Edges in every dimension: partial tiles, odd depth, several depth blocks.
            for (m, k, n) in [(1, 1, 1), (13, 7, 33), (37, 401, 70), (150, 385, 100)] {
                let a_data = values(m * k, 1);
                let b_data = values(k * n, 2);
                let at_data = values(k * m, 3);
                let bt_data = values(n * k, 4);
                let cases = [
                    (
                        MatRef::row_major(&a_data, m, k).unwrap(),
                        MatRef::row_major(&b_data, k, n).unwrap(),
                    ),
                    (
                        MatRef::row_major(&a_data, m, k).unwrap(),
                        MatRef::row_major(&bt_data, n, k).unwrap().t(),
                    ),
                    (
                        MatRef::row_major(&at_data, k, m).unwrap().t(),
                        MatRef::row_major(&b_data, k, n).unwrap(),
                    ),
                ];
                for (a, b) in cases {
                    let want = reference(&a, &b, products);
                    let mut c = vec![f32::NAN; m * n];
                    matmul(a, b, &mut c, false, products).unwrap();
                    for (got, want) in c.iter().zip(&want) {
                        // f32 sums of up to 401 products of values in [-1, 1].
                        assert!(
                            (f64::from(*got) - want).abs() < 1e-4 * (k as f64).sqrt(),
                            "{products:?} {m}x{k}x{n}: {got} vs {want}"
                        );
                    }
                    // Accumulating adds the same product again.
                    matmul(a, b, &mut c, true, products).unwrap();
                    for (got, want) in c.iter().zip(&want) {
                        assert!((f64::from(*got) - 2.0 * want).abs() < 2e-4 * (k as f64).sqrt());
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_products_round_their_operands() {
        if !bf16_products_available() {
            return;
        }
        // 1 + 2⁻¹⁰ rounds to 1 in bf16: the product is exactly 1, where f32 gives 1 + 2⁻¹⁰.
        let a = [1.0 + 1.0 / 1024.0];
        let b = [1.0];
        let mut c = [0.0];
        let (ma, mb) = (
            MatRef::row_major(&a, 1, 1).unwrap(),
            MatRef::row_major(&b, 1, 1).unwrap(),
        );
        matmul(ma, mb, &mut c, false, Products::Bf16).unwrap();
        assert_eq!(c[0], 1.0);
        if f32_products_available() {
            matmul(ma, mb, &mut c, false, Products::F32).unwrap();
            assert_eq!(c[0], 1.0 + 1.0 / 1024.0);
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let data = [0.0f32; 6];
        assert!(MatRef::row_major(&data, 2, 4).is_err());
        assert!(MatRef::new(&data, 1, 2, 3, 3, 1).is_err());
        let a = MatRef::row_major(&data, 2, 3).unwrap();
        let mut c = [0.0f32; 4];
        assert!(matches!(
            matmul(a, a, &mut c, false, Products::F32),
            Err(KernelError::Shape { .. })
        ));
    }
}
