//! The continuous-batching engine against the single-sequence [`Generator`]: greedy outputs are
//! the same whether a request runs alone or in a batch whose members join and leave at different
//! steps, and whose prompts are read a few tokens at a time (chunked prefill).

use std::sync::Arc;
use std::time::Duration;

use burn::backend::Flex;
use kiln_bpe::{PreTokenizer, Tokenizer, TokenizerParts};
use kiln_serve::engine::{Engine, EngineConfig, EngineError, Event, Request};
use kiln_serve::metrics::Metrics;
use kiln_transformer::sampling::SamplingParams;
use kiln_transformer::{
    FinishReason, GenerateParams, Generator, ModelConfig, PositionEncoding, RopePairing,
    Transformer,
};
use tokio::sync::mpsc::unbounded_channel;

type B = Flex;

fn byte_tokenizer() -> Tokenizer {
    Tokenizer::from_parts(TokenizerParts {
        vocab: (0..=255u8).map(|b| (vec![b], u32::from(b))).collect(),
        merges: Vec::new(),
        added: Vec::new(),
        pre_tokenizer: PreTokenizer::gpt2(),
        ignore_merges: false,
        bos_id: None,
        eos_id: None,
    })
    .unwrap()
}

fn tiny_llama() -> Transformer<B> {
    let config = ModelConfig {
        vocab_size: 256,
        context_length: 256,
        n_layers: 2,
        n_heads: 6,
        n_kv_heads: 2,
        d_model: 48,
        d_ff: 96,
        position: PositionEncoding::Rope {
            theta: 10_000.0,
            pairing: RopePairing::HalfSplit,
        },
        tied_embeddings: false,
        ..ModelConfig::smollm2_135m()
    };
    Transformer::new(config, &Default::default()).unwrap()
}

fn greedy(max_new_tokens: usize) -> GenerateParams {
    GenerateParams {
        max_new_tokens,
        sampling: SamplingParams::greedy(),
        ..GenerateParams::default()
    }
}

/// Prompts of very different lengths (1 to 150 tokens).
fn prompts() -> Vec<Vec<u32>> {
    (0..7u32)
        .map(|i| {
            let len = [1, 5, 150, 17, 64, 65, 90][i as usize];
            (0..len).map(|j| (j * 31 + i * 7 + 3) % 256).collect()
        })
        .collect()
}

#[test]
fn batched_greedy_equals_one_at_a_time() {
    let model = tiny_llama();
    let tokenizer = byte_tokenizer();
    let lengths = [12, 30, 7, 25, 1, 40, 18];
    let expected: Vec<Vec<u32>> = prompts()
        .iter()
        .zip(lengths)
        .map(|(p, n)| {
            Generator::new(&model, &tokenizer, p, greedy(n))
                .unwrap()
                .run()
                .unwrap()
                .ids
        })
        .collect();

    // 4 rows for 7 requests (so some wait and take rows others free), and a 48-token prefill
    // budget (so the long prompts are read over several steps, interleaved with decoding).
    let config = EngineConfig {
        max_batch_size: 4,
        max_queue: 16,
        context: 256,
        prefill_chunk: 48,
        request_timeout: Duration::from_secs(120),
    };
    let metrics = Arc::new(Metrics::default());
    let (engine, handle) = Engine::start(model, tokenizer, config, metrics.clone()).unwrap();
    let mut receivers = Vec::new();
    for (prompt, n) in prompts().into_iter().zip(lengths) {
        let (events, rx) = unbounded_channel();
        handle
            .submit(Request {
                prompt,
                params: greedy(n),
                events,
            })
            .unwrap();
        receivers.push(rx);
    }
    for ((mut rx, want), n) in receivers.into_iter().zip(&expected).zip(lengths) {
        let mut got = Vec::new();
        loop {
            match rx
                .blocking_recv()
                .expect("the engine answers every request")
            {
                Event::Piece(piece) => got.extend(piece.ids),
                Event::Done(done) => {
                    assert_eq!(done.finish, FinishReason::Length);
                    assert_eq!(done.completion_tokens, n);
                    break;
                }
                Event::Failed(e) => panic!("{e}"),
            }
        }
        assert_eq!(&got, want);
    }
    assert_eq!(metrics.queue_depth(), 0);
    drop(handle);
    engine.join();
}

#[test]
fn full_queue_and_shutdown_are_reported() {
    let config = EngineConfig {
        max_batch_size: 1,
        max_queue: 2,
        context: 256,
        prefill_chunk: 256,
        request_timeout: Duration::from_secs(120),
    };
    let metrics = Arc::new(Metrics::default());
    let (engine, handle) = Engine::start(tiny_llama(), byte_tokenizer(), config, metrics).unwrap();
    let mut receivers = Vec::new();
    let mut refused = 0;
    for _ in 0..6 {
        let (events, rx) = unbounded_channel();
        match handle.submit(Request {
            prompt: vec![1, 2, 3],
            params: greedy(200),
            events,
        }) {
            Ok(()) => receivers.push(rx),
            Err(EngineError::QueueFull(_)) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        refused >= 3,
        "only {refused} of 6 refused with a queue of 2"
    );
    handle.cancel_all();
    for mut rx in receivers {
        let last = std::iter::from_fn(|| rx.blocking_recv()).last();
        assert!(
            matches!(
                last,
                Some(Event::Failed(EngineError::ShuttingDown) | Event::Done(_))
            ),
            "{last:?}"
        );
    }
    drop(handle);
    engine.join();
}
