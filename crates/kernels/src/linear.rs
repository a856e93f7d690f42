//! Host-side kernels for one linear layer's product, used instead of the backend's matrix product
//! where they are faster (few rows through quantized weights: token-by-token decoding).

use std::fmt::Debug;

/// Why a kernel refused its input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    /// The data does not have the shape it claims.
    #[error("a {rows}×{cols} matrix needs {} values, got {len}", rows * cols)]
    Shape {
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
        /// Values given.
        len: usize,
    },
    /// The kernel chose not to compute this product (an observer, such as a calibration
    /// recorder, that only looks at the input); the caller uses the backend's product.
    #[error("the kernel declined this product")]
    Declined,
    /// A row index past the end of the matrix.
    #[error("row {index} of a matrix with {rows} rows")]
    RowOutOfRange {
        /// The index asked for.
        index: usize,
        /// Rows the matrix has.
        rows: usize,
    },
}

/// One linear layer's product `y = x · Wᵀ` (no bias) computed on the host from weights the kernel
/// holds in its own format (e.g. [`Int8Matrix`](crate::Int8Matrix)).
pub trait LinearKernel: Send + Sync + Debug {
    /// Width of each input row.
    fn in_features(&self) -> usize;
    /// Width of each output row.
    fn out_features(&self) -> usize;
    /// `out[r] = x[r] · Wᵀ` for `rows` rows laid out one after another; an error (the caller then
    /// uses the backend's product) when the slices do not have those shapes, or
    /// [`KernelError::Declined`] from a kernel that only observes its input.
    fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]) -> Result<(), KernelError>;
    /// Bytes the kernel's weights occupy.
    fn weight_bytes(&self) -> usize;
    /// Most input rows worth giving the kernel: [`KERNEL_MAX_ROWS`] for a kernel kept beside the
    /// layer's f32 weights (larger products are faster in the backend), unbounded for one that
    /// holds the only resident copy of the weights.
    fn max_rows(&self) -> usize {
        KERNEL_MAX_ROWS
    }
    /// Weight rows `ids` (row `o` holds output feature `o`'s weights) in f32, one after another:
    /// embedding lookups from a table held by the kernel. [`KernelError::Declined`] by default.
    fn dequantize_rows(&self, ids: &[usize], out: &mut [f32]) -> Result<(), KernelError> {
        let _ = (ids, out);
        Err(KernelError::Declined)
    }
    /// Whether the kernel is called on backends whose tensors live off the host (a GPU): `false`
    /// by default (those backends multiply by their own copy of the weights); an observer that
    /// must see every input says `true`.
    fn on_any_backend(&self) -> bool {
        false
    }
}

/// Most rows a [`LinearKernel`] takes; larger products (prefill, training) use the backend.
pub const KERNEL_MAX_ROWS: usize = 16;
