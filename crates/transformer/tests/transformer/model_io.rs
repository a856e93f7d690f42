//! Saving and loading weights: Kiln's model directory round trip, GGUF files written here, and
//! the errors bad files produce.

use std::path::Path;

use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use kiln_gguf::{GgmlType, GgufArray, GgufValue, GgufWriter};
use kiln_transformer::{
    ModelConfig, ModelError, PositionEncoding, RopePairing, Transformer, load_model, save_model_dir,
};

type B = Flex;

fn tiny_llama() -> ModelConfig {
    ModelConfig {
        vocab_size: 64,
        context_length: 16,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        d_model: 32,
        d_ff: 48,
        position: PositionEncoding::Rope {
            theta: 10_000.0,
            pairing: RopePairing::Interleaved,
        },
        ..ModelConfig::smollm2_135m()
    }
}

fn logits(model: &Transformer<B>) -> Vec<f32> {
    let ids: Vec<i64> = (0..8).map(|i| (i * 7 + 3) % 64).collect();
    let t = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, 8]), &Default::default());
    model.forward(t).unwrap().into_data().to_vec().unwrap()
}

fn values(t: Tensor<B, 2>) -> Vec<f32> {
    t.into_data().to_vec().unwrap()
}

fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes `model` as a llama.cpp-style GGUF (F32 tensors, `[out, in]` weights). `model` must use
/// interleaved RoPE pairs, llama.cpp's convention; the loader converts them to half-split.
fn write_gguf(model: &Transformer<B>, path: &Path, skip: Option<&str>, arch: &str) {
    let c = model.config();
    let (d, ff, hd) = (c.d_model, c.d_ff, c.head_dim());
    let (q, kv) = (c.n_heads * hd, c.n_kv_heads * hd);
    let mut w = GgufWriter::new();
    let meta = |w: &mut GgufWriter, k: &str, v: GgufValue| {
        w.add_metadata(k, v).unwrap();
    };
    meta(
        &mut w,
        "general.architecture",
        GgufValue::String(arch.into()),
    );
    for (k, v) in [
        ("llama.block_count", c.n_layers),
        ("llama.embedding_length", d),
        ("llama.feed_forward_length", ff),
        ("llama.attention.head_count", c.n_heads),
        ("llama.attention.head_count_kv", c.n_kv_heads),
        ("llama.context_length", c.context_length),
        ("llama.vocab_size", c.vocab_size),
    ] {
        meta(&mut w, k, GgufValue::U32(v as u32));
    }
    meta(&mut w, "llama.rope.freq_base", GgufValue::F32(10_000.0));
    meta(
        &mut w,
        "llama.attention.layer_norm_rms_epsilon",
        GgufValue::F32(1e-5),
    );
    let mut add = |name: &str, dims: &[u64], data: Vec<f32>| {
        if Some(name) != skip {
            w.add_tensor(name, dims, GgmlType::F32, f32_bytes(&data))
                .unwrap();
        }
    };
    let (v, du) = (c.vocab_size as u64, d as u64);
    add(
        "token_embd.weight",
        &[du, v],
        values(model.tok_emb.weight.val()),
    );
    add(
        "output_norm.weight",
        &[du],
        model.norm_f.weight.val().into_data().to_vec().unwrap(),
    );
    add(
        "output.weight",
        &[du, v],
        transpose(
            &values(model.lm_head.as_ref().unwrap().weight.val()),
            d,
            c.vocab_size,
        ),
    );
    for (i, b) in model.blocks.iter().enumerate() {
        let qkv = transpose(&values(b.attn.qkv.weight.val()), d, q + 2 * kv);
        add(
            &format!("blk.{i}.attn_q.weight"),
            &[du, q as u64],
            qkv[..q * d].to_vec(),
        );
        add(
            &format!("blk.{i}.attn_k.weight"),
            &[du, kv as u64],
            qkv[q * d..(q + kv) * d].to_vec(),
        );
        add(
            &format!("blk.{i}.attn_v.weight"),
            &[du, kv as u64],
            qkv[(q + kv) * d..].to_vec(),
        );
        add(
            &format!("blk.{i}.attn_output.weight"),
            &[q as u64, du],
            transpose(&values(b.attn.proj.weight.val()), q, d),
        );
        let gate = b.mlp.gate.as_ref().unwrap().weight.val();
        add(
            &format!("blk.{i}.ffn_gate.weight"),
            &[du, ff as u64],
            transpose(&values(gate), d, ff),
        );
        add(
            &format!("blk.{i}.ffn_up.weight"),
            &[du, ff as u64],
            transpose(&values(b.mlp.up.weight.val()), d, ff),
        );
        add(
            &format!("blk.{i}.ffn_down.weight"),
            &[ff as u64, du],
            transpose(&values(b.mlp.down.weight.val()), ff, d),
        );
        add(
            &format!("blk.{i}.attn_norm.weight"),
            &[du],
            b.norm1.weight.val().into_data().to_vec().unwrap(),
        );
        add(
            &format!("blk.{i}.ffn_norm.weight"),
            &[du],
            b.norm2.weight.val().into_data().to_vec().unwrap(),
        );
    }
    let tokens: Vec<String> = (0..256u32)
        .map(|b| kiln_bpe::byte_level::encode_bytes(&[b as u8]))
        .take(c.vocab_size)
        .collect();
    meta(
        &mut w,
        "tokenizer.ggml.model",
        GgufValue::String("gpt2".into()),
    );
    meta(
        &mut w,
        "tokenizer.ggml.tokens",
        GgufValue::Array(GgufArray::String(tokens)),
    );
    meta(
        &mut w,
        "tokenizer.ggml.merges",
        GgufValue::Array(GgufArray::String(vec![])),
    );
    w.write(path).unwrap();
}

#[test]
fn model_directory_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let device = Default::default();
    for config in [
        tiny_llama(),
        ModelConfig {
            vocab_size: 64,
            context_length: 16,
            n_layers: 2,
            n_heads: 2,
            n_kv_heads: 2,
            d_model: 16,
            d_ff: 32,
            ..ModelConfig::gpt2_124m()
        },
    ] {
        let model = config.init::<B>(&device).unwrap();
        let path = dir.path().join("model");
        save_model_dir(&model, None, Some("{{ messages }}"), &path).unwrap();
        // Saving again replaces the directory atomically.
        save_model_dir(&model, None, Some("{{ messages }}"), &path).unwrap();
        let loaded = load_model::<B>(&path, &device).unwrap();
        assert_eq!(loaded.model.config(), &config);
        assert_eq!(logits(&loaded.model), logits(&model));
        assert_eq!(loaded.chat_template.as_deref(), Some("{{ messages }}"));
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp directories left"
        );
    }
}

#[test]
fn gguf_written_here_loads_to_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    let device = Default::default();
    let mut config = tiny_llama();
    config.tied_embeddings = false;
    let model = config.init::<B>(&device).unwrap();
    let path = dir.path().join("tiny.gguf");
    write_gguf(&model, &path, None, "llama");
    let loaded = load_model::<B>(&path, &device).unwrap();
    let (a, b) = (logits(&loaded.model), logits(&model));
    let d = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(d < 1e-5, "{d}");
}

#[test]
fn bad_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let device = Default::default();
    let mut config = tiny_llama();
    config.tied_embeddings = false;
    let model = config.init::<B>(&device).unwrap();

    let missing = dir.path().join("missing.gguf");
    write_gguf(&model, &missing, Some("blk.1.ffn_up.weight"), "llama");
    let err = load_model::<B>(&missing, &device).unwrap_err();
    assert!(
        matches!(&err, ModelError::MissingTensor { name, .. } if name == "blk.1.ffn_up.weight"),
        "{err}"
    );

    let arch = dir.path().join("neox.gguf");
    write_gguf(&model, &arch, None, "gptneox");
    assert!(
        matches!(load_model::<B>(&arch, &device), Err(ModelError::UnknownArchitecture { name, .. }) if name == "gptneox")
    );

    let truncated = dir.path().join("truncated.gguf");
    let bytes = std::fs::read(&missing).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert!(matches!(
        load_model::<B>(&truncated, &device),
        Err(ModelError::Gguf(_))
    ));

    assert!(matches!(
        load_model::<B>(dir.path().join("nope"), &device),
        Err(ModelError::Io { .. })
    ));

    let saved = dir.path().join("saved");
    save_model_dir(&model, None, None, &saved).unwrap();
    std::fs::write(saved.join("config.json"), "{ nope").unwrap();
    assert!(matches!(
        load_model::<B>(&saved, &device),
        Err(ModelError::Json { .. })
    ));
    save_model_dir(&model, None, None, &saved).unwrap();
    let weights = saved.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() - 100]).unwrap();
    let err = load_model::<B>(&saved, &device).unwrap_err();
    assert!(matches!(err, ModelError::Safetensors { .. }), "{err}");
    // A config that does not match the weights names the tensor.
    save_model_dir(&model, None, None, &saved).unwrap();
    let mut wrong = config.clone();
    wrong.d_ff = 40;
    std::fs::write(
        saved.join("config.json"),
        serde_json::to_string(&wrong).unwrap(),
    )
    .unwrap();
    let err = load_model::<B>(&saved, &device).unwrap_err();
    assert!(err.to_string().contains("mlp"), "{err}");
}
