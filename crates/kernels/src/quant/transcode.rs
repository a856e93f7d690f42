//! Exact transcoding at load of `Q4_K` weights, which the kernels do not read in place, into a
//! layout they do, so that the products see the file's weights bit for bit (no second rounding).
//!
//! `Q4_K` (super-blocks of 256: `d, dmin: f16`, eight 6-bit `(sc, m)` pairs in 12 bytes, 4-bit
//! quants; value `d·sc · q − dmin·m`) becomes eight blocks of the internal kind
//! [`Q4F`](super::Q4F): `Q4_1`'s math (`scale · q + offset`, nibbles unsigned, the offset added
//! from the activation block sums) with the scale `d·sc` and the offset `−dmin·m` in f32, both
//! exact (an f16 times a 6-bit integer fits f32's mantissa), and the nibbles reordered into
//! `Q4_1`'s order (values `0..16` low, `16..32` high). 24 bytes per 32 values: 6 bits per weight
//! in memory against `Q4_K`'s 4.5 and `Q8_0`'s 8.5.
//!
//! Each sub-block of 32 lines up with one activation block of [`Q8Rows`](super::Q8Rows). llama.cpp
//! multiplies `Q4_K` by activations quantized in blocks of 256 (`Q8_K`, an f32 scale), so the
//! products are close to, not bit-identical with, llama.cpp's; the weights are the file's.

use half::f16;
use kiln_gguf::GgmlType;
use kiln_gguf::blocks::{QK_K, scale_min_k4};

use super::{Q4F, QK, block_bytes};
use crate::linear::KernelError;

/// The internal kind a transcoded type becomes, and the values per block of the source type.
pub(super) fn target(ty: GgmlType) -> Option<(u8, usize)> {
    match ty {
        GgmlType::Q4_K => Some((Q4F, QK_K)),
        _ => None,
    }
}

/// `rows × cols` weights of type `ty` (one of those [`target`] names) at the start of `bytes`,
/// transcoded into rows of blocks of [`target`]'s kind. [`KernelError::Shape`] when `cols` is not
/// whole blocks of `ty` or `bytes` holds fewer than `rows · cols` values (`len`: what it holds);
/// [`KernelError::Declined`] for another type.
pub(super) fn transcode(
    ty: GgmlType,
    rows: usize,
    cols: usize,
    bytes: &[u8],
) -> Result<(u8, Vec<u8>), KernelError> {
    let (kind, per_block) = target(ty).ok_or(KernelError::Declined)?;
    let src = ty.type_size().ok_or(KernelError::Declined)?;
    let shape = KernelError::Shape {
        rows,
        cols,
        len: bytes.len() / src * per_block,
    };
    if !cols.is_multiple_of(per_block) {
        return Err(shape);
    }
    let blocks = rows.checked_mul(cols / per_block).ok_or(shape.clone())?;
    let len = blocks.checked_mul(src).ok_or(shape.clone())?;
    if len > bytes.len() {
        return Err(shape);
    }
    // `blocks · per_block / 32` output blocks: no overflow, since `len` did not.
    let mut out = vec![0u8; blocks * (per_block / QK) * block_bytes(kind)];
    let dst = block_bytes(kind) * (per_block / QK);
    for (b, o) in bytes[..len]
        .chunks_exact(src)
        .zip(out.chunks_exact_mut(dst))
    {
        q4_k(b, o);
    }
    Ok((kind, out))
}

/// One `Q4_K` super-block (144 bytes) into eight [`Q4F`] blocks (24 bytes each: f32 scale, f32
/// offset, 16 bytes of nibbles in `Q4_1`'s order).
fn q4_k(b: &[u8], o: &mut [u8]) {
    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
    let dmin = f16::from_le_bytes([b[2], b[3]]).to_f32();
    let sm = scale_min_k4(&std::array::from_fn(|i| b[4 + i]));
    let qs = &b[16..144];
    let bs = block_bytes(Q4F);
    for (j, ((sc, m), o)) in sm.iter().zip(o.chunks_exact_mut(bs)).enumerate() {
        // The products of kiln-gguf's (and llama.cpp's) `dequantize_row_q4_K`, so `scale · q +
        // offset` is its `d1 · q − m1` bit for bit.
        let scale = d * f32::from(*sc);
        let offset = -(dmin * f32::from(*m));
        o[..4].copy_from_slice(&scale.to_le_bytes());
        o[4..8].copy_from_slice(&offset.to_le_bytes());
        // Sub-block `j`: the low nibbles (even `j`) or high nibbles (odd) of `qs[32(j/2)..][..32]`.
        let src = &qs[32 * (j / 2)..32 * (j / 2) + 32];
        let nib = |v: usize| {
            if j % 2 == 0 {
                src[v] & 0x0F
            } else {
                src[v] >> 4
            }
        };
        for (i, q) in o[8..24].iter_mut().enumerate() {
            *q = nib(i) | (nib(i + 16) << 4);
        }
    }
}
