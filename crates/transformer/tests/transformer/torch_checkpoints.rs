//! PyTorch and sharded Hugging Face checkpoints, made by real PyTorch, nanoGPT and transformers
//! (`scripts/make_pt_model_fixtures.py`), against the logits their own code computed; and
//! nanoGPT checkpoints written by Kiln, read back.

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use kiln_gguf::torch::{self, Value};
use kiln_transformer::{
    ModelConfig, ModelError, TorchMetadata, Transformer, load_model, save_model_dir, save_nanogpt,
};

type B = Flex;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/pt")
        .join(name)
}

fn logits(model: &Transformer<B>, ids: &[i64]) -> Vec<f32> {
    let input = Tensor::<B, 2, Int>::from_data(
        TensorData::new(ids.to_vec(), [1, ids.len()]),
        &Default::default(),
    );
    model.forward(input).unwrap().into_data().to_vec().unwrap()
}

/// The ids and logits a fixture's own framework computed.
fn expected(dir: &Path) -> (Vec<i64>, Vec<f32>, serde_json::Value) {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let ids = json["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    let want = json["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    (ids, want, json)
}

fn max_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Loads `path` and checks its logits against the fixture's (`dir`) within 1e-4.
fn matches_reference(path: &Path, dir: &Path) -> kiln_transformer::LoadedModel<B> {
    let loaded = load_model::<B>(path, &Default::default()).unwrap();
    let (ids, want, _) = expected(dir);
    let worst = max_difference(&logits(&loaded.model, &ids), &want);
    assert!(
        worst < 1e-4,
        "{}: largest logit difference {worst}",
        path.display()
    );
    loaded
}

#[test]
fn nanogpt_checkpoint_gives_nanogpts_logits_and_its_tokenizer() {
    let dir = fixture("nanogpt");
    for path in [dir.join("ckpt.pt"), dir.clone()] {
        let loaded = matches_reference(&path, &dir);
        let config = loaded.model.config();
        assert_eq!(
            (
                config.n_layers,
                config.d_model,
                config.bias,
                config.context_length
            ),
            (2, 16, false, 32)
        );
        // meta.pkl beside the checkpoint gives the character vocabulary.
        let (ids, _, json) = expected(&dir);
        let tokenizer = loaded.tokenizer.expect("meta.pkl read");
        let text = json["text"].as_str().unwrap();
        let ours: Vec<i64> = tokenizer.encode(text).into_iter().map(i64::from).collect();
        assert_eq!(ours, ids, "meta.pkl's stoi");
        assert_eq!(tokenizer.decode(&tokenizer.encode(text)).unwrap(), text);
    }
}

#[test]
fn sharded_hugging_face_checkpoints_give_their_logits() {
    // GPT-2 as PyTorch shards with pytorch_model.bin.index.json, chat template in
    // tokenizer_config.json.
    let gpt2 = matches_reference(&fixture("hf-gpt2"), &fixture("hf-gpt2"));
    assert_eq!(gpt2.model.config().architecture, "gpt2");
    assert!(gpt2.chat_template.unwrap().contains("m.role"));
    // Llama (GQA, RoPE θ = 500,000 in transformers 5's rope_parameters) as safetensors shards.
    let llama = matches_reference(&fixture("hf-llama"), &fixture("hf-llama"));
    let c = llama.model.config();
    assert_eq!((c.n_heads, c.n_kv_heads, c.tied_embeddings), (4, 2, false));
}

#[test]
fn qwen2_phi3_mistral_and_gemma_checkpoints_give_their_logits() {
    // (directory, context after the sliding window, Q/K/V biases, tied head)
    for (name, context, qkv_bias, tied) in [
        ("hf-qwen2", 32, true, true),
        ("hf-phi3", 12, false, false),
        ("hf-mistral", 16, false, false),
        ("hf-gemma", 32, false, true),
    ] {
        let loaded = matches_reference(&fixture(name), &fixture(name));
        let c = loaded.model.config();
        assert_eq!(
            (c.context_length, c.qkv_bias, c.tied_embeddings),
            (context, qkv_bias, tied),
            "{name}"
        );
    }
}

#[test]
fn a_state_dict_file_loads_with_the_config_beside_it() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("hf-gpt2");
    // Both shards' tensors in one pytorch_model.bin, as unsharded checkpoints are.
    let mut state = torch::Dict::new();
    for shard in [
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
    ] {
        let value = torch::load(src.join(shard)).unwrap();
        for (k, v) in value.as_dict().unwrap().iter() {
            state.insert(k.clone(), v.clone());
        }
    }
    let bin = dir.path().join("pytorch_model.bin");
    torch::save(&bin, &Value::Dict(state)).unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    matches_reference(&bin, &src);
    matches_reference(dir.path(), &src);
    // Without the config it is an error that says what is missing.
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let err = load_model::<B>(&bin, &Default::default()).unwrap_err();
    assert!(err.to_string().contains("config.json"), "{err}");
}

#[test]
fn kiln_writes_nanogpt_checkpoints_that_read_back_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let device = Default::default();
    let model = ModelConfig::shakespeare_char_cpu(65)
        .init::<B>(&device)
        .unwrap();
    let ids: Vec<i64> = (0..20).map(|i| (i * 13 + 5) % 65).collect();
    let metadata = TorchMetadata {
        iter_num: 1234,
        best_val_loss: Some(1.5),
        config: Some(serde_json::json!({"seed": 7, "lr": 0.001, "data_dir": "data/x"})),
    };
    let path = dir.path().join("ckpt.pt");
    save_nanogpt(&model, &metadata, &path).unwrap();

    let back = load_model::<B>(&path, &device).unwrap();
    assert_eq!(back.model.config().n_layers, 4);
    assert!(max_difference(&logits(&back.model, &ids), &logits(&model, &ids)) < 1e-6);

    // nanoGPT's layout: its key names exactly, `model_args`, the metadata; the LM head shares
    // the embedding's storage.
    let value = torch::load(&path).unwrap();
    let state = value.get("model").unwrap().as_dict().unwrap();
    let keys: Vec<String> = state.keys().map(ToString::to_string).collect();
    assert_eq!(keys.len(), 2 + 4 * 6 + 1 + 1);
    for key in [
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.h.3.attn.c_attn.weight",
        "transformer.h.0.mlp.c_proj.weight",
        "transformer.ln_f.weight",
        "lm_head.weight",
    ] {
        assert!(keys.iter().any(|k| k == key), "{key} missing from {keys:?}");
    }
    let c_attn = state
        .get("transformer.h.0.attn.c_attn.weight")
        .and_then(Value::as_tensor)
        .unwrap();
    assert_eq!(c_attn.shape(), [3 * 128, 128], "nn.Linear's [out, in]");
    let wte = state
        .get("transformer.wte.weight")
        .and_then(Value::as_tensor);
    let head = state.get("lm_head.weight").and_then(Value::as_tensor);
    assert!(wte.unwrap().storage().same(head.unwrap().storage()));
    let args = value.get("model_args").unwrap();
    assert_eq!(args.get("n_embd").and_then(Value::as_int), Some(128));
    assert_eq!(args.get("bias").and_then(Value::as_bool), Some(false));
    assert_eq!(value.get("iter_num").and_then(Value::as_int), Some(1234));
    assert_eq!(
        value.get("best_val_loss").and_then(Value::as_float),
        Some(1.5)
    );
    let config = value.get("config").unwrap();
    assert_eq!(config.get("seed").and_then(Value::as_int), Some(7));
    assert_eq!(
        config.get("data_dir").and_then(Value::as_str),
        Some("data/x")
    );

    // Through a model directory too: nothing lost on the way.
    save_model_dir(&back.model, None, None, dir.path().join("model")).unwrap();
    let again = load_model::<B>(dir.path().join("model"), &device).unwrap();
    assert!(max_difference(&logits(&again.model, &ids), &logits(&model, &ids)) < 1e-6);
}

#[test]
fn models_nanogpt_cannot_hold_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt.pt");
    let device = Default::default();
    let cases = [
        (ModelConfig::gpt2_124m(), "tanh GELU"),
        (
            ModelConfig {
                n_layers: 1,
                vocab_size: 64,
                d_model: 64,
                n_heads: 2,
                n_kv_heads: 1,
                d_ff: 96,
                context_length: 16,
                ..ModelConfig::smollm2_135m()
            },
            "rotary",
        ),
    ];
    for (mut config, reason) in cases {
        config.n_layers = 1;
        config.vocab_size = 64;
        config.context_length = 16;
        let model = config.init::<B>(&device).unwrap();
        let err = save_nanogpt(&model, &TorchMetadata::default(), &path).unwrap_err();
        assert!(matches!(err, ModelError::Unsupported(_)), "{err}");
        assert!(err.to_string().contains(reason), "{err}");
        assert!(!path.exists(), "nothing written");
    }
}

#[test]
fn bad_torch_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let device = Default::default();
    // A truncated checkpoint names the file.
    let bytes = std::fs::read(fixture("nanogpt/ckpt.pt")).unwrap();
    let cut = dir.path().join("cut.pt");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_model::<B>(&cut, &device).unwrap_err();
    assert!(matches!(err, ModelError::Torch { .. }), "{err}");
    assert!(err.to_string().contains("cut.pt"), "{err}");
    // A checkpoint that is neither nanoGPT's nor a state dict with a config.
    let odd = dir.path().join("odd.pt");
    torch::save(
        &odd,
        &Value::Dict([("step", Value::Int(3))].into_iter().collect()),
    )
    .unwrap();
    let err = load_model::<B>(&odd, &device).unwrap_err();
    assert!(err.to_string().contains("nanoGPT"), "{err}");
    // A nanoGPT checkpoint missing a weight names it.
    let value = torch::load(fixture("nanogpt/ckpt.pt")).unwrap();
    let mut ckpt = value.as_dict().unwrap().clone();
    let mut state = torch::Dict::new();
    for (k, v) in value.get("model").unwrap().as_dict().unwrap().iter() {
        if k.to_string() != "_orig_mod.transformer.h.1.mlp.c_fc.weight" {
            state.insert(k.clone(), v.clone());
        }
    }
    ckpt.insert("model", state);
    let partial = dir.path().join("partial.pt");
    torch::save(&partial, &Value::Dict(ckpt)).unwrap();
    let err = load_model::<B>(&partial, &device).unwrap_err();
    assert!(
        err.to_string().contains("transformer.h.1.mlp.c_fc.weight"),
        "{err}"
    );
}

#[test]
fn bad_shard_indexes_are_clear_errors() {
    let device = Default::default();
    let src = fixture("hf-llama");
    let copy = |dir: &Path| {
        for entry in std::fs::read_dir(&src).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
    };
    let index = "model.safetensors.index.json";
    // A shard named outside the directory is refused, not read.
    let dir = tempfile::tempdir().unwrap();
    copy(dir.path());
    let text = std::fs::read_to_string(dir.path().join(index)).unwrap();
    let escaped = text.replacen(
        "model-00001-of-00003.safetensors",
        "../secret.safetensors",
        1,
    );
    std::fs::write(dir.path().join(index), escaped).unwrap();
    let err = load_model::<B>(dir.path(), &device).unwrap_err();
    assert!(
        err.to_string().contains("not a file beside the index"),
        "{err}"
    );
    // A missing shard names the file.
    let dir = tempfile::tempdir().unwrap();
    copy(dir.path());
    std::fs::remove_file(dir.path().join("model-00002-of-00003.safetensors")).unwrap();
    let err = load_model::<B>(dir.path(), &device).unwrap_err();
    assert!(err.to_string().contains("model-00002-of-00003"), "{err}");
    // A truncated shard is a safetensors error naming it, not a panic.
    let dir = tempfile::tempdir().unwrap();
    copy(dir.path());
    let shard = dir.path().join("model-00003-of-00003.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_model::<B>(dir.path(), &device).unwrap_err();
    assert!(err.to_string().contains("model-00003-of-00003"), "{err}");
}
