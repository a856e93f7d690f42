//! Causal attention in one pass per head, forward and backward, on f32 Flex tensors.
//!
//! Burn's composed attention materializes a broadcast causal mask, copies it to a contiguous
//! buffer for every `mask_fill` (forward and backward), and runs a dozen element-wise passes over
//! the `[batch, heads, seq, seq]` scores, each recorded for autodiff. Here each (batch, KV head)
//! group is one task: the scores of a block of 64 queries are one matrix product that stops at
//! the block's last key (the causal triangle, not the square), the softmax runs in place, and the
//! backward pass is the four products of the textbook gradient. Queries, keys and values are read
//! through their strides, so the heads split out of the fused QKV projection are never copied.

use burn::tensor::TensorData;
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::buffer::filled_in_parallel;
use super::math;
use super::strided::{Operand, SharedOut, StridedF32, matmul};

/// Queries per block of the score matrix.
const BLOCK: usize = 64;

/// The sizes of one attention call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    seq: usize,
    dim: usize,
}

impl Dims {
    /// The sizes of `q` `[b, h, t, d]` against `k`, `v` `[b, kvh, t, d]`, if they fit together.
    pub fn of(q: &FlexTensor, k: &FlexTensor, v: &FlexTensor) -> Option<Self> {
        let (q, k, v) = (q.layout().shape(), k.layout().shape(), v.layout().shape());
        if q.num_dims() != 4 || k.num_dims() != 4 || k.dims::<4>() != v.dims::<4>() {
            return None;
        }
        let ([b, h, t, d], [kb, kvh, kt, kd]) = (q.dims::<4>(), k.dims::<4>());
        (kb == b && kt == t && kd == d && kvh > 0 && h % kvh == 0 && t > 0 && d > 0).then_some(
            Self {
                batch: b,
                heads: h,
                kv_heads: kvh,
                seq: t,
                dim: d,
            },
        )
    }

    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    fn scale(&self) -> f32 {
        1.0 / (self.dim as f32).sqrt()
    }
}

/// A decoding step's attention (see [`FusedOps::decode_attention`](crate::fused::FusedOps)):
/// `q` `[b, kvh, group, d]` against keys and values in blocks `[b, kvh, n, d]` that follow one
/// another along the sequence, every position visible or the first `keys[r]` of batch row `r`.
/// Each query row's scores, softmax and weighted sum of values in one pass over the keys, read in
/// place through their strides (no copy of the cache); (batch, KV head) pairs in parallel when
/// there are enough keys.
pub(crate) fn decode(
    q: &FlexTensor,
    k: &[FlexTensor],
    v: &[FlexTensor],
    keys: Option<&[usize]>,
) -> Option<FlexTensor> {
    let qv = StridedF32::<4>::new(q)?;
    let [b, kvh, group, d] = qv.shape;
    let kv: Vec<StridedF32<'_, 4>> = k.iter().map(StridedF32::new).collect::<Option<_>>()?;
    let vv: Vec<StridedF32<'_, 4>> = v.iter().map(StridedF32::new).collect::<Option<_>>()?;
    if kv.is_empty() || kv.len() != vv.len() || d == 0 {
        return None;
    }
    // Block `i` holds positions `starts[i]..starts[i + 1]`.
    let mut starts = vec![0];
    for (kb, vb) in kv.iter().zip(&vv) {
        let [bb, kh, n, kd] = kb.shape;
        if kb.shape != vb.shape || bb != b || kh != kvh || kd != d {
            return None;
        }
        starts.push(starts.last()? + n);
    }
    let len = *starts.last()?;
    if len == 0
        || keys.is_some_and(|keys| keys.len() != b || keys.iter().any(|&n| n == 0 || n > len))
    {
        return None;
    }
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; b * kvh * group * d];
    // `f(j, row)` for positions `0..len` of head `h` of batch row `bi`, block by block.
    let each_row = |views: &[StridedF32<'_, 4>],
                    bi: usize,
                    h: usize,
                    len: usize,
                    f: &mut dyn FnMut(usize, &[f32])| {
        let mut scratch = vec![0f32; d];
        for (block, view) in views.iter().enumerate() {
            let first = starts[block];
            for j in first..starts[block + 1].min(len) {
                f(j, view.row_ref([bi, h, j - first, 0], d, &mut scratch));
            }
        }
    };
    let head = |i: usize, out: &mut [f32]| {
        let (bi, h) = (i / kvh, i % kvh);
        let len = keys.map_or(len, |keys| keys[bi]);
        let mut queries = vec![0f32; group * d];
        for r in 0..group {
            qv.row([bi, h, r, 0], d, &mut queries[r * d..(r + 1) * d]);
        }
        let mut scores = vec![0f32; group * len];
        each_row(&kv, bi, h, len, &mut |j, key| {
            for r in 0..group {
                let q = &queries[r * d..(r + 1) * d];
                scores[r * len + j] = math::dot(q, key) * scale;
            }
        });
        for r in 0..group {
            let s = &mut scores[r * len..(r + 1) * len];
            let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for x in s.iter_mut() {
                *x = (*x - max).exp();
                sum += *x;
            }
            for x in s.iter_mut() {
                *x /= sum;
            }
        }
        each_row(&vv, bi, h, len, &mut |j, value| {
            for r in 0..group {
                let p = scores[r * len + j];
                for (o, &x) in out[r * d..(r + 1) * d].iter_mut().zip(value) {
                    *o += p * x;
                }
            }
        });
    };
    // Small steps (one sequence, a short context) are cheaper on this thread than as tasks.
    if b * kvh * len * d < 1 << 16 {
        out.chunks_mut(group * d)
            .enumerate()
            .for_each(|(i, o)| head(i, o));
    } else {
        out.par_chunks_mut(group * d)
            .enumerate()
            .for_each(|(i, o)| head(i, o));
    }
    Some(FlexTensor::from_data(TensorData::new(
        out,
        [b, kvh, group, d],
    )))
}

/// Where a kernel writes the rows of a `[b, heads, t, d]` result: token-major, in a
/// `[b, t, slots, d]` buffer with head `h` in slot `first + h`. Token-major, so that the caller's
/// `swap_dims(1, 2)` back to token order is free; slots, so that one buffer can hold several
/// results side by side (the gradients of a packed QKV tensor).
#[derive(Clone, Copy, Debug)]
struct HeadRows {
    seq: usize,
    dim: usize,
    slots: usize,
    first: usize,
}

impl HeadRows {
    /// Heads `first..` of a buffer with `slots` heads per token.
    fn new(dims: &Dims, slots: usize, first: usize) -> Self {
        Self {
            seq: dims.seq,
            dim: dims.dim,
            slots,
            first,
        }
    }

    /// Offset of row `(b, head, i)`.
    fn offset(&self, b: usize, head: usize, i: usize) -> usize {
        ((b * self.seq + i) * self.slots + self.first + head) * self.dim
    }
}

/// A new buffer of `len` values, every one of them written by `write`.
///
/// # Safety
/// `write` writes each of the `len` values through the [`SharedOut`] it is given.
unsafe fn written(len: usize, write: impl FnOnce(SharedOut)) -> Vec<f32> {
    let mut data = Vec::with_capacity(len);
    write(SharedOut::spare(&mut data));
    // SAFETY: all `len` values were written (caller).
    unsafe { data.set_len(len) };
    data
}

/// A token-major `[b, t, heads, d]` buffer as the `[b, heads, t, d]` tensor it holds.
fn heads_tensor(data: Vec<f32>, dims: &Dims, heads: usize) -> FlexTensor {
    let (b, t, d) = (dims.batch, dims.seq, dims.dim);
    FlexTensor::from_data(TensorData::new(data, [b, t, heads, d])).transpose(1, 2)
}

/// `q`, `k` and `v` of a packed `[b, t, (heads + 2 · kv_heads) · d]` tensor (a fused QKV
/// projection's output) as `[b, heads | kv_heads, t, d]` views, and their sizes.
fn packed(
    qkv: &FlexTensor,
    heads: usize,
    kv_heads: usize,
) -> Option<(Dims, [StridedF32<'_, 4>; 3])> {
    let view = StridedF32::<3>::new(qkv)?;
    let [batch, seq, width] = view.shape;
    let slots = heads + 2 * kv_heads;
    if kv_heads == 0
        || !heads.is_multiple_of(kv_heads)
        || !width.is_multiple_of(slots)
        || batch == 0
        || seq == 0
    {
        return None;
    }
    let dim = width / slots;
    if dim == 0 {
        return None;
    }
    let dims = Dims {
        batch,
        heads,
        kv_heads,
        seq,
        dim,
    };
    let views = [
        view.heads(0, heads, dim),
        view.heads(heads, kv_heads, dim),
        view.heads(heads + kv_heads, kv_heads, dim),
    ];
    Some((dims, views))
}

/// Per-task scratch buffers.
struct Scratch {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    y: Vec<f32>,
    scores: Vec<f32>,
}

impl Scratch {
    fn new(dims: &Dims, with_scores: bool) -> Self {
        let (t, d) = (dims.seq, dims.dim);
        Self {
            q: vec![0.0; t * d],
            k: vec![0.0; t * d],
            v: vec![0.0; t * d],
            y: vec![0.0; t * d],
            scores: if with_scores {
                vec![0.0; t * t]
            } else {
                Vec::new()
            },
        }
    }
}

/// Copies head `head` of batch row `b` (`[t, d]`) into `out`.
fn gather(view: &StridedF32<'_, 4>, b: usize, head: usize, out: &mut [f32]) {
    let [_, _, t, d] = view.shape;
    for i in 0..t {
        view.row([b, head, i, 0], d, &mut out[i * d..(i + 1) * d]);
    }
}

/// Writes `rows` (`[t, d]`) as head `head` of batch row `b` of `out`.
fn scatter(out: SharedOut, layout: &HeadRows, b: usize, head: usize, rows: &[f32]) {
    let (t, d) = (layout.seq, layout.dim);
    for i in 0..t {
        // SAFETY: row (b, head, i) of the output belongs to this task alone and lies inside it.
        unsafe { out.write(layout.offset(b, head, i), &rows[i * d..(i + 1) * d]) }
    }
}

/// Query blocks `(start, end)` covering `0..t`.
fn blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t).step_by(BLOCK).map(move |s| (s, (s + BLOCK).min(t)))
}

/// Causal softmax probabilities of one head into `probs` (`[t, t]`, zero above the diagonal).
fn head_probs(dims: &Dims, q: &[f32], k: &[f32], probs: &mut [f32]) {
    let (t, d) = (dims.seq, dims.dim);
    for (r0, r1) in blocks(t) {
        matmul(
            &mut probs[r0 * t..],
            t,
            false,
            Operand::rows(&q[r0 * d..], r1 - r0, d, d),
            Operand::transposed(k, d, r1, d),
            dims.scale(),
        );
    }
    for (i, row) in probs.chunks_exact_mut(t).enumerate() {
        let (seen, future) = row.split_at_mut(i + 1);
        let max = seen.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        math::exp_shifted_in_place(seen, max);
        let inv = 1.0 / math::sum(seen);
        seen.iter_mut().for_each(|p| *p *= inv);
        future.fill(0.0);
    }
}

/// `y = probs · v` for one head, using only the causal part of `probs`.
fn head_output(dims: &Dims, probs: &[f32], v: &[f32], y: &mut [f32]) {
    let (t, d) = (dims.seq, dims.dim);
    for (r0, r1) in blocks(t) {
        matmul(
            &mut y[r0 * d..],
            d,
            false,
            Operand::rows(&probs[r0 * t..], r1 - r0, r1, t),
            Operand::rows(v, r1, d, d),
            1.0,
        );
    }
}

/// New probabilities buffer `[b, h, t, t]` for [`forward_into`] when `keep`, else empty.
fn probs_buffer(dims: &Dims, keep: bool) -> Vec<f32> {
    if !keep {
        return Vec::new();
    }
    let t = dims.seq;
    filled_in_parallel(dims.batch * dims.heads * t * t, t * t, |_, _| {})
}

/// The attention of the views `q`, `k`, `v` written into `out` (`layout`, every row of every
/// query head), and the probabilities of every head into `probs` unless it is empty.
fn forward_into(
    dims: &Dims,
    [qv, kv, vv]: [&StridedF32<'_, 4>; 3],
    probs: &mut [f32],
    out: SharedOut,
    layout: HeadRows,
) {
    let (t, rep) = (dims.seq, dims.group());
    let keep_probs = !probs.is_empty();
    let group_probs = rep * t * t;
    let tasks: Vec<(usize, &mut [f32])> = if keep_probs {
        probs.chunks_mut(group_probs).enumerate().collect()
    } else {
        (0..dims.batch * dims.kv_heads)
            .map(|g| (g, &mut [][..]))
            .collect()
    };
    tasks.into_par_iter().for_each_init(
        || Scratch::new(dims, !keep_probs),
        |s, (group, kept)| {
            let (b, g) = (group / dims.kv_heads, group % dims.kv_heads);
            gather(kv, b, g, &mut s.k);
            gather(vv, b, g, &mut s.v);
            for r in 0..rep {
                let head = g * rep + r;
                gather(qv, b, head, &mut s.q);
                let head_probs_buf = if keep_probs {
                    &mut kept[r * t * t..(r + 1) * t * t]
                } else {
                    &mut s.scores[..]
                };
                head_probs(dims, &s.q, &s.k, head_probs_buf);
                head_output(dims, head_probs_buf, &s.v, &mut s.y);
                scatter(out, &layout, b, head, &s.y);
            }
        },
    );
}

/// The attention output `[b, h, t, d]` and, when `keep_probs`, the probabilities
/// `[b, h, t, t]` the backward pass needs. `None` when the inputs are not f32 or do not fit.
pub(crate) fn forward(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    keep_probs: bool,
) -> Option<(FlexTensor, Option<FlexTensor>)> {
    let dims = Dims::of(q, k, v)?;
    let views = [
        &StridedF32::<4>::new(q)?,
        &StridedF32::<4>::new(k)?,
        &StridedF32::<4>::new(v)?,
    ];
    let mut probs = probs_buffer(&dims, keep_probs);
    let len = dims.batch * dims.seq * dims.heads * dims.dim;
    let layout = HeadRows::new(&dims, dims.heads, 0);
    // SAFETY: `forward_into` writes every row of every head of the output.
    let y = unsafe {
        written(len, |out| {
            forward_into(&dims, views, &mut probs, out, layout)
        })
    };
    Some((heads_tensor(y, &dims, dims.heads), kept(probs, &dims)))
}

/// [`forward`] of a packed `[b, t, (heads + 2 · kv_heads) · d]` QKV tensor, read in place: the
/// output `[b, t, heads · d]`, ready for the output projection.
pub(crate) fn forward_packed(
    qkv: &FlexTensor,
    heads: usize,
    kv_heads: usize,
    keep_probs: bool,
) -> Option<(FlexTensor, Option<FlexTensor>)> {
    let (dims, [qv, kv, vv]) = packed(qkv, heads, kv_heads)?;
    let mut probs = probs_buffer(&dims, keep_probs);
    let (b, t, d) = (dims.batch, dims.seq, dims.dim);
    let layout = HeadRows::new(&dims, heads, 0);
    // SAFETY: `forward_into` writes every row of every head of the output.
    let y = unsafe {
        written(b * t * heads * d, |out| {
            forward_into(&dims, [&qv, &kv, &vv], &mut probs, out, layout)
        })
    };
    let y = FlexTensor::from_data(TensorData::new(y, [b, t, heads * d]));
    Some((y, kept(probs, &dims)))
}

/// The kept probabilities as a `[b, h, t, t]` tensor (`None` when none were kept).
fn kept(probs: Vec<f32>, dims: &Dims) -> Option<FlexTensor> {
    let t = dims.seq;
    (!probs.is_empty())
        .then(|| FlexTensor::from_data(TensorData::new(probs, [dims.batch, dims.heads, t, t])))
}

/// The gradients of the attention of the views `q`, `k`, `v` given the output gradient `gv`
/// (`[b, h, t, d]`), written into `dq`, `dk` and `dv` (every row of every head), from the kept
/// probabilities or, when none were kept, probabilities recomputed head by head.
fn backward_into(
    dims: &Dims,
    [qv, kv, vv, gv]: [&StridedF32<'_, 4>; 4],
    probs: Option<&[f32]>,
    [(dq_out, dq_rows), (dk_out, dk_rows), (dv_out, dv_rows)]: [(SharedOut, HeadRows); 3],
) {
    let (t, d, rep, scale) = (dims.seq, dims.dim, dims.group(), dims.scale());
    (0..dims.batch * dims.kv_heads)
        .into_par_iter()
        .for_each_init(
            || {
                (
                    Scratch::new(dims, true),
                    vec![0.0f32; t * d],
                    vec![0.0f32; t * d],
                    vec![0.0f32; if probs.is_some() { 0 } else { t * t }],
                )
            },
            |(s, dk_head, dv_head, recomputed), group| {
                let (b, g) = (group / dims.kv_heads, group % dims.kv_heads);
                gather(kv, b, g, &mut s.k);
                gather(vv, b, g, &mut s.v);
                dk_head.fill(0.0);
                dv_head.fill(0.0);
                for r in 0..rep {
                    let head = g * rep + r;
                    gather(qv, b, head, &mut s.q);
                    let p: &[f32] = match probs {
                        Some(probs) => &probs[(b * dims.heads + head) * t * t..][..t * t],
                        None => {
                            head_probs(dims, &s.q, &s.k, recomputed);
                            recomputed
                        }
                    };
                    // `s.y` holds the output gradient of this head.
                    gather(gv, b, head, &mut s.y);
                    // dV += Pᵀ · dY, key block by key block (rows c0.. of P are the only non-zero ones).
                    for (c0, c1) in blocks(t) {
                        matmul(
                            &mut dv_head[c0 * d..],
                            d,
                            true,
                            Operand::transposed(&p[c0 * t + c0..], c1 - c0, t - c0, t),
                            Operand::rows(&s.y[c0 * d..], t - c0, d, d),
                            1.0,
                        );
                    }
                    // dP = dY · Vᵀ on the causal blocks, then dS = P ⊙ (dP − rowsum(P ⊙ dP)) · scale.
                    let ds = &mut s.scores;
                    for (r0, r1) in blocks(t) {
                        matmul(
                            &mut ds[r0 * t..],
                            t,
                            false,
                            Operand::rows(&s.y[r0 * d..], r1 - r0, d, d),
                            Operand::transposed(&s.v, d, r1, d),
                            1.0,
                        );
                    }
                    for i in 0..t {
                        let (p_row, ds_row) =
                            (&p[i * t..i * t + i + 1], &mut ds[i * t..(i + 1) * t]);
                        let centre = math::dot(p_row, &ds_row[..=i]);
                        for (x, &pj) in ds_row[..=i].iter_mut().zip(p_row) {
                            *x = pj * (*x - centre) * scale;
                        }
                        ds_row[i + 1..].fill(0.0);
                    }
                    // dQ = dS · K.
                    for (r0, r1) in blocks(t) {
                        matmul(
                            &mut s.y[r0 * d..],
                            d,
                            false,
                            Operand::rows(&ds[r0 * t..], r1 - r0, r1, t),
                            Operand::rows(&s.k, r1, d, d),
                            1.0,
                        );
                    }
                    scatter(dq_out, &dq_rows, b, head, &s.y);
                    // dK += dSᵀ · Q.
                    for (c0, c1) in blocks(t) {
                        matmul(
                            &mut dk_head[c0 * d..],
                            d,
                            true,
                            Operand::transposed(&ds[c0 * t + c0..], c1 - c0, t - c0, t),
                            Operand::rows(&s.q[c0 * d..], t - c0, d, d),
                            1.0,
                        );
                    }
                }
                scatter(dk_out, &dk_rows, b, g, dk_head);
                scatter(dv_out, &dv_rows, b, g, dv_head);
            },
        );
}

/// Gradients `(dq, dk, dv)` of the attention output given `grad` (`[b, h, t, d]`), from the
/// inputs and the probabilities [`forward`] kept, or, when it kept none (activation
/// checkpointing), probabilities recomputed head by head. `None` when the tensors do not fit
/// together.
pub(crate) fn backward(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    probs: Option<&FlexTensor>,
    grad: &FlexTensor,
) -> Option<(FlexTensor, FlexTensor, FlexTensor)> {
    let dims = Dims::of(q, k, v)?;
    let grad = super::strided::readable::<4>(grad)?;
    let (qv, kv, vv, gv) = (
        StridedF32::<4>::new(q)?,
        StridedF32::<4>::new(k)?,
        StridedF32::<4>::new(v)?,
        StridedF32::<4>::new(&grad)?,
    );
    let probs = checked_probs(probs, &dims)?;
    if gv.shape != qv.shape {
        return None;
    }
    let (b, t, d, h, kvh) = (dims.batch, dims.seq, dims.dim, dims.heads, dims.kv_heads);
    let (mut dq, mut dk, mut dv) = (
        Vec::with_capacity(b * t * h * d),
        Vec::with_capacity(b * t * kvh * d),
        Vec::with_capacity(b * t * kvh * d),
    );
    let outs = [
        (SharedOut::spare(&mut dq), HeadRows::new(&dims, h, 0)),
        (SharedOut::spare(&mut dk), HeadRows::new(&dims, kvh, 0)),
        (SharedOut::spare(&mut dv), HeadRows::new(&dims, kvh, 0)),
    ];
    backward_into(&dims, [&qv, &kv, &vv, &gv], probs, outs);
    // SAFETY: `backward_into` wrote every row of every head of the three gradients.
    unsafe {
        dq.set_len(b * t * h * d);
        dk.set_len(b * t * kvh * d);
        dv.set_len(b * t * kvh * d);
    }
    Some((
        heads_tensor(dq, &dims, h),
        heads_tensor(dk, &dims, kvh),
        heads_tensor(dv, &dims, kvh),
    ))
}

/// The gradient of [`forward_packed`]'s input: `d(qkv)` `[b, t, (heads + 2 · kv_heads) · d]` given
/// the output gradient `grad` `[b, t, heads · d]`, the q, k and v parts side by side in one
/// buffer as the projection that made them needs it.
pub(crate) fn backward_packed(
    qkv: &FlexTensor,
    heads: usize,
    kv_heads: usize,
    probs: Option<&FlexTensor>,
    grad: &FlexTensor,
) -> Option<FlexTensor> {
    let (dims, [qv, kv, vv]) = packed(qkv, heads, kv_heads)?;
    let (b, t, d) = (dims.batch, dims.seq, dims.dim);
    let grad = super::strided::readable::<3>(grad)?;
    let gv = StridedF32::<3>::new(&grad)?;
    if gv.shape != [b, t, heads * d] {
        return None;
    }
    let gv = gv.heads(0, heads, d);
    let probs = checked_probs(probs, &dims)?;
    let slots = heads + 2 * kv_heads;
    let mut dqkv = Vec::with_capacity(b * t * slots * d);
    let out = SharedOut::spare(&mut dqkv);
    let outs = [
        (out, HeadRows::new(&dims, slots, 0)),
        (out, HeadRows::new(&dims, slots, heads)),
        (out, HeadRows::new(&dims, slots, heads + kv_heads)),
    ];
    backward_into(&dims, [&qv, &kv, &vv, &gv], probs, outs);
    // SAFETY: `backward_into` wrote every row of the q, k and v heads, which fill the slots.
    unsafe { dqkv.set_len(b * t * slots * d) };
    Some(FlexTensor::from_data(TensorData::new(
        dqkv,
        [b, t, slots * d],
    )))
}

/// The kept probabilities' values, checked against `dims`: `Some(None)` when none were kept,
/// `None` when they do not fit.
fn checked_probs<'a>(probs: Option<&'a FlexTensor>, dims: &Dims) -> Option<Option<&'a [f32]>> {
    match probs {
        None => Some(None),
        Some(p) => {
            let values = p.as_slice::<f32>()?;
            let t = dims.seq;
            (values.len() == dims.batch * dims.heads * t * t).then_some(Some(values))
        }
    }
}
