//! Kiln models written as GGUF files (`gguf_writer`, `save_gguf`) read back to the same logits and
//! the same tokenizer: the `llama` layout from models rotating either pair order, `qwen2` with its
//! biases, SmolLM2 itself, `gpt2` with and without biases; models no llama.cpp architecture holds
//! are refused.

use std::path::Path;

use crate::gguf_architectures::requantized;
use burn::backend::Flex;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use kiln_bpe::{BpeTrainer, PreTokenizer, Tokenizer, TrainerConfig};
use kiln_gguf::{GgmlType, GgufFile};
use kiln_transformer::{
    ModelConfig, ModelError, PositionEncoding, RopePairing, Transformer, load_gguf,
    load_gguf_quantized, save_gguf,
};

type B = Flex;

const TEXT: &str = "The quick brown fox jumps over the lazy dog. 12345 café ünïcödé <tags>\n";

fn tokenizer(vocab: usize) -> Tokenizer {
    let mut trainer = BpeTrainer::new(TrainerConfig {
        vocab_size: vocab,
        min_frequency: 1,
        special_tokens: vec!["<|endoftext|>".into()],
        pre_tokenizer: PreTokenizer::gpt2(),
        show_progress: false,
    })
    .unwrap();
    trainer.feed(TEXT.repeat(50).as_bytes());
    trainer.finish().unwrap()
}

fn logits(model: &Transformer<B>, ids: &[i64]) -> Vec<f32> {
    let input = Tensor::<B, 2, Int>::from_data(
        TensorData::new(ids.to_vec(), [1, ids.len()]),
        &Default::default(),
    );
    model.forward(input).unwrap().into_data().to_vec().unwrap()
}

fn worst(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Writes `model` with `tok` and reads it back: the same logits, the same encodings.
fn round_trip(model: &Transformer<B>, tok: &Tokenizer, dir: &Path, name: &str) -> Transformer<B> {
    let path = dir.join(format!("{name}.gguf"));
    save_gguf(model, tok, Some("{{ messages }}"), &path).unwrap();
    let back = load_gguf::<B>(&path, &Default::default()).unwrap();
    let ids: Vec<i64> = tok
        .encode(TEXT)
        .into_iter()
        .take(24)
        .map(i64::from)
        .collect();
    let diff = worst(&logits(&back.model, &ids), &logits(model, &ids));
    assert!(diff < 1e-5, "{name}: logits differ by {diff}");
    let again = back.tokenizer.unwrap();
    for text in [TEXT, "  spaces\tand\ttabs 2024 ", "<|endoftext|> fox"] {
        assert_eq!(again.encode(text), tok.encode(text), "{name}: {text:?}");
    }
    assert_eq!(back.chat_template.as_deref(), Some("{{ messages }}"));
    back.model
}

fn random(config: ModelConfig) -> Transformer<B> {
    B::seed(&Default::default(), 11);
    Transformer::<B>::new(config, &Default::default()).unwrap()
}

#[test]
fn llama_models_of_either_rope_order_read_back_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(320);
    for pairing in [RopePairing::HalfSplit, RopePairing::Interleaved] {
        let config = ModelConfig {
            vocab_size: tok.vocab_size(),
            context_length: 64,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            d_model: 64,
            d_ff: 96,
            position: PositionEncoding::Rope {
                theta: 10_000.0,
                pairing,
            },
            ..ModelConfig::smollm2_135m()
        };
        let model = random(config);
        round_trip(&model, &tok, dir.path(), &format!("{pairing:?}"));
        // llama.cpp's names and types: Q and K apart, f32, the pre-tokenizer by name.
        let file = GgufFile::open(dir.path().join(format!("{pairing:?}.gguf"))).unwrap();
        assert_eq!(file.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(file.get_str("tokenizer.ggml.pre").unwrap(), "gpt-2");
        assert!(file.tensor("blk.1.attn_k.weight").is_some());
        assert!(file.tensor("output.weight").is_none(), "tied");
    }
}

#[test]
fn qwen2_and_smollm2_read_back_the_same_and_quantize_natively() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/gguf/qwen2.gguf");
    let mut sources = vec![fixture];
    let smollm2 = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if smollm2.exists() {
        sources.push(smollm2);
    }
    for source in sources {
        let loaded = load_gguf::<B>(&source, &Default::default()).unwrap();
        let tok = loaded.tokenizer.unwrap();
        let name = source.file_stem().unwrap().to_string_lossy().into_owned();
        round_trip(&loaded.model, &tok, dir.path(), &name);
        let file = GgufFile::open(dir.path().join(format!("{name}.gguf"))).unwrap();
        let arch = file.get_str("general.architecture").unwrap().to_owned();
        assert_eq!(arch, loaded.model.config().architecture);
        if arch == "qwen2" {
            assert_eq!(file.get_str("tokenizer.ggml.pre").unwrap(), "qwen2");
            assert!(file.tensor("blk.0.attn_v.bias").is_some());
        } else {
            assert_eq!(file.get_str("tokenizer.ggml.pre").unwrap(), "smollm");
        }
        // The f32 file runs from its blocks after quantization too (loader sanity).
        let _ =
            load_gguf_quantized::<B>(dir.path().join(format!("{name}.gguf")), &Default::default())
                .unwrap();
    }
}

#[test]
fn gpt2_models_read_back_the_same_with_or_without_biases() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(320);
    // Hugging Face's GPT-2 (tanh GELU, biases) and nanoGPT's Shakespeare model (exact GELU, no
    // biases: written as zero biases, read back as such).
    let small = |base: ModelConfig| ModelConfig {
        vocab_size: tok.vocab_size(),
        context_length: 48,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 4,
        d_model: 64,
        d_ff: 256,
        ..base
    };
    for (name, config) in [
        ("hf-gpt2", small(ModelConfig::gpt2_124m())),
        ("nanogpt", small(ModelConfig::shakespeare_char(300))),
    ] {
        let model = random(config);
        let back = round_trip(&model, &tok, dir.path(), name);
        assert_eq!(
            back.config().mlp,
            model.config().mlp,
            "{name}: the GELU kept"
        );
        let file = GgufFile::open(dir.path().join(format!("{name}.gguf"))).unwrap();
        assert_eq!(file.get_str("general.architecture").unwrap(), "gpt2");
        assert!(
            file.tensor("blk.1.ffn_up.bias").is_some(),
            "llama.cpp needs every bias"
        );
        // An f32 file has no blocks to run from.
        assert!(!kiln_transformer::gguf_is_quantized(&file));
    }
}

#[test]
fn models_without_a_llama_cpp_architecture_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(300);
    let odd = random(ModelConfig {
        vocab_size: tok.vocab_size(),
        context_length: 32,
        n_layers: 1,
        n_heads: 2,
        n_kv_heads: 1,
        d_model: 32,
        d_ff: 64,
        ..ModelConfig::gpt2_124m()
    });
    let path = dir.path().join("odd.gguf");
    let err = save_gguf(&odd, &tok, None, &path).unwrap_err();
    assert!(matches!(err, ModelError::Unsupported(_)), "{err}");
    assert!(!path.exists());
    // More tokens than embeddings.
    let llama = random(ModelConfig {
        vocab_size: tok.vocab_size() - 4,
        context_length: 32,
        n_layers: 1,
        n_heads: 2,
        n_kv_heads: 2,
        d_model: 32,
        d_ff: 64,
        ..ModelConfig::smollm2_135m()
    });
    let err = save_gguf(&llama, &tok, None, &path).unwrap_err();
    assert!(err.to_string().contains("embeddings"), "{err}");
    // A SentencePiece vocabulary (Mistral's) is not written.
    let mistral = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/gguf/mistral.gguf");
    let loaded = load_gguf::<B>(&mistral, &Default::default()).unwrap();
    let err = save_gguf(
        &loaded.model,
        loaded.tokenizer.as_ref().unwrap(),
        None,
        &path,
    )
    .unwrap_err();
    assert!(err.to_string().contains("SentencePiece"), "{err}");
    assert!(!path.exists());
}

/// `Q4_K` (transcoded at load, Q and K rows reordered for half-split RoPE) and `Q5_0` (read from
/// tiles) run from their blocks like the same file's weights in f32, in under 6 bits per weight.
#[test]
fn q4_k_and_q5_0_files_run_from_their_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(320);
    // Rows of 256 (Q4_K: Q, K, V, gate, up, the tied embedding) and of 288 (Q5_0: down).
    let config = ModelConfig {
        vocab_size: tok.vocab_size(),
        context_length: 64,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        d_model: 256,
        d_ff: 288,
        ..ModelConfig::smollm2_135m()
    };
    let model = random(config);
    let f32_path = dir.path().join("f32.gguf");
    save_gguf(&model, &tok, None, &f32_path).unwrap();
    let path = dir.path().join("mix.gguf");
    // As llama.cpp's `Q4_K_M` makes them where 256 does not divide every row: `Q4_K` where it
    // divides the row, else `Q5_0`.
    requantized(&f32_path, &path, |cols| {
        if cols.is_multiple_of(256) {
            Some(GgmlType::Q4_K)
        } else {
            cols.is_multiple_of(32).then_some(GgmlType::Q5_0)
        }
    });
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(
        file.tensor("blk.0.attn_q.weight").unwrap().ty,
        GgmlType::Q4_K
    );
    assert_eq!(
        file.tensor("blk.0.ffn_down.weight").unwrap().ty,
        GgmlType::Q5_0
    );
    let device = Default::default();
    let ids: Vec<i64> = tok
        .encode(TEXT)
        .into_iter()
        .take(24)
        .map(i64::from)
        .collect();
    let reference = logits(&load_gguf::<B>(&path, &device).unwrap().model, &ids);
    let native = load_gguf_quantized::<B>(&path, &device).unwrap().model;
    let got = logits(&native, &ids);
    // The kernels round activations to 8 bits: close, and the same choices.
    let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = worst(&got, &reference);
    assert!(diff < 0.03 * scale, "{diff} against logits up to {scale}");
    let top = |l: &[f32]| -> Vec<usize> {
        l.chunks_exact(tok.vocab_size())
            .map(|row| {
                (0..row.len())
                    .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                    .unwrap()
            })
            .collect()
    };
    let (a, b) = (top(&got), top(&reference));
    let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    assert!(same + 1 >= a.len(), "top-1 {same}/{}", a.len());
    // Kept in 6 bits per weight (Q4_K's transcoding), not converted to Q8_0's 8.5.
    let embedding = native.tok_emb_kernel.as_ref().unwrap().weight_bytes();
    assert_eq!(embedding, tok.vocab_size() * 256 / 32 * 24);
    // Q5_0 in 16-row tiles of 22 bytes per block.
    let down = native.blocks[0]
        .mlp
        .down
        .kernel
        .as_ref()
        .unwrap()
        .weight_bytes();
    assert_eq!(down, 256usize.div_ceil(16) * 16 * 288 / 32 * 22);
}
