//! A linear layer's products on f32 Flex tensors through [`crate::gemm`]: the forward product
//! `x · w + bias` and, for training, `dx = dy · wᵀ`, `dw = xᵀ · dy` and `db = Σ_rows dy`, with the
//! multiplications in the [`Products`] precision the forward pass was given.

use burn::tensor::{DType, TensorData};
use burn_flex::FlexTensor;

use crate::gemm::{self, MatRef, Products};

/// A 2-D f32 tensor as a matrix view (any non-negative strides).
fn matrix(t: &FlexTensor) -> Option<MatRef<'_>> {
    let layout = t.layout();
    if t.dtype() != DType::F32 || layout.num_dims() != 2 {
        return None;
    }
    let shape = layout.shape();
    let strides = layout.strides();
    let rs = usize::try_from(strides[0]).ok()?;
    let cs = usize::try_from(strides[1]).ok()?;
    MatRef::new(
        t.storage::<f32>(),
        layout.start_offset(),
        shape[0],
        shape[1],
        rs,
        cs,
    )
    .ok()
}

fn tensor(values: Vec<f32>, shape: [usize; 2]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// `x · w (+ bias)`: `x` `[rows, d_in]`, `w` `[d_in, d_out]`, `bias` `[d_out]`. `None` for other
/// dtypes or shapes, or where this CPU lacks the instructions `products` needs.
pub(crate) fn forward(
    x: &FlexTensor,
    w: &FlexTensor,
    bias: Option<&FlexTensor>,
    products: Products,
) -> Option<FlexTensor> {
    if !gemm::available(products) {
        return None;
    }
    let (xm, wm) = (matrix(x)?, matrix(w)?);
    let (rows, d_out) = (xm.rows(), wm.cols());
    let bias = match bias {
        Some(b) => {
            let b = b.to_contiguous();
            if b.dtype() != DType::F32 || b.layout().num_elements() != d_out {
                return None;
            }
            Some(b)
        }
        None => None,
    };
    let y = match &bias {
        Some(b) => {
            let b = b.as_slice::<f32>()?;
            let mut y = Vec::with_capacity(rows * d_out);
            for _ in 0..rows {
                y.extend_from_slice(b);
            }
            gemm::matmul(xm, wm, &mut y, true, products).ok()?;
            y
        }
        None => gemm::product(xm, wm, products).ok()?,
    };
    Some(tensor(y, [rows, d_out]))
}

/// The gradients of [`forward`] for the output gradient `dy` `[rows, d_out]`: `dx`, `dw` and
/// `db`, each computed only if asked for (`want`).
pub(crate) fn backward(
    x: &FlexTensor,
    w: &FlexTensor,
    dy: &FlexTensor,
    products: Products,
    want: [bool; 3],
) -> Option<[Option<FlexTensor>; 3]> {
    let (xm, wm, dym) = (matrix(x)?, matrix(w)?, matrix(dy)?);
    let (rows, d_in, d_out) = (xm.rows(), xm.cols(), wm.cols());
    if dym.rows() != rows || dym.cols() != d_out || wm.rows() != d_in {
        return None;
    }
    let dx = if want[0] {
        let dx = gemm::product(dym, wm.t(), products).ok()?;
        Some(tensor(dx, [rows, d_in]))
    } else {
        None
    };
    let dw = if want[1] {
        let dw = gemm::product(xm.t(), dym, products).ok()?;
        Some(tensor(dw, [d_in, d_out]))
    } else {
        None
    };
    let db = if want[2] {
        // Summed in f32, like the rest of the gradient.
        let dy = dy.to_contiguous();
        let values = dy.as_slice::<f32>()?;
        let mut db = vec![0f32; d_out];
        for row in values.chunks_exact(d_out) {
            for (s, &g) in db.iter_mut().zip(row) {
                *s += g;
            }
        }
        Some(FlexTensor::from_data(TensorData::new(db, [d_out])))
    } else {
        None
    };
    Some([dx, dw, db])
}
