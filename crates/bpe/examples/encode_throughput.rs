//! Single-thread encode throughput of one tokenizer on one text file.
//!
//! ```text
//! cargo run --release -p kiln-bpe --example encode_throughput -- TOKENIZER TEXT [RUNS]
//! ```
//!
//! `TOKENIZER` is anything [`Tokenizer::from_file`] reads (a GGUF model, a `tokenizer.json`, a
//! directory with `vocab.json` + `merges.txt`). Prints the median MB/s over `RUNS` (default 5),
//! with a warm piece cache (after one warm-up run) and with a cold one (a fresh clone per run).

use std::time::Instant;

use kiln_bpe::Tokenizer;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: encode_throughput TOKENIZER TEXT [RUNS]");
        std::process::exit(2);
    }
    let tok = Tokenizer::from_file(&args[1])?;
    let text = std::fs::read_to_string(&args[2])?;
    let runs: usize = args.get(3).map_or(Ok(5), |r| r.parse())?;
    let mb = text.len() as f64 / 1e6;
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let time = |tok: &Tokenizer| {
        let start = Instant::now();
        let n = tok.encode(&text).len();
        (mb / start.elapsed().as_secs_f64(), n)
    };
    let (_, tokens) = time(&tok);
    let warm = median((0..runs).map(|_| time(&tok).0).collect());
    let cold = median((0..runs).map(|_| time(&tok.clone()).0).collect());
    println!(
        "tokenizer={} text={} mb={mb:.2} tokens={tokens} warm_mb_per_s={warm:.2} cold_mb_per_s={cold:.2}",
        args[1], args[2]
    );
    Ok(())
}
