//! Cached decoding gives the same logits as a full forward pass over the same tokens: prefill in
//! one pass, token by token, and batches of sequences of different lengths.

use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use kiln_transformer::{KvCache, Logits, ModelConfig, PositionEncoding, RopePairing, Transformer};

type B = Flex;
const TOL: f32 = 1e-4;

fn tiny_gpt2() -> ModelConfig {
    ModelConfig {
        vocab_size: 97,
        context_length: 160,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 4,
        d_model: 32,
        d_ff: 64,
        dropout: 0.0,
        ..ModelConfig::gpt2_124m()
    }
}

fn tiny_llama(pairing: RopePairing) -> ModelConfig {
    ModelConfig {
        vocab_size: 101,
        context_length: 160,
        n_layers: 2,
        n_heads: 6,
        n_kv_heads: 2,
        d_model: 48,
        d_ff: 96,
        position: PositionEncoding::Rope {
            theta: 10_000.0,
            pairing,
        },
        tied_embeddings: false,
        ..ModelConfig::smollm2_135m()
    }
}

fn tokens(rows: &[Vec<u32>], len: usize) -> Tensor<B, 2, Int> {
    let flat: Vec<i64> = rows
        .iter()
        .flat_map(|r| (0..len).map(move |i| i64::from(*r.get(i).unwrap_or(&0))))
        .collect();
    Tensor::from_data(
        TensorData::new(flat, [rows.len(), len]),
        &Default::default(),
    )
}

fn to_vec(t: Tensor<B, 3>) -> Vec<f32> {
    t.into_data().to_vec().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Full-forward logits of one sequence, `[len, vocab]` flattened.
fn reference(model: &Transformer<B>, seq: &[u32]) -> Vec<f32> {
    to_vec(model.forward(tokens(&[seq.to_vec()], seq.len())).unwrap())
}

fn sequence(seed: u32, len: usize, vocab: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 31 + seed * 17 + 7) % vocab as u32)
        .collect()
}

fn check_model(config: ModelConfig) {
    let device = Default::default();
    let model = config.init::<B>(&device).unwrap();
    let v = config.vocab_size;

    // Batch 1: prefill 60 tokens, then 16 one at a time, crossing a cache block boundary.
    let seq = sequence(1, 76, v);
    let full = reference(&model, &seq);
    let mut cache = KvCache::<B>::new(&config, 1, 150, &device).unwrap();
    let prefill = to_vec(
        model
            .forward_cached(
                tokens(&[seq[..60].to_vec()], 60),
                &mut cache,
                None,
                Logits::All,
            )
            .unwrap(),
    );
    assert!(max_diff(&prefill, &full[..60 * v]) < TOL);
    for (i, &tok) in seq.iter().enumerate().skip(60) {
        let step = to_vec(
            model
                .forward_cached(tokens(&[vec![tok]], 1), &mut cache, None, Logits::Last)
                .unwrap(),
        );
        let d = max_diff(&step, &full[i * v..(i + 1) * v]);
        assert!(d < TOL, "{}: step {i} differs by {d}", config.architecture);
    }
    assert_eq!(cache.lens(), &[76]);

    // Batch 4, ragged: prompts of 3, 67, 1 and 62 tokens prefilled together (padded), then each
    // row decodes 4 more tokens in lockstep.
    let lens = [3usize, 67, 1, 62];
    let seqs: Vec<Vec<u32>> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| sequence(i as u32 + 2, n + 4, v))
        .collect();
    let mut cache = KvCache::<B>::new(&config, 4, 150, &device).unwrap();
    let prompts: Vec<Vec<u32>> = seqs
        .iter()
        .zip(&lens)
        .map(|(s, &n)| s[..n].to_vec())
        .collect();
    let last = to_vec(
        model
            .forward_cached(tokens(&prompts, 67), &mut cache, Some(&lens), Logits::Last)
            .unwrap(),
    );
    for (row, (s, &n)) in seqs.iter().zip(&lens).enumerate() {
        let full = reference(&model, s);
        let d = max_diff(&last[row * v..(row + 1) * v], &full[(n - 1) * v..n * v]);
        assert!(d < TOL, "ragged prefill row {row} differs by {d}");
    }
    for step in 0..4 {
        let next: Vec<Vec<u32>> = seqs
            .iter()
            .zip(&lens)
            .map(|(s, &n)| vec![s[n + step]])
            .collect();
        let out = to_vec(
            model
                .forward_cached(tokens(&next, 1), &mut cache, None, Logits::Last)
                .unwrap(),
        );
        for (row, (s, &n)) in seqs.iter().zip(&lens).enumerate() {
            let full = reference(&model, s);
            let at = n + step;
            let d = max_diff(&out[row * v..(row + 1) * v], &full[at * v..(at + 1) * v]);
            assert!(
                d < TOL,
                "ragged decode row {row} step {step} differs by {d}"
            );
        }
    }
    assert_eq!(cache.lens(), &[7, 71, 5, 66]);

    // A row can be reset and reused while the others keep their state.
    cache.reset(2);
    let fresh = sequence(9, 3, v);
    let mut rows = vec![vec![0u32; 3]; 4];
    rows[2] = fresh.clone();
    let valid = [0, 0, 3, 0];
    let out = to_vec(
        model
            .forward_cached(tokens(&rows, 3), &mut cache, Some(&valid), Logits::Last)
            .unwrap(),
    );
    let d = max_diff(&out[2 * v..3 * v], &reference(&model, &fresh)[2 * v..3 * v]);
    assert!(d < TOL, "reused row differs by {d}");
    assert_eq!(cache.lens(), &[7, 71, 3, 66]);
}

#[test]
fn gpt2_cache_matches_full_forward() {
    check_model(tiny_gpt2());
}

#[test]
fn llama_cache_matches_full_forward_both_rope_layouts() {
    check_model(tiny_llama(RopePairing::Interleaved));
    check_model(tiny_llama(RopePairing::HalfSplit));
}

#[test]
fn overflow_is_an_error() {
    let config = tiny_gpt2();
    let device = Default::default();
    let model = config.init::<B>(&device).unwrap();
    let mut cache = KvCache::<B>::new(&config, 1, 4, &device).unwrap();
    let err = model
        .forward_cached(tokens(&[vec![1; 5]], 5), &mut cache, None, Logits::All)
        .unwrap_err();
    assert!(err.to_string().contains("exceeds"), "{err}");
    assert!(KvCache::<B>::new(&config, 1, 161, &device).is_err());
    let err = model.forward(tokens(&[vec![1; 170]], 170)).unwrap_err();
    assert!(err.to_string().contains("170"), "{err}");
}
