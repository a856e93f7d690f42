//! GFLOP/s of Kiln's host products (`kiln_kernels::gemm`, f32 and bf16 multiplications) beside the
//! `gemm` crate's f32 product (what Burn's Flex backend calls), on the shapes of one training step
//! of the 6×384 and 4×128 Shakespeare models: each linear layer's forward product `X·W` and its
//! two backward products `dY·Wᵀ` and `Xᵀ·dY`. Then reference rows, left out of the steps' total:
//! a 2048-square product (the large-matrix rate the small products are compared with), and on one
//! thread a 1024-square product beside one block of the fused causal attention.
//!
//! ```text
//! cargo run --release -p kiln-kernels --features flex --example matmul_speed
//! ```

use std::time::Instant;

use kiln_kernels::gemm::{MatRef, Products, available, matmul};

/// (label, m, k, n, A, A's row and column strides, B, B's row and column strides).
type Product<'a> = (
    &'static str,
    usize,
    usize,
    usize,
    &'a [f32],
    (usize, usize),
    &'a [f32],
    (usize, usize),
);

fn values(len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect()
}

/// Median seconds of `f` over enough runs to fill ~0.3 s.
fn time(mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    f();
    let once = start.elapsed().as_secs_f64().max(1e-6);
    let runs = ((0.3 / once) as usize).clamp(3, 200);
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[runs / 2]
}

/// The `gemm` crate's `C = A·B` on row-major operands (A `m×k` with strides `a_rs`, `a_cs`).
#[allow(clippy::too_many_arguments)]
fn crate_gemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    a_rs: isize,
    a_cs: isize,
    b: &[f32],
    b_rs: isize,
    b_cs: isize,
    c: &mut [f32],
) {
    // SAFETY: the strides describe `m×k`, `k×n` and `m×n` matrices inside the slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        )
    }
}

fn main() {
    let cpu = kiln_kernels::cpu_description();
    println!(
        "CPU: {cpu}, {} threads; bf16 products: {}",
        rayon::current_num_threads(),
        available(Products::Bf16)
    );
    println!(
        "{:<34} {:>10} {:>10} {:>10} {:>8} {:>8}",
        "product (m×k×n)", "gemm f32", "kiln f32", "kiln bf16", "f32/gemm", "bf16/gemm"
    );
    // (rows = batch·context, d_in, d_out) of each linear layer.
    let layers = [
        ("6x384 qkv", 2048, 384, 1152),
        ("6x384 proj", 2048, 384, 384),
        ("6x384 fc", 2048, 384, 1536),
        ("6x384 fc-proj", 2048, 1536, 384),
        ("4x128 qkv", 768, 128, 384),
        ("4x128 fc", 768, 128, 512),
        ("4x128 fc-proj", 768, 512, 128),
    ];
    let mut totals = [0.0f64; 3];
    for (name, rows, d_in, d_out) in layers {
        for (t, total) in measure_layer(name, rows, d_in, d_out)
            .iter()
            .zip(&mut totals)
        {
            *total += t;
        }
    }
    // The large-matrix rate the small products compare with, then one block of the fused causal
    // attention (64 queries × 64 head dims against 256 keys) on one thread, as the kernel runs it
    // (one task per batch row and KV head), beside a one-thread square product.
    measure_layer("ref square", 2048, 2048, 2048);
    let one_thread = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("a one-thread pool");
    one_thread.install(|| {
        measure_layer("ref square, 1 thread", 1024, 1024, 1024);
        measure_layer("attn block, 1 thread", 64, 64, 256);
    });
    println!(
        "all products of the two steps: gemm {:.1} ms, kiln f32 {:.1} ms ({:.2}x), kiln bf16 {:.1} ms ({:.2}x)",
        totals[0] * 1e3,
        totals[1] * 1e3,
        totals[0] / totals[1],
        totals[2] * 1e3,
        totals[0] / totals[2]
    );
}

/// Times a linear layer's three products (`X·W`, `dY·Wᵀ`, `Xᵀ·dY`) with the `gemm` crate, Kiln's
/// f32 and Kiln's bf16 products, prints a row each, and returns the three summed times (seconds).
fn measure_layer(name: &str, rows: usize, d_in: usize, d_out: usize) -> [f64; 3] {
    let mut times = [0.0f64; 3];
    let x = values(rows * d_in);
    let w = values(d_in * d_out);
    let dy = values(rows * d_out);
    let products: [Product; 3] = [
        ("X·W", rows, d_in, d_out, &x, (d_in, 1), &w, (d_out, 1)),
        ("dY·Wᵀ", rows, d_out, d_in, &dy, (d_out, 1), &w, (1, d_out)),
        ("Xᵀ·dY", d_in, rows, d_out, &x, (1, d_in), &dy, (d_out, 1)),
    ];
    for (label, m, k, n, a, (ars, acs), b, (brs, bcs)) in products {
        let flops = 2.0 * (m * k * n) as f64;
        let mut c = vec![0f32; m * n];
        let t_crate = time(|| {
            crate_gemm(
                m,
                k,
                n,
                a,
                ars as isize,
                acs as isize,
                b,
                brs as isize,
                bcs as isize,
                &mut c,
            )
        });
        let am = MatRef::new(a, 0, m, k, ars, acs).expect("shape");
        let bm = MatRef::new(b, 0, k, n, brs, bcs).expect("shape");
        let mut run = |p: Products| {
            if available(p) {
                time(|| matmul(am, bm, &mut c, false, p).expect("matmul"))
            } else {
                f64::NAN
            }
        };
        let (t32, t16) = (run(Products::F32), run(Products::Bf16));
        times[0] += t_crate;
        times[1] += t32;
        times[2] += t16;
        println!(
            "{:<34} {:>10.1} {:>10.1} {:>10.1} {:>7.2}x {:>7.2}x",
            format!("{name} {label} {m}×{k}×{n}"),
            flops / t_crate / 1e9,
            flops / t32 / 1e9,
            flops / t16 / 1e9,
            t_crate / t32,
            t_crate / t16
        );
    }
    times
}
