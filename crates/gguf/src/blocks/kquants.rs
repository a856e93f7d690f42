//! Decoders of the 256-element super-block types (the K-quants Q2_K..Q8_K and IQ4_XS) and of
//! IQ4_NL. Each follows llama.cpp's `dequantize_row_*` (`ggml-quants.c`) operation for operation,
//! so results are bit-identical: every product and difference is evaluated in `f32` in the same
//! order (Rust never contracts `a * b - c` into a fused multiply-add).

use super::{Halves, QK_K, f16_le, split};

/// IQ4_NL / IQ4_XS code book: the 16 non-linear 4-bit levels (`kvalues_iq4nl`).
const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// One super-block's output.
pub(super) type Super = [f32; QK_K];

/// Applies `f` to each `N`-byte super-block of `data` and its 256 outputs.
#[inline(always)]
pub(super) fn super_blocks<const N: usize>(
    data: &[u8],
    out: &mut [f32],
    f: impl Fn(&[u8; N], &mut Super),
) {
    let (out_blocks, _) = out.as_chunks_mut::<QK_K>();
    for (b, o) in data.as_chunks::<N>().0.iter().zip(out_blocks) {
        f(b, o);
    }
}

/// The eight 6-bit `(scale, min)` pairs of a Q4_K / Q5_K block's packed 12 bytes
/// (`get_scale_min_k4`): sub-block `j < 4` keeps its pair in the low 6 bits of bytes `j` and
/// `j + 4`; `j >= 4` splits its pair between the nibbles of byte `j + 4` (low bits) and the top
/// 2 bits of bytes `j - 4` and `j`.
#[inline(always)]
pub fn scale_min_k4(scales: &[u8; 12]) -> [(u8, u8); 8] {
    let (a, rest) = split::<_, 4, 8, 12>(scales);
    let (b, c) = split::<_, 4, 4, 8>(rest);
    let mut out = [(0, 0); 8];
    let (first, second) = out.split_at_mut(4);
    for ((((lo, hi), &a), &b), &c) in first.iter_mut().zip(second).zip(a).zip(b).zip(c) {
        *lo = (a & 63, b & 63);
        *hi = ((c & 0xF) | ((a >> 6) << 4), (c >> 4) | ((b >> 6) << 4));
    }
    out
}

/// Q2_K: `scales: [u8; 16], qs: [u8; 64], d: f16, dmin: f16`. Sixteen 16-element sub-blocks;
/// sub-block `g` has scale `d * (scales[g] & 15)` and min `dmin * (scales[g] >> 4)`, and its
/// 2-bit quants `q` give `x = scale * q - min`. Bytes `qs[32h..32h + 32]` hold the quants of
/// elements `128h..128h + 128`, four 2-bit fields per byte (shift `2j` for elements
/// `128h + 32j..`).
#[inline(always)]
pub(super) fn q2_k(b: &[u8; 84], out: &mut Super) {
    let (scales, rest) = split::<_, 16, 68, 84>(b);
    let [ref qs @ .., d0, d1, m0, m1] = *rest;
    let (d, min) = (f16_le(d0, d1), f16_le(m0, m1));
    let (qs_half, _) = qs.as_chunks::<32>();
    let (sc_half, _) = scales.as_chunks::<8>();
    let (out_half, _) = out.as_chunks_mut::<128>();
    for ((q, sc), o) in qs_half.iter().zip(sc_half).zip(out_half) {
        let (q16, _) = q.as_chunks::<16>();
        let (sc2, _) = sc.as_chunks::<2>();
        let (o32, _) = o.as_chunks_mut::<32>();
        for (shift, (sc, o)) in (0..4u8).map(|j| 2 * j).zip(sc2.iter().zip(o32)) {
            let (o16, _) = o.as_chunks_mut::<16>();
            for ((o, q), &s) in o16.iter_mut().zip(q16).zip(sc) {
                let dl = d * f32::from(s & 0xF);
                let ml = min * f32::from(s >> 4);
                for (y, &q) in o.iter_mut().zip(q) {
                    *y = dl * f32::from((q >> shift) & 3) - ml;
                }
            }
        }
    }
}

/// Q3_K: `hmask: [u8; 32], qs: [u8; 64], scales: [u8; 12], d: f16`. Sixteen 16-element
/// sub-blocks with 6-bit signed scales (`sc - 32`; low nibbles in `scales[0..8]`, high 2 bits in
/// `scales[8..12]`); each element is a 2-bit low part (laid out as in Q2_K) and a high bit in
/// `hmask` (bit `k` of `hmask[i]` for element `32k + i`); `x = d * (sc - 32) * (low - (high ? 0 :
/// 4))`.
#[inline(always)]
pub(super) fn q3_k(b: &[u8; 110], out: &mut Super) {
    let (hmask, rest) = split::<_, 32, 78, 110>(b);
    let (qs, rest) = split::<_, 64, 14, 78>(rest);
    let [ref packed @ .., d0, d1] = *rest;
    let d_all = f16_le(d0, d1);
    let scales = q3_k_scales(packed);
    let (hm16, _) = hmask.as_chunks::<16>();
    let (qs_half, _) = qs.as_chunks::<32>();
    let (sc_half, _) = scales.as_chunks::<8>();
    let (out_half, _) = out.as_chunks_mut::<128>();
    for (h, ((q, sc), o)) in (0..2u8).zip(qs_half.iter().zip(sc_half).zip(out_half)) {
        let (q16, _) = q.as_chunks::<16>();
        let (sc2, _) = sc.as_chunks::<2>();
        let (o32, _) = o.as_chunks_mut::<32>();
        for (j, (sc, o)) in (0..4u8).zip(sc2.iter().zip(o32)) {
            let shift = 2 * j;
            let m = 1u8 << (4 * h + j);
            let (o16, _) = o.as_chunks_mut::<16>();
            for (((o, q), hm), &s) in o16.iter_mut().zip(q16).zip(hm16).zip(sc) {
                let dl = d_all * f32::from(s - 32);
                for ((y, &q), &hm) in o.iter_mut().zip(q).zip(hm) {
                    let low = ((q >> shift) & 3) as i8;
                    let sub = if hm & m != 0 { 0 } else { 4 };
                    *y = dl * f32::from(low - sub);
                }
            }
        }
    }
}

/// The sixteen 6-bit scales (0..64, not yet offset by -32) of a Q3_K block's 12 packed bytes:
/// scale `j` has its low nibble in byte `j % 8` (low nibble for `j < 8`, high for `j >= 8`) and
/// its high 2 bits at bit `2 * (j / 4)` of byte `8 + j % 4`.
#[inline(always)]
pub(super) fn q3_k_scales(packed: &[u8; 12]) -> [i8; 16] {
    let (low, high) = split::<_, 8, 4, 12>(packed);
    let mut out = [0i8; 16];
    for (j, s) in out.iter_mut().enumerate() {
        let lo = if j < 8 { low[j] & 0xF } else { low[j - 8] >> 4 };
        let hi = (high[j % 4] >> (2 * (j / 4))) & 3;
        *s = (lo | (hi << 4)) as i8;
    }
    out
}

/// Q4_K: `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`. Eight 32-element sub-blocks with
/// 6-bit scales and mins (packed as in [`scale_min_k4`]); `x = d * sc * q - dmin * m`. Bytes
/// `qs[32c..32c + 32]` hold elements `64c..64c + 32` in their low nibbles and the next 32 in their
/// high nibbles.
#[inline(always)]
pub(super) fn q4_k(b: &[u8; 144], out: &mut Super) {
    let [d0, d1, m0, m1, ref rest @ ..] = *b;
    let (d, min) = (f16_le(d0, d1), f16_le(m0, m1));
    let (packed, qs) = split::<_, 12, 128, 140>(rest);
    let sm = scale_min_k4(packed);
    let (sm2, _) = sm.as_chunks::<2>();
    let (q32, _) = qs.as_chunks::<32>();
    let (o64, _) = out.as_chunks_mut::<64>();
    for ((q, &[(sc1, m1), (sc2, m2)]), o) in q32.iter().zip(sm2).zip(o64) {
        let (d1, m1) = (d * f32::from(sc1), min * f32::from(m1));
        let (d2, m2) = (d * f32::from(sc2), min * f32::from(m2));
        let (lo, hi) = o.split_at_mut(32);
        for ((&q, l), h) in q.iter().zip(lo).zip(hi) {
            *l = d1 * f32::from(q & 0xF) - m1;
            *h = d2 * f32::from(q >> 4) - m2;
        }
    }
}

/// Q5_K: `d: f16, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]`. Q4_K plus a fifth
/// bit per element: element `64c + i` takes bit `2c` of `qh[i]`, element `64c + 32 + i` bit
/// `2c + 1`; `x = d * sc * (nibble + 16 * bit) - dmin * m`.
#[inline(always)]
pub(super) fn q5_k(b: &[u8; 176], out: &mut Super) {
    let [d0, d1, m0, m1, ref rest @ ..] = *b;
    let (d, min) = (f16_le(d0, d1), f16_le(m0, m1));
    let (packed, rest) = split::<_, 12, 160, 172>(rest);
    let (qh, qs) = split::<_, 32, 128, 160>(rest);
    let sm = scale_min_k4(packed);
    let (sm2, _) = sm.as_chunks::<2>();
    let (q32, _) = qs.as_chunks::<32>();
    let (o64, _) = out.as_chunks_mut::<64>();
    for (c, ((q, &[(sc1, m1), (sc2, m2)]), o)) in (0..4u8).zip(q32.iter().zip(sm2).zip(o64)) {
        let (d1, m1) = (d * f32::from(sc1), min * f32::from(m1));
        let (d2, m2) = (d * f32::from(sc2), min * f32::from(m2));
        let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
        let (lo, hi) = o.split_at_mut(32);
        for (((&q, &h), l), y) in q.iter().zip(qh).zip(lo).zip(hi) {
            let b1 = if h & u1 != 0 { 16 } else { 0 };
            let b2 = if h & u2 != 0 { 16 } else { 0 };
            *l = d1 * f32::from((q & 0xF) + b1) - m1;
            *y = d2 * f32::from((q >> 4) + b2) - m2;
        }
    }
}

/// Q6_K: `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`. Sixteen 16-element sub-blocks
/// with signed 8-bit scales; 6-bit quants `q` (low nibble from `ql`, high 2 bits from `qh`) give
/// `x = d * sc * (q - 32)`. Per 128-element half `h`: `ql[64h + i]` holds elements `i` (low
/// nibble) and `i + 64` (high), `ql[64h + 32 + i]` elements `i + 32` and `i + 96`; `qh[32h + i]`
/// holds the high bits of `i`, `i + 32`, `i + 64`, `i + 96` at shifts 0, 2, 4, 6.
#[inline(always)]
pub(super) fn q6_k(b: &[u8; 210], out: &mut Super) {
    let (ql, rest) = split::<_, 128, 82, 210>(b);
    let (qh, rest) = split::<_, 64, 18, 82>(rest);
    let [ref sc @ .., d0, d1] = *rest;
    let d = f16_le(d0, d1);
    let (ql64, _) = ql.as_chunks::<64>();
    let (qh32, _) = qh.as_chunks::<32>();
    let (sc8, _) = sc.as_chunks::<8>();
    let (o128, _) = out.as_chunks_mut::<128>();
    for (((ql, qh), sc), o) in ql64.iter().zip(qh32).zip(sc8).zip(o128) {
        let (qa, qb) = split::<_, 32, 32, 64>(ql);
        let (o12, o34) = o.split_at_mut(64);
        let (o1, o2) = o12.split_at_mut(32);
        let (o3, o4) = o34.split_at_mut(32);
        let outs = o1
            .as_chunks_mut::<16>()
            .0
            .iter_mut()
            .zip(o2.as_chunks_mut::<16>().0)
            .zip(o3.as_chunks_mut::<16>().0)
            .zip(o4.as_chunks_mut::<16>().0);
        let ins = qa
            .as_chunks::<16>()
            .0
            .iter()
            .zip(qb.as_chunks::<16>().0)
            .zip(qh.as_chunks::<16>().0);
        // Sub-block `is` (0 or 1) of each quarter uses scales `is`, `is + 2`, `is + 4`, `is + 6`.
        let [a0, a1, b0, b1, c0, c1, e0, e1] = *sc;
        let quads = [[a0, b0, c0, e0], [a1, b1, c1, e1]];
        for (quad, (((a16, b16), h16), (((y1, y2), y3), y4))) in quads.iter().zip(ins.zip(outs)) {
            let [s1, s2, s3, s4] = quad.map(|s| d * f32::from(s as i8));
            let rows = a16.iter().zip(b16).zip(h16);
            let cols = y1
                .iter_mut()
                .zip(y2.iter_mut())
                .zip(y3.iter_mut())
                .zip(y4.iter_mut());
            for (((&a, &b), &h), (((y1, y2), y3), y4)) in rows.zip(cols) {
                let q1 = ((a & 0xF) | ((h & 3) << 4)) as i8 - 32;
                let q2 = ((b & 0xF) | (((h >> 2) & 3) << 4)) as i8 - 32;
                let q3 = ((a >> 4) | (((h >> 4) & 3) << 4)) as i8 - 32;
                let q4 = ((b >> 4) | (((h >> 6) & 3) << 4)) as i8 - 32;
                *y1 = s1 * f32::from(q1);
                *y2 = s2 * f32::from(q2);
                *y3 = s3 * f32::from(q3);
                *y4 = s4 * f32::from(q4);
            }
        }
    }
}

/// Q8_K: `d: f32, qs: [i8; 256], bsums: [i16; 16]` (the sums of each 16 quants, used only by dot
/// products); `x = d * q`.
#[inline(always)]
pub(super) fn q8_k(b: &[u8; 292], out: &mut Super) {
    let [d0, d1, d2, d3, ref rest @ ..] = *b;
    let d = f32::from_le_bytes([d0, d1, d2, d3]);
    let (qs, _bsums) = split::<_, 256, 32, 288>(rest);
    for (y, &q) in out.iter_mut().zip(qs) {
        *y = d * f32::from(q as i8);
    }
}

/// IQ4_NL: `d: f16, qs: [u8; 16]`; `x = d * KVALUES[nibble]`, low nibbles first (as Q4_0).
#[inline(always)]
pub(super) fn iq4_nl(b: &[u8; 18], [lo, hi]: &mut Halves) {
    let [d0, d1, ref qs @ ..] = *b;
    let d = f16_le(d0, d1);
    for ((&q, l), h) in qs.iter().zip(lo).zip(hi) {
        *l = d * f32::from(KVALUES_IQ4NL[usize::from(q & 0xF)]);
        *h = d * f32::from(KVALUES_IQ4NL[usize::from(q >> 4)]);
    }
}

/// IQ4_XS: `d: f16, scales_h: u16, scales_l: [u8; 4], qs: [u8; 128]`. Eight 32-element
/// sub-blocks, each an IQ4_NL block whose scale is `d * (ls - 32)`, `ls` a 6-bit value with its
/// low nibble in `scales_l[ib / 2]` (nibble `ib % 2`) and its high 2 bits at bit `2 * ib` of
/// `scales_h`.
#[inline(always)]
pub(super) fn iq4_xs(b: &[u8; 136], out: &mut Super) {
    let [d0, d1, h0, h1, l0, l1, l2, l3, ref qs @ ..] = *b;
    let d = f16_le(d0, d1);
    let scales_h = u16::from_le_bytes([h0, h1]);
    let scales_l = [l0, l1, l2, l3];
    let (q16, _) = qs.as_chunks::<16>();
    let (o32, _) = out.as_chunks_mut::<32>();
    for (ib, (q, o)) in q16.iter().zip(o32).enumerate() {
        let low = (scales_l[ib / 2] >> (4 * (ib % 2))) & 0xF;
        let high = ((scales_h >> (2 * ib)) & 3) as u8;
        let dl = d * f32::from(i16::from(low | (high << 4)) - 32);
        let (lo, hi) = o.split_at_mut(16);
        for ((&q, l), h) in q.iter().zip(lo).zip(hi) {
            *l = dl * f32::from(KVALUES_IQ4NL[usize::from(q & 0xF)]);
            *h = dl * f32::from(KVALUES_IQ4NL[usize::from(q >> 4)]);
        }
    }
}
