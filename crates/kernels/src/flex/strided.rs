//! Reading and writing f32 Flex tensors by their strides, and one small matrix product.

use burn::tensor::DType;
use burn_flex::FlexTensor;

/// An f32 tensor of rank `D` read through its layout (any non-negative strides).
pub(crate) struct StridedF32<'a, const D: usize> {
    data: &'a [f32],
    offset: usize,
    strides: [usize; D],
    /// The logical shape.
    pub shape: [usize; D],
}

impl<'a, const D: usize> StridedF32<'a, D> {
    /// A view of `tensor`, or `None` when it is not an f32 tensor of rank `D` with non-negative
    /// strides.
    pub fn new(tensor: &'a FlexTensor) -> Option<Self> {
        let layout = tensor.layout();
        if tensor.dtype() != DType::F32 || layout.num_dims() != D {
            return None;
        }
        let mut strides = [0; D];
        let mut shape = [0; D];
        for i in 0..D {
            strides[i] = usize::try_from(layout.strides()[i]).ok()?;
            shape[i] = layout.shape()[i];
        }
        Some(Self {
            data: tensor.storage::<f32>(),
            offset: layout.start_offset(),
            strides,
            shape,
        })
    }

    /// Offset of element `index` in the storage.
    fn position(&self, index: [usize; D]) -> usize {
        self.offset
            + index
                .iter()
                .zip(&self.strides)
                .map(|(i, s)| i * s)
                .sum::<usize>()
    }

    /// The `len` elements along the last dimension starting at `index` (which has 0 there), in
    /// place when they are contiguous, else copied into `scratch`.
    pub fn row_ref<'s>(
        &'s self,
        index: [usize; D],
        len: usize,
        scratch: &'s mut [f32],
    ) -> &'s [f32] {
        let start = self.position(index);
        if self.strides[D - 1] == 1 {
            &self.data[start..start + len]
        } else {
            self.row(index, len, scratch);
            &scratch[..len]
        }
    }

    /// The `len` elements along the last dimension starting at `index` (which has 0 there).
    pub fn row(&self, index: [usize; D], len: usize, out: &mut [f32]) {
        let start = self.position(index);
        let step = self.strides[D - 1];
        if step == 1 {
            out[..len].copy_from_slice(&self.data[start..start + len]);
        } else {
            for (j, o) in out[..len].iter_mut().enumerate() {
                *o = self.data[start + j * step];
            }
        }
    }
}

impl<'a> StridedF32<'a, 3> {
    /// Heads `first..first + heads` of a packed `[b, t, n · dim]` tensor (`n` heads of `dim`
    /// values per token, like a fused QKV projection's output) as a `[b, heads, t, dim]` view.
    pub fn heads(&self, first: usize, heads: usize, dim: usize) -> StridedF32<'a, 4> {
        let [b, t, _] = self.shape;
        let [sb, st, sc] = self.strides;
        StridedF32 {
            data: self.data,
            offset: self.offset + first * dim * sc,
            strides: [sb, dim * sc, st, sc],
            shape: [b, heads, t, dim],
        }
    }
}

/// `tensor` as an f32 view of rank `D`, copying it to a contiguous layout first when its strides
/// cannot be read directly (negative strides). `None` for other dtypes or ranks.
pub(crate) fn readable<const D: usize>(tensor: &FlexTensor) -> Option<FlexTensor> {
    if tensor.dtype() != DType::F32 || tensor.layout().num_dims() != D {
        return None;
    }
    if tensor.layout().strides().iter().any(|&s| s < 0) {
        Some(tensor.to_contiguous())
    } else {
        Some(tensor.clone())
    }
}

/// A raw pointer to an output buffer that tasks on different threads write disjoint parts of.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(*mut f32);

// SAFETY: every user writes a region of the buffer no other task touches, and the buffer outlives
// the parallel loop that uses it.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The spare capacity of `buffer`, for a kernel that writes every value before the caller
    /// sets the length.
    pub fn spare(buffer: &mut Vec<f32>) -> Self {
        Self(buffer.spare_capacity_mut().as_mut_ptr().cast())
    }

    /// Copies `row` to `offset..offset + row.len()`.
    ///
    /// # Safety
    /// The range must lie inside the buffer and no other thread may access it concurrently.
    pub unsafe fn write(self, offset: usize, row: &[f32]) {
        // SAFETY: guaranteed by the caller.
        unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), self.0.add(offset), row.len()) }
    }
}

/// A matrix operand: a slice read as `rows × cols` with the given row and column strides.
#[derive(Clone, Copy)]
pub(crate) struct Operand<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> Operand<'a> {
    /// A row-major `rows × cols` block whose rows are `row_stride` apart.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride,
            col_stride: 1,
        }
    }

    /// The transpose of [`Operand::rows`]`(data, cols, rows, row_stride)`.
    pub fn transposed(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: 1,
            col_stride: row_stride,
        }
    }

    fn last_index(&self) -> usize {
        (self.rows.max(1) - 1) * self.row_stride + (self.cols.max(1) - 1) * self.col_stride
    }
}

/// `dst[..rows × cols, row stride dst_stride] (+)= alpha · lhs · rhs` on the calling thread.
pub(crate) fn matmul(
    dst: &mut [f32],
    dst_stride: usize,
    accumulate: bool,
    lhs: Operand<'_>,
    rhs: Operand<'_>,
    alpha: f32,
) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(rhs.rows, k, "inner dimensions of a fused-kernel product");
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        lhs.last_index() < lhs.data.len()
            && rhs.last_index() < rhs.data.len()
            && (m - 1) * dst_stride + n <= dst.len(),
        "fused-kernel product out of bounds"
    );
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_stride..r * dst_stride + n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: the asserts above keep every index the product reads or writes inside its slice, and
    // `dst` is borrowed mutably, so it aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_stride as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_matches_naive_product_with_transposed_operands() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut out = vec![1.0; m * n];
        matmul(
            &mut out,
            n,
            true,
            Operand::rows(&a, m, k, k),
            Operand::transposed(&bt, k, n, k),
            0.5,
        );
        for i in 0..m {
            for j in 0..n {
                let dot: f32 = (0..k).map(|p| a[i * k + p] * bt[j * k + p]).sum();
                assert!((out[i * n + j] - (1.0 + 0.5 * dot)).abs() < 1e-5);
            }
        }
    }
}
