//! Encoders: llama.cpp's quantizers (`ggml-quants.c`), rewritten block for block so that the
//! bytes match llama.cpp's on every input.
//!
//! - `*_ref`: the round-to-nearest reference quantizers (`quantize_row_*_ref`), used when no
//!   importance is given — what `llama-quantize` does without an imatrix.
//! - `*_weighted`: the importance-weighted paths (`quantize_row_*_impl` with `quant_weights`).
//!
//! Exactness rests on evaluating every `f32` expression in llama.cpp's order (Rust neither
//! reassociates nor contracts into fused multiply-adds), on [`nearest_int`]'s bit trick instead of
//! a rounding function, on C's integer truncations (`as u8` / `as i8`), and on x86's
//! float-to-int conversion ([`cvtt`]) where the C code casts a float to a small integer.

use half::f16;

use super::kquants::{q3_k_scales, scale_min_k4};
use super::{QK, QK_K, split};

/// Groups whose largest magnitude is below this quantize to zero (`GROUP_MAX_EPS`).
const GROUP_MAX_EPS: f32 = 1e-15;

/// llama.cpp's `nearest_int`: round half to even via the `1.5 * 2^23` trick. For `|x| > 2^22`
/// (and non-finite `x`) it returns the same wrapped value as the C code rather than a rounded one.
#[inline(always)]
pub(super) fn nearest_int(x: f32) -> i32 {
    let val = x + 12_582_912.0;
    (val.to_bits() as i32 & 0x007f_ffff) - 0x0040_0000
}

/// C's float-to-int conversion as x86 performs it (`cvttss2si`): truncation toward zero, and
/// `i32::MIN` for NaN and out-of-range values. Casts to `int8_t` / `uint8_t` keep its low byte.
#[inline(always)]
pub(super) fn cvtt(x: f32) -> i32 {
    if x.is_nan() || x >= 2_147_483_648.0 {
        i32::MIN
    } else {
        x as i32
    }
}

/// ggml's `GGML_FP32_TO_FP16`: round to nearest even; NaN becomes the canonical quiet NaN.
#[inline(always)]
pub(super) fn fp16(x: f32) -> f16 {
    if x.is_nan() {
        f16::from_bits(0x7E00 | ((x.to_bits() >> 16) as u16 & 0x8000))
    } else {
        f16::from_f32(x)
    }
}

/// Concatenates `parts` (which must total `N` bytes) into one block.
#[inline(always)]
fn assemble<const N: usize>(parts: &[&[u8]]) -> [u8; N] {
    debug_assert_eq!(parts.iter().map(|p| p.len()).sum::<usize>(), N);
    let mut out = [0u8; N];
    for (o, &b) in out.iter_mut().zip(parts.iter().flat_map(|p| p.iter())) {
        *o = b;
    }
    out
}

/// `Σ x²`, summed in order from `0.0` as the C loops do.
#[inline(always)]
fn sum_sq(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |s, &v| s + v * v)
}

/// Sum in order from `0.0`.
#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |s, &v| s + v)
}

/// The element of largest magnitude (the first one on ties), and that magnitude.
#[inline(always)]
fn signed_amax(x: &[f32]) -> (f32, f32) {
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    (max, amax)
}

// ---------------------------------------------------------------------------------------------
// Legacy 32-element blocks.

/// Packs 32 4-bit values: byte `j` holds element `j` (low nibble) and `j + 16` (high).
#[inline(always)]
fn pack_nibbles(l: &[u8; QK]) -> [u8; QK / 2] {
    let (lo, hi) = split::<_, 16, 16, 32>(l);
    let mut qs = [0u8; QK / 2];
    for ((q, &a), &b) in qs.iter_mut().zip(lo).zip(hi) {
        *q = (a & 0x0F) | ((b & 0x0F) << 4);
    }
    qs
}

/// Packs 32 5-bit values into Q5's `qh` (bit `j` = fifth bit of element `j`) and nibbles.
#[inline(always)]
fn pack_q5(l: &[u8; QK]) -> ([u8; 4], [u8; QK / 2]) {
    let mut qh = 0u32;
    for (j, &v) in l.iter().enumerate() {
        qh |= u32::from((v & 0x10) >> 4) << j;
    }
    (qh.to_le_bytes(), pack_nibbles(l))
}

/// The smallest and largest element, as `quantize_row_q4_1_ref` finds them.
#[inline(always)]
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

/// Q4_0 (`quantize_row_q4_0_ref`): `d = max / -8` with `max` the signed element of largest
/// magnitude, `q = min(15, trunc(x / d + 8.5))`.
pub(super) fn q4_0_ref(x: &[f32; QK]) -> [u8; 18] {
    let (max, _) = signed_amax(x);
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let l = x.map(|v| (cvtt(v * id + 8.5) as i8).min(15) as u8);
    assemble(&[&fp16(d).to_le_bytes(), &pack_nibbles(&l)])
}

/// Q4_1 (`quantize_row_q4_1_ref`): `d = (max - min) / 15`, `m = min`,
/// `q = min(15, trunc((x - min) / d + 0.5))`.
pub(super) fn q4_1_ref(x: &[f32; QK]) -> [u8; 20] {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let l = x.map(|v| (cvtt((v - min) * id + 0.5) as i8).min(15) as u8);
    assemble(&[
        &fp16(d).to_le_bytes(),
        &fp16(min).to_le_bytes(),
        &pack_nibbles(&l),
    ])
}

/// Q5_0 (`quantize_row_q5_0_ref`): `d = max / -16`, `q = min(31, trunc(x / d + 16.5))`.
pub(super) fn q5_0_ref(x: &[f32; QK]) -> [u8; 22] {
    let (max, _) = signed_amax(x);
    let d = max / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let l = x.map(|v| (cvtt(v * id + 16.5) as i8).min(31) as u8);
    let (qh, qs) = pack_q5(&l);
    assemble(&[&fp16(d).to_le_bytes(), &qh, &qs])
}

/// Q5_1 (`quantize_row_q5_1_ref`): `d = (max - min) / 31`, `m = min`,
/// `q = trunc((x - min) / d + 0.5)`.
pub(super) fn q5_1_ref(x: &[f32; QK]) -> [u8; 24] {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let l = x.map(|v| cvtt((v - min) * id + 0.5) as u8);
    let (qh, qs) = pack_q5(&l);
    assemble(&[&fp16(d).to_le_bytes(), &fp16(min).to_le_bytes(), &qh, &qs])
}

/// Per-element weights of the legacy weighted quantizers: `qw * sqrt(sigma2 + x²)`.
#[inline(always)]
fn legacy_weights(x: &[f32; QK], qw: &[f32; QK], sigma2: f32) -> [f32; QK] {
    let mut w = [0.0f32; QK];
    for ((w, &x), &q) in w.iter_mut().zip(x).zip(qw) {
        *w = q * (sigma2 + x * x).sqrt();
    }
    w
}

/// `sigma2` of a row for the legacy weighted quantizers: the mean square of the row.
pub(super) fn row_sigma2(row: &[f32]) -> f32 {
    sum_sq(row) / row.len() as f32
}

/// Q4_0 with importance (`quantize_row_q4_0_impl`).
pub(super) fn q4_0_weighted(x: &[f32; QK], qw: &[f32; QK], sigma2: f32) -> [u8; 18] {
    let w = legacy_weights(x, qw, sigma2);
    let mut l = [0i8; QK];
    let d = make_qx_quants(8, x, &mut l, &w);
    assemble(&[&fp16(d).to_le_bytes(), &pack_nibbles(&l.map(|v| v as u8))])
}

/// Q4_1 with importance (`quantize_row_q4_1_impl`).
pub(super) fn q4_1_weighted(x: &[f32; QK], qw: &[f32; QK], sigma2: f32) -> [u8; 20] {
    let w = legacy_weights(x, qw, sigma2);
    let mut l = [0u8; QK];
    let (d, min) = make_qkx2_quants(15, x, &w, &mut l, -0.9, 0.05, 36, false);
    assemble(&[
        &fp16(d).to_le_bytes(),
        &fp16(-min).to_le_bytes(),
        &pack_nibbles(&l),
    ])
}

/// Q5_0 with importance (`quantize_row_q5_0_impl`).
pub(super) fn q5_0_weighted(x: &[f32; QK], qw: &[f32; QK], sigma2: f32) -> [u8; 22] {
    let w = legacy_weights(x, qw, sigma2);
    let mut l = [0i8; QK];
    let d = make_qx_quants(16, x, &mut l, &w);
    let (qh, qs) = pack_q5(&l.map(|v| v as u8));
    assemble(&[&fp16(d).to_le_bytes(), &qh, &qs])
}

/// Q5_1 with importance (`quantize_row_q5_1_impl`).
pub(super) fn q5_1_weighted(x: &[f32; QK], qw: &[f32; QK], sigma2: f32) -> [u8; 24] {
    let w = legacy_weights(x, qw, sigma2);
    let mut l = [0u8; QK];
    let (d, min) = make_qkx2_quants(31, x, &w, &mut l, -0.9, 0.05, 36, false);
    let (qh, qs) = pack_q5(&l);
    assemble(&[&fp16(d).to_le_bytes(), &fp16(-min).to_le_bytes(), &qh, &qs])
}

// ---------------------------------------------------------------------------------------------
// Scale searches (`make_*_quants`).

/// `make_qx_quants` with `rmse_type = 1` and explicit weights `w` (callers pass `x²` where
/// llama.cpp passes no weights): symmetric quants `l + nmax` (`l` in `-nmax..nmax`) written to
/// `out`, trying 19 scales around `max / -nmax` for the best weighted fit; returns the scale.
fn make_qx_quants<const N: usize>(nmax: i32, x: &[f32; N], out: &mut [i8; N], w: &[f32; N]) -> f32 {
    let (max, amax) = signed_amax(x);
    if amax < GROUP_MAX_EPS {
        *out = [0; N];
        return 0.0;
    }
    let clamp = |l: i32| l.min(nmax - 1).max(-nmax);
    let mut iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for ((o, &x), &w) in out.iter_mut().zip(x).zip(w) {
        let l = clamp(nearest_int(iscale * x));
        *o = (l + nmax) as i8;
        sumlx += w * x * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in (-9..=9).filter(|&is| is != 0) {
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for (&x, &w) in x.iter().zip(w) {
            let l = clamp(nearest_int(iscale * x));
            sumlx += w * x * l as f32;
            suml2 += w * l as f32 * l as f32;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (o, &x) in out.iter_mut().zip(x) {
                *o = (nmax + clamp(nearest_int(iscale * x))) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// `make_q3_quants` with `do_rmse` (the only way Q3_K uses it): symmetric quants refined one
/// element at a time (up to 5 passes) to maximise the `x²`-weighted fit; returns the scale.
fn make_q3_quants<const N: usize>(nmax: i32, x: &[f32; N], out: &mut [i8; N]) -> f32 {
    let (max, amax) = signed_amax(x);
    if amax < GROUP_MAX_EPS {
        *out = [0; N];
        return 0.0;
    }
    let clamp = |l: i32| l.min(nmax - 1).max(-nmax);
    let iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for (o, &x) in out.iter_mut().zip(x) {
        let l = clamp(nearest_int(iscale * x));
        *o = l as i8;
        let w = x * x;
        sumlx += w * x * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    for _ in 0..5 {
        let mut n_changed = 0;
        for (o, &x) in out.iter_mut().zip(x) {
            let w = x * x;
            let li = f32::from(*o);
            let mut slx = sumlx - w * x * li;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * li * li;
                let new_l = clamp(nearest_int(x * sl2 / slx));
                if new_l != i32::from(*o) {
                    slx += w * x * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        *o = new_l as i8;
                        sumlx = slx;
                        suml2 = sl2;
                        n_changed += 1;
                    }
                }
            }
        }
        if n_changed == 0 {
            break;
        }
    }
    for o in out.iter_mut() {
        *o = (i32::from(*o) + nmax) as i8;
    }
    if suml2 > 0.0 { sumlx / suml2 } else { 0.0 }
}

/// `make_qkx2_quants` (and `make_qkx3_quants`, identical when weights are given): asymmetric
/// quants `0..=nmax` in `out` for `x ≈ scale * l - min`, searching `nstep + 1` scales from
/// `(nmax + rmin) / (max - min)` in steps of `rdelta` with a weighted least-squares fit of scale
/// and min; returns `(scale, min)` (the min as a non-negative offset to subtract).
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants<const N: usize>(
    nmax: i32,
    x: &[f32; N],
    weights: &[f32; N],
    out: &mut [u8; N],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let (Some(&x0), Some(&w0)) = (x.first(), weights.first()) else {
        return (0.0, 0.0);
    };
    let (mut min, mut max) = (x0, x0);
    let mut sum_w = w0;
    let mut sum_x = sum_w * x0;
    for (&x, &w) in x.iter().zip(weights).skip(1) {
        if x < min {
            min = x;
        }
        if x > max {
            max = x;
        }
        sum_w += w;
        sum_x += w * x;
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        *out = [0; N];
        return (0.0, -min);
    }
    let err = |d: f32| if use_mad { d.abs() } else { d * d };
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for ((o, &x), &w) in out.iter_mut().zip(x).zip(weights) {
        let l = nearest_int(iscale * (x - min));
        *o = l.min(nmax).max(0) as u8;
        best_error += w * err(scale * f32::from(*o) + min - x);
    }
    if nstep < 1 {
        return (scale, -min);
    }
    let mut aux = [0u8; N];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for ((a, &x), &w) in aux.iter_mut().zip(x).zip(weights) {
            let l = nearest_int(iscale * (x - min)).min(nmax).max(0);
            *a = l as u8;
            let l = l as f32;
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x;
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for ((&a, &x), &w) in aux.iter().zip(x).zip(weights) {
                cur_error += w * err(this_scale * f32::from(a) + this_min - x);
            }
            if cur_error < best_error {
                *out = aux;
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// `make_qp_quants`: quantizes non-negative `x` (sub-block scales or mins) to `0..=nmax` with
/// weights `qw`, trying 9 scales and then refining element by element; returns the scale.
fn make_qp_quants<const N: usize>(
    nmax: i32,
    x: &[f32; N],
    out: &mut [u8; N],
    qw: &[f32; N],
) -> f32 {
    let mut max = 0.0f32;
    for &v in x {
        max = if max > v { max } else { v };
    }
    if max < GROUP_MAX_EPS {
        *out = [0; N];
        return 0.0;
    }
    let mut iscale = nmax as f32 / max;
    for (o, &x) in out.iter_mut().zip(x) {
        *o = nearest_int(iscale * x) as u8;
    }
    let scale = 1.0 / iscale;
    let mut best_mse = 0.0f32;
    for ((&l, &x), &w) in out.iter().zip(x).zip(qw) {
        let diff = x - scale * f32::from(l);
        best_mse += w * diff * diff;
    }
    for is in (-4..=4).filter(|&is| is != 0) {
        let iscale_is = (0.1 * is as f32 + nmax as f32) / max;
        let scale_is = 1.0 / iscale_is;
        let mut mse = 0.0f32;
        for (&x, &w) in x.iter().zip(qw) {
            let l = nearest_int(iscale_is * x).min(nmax);
            let diff = x - scale_is * l as f32;
            mse += w * diff * diff;
        }
        if mse < best_mse {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for ((o, &x), &w) in out.iter_mut().zip(x).zip(qw) {
        let l = nearest_int(iscale * x).min(nmax);
        *o = l as u8;
        sumlx += w * x * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    for _ in 0..5 {
        let mut n_changed = 0;
        for ((o, &x), &w) in out.iter_mut().zip(x).zip(qw) {
            let li = f32::from(*o);
            let mut slx = sumlx - w * x * li;
            let mut sl2 = suml2 - w * li * li;
            if slx > 0.0 && sl2 > 0.0 {
                let new_l = nearest_int(x * sl2 / slx).min(nmax);
                if new_l != i32::from(*o) {
                    slx += w * x * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if slx * slx * suml2 > sumlx * sumlx * sl2 {
                        *o = new_l as u8;
                        sumlx = slx;
                        suml2 = sl2;
                        n_changed += 1;
                    }
                }
            }
        }
        if n_changed == 0 {
            break;
        }
    }
    if suml2 > 0.0 { sumlx / suml2 } else { 0.0 }
}

// ---------------------------------------------------------------------------------------------
// K-quant packing.

/// Packs 256 2-bit values as Q2_K / Q3_K `qs`: byte `32h + l` holds elements `128h + l + 32k`
/// at bit `2k`.
#[inline(always)]
fn pack_2bit(l: &[u8; QK_K]) -> [u8; QK_K / 4] {
    let mut qs = [0u8; QK_K / 4];
    let (l128, _) = l.as_chunks::<128>();
    let (q32, _) = qs.as_chunks_mut::<32>();
    for (q, l) in q32.iter_mut().zip(l128) {
        let (l32, _) = l.as_chunks::<32>();
        for (k, l) in l32.iter().enumerate() {
            for (q, &v) in q.iter_mut().zip(l) {
                *q |= v << (2 * k);
            }
        }
    }
    qs
}

/// Packs 256 4-bit values as Q4_K / Q5_K `qs`: byte `32c + l` holds element `64c + l` (low
/// nibble) and `64c + 32 + l` (high).
#[inline(always)]
fn pack_4bit_k(l: &[u8; QK_K]) -> [u8; QK_K / 2] {
    let mut qs = [0u8; QK_K / 2];
    let (l64, _) = l.as_chunks::<64>();
    let (q32, _) = qs.as_chunks_mut::<32>();
    for (q, l) in q32.iter_mut().zip(l64) {
        let (lo, hi) = split::<_, 32, 32, 64>(l);
        for ((q, &a), &b) in q.iter_mut().zip(lo).zip(hi) {
            *q = a | (b << 4);
        }
    }
    qs
}

/// Packs eight 6-bit scales and mins into Q4_K / Q5_K's 12 bytes (inverse of
/// [`scale_min_k4`]).
#[inline(always)]
fn pack_scale_min_k4(ls: &[u8; 8], lm: &[u8; 8]) -> [u8; 12] {
    let (ls_lo, ls_hi) = split::<_, 4, 4, 8>(ls);
    let (lm_lo, lm_hi) = split::<_, 4, 4, 8>(lm);
    let mut a = *ls_lo;
    let mut b = *lm_lo;
    let mut c = [0u8; 4];
    for ((((a, b), c), &s), &m) in a.iter_mut().zip(&mut b).zip(&mut c).zip(ls_hi).zip(lm_hi) {
        *c = (s & 0xF) | ((m & 0xF) << 4);
        *a |= (s >> 4) << 6;
        *b |= (m >> 4) << 6;
    }
    assemble(&[&a, &b, &c])
}

/// Packs sixteen 6-bit Q3_K scales (`0..64`) into 12 bytes (inverse of [`q3_k_scales`]).
#[inline(always)]
fn pack_q3_scales(l: &[i32; 16]) -> [u8; 12] {
    let mut low = [0u8; 8];
    let mut high = [0u8; 4];
    let (first, second) = split::<_, 8, 8, 16>(l);
    for (j, ((lo, &a), &b)) in low.iter_mut().zip(first).zip(second).enumerate() {
        *lo = ((a & 0xF) | ((b & 0xF) << 4)) as u8;
        // The high bits of scale `j` go to bit `2 * (j / 4)` of byte `j % 4`, those of `j + 8`
        // two bit pairs further up.
        let h = ((a >> 4) << (2 * (j / 4))) | ((b >> 4) << (2 * (j / 4 + 2)));
        high[j % 4] |= h as u8;
    }
    assemble(&[&low, &high])
}

/// Q3_K's hmask and qs from 3-bit values `0..8`: the high bit of element `j` goes to bit `j / 32`
/// of `hmask[j % 32]`, the low 2 bits as in [`pack_2bit`].
#[inline(always)]
fn pack_q3(l: &[i8; QK_K]) -> ([u8; QK_K / 8], [u8; QK_K / 4]) {
    let mut hmask = [0u8; QK_K / 8];
    let mut low = [0u8; QK_K];
    let (l32, _) = l.as_chunks::<32>();
    let (low32, _) = low.as_chunks_mut::<32>();
    for (bit, (l, low)) in l32.iter().zip(low32).enumerate() {
        for ((h, &v), o) in hmask.iter_mut().zip(l).zip(low) {
            let mut v = v as u8;
            if v > 3 {
                *h |= 1 << bit;
                v -= 4;
            }
            *o = v;
        }
    }
    (hmask, pack_2bit(&low))
}

/// Requantizes the 3-bit values of the sub-blocks whose packed scale is non-zero (the shared
/// tail of `quantize_row_q3_K_ref` and `_impl`).
fn q3_k_requantize(x: &[f32; QK_K], packed: &[u8; 12], d: f16, l: &mut [i8; QK_K]) {
    let d = d.to_f32();
    let (x16, _) = x.as_chunks::<16>();
    let (l16, _) = l.as_chunks_mut::<16>();
    for ((x, l), &sc) in x16.iter().zip(l16).zip(&q3_k_scales(packed)) {
        let dl = d * f32::from(sc - 32);
        if dl == 0.0 {
            continue;
        }
        for (l, &x) in l.iter_mut().zip(x) {
            *l = (nearest_int(x / dl).clamp(-4, 3) + 4) as i8;
        }
    }
}

/// Requantizes Q4_K / Q5_K values (`0..=nmax`) against the stored scales and mins.
fn k4_requantize(
    x: &[f32; QK_K],
    packed: &[u8; 12],
    d: f16,
    dmin: f16,
    nmax: i32,
    l: &mut [u8; QK_K],
) {
    let (d, dmin) = (d.to_f32(), dmin.to_f32());
    let (x32, _) = x.as_chunks::<32>();
    let (l32, _) = l.as_chunks_mut::<32>();
    for ((x, l), &(sc, m)) in x32.iter().zip(l32).zip(&scale_min_k4(packed)) {
        let dl = d * f32::from(sc);
        if dl == 0.0 {
            continue;
        }
        let dm = dmin * f32::from(m);
        for (l, &x) in l.iter_mut().zip(x) {
            *l = nearest_int((x + dm) / dl).min(nmax).max(0) as u8;
        }
    }
}

/// Requantizes Q2_K values (`0..4`) against the stored 4-bit scales and mins.
fn q2_k_requantize(x: &[f32; QK_K], packed: &[u8; 16], d: f16, dmin: f16, l: &mut [u8; QK_K]) {
    let (d, dmin) = (d.to_f32(), dmin.to_f32());
    let (x16, _) = x.as_chunks::<16>();
    let (l16, _) = l.as_chunks_mut::<16>();
    for ((x, l), &sc) in x16.iter().zip(l16).zip(packed) {
        let dl = d * f32::from(sc & 0xF);
        if dl == 0.0 {
            continue;
        }
        let dm = dmin * f32::from(sc >> 4);
        for (l, &x) in l.iter_mut().zip(x) {
            *l = nearest_int((x + dm) / dl).clamp(0, 3) as u8;
        }
    }
}

/// Requantizes Q6_K values (`0..64`) against the stored 8-bit scales.
fn q6_k_requantize(x: &[f32; QK_K], scales: &[i8; 16], d: f16, l: &mut [i8; QK_K]) {
    let d = d.to_f32();
    let (x16, _) = x.as_chunks::<16>();
    let (l16, _) = l.as_chunks_mut::<16>();
    for ((x, l), &sc) in x16.iter().zip(l16).zip(scales) {
        let dl = d * f32::from(sc);
        if dl == 0.0 {
            continue;
        }
        for (l, &x) in l.iter_mut().zip(x) {
            *l = (nearest_int(x / dl).clamp(-32, 31) + 32) as i8;
        }
    }
}

/// Packs Q5_K values (`0..32`): `qh` bit `2c` / `2c + 1` of byte `i` for elements `64c + i` /
/// `64c + 32 + i`, and the low nibbles as [`pack_4bit_k`].
#[inline(always)]
fn pack_q5_k(l: &[u8; QK_K]) -> ([u8; QK_K / 8], [u8; QK_K / 2]) {
    let mut qh = [0u8; QK_K / 8];
    let mut low = [0u8; QK_K];
    let (l64, _) = l.as_chunks::<64>();
    let (low64, _) = low.as_chunks_mut::<64>();
    for (c, (l, low)) in l64.iter().zip(low64).enumerate() {
        let (m1, m2) = (1u8 << (2 * c), 2u8 << (2 * c));
        let (a, b) = split::<_, 32, 32, 64>(l);
        let (lo_a, lo_b) = low.split_at_mut(32);
        for ((((h, &a), &b), oa), ob) in qh.iter_mut().zip(a).zip(b).zip(lo_a).zip(lo_b) {
            *oa = if a > 15 { a - 16 } else { a };
            *ob = if b > 15 { b - 16 } else { b };
            if a > 15 {
                *h |= m1;
            }
            if b > 15 {
                *h |= m2;
            }
        }
    }
    (qh, pack_4bit_k(&low))
}

/// Packs Q6_K values (`0..64`) into `ql` and `qh` (layout in [`super::kquants`]'s `q6_k`).
#[inline(always)]
fn pack_q6_k(l: &[i8; QK_K]) -> ([u8; QK_K / 2], [u8; QK_K / 4]) {
    let mut ql = [0u8; QK_K / 2];
    let mut qh = [0u8; QK_K / 4];
    let (l128, _) = l.as_chunks::<128>();
    let (ql64, _) = ql.as_chunks_mut::<64>();
    let (qh32, _) = qh.as_chunks_mut::<32>();
    for ((l, ql), qh) in l128.iter().zip(ql64).zip(qh32) {
        let (l12, l34) = split::<_, 64, 64, 128>(l);
        let (l1, l2) = split::<_, 32, 32, 64>(l12);
        let (l3, l4) = split::<_, 32, 32, 64>(l34);
        let (qa, qb) = ql.split_at_mut(32);
        let quads = l1.iter().zip(l2).zip(l3).zip(l4);
        for (((qa, qb), qh), (((&a, &b), &c), &d)) in qa.iter_mut().zip(qb).zip(qh).zip(quads) {
            let [a, b, c, d] = [a, b, c, d].map(|v| v as u8);
            *qa = (a & 0xF) | ((c & 0xF) << 4);
            *qb = (b & 0xF) | ((d & 0xF) << 4);
            *qh = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((d >> 4) << 6);
        }
    }
    (ql, qh)
}

// ---------------------------------------------------------------------------------------------
// K-quant encoders.

/// Q2_K (`quantize_row_q2_K_ref`).
pub(super) fn q2_k_ref(x: &[f32; QK_K]) -> [u8; 84] {
    let mut l = [0u8; QK_K];
    let mut scales = [0.0f32; 16];
    let mut mins = [0.0f32; 16];
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    let (x16, _) = x.as_chunks::<16>();
    let (l16, _) = l.as_chunks_mut::<16>();
    for (((x, l), s), m) in x16.iter().zip(l16).zip(&mut scales).zip(&mut mins) {
        let w = x.map(f32::abs);
        (*s, *m) = make_qkx2_quants(3, x, &w, l, -0.5, 0.1, 15, true);
        if *s > max_scale {
            max_scale = *s;
        }
        if *m > max_min {
            max_min = *m;
        }
    }
    let mut packed = [0u8; 16];
    let d = if max_scale > 0.0 {
        let iscale = 15.0 / max_scale;
        for (p, &s) in packed.iter_mut().zip(&scales) {
            *p = nearest_int(iscale * s) as u8;
        }
        fp16(max_scale / 15.0)
    } else {
        fp16(0.0)
    };
    let dmin = if max_min > 0.0 {
        let iscale = 15.0 / max_min;
        for (p, &m) in packed.iter_mut().zip(&mins) {
            *p |= (nearest_int(iscale * m) << 4) as u8;
        }
        fp16(max_min / 15.0)
    } else {
        fp16(0.0)
    };
    q2_k_requantize(x, &packed, d, dmin, &mut l);
    assemble(&[
        &packed,
        &pack_2bit(&l),
        &d.to_le_bytes(),
        &dmin.to_le_bytes(),
    ])
}

/// Q2_K with importance (`quantize_row_q2_K_impl`).
pub(super) fn q2_k_weighted(x: &[f32; QK_K], qw: &[f32; QK_K]) -> [u8; 84] {
    let mut l = [0u8; QK_K];
    let mut scales = [0.0f32; 16];
    let mut mins = [0.0f32; 16];
    let mut sw = [0.0f32; 16];
    let sigma2 = sum_sq(x) / QK_K as f32;
    let (x16, _) = x.as_chunks::<16>();
    let (qw16, _) = qw.as_chunks::<16>();
    let (l16, _) = l.as_chunks_mut::<16>();
    for (((((x, qw), l), s), m), sw) in x16
        .iter()
        .zip(qw16)
        .zip(l16)
        .zip(&mut scales)
        .zip(&mut mins)
        .zip(&mut sw)
    {
        let mut w = [0.0f32; 16];
        for ((w, &q), &x) in w.iter_mut().zip(qw).zip(x) {
            *w = q * (sigma2 + x * x).sqrt();
        }
        *sw = sum(&w);
        (*s, *m) = make_qkx2_quants(3, x, &w, l, -0.9, 0.05, 36, false);
    }
    let (mut ls, mut lm) = ([0u8; 16], [0u8; 16]);
    let d = fp16(make_qp_quants(15, &scales, &mut ls, &sw));
    let dmin = fp16(make_qp_quants(15, &mins, &mut lm, &sw));
    let mut packed = [0u8; 16];
    for ((p, &s), &m) in packed.iter_mut().zip(&ls).zip(&lm) {
        *p = s | (m << 4);
    }
    q2_k_requantize(x, &packed, d, dmin, &mut l);
    assemble(&[
        &packed,
        &pack_2bit(&l),
        &d.to_le_bytes(),
        &dmin.to_le_bytes(),
    ])
}

/// Q3_K (`quantize_row_q3_K_ref`).
pub(super) fn q3_k_ref(x: &[f32; QK_K]) -> [u8; 110] {
    let mut l = [0i8; QK_K];
    let mut scales = [0.0f32; 16];
    let (mut max_scale, mut amax) = (0.0f32, 0.0f32);
    let (x16, _) = x.as_chunks::<16>();
    let (l16, _) = l.as_chunks_mut::<16>();
    for ((x, l), s) in x16.iter().zip(l16).zip(&mut scales) {
        *s = make_q3_quants(4, x, l);
        if s.abs() > amax {
            amax = s.abs();
            max_scale = *s;
        }
    }
    let (packed, d) = if max_scale != 0.0 {
        let iscale = -32.0 / max_scale;
        let ls = scales.map(|s| i32::from(nearest_int(iscale * s) as i8).clamp(-32, 31) + 32);
        (pack_q3_scales(&ls), fp16(1.0 / iscale))
    } else {
        ([0; 12], fp16(0.0))
    };
    q3_k_requantize(x, &packed, d, &mut l);
    let (hmask, qs) = pack_q3(&l);
    assemble(&[&hmask, &qs, &packed, &d.to_le_bytes()])
}

/// Q3_K with importance (`quantize_row_q3_K_impl`).
pub(super) fn q3_k_weighted(x: &[f32; QK_K], qw: &[f32; QK_K]) -> [u8; 110] {
    let mut l = [0i8; QK_K];
    let mut scales = [0.0f32; 16];
    let mut sw = [0.0f32; 16];
    let sigma2 = 2.0 * sum_sq(x) / QK_K as f32;
    let (x16, _) = x.as_chunks::<16>();
    let (qw16, _) = qw.as_chunks::<16>();
    let (l16, _) = l.as_chunks_mut::<16>();
    for ((((x, qw), l), s), sw) in x16.iter().zip(qw16).zip(l16).zip(&mut scales).zip(&mut sw) {
        let mut w = [0.0f32; 16];
        for ((w, &q), &x) in w.iter_mut().zip(qw).zip(x) {
            *w = q * (sigma2 + x * x).sqrt();
        }
        *sw = sum(&w);
        *s = make_qx_quants(4, x, l, &w);
    }
    let mut ls = [0i8; 16];
    let d_block = make_qx_quants(32, &scales, &mut ls, &sw);
    let packed = pack_q3_scales(&ls.map(i32::from));
    let d = fp16(d_block);
    q3_k_requantize(x, &packed, d, &mut l);
    let (hmask, qs) = pack_q3(&l);
    assemble(&[&hmask, &qs, &packed, &d.to_le_bytes()])
}

/// Sub-block scales and mins of Q4_K / Q5_K's reference quantizers: weights `sqrt(mean x²) +
/// |x|` per 32-element sub-block and `make_qkx2_quants` with the given search parameters.
fn k4_ref_scales(
    x: &[f32; QK_K],
    nmax: i32,
    rmin: f32,
    nstep: i32,
    l: &mut [u8; QK_K],
) -> ([f32; 8], [f32; 8]) {
    let mut scales = [0.0f32; 8];
    let mut mins = [0.0f32; 8];
    let (x32, _) = x.as_chunks::<32>();
    let (l32, _) = l.as_chunks_mut::<32>();
    for (((x, l), s), m) in x32.iter().zip(l32).zip(&mut scales).zip(&mut mins) {
        let av_x = (sum_sq(x) / 32.0).sqrt();
        let w = x.map(|v| av_x + v.abs());
        (*s, *m) = make_qkx2_quants(nmax, x, &w, l, rmin, 0.1, nstep, false);
    }
    (scales, mins)
}

/// The 6-bit quantized scales and mins and the two f16 super-scales of the Q4_K / Q5_K
/// reference quantizers.
fn k4_ref_pack(scales: &[f32; 8], mins: &[f32; 8]) -> ([u8; 12], f16, f16) {
    let max_of = |v: &[f32; 8]| v.iter().fold(0.0f32, |m, &s| if s > m { s } else { m });
    let (max_scale, max_min) = (max_of(scales), max_of(mins));
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let ls = scales.map(|s| (nearest_int(inv_scale * s) as u8).min(63));
    let lm = mins.map(|m| (nearest_int(inv_min * m) as u8).min(63));
    (
        pack_scale_min_k4(&ls, &lm),
        fp16(max_scale / 63.0),
        fp16(max_min / 63.0),
    )
}

/// Sub-block scales and mins of the weighted Q4_K / Q5_K quantizers, and the weights' sums.
fn k4_weighted_scales(
    x: &[f32; QK_K],
    qw: &[f32; QK_K],
    nmax: i32,
    l: &mut [u8; QK_K],
) -> ([f32; 8], [f32; 8], [f32; 8]) {
    let mut scales = [0.0f32; 8];
    let mut mins = [0.0f32; 8];
    let mut sw = [0.0f32; 8];
    let sigma2 = 2.0 * sum_sq(x) / QK_K as f32;
    let (x32, _) = x.as_chunks::<32>();
    let (qw32, _) = qw.as_chunks::<32>();
    let (l32, _) = l.as_chunks_mut::<32>();
    for (((((x, qw), l), s), m), sw) in x32
        .iter()
        .zip(qw32)
        .zip(l32)
        .zip(&mut scales)
        .zip(&mut mins)
        .zip(&mut sw)
    {
        let mut w = [0.0f32; 32];
        for ((w, &q), &x) in w.iter_mut().zip(qw).zip(x) {
            *w = q * (sigma2 + x * x).sqrt();
        }
        *sw = sum(&w);
        (*s, *m) = make_qkx2_quants(nmax, x, &w, l, -0.9, 0.05, 36, false);
    }
    (scales, mins, sw)
}

/// Q4_K (`quantize_row_q4_K_ref`).
pub(super) fn q4_k_ref(x: &[f32; QK_K]) -> [u8; 144] {
    let mut l = [0u8; QK_K];
    let (scales, mins) = k4_ref_scales(x, 15, -1.0, 20, &mut l);
    let (packed, d, dmin) = k4_ref_pack(&scales, &mins);
    k4_requantize(x, &packed, d, dmin, 15, &mut l);
    assemble(&[
        &d.to_le_bytes(),
        &dmin.to_le_bytes(),
        &packed,
        &pack_4bit_k(&l),
    ])
}

/// Q4_K with importance (`quantize_row_q4_K_impl`).
pub(super) fn q4_k_weighted(x: &[f32; QK_K], qw: &[f32; QK_K]) -> [u8; 144] {
    let mut l = [0u8; QK_K];
    let (scales, mins, sw) = k4_weighted_scales(x, qw, 15, &mut l);
    let (mut ls, mut lm) = ([0u8; 8], [0u8; 8]);
    let d = fp16(make_qp_quants(63, &scales, &mut ls, &sw));
    let dmin = fp16(make_qp_quants(63, &mins, &mut lm, &sw));
    let packed = pack_scale_min_k4(&ls, &lm);
    k4_requantize(x, &packed, d, dmin, 15, &mut l);
    assemble(&[
        &d.to_le_bytes(),
        &dmin.to_le_bytes(),
        &packed,
        &pack_4bit_k(&l),
    ])
}

/// Q5_K (`quantize_row_q5_K_ref`).
pub(super) fn q5_k_ref(x: &[f32; QK_K]) -> [u8; 176] {
    let mut l = [0u8; QK_K];
    let (scales, mins) = k4_ref_scales(x, 31, -0.5, 15, &mut l);
    let (packed, d, dmin) = k4_ref_pack(&scales, &mins);
    k4_requantize(x, &packed, d, dmin, 31, &mut l);
    let (qh, qs) = pack_q5_k(&l);
    assemble(&[&d.to_le_bytes(), &dmin.to_le_bytes(), &packed, &qh, &qs])
}

/// Q5_K with importance (`quantize_row_q5_K_impl`).
pub(super) fn q5_k_weighted(x: &[f32; QK_K], qw: &[f32; QK_K]) -> [u8; 176] {
    let mut l = [0u8; QK_K];
    let (scales, mins, sw) = k4_weighted_scales(x, qw, 31, &mut l);
    let (mut ls, mut lm) = ([0u8; 8], [0u8; 8]);
    let d = fp16(make_qp_quants(63, &scales, &mut ls, &sw));
    let dmin = fp16(make_qp_quants(63, &mins, &mut lm, &sw));
    let packed = pack_scale_min_k4(&ls.map(|v| v.min(63)), &lm.map(|v| v.min(63)));
    k4_requantize(x, &packed, d, dmin, 31, &mut l);
    let (qh, qs) = pack_q5_k(&l);
    assemble(&[&d.to_le_bytes(), &dmin.to_le_bytes(), &packed, &qh, &qs])
}

/// Q6_K: `quantize_row_q6_K_ref` when `qw` is `None`, else `quantize_row_q6_K_impl`.
pub(super) fn q6_k(x: &[f32; QK_K], qw: Option<&[f32; QK_K]>) -> [u8; 210] {
    let mut l = [0i8; QK_K];
    let mut scales = [0.0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0.0f32, 0.0f32);
    let (x16, _) = x.as_chunks::<16>();
    let (l16, _) = l.as_chunks_mut::<16>();
    let sq = x.map(|v| v * v);
    let w = qw.unwrap_or(&sq);
    let (w16, _) = w.as_chunks::<16>();
    for (((x, l), w), s) in x16.iter().zip(l16).zip(w16).zip(&mut scales) {
        *s = make_qx_quants(32, x, l, w);
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = *s;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        return [0; 210];
    }
    let iscale = -128.0 / max_scale;
    let d = fp16(1.0 / iscale);
    let sc = scales.map(|s| nearest_int(iscale * s).min(127) as i8);
    q6_k_requantize(x, &sc, d, &mut l);
    let (ql, qh) = pack_q6_k(&l);
    assemble(&[&ql, &qh, &sc.map(|s| s as u8), &d.to_le_bytes()])
}

/// Q8_K (`quantize_row_q8_K_ref`): `d = max / -127` (f32) with `max` the signed element of
/// largest magnitude, `q = min(127, nearest_int(x / d))`, and the sums of each 16 quants.
pub(super) fn q8_k_ref(x: &[f32; QK_K]) -> [u8; 292] {
    let (max, amax) = signed_amax(x);
    if amax == 0.0 {
        return [0; 292];
    }
    let iscale = -127.0 / max;
    let qs = x.map(|v| nearest_int(iscale * v).min(127) as i8);
    let mut bsums = [0u8; 32];
    let (q16, _) = qs.as_chunks::<16>();
    let (b2, _) = bsums.as_chunks_mut::<2>();
    for (b, q) in b2.iter_mut().zip(q16) {
        let s: i32 = q.iter().map(|&v| i32::from(v)).sum();
        *b = (s as i16).to_le_bytes();
    }
    assemble(&[&(1.0 / iscale).to_le_bytes(), &qs.map(|q| q as u8), &bsums])
}
