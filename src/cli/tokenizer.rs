//! `kiln tokenizer …`

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args as ClapArgs, Subcommand, ValueEnum};
use kiln::bpe::{BpeTrainer, PreTokenizer, SpecialTokens, Split, Tokenizer, TrainerConfig};

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a byte-level BPE tokenizer and write it as an HF tokenizer.json.
    Train(TrainArgs),
    /// Encode text from stdin; print space-separated ids on stdout.
    Encode(CodecArgs),
    /// Decode space-separated ids from stdin; print the text on stdout.
    Decode(CodecArgs),
    /// Describe a tokenizer: vocabulary, merges, special tokens, pre-tokenizer.
    Info(CodecArgs),
}

/// Pre-tokenizer choices for training.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum PreTokenizerChoice {
    /// GPT-2's regex.
    Gpt2,
    /// GPT-4's cl100k regex (also Llama 3's).
    Cl100k,
    /// No split: BPE runs over whole lines of text.
    None,
}

#[derive(Debug, ClapArgs)]
pub struct TrainArgs {
    /// Size of the final vocabulary (special tokens + 256 bytes + merges).
    #[arg(long, value_name = "N")]
    pub vocab_size: usize,
    /// Only merge pairs seen at least this often.
    #[arg(long, default_value_t = 2, value_name = "F")]
    pub min_frequency: u64,
    /// A special token (repeatable); default: <|endoftext|>.
    #[arg(long = "special", value_name = "TOKEN")]
    pub special: Vec<String>,
    /// How text is split into words before merging.
    #[arg(long, value_enum, default_value_t = PreTokenizerChoice::Gpt2)]
    pub pre_tokenizer: PreTokenizerChoice,
    /// Isolate every digit before splitting (as SmolLM2 and StarCoder do).
    #[arg(long)]
    pub individual_digits: bool,
    /// Where to write tokenizer.json.
    #[arg(long, short, value_name = "PATH")]
    pub output: PathBuf,
    /// Training text files.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

#[derive(Debug, ClapArgs)]
pub struct CodecArgs {
    /// A tokenizer.json, a .gguf model, or a directory with tokenizer.json or vocab.json + merges.txt.
    #[arg(long, short, value_name = "T")]
    pub tokenizer: PathBuf,
    /// Encode: turn special-token text (e.g. <|endoftext|>) into special ids instead of plain text.
    #[arg(long)]
    pub special: bool,
}

pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Train(args) => train(args),
        Command::Encode(args) => encode(args),
        Command::Decode(args) => decode(args),
        Command::Info(args) => info(args),
    }
}

impl PreTokenizerChoice {
    fn build(self, individual_digits: bool) -> PreTokenizer {
        let split = match self {
            PreTokenizerChoice::Gpt2 => Split::Gpt2,
            PreTokenizerChoice::Cl100k => Split::Cl100k,
            PreTokenizerChoice::None => Split::None,
        };
        PreTokenizer {
            individual_digits,
            ..PreTokenizer::with_split(split)
        }
    }
}

/// Trains a tokenizer on `files` and writes it to `output`; shared with `kiln quickstart`.
pub fn train_tokenizer(args: &TrainArgs) -> anyhow::Result<Tokenizer> {
    let special_tokens = if args.special.is_empty() {
        vec!["<|endoftext|>".to_owned()]
    } else {
        args.special.clone()
    };
    let started = Instant::now();
    let mut trainer = BpeTrainer::new(TrainerConfig {
        vocab_size: args.vocab_size,
        min_frequency: args.min_frequency,
        special_tokens,
        pre_tokenizer: args.pre_tokenizer.build(args.individual_digits),
        show_progress: super::interactive(),
    })?;
    trainer.feed_files(&args.files)?;
    let words = trainer.distinct_words();
    let tok = trainer.finish()?;
    tok.save(&args.output)?;
    eprintln!(
        "trained {} tokens ({} merges, {} distinct words) in {:.2}s -> {}",
        tok.vocab_size(),
        tok.parts().merges.len(),
        words,
        started.elapsed().as_secs_f64(),
        args.output.display()
    );
    if tok.vocab_size() < args.vocab_size {
        eprintln!(
            "note: the corpus ran out of pairs seen {} times or more before reaching {} tokens",
            args.min_frequency, args.vocab_size
        );
    }
    Ok(tok)
}

fn train(args: TrainArgs) -> anyhow::Result<()> {
    train_tokenizer(&args).map(|_| ())
}

fn load(path: &PathBuf) -> anyhow::Result<Tokenizer> {
    Tokenizer::from_file(path).with_context(|| format!("loading tokenizer {}", path.display()))
}

fn encode(args: CodecArgs) -> anyhow::Result<()> {
    let tok = load(&args.tokenizer)?;
    let mut input = Vec::new();
    std::io::stdin()
        .read_to_end(&mut input)
        .context("reading stdin")?;
    let specials = if args.special {
        SpecialTokens::Parse
    } else {
        SpecialTokens::AsText
    };
    let ids = tok.encode_bytes(&input, specials);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut line = String::with_capacity(ids.len() * 6);
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            line.push(' ');
        }
        line.push_str(&id.to_string());
    }
    line.push('\n');
    out.write_all(line.as_bytes())?;
    out.flush()?;
    Ok(())
}

fn decode(args: CodecArgs) -> anyhow::Result<()> {
    let tok = load(&args.tokenizer)?;
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .context("reading stdin")?;
    let mut ids = Vec::new();
    for (i, word) in input.split_whitespace().enumerate() {
        match word.parse::<u32>() {
            Ok(id) => ids.push(id),
            Err(_) => bail!("input word {} is {word:?}, not a token id", i + 1),
        }
    }
    let bytes = tok.decode_bytes(&ids)?;
    let mut out = std::io::stdout().lock();
    out.write_all(&bytes)?;
    out.flush()?;
    Ok(())
}

fn info(args: CodecArgs) -> anyhow::Result<()> {
    let tok = load(&args.tokenizer)?;
    let pre = tok.pre_tokenizer();
    println!("vocab size:      {}", tok.vocab_size());
    println!("merges:          {}", tok.parts().merges.len());
    println!(
        "pre-tokenizer:   {}{}",
        pre.split.pattern().unwrap_or("(none)"),
        if pre.individual_digits {
            " (digits isolated first)"
        } else {
            ""
        }
    );
    let specials: Vec<String> = tok
        .added_tokens()
        .iter()
        .map(|t| format!("{}={}", t.content, t.id))
        .collect();
    println!("added tokens:    {}", specials.join(" "));
    println!(
        "end of text id:  {}",
        tok.eot_id().map_or("(none)".into(), |i| i.to_string())
    );
    let missing = tok.unencodable_bytes();
    if !missing.is_empty() {
        println!(
            "bytes without a token (dropped when encoding): {}",
            missing.len()
        );
    }
    Ok(())
}
