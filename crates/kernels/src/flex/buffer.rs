//! New output buffers written in parallel, without a zero-filled pass over the whole buffer first.
//!
//! `vec![0.0; n]` for a layer's activations is a `memset` of megabytes on the calling thread
//! (mimalloc zeroes reused memory), which the kernels then overwrite on every worker: a serial pass
//! in a step whose other work is parallel. Here each task zeroes only its own chunk, in its cache,
//! just before filling it.

use std::mem::MaybeUninit;

use rayon::prelude::*;

/// A buffer of `len` values whose consecutive chunks of `chunk` values (the last may be shorter)
/// `fill(index, values)` computes in parallel.
pub(crate) fn filled_in_parallel(
    len: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut values = Vec::with_capacity(len);
    values.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(index, part)| {
            part.fill(MaybeUninit::new(0.0));
            // SAFETY: every value of `part` was just initialized, and `MaybeUninit<f32>` has the
            // layout of `f32`.
            let part = unsafe { &mut *(part as *mut [MaybeUninit<f32>] as *mut [f32]) };
            fill(index, part);
        });
    // SAFETY: the chunks cover the first `len` values, all initialized above.
    unsafe { values.set_len(len) };
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chunk_is_filled_in_order() {
        let values = filled_in_parallel(10_007, 1000, |index, part| {
            for (i, v) in part.iter_mut().enumerate() {
                *v = (index * 1000 + i) as f32;
            }
        });
        assert_eq!(values.len(), 10_007);
        assert!(values.iter().enumerate().all(|(i, &v)| v == i as f32));
        assert!(filled_in_parallel(0, 16, |_, _| unreachable!()).is_empty());
    }
}
