//! GPTQ on SmolLM2-135M's real weights and calibration statistics (`../shared`; 1536 calibration
//! tokens, which pin down the 576-input layers tested here — `ffn_down`'s 1536 inputs want more,
//! docs/quantize.md): on held-out text,
//! the layer output error `tr(ΔW·H·ΔWᵀ)` of GPTQ is well below round to nearest's (Q4_0, Q5_0).

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use kiln_gguf::blocks::{dequantize_to_vec, quantize};
use kiln_gguf::{GgmlType, GgufFile};
use kiln_quantize::collect_hessians;
use kiln_quantize::gptq::{self, GptqSettings};

/// `../shared/<rel>`, or `None` when it is missing (an error under `KILN_REQUIRE_SHARED=1`).
fn shared(rel: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared")
        .join(rel);
    if p.exists() {
        return Some(p);
    }
    assert!(
        std::env::var("KILN_REQUIRE_SHARED").as_deref() != Ok("1"),
        "{} missing",
        p.display()
    );
    eprintln!("note: {} missing; skipping", p.display());
    None
}

/// `Σ_rows Δ·H·Δᵀ` for `Δ = w − q` (`rows × cols`), `h` dense `cols × cols`.
fn output_error(w: &[f32], q: &[f32], cols: usize, h: &[f64]) -> f64 {
    w.chunks(cols)
        .zip(q.chunks(cols))
        .map(|(wr, qr)| {
            let d: Vec<f64> = wr.iter().zip(qr).map(|(a, b)| f64::from(a - b)).collect();
            h.chunks(cols)
                .zip(&d)
                .map(|(hrow, di)| di * hrow.iter().zip(&d).map(|(a, b)| a * b).sum::<f64>())
                .sum::<f64>()
        })
        .sum()
}

#[test]
fn gptq_lowers_held_out_layer_error_on_real_weights() {
    let (Some(model), Some(valid), Some(test)) = (
        shared("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
        shared("data/wikitext-2/valid.txt"),
        shared("data/wikitext-2/test.txt"),
    ) else {
        return;
    };
    let mut loaded = kiln_transformer::load_gguf::<Flex>(&model, &Default::default()).unwrap();
    // The first 16 blocks: a layer's inputs do not depend on the blocks after it, and the
    // calibration forward pass costs half as much.
    loaded.model.blocks.truncate(16);
    let tokenizer = loaded.tokenizer.clone().unwrap();
    let calibration = tokenizer.encode(&std::fs::read_to_string(valid).unwrap());
    let held_out = tokenizer.encode(&std::fs::read_to_string(test).unwrap());
    let fit = collect_hessians(&mut loaded.model, &calibration[..1536], 512, |_, _| {}).unwrap();
    let check = collect_hessians(&mut loaded.model, &held_out[..512], 512, |_, _| {}).unwrap();
    let file = GgufFile::open(&model).unwrap();
    for name in [
        "blk.0.attn_q.weight",
        "blk.8.attn_output.weight",
        "blk.15.ffn_up.weight",
    ] {
        let info = file.tensor(name).unwrap();
        let (cols, n) = (info.dims[0] as usize, info.n_elements() as usize);
        let w = dequantize_to_vec(info.ty, file.tensor_data(info), n).unwrap();
        let h = check[name].to_dense();
        assert_eq!(fit[name].rows(), 1536);
        // Not Q4_1: the source weights are Q4_1, which round to nearest reproduces exactly.
        for ty in [GgmlType::Q4_0, GgmlType::Q5_0] {
            let rtn = dequantize_to_vec(ty, &quantize(ty, &w).unwrap(), n).unwrap();
            let bytes =
                gptq::quantize(ty, &w, n / cols, cols, &fit[name], &GptqSettings::default())
                    .unwrap();
            let g = dequantize_to_vec(ty, &bytes, n).unwrap();
            let ratio = output_error(&w, &g, cols, &h) / output_error(&w, &rtn, cols, &h);
            eprintln!(
                "{name} {}: held-out output error GPTQ / RTN = {ratio:.3}",
                ty.name()
            );
            assert!(ratio < 0.7, "{name} {}: ratio {ratio}", ty.name());
        }
    }
}
