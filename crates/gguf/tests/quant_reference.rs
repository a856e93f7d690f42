//! The block codecs against independent references.
//!
//! - `fixtures/quant_reference.bin` (written by `scripts/make_quant_fixtures.py`; provenance per
//!   record in `quant_reference.json`): decoded floats from gguf-py's numpy `dequantize`,
//!   cross-checked there against llama.cpp's `dequantize_row_*`; encoded bytes from llama.cpp's
//!   `quantize_row_*_ref` and `ggml_quantize_chunk` with an importance matrix (cross-checked
//!   against gguf-py's numpy quantizers where it has them). All comparisons are exact: floats bit
//!   for bit, blocks byte for byte.
//! - llama.cpp's `tests/test-quantize-fns.cpp`, mirrored: on its synthetic data the round-trip
//!   error and the dot-product error of every encodable type stay under its thresholds.

use std::collections::HashMap;

use kiln_gguf::GgmlType;
use kiln_gguf::blocks::{
    self, BlockError, DECODABLE, ENCODABLE, IMPORTANCE_WEIGHTED, dequantize_to_vec, quantize,
    quantize_weighted,
};

const FIXTURE: &[u8] = include_bytes!("fixtures/quant_reference.bin");
/// Elements per row of the encoding fixtures (`row_len` in the JSON manifest).
const ROW_LEN: usize = 512;

/// The fixture's records by name.
fn records() -> HashMap<String, &'static [u8]> {
    let mut out = HashMap::new();
    let (magic, mut rest) = FIXTURE.split_at(4);
    assert_eq!(magic, b"KQF1");
    while !rest.is_empty() {
        let name_len = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        let name = std::str::from_utf8(&rest[2..2 + name_len])
            .unwrap()
            .to_owned();
        rest = &rest[2 + name_len..];
        let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        out.insert(name, &rest[4..4 + len]);
        rest = &rest[4 + len..];
    }
    out
}

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// Index and values of the first differing block, for failure messages.
fn first_block_diff(ty: GgmlType, got: &[u8], want: &[u8]) -> String {
    let size = ty.type_size().unwrap();
    match got
        .chunks(size)
        .zip(want.chunks(size))
        .position(|(a, b)| a != b)
    {
        Some(i) => format!(
            "block {i} (row {}): got {:?}\nwant {:?}",
            i * ty.block_size() / ROW_LEN,
            &got[i * size..(i + 1) * size],
            &want[i * size..(i + 1) * size]
        ),
        None => format!("lengths {} vs {}", got.len(), want.len()),
    }
}

#[test]
fn dequantize_matches_gguf_py_and_llama_cpp_bit_for_bit() {
    let recs = records();
    let decoded: Vec<GgmlType> = DECODABLE
        .into_iter()
        .filter(|t| t.block_size() > 1)
        .collect();
    assert_eq!(decoded.len(), 13);
    for t in decoded {
        let data = recs[&format!("dequant/{}/data", t.name())];
        let want = floats(recs[&format!("dequant/{}/expected", t.name())]);
        let got = dequantize_to_vec(t, data, want.len()).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{t} element {i} (block {}): {g} vs {w}",
                i / t.block_size()
            );
        }
    }
}

#[test]
fn reference_quantize_matches_llama_cpp_byte_for_byte() {
    let recs = records();
    let x = floats(recs["quant/input"]);
    assert_eq!(x.len() % ROW_LEN, 0);
    let mut checked = Vec::new();
    for t in ENCODABLE {
        let Some(&want) = recs.get(&format!("quant/{}/rtn", t.name())) else {
            continue;
        };
        let got = quantize(t, &x).unwrap();
        assert!(got == want, "{t}: {}", first_block_diff(t, &got, want));
        // Without importance the weighted entry point is the reference quantizer.
        assert_eq!(quantize_weighted(t, &x, ROW_LEN, None).unwrap(), got, "{t}");
        checked.push(t.name());
    }
    // Every encodable type but F32 (trivial) has a reference.
    assert_eq!(checked.len(), ENCODABLE.len() - 1, "{checked:?}");
}

#[test]
fn weighted_quantize_matches_llama_cpp_byte_for_byte() {
    let recs = records();
    let x = floats(recs["quant/input"]);
    let w = floats(recs["quant/importance"]);
    assert_eq!(w.len(), ROW_LEN);
    for t in IMPORTANCE_WEIGHTED {
        let want = recs[&format!("quant/{}/weighted", t.name())];
        let got = quantize_weighted(t, &x, ROW_LEN, Some(&w)).unwrap();
        assert!(got == want, "{t}: {}", first_block_diff(t, &got, want));
    }
    // Types without a weighted search ignore the importance, as llama.cpp does.
    for t in [GgmlType::Q8_0, GgmlType::F16, GgmlType::Q8_K] {
        assert_eq!(
            quantize_weighted(t, &x, ROW_LEN, Some(&w)).unwrap(),
            quantize(t, &x).unwrap()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// test-quantize-fns.cpp

const MAX_QUANTIZATION_TOTAL_ERROR: f32 = 0.002;
const MAX_QUANTIZATION_TOTAL_ERROR_2BITS: f32 = 0.0075;
const MAX_QUANTIZATION_TOTAL_ERROR_3BITS: f32 = 0.0040;
const MAX_DOT_PRODUCT_ERROR: f32 = 0.02;
const MAX_DOT_PRODUCT_ERROR_LOWBIT: f32 = 0.04;
const TEST_SIZE: usize = 32 * 128;

/// `generate_data`: `0.1 + amplitude * cosf(i + offset)`, the sum in double.
fn generate_data(offset: f32, n: usize, amplitude: f32) -> Vec<f32> {
    (0..n)
        .map(|i| (0.1 + f64::from(amplitude * (i as f32 + offset).cos())) as f32)
        .collect()
}

/// `array_rmse`: `sqrt(Σ (a - b)²) / n` (sic: the root of the sum, divided by n).
fn array_rmse(a: &[f32], b: &[f32]) -> f32 {
    let sum: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = f64::from(x - y);
            d * d
        })
        .sum();
    (sum.sqrt() as f32) / a.len() as f32
}

/// `dot_product`: float products summed in double.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x * y))
        .sum::<f64>() as f32
}

fn round_trip(t: GgmlType, x: &[f32]) -> Vec<f32> {
    dequantize_to_vec(t, &quantize(t, x).unwrap(), x.len()).unwrap()
}

/// The type llama.cpp quantizes the other operand of a `t` dot product to (`vec_dot_type`;
/// Q8_1's values equal Q8_0's).
fn vec_dot_type(t: GgmlType) -> GgmlType {
    match t {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
            GgmlType::Q8_0
        }
        GgmlType::Q2_K
        | GgmlType::Q3_K
        | GgmlType::Q4_K
        | GgmlType::Q5_K
        | GgmlType::Q6_K
        | GgmlType::Q8_K => GgmlType::Q8_K,
        other => other,
    }
}

fn max_quantization_error(t: GgmlType) -> f32 {
    match t {
        GgmlType::Q2_K => MAX_QUANTIZATION_TOTAL_ERROR_2BITS,
        GgmlType::Q3_K => MAX_QUANTIZATION_TOTAL_ERROR_3BITS,
        _ => MAX_QUANTIZATION_TOTAL_ERROR,
    }
}

#[test]
fn quantization_error_within_llama_cpp_bounds() {
    let x = generate_data(0.0, TEST_SIZE, 2.0);
    let ones = vec![1.0f32; ROW_LEN];
    for t in ENCODABLE {
        let error = array_rmse(&x, &round_trip(t, &x));
        let bound = max_quantization_error(t);
        eprintln!("{t:>5} absolute quantization error: {error:.6} (< {bound})");
        assert!(error < bound, "{t}: {error} >= {bound}");
        // The weighted search (flat importance) does at least as well as the bound.
        if IMPORTANCE_WEIGHTED.contains(&t) {
            let q = quantize_weighted(t, &x, ROW_LEN, Some(&ones)).unwrap();
            let error = array_rmse(&x, &dequantize_to_vec(t, &q, x.len()).unwrap());
            eprintln!("{t:>5} weighted quantization error: {error:.6}");
            assert!(error < bound, "{t} weighted: {error} >= {bound}");
        }
    }
}

#[test]
fn dot_product_error_within_llama_cpp_bounds() {
    let x = generate_data(0.0, TEST_SIZE, 2.0);
    let y = generate_data(1.0, TEST_SIZE, 2.0);
    let reference = dot(&x, &y);
    for t in ENCODABLE {
        let qx = round_trip(t, &x);
        let qy = round_trip(vec_dot_type(t), &y);
        let result = qx
            .iter()
            .zip(&qy)
            .map(|(&a, &b)| f64::from(a) * f64::from(b))
            .sum::<f64>() as f32;
        let error = (result - reference).abs() / TEST_SIZE as f32;
        let bound = if t == GgmlType::Q2_K {
            MAX_DOT_PRODUCT_ERROR_LOWBIT
        } else {
            MAX_DOT_PRODUCT_ERROR
        };
        eprintln!("{t:>5} dot product error: {error:.6} (< {bound})");
        assert!(error < bound, "{t}: {error} >= {bound}");
    }
}

// ---------------------------------------------------------------------------------------------
// Properties and errors.

/// Cheap deterministic values (xorshift).
fn pseudo_random(n: usize, mut s: u64) -> impl Iterator<Item = u64> {
    (0..n).map(move |_| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    })
}

#[test]
fn hostile_values_never_panic() {
    // Random bit patterns: NaN, infinities, subnormals, huge and tiny values.
    let x: Vec<f32> = pseudo_random(4 * ROW_LEN, 7)
        .map(|v| f32::from_bits(v as u32))
        .collect();
    let w: Vec<f32> = pseudo_random(ROW_LEN, 11)
        .map(|v| f32::from_bits(v as u32))
        .collect();
    for t in ENCODABLE {
        let q = quantize(t, &x).unwrap();
        assert_eq!(q.len(), x.len() / t.block_size() * t.type_size().unwrap());
        dequantize_to_vec(t, &q, x.len()).unwrap();
        let q = quantize_weighted(t, &x, ROW_LEN, Some(&w)).unwrap();
        dequantize_to_vec(t, &q, x.len()).unwrap();
    }
    // Random block bytes decode (to whatever floats) for every decodable type.
    for t in DECODABLE {
        let n = 4 * 256;
        let bytes: Vec<u8> = pseudo_random(n / t.block_size() * t.type_size().unwrap(), 3)
            .map(|v| v as u8)
            .collect();
        assert_eq!(dequantize_to_vec(t, &bytes, n).unwrap().len(), n);
    }
}

#[test]
fn length_errors_are_typed() {
    let x = vec![0.5f32; 768];
    for t in [
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q8_K,
    ] {
        // 288 elements: whole 32-element blocks but not whole super-blocks.
        assert!(matches!(
            quantize(t, &x[..288]),
            Err(BlockError::PartialBlock {
                n_elements: 288,
                block: 256,
                ..
            })
        ));
        assert!(matches!(
            dequantize_to_vec(t, &vec![0; t.type_size().unwrap()], 288),
            Err(BlockError::PartialBlock { block: 256, .. })
        ));
        let one = t.type_size().unwrap();
        assert!(matches!(
            dequantize_to_vec(t, &vec![0; one + 1], 256),
            Err(BlockError::WrongLength { expected, found, .. }) if expected == one && found == one + 1
        ));
        // Row lengths: not whole super-blocks, zero, or not dividing the values.
        for row_len in [288, 0, 512] {
            let e = quantize_weighted(t, &x, row_len, None).unwrap_err();
            assert!(
                matches!(
                    e,
                    BlockError::BadRowLength {
                        n_elements: 768,
                        block: 256,
                        ..
                    }
                ),
                "{t} {row_len}: {e}"
            );
        }
        assert_eq!(
            quantize_weighted(t, &x, 256, Some(&[1.0; 255])).unwrap_err(),
            BlockError::ImportanceLength {
                expected: 256,
                found: 255
            }
        );
        assert!(quantize_weighted(t, &x, 768, Some(&[1.0; 768])).is_ok());
        assert_eq!(quantize(t, &[]).unwrap(), Vec::<u8>::new());
    }
    let e = quantize_weighted(GgmlType::Q4_0, &x, 48, None).unwrap_err();
    assert_eq!(
        e.to_string(),
        "row length 48 must be a positive multiple of the 32-element Q4_0 block \
         that divides the 768 elements"
    );
    for t in [GgmlType::IQ2_XXS, GgmlType::IQ4_NL, GgmlType::IQ1_M] {
        assert!(matches!(
            quantize_weighted(t, &x, 256, None),
            Err(BlockError::Unsupported { op: "encoding", .. })
        ));
    }
    for t in [GgmlType::IQ2_XXS, GgmlType::IQ3_S, GgmlType::Q8_1] {
        assert!(matches!(
            blocks::dequantize_to_vec(t, &[], 0),
            Err(BlockError::Unsupported { op: "decoding", .. })
        ));
    }
}

#[test]
fn round_trip_recovers_representable_blocks() {
    // Values already on a Q8_K grid survive Q8_K exactly; Q6_K / Q5_K / Q4_K get close.
    let x: Vec<f32> = (0..512)
        .map(|i| ((i * 37 % 255) as f32 - 127.0) / 64.0)
        .collect();
    assert_eq!(round_trip(GgmlType::Q8_K, &x), x);
    for (t, tol) in [
        // Half a quantization step of a 16- or 32-element sub-block spanning [-2, 2), plus slack
        // for the 6-bit sub-block scales.
        (GgmlType::Q6_K, 0.04),
        (GgmlType::Q5_K, 0.08),
        (GgmlType::Q4_K, 0.16),
    ] {
        let back = round_trip(t, &x);
        let worst = x
            .iter()
            .zip(&back)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < tol, "{t}: {worst}");
    }
    // Zeros stay zeros for every type.
    for t in ENCODABLE {
        assert!(round_trip(t, &[0.0; 512]).iter().all(|&v| v == 0.0), "{t}");
    }
}

#[test]
fn importance_steers_the_weighted_search() {
    // Weighting the first half of each sub-block heavily lowers its error there.
    let x = generate_data(0.5, 4 * ROW_LEN, 1.0);
    let w: Vec<f32> = (0..ROW_LEN)
        .map(|i| if i % 32 < 16 { 100.0 } else { 0.01 })
        .collect();
    let weighted_err = |q: &[u8], t: GgmlType| {
        let back = dequantize_to_vec(t, q, x.len()).unwrap();
        x.iter()
            .zip(&back)
            .enumerate()
            .map(|(i, (a, b))| f64::from(w[i % ROW_LEN]) * f64::from(a - b).powi(2))
            .sum::<f64>()
    };
    for t in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q4_K,
        GgmlType::Q3_K,
    ] {
        let plain = weighted_err(&quantize(t, &x).unwrap(), t);
        let steered = weighted_err(&quantize_weighted(t, &x, ROW_LEN, Some(&w)).unwrap(), t);
        eprintln!("{t}: weighted error {plain:.4} -> {steered:.4}");
        assert!(steered < plain, "{t}: {steered} >= {plain}");
    }
}
