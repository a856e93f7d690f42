//! `kiln quantize` and `kiln eval --perplexity` on SmolLM2-135M (`../shared`), against llama.cpp
//! where it is installed.
//!
//! The reference is the shared Q4_1 model dequantized to f32 (`kiln quantize --type f32`); every
//! quantized file is made from it. With llama.cpp (`KILN_LLAMA_PYTHON`, or a `python3` that imports
//! `llama_cpp`; pip's llama-cpp-python builds it, which is too slow for CI, so these parts are
//! skipped with a note where it is missing):
//! - `llama-quantize` on the same reference writes the same tensor types and the same bytes;
//! - llama.cpp runs Kiln's files with Kiln's greedy tokens and top-1 at ≥ 95% of positions;
//! - llama.cpp's perplexity of the same file and windows equals `kiln eval --perplexity`'s.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use kiln::gguf::GgufFile;
use kiln::transformer::{Transformer, load_gguf_quantized, load_model};

type B = Flex;

const MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
const WIKITEXT: &str = "data/wikitext-2/test.txt";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A Python that imports `llama_cpp`, if there is one (never required: see the module docs).
fn llama_python() -> Option<String> {
    let python = std::env::var("KILN_LLAMA_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let ok = Command::new(&python)
        .args(["-c", "import llama_cpp"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("note: no python with llama_cpp (set KILN_LLAMA_PYTHON); skipping llama.cpp");
    }
    ok.then_some(python)
}

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("kiln runs")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The f32 reference, made once per test binary.
fn reference() -> Option<&'static Path> {
    static REFERENCE: OnceLock<Option<(tempfile::TempDir, PathBuf)>> = OnceLock::new();
    REFERENCE
        .get_or_init(|| {
            let model = common::shared(MODEL)?;
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("reference-f32.gguf");
            common::run_kiln(&[
                "quantize",
                "--model",
                p(&model),
                "--type",
                "f32",
                "--output",
                p(&out),
            ]);
            Some((dir, out))
        })
        .as_ref()
        .map(|(_, path)| path.as_path())
}

fn quantize(reference: &Path, scheme: &str, out: &Path, extra: &[&str]) {
    let mut args = vec![
        "quantize",
        "--model",
        p(reference),
        "--type",
        scheme,
        "--output",
        p(out),
    ];
    args.extend_from_slice(extra);
    common::run_kiln(&args);
}

/// `kiln eval --perplexity` on the first `chunks` windows of 512 tokens of WikiText-2's test set.
fn kiln_perplexity(model: &Path, chunks: usize) -> f64 {
    let wiki = common::shared(WIKITEXT).unwrap();
    let chunks = chunks.to_string();
    let out = kiln(&[
        "eval",
        "--model",
        p(model),
        "--perplexity",
        p(&wiki),
        "--chunks",
        &chunks,
    ]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    let ppl = t
        .split_whitespace()
        .skip_while(|w| *w != "perplexity")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no perplexity in {t}"));
    eprintln!("kiln {}: {}", model.display(), t.trim());
    ppl
}

#[test]
fn kiln_quantize_writes_what_llama_quantize_writes() {
    let Some(reference) = reference() else { return };
    let Some(python) = llama_python() else { return };
    let dir = tempfile::tempdir().unwrap();
    for scheme in ["q8_0", "q4_0", "q5_1", "q6_k", "q4_k_m"] {
        let ours = dir.path().join(format!("kiln-{scheme}.gguf"));
        let theirs = dir.path().join(format!("llama-{scheme}.gguf"));
        quantize(reference, scheme, &ours, &[]);
        let out = Command::new(&python)
            .arg(root().join("scripts/llama_cpp_quantize.py"))
            .args([p(reference), p(&theirs), scheme])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let (a, b) = (
            GgufFile::open(&ours).unwrap(),
            GgufFile::open(&theirs).unwrap(),
        );
        assert_eq!(a.tensors.len(), b.tensors.len(), "{scheme}");
        for ta in &a.tensors {
            let tb = b
                .tensor(&ta.name)
                .unwrap_or_else(|| panic!("{scheme}: {}", ta.name));
            assert_eq!(
                (ta.ty, &ta.dims),
                (tb.ty, &tb.dims),
                "{scheme}: {}",
                ta.name
            );
            assert!(
                a.tensor_data(ta) == b.tensor_data(tb),
                "{scheme}: {} ({}) bytes differ from llama-quantize's",
                ta.name,
                ta.ty.name()
            );
        }
        assert_eq!(
            a.get_u32("general.file_type").unwrap(),
            b.get_u32("general.file_type").unwrap()
        );
    }
}

/// Kiln's top-1 token at every position of each prompt, and its greedy continuation of the first.
fn kiln_reference(model: &Transformer<B>, prompts: &[Vec<u32>], steps: usize) -> serde_json::Value {
    let device = Default::default();
    let argmax = |row: &[f32]| {
        row.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as u32)
            .unwrap()
    };
    let logits = |ids: &[u32]| -> Vec<Vec<f32>> {
        let data: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
        let input = Tensor::<B, 2, Int>::from_data(TensorData::new(data, [1, ids.len()]), &device);
        let flat: Vec<f32> = model
            .forward(input)
            .unwrap()
            .into_data()
            .convert::<f32>()
            .into_vec()
            .unwrap();
        flat.chunks(model.config().vocab_size)
            .map(<[f32]>::to_vec)
            .collect()
    };
    let top1: Vec<Vec<u32>> = prompts
        .iter()
        .map(|ids| logits(ids).iter().map(|r| argmax(r)).collect())
        .collect();
    let mut ids = prompts[0].clone();
    let mut greedy = Vec::new();
    for _ in 0..steps {
        let next = argmax(logits(&ids).last().unwrap());
        greedy.push(next);
        ids.push(next);
    }
    serde_json::json!({"prompts": prompts, "top1": top1, "greedy": greedy})
}

fn prompts() -> Vec<Vec<u32>> {
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap() as u32)
            .collect()
    };
    let golden = common::shared("models/SmolLM2-135M-Instruct.Q4_1.golden.json").unwrap();
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden).unwrap()).unwrap();
    let mut all = vec![ids(&golden)];
    let more = std::fs::read_to_string(
        root().join("crates/transformer/tests/data/smollm2_reference.jsonl"),
    )
    .unwrap();
    all.extend(
        more.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| ids(&serde_json::from_str(l).unwrap())),
    );
    all
}

/// llama.cpp's top-1 agreement with Kiln and whether its greedy tokens equal Kiln's, on `file`.
fn llama_cpp_agreement(
    python: &str,
    file: &Path,
    native: bool,
    prompts: &[Vec<u32>],
    dir: &Path,
) -> (f64, bool) {
    let model = if native {
        load_gguf_quantized::<B>(file, &Default::default())
    } else {
        load_model::<B>(file, &Default::default())
    }
    .unwrap()
    .model;
    let reference_json = dir.join("reference.json");
    std::fs::write(
        &reference_json,
        kiln_reference(&model, prompts, 16).to_string(),
    )
    .unwrap();
    let out = Command::new(python)
        .arg(root().join("scripts/llama_cpp_agreement.py"))
        .args([p(file), p(&reference_json)])
        .output()
        .unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    eprintln!("{}: {t}", file.display());
    let agreement = t
        .split_whitespace()
        .find_map(|w| w.strip_prefix("agreement="))
        .and_then(|v| v.split_once('/'))
        .map(|(a, n)| a.parse::<f64>().unwrap() / n.parse::<f64>().unwrap())
        .unwrap();
    (agreement, t.contains("greedy_equal=true"))
}

/// llama.cpp runs Kiln's files with Kiln's greedy tokens and top-1 at ≥ 95% of the positions of
/// the golden and reference prompts.
///
/// Kiln's f32 path computes with the weights dequantized to f32; llama.cpp's CPU kernels for the 4- and
/// 5-bit legacy types also round the *activations* to 8 bits (Q8_0/Q8_1 blocks), which moves
/// SmolLM2's near-tied logits (against Kiln's f32 path: q4_0 42/45 positions, q5_1 41/45, and the
/// golden prompt's first token is a 0.09-logit tie). For those types the file itself is checked:
/// llama.cpp given the same weights in f32 (`kiln quantize -t f32` of Kiln's file) gives Kiln's
/// tokens; and q4_0 run from its blocks, with 8-bit activations as llama.cpp's, agrees at ≥ 95%.
#[test]
fn llama_cpp_runs_kilns_files_like_kiln() {
    let Some(reference) = reference() else { return };
    let Some(python) = llama_python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let prompts = prompts();
    for scheme in ["q8_0", "q4_k_m", "q4_0", "q5_1"] {
        let file = dir.path().join(format!("{scheme}.gguf"));
        quantize(reference, scheme, &file, &[]);
        let (agreement, greedy_equal) =
            llama_cpp_agreement(&python, &file, false, &prompts, dir.path());
        if scheme == "q4_0" {
            // Run from its blocks with 8-bit activations (f16 block scales) and keys and values
            // rounded to f16, as llama.cpp runs it with its default F16 KV cache: 44/45 positions
            // and the same greedy tokens (2026-12-03; the miss is a 0.035-logit tie). With f32
            // keys and values it was 42/45 (misses at llama.cpp's gaps 0.035, 0.094 and 0.55).
            let (native, greedy_equal) =
                llama_cpp_agreement(&python, &file, true, &prompts, dir.path());
            assert!(
                native >= 0.95,
                "{scheme} from its blocks: top-1 agreement {native}"
            );
            assert!(
                greedy_equal,
                "{scheme} from its blocks: greedy tokens differ"
            );
        }
        if matches!(scheme, "q8_0" | "q4_k_m") {
            assert!(agreement >= 0.95, "{scheme}: top-1 agreement {agreement}");
            assert!(
                greedy_equal,
                "{scheme}: llama.cpp's greedy tokens differ from Kiln's"
            );
        } else {
            let dequantized = dir.path().join(format!("{scheme}-f32.gguf"));
            quantize(&file, "f32", &dequantized, &[]);
            let (agreement, greedy_equal) =
                llama_cpp_agreement(&python, &dequantized, false, &prompts, dir.path());
            assert!(
                agreement >= 0.95,
                "{scheme} as f32: top-1 agreement {agreement}"
            );
            assert!(greedy_equal, "{scheme} as f32: greedy tokens differ");
        }
    }
}

#[test]
fn perplexity_follows_llama_cpps_protocol() {
    let Some(reference) = reference() else { return };
    let wiki = common::shared(WIKITEXT).unwrap();
    let ours = kiln_perplexity(reference, 2);

    // The protocol written out again: two windows of 512 tokens, each scored on tokens 257..511
    // from the logits at 256..510, in f64.
    let loaded = load_model::<B>(reference, &Default::default()).unwrap();
    let tokens = loaded
        .tokenizer
        .as_ref()
        .unwrap()
        .encode(&std::fs::read_to_string(&wiki).unwrap());
    let (mut nll, mut count) = (0.0f64, 0usize);
    for w in 0..2 {
        let window = &tokens[w * 512..(w + 1) * 512];
        let data: Vec<i64> = window.iter().map(|&t| i64::from(t)).collect();
        let input =
            Tensor::<B, 2, Int>::from_data(TensorData::new(data, [1, 512]), &Default::default());
        let logits: Vec<f32> = loaded
            .model
            .forward(input)
            .unwrap()
            .into_data()
            .convert::<f32>()
            .into_vec()
            .unwrap();
        let vocab = loaded.model.config().vocab_size;
        for pos in 256..511 {
            let row = &logits[pos * vocab..(pos + 1) * vocab];
            let max = row.iter().copied().fold(f32::MIN, f32::max) as f64;
            let z: f64 = row
                .iter()
                .map(|&l| (l as f64 - max).exp())
                .sum::<f64>()
                .ln()
                + max;
            nll += z - row[window[pos + 1] as usize] as f64;
            count += 1;
        }
    }
    let expected = (nll / count as f64).exp();
    assert!(
        (ours - expected).abs() < 1e-3,
        "kiln eval says {ours}, the protocol written out gives {expected}"
    );

    let Some(python) = llama_python() else { return };
    let out = Command::new(&python)
        .arg(root().join("scripts/llama_cpp_perplexity.py"))
        .args([p(reference), p(&wiki), "--chunks", "2"])
        .output()
        .unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    let theirs: f64 = t
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ppl="))
        .and_then(|v| v.parse().ok())
        .unwrap();
    eprintln!("llama.cpp: {}", t.trim());
    assert!(
        (ours - theirs).abs() < 0.02,
        "kiln {ours} vs llama.cpp {theirs} on the same f32 file and windows"
    );
}

/// GPTQ through the CLI: every attention and MLP weight is chosen by GPTQ, and the model stays as
/// good as round to nearest's within noise (which is better is measured on many more windows by
/// `examples/quantize_quality.rs`, docs/quantize.md; the layer-level gain is tested in
/// kiln-quantize's `gptq_real`).
#[test]
fn gptq_through_the_cli() {
    let Some(reference) = reference() else { return };
    let valid = common::shared("data/wikitext-2/valid.txt").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (rtn, gptq) = (dir.path().join("rtn.gguf"), dir.path().join("gptq.gguf"));
    quantize(reference, "q4_0", &rtn, &[]);
    let out = kiln(&[
        "quantize",
        "--model",
        p(reference),
        "--type",
        "q4_0",
        "--output",
        p(&gptq),
        "--calibration",
        p(&valid),
        "--calibration-tokens",
        "512",
    ]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("210 by GPTQ"), "{t}");
    let gptq_file = GgufFile::open(&gptq).unwrap();
    let rtn_file = GgufFile::open(&rtn).unwrap();
    for info in &gptq_file.tensors {
        let other = rtn_file.tensor(&info.name).unwrap();
        assert_eq!(info.ty, other.ty, "{}", info.name);
        let same = gptq_file.tensor_data(info) == rtn_file.tensor_data(other);
        let linear = info.name.starts_with("blk.") && info.dims.len() == 2;
        assert_eq!(
            same, !linear,
            "{}: GPTQ changed exactly the linear weights",
            info.name
        );
    }
    let (rtn_ppl, gptq_ppl) = (kiln_perplexity(&rtn, 2), kiln_perplexity(&gptq, 2));
    assert!(
        (gptq_ppl / rtn_ppl - 1.0).abs() < 0.15,
        "GPTQ q4_0 {gptq_ppl} vs round to nearest {rtn_ppl}"
    );
}

#[test]
fn bad_input_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.gguf");
    let not_gguf = dir.path().join("model.txt");
    std::fs::write(&not_gguf, "not a model").unwrap();

    let unknown = kiln(&[
        "quantize",
        "--model",
        p(&not_gguf),
        "--type",
        "q3_k_xl",
        "--output",
        p(&out),
    ]);
    assert!(!unknown.status.success());
    assert!(text(&unknown).contains("q4_k_m"), "{}", text(&unknown));

    let wrong = kiln(&[
        "quantize",
        "--model",
        p(&not_gguf),
        "--type",
        "q4_0",
        "--output",
        p(&out),
    ]);
    assert!(!wrong.status.success());
    assert!(
        text(&wrong).contains("neither a GGUF file"),
        "{}",
        text(&wrong)
    );

    // A model llama.cpp has no layout for (learned positions with a SwiGLU MLP): refused with
    // the reason, no partial file left beside the output.
    let gpt2 = dir.path().join("gpt2");
    let config = kiln::transformer::ModelConfig {
        vocab_size: 512,
        context_length: 32,
        n_layers: 1,
        n_heads: 2,
        n_kv_heads: 2,
        d_model: 32,
        d_ff: 64,
        mlp: kiln::transformer::MlpKind::SwiGlu,
        ..kiln::transformer::ModelConfig::gpt2_124m()
    };
    let model = Transformer::<B>::new(config, &Default::default()).unwrap();
    let (shards, _, _) = common::tokenizer_and_shards();
    let tokenizer = kiln::bpe::Tokenizer::from_file(shards.path().join("tokenizer.json")).unwrap();
    kiln::transformer::save_model_dir(&model, Some(&tokenizer), None, &gpt2).unwrap();
    let refused = kiln(&["quantize", "--model", p(&gpt2), "-t", "q8_0", "-o", p(&out)]);
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("learned positions"),
        "{}",
        text(&refused)
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        2,
        "only the inputs remain"
    );

    if let Some(reference) = reference() {
        let short = dir.path().join("short.txt");
        std::fs::write(&short, "Too short to calibrate on.").unwrap();
        let too_short = kiln(&[
            "quantize",
            "--model",
            p(reference),
            "--type",
            "q4_0",
            "--output",
            p(&out),
            "--calibration",
            p(&short),
        ]);
        assert!(!too_short.status.success());
        assert!(
            text(&too_short).contains("at least 512 are needed"),
            "{}",
            text(&too_short)
        );
        let ppl = kiln(&["eval", "--model", p(reference), "--perplexity", p(&short)]);
        assert!(!ppl.status.success());
        assert!(
            text(&ppl).contains("fewer than one window"),
            "{}",
            text(&ppl)
        );
    }
    assert!(!out.exists(), "a failed quantize left {}", out.display());
}

/// `kiln quantize` from a Kiln model directory (and `kiln export gguf` from it) writes what it
/// writes from the GGUF file the directory came from: the same tensors byte for byte, the same
/// tokenizer and template. The directory goes through Kiln's safetensors, tokenizer.json and
/// half-split Q/K order and back to llama.cpp's layout.
#[test]
fn quantize_from_a_model_directory_equals_quantize_from_gguf() {
    let Some(reference) = reference() else { return };
    let dir = tempfile::tempdir().unwrap();
    let loaded = load_model::<B>(reference, &Default::default()).unwrap();
    let model_dir = dir.path().join("smollm2");
    kiln::transformer::save_model_dir(
        &loaded.model,
        loaded.tokenizer.as_ref(),
        loaded.chat_template.as_deref(),
        &model_dir,
    )
    .unwrap();
    let from_gguf = dir.path().join("from-gguf.gguf");
    let from_dir = dir.path().join("from-dir.gguf");
    quantize(reference, "q8_0", &from_gguf, &[]);
    quantize(&model_dir, "q8_0", &from_dir, &[]);
    let exported = dir.path().join("exported.gguf");
    common::run_kiln(&[
        "export",
        "gguf",
        "--model",
        p(&model_dir),
        "--output",
        p(&exported),
    ]);
    let (a, b) = (
        GgufFile::open(&from_gguf).unwrap(),
        GgufFile::open(&from_dir).unwrap(),
    );
    assert_eq!(a.tensors.len(), b.tensors.len());
    for t in &a.tensors {
        let u = b
            .tensor(&t.name)
            .unwrap_or_else(|| panic!("{} missing", t.name));
        assert_eq!((t.ty, &t.dims), (u.ty, &u.dims), "{}", t.name);
        assert!(a.tensor_data(t) == b.tensor_data(u), "{} differs", t.name);
    }
    for key in [
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.pre",
        "tokenizer.chat_template",
        "llama.rope.freq_base",
    ] {
        assert_eq!(a.get(key), b.get(key), "{key}");
    }
    // Nothing left behind but the outputs.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");
    let f32_file = GgufFile::open(&exported).unwrap();
    assert_eq!(f32_file.tensors.len(), a.tensors.len());
}

/// A GPT-2-style model trained by `kiln train` (no biases: written as zeros, llama.cpp needs
/// them), quantized by `kiln quantize` from its checkpoint directory: llama.cpp runs the file with
/// Kiln's greedy tokens and top-1.
#[test]
fn llama_cpp_runs_kilns_gpt2_files_like_kiln() {
    let Some(python) = llama_python() else { return };
    let (dir, data, run) = common::tokenizer_and_shards();
    let config = root().join("examples/configs/tiny.toml");
    common::run_kiln(&[
        "train",
        "--config",
        p(&config),
        "--data",
        p(&data),
        "--out",
        p(&run),
        "--max-steps",
        "20",
    ]);
    let file = dir.path().join("tiny.q8_0.gguf");
    quantize(&run.join("checkpoints/step-20/model"), "q8_0", &file, &[]);
    let tok = kiln::bpe::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
    let prompts: Vec<Vec<u32>> = [
        "Byte-level BPE: ",
        "emoji 🦀, e\u{301}, tabs",
        "<|endoftext|> stays",
    ]
    .iter()
    .map(|t| tok.encode(t))
    .collect();
    let (agreement, greedy_equal) =
        llama_cpp_agreement(&python, &file, false, &prompts, dir.path());
    assert!(agreement >= 0.95, "gpt2 q8_0: top-1 agreement {agreement}");
    assert!(
        greedy_equal,
        "gpt2 q8_0: llama.cpp's greedy tokens differ from Kiln's"
    );
}

/// A GPT-2-style model (learned positions, LayerNorm, GELU, a bias on every projection),
/// quantized by `kiln quantize` from its model directory, runs from the file's blocks: the logits
/// of its f32 dequantization up to the kernels' 8-bit rounding of activations, with no f32
/// projection or embedding weight ever made; GPTQ calibrates its fused Q|K|V and MLP, closer to
/// the f32 model's logits than round to nearest.
#[test]
fn gpt2_files_run_from_their_blocks() {
    use burn::module::Param;
    use burn::tensor::Distribution;
    use kiln::transformer::{ModelConfig, gguf_is_quantized, load_gguf};

    let dir = tempfile::tempdir().unwrap();
    let (shards, _, _) = common::tokenizer_and_shards();
    let tokenizer = kiln::bpe::Tokenizer::from_file(shards.path().join("tokenizer.json")).unwrap();
    let device = Default::default();
    let config = ModelConfig {
        vocab_size: tokenizer.vocab_size(),
        context_length: 32,
        n_layers: 2,
        n_heads: 2,
        n_kv_heads: 2,
        d_model: 64,
        d_ff: 128,
        ..ModelConfig::gpt2_124m()
    };
    let mut model = Transformer::<B>::new(config, &device).unwrap();
    // Biases of a trained model's size, so that one the loader lost would show in the logits.
    for block in &mut model.blocks {
        for projection in [
            &mut block.attn.qkv,
            &mut block.attn.proj,
            &mut block.mlp.up,
            &mut block.mlp.down,
        ] {
            let n = projection.out_features();
            projection.bias = Some(Param::from_tensor(Tensor::random(
                [n],
                Distribution::Normal(0.0, 0.5),
                &device,
            )));
        }
    }
    let model_dir = dir.path().join("gpt2");
    kiln::transformer::save_model_dir(&model, Some(&tokenizer), None, &model_dir).unwrap();
    let tokens: Vec<i64> = tokenizer
        .encode("Byte-level BPE keeps every byte, and the model reads them all back.")
        .iter()
        .take(24)
        .map(|&t| i64::from(t))
        .collect();
    let n = tokens.len();
    let logits = |model: &Transformer<B>| -> Vec<f32> {
        let input =
            Tensor::<B, 2, Int>::from_data(TensorData::new(tokens.clone(), [1, n]), &device);
        model
            .forward(input)
            .unwrap()
            .into_data()
            .into_vec()
            .unwrap()
    };
    for (scheme, bound) in [("q8_0", 0.03), ("q4_0", 0.03)] {
        let file = dir.path().join(format!("gpt2.{scheme}.gguf"));
        quantize(&model_dir, scheme, &file, &[]);
        assert!(
            gguf_is_quantized(&GgufFile::open(&file).unwrap()),
            "{scheme}"
        );
        let f32_logits = logits(&load_gguf::<B>(&file, &device).unwrap().model);
        let native = load_gguf_quantized::<B>(&file, &device).unwrap().model;
        let native_logits = logits(&native);
        let scale = f32_logits.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let worst = f32_logits
            .iter()
            .zip(&native_logits)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        eprintln!("{scheme}: largest logit gap {worst:.4} of {scale:.3}");
        assert!(worst <= bound * scale, "{scheme}: {worst} of {scale}");
        assert!(native.tok_emb_kernel.is_some() && !native.tok_emb.weight.is_initialized());
        for block in &native.blocks {
            for projection in [
                &block.attn.qkv,
                &block.attn.proj,
                &block.mlp.up,
                &block.mlp.down,
            ] {
                assert!(projection.kernel.is_some() && !projection.weight.is_initialized());
                assert!(projection.bias.is_some(), "{scheme}: a bias lost");
            }
        }
    }
    // GPTQ calibrates GPT-2's fused Q|K|V, its output and its MLP: all 4 projections of both
    // blocks (the token embedding, also the tied head, is rounded to nearest).
    let corpus = dir.path().join("calibration.txt");
    std::fs::write(&corpus, common::TEXT.repeat(20)).unwrap();
    let gptq = dir.path().join("gpt2.gptq.gguf");
    let out = kiln(&[
        "quantize",
        "--model",
        p(&model_dir),
        "-t",
        "q4_0",
        "-o",
        p(&gptq),
        "--calibration",
        p(&corpus),
        "--calibration-tokens",
        "256",
    ]);
    let t = text(&out);
    assert!(out.status.success() && t.contains("; 8 by GPTQ"), "{t}");
    let calibrated = logits(&load_gguf_quantized::<B>(&gptq, &device).unwrap().model);
    let reference = logits(&model);
    let error = |other: &[f32]| -> f32 {
        reference
            .iter()
            .zip(other)
            .map(|(a, b)| (a - b) * (a - b))
            .sum()
    };
    let rtn = logits(
        &load_gguf_quantized::<B>(&dir.path().join("gpt2.q4_0.gguf"), &device)
            .unwrap()
            .model,
    );
    let (gptq_error, rtn_error) = (error(&calibrated), error(&rtn));
    eprintln!("q4_0 logit error: GPTQ {gptq_error:.4}, round to nearest {rtn_error:.4}");
    // Measured 0.50-0.65x over six random models.
    assert!(
        gptq_error < 0.85 * rtn_error,
        "GPTQ {gptq_error} against round to nearest {rtn_error}"
    );
}
