//! Block codecs: GGML tensor bytes to `f32` ([`dequantize`]) and back ([`quantize`],
//! [`quantize_weighted`]), keyed by the one type table, [`GgmlType`].
//!
//! Decoded ([`DECODABLE`]): the plain floats (F32, F16, BF16), the legacy 32-element blocks
//! (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), the 256-element K-quant super-blocks (Q2_K, Q3_K, Q4_K, Q5_K,
//! Q6_K, Q8_K) and the non-linear IQ4_NL and IQ4_XS. The other IQ types are [`Unsupported`].
//! Decoding follows llama.cpp's `dequantize_row_*` operation for operation, so the floats are
//! bit-identical to llama.cpp's and gguf-py's.
//!
//! Encoded ([`ENCODABLE`]): F32, F16, BF16, the legacy blocks and the K-quants, with llama.cpp's
//! round-to-nearest reference quantizers (`quantize_row_*_ref`, what `llama-quantize` does without
//! an importance matrix): the bytes equal llama.cpp's. [`quantize_weighted`] adds llama.cpp's
//! importance-weighted search (`quantize_<type>(…, quant_weights)`, the imatrix path) for the
//! types in [`IMPORTANCE_WEIGHTED`].
//!
//! Block layouts follow `ggml-common.h`; every multi-byte field is little-endian. Codecs work
//! block by block over fixed-size array views (`as_chunks`), so the inner loops carry no bounds
//! checks, and large tensors are split across the rayon thread pool. Malformed input (lengths
//! that are not whole blocks or rows, wrong byte counts) is a [`BlockError`], never a panic.
//!
//! [`Unsupported`]: BlockError::Unsupported

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::GgmlType;

mod encode;
mod kquants;

pub use kquants::scale_min_k4;

/// Elements per block of the legacy quantizations (`QK` in GGML).
pub const QK: usize = 32;

/// Elements per super-block of the K-quants and the 256-element IQ types (`QK_K` in GGML).
pub const QK_K: usize = 256;

/// Number of elements decoded or encoded per rayon task. Tensors no larger than this are
/// processed on the calling thread.
const PAR_CHUNK_ELEMENTS: usize = 32 * 1024;

// Every chunk must hold whole blocks of every type, so that byte and element chunks stay paired.
const _: () =
    assert!(PAR_CHUNK_ELEMENTS.is_multiple_of(QK) && PAR_CHUNK_ELEMENTS.is_multiple_of(QK_K));

/// Why tensor bytes could not be decoded or encoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlockError {
    /// No codec for this type (yet).
    #[error("unsupported tensor type {ty} for {op} (supported: {supported})")]
    Unsupported {
        /// The type.
        ty: GgmlType,
        /// `"decoding"` or `"encoding"`.
        op: &'static str,
        /// The types that are supported for `op`.
        supported: String,
    },
    /// The element count does not fill a whole number of blocks.
    #[error("{n_elements} elements is not a whole number of {block}-element {ty} blocks")]
    PartialBlock {
        /// The type.
        ty: GgmlType,
        /// Number of elements requested.
        n_elements: usize,
        /// Elements per block of the type.
        block: usize,
    },
    /// The data is not exactly as long as the element count requires.
    #[error("expected {expected} bytes of {ty} data, found {found}")]
    WrongLength {
        /// The type.
        ty: GgmlType,
        /// Bytes required (saturated at `usize::MAX` if the count overflows).
        expected: usize,
        /// Bytes supplied.
        found: usize,
    },
    /// The row length given to [`quantize_weighted`] is zero, not whole blocks, or does not
    /// divide the element count.
    #[error(
        "row length {row_len} must be a positive multiple of the {block}-element {ty} block \
         that divides the {n_elements} elements"
    )]
    BadRowLength {
        /// The type.
        ty: GgmlType,
        /// The row length given.
        row_len: usize,
        /// Number of elements given.
        n_elements: usize,
        /// Elements per block of the type.
        block: usize,
    },
    /// The importance vector is not one weight per column (per element of a row).
    #[error("expected {expected} importance weights (one per column), found {found}")]
    ImportanceLength {
        /// The row length.
        expected: usize,
        /// Weights supplied.
        found: usize,
    },
}

/// The types [`dequantize`] decodes.
pub const DECODABLE: [GgmlType; 16] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::Q8_K,
    GgmlType::IQ4_NL,
    GgmlType::IQ4_XS,
];

/// The types [`quantize`] and [`quantize_weighted`] encode.
pub const ENCODABLE: [GgmlType; 14] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::Q8_K,
];

/// The types whose encoding [`quantize_weighted`] steers with an importance vector (as llama.cpp
/// does); for the other [`ENCODABLE`] types the importance is ignored, as in llama.cpp.
pub const IMPORTANCE_WEIGHTED: [GgmlType; 9] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

fn names(types: &[GgmlType]) -> String {
    types
        .iter()
        .map(|t| t.name())
        .collect::<Vec<_>>()
        .join(", ")
}

fn block_bytes(ty: GgmlType) -> usize {
    ty.type_size().unwrap_or(0)
}

/// Splits a fixed-size array into its first `A` elements and the remaining `B`. `A + B == N` is
/// checked at compile time, so the conversions cannot fail.
#[inline(always)]
fn split<T, const A: usize, const B: usize, const N: usize>(b: &[T; N]) -> (&[T; A], &[T; B]) {
    const { assert!(A + B == N) };
    let (head, tail) = b.split_at(A);
    match (head.try_into(), tail.try_into()) {
        (Ok(head), Ok(tail)) => (head, tail),
        _ => unreachable!("A + B == N is checked at compile time"),
    }
}

fn unsupported(ty: GgmlType, op: &'static str, supported: &[GgmlType]) -> BlockError {
    BlockError::Unsupported {
        ty,
        op,
        supported: names(supported),
    }
}

/// Decodes `data` into `out`, which must hold exactly the number of elements `data` encodes
/// (`out.len()` is the element count).
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<(), BlockError> {
    if !DECODABLE.contains(&ty) {
        return Err(unsupported(ty, "decoding", &DECODABLE));
    }
    check(ty, data.len(), out.len())?;
    decode(ty, data, out);
    Ok(())
}

/// Decodes `n_elements` of type `ty` into a new vector; the sizes are checked before anything is
/// allocated, so a bogus count cannot trigger a huge allocation.
pub fn dequantize_to_vec(
    ty: GgmlType,
    data: &[u8],
    n_elements: usize,
) -> Result<Vec<f32>, BlockError> {
    if !DECODABLE.contains(&ty) {
        return Err(unsupported(ty, "decoding", &DECODABLE));
    }
    check(ty, data.len(), n_elements)?;
    let mut out = vec![0.0f32; n_elements];
    decode(ty, data, &mut out);
    Ok(out)
}

/// Checks that `n_elements` is whole blocks and `found` bytes is exactly their size.
fn check(ty: GgmlType, found: usize, n_elements: usize) -> Result<(), BlockError> {
    let block = ty.block_size();
    if !n_elements.is_multiple_of(block) {
        return Err(BlockError::PartialBlock {
            ty,
            n_elements,
            block,
        });
    }
    let expected = (n_elements / block).saturating_mul(block_bytes(ty));
    if expected != found {
        return Err(BlockError::WrongLength {
            ty,
            expected,
            found,
        });
    }
    Ok(())
}

/// Checks that `ty` is encodable and `n_elements` is whole blocks.
fn check_encode(ty: GgmlType, n_elements: usize) -> Result<(), BlockError> {
    if !ENCODABLE.contains(&ty) {
        return Err(unsupported(ty, "encoding", &ENCODABLE));
    }
    let block = ty.block_size();
    if !n_elements.is_multiple_of(block) {
        return Err(BlockError::PartialBlock {
            ty,
            n_elements,
            block,
        });
    }
    Ok(())
}

/// Encodes `values` as type `ty` (whole blocks only) with llama.cpp's reference quantizer
/// (`quantize_row_*_ref`): the bytes are the ones llama.cpp writes without an importance matrix.
pub fn quantize(ty: GgmlType, values: &[f32]) -> Result<Vec<u8>, BlockError> {
    check_encode(ty, values.len())?;
    let mut out = vec![0u8; values.len() / ty.block_size() * block_bytes(ty)];
    if values.len() <= PAR_CHUNK_ELEMENTS {
        encode_serial(ty, values, &mut out);
    } else {
        let bytes_per_chunk = PAR_CHUNK_ELEMENTS / ty.block_size() * block_bytes(ty);
        values
            .par_chunks(PAR_CHUNK_ELEMENTS)
            .zip(out.par_chunks_mut(bytes_per_chunk))
            .for_each(|(v, o)| encode_serial(ty, v, o));
    }
    Ok(out)
}

/// Encodes a matrix of rows of `row_len` elements as type `ty`, steering the search by
/// `importance` — one non-negative weight per column, e.g. the mean squared activation of that
/// input feature over calibration data (llama.cpp's imatrix). This is llama.cpp's
/// `quantize_<type>(src, dst, nrow, n_per_row, quant_weights)`, byte for byte: for the types in
/// [`IMPORTANCE_WEIGHTED`] with `Some` importance it runs the weighted search
/// (`quantize_row_*_impl`); otherwise it equals [`quantize`].
///
/// `row_len` must be a positive multiple of the block size that divides `values.len()`; the
/// legacy types also use statistics of the whole row, so the row length changes their result.
pub fn quantize_weighted(
    ty: GgmlType,
    values: &[f32],
    row_len: usize,
    importance: Option<&[f32]>,
) -> Result<Vec<u8>, BlockError> {
    check_encode(ty, values.len())?;
    let block = ty.block_size();
    if row_len == 0 || !row_len.is_multiple_of(block) || !values.len().is_multiple_of(row_len) {
        return Err(BlockError::BadRowLength {
            ty,
            row_len,
            n_elements: values.len(),
            block,
        });
    }
    if let Some(w) = importance
        && w.len() != row_len
    {
        return Err(BlockError::ImportanceLength {
            expected: row_len,
            found: w.len(),
        });
    }
    let Some(w) = importance.filter(|_| IMPORTANCE_WEIGHTED.contains(&ty)) else {
        return quantize(ty, values);
    };
    let row_bytes = row_len / block * block_bytes(ty);
    let mut out = vec![0u8; values.len() / row_len * row_bytes];
    values
        .par_chunks(row_len)
        .zip(out.par_chunks_mut(row_bytes))
        .for_each(|(row, o)| encode_weighted_row(ty, row, w, o));
    Ok(out)
}

/// Applies `f` to each `B`-element block of `values` and stores its `N` bytes.
#[inline(always)]
fn encode_blocks<const B: usize, const N: usize>(
    values: &[f32],
    out: &mut [u8],
    f: impl Fn(&[f32; B]) -> [u8; N],
) {
    let (out_blocks, _) = out.as_chunks_mut::<N>();
    for (x, o) in values.as_chunks::<B>().0.iter().zip(out_blocks) {
        *o = f(x);
    }
}

/// Applies `f` to each `B`-element block of `values` with its importance and stores its `N`
/// bytes.
#[inline(always)]
fn encode_blocks_weighted<const B: usize, const N: usize>(
    values: &[f32],
    importance: &[f32],
    out: &mut [u8],
    f: impl Fn(&[f32; B], &[f32; B]) -> [u8; N],
) {
    let (out_blocks, _) = out.as_chunks_mut::<N>();
    let (weights, _) = importance.as_chunks::<B>();
    for ((x, w), o) in values
        .as_chunks::<B>()
        .0
        .iter()
        .zip(weights)
        .zip(out_blocks)
    {
        *o = f(x, w);
    }
}

/// Encodes validated input (whole blocks; `out` sized to match) on the current thread.
fn encode_serial(ty: GgmlType, values: &[f32], out: &mut [u8]) {
    match ty {
        GgmlType::F32 => {
            for (o, v) in out.as_chunks_mut::<4>().0.iter_mut().zip(values) {
                *o = v.to_le_bytes();
            }
        }
        GgmlType::F16 => {
            for (o, &v) in out.as_chunks_mut::<2>().0.iter_mut().zip(values) {
                *o = f16::from_f32(v).to_le_bytes();
            }
        }
        GgmlType::BF16 => {
            for (o, &v) in out.as_chunks_mut::<2>().0.iter_mut().zip(values) {
                *o = half::bf16::from_f32(v).to_le_bytes();
            }
        }
        GgmlType::Q8_0 => encode_blocks(values, out, |x| {
            let (d, qs) = quantize_q8_0_block(x);
            let mut b = [0u8; 34];
            let (head, tail) = b.split_at_mut(2);
            head.copy_from_slice(&d.to_le_bytes());
            for (o, q) in tail.iter_mut().zip(qs) {
                *o = q as u8;
            }
            b
        }),
        GgmlType::Q4_0 => encode_blocks(values, out, encode::q4_0_ref),
        GgmlType::Q4_1 => encode_blocks(values, out, encode::q4_1_ref),
        GgmlType::Q5_0 => encode_blocks(values, out, encode::q5_0_ref),
        GgmlType::Q5_1 => encode_blocks(values, out, encode::q5_1_ref),
        GgmlType::Q2_K => encode_blocks(values, out, encode::q2_k_ref),
        GgmlType::Q3_K => encode_blocks(values, out, encode::q3_k_ref),
        GgmlType::Q4_K => encode_blocks(values, out, encode::q4_k_ref),
        GgmlType::Q5_K => encode_blocks(values, out, encode::q5_k_ref),
        GgmlType::Q6_K => encode_blocks(values, out, |x| encode::q6_k(x, None)),
        GgmlType::Q8_K => encode_blocks(values, out, encode::q8_k_ref),
        // `check_encode` accepted only the types above.
        _ => {}
    }
}

/// Encodes one validated row with its importance (`IMPORTANCE_WEIGHTED` types only).
fn encode_weighted_row(ty: GgmlType, row: &[f32], w: &[f32], out: &mut [u8]) {
    // The legacy types weight by the row's mean square as well.
    let sigma2 = encode::row_sigma2(row);
    match ty {
        GgmlType::Q4_0 => {
            encode_blocks_weighted(row, w, out, |x, w| encode::q4_0_weighted(x, w, sigma2));
        }
        GgmlType::Q4_1 => {
            encode_blocks_weighted(row, w, out, |x, w| encode::q4_1_weighted(x, w, sigma2));
        }
        GgmlType::Q5_0 => {
            encode_blocks_weighted(row, w, out, |x, w| encode::q5_0_weighted(x, w, sigma2));
        }
        GgmlType::Q5_1 => {
            encode_blocks_weighted(row, w, out, |x, w| encode::q5_1_weighted(x, w, sigma2));
        }
        GgmlType::Q2_K => encode_blocks_weighted(row, w, out, encode::q2_k_weighted),
        GgmlType::Q3_K => encode_blocks_weighted(row, w, out, encode::q3_k_weighted),
        GgmlType::Q4_K => encode_blocks_weighted(row, w, out, encode::q4_k_weighted),
        GgmlType::Q5_K => encode_blocks_weighted(row, w, out, encode::q5_k_weighted),
        GgmlType::Q6_K => encode_blocks_weighted(row, w, out, |x, w| encode::q6_k(x, Some(w))),
        _ => {}
    }
}

/// One Q8_0 block as llama.cpp's `quantize_row_q8_0_ref` makes it: `d = max|x| / 127` (stored as
/// f16) and `q = round(x / d)`.
pub fn quantize_q8_0_block(x: &[f32; QK]) -> (f16, [i8; QK]) {
    let amax = x
        .iter()
        .fold(0f32, |m, v| if m > v.abs() { m } else { v.abs() });
    let d = amax / 127.0;
    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
    // C's float-to-int8 conversion (x86 `cvttss2si`, low byte); `round` is `roundf`.
    let q = x.map(|v| encode::cvtt((v * inv).round()) as i8);
    (encode::fp16(d), q)
}

/// Decodes validated input, in parallel for large tensors.
fn decode(format: GgmlType, data: &[u8], out: &mut [f32]) {
    if out.len() <= PAR_CHUNK_ELEMENTS {
        decode_serial(format, data, out);
        return;
    }
    // PAR_CHUNK_ELEMENTS is a multiple of every block size, so each chunk
    // holds whole blocks and the byte and element chunks stay paired.
    let bytes_per_chunk = PAR_CHUNK_ELEMENTS / format.block_size() * block_bytes(format);
    data.par_chunks(bytes_per_chunk)
        .zip(out.par_chunks_mut(PAR_CHUNK_ELEMENTS))
        .for_each(|(d, o)| decode_serial(format, d, o));
}

/// Decodes validated input on the current thread.
fn decode_serial(format: GgmlType, data: &[u8], out: &mut [f32]) {
    match format {
        GgmlType::F32 => {
            for (o, b) in out.iter_mut().zip(data.as_chunks::<4>().0) {
                *o = f32::from_le_bytes(*b);
            }
        }
        GgmlType::F16 => {
            // Stage through a typed `f16` buffer so half's vectorized (F16C where
            // available) slice conversion can be used.
            const STAGE: usize = 256;
            let mut buf = [f16::ZERO; STAGE];
            for (src, dst) in data
                .as_chunks::<2>()
                .0
                .chunks(STAGE)
                .zip(out.chunks_mut(STAGE))
            {
                let buf = &mut buf[..src.len().min(dst.len())];
                for (h, b) in buf.iter_mut().zip(src) {
                    *h = f16::from_le_bytes(*b);
                }
                if let Some(dst) = dst.get_mut(..buf.len()) {
                    buf.convert_to_f32_slice(dst);
                }
            }
        }
        GgmlType::BF16 => {
            for (o, b) in out.iter_mut().zip(data.as_chunks::<2>().0) {
                *o = f32::from_bits(u32::from(u16::from_le_bytes(*b)) << 16);
            }
        }
        GgmlType::Q8_0 => blocks(data, out, q8_0),
        GgmlType::Q4_0 => blocks(data, out, q4_0),
        GgmlType::Q4_1 => blocks(data, out, q4_1),
        GgmlType::Q5_0 => blocks(data, out, q5_0),
        GgmlType::Q5_1 => blocks(data, out, q5_1),
        GgmlType::IQ4_NL => blocks(data, out, kquants::iq4_nl),
        GgmlType::Q2_K => kquants::super_blocks(data, out, kquants::q2_k),
        GgmlType::Q3_K => kquants::super_blocks(data, out, kquants::q3_k),
        GgmlType::Q4_K => kquants::super_blocks(data, out, kquants::q4_k),
        GgmlType::Q5_K => kquants::super_blocks(data, out, kquants::q5_k),
        GgmlType::Q6_K => kquants::super_blocks(data, out, kquants::q6_k),
        GgmlType::Q8_K => kquants::super_blocks(data, out, kquants::q8_k),
        GgmlType::IQ4_XS => kquants::super_blocks(data, out, kquants::iq4_xs),
        // `check` accepted only the types above.
        _ => {}
    }
}

/// Output of one quantized block, viewed as its low and high 16-element halves.
type Halves = [[f32; QK / 2]; 2];

/// Applies `f` to each `N`-byte block of `data` and its 32 outputs.
#[inline(always)]
fn blocks<const N: usize>(data: &[u8], out: &mut [f32], f: impl Fn(&[u8; N], &mut Halves)) {
    let (out_halves, _) = out.as_chunks_mut::<{ QK / 2 }>();
    let (out_blocks, _) = out_halves.as_chunks_mut::<2>();
    for (b, o) in data.as_chunks::<N>().0.iter().zip(out_blocks) {
        f(b, o);
    }
}

/// Reads a little-endian `f16` as `f32`.
#[inline(always)]
fn f16_le(lo: u8, hi: u8) -> f32 {
    f16::from_le_bytes([lo, hi]).to_f32()
}

/// Q8_0: `d: f16, qs: [i8; 32]`; `x = q * d`.
#[inline(always)]
fn q8_0(b: &[u8; 34], out: &mut Halves) {
    let [d0, d1, ref qs @ ..] = *b;
    let d = f16_le(d0, d1);
    for (o, &q) in out.as_flattened_mut().iter_mut().zip(qs) {
        *o = f32::from(q as i8) * d;
    }
}

/// Q4_0: `d: f16, qs: [u8; 16]`; `x = (nibble - 8) * d`, low nibbles first.
#[inline(always)]
fn q4_0(b: &[u8; 18], [lo, hi]: &mut Halves) {
    let [d0, d1, ref qs @ ..] = *b;
    let d = f16_le(d0, d1);
    for ((&q, l), h) in qs.iter().zip(lo).zip(hi) {
        *l = f32::from((q & 0x0F) as i8 - 8) * d;
        *h = f32::from((q >> 4) as i8 - 8) * d;
    }
}

/// Q4_1: `d: f16, m: f16, qs: [u8; 16]`; `x = nibble * d + m`.
#[inline(always)]
fn q4_1(b: &[u8; 20], [lo, hi]: &mut Halves) {
    let [d0, d1, m0, m1, ref qs @ ..] = *b;
    let (d, m) = (f16_le(d0, d1), f16_le(m0, m1));
    for ((&q, l), h) in qs.iter().zip(lo).zip(hi) {
        *l = f32::from(q & 0x0F) * d + m;
        *h = f32::from(q >> 4) * d + m;
    }
}

/// `SPREAD[b]` has byte `k` (little-endian) equal to `0x10` if bit `k` of `b`
/// is set and `0` otherwise.
const SPREAD: [u64; 256] = {
    let mut table = [0u64; 256];
    let mut b = 0;
    while b < 256 {
        let mut k = 0;
        while k < 8 {
            table[b] |= (((b as u64) >> k) & 1) << (8 * k + 4);
            k += 1;
        }
        b += 1;
    }
    table
};

/// Expands a Q5 block's `qh` bytes into the per-element fifth bits (`0x10` or
/// `0`) of the low and high halves: element `j` uses bit `j`, element `j + 16`
/// bit `j + 16` — the same as GGML's `((qh >> j) << 4) & 0x10` and
/// `(qh >> (j + 12)) & 0x10`.
#[inline(always)]
fn high_bits(qh: [u8; 4]) -> [[u8; 16]; 2] {
    let [a, b, c, d] = qh.map(|byte| u128::from(SPREAD[usize::from(byte)]));
    [(a | b << 64).to_le_bytes(), (c | d << 64).to_le_bytes()]
}

/// Q5_0: `d: f16, qh: u32, qs: [u8; 16]`; `x = ((nibble | high bit << 4) - 16) * d`.
#[inline(always)]
fn q5_0(b: &[u8; 22], [lo, hi]: &mut Halves) {
    let [d0, d1, h0, h1, h2, h3, ref qs @ ..] = *b;
    let d = f16_le(d0, d1);
    let [xh_lo, xh_hi] = high_bits([h0, h1, h2, h3]);
    for ((((&q, l), h), xh0), xh1) in qs.iter().zip(lo).zip(hi).zip(xh_lo).zip(xh_hi) {
        *l = f32::from(((q & 0x0F) | xh0) as i8 - 16) * d;
        *h = f32::from(((q >> 4) | xh1) as i8 - 16) * d;
    }
}

/// Q5_1: `d: f16, m: f16, qh: u32, qs: [u8; 16]`; `x = (nibble | high bit << 4) * d + m`.
#[inline(always)]
fn q5_1(b: &[u8; 24], [lo, hi]: &mut Halves) {
    let [d0, d1, m0, m1, h0, h1, h2, h3, ref qs @ ..] = *b;
    let (d, m) = (f16_le(d0, d1), f16_le(m0, m1));
    let [xh_lo, xh_hi] = high_bits([h0, h1, h2, h3]);
    for ((((&q, l), h), xh0), xh1) in qs.iter().zip(lo).zip(hi).zip(xh_lo).zip(xh_hi) {
        *l = f32::from((q & 0x0F) | xh0) * d + m;
        *h = f32::from((q >> 4) | xh1) * d + m;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    /// f16 bytes (little-endian) of `x`.
    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    /// Decodes `data` with GGML type `id` and `n` elements, panicking on error.
    fn deq(id: u32, data: &[u8], n: usize) -> Vec<f32> {
        dequantize_to_vec(GgmlType::from_u32(id).unwrap(), data, n).unwrap()
    }

    #[test]
    fn decodable_types() {
        for ty in GgmlType::ALL {
            let n = 2 * ty.block_size();
            let data = vec![0u8; 2 * block_bytes(ty)];
            let mut out = vec![1.0f32; n];
            let result = dequantize(ty, &data, &mut out);
            assert_eq!(result.is_ok(), DECODABLE.contains(&ty), "{ty}");
            if result.is_ok() {
                assert!(
                    out.iter().all(|&v| v == 0.0),
                    "{ty}: zero bytes decode to zeros"
                );
            }
        }
    }

    #[test]
    fn q8_0_round_trip_matches_the_reference_rounding() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 64) as f32 - 31.5) / 7.0)
            .collect();
        let bytes = quantize(GgmlType::Q8_0, &x).unwrap();
        assert_eq!(bytes.len(), 68);
        let back = dequantize_to_vec(GgmlType::Q8_0, &bytes, 64).unwrap();
        for (block, (xs, ys)) in x.chunks(32).zip(back.chunks(32)).enumerate() {
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = f16::from_f32(amax / 127.0).to_f32();
            for (a, b) in xs.iter().zip(ys) {
                assert!(
                    (a - b).abs() <= d * 0.5 + 1e-3 * amax,
                    "block {block}: {a} vs {b}"
                );
            }
            // The largest magnitude maps to ±127.
            let q = &bytes[block * 34 + 2..block * 34 + 34];
            assert!(q.iter().any(|&v| v as i8 == 127 || v as i8 == -127));
        }
        // Plain float types round-trip exactly (bf16 and f16 on representable values).
        let exact = [1.5f32, -2.0, 0.25, 0.0];
        for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
            let bytes = quantize(ty, &exact).unwrap();
            assert_eq!(dequantize_to_vec(ty, &bytes, 4).unwrap(), exact, "{ty}");
        }
        assert!(matches!(
            quantize(GgmlType::Q8_0, &[0.0; 33]),
            Err(BlockError::PartialBlock { n_elements: 33, .. })
        ));
        assert!(matches!(
            quantize(GgmlType::IQ4_XS, &[0.0; 256]),
            Err(BlockError::Unsupported { op: "encoding", .. })
        ));
    }

    #[test]
    fn f32_f16_bf16_known_values() {
        let f32_data: Vec<u8> = [1.5f32, -0.0, f32::INFINITY, -3.25e-30]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let got = deq(0, &f32_data, 4);
        assert_eq!(got[..2], [1.5, -0.0]);
        assert!(got[1].is_sign_negative());
        assert_eq!(got[2..], [f32::INFINITY, -3.25e-30]);

        // 1.0, -2.0, max finite, smallest subnormal, -inf
        let f16_data = [0x00, 0x3C, 0x00, 0xC0, 0xFF, 0x7B, 0x01, 0x00, 0x00, 0xFC];
        let got = deq(1, &f16_data, 5);
        assert_eq!(got, [1.0, -2.0, 65504.0, 2f32.powi(-24), f32::NEG_INFINITY]);

        // 1.0, -3.140625, 0x7F7F = largest finite bf16
        let bf16_data = [0x80, 0x3F, 0x49, 0xC0, 0x7F, 0x7F];
        let got = deq(30, &bf16_data, 3);
        assert_eq!(got, [1.0, -3.140625, f32::from_bits(0x7F7F_0000)]);
    }

    #[test]
    fn f16_bf16_round_trip_all_bit_patterns() {
        let bits: Vec<u16> = (0..=u16::MAX).collect();
        let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        let halves = deq(1, &bytes, bits.len());
        let brains = deq(30, &bytes, bits.len());
        for ((&b, &x), &y) in bits.iter().zip(&halves).zip(&brains) {
            let hf = f16::from_bits(b);
            let bf = bf16::from_bits(b);
            if hf.is_nan() {
                assert!(x.is_nan(), "f16 {b:#06x}");
            } else {
                assert_eq!(f16::from_f32(x).to_bits(), b, "f16 {b:#06x}");
                assert_eq!(x, hf.to_f32());
            }
            if bf.is_nan() {
                assert!(y.is_nan(), "bf16 {b:#06x}");
            } else {
                assert_eq!(bf16::from_f32(y).to_bits(), b, "bf16 {b:#06x}");
                assert_eq!(y.to_bits(), u32::from(b) << 16);
            }
        }
    }

    #[test]
    fn q8_0_known_values() {
        let qs: [i8; 32] = [
            -128, -127, -100, -64, -33, -17, -9, -8, -2, -1, 0, 1, 2, 3, 7, 8, 9, 15, 16, 31, 32,
            50, 63, 64, 65, 90, 100, 111, 120, 125, 126, 127,
        ];
        for d in [0.5f32, -0.25] {
            let mut block = h(d).to_vec();
            block.extend(qs.iter().map(|&q| q as u8));
            let got = deq(8, &block, 32);
            let want: Vec<f32> = qs.iter().map(|&q| f32::from(q) * d).collect();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn q4_0_known_values() {
        // Low nibbles 0..15 ascending, high nibbles 15..0 descending.
        let qs: Vec<u8> = (0..16u8).map(|j| j | ((15 - j) << 4)).collect();
        let mut data = Vec::new();
        for d in [2.0f32, -0.25] {
            data.extend(h(d));
            data.extend(&qs);
        }
        let got = deq(2, &data, 64);
        for (blk, d) in [2.0f32, -0.25].into_iter().enumerate() {
            for j in 0..16 {
                assert_eq!(got[blk * 32 + j], (j as f32 - 8.0) * d);
                assert_eq!(got[blk * 32 + j + 16], ((15 - j) as f32 - 8.0) * d);
            }
        }
        assert_eq!(got[..4], [-16.0, -14.0, -12.0, -10.0]);
        assert_eq!(got[16], 14.0);
        assert_eq!(got[32 + 15], -1.75);
    }

    #[test]
    fn q4_1_known_values() {
        let qs: Vec<u8> = (0..16u8).map(|j| j | ((15 - j) << 4)).collect();
        let mut data = Vec::new();
        for (d, m) in [(0.5f32, -3.0f32), (-1.0, 7.5)] {
            data.extend(h(d));
            data.extend(h(m));
            data.extend(&qs);
        }
        let got = deq(3, &data, 64);
        for (blk, (d, m)) in [(0.5f32, -3.0f32), (-1.0, 7.5)].into_iter().enumerate() {
            for j in 0..16 {
                assert_eq!(got[blk * 32 + j], j as f32 * d + m);
                assert_eq!(got[blk * 32 + j + 16], (15 - j) as f32 * d + m);
            }
        }
        assert_eq!(got[..3], [-3.0, -2.5, -2.0]);
        assert_eq!(got[32 + 15], -7.5);
    }

    /// Q5 patterns: (qh, qs) with low nibbles 0..15 and high nibbles 15..0.
    fn q5_cases() -> Vec<(u32, Vec<u8>)> {
        let qs: Vec<u8> = (0..16u8).map(|j| j | ((15 - j) << 4)).collect();
        [
            0x0000_0000,
            0xFFFF_FFFF,
            0xFFFF_0000,
            0x0000_FFFF,
            0x8000_0001,
            0xA5C3_0F96,
        ]
        .into_iter()
        .map(|qh| (qh, qs.clone()))
        .collect()
    }

    /// 5-bit value of element `i` of a Q5 block, computed the slow way.
    fn q5_value(qh: u32, qs: &[u8], i: usize) -> u8 {
        let nibble = if i < 16 {
            qs[i] & 0x0F
        } else {
            qs[i - 16] >> 4
        };
        nibble | (((qh >> i) & 1) as u8) << 4
    }

    #[test]
    fn q5_0_known_values() {
        for d in [1.0f32, -0.125] {
            for (qh, qs) in q5_cases() {
                let mut block = h(d).to_vec();
                block.extend(qh.to_le_bytes());
                block.extend(&qs);
                let got = deq(6, &block, 32);
                for (i, &x) in got.iter().enumerate() {
                    let q = i32::from(q5_value(qh, &qs, i)) - 16;
                    assert_eq!(x, q as f32 * d, "qh {qh:#x} i {i}");
                }
            }
        }
        // qh = 0xFFFF0000: low half has no high bit, high half has it.
        let mut block = h(1.0).to_vec();
        block.extend(0xFFFF_0000u32.to_le_bytes());
        block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let got = deq(6, &block, 32);
        assert_eq!(got[..3], [-16.0, -15.0, -14.0]);
        assert_eq!(got[15], -1.0);
        assert_eq!(got[16..19], [15.0, 14.0, 13.0]);
        assert_eq!(got[31], 0.0);
    }

    #[test]
    fn q5_1_known_values() {
        for (d, m) in [(0.25f32, 1.0f32), (-2.0, -0.5)] {
            for (qh, qs) in q5_cases() {
                let mut block = h(d).to_vec();
                block.extend(h(m));
                block.extend(qh.to_le_bytes());
                block.extend(&qs);
                let got = deq(7, &block, 32);
                for (i, &x) in got.iter().enumerate() {
                    let q = f32::from(q5_value(qh, &qs, i));
                    assert_eq!(x, q * d + m, "qh {qh:#x} i {i}");
                }
            }
        }
        // qh = 0x80000001: only elements 0 and 31 get the fifth bit.
        let mut block = h(1.0).to_vec();
        block.extend(h(0.5));
        block.extend(0x8000_0001u32.to_le_bytes());
        block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let got = deq(7, &block, 32);
        assert_eq!(got[..3], [16.5, 1.5, 2.5]);
        assert_eq!(got[16..18], [15.5, 14.5]);
        assert_eq!(got[30], 1.5);
        assert_eq!(got[31], 16.5);
    }

    #[test]
    fn errors() {
        let e = dequantize_to_vec(GgmlType::IQ2_XXS, &[0; 66], 256).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unsupported tensor type IQ2_XXS for decoding \
             (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, \
             Q6_K, Q8_K, IQ4_NL, IQ4_XS)"
        );

        let e = dequantize_to_vec(GgmlType::Q4_0, &[0; 18], 33).unwrap_err();
        assert!(matches!(
            e,
            BlockError::PartialBlock {
                n_elements: 33,
                block: 32,
                ..
            }
        ));
        assert_eq!(
            e.to_string(),
            "33 elements is not a whole number of 32-element Q4_0 blocks"
        );

        for len in [0, 35, 37, 36 * 2] {
            let e = dequantize_to_vec(GgmlType::Q4_1, &vec![0; len], 64).unwrap_err();
            assert!(
                matches!(e, BlockError::WrongLength { expected: 40, found, ty: GgmlType::Q4_1 } if found == len)
            );
        }
        let e = dequantize_to_vec(GgmlType::Q8_0, &[0; 33], 32).unwrap_err();
        assert_eq!(e.to_string(), "expected 34 bytes of Q8_0 data, found 33");

        // A huge element count is rejected before any allocation, even when the
        // byte count overflows.
        let e = dequantize_to_vec(GgmlType::F32, &[0; 8], usize::MAX).unwrap_err();
        assert!(matches!(
            e,
            BlockError::WrongLength {
                expected: usize::MAX,
                found: 8,
                ..
            }
        ));
        let e = dequantize_to_vec(GgmlType::Q8_0, &[0; 34], usize::MAX / 2 + 1).unwrap_err();
        assert!(matches!(e, BlockError::WrongLength { .. }));

        // dequantize takes the element count from `out`.
        let mut out = [0.0f32; 31];
        let e = dequantize(GgmlType::Q8_0, &[0; 34], &mut out).unwrap_err();
        assert!(matches!(e, BlockError::PartialBlock { n_elements: 31, .. }));
        let mut out = [0.0f32; 64];
        let e = dequantize(GgmlType::Q8_0, &[0; 34], &mut out).unwrap_err();
        assert!(matches!(
            e,
            BlockError::WrongLength {
                expected: 68,
                found: 34,
                ..
            }
        ));
        let e = dequantize(GgmlType::F16, &[0; 3], &mut out[..1]).unwrap_err();
        assert!(matches!(
            e,
            BlockError::WrongLength {
                expected: 2,
                found: 3,
                ..
            }
        ));
        assert!(dequantize(GgmlType::Q4_0, &[], &mut []).is_ok());
        assert_eq!(deq(7, &[], 0), Vec::<f32>::new());
    }

    #[test]
    fn dequantize_matches_dequantize_to_vec() {
        let mut block = h(-0.75).to_vec();
        block.extend(0x1234_5678u32.to_le_bytes());
        block.extend((0..16u8).map(|j| j.wrapping_mul(37)));
        let mut out = [0.0f32; 32];
        dequantize(GgmlType::Q5_0, &block, &mut out).unwrap();
        assert_eq!(out.to_vec(), deq(6, &block, 32));
    }

    /// Cheap deterministic byte stream (xorshift) for large inputs.
    fn pseudo_random_bytes(n: usize, mut s: u64) -> Vec<u8> {
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn parallel_path_matches_serial() {
        // Enough super-blocks to span several rayon chunks plus a ragged tail.
        let n = 3 * PAR_CHUNK_ELEMENTS + 7 * QK_K;
        for f in DECODABLE {
            let id = f.id();
            let mut data = pseudo_random_bytes(
                n / f.block_size() * block_bytes(f),
                0x9E37_79B9 + u64::from(id),
            );
            if f.block_size() == QK {
                // Keep scales finite (not needed for the comparison, which is bitwise).
                for b in data.chunks_exact_mut(block_bytes(f)) {
                    b[1] &= 0x3F;
                    if matches!(f, GgmlType::Q4_1 | GgmlType::Q5_1) {
                        b[3] &= 0xBF;
                    }
                }
            }
            let par = deq(id, &data, n);
            let mut serial = vec![0.0f32; n];
            for (d, o) in data
                .chunks_exact(block_bytes(f))
                .zip(serial.chunks_exact_mut(f.block_size()))
            {
                decode_serial(f, d, o);
            }
            let same = par
                .iter()
                .zip(&serial)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{}", f.name());
        }
    }

    #[test]
    fn parallel_encode_matches_block_by_block() {
        let n = 2 * PAR_CHUNK_ELEMENTS + 4 * QK_K;
        let x: Vec<f32> = pseudo_random_bytes(n, 5)
            .iter()
            .enumerate()
            .map(|(i, &b)| (f32::from(b) - 127.5) * (1.0 + (i % 7) as f32))
            .collect();
        for ty in ENCODABLE {
            let whole = quantize(ty, &x).unwrap();
            let by_block: Vec<u8> = x
                .chunks(ty.block_size())
                .flat_map(|c| quantize(ty, c).unwrap())
                .collect();
            assert!(whole == by_block, "{ty}");
            // Rows are quantized independently, in parallel.
            let w = vec![1.0f32; 2 * QK_K];
            let rows = quantize_weighted(ty, &x, 2 * QK_K, Some(&w)).unwrap();
            let by_row: Vec<u8> = x
                .chunks(2 * QK_K)
                .flat_map(|r| quantize_weighted(ty, r, 2 * QK_K, Some(&w)).unwrap())
                .collect();
            assert!(rows == by_row, "{ty}");
        }
    }

    #[test]
    fn nearest_int_matches_the_c_bit_trick() {
        use encode::nearest_int;
        assert_eq!(nearest_int(0.5), 0);
        assert_eq!(nearest_int(1.5), 2);
        assert_eq!(nearest_int(2.5), 2);
        assert_eq!(nearest_int(-2.5), -2);
        assert_eq!(nearest_int(-0.49), 0);
        assert_eq!(nearest_int(4_194_303.0), 4_194_303);
        assert_eq!(nearest_int(-4_194_303.0), -4_194_303);
        for v in [f32::NAN, f32::INFINITY, -1e30, 1e30] {
            nearest_int(v); // wraps like the C code, never panics
        }
    }

    #[test]
    fn k_quant_layouts_known_values() {
        // Q8_K: d = 0.5, q = i - 128, bsums ignored.
        let mut b = 0.5f32.to_le_bytes().to_vec();
        b.extend((0..=255u8).map(|i| i.wrapping_sub(128)));
        b.extend([0xAA; 32]);
        let got = deq(15, &b, 256);
        assert!(
            got.iter()
                .enumerate()
                .all(|(i, &v)| v == (i as f32 - 128.0) * 0.5)
        );

        // Q4_K: d = 1, dmin = 0.5, sub-block j has scale j + 1 and min 2j (6-bit packing).
        let ls: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 63];
        let lm: [u8; 8] = [0, 2, 4, 6, 8, 10, 12, 62];
        let mut scales = [0u8; 12];
        for j in 0..4 {
            scales[j] = ls[j] | ((ls[j + 4] >> 4) << 6);
            scales[j + 4] = lm[j] | ((lm[j + 4] >> 4) << 6);
            scales[j + 8] = (ls[j + 4] & 0xF) | ((lm[j + 4] & 0xF) << 4);
        }
        let mut b = h(1.0).to_vec();
        b.extend(h(0.5));
        b.extend(scales);
        b.extend((0..128u8).map(|i| (i % 16) | ((15 - i % 16) << 4)));
        let got = deq(12, &b, 256);
        for (i, &v) in got.iter().enumerate() {
            let (j, l) = (i / 32, i % 32);
            let q = if j % 2 == 0 { l % 16 } else { 15 - l % 16 };
            let want = f32::from(ls[j]) * q as f32 - 0.5 * f32::from(lm[j]);
            assert_eq!(v, want, "element {i}");
        }

        // IQ4_NL: d = 2, nibbles 0..15 then 15..0.
        let mut b = h(2.0).to_vec();
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let got = deq(20, &b, 32);
        assert_eq!(got[0], -254.0);
        assert_eq!(got[15], 226.0);
        assert_eq!(got[16], 226.0);
        assert_eq!(got[31], -254.0);
    }

    /// Decodes a reference vector and compares bit-for-bit.
    fn check_reference(id: u32, data: &[u8], expected: &[u32]) {
        let got = deq(id, data, expected.len());
        for (i, (g, &e)) in got.iter().zip(expected).enumerate() {
            assert_eq!(
                g.to_bits(),
                e,
                "type {id} element {i}: {g} vs {}",
                f32::from_bits(e)
            );
        }
    }

    #[test]
    fn matches_gguf_py_reference() {
        check_reference(8, &Q8_0_DATA, &Q8_0_EXPECTED);
        check_reference(2, &Q4_0_DATA, &Q4_0_EXPECTED);
        check_reference(3, &Q4_1_DATA, &Q4_1_EXPECTED);
        check_reference(6, &Q5_0_DATA, &Q5_0_EXPECTED);
        check_reference(7, &Q5_1_DATA, &Q5_1_EXPECTED);
    }

    // Reference vectors: random blocks (seeded numpy; finite f16 scales of both
    // signs, random quant bytes) decoded by `gguf.quants.dequantize` from
    // gguf-py 0.19.0. Expected values are f32 bit patterns.
    const Q8_0_DATA: [u8; 68] = [
        21, 54, 18, 118, 29, 72, 158, 104, 47, 150, 26, 237, 232, 247, 214, 37, 201, 213, 77, 100,
        116, 62, 211, 182, 5, 68, 188, 199, 201, 234, 4, 146, 203, 28, 74, 190, 120, 175, 7, 7, 62,
        1, 175, 239, 16, 16, 244, 91, 192, 24, 253, 164, 254, 193, 136, 69, 228, 186, 26, 50, 223,
        233, 59, 193, 69, 18, 33, 130,
    ];
    const Q8_0_EXPECTED: [u32; 64] = [
        0x40daf400, 0x42336b80, 0x41306100, 0x41daf400, 0xc2150280, 0x421e2200, 0x418eed80,
        0xc2212c80, 0x411e2200, 0xc0e71e00, 0xc111f800, 0xc05af400, 0xc17f7200, 0x41610900,
        0xc1a74180, 0xc182c380, 0x41ea2880, 0x42180d00, 0x42306100, 0x41bc8b00, 0xc188d880,
        0xc1e10900, 0x3ff34800, 0x41ceca00, 0xc1ceca00, 0xc1ad5680, 0xc1a74180, 0xc105ce00,
        0x3fc2a000, 0xc2274180, 0xc1a12c80, 0x412a4c00, 0xc33cac00, 0x42feb500, 0xc1301800,
        0xc1301800, 0xc2c2f600, 0xbfc94000, 0x42feb500, 0x41d5d400, 0xc1c94000, 0xc1c94000,
        0x4196f000, 0xc30f1380, 0x42c94000, 0xc216f000, 0x4096f000, 0x4310a600, 0x40494000,
        0x42c61b00, 0x433cac00, 0xc2d8f900, 0x42301800, 0x42dc1e00, 0xc2238400, 0xc29d3a00,
        0x424f8a00, 0x4210a600, 0xc2b98700, 0x42c61b00, 0xc2d8f900, 0xc1e26800, 0xc24f8a00,
        0x43461b00,
    ];

    const Q4_0_DATA: [u8; 36] = [
        108, 61, 126, 104, 96, 82, 243, 179, 77, 73, 243, 73, 37, 7, 236, 125, 163, 202, 191, 186,
        57, 3, 235, 100, 49, 165, 43, 152, 86, 20, 179, 143, 97, 222, 40, 40,
    ];
    const Q4_0_EXPECTED: [u32; 64] = [
        0x41022000, 0x00000000, 0xc12d8000, 0xc1022000, 0xc0d8e000, 0xc0d8e000, 0x40d8e000,
        0x3fad8000, 0xc0d8e000, 0x3fad8000, 0xc0822000, 0xbfad8000, 0x40ad8000, 0x40d8e000,
        0xc0d8e000, 0x402d8000, 0xbfad8000, 0xc02d8000, 0xc02d8000, 0xc0822000, 0x4117d000,
        0x40822000, 0xc0ad8000, 0xc0ad8000, 0x4117d000, 0xc0ad8000, 0xc1022000, 0xc12d8000,
        0x41022000, 0xbfad8000, 0x402d8000, 0x40ad8000, 0xbf57e000, 0x4086ec00, 0xc021e800,
        0x4057e000, 0x40bce400, 0x4021e800, 0xc021e800, 0x80000000, 0x3fd7e000, 0x4057e000,
        0x4086ec00, 0xc0bce400, 0x40bce400, 0xc0a1e800, 0x80000000, 0x80000000, 0x4086ec00,
        0x40d7e000, 0xc0a1e800, 0x3fd7e000, 0x4086ec00, 0xbfd7e000, 0x40a1e800, 0xbf57e000,
        0x4021e800, 0x40bce400, 0xc021e800, 0x80000000, 0x3fd7e000, 0xc086ec00, 0x40a1e800,
        0x40a1e800,
    ];

    const Q4_1_DATA: [u8; 40] = [
        120, 63, 29, 52, 60, 146, 154, 75, 40, 135, 224, 229, 60, 163, 50, 67, 22, 183, 124, 88,
        22, 191, 141, 189, 223, 100, 186, 208, 49, 228, 101, 82, 69, 79, 220, 186, 76, 198, 135,
        75,
    ];
    const Q4_1_EXPECTED: [u32; 64] = [
        0x41b54e80, 0x407f7400, 0x41976e80, 0x41a65e80, 0x41731d00, 0x41553d00, 0x3e83a000,
        0x41197d00, 0x41b54e80, 0x40bb7a00, 0x407f7400, 0x40bb7a00, 0x41375d00, 0x41553d00,
        0x41b54e80, 0x41731d00, 0x40bb7a00, 0x41887e80, 0x41887e80, 0x40f73a00, 0x407f7400,
        0x41731d00, 0x41d32e80, 0x41d32e80, 0x40bb7a00, 0x41976e80, 0x40bb7a00, 0x40f73a00,
        0x4007f400, 0x41a65e80, 0x41553d00, 0x41197d00, 0xc1dfae00, 0xc1079400, 0xc198d200,
        0xbfb1a000, 0xc04a3000, 0xc1079400, 0xc123ec00, 0xc09dc800, 0xc123ec00, 0xc1dfae00,
        0xc1b52a00, 0xc198d200, 0xc1b52a00, 0xc1404400, 0xc15c9c00, 0xc1a6fe00, 0xc1c35600,
        0xc1404400, 0xc1a6fe00, 0xc1c35600, 0xc0d67800, 0xc1d18200, 0xc1404400, 0xc123ec00,
        0xc1079400, 0xc1079400, 0xc1c35600, 0xc1a6fe00, 0xc1079400, 0xc1b52a00, 0xc178f400,
        0xc1079400,
    ];

    const Q5_0_DATA: [u8; 44] = [
        99, 191, 210, 154, 54, 63, 226, 198, 139, 56, 238, 47, 90, 217, 208, 253, 162, 119, 45,
        148, 241, 237, 95, 188, 238, 72, 154, 253, 102, 167, 160, 104, 154, 136, 110, 128, 140,
        219, 119, 147, 91, 165, 225, 125,
    ];
    const Q5_0_EXPECTED: [u32; 64] = [
        0x41ced400, 0xc1314800, 0x4113bc00, 0x416c6000, 0xc1ced400, 0x3fec6000, 0xc193bc00,
        0xc184f600, 0x41ec6000, 0xc1c00e00, 0x41ced400, 0xc14ed400, 0xc1c00e00, 0x41b14800,
        0x41dd9a00, 0xc1c00e00, 0x406c6000, 0xc1b14800, 0xc16c6000, 0x41c00e00, 0xc1ced400,
        0xc06c6000, 0x41a28200, 0x40b14800, 0xc1c00e00, 0xc1dd9a00, 0xc193bc00, 0xc14ed400,
        0xc06c6000, 0xc184f600, 0x3fec6000, 0x406c6000, 0x412ed800, 0xc0f4c800, 0x80000000,
        0xc10be000, 0x40d1d000, 0xc10be000, 0xc174c800, 0x80000000, 0x408be000, 0x40aed800,
        0x411d5c00, 0xc051d000, 0x40aed800, 0x41405400, 0xbf8be000, 0x4051d000, 0x412ed800,
        0xc12ed800, 0x40d1d000, 0xc0d1d000, 0xc11d5c00, 0x410be000, 0x412ed800, 0xc10be000,
        0xc10be000, 0x4051d000, 0xc0f4c800, 0xc11d5c00, 0xc0aed800, 0xc12ed800, 0xc174c800,
        0xc0f4c800,
    ];

    const Q5_1_DATA: [u8; 48] = [
        163, 176, 64, 188, 147, 227, 59, 174, 149, 166, 197, 80, 18, 61, 229, 96, 172, 215, 16,
        199, 125, 189, 13, 105, 136, 189, 100, 189, 37, 88, 201, 162, 31, 169, 191, 63, 111, 249,
        203, 95, 6, 49, 221, 240, 209, 40, 190, 78,
    ];
    const Q5_1_EXPECTED: [u32; 64] = [
        0xc0835f00, 0xc0880200, 0xbfe4bc00, 0xbf880000, 0xc06aec00, 0xc03c8e00, 0xbfe4bc00,
        0xc0586000, 0xc0a3d400, 0xc08ca500, 0xbf880000, 0xc004ea00, 0xc03c8e00, 0xc0a87700,
        0xc0a87700, 0xc095eb00, 0xc095eb00, 0xc09a8e00, 0xc0334800, 0xc0835f00, 0xc061a600,
        0xc0743200, 0xc045d400, 0xbff74800, 0xc020bc00, 0xc0a87700, 0xc061a600, 0xc0a3d400,
        0xc004ea00, 0xc09f3100, 0xbf880000, 0xc0880200, 0xc230dc00, 0xc15cb000, 0xc230dc00,
        0xc1b0b800, 0xc1b0b800, 0xc20fac00, 0xc1847800, 0xc1b0b800, 0xc11a5000, 0xc02ec000,
        0xc19a9800, 0xc1bbc800, 0xc1c6d800, 0xc1469000, 0xc22b5400, 0xc1a5a800, 0xc1c6d800,
        0xc172d000, 0xc1847800, 0xc1dcf800, 0xc11a5000, 0xc1b0b800, 0xc2204400, 0xc1f31800,
        0xbfac8000, 0xc1dcf800, 0xc19a9800, 0xc1b0b800, 0xc19a9800, 0xc1d1e800, 0xc1847800,
        0xc1e80800,
    ];
}
