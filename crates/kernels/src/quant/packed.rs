//! `Q4_0`, `Q5_0` and `Q8_0` weights repacked at load into tiles of [`TILE`] rows whose blocks are
//! interleaved, and the products on that layout (portable, AVX2, AVX-512 VNNI), as llama.cpp's CPU
//! backend does with its `block_q4_0x8` repacking (a different layout, for the same purpose).
//!
//! A tile holds rows `16t..16t + 16` (zero rows pad the last tile): for each block column `b`,
//! [`tile_block`] bytes, the 16 rows' f16 scales `d` (32 bytes) and then their values in 64-byte
//! vectors (four for `Q4_0`, eight for `Q8_0`), vector `m` holding bytes `4m..4m + 4` of each
//! row's value bytes (row `j` at `4j`). For `Q4_0`, the low nibbles of vector `m` are values
//! `4m..4m + 4` of the 16 rows' block `b` and its high nibbles values `16 + 4m..16 + 4m + 4`, so
//! one AND (and a shift) gives a vector whose 32-bit lane `j` pairs with the same four activations
//! for all 16 rows; `Q8_0`'s values are stored plus 128 (their sign bit flipped), unsigned, as
//! `vpdpbusd` takes them. `Q5_0` is `Q4_0`'s tile plus a fifth 64-byte vector of its high bits:
//! byte `i` of row `j`'s word (at `4j + i`) holds in bit `k` the high bit of the value that byte
//! `i` of nibble vector `k` holds (`k < 4`: low nibble of vector `k`; `k >= 4`: high nibble of
//! vector `k − 4`), so one 16-bit shift and an AND put the high bits of a vector's values at bit 4
//! (ORed onto the nibbles: unsigned 5-bit values). The activations are broadcast, each
//! `vpdpbusd` is 64 multiply-adds into 16 rows' sums, and the 16 rows' results come out in one
//! vector, no horizontal sums. The bytes are those of the plain blocks, moved (and for `Q8_0`
//! flipped back, for `Q5_0`'s high bits rearranged back): the values dequantize exactly as before.
//!
//! Per block, every kernel computes the integer `Σ q_w q_x` exactly (for `Q4_0` as
//! `Σ n_w q_x − 8 Σ q_x` with unsigned nibbles `n_w`, for `Q5_0` as `Σ u_w q_x − 16 Σ q_x` with the
//! unsigned 5-bit values, as llama.cpp's `ggml_vec_dot_q5_0_q8_0`; for `Q8_0` on VNNI as
//! `Σ u_w q_x − 128 Σ q_x`; the offsets from [`Q8Rows`]), and then `acc = fma(float(dot), d_w · d_x, acc)`: the three
//! kernels give the same bits, and an input row's results do not depend on the rows computed
//! beside it.

use std::ops::Range;

use half::f16;

use super::{
    AVX2, OutPtr, Q4_0, Q5_0, Q8_0, Q8Rows, QK, VNNI, act_index, block_bytes,
    decode_row as decode_block, kernel,
};

/// Weight rows per tile.
pub(super) const TILE: usize = 16;
/// Bytes of a block column's scales, ahead of its values.
const SCALES: usize = 2 * TILE;
/// Input rows per pass over a tile (VNNI; AVX2 takes [`RM_AVX2`]).
const RM_VNNI: usize = 8;
/// Input rows per pass over half a tile in AVX2.
const RM_AVX2: usize = 4;

/// Whether weights of format `kind` are repacked.
pub(super) fn packs(kind: u8) -> bool {
    kind == Q4_0 || kind == Q8_0 || kind == Q5_0
}

/// Bytes of one block column of a tile (its 16 rows' blocks).
pub(super) const fn tile_block(kind: u8) -> usize {
    TILE * block_bytes(kind)
}

/// 64-byte value vectors per block column (`Q5_0`: the nibbles' four, then the high bits').
const fn vectors(kind: u8) -> usize {
    (block_bytes(kind) - 2) / 4
}

/// Offset of the nibbles in a plain block (after `d`, and `Q5_0`'s `qh`).
const fn nibbles_at(kind: u8) -> usize {
    if kind == Q5_0 { 6 } else { 2 }
}

/// Vector `k`'s values of `Q5_0` (`k < 4`: values `4k..4k + 4`, low nibbles; `k >= 4`: values
/// `16 + 4(k − 4)..`, high nibbles) take their high bits from bit `k` of the high-bit bytes: byte
/// `i` of the tile's high-bit word of a row, from the block's `qh`.
fn high_bits_byte(qh: u32, i: usize) -> u8 {
    (0..8).fold(0u8, |b, k| {
        let value = if k < 4 {
            4 * k + i
        } else {
            16 + 4 * (k - 4) + i
        };
        b | ((((qh >> value) & 1) as u8) << k)
    })
}

/// `qh` back from the four high-bit bytes of a row ([`high_bits_byte`] inverted).
fn qh_of(bytes: &[u8]) -> u32 {
    let mut qh = 0u32;
    for (i, &b) in bytes.iter().enumerate().take(4) {
        for k in 0..8 {
            let value = if k < 4 {
                4 * k + i
            } else {
                16 + 4 * (k - 4) + i
            };
            qh |= u32::from((b >> k) & 1) << value;
        }
    }
    qh
}

/// What a value byte is stored as (`Q8_0`'s sign bit flipped; the same both ways).
const fn stored(kind: u8, byte: u8) -> u8 {
    if kind == Q8_0 { byte ^ 0x80 } else { byte }
}

/// Bytes of `rows` rows of `nb` blocks of format `kind` repacked (whole tiles).
pub(super) fn packed_len(kind: u8, rows: usize, nb: usize) -> usize {
    rows.div_ceil(TILE) * nb * tile_block(kind)
}

/// Plain rows of format `kind` (`rows` rows of `nb` blocks) repacked into tiles.
pub(super) fn repack(kind: u8, plain: &[u8], rows: usize, nb: usize) -> Vec<u8> {
    let mut out = vec![0u8; packed_len(kind, rows, nb)];
    let bs = block_bytes(kind);
    for (r, row) in plain.chunks_exact((nb * bs).max(1)).take(rows).enumerate() {
        for (b, block) in row.chunks_exact(bs).enumerate() {
            let at = block_at(kind, nb, r, b);
            let j = r % TILE;
            out[at + 2 * j..at + 2 * j + 2].copy_from_slice(&block[..2]);
            let qs = nibbles_at(kind);
            for m in 0..vectors(kind) {
                let to = at + SCALES + 64 * m + 4 * j;
                if kind == Q5_0 && m == 4 {
                    let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
                    for (i, o) in out[to..to + 4].iter_mut().enumerate() {
                        *o = high_bits_byte(qh, i);
                    }
                    continue;
                }
                for (o, &v) in out[to..to + 4]
                    .iter_mut()
                    .zip(&block[qs + 4 * m..qs + 4 + 4 * m])
                {
                    *o = stored(kind, v);
                }
            }
        }
    }
    out
}

/// Where block column `b` of row `r`'s tile starts.
fn block_at(kind: u8, nb: usize, r: usize, b: usize) -> usize {
    (r / TILE * nb + b) * tile_block(kind)
}

/// Plain block `b` of row `r` (into `block`, [`block_bytes`] long) from tiles of `nb` block
/// columns.
fn plain_block(kind: u8, packed: &[u8], nb: usize, r: usize, b: usize, block: &mut [u8]) {
    let at = block_at(kind, nb, r, b);
    let j = r % TILE;
    block[..2].copy_from_slice(&packed[at + 2 * j..at + 2 * j + 2]);
    let qs = nibbles_at(kind);
    for m in 0..vectors(kind) {
        let from = at + SCALES + 64 * m + 4 * j;
        if kind == Q5_0 && m == 4 {
            block[2..6].copy_from_slice(&qh_of(&packed[from..from + 4]).to_le_bytes());
            continue;
        }
        for (o, &v) in block[qs + 4 * m..qs + 4 + 4 * m]
            .iter_mut()
            .zip(&packed[from..from + 4])
        {
            *o = stored(kind, v);
        }
    }
}

/// Plain rows `rows` (their blocks, one row after another) from tiles of `nb` block columns.
pub(super) fn plain_rows(kind: u8, packed: &[u8], nb: usize, rows: Range<usize>) -> Vec<u8> {
    let bs = block_bytes(kind);
    let mut out = vec![0u8; rows.len() * nb * bs];
    for (r, row) in rows.zip(out.chunks_exact_mut((nb * bs).max(1))) {
        for (b, block) in row.chunks_exact_mut(bs).enumerate() {
            plain_block(kind, packed, nb, r, b, block);
        }
    }
    out
}

/// Row `r` dequantized into `out` (`nb · 32` values; the operations of `kiln_gguf::blocks`).
pub(super) fn decode_row(kind: u8, packed: &[u8], nb: usize, r: usize, out: &mut [f32]) {
    let mut block = [0u8; 34];
    let block = &mut block[..block_bytes(kind)];
    for (b, o) in out.chunks_exact_mut(QK).enumerate().take(nb) {
        plain_block(kind, packed, nb, r, b, block);
        decode_block(kind, block, o);
    }
}

/// A product on tiles: weight rows `rows` of the tiles `w` (`nb` block columns) times every row
/// of `x`, written to `out[i · stride + offset + r]` for input row `i` and weight row `r`. The
/// caller checked that those elements are inside `out` and that no other task writes them.
pub(super) struct Job<'a> {
    pub w: &'a [u8],
    pub nb: usize,
    pub rows: Range<usize>,
    pub x: &'a Q8Rows,
    pub out: OutPtr,
    pub stride: usize,
    pub offset: usize,
}

/// A product on tiles of one weight format.
pub(super) type TilesFn = fn(&Job);

/// The version [`kernel`] chose, for weight format `kind` (one that [`packs`]).
pub(super) fn tiles_fn(kind: u8) -> TilesFn {
    match (kernel(), kind) {
        // SAFETY: `kernel` picks VNNI only where the CPU has its features and AVX2's.
        #[cfg(target_arch = "x86_64")]
        (VNNI, Q8_0) => |j| unsafe { tiles_vnni::<Q8_0>(j) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        (VNNI, Q5_0) => |j| unsafe { tiles_vnni::<Q5_0>(j) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        (VNNI, _) => |j| unsafe { tiles_vnni::<Q4_0>(j) },
        // SAFETY: `kernel` picks AVX2 only where the CPU has AVX2, FMA and F16C.
        #[cfg(target_arch = "x86_64")]
        (AVX2, Q8_0) => |j| unsafe { tiles_avx2::<Q8_0>(j) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        (AVX2, Q5_0) => |j| unsafe { tiles_avx2::<Q5_0>(j) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        (AVX2, _) => |j| unsafe { tiles_avx2::<Q4_0>(j) },
        (_, Q8_0) => tiles_portable::<Q8_0>,
        (_, Q5_0) => tiles_portable::<Q5_0>,
        _ => tiles_portable::<Q4_0>,
    }
}

/// The kernels on tiles of format `kind` this CPU runs, by name, portable first (for tests).
#[cfg(test)]
pub(super) fn all_tiles_fns(kind: u8) -> Vec<(&'static str, TilesFn)> {
    let portable: TilesFn = match kind {
        Q8_0 => tiles_portable::<Q8_0>,
        Q5_0 => tiles_portable::<Q5_0>,
        _ => tiles_portable::<Q4_0>,
    };
    #[allow(unused_mut)]
    let mut fns = vec![("portable", portable)];
    #[cfg(target_arch = "x86_64")]
    {
        let best = super::best_kernel();
        if best >= AVX2 {
            // SAFETY: the CPU has AVX2, FMA and F16C (above).
            let f: TilesFn = match kind {
                Q8_0 => |j| unsafe { tiles_avx2::<Q8_0>(j) },
                Q5_0 => |j| unsafe { tiles_avx2::<Q5_0>(j) },
                _ => |j| unsafe { tiles_avx2::<Q4_0>(j) },
            };
            fns.push(("avx2", f));
        }
        if best >= VNNI {
            // SAFETY: the CPU has VNNI's features and AVX2's (above).
            let f: TilesFn = match kind {
                Q8_0 => |j| unsafe { tiles_vnni::<Q8_0>(j) },
                Q5_0 => |j| unsafe { tiles_vnni::<Q5_0>(j) },
                _ => |j| unsafe { tiles_vnni::<Q4_0>(j) },
            };
            fns.push(("vnni", f));
        }
    }
    fns
}

/// Checks a job's operands against its shapes (the kernels' bounds).
fn check<const K: u8>(job: &Job) {
    let (x, nb) = (job.x, job.nb);
    assert!(
        job.w.len() >= packed_len(K, job.rows.end, nb)
            && x.cols == nb * QK
            && x.qs.len() >= x.rows * x.cols
            && x.d.len() >= x.rows * nb
            && x.off.len() >= x.rows * nb,
        "operands shorter than their shapes"
    );
}

/// The kernels in portable code.
fn tiles_portable<const K: u8>(job: &Job) {
    check::<K>(job);
    let (x, nb) = (job.x, job.nb);
    let grouped = nb / 8 * 8;
    for r in job.rows.clone() {
        let j = r % TILE;
        for i in 0..x.rows {
            let y = &x.qs[i * x.cols..(i + 1) * x.cols];
            let mut acc = 0f32;
            for b in 0..nb {
                let at = block_at(K, nb, r, b);
                let blk = &job.w[at..at + tile_block(K)];
                let dw = f16::from_le_bytes([blk[2 * j], blk[2 * j + 1]]).to_f32();
                let y = |v: usize| i32::from(y[act_index(grouped, b, v)]);
                let q = |v: usize| blk[SCALES + 64 * (v / 4) + 4 * j + v % 4];
                let mut dot = 0;
                if K == Q8_0 {
                    for v in 0..QK {
                        dot += i32::from(stored(K, q(v)) as i8) * y(v);
                    }
                } else if K == Q5_0 {
                    // `-16 Σ q_x`; the high bits from the fifth vector.
                    dot = 2 * x.off[i * nb + b];
                    for v in 0..QK / 2 {
                        let h = blk[SCALES + 256 + 4 * j + v % 4];
                        let lo = (q(v) & 0x0F) | (((h >> (v / 4)) & 1) << 4);
                        let hi = (q(v) >> 4) | (((h >> (4 + v / 4)) & 1) << 4);
                        dot += i32::from(lo) * y(v) + i32::from(hi) * y(v + 16);
                    }
                } else {
                    dot = x.off[i * nb + b];
                    for v in 0..QK / 2 {
                        dot += i32::from(q(v) & 0x0F) * y(v) + i32::from(q(v) >> 4) * y(v + 16);
                    }
                }
                acc = (dot as f32).mul_add(dw * x.d[i * nb + b], acc);
            }
            // SAFETY: the caller checked this output is inside `out` and this task's.
            unsafe { *job.out.0.add(i * job.stride + job.offset + r) = acc };
        }
    }
}

/// Where block `b`'s values start in an input row of [`Q8Rows`] and how far apart its groups of
/// four values are (32 bytes in an interleaved group of 8 blocks, 4 after the groups).
#[inline(always)]
fn act_block(grouped: usize, b: usize) -> (usize, usize) {
    if b < grouped {
        (act_index(grouped, b, 0), 32)
    } else {
        (b * QK, 4)
    }
}

/// The tiles of a job, their rows to store (a bit mask per tile) and their first output.
#[inline(always)]
fn for_each_tile<const K: u8>(job: &Job, mut f: impl FnMut(*const u8, u32, *mut f32)) {
    let tile_bytes = job.nb * tile_block(K);
    for t in job.rows.start / TILE..job.rows.end.div_ceil(TILE) {
        let first = t * TILE;
        let lo = job.rows.start.max(first) - first;
        let hi = job.rows.end.min(first + TILE) - first;
        let mask = (1u32 << hi) - (1u32 << lo);
        // SAFETY: tile `t` is inside `w` (`check`), and output `offset + first` is at or before
        // this job's first output of the tile, which is inside `out` (caller).
        let (w, out) = unsafe {
            (
                job.w.as_ptr().add(t * tile_bytes),
                job.out.0.add(job.offset + first),
            )
        };
        f(w, mask, out);
    }
}

/// The kernels with AVX-512 VNNI: tiles of 16 weight rows times [`RM_VNNI`] input rows.
///
/// # Safety
/// The CPU has VNNI's features and AVX2's.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tiles_vnni<const K: u8>(job: &Job) {
    check::<K>(job);
    let n = job.x.rows;
    for_each_tile::<K>(job, |w, mask, out| {
        let mut i0 = 0;
        while i0 < n {
            let rm = RM_VNNI.min(n - i0);
            // SAFETY: the tile and input rows `i0..i0 + rm` are in bounds (`check`), the outputs
            // of the masked lanes are this job's (caller), and the CPU has the features.
            unsafe {
                let out = out.add(i0 * job.stride);
                macro_rules! run {
                    ($($m:literal)*) => {
                        match rm {
                            $($m => tile_vnni::<K, $m>(w, job, i0, out, mask as u16),)*
                            _ => unreachable!("at most RM_VNNI rows"),
                        }
                    };
                }
                run!(1 2 3 4 5 6 7 8);
            }
            i0 += rm;
        }
    });
}

/// One tile (`w`) times input rows `i0..i0 + R`: 16 sums per input row in one vector, stored to
/// `out + i · stride` where `mask` says.
///
/// # Safety
/// As [`tiles_vnni`]; the operands are in bounds, and the masked outputs writable.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile_vnni<const K: u8, const R: usize>(
    w: *const u8,
    job: &Job,
    i0: usize,
    out: *mut f32,
    mask: u16,
) {
    use std::arch::x86_64::*;
    let (x, nb) = (job.x, job.nb);
    let grouped = nb / 8 * 8;
    let nib = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); R];
    // SAFETY: every pointer stays inside the tile and input rows `i0..i0 + R` (caller).
    unsafe {
        let qs = x.qs.as_ptr().add(i0 * x.cols);
        let (d, off) = (x.d.as_ptr().add(i0 * nb), x.off.as_ptr().add(i0 * nb));
        for b in 0..nb {
            let wb = w.add(b * tile_block(K));
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(wb.cast()));
            let load = |m: usize| _mm512_loadu_si512(wb.add(SCALES + 64 * m).cast());
            let mut wq: [__m512i; 8] = if K == Q8_0 {
                std::array::from_fn(load)
            } else {
                let raw: [__m512i; 4] = std::array::from_fn(load);
                std::array::from_fn(|k| {
                    if k < 4 {
                        _mm512_and_si512(raw[k], nib)
                    } else {
                        _mm512_and_si512(_mm512_srli_epi16::<4>(raw[k - 4]), nib)
                    }
                })
            };
            if K == Q5_0 {
                // Bit `k` of each high-bit byte to bit 4 of vector `k`'s bytes (16-bit shifts
                // of at most 4 keep each byte's bits in the byte that bit 4 is taken from).
                let h = load(4);
                let b4 = _mm512_set1_epi8(0x10);
                let hb = [
                    _mm512_slli_epi16::<4>(h),
                    _mm512_slli_epi16::<3>(h),
                    _mm512_slli_epi16::<2>(h),
                    _mm512_slli_epi16::<1>(h),
                    h,
                    _mm512_srli_epi16::<1>(h),
                    _mm512_srli_epi16::<2>(h),
                    _mm512_srli_epi16::<3>(h),
                ];
                for (w, hb) in wq.iter_mut().zip(hb) {
                    *w = _mm512_or_si512(*w, _mm512_and_si512(hb, b4));
                }
            }
            let (at, step) = act_block(grouped, b);
            for (i, acc) in acc.iter_mut().enumerate() {
                let y = qs.add(i * x.cols + at);
                let quad =
                    |k: usize| _mm512_set1_epi32(y.add(k * step).cast::<i32>().read_unaligned());
                // `-8 Σ q_x`, or `-128 Σ q_x` for `Q8_0`'s values plus 128.
                let mut lo = _mm512_set1_epi32(*off.add(i * nb + b));
                if K == Q8_0 {
                    lo = _mm512_slli_epi32::<4>(lo);
                } else if K == Q5_0 {
                    // `-16 Σ q_x`.
                    lo = _mm512_slli_epi32::<1>(lo);
                }
                // Two chains of four, so one input row does not wait on eight in a row.
                let mut hi = _mm512_setzero_si512();
                for k in 0..4 {
                    lo = _mm512_dpbusd_epi32(lo, wq[k], quad(k));
                    hi = _mm512_dpbusd_epi32(hi, wq[k + 4], quad(k + 4));
                }
                let dot = _mm512_cvtepi32_ps(_mm512_add_epi32(lo, hi));
                let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*d.add(i * nb + b)));
                *acc = _mm512_fmadd_ps(dot, scale, *acc);
            }
        }
        for (i, &acc) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(out.add(i * job.stride), mask, acc);
        }
    }
}

/// The kernels in AVX2: each half tile (8 weight rows) times [`RM_AVX2`] input rows, `maddubs`
/// summing a `Q4_0` block's products in i16 (at most 2 · 8 · 15 · 128 per lane; `Q5_0`'s in two
/// halves of four), a `Q8_0` block's (signed, by the sign trick: `|w|` times `x` with `w`'s sign)
/// in i32.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tiles_avx2<const K: u8>(job: &Job) {
    check::<K>(job);
    let n = job.x.rows;
    for_each_tile::<K>(job, |w, mask, out| {
        for half in 0..2 {
            let mask = (mask >> (8 * half)) & 0xFF;
            if mask == 0 {
                continue;
            }
            let mut i0 = 0;
            while i0 < n {
                let rm = RM_AVX2.min(n - i0);
                // SAFETY: as in `tiles_vnni`; the CPU has AVX2's features.
                unsafe {
                    let out = out.add(i0 * job.stride + 8 * half);
                    match rm {
                        1 => half_avx2::<K, 1>(w, half, job, i0, out, mask),
                        2 => half_avx2::<K, 2>(w, half, job, i0, out, mask),
                        3 => half_avx2::<K, 3>(w, half, job, i0, out, mask),
                        _ => half_avx2::<K, 4>(w, half, job, i0, out, mask),
                    }
                }
                i0 += rm;
            }
        }
    });
}

/// Half `half` of the tile `w` (its rows `8 · half..8 · half + 8`) times input rows `i0..i0 + R`,
/// stored to `out + i · stride + l` for the lanes `l` that `mask` says.
///
/// # Safety
/// As [`tiles_avx2`]; the operands are in bounds, and the masked outputs writable.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn half_avx2<const K: u8, const R: usize>(
    w: *const u8,
    half: usize,
    job: &Job,
    i0: usize,
    out: *mut f32,
    mask: u32,
) {
    use std::arch::x86_64::*;
    let (x, nb) = (job.x, job.nb);
    let grouped = nb / 8 * 8;
    let nib = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); R];
    // SAFETY: every pointer stays inside the tile and input rows `i0..i0 + R` (caller).
    unsafe {
        let qs = x.qs.as_ptr().add(i0 * x.cols);
        let (d, off) = (x.d.as_ptr().add(i0 * nb), x.off.as_ptr().add(i0 * nb));
        for b in 0..nb {
            let wb = w.add(b * tile_block(K));
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(wb.add(16 * half).cast()));
            let load = |m: usize| _mm256_loadu_si256(wb.add(SCALES + 64 * m + 32 * half).cast());
            // `Q4_0`: the nibbles; `Q5_0`: with their high bits; `Q8_0`: the signed values.
            let mut wq: [__m256i; 8] = if K == Q8_0 {
                std::array::from_fn(|k| _mm256_xor_si256(load(k), _mm256_set1_epi8(-128)))
            } else {
                let raw: [__m256i; 4] = std::array::from_fn(load);
                std::array::from_fn(|k| {
                    if k < 4 {
                        _mm256_and_si256(raw[k], nib)
                    } else {
                        _mm256_and_si256(_mm256_srli_epi16::<4>(raw[k - 4]), nib)
                    }
                })
            };
            if K == Q5_0 {
                // As in `tile_vnni`.
                let h = load(4);
                let b4 = _mm256_set1_epi8(0x10);
                let hb = [
                    _mm256_slli_epi16::<4>(h),
                    _mm256_slli_epi16::<3>(h),
                    _mm256_slli_epi16::<2>(h),
                    _mm256_slli_epi16::<1>(h),
                    h,
                    _mm256_srli_epi16::<1>(h),
                    _mm256_srli_epi16::<2>(h),
                    _mm256_srli_epi16::<3>(h),
                ];
                for (w, hb) in wq.iter_mut().zip(hb) {
                    *w = _mm256_or_si256(*w, _mm256_and_si256(hb, b4));
                }
            }
            let (at, step) = act_block(grouped, b);
            for (i, acc) in acc.iter_mut().enumerate() {
                let y = qs.add(i * x.cols + at);
                let quad =
                    |k: usize| _mm256_set1_epi32(y.add(k * step).cast::<i32>().read_unaligned());
                let dot = if K == Q8_0 {
                    let mut sum = _mm256_setzero_si256();
                    for (k, &wq) in wq.iter().enumerate() {
                        let p = _mm256_maddubs_epi16(
                            _mm256_sign_epi8(wq, wq),
                            _mm256_sign_epi8(quad(k), wq),
                        );
                        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(p, ones));
                    }
                    sum
                } else if K == Q5_0 {
                    // Four `maddubs` of 5-bit values per i16 sum (at most 4 · 2 · 31 · 128).
                    let mut sums = [_mm256_setzero_si256(); 2];
                    for (k, &wq) in wq.iter().enumerate() {
                        let p = _mm256_maddubs_epi16(wq, quad(k));
                        sums[k / 4] = _mm256_add_epi16(sums[k / 4], p);
                    }
                    _mm256_add_epi32(
                        _mm256_add_epi32(
                            _mm256_madd_epi16(sums[0], ones),
                            _mm256_madd_epi16(sums[1], ones),
                        ),
                        _mm256_set1_epi32(2 * *off.add(i * nb + b)),
                    )
                } else {
                    let mut sum = _mm256_setzero_si256();
                    for (k, &wq) in wq.iter().enumerate() {
                        sum = _mm256_add_epi16(sum, _mm256_maddubs_epi16(wq, quad(k)));
                    }
                    _mm256_add_epi32(
                        _mm256_madd_epi16(sum, ones),
                        _mm256_set1_epi32(*off.add(i * nb + b)),
                    )
                };
                let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*d.add(i * nb + b)));
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, *acc);
            }
        }
        for (i, &acc) in acc.iter().enumerate() {
            let mut v = [0f32; 8];
            _mm256_storeu_ps(v.as_mut_ptr(), acc);
            for (l, &v) in v.iter().enumerate() {
                if mask >> l & 1 != 0 {
                    *out.add(i * job.stride + l) = v;
                }
            }
        }
    }
}
