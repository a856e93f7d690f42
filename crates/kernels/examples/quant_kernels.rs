//! Times [`QuantMatrix::matmul_q8`] on SmolLM2-135M's weight shapes (`[out, in]`: 576×576,
//! 1536×576, 576×1536, 49152×576) for one input row (decoding) and 128 (prefill), in `Q4_0`,
//! `Q4_1`, `Q8_0`, `Q5_0` and `Q4_K` (transcoded at load into 6-bit blocks with f32 scales; only
//! the 1536-wide shape, since 256 does not divide 576), with each x86-64 kernel this CPU runs (AVX2, and AVX-512 VNNI where it
//! has it), and prints the rate in GOPS (2 operations per weight per input row) and the
//! VNNI / AVX2 ratio. Each kernel runs in child processes of this program with
//! `KILN_QUANT_KERNEL` set, since the kernel is chosen once per process; the best of 3 runs per
//! kernel, alternating, is shown. `RAYON_NUM_THREADS` sets the threads.
//!
//! ```text
//! cargo run --release -p kiln-kernels --example quant_kernels
//! ```

use std::collections::BTreeMap;
use std::error::Error;
use std::process::Command;
use std::time::{Duration, Instant};

use half::f16;
use kiln_gguf::GgmlType;
use kiln_kernels::{Q8Rows, QuantMatrix};

/// SmolLM2-135M's matrices, `(rows = out, cols = in)`.
const SHAPES: [(usize, usize); 4] = [(576, 576), (1536, 576), (576, 1536), (49152, 576)];
/// Input rows: decoding, prefill.
const INPUT_ROWS: [usize; 2] = [1, 128];
const TYPES: [GgmlType; 5] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q8_0,
    GgmlType::Q5_0,
    GgmlType::Q4_K,
];
/// Runs of each kernel, alternating.
const ROUNDS: usize = 3;
/// Argument that makes this program time the kernel its environment selects and print results.
const CHILD: &str = "--child";

fn main() -> Result<(), Box<dyn Error>> {
    if std::env::args().nth(1).as_deref() == Some(CHILD) {
        return child();
    }
    let cpu = kiln_kernels::cpu_description();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("CPU: {cpu}");
    println!(
        "threads: {}, load average: {}",
        rayon::current_num_threads(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let kernels = kernels();
    // Best rate per kernel and case over a few rounds that alternate the kernels, so that a burst
    // of other work on the machine slows one round of each, not all of one kernel's.
    let mut results: Vec<BTreeMap<String, f64>> = vec![BTreeMap::new(); kernels.len()];
    for _ in 0..ROUNDS {
        for (kernel, best) in kernels.iter().zip(&mut results) {
            let out = Command::new(std::env::current_exe()?)
                .arg(CHILD)
                .env("KILN_QUANT_KERNEL", kernel)
                .output()?;
            if !out.status.success() {
                return Err(format!(
                    "{kernel} run failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
                .into());
            }
            for line in String::from_utf8(out.stdout)?.lines() {
                if let Some((case, gops)) = line.rsplit_once(' ') {
                    let gops: f64 = gops.parse()?;
                    let b = best.entry(case.to_owned()).or_insert(0.0);
                    *b = b.max(gops);
                }
            }
        }
    }
    print!("{:<12} {:<5} {:>5}", "shape", "type", "rows");
    for kernel in &kernels {
        print!(" {:>10}", format!("{kernel} GOPS"));
    }
    if kernels.len() == 2 {
        print!(" {:>10}", format!("{}/{}", kernels[1], kernels[0]));
    }
    println!();
    for (rows, cols) in SHAPES {
        for ty in TYPES.into_iter().filter(|t| fits(*t, cols)) {
            for n in INPUT_ROWS {
                let case = case_name(rows, cols, ty, n);
                print!(
                    "{:<12} {:<5} {n:>5}",
                    format!("{rows}x{cols}"),
                    ty.to_string()
                );
                let gops: Vec<f64> = results.iter().map(|r| r[&case]).collect();
                for g in &gops {
                    print!(" {g:>10.1}");
                }
                if let [a, b] = gops[..] {
                    print!(" {:>10.2}", b / a);
                }
                println!();
            }
        }
    }
    Ok(())
}

/// The kernels to compare on this CPU (as `KILN_QUANT_KERNEL` names them).
fn kernels() -> Vec<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2") && has!("fma") && has!("f16c") {
            let mut k = vec!["avx2"];
            if has!("avx512vnni") && has!("avx512vl") && has!("avx512bw") {
                k.push("vnni");
            }
            return k;
        }
    }
    vec!["auto"]
}

fn case_name(rows: usize, cols: usize, ty: GgmlType, n: usize) -> String {
    format!("{rows}x{cols} {ty} {n}")
}

/// Times every case with the kernel the environment selects; prints `case gops` lines.
fn child() -> Result<(), Box<dyn Error>> {
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    for (rows, cols) in SHAPES {
        for ty in TYPES.into_iter().filter(|t| fits(*t, cols)) {
            let w = QuantMatrix::from_vec(ty, rows, cols, blocks(ty, rows * cols, &mut seed))?;
            for n in INPUT_ROWS {
                let x: Vec<f32> = (0..n * cols)
                    .map(|_| (next(&mut seed) % 2001) as f32 / 1000.0 - 1.0)
                    .collect();
                let x = Q8Rows::quantize(&x, n, cols)?;
                let mut out = vec![0f32; n * rows];
                let secs = best_time(|| w.matmul_q8(&x, &mut out, rows, 0))?;
                let gops = 2.0 * (rows * cols * n) as f64 / secs / 1e9;
                println!("{} {gops}", case_name(rows, cols, ty, n));
            }
        }
    }
    Ok(())
}

/// Seconds per call of `f`: the best mean of 5 batches of at least 50 ms each.
fn best_time<E>(mut f: impl FnMut() -> Result<(), E>) -> Result<f64, E> {
    f()?;
    let start = Instant::now();
    f()?;
    let once = start.elapsed().max(Duration::from_micros(1));
    let reps = (Duration::from_millis(50).as_secs_f64() / once.as_secs_f64()).ceil() as usize;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let start = Instant::now();
        for _ in 0..reps {
            f()?;
        }
        best = best.min(start.elapsed().as_secs_f64() / reps as f64);
    }
    Ok(best)
}

/// xorshift64.
fn next(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// Whether rows of `cols` values are whole blocks of `ty`.
fn fits(ty: GgmlType, cols: usize) -> bool {
    cols.is_multiple_of(ty.block_size())
}

/// `values` in blocks of type `ty` with random quantized values (and `Q4_K`'s sub-block scales)
/// and small scales.
fn blocks(ty: GgmlType, values: usize, seed: &mut u64) -> Vec<u8> {
    let bs = ty.type_size().unwrap_or(0);
    let mut out = Vec::with_capacity(values / ty.block_size() * bs);
    for _ in 0..values / ty.block_size() {
        let at = out.len();
        out.extend((0..bs).map(|_| next(seed) as u8));
        out[at..at + 2].copy_from_slice(&f16::from_f32(0.01).to_le_bytes());
        match ty {
            GgmlType::Q4_1 => {
                out[at + 2..at + 4].copy_from_slice(&f16::from_f32(-0.05).to_le_bytes())
            }
            // `dmin`.
            GgmlType::Q4_K => {
                out[at + 2..at + 4].copy_from_slice(&f16::from_f32(0.003).to_le_bytes())
            }
            _ => {}
        }
    }
    out
}
