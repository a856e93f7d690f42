//! Two identical runs write byte-identical artifacts: every file of every checkpoint (the model
//! directory's `model.safetensors`, the exact model and optimizer state, the trainer state) and the
//! run's `config.toml`. A user comparing checksums sees one model, not two.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, Flex};
use kiln_bpe::prepare::{PrepareConfig, prepare_bytes};
use kiln_trainer::{ModelSpec, TrainConfig, Trainer};
use kiln_transformer::ModelConfig;

/// Every file under `root`, by relative path, with its bytes.
fn files(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).unwrap().to_owned();
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

#[test]
fn identical_runs_write_byte_identical_checkpoints() {
    let _serial = crate::common::serial();
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.txt");
    std::fs::write(
        &corpus,
        "Checksums agree when the bytes agree.\n".repeat(80),
    )
    .unwrap();
    prepare_bytes(
        &[corpus],
        &dir.path().join("data"),
        &PrepareConfig::default(),
    )
    .unwrap();
    let config = TrainConfig {
        model: ModelSpec::Full(ModelConfig {
            n_layers: 2,
            d_model: 32,
            n_heads: 2,
            n_kv_heads: 2,
            d_ff: 64,
            context_length: 32,
            dropout: 0.1,
            ..ModelConfig::shakespeare_char(257)
        }),
        data_dir: dir.path().join("data"),
        micro_batch: 4,
        seq_len: 32,
        max_steps: 6,
        checkpoint_interval: 3,
        keep_checkpoints: 2,
        eval_interval: 0,
        ..TrainConfig::default()
    };
    let mut runs = Vec::new();
    for name in ["a", "b"] {
        let run = dir.path().join(name);
        Trainer::<Autodiff<Flex>>::new(config.clone(), &run, Default::default())
            .unwrap()
            .train()
            .unwrap();
        // metrics.jsonl holds timings, which differ from run to run by nature.
        let mut all = files(&run);
        all.retain(|path, _| path != Path::new("metrics.jsonl"));
        runs.push(all);
    }
    let (a, b) = (&runs[0], &runs[1]);
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "the same files"
    );
    for name in [
        "checkpoints/step-3/model/model.safetensors",
        "checkpoints/step-6/model_state.mpk",
        "checkpoints/step-6/optimizer.mpk",
        "checkpoints/step-6/trainer_state.json",
    ] {
        assert!(a.contains_key(Path::new(name)), "{name} is written");
    }
    for (path, bytes) in a {
        assert!(
            bytes == &b[path],
            "{} differs between the runs",
            path.display()
        );
    }
}
