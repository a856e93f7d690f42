//! The fused kernels against Burn's composed ops: outputs and gradients.

use crate::fused::{FusedOps, Gelu};
use burn::backend::Autodiff;
use burn::tensor::activation::{gelu, gelu_approximate};
use burn::tensor::module::attention as burn_attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Distribution, Tensor};
use burn_flex::Flex;

use super::FlexKernels;

type Ad = Autodiff<Flex>;

fn random<const D: usize>(shape: [usize; D]) -> Tensor<Ad, D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
}

fn assert_close<const D: usize>(what: &str, got: Tensor<Flex, D>, want: Tensor<Flex, D>) {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes");
    let scale = want.clone().abs().max().into_scalar().max(1.0);
    let err = (got - want).abs().max().into_scalar();
    assert!(
        err <= 2e-5 * scale,
        "{what}: max error {err} (scale {scale})"
    );
}

/// Queries, keys and values split out of one packed projection, as the model does.
fn split_qkv(qkv: &Tensor<Ad, 3>, h: usize, kvh: usize, d: usize) -> [Tensor<Ad, 4>; 3] {
    let [b, t, _] = qkv.dims();
    let split = |from: usize, heads: usize| {
        qkv.clone()
            .slice([0..b, 0..t, from * d..(from + heads) * d])
            .reshape([b, t, heads, d])
            .swap_dims(1, 2)
    };
    [split(0, h), split(h, kvh), split(h + kvh, kvh)]
}

fn reference_attention(q: Tensor<Ad, 4>, k: Tensor<Ad, 4>, v: Tensor<Ad, 4>) -> Tensor<Ad, 4> {
    let [b, kvh, t, d] = k.dims();
    let rep = q.dims()[1] / kvh;
    let repeat = |x: Tensor<Ad, 4>| {
        x.unsqueeze_dim::<5>(2)
            .expand([b, kvh, rep, t, d])
            .reshape([b, kvh * rep, t, d])
    };
    let options = AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal: true,
    };
    burn_attention(q, repeat(k), repeat(v), None, None, options)
}

fn check_attention(b: usize, t: usize, h: usize, kvh: usize, d: usize) {
    // Fresh leaves with the same values for each run: Burn frees a graph once it has run
    // backward through it.
    let packed = random([b, t, (h + 2 * kvh) * d]).inner();
    let weights = random([b, h, t, d]);
    let leaf = || Tensor::<Ad, 3>::from_inner(packed.clone()).require_grad();
    let run = |attend: &dyn Fn([Tensor<Ad, 4>; 3]) -> Tensor<Ad, 4>| {
        let qkv = leaf();
        let y = attend(split_qkv(&qkv, h, kvh, d));
        let grads = (y.clone() * weights.clone()).sum().backward();
        (y.inner(), qkv.grad(&grads).expect("gradient"))
    };
    let (want_y, want_grad) = run(&|[q, k, v]| reference_attention(q, k, v));
    for keep_attention_probs in [true, false] {
        let kernels = FlexKernels {
            keep_attention_probs,
        };
        let (y, grad) = run(&|[q, k, v]| kernels.causal_attention(&q, &k, &v).expect("fused"));
        assert_close("attention output", y, want_y.clone());
        assert_close("attention input gradient", grad, want_grad.clone());
        // The packed kernel: `[b, t, h · d]` out, the packed tensor's gradient in one piece.
        let token_major = |y: Tensor<Flex, 4>| y.swap_dims(1, 2).reshape([b, t, h * d]);
        let qkv = leaf();
        let y = kernels
            .causal_attention_packed(&qkv, h, kvh)
            .expect("fused packed");
        let packed_weights = weights.clone().swap_dims(1, 2).reshape([b, t, h * d]);
        let grads = (y.clone() * packed_weights).sum().backward();
        let grad = qkv.grad(&grads).expect("gradient");
        assert_close(
            "packed attention output",
            y.inner(),
            token_major(want_y.clone()),
        );
        assert_close("packed attention gradient", grad, want_grad.clone());
    }
    let packed_inference =
        FusedOps::<Flex>::causal_attention_packed(&FlexKernels::default(), &packed, h, kvh)
            .expect("inference packed attention");
    assert_close(
        "inference packed attention",
        packed_inference,
        want_y.clone().swap_dims(1, 2).reshape([b, t, h * d]),
    );
    let [q, k, v] = split_qkv(&leaf(), h, kvh, d);
    let inference = FusedOps::<Flex>::causal_attention(
        &FlexKernels::default(),
        &q.inner(),
        &k.inner(),
        &v.inner(),
    )
    .expect("inference attention");
    assert_close("inference attention", inference, want_y);
}

#[test]
fn attention_matches_burn_on_one_block() {
    check_attention(2, 7, 4, 4, 8);
}

#[test]
fn attention_matches_burn_across_blocks_with_grouped_heads() {
    // 150 tokens: three query blocks, the last one partial; 6 query heads on 2 KV heads.
    check_attention(2, 150, 6, 2, 16);
}

#[test]
fn layer_norm_matches_burn_with_and_without_bias() {
    for with_bias in [true, false] {
        let x = random([3, 5, 24]).require_grad();
        let w = random([24]).require_grad();
        let bias = with_bias.then(|| random([24]).require_grad());
        let eps = 1e-5;
        let fused = FlexKernels::default()
            .layer_norm(&x, &w, bias.as_ref(), eps)
            .expect("fused layer norm");
        let centered = x.clone() - x.clone().mean_dim(2);
        let var = centered.clone().square().mean_dim(2);
        let mut reference = centered / (var + eps).sqrt() * w.clone().unsqueeze::<3>();
        if let Some(bias) = &bias {
            reference = reference + bias.clone().unsqueeze::<3>();
        }
        assert_close(
            "layer norm output",
            fused.clone().inner(),
            reference.clone().inner(),
        );
        let weights = random([3, 5, 24]);
        let gf = (fused * weights.clone()).sum().backward();
        let gr = (reference * weights).sum().backward();
        assert_close("layer norm dx", x.grad(&gf).unwrap(), x.grad(&gr).unwrap());
        assert_close("layer norm dw", w.grad(&gf).unwrap(), w.grad(&gr).unwrap());
        if let Some(bias) = &bias {
            assert_close(
                "layer norm db",
                bias.grad(&gf).unwrap(),
                bias.grad(&gr).unwrap(),
            );
        }
    }
}

#[test]
fn gelu_matches_burn() {
    for kind in [Gelu::Erf, Gelu::Tanh] {
        let x = (random([4, 9, 33]) * 3.0).require_grad();
        let fused = FlexKernels::default().gelu(&x, kind).expect("fused gelu");
        let reference = match kind {
            Gelu::Erf => gelu(x.clone()),
            Gelu::Tanh => gelu_approximate(x.clone()),
        };
        assert_close(
            "gelu output",
            fused.clone().inner(),
            reference.clone().inner(),
        );
        let weights = random([4, 9, 33]);
        let gf = (fused * weights.clone()).sum().backward();
        let gr = (reference * weights).sum().backward();
        assert_close("gelu gradient", x.grad(&gf).unwrap(), x.grad(&gr).unwrap());
    }
}

#[test]
fn decode_attention_matches_burns_attention() {
    // (batch, kv heads, group, keys, head size); the second is large enough to run in parallel.
    for (b, kvh, group, len, d) in [(1, 3, 3, 17, 64), (2, 2, 4, 300, 64), (1, 1, 1, 1, 8)] {
        let q = Tensor::<Flex, 4>::random(
            [b, kvh, group, d],
            Distribution::Normal(0.0, 1.0),
            &Default::default(),
        );
        // Keys and values read through strides: slices of a longer cache, heads swapped in.
        let cache = Tensor::<Flex, 4>::random(
            [b, len + 5, kvh, d],
            Distribution::Normal(0.0, 1.0),
            &Default::default(),
        );
        let k = cache
            .clone()
            .slice([0..b, 0..len, 0..kvh, 0..d])
            .swap_dims(1, 2);
        let v = (cache * 0.5)
            .slice([0..b, 2..len + 2, 0..kvh, 0..d])
            .swap_dims(1, 2);
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: false,
        };
        let want = burn_attention(q.clone(), k.clone(), v.clone(), None, None, options);
        let got = FlexKernels {
            keep_attention_probs: false,
        }
        .decode_attention(&q, std::slice::from_ref(&k), std::slice::from_ref(&v), None)
        .unwrap();
        assert_close("decode attention", got, want.clone());
        // The same keys and values in blocks of 8 positions, as a paged cache holds them.
        let blocks = |x: &Tensor<Flex, 4>| -> Vec<Tensor<Flex, 4>> {
            (0..len)
                .step_by(8)
                .map(|s| x.clone().slice([0..b, 0..kvh, s..(s + 8).min(len), 0..d]))
                .collect()
        };
        let got = FlexKernels {
            keep_attention_probs: false,
        }
        .decode_attention(&q, &blocks(&k), &blocks(&v), None)
        .unwrap();
        assert_close("decode attention over blocks", got, want);
        // Rows of different lengths see a prefix of the keys each.
        let lens: Vec<usize> = (0..b).map(|r| len - r * len / (b + 1)).collect();
        let got = FlexKernels {
            keep_attention_probs: false,
        }
        .decode_attention(
            &q,
            std::slice::from_ref(&k),
            std::slice::from_ref(&v),
            Some(&lens),
        )
        .unwrap();
        for (r, &n) in lens.iter().enumerate() {
            let row = |x: &Tensor<Flex, 4>, keys: usize| {
                x.clone().slice([r..r + 1, 0..kvh, 0..keys, 0..d])
            };
            let want = burn_attention(
                q.clone().slice([r..r + 1, 0..kvh, 0..group, 0..d]),
                row(&k, n),
                row(&v, n),
                None,
                None,
                options,
            );
            let got = got.clone().slice([r..r + 1, 0..kvh, 0..group, 0..d]);
            assert_close("decode attention, ragged rows", got, want);
        }
    }
}

/// The fused linear layer against Burn's `linear` (`x·w + b`): output and the gradients of `x`,
/// `w` and `b`, with f32 products (as close as the attention checks) and with bf16 products
/// (against the same product on operands rounded to bf16).
#[test]
fn linear_matches_burn() {
    use crate::fused::Products;
    use burn::tensor::module::linear as burn_linear;

    let kernels = FlexKernels::default();
    // A strided input (a transposed view) as well as a contiguous one.
    let (rows, d_in, d_out) = (37, 70, 45);
    let x0 = random([rows, d_in]).inner();
    let xt = random([d_in, rows]).inner();
    let w0 = random([d_in, d_out]).inner();
    let b0 = random([d_out]).inner();
    let weights = random([rows, d_out]).inner();
    // Each value rounded to nearest bf16, ties to even, as the kernel rounds (`half`'s
    // conversion, element by element in logical order).
    let round = |t: Tensor<Flex, 2>| {
        let shape = t.dims();
        let values: Vec<f32> = t
            .into_data()
            .into_vec::<f32>()
            .expect("f32")
            .into_iter()
            .map(|v| half::bf16::from_f32(v).to_f32())
            .collect();
        Tensor::<Flex, 2>::from_data(
            burn::tensor::TensorData::new(values, shape),
            &Default::default(),
        )
    };
    for products in [Products::F32, Products::Bf16] {
        if !FusedOps::<Ad>::multiplies_in(&kernels, products) {
            continue;
        }
        for (transposed, with_bias) in [(false, true), (true, false)] {
            let input = if transposed {
                xt.clone().transpose()
            } else {
                x0.clone()
            };
            let run = |fused: bool| {
                let x = Tensor::<Ad, 2>::from_inner(input.clone()).require_grad();
                let w = Tensor::<Ad, 2>::from_inner(w0.clone()).require_grad();
                let b = Tensor::<Ad, 1>::from_inner(b0.clone()).require_grad();
                let bias = with_bias.then_some(&b);
                let y = if fused {
                    kernels.linear(&x, &w, bias, products).expect("fused")
                } else if products == Products::Bf16 {
                    // Burn's product on the rounded operands; the gradients then flow through
                    // the rounding as through the identity.
                    let xr = x.clone()
                        + Tensor::from_inner(round(x.clone().inner()) - x.clone().inner());
                    let wr = w.clone()
                        + Tensor::from_inner(round(w.clone().inner()) - w.clone().inner());
                    burn_linear(xr, wr, bias.cloned())
                } else {
                    burn_linear(x.clone(), w.clone(), bias.cloned())
                };
                let grads = (y.clone() * Tensor::from_inner(weights.clone()))
                    .sum()
                    .backward();
                (
                    y.inner(),
                    x.grad(&grads).expect("x gradient"),
                    w.grad(&grads).expect("w gradient"),
                    b.grad(&grads),
                )
            };
            let (y, dx, dw, db) = run(true);
            let (want_y, want_dx, want_dw, want_db) = run(false);
            let case = format!("{products:?}, transposed input {transposed}");
            assert_close(&format!("linear output ({case})"), y, want_y);
            if products == Products::F32 {
                assert_close("linear input gradient", dx, want_dx);
                assert_close("linear weight gradient", dw, want_dw);
            } else {
                // The backward products round the output gradient too.
                let close = |what: &str, got: Tensor<Flex, 2>, want: Tensor<Flex, 2>| {
                    let scale = want.clone().abs().max().into_scalar();
                    let err = (got - want).abs().max().into_scalar();
                    assert!(
                        err <= 1e-2 * scale,
                        "{what}: max error {err} (scale {scale})"
                    );
                };
                close("bf16 linear input gradient", dx, want_dx);
                close("bf16 linear weight gradient", dw, want_dw);
            }
            assert_eq!(db.is_some(), with_bias);
            if let (Some(db), Some(want_db)) = (db, want_db) {
                assert_close(
                    "linear bias gradient",
                    db.unsqueeze::<2>(),
                    want_db.unsqueeze(),
                );
            }
        }
    }
}

/// `x` rotated by Burn's ops: pairs `(i, i + d/2)` when `half_split`, else `(2i, 2i + 1)`.
fn reference_rope(
    x: Tensor<Flex, 4>,
    cos: Tensor<Flex, 4>,
    sin: Tensor<Flex, 4>,
    half_split: bool,
) -> Tensor<Flex, 4> {
    let [b, h, t, d] = x.dims();
    let half = d / 2;
    let (x0, x1) = if half_split {
        (
            x.clone().slice([0..b, 0..h, 0..t, 0..half]),
            x.slice([0..b, 0..h, 0..t, half..d]),
        )
    } else {
        let pairs = x.reshape([b, h, t, half, 2]);
        (
            pairs
                .clone()
                .slice([0..b, 0..h, 0..t, 0..half, 0..1])
                .reshape([b, h, t, half]),
            pairs
                .slice([0..b, 0..h, 0..t, 0..half, 1..2])
                .reshape([b, h, t, half]),
        )
    };
    let o0 = x0.clone() * cos.clone() - x1.clone() * sin.clone();
    let o1 = x1 * cos + x0 * sin;
    if half_split {
        Tensor::cat(vec![o0, o1], 3)
    } else {
        Tensor::stack::<5>(vec![o0, o1], 4).reshape([b, h, t, d])
    }
}

#[test]
fn rope_matches_burn_on_strided_views() {
    // Queries and keys as views of one projection; angles shared by the batch or per row;
    // a decoding step's single position and a prompt's many (the threaded path).
    for (b, t, rows) in [(2, 5, 1), (2, 5, 2), (1, 1, 1), (1, 70, 1)] {
        let (h, kvh, d) = (6, 2, 16);
        let qkv = random([b, t, (h + 2 * kvh) * d]);
        let [q, k, _] = split_qkv(&qkv, h, kvh, d);
        let cos = random([rows, 1, t, d / 2]).inner();
        let sin = random([rows, 1, t, d / 2]).inner();
        for half_split in [true, false] {
            for x in [q.clone().inner(), k.clone().inner()] {
                let got = FlexKernels::default()
                    .rope(&x, &cos, &sin, half_split)
                    .expect("f32 inputs of fitting shapes");
                let want = reference_rope(x, cos.clone(), sin.clone(), half_split);
                assert_eq!(
                    got.into_data().to_vec::<f32>().unwrap(),
                    want.into_data().to_vec::<f32>().unwrap(),
                    "b={b} t={t} rows={rows} half_split={half_split}"
                );
            }
        }
    }
    // Angles that do not fit are declined.
    let x = random([1, 2, 3, 8]).inner();
    let cos = random([1, 1, 4, 4]).inner();
    assert!(FlexKernels::default().rope(&x, &cos, &cos, true).is_none());
}
