//! [`QuantLinear`]: a linear layer whose only resident weights are quantized blocks, possibly of
//! several types stacked along the outputs (Kiln fuses Q, K and V into one projection; a GGUF file
//! may store V with more bits than Q and K).

use std::sync::Arc;

use crate::linear::{KernelError, LinearKernel};
use crate::quant::{Q8Rows, QuantMatrix, matmul_stacked};

/// One or more [`QuantMatrix`] parts sharing their inputs, their outputs side by side: part 0's
/// outputs first. The input is quantized to 8 bits once per product, whatever the parts' types.
#[derive(Clone, Debug)]
pub struct QuantLinear {
    parts: Arc<[QuantMatrix]>,
    cols: usize,
    rows: usize,
}

impl QuantLinear {
    /// Parts stacked along the outputs; they must share their input width.
    pub fn new(parts: Vec<QuantMatrix>) -> Result<Self, KernelError> {
        let cols = parts.first().map_or(0, QuantMatrix::cols);
        if let Some(odd) = parts.iter().find(|p| p.cols() != cols) {
            return Err(KernelError::Shape {
                rows: odd.rows(),
                cols,
                len: odd.rows() * odd.cols(),
            });
        }
        let rows = parts.iter().map(QuantMatrix::rows).sum();
        Ok(Self {
            parts: parts.into(),
            cols,
            rows,
        })
    }

    /// The parts, in output order.
    pub fn parts(&self) -> &[QuantMatrix] {
        &self.parts
    }

    /// The weights in f32, `[out, in]` row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for part in self.parts.iter() {
            out.extend(part.dequantize());
        }
        out
    }
}

impl LinearKernel for QuantLinear {
    fn in_features(&self) -> usize {
        self.cols
    }

    fn out_features(&self) -> usize {
        self.rows
    }

    fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]) -> Result<(), KernelError> {
        if out.len() != rows * self.rows {
            return Err(KernelError::Shape {
                rows,
                cols: self.rows,
                len: out.len(),
            });
        }
        let x = Q8Rows::quantize(x, rows, self.cols)?;
        matmul_stacked(&self.parts, &x, out)
    }

    fn weight_bytes(&self) -> usize {
        self.parts.iter().map(QuantMatrix::bytes).sum()
    }

    fn max_rows(&self) -> usize {
        usize::MAX
    }

    fn dequantize_rows(&self, ids: &[usize], out: &mut [f32]) -> Result<(), KernelError> {
        if out.len() != ids.len() * self.cols {
            return Err(KernelError::Shape {
                rows: ids.len(),
                cols: self.cols,
                len: out.len(),
            });
        }
        for (&id, row) in ids.iter().zip(out.chunks_exact_mut(self.cols.max(1))) {
            let mut first = 0;
            let part = self
                .parts
                .iter()
                .find(|p| {
                    first += p.rows();
                    id < first
                })
                .ok_or(KernelError::RowOutOfRange {
                    index: id,
                    rows: self.rows,
                })?;
            part.dequantize_rows(&[id - (first - part.rows())], row)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use kiln_gguf::GgmlType;
    use kiln_gguf::blocks::quantize;

    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let v = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
                (v % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn part(ty: GgmlType, rows: usize, cols: usize, seed: u32) -> QuantMatrix {
        let bytes = quantize(ty, &values(rows * cols, seed)).unwrap();
        QuantMatrix::from_vec(ty, rows, cols, bytes).unwrap()
    }

    #[test]
    fn stacked_parts_equal_each_part_alone() {
        // Small enough for the calling thread, then large enough to be split across threads.
        stacked_case(64, [5, 3, 4], 3);
        stacked_case(576, [200, 70, 130], 2);
    }

    fn stacked_case(cols: usize, rows: [usize; 3], n: usize) {
        let parts = vec![
            part(GgmlType::Q4_0, rows[0], cols, 1),
            part(GgmlType::Q8_0, rows[1], cols, 2),
            part(GgmlType::Q4_1, rows[2], cols, 3),
        ];
        let stacked = QuantLinear::new(parts.clone()).unwrap();
        let total: usize = rows.iter().sum();
        assert_eq!(
            (stacked.in_features(), stacked.out_features()),
            (cols, total)
        );
        let x = values(n * cols, 9);
        let mut out = vec![0f32; n * total];
        stacked.forward(&x, n, &mut out).unwrap();
        let mut offset = 0;
        for p in &parts {
            let mut alone = vec![0f32; n * p.rows()];
            p.forward(&x, n, &mut alone).unwrap();
            for r in 0..n {
                assert_eq!(
                    &out[r * total + offset..r * total + offset + p.rows()],
                    &alone[r * p.rows()..(r + 1) * p.rows()]
                );
            }
            offset += p.rows();
        }
        // Rows and the whole matrix come back from the right part.
        let dense = stacked.dequantize();
        let (a, b) = (rows[0] + 1, total - 1);
        let mut got = vec![0f32; 2 * cols];
        stacked.dequantize_rows(&[a, b], &mut got).unwrap();
        assert_eq!(&got[..cols], &dense[a * cols..(a + 1) * cols]);
        assert_eq!(&got[cols..], &dense[b * cols..(b + 1) * cols]);
        assert_eq!(
            stacked.dequantize_rows(&[total], &mut got[..cols]),
            Err(KernelError::RowOutOfRange {
                index: total,
                rows: total
            })
        );
    }

    #[test]
    fn parts_must_share_their_input_width() {
        let parts = vec![
            part(GgmlType::Q8_0, 2, 64, 1),
            part(GgmlType::Q8_0, 2, 32, 2),
        ];
        assert!(matches!(
            QuantLinear::new(parts),
            Err(KernelError::Shape { .. })
        ));
        let one = QuantLinear::new(vec![part(GgmlType::Q8_0, 2, 32, 1)]).unwrap();
        assert!(one.forward(&[0.0; 32], 1, &mut [0.0; 3]).is_err());
    }
}
