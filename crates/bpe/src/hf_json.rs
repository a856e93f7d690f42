//! Hugging Face `tokenizer.json` (byte-level BPE both ways; SentencePiece-style BPE read) and GPT-2
//! `vocab.json` + `merges.txt`, both ways.

use std::path::Path;

use serde_json::{Map, Value, json};

use crate::byte_level;
use crate::error::{BpeError, Result};
use crate::pretokenize::{PreTokenizer, Split};
use crate::spm::{self, Merging, SentencePiece};
use crate::tokenizer::{AddedToken, Tokenizer, TokenizerParts};

fn unsupported(what: impl Into<String>) -> BpeError {
    BpeError::Unsupported(what.into())
}

fn json_error(path: &Path, source: serde_json::Error) -> BpeError {
    BpeError::Json {
        path: path.to_owned(),
        source,
    }
}

fn shape_error(path: &Path, msg: &str) -> BpeError {
    json_error(
        path,
        serde_json::Error::io(std::io::Error::other(msg.to_owned())),
    )
}

/// Parses a `tokenizer.json` document; `path` is only used in error messages.
pub fn from_json(text: &str, path: &Path) -> Result<Tokenizer> {
    let root: Value = serde_json::from_str(text).map_err(|e| json_error(path, e))?;
    let model = root
        .get("model")
        .ok_or_else(|| shape_error(path, "no \"model\" field"))?;
    match model.get("type").and_then(Value::as_str) {
        Some("BPE") | None => {}
        Some(other) => {
            return Err(unsupported(format!(
                "model type {other:?} (only BPE is supported)"
            )));
        }
    }
    for key in ["continuing_subword_prefix", "end_of_word_suffix"] {
        if model
            .get(key)
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty())
        {
            return Err(unsupported(format!("BPE {key}")));
        }
    }
    if model
        .get("dropout")
        .and_then(Value::as_f64)
        .is_some_and(|d| d > 0.0)
    {
        return Err(unsupported("BPE dropout"));
    }
    let added = added_tokens(&root, path)?;
    if model.get("byte_fallback").and_then(Value::as_bool) == Some(true) {
        return sentencepiece_bpe(&root, model, added, path);
    }
    if let Some(n) = root.get("normalizer").filter(|n| !n.is_null()) {
        return Err(unsupported(format!("normalizer {}", type_name(n))));
    }
    let pre_tokenizer = parse_pre_tokenizer(root.get("pre_tokenizer").unwrap_or(&Value::Null))?;

    let vocab_obj = model
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or_else(|| shape_error(path, "model.vocab is not an object"))?;
    let mut vocab = Vec::with_capacity(vocab_obj.len());
    for (token, id) in vocab_obj {
        let id = id
            .as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .ok_or_else(|| shape_error(path, &format!("vocab entry {token:?} has no valid id")))?;
        // Added tokens are matched verbatim, not by BPE: their vocabulary entry is only a name.
        if added.iter().any(|t| t.id == id) {
            continue;
        }
        match byte_level::decode_str(token) {
            Some(bytes) => vocab.push((bytes, id)),
            None => {
                return Err(BpeError::InvalidToken {
                    token: token.clone(),
                    id,
                    reason: "not a byte-level token (a character outside GPT-2's byte alphabet)",
                });
            }
        }
    }

    let merges = merge_pairs(model, path)?
        .iter()
        .enumerate()
        .map(|(index, (left, right))| decode_merge(index, left, right))
        .collect::<Result<Vec<_>>>()?;

    Tokenizer::from_parts(TokenizerParts {
        vocab,
        merges,
        eos_id: added
            .iter()
            .find(|t| t.content == "<|endoftext|>")
            .map(|t| t.id),
        added,
        pre_tokenizer,
        ignore_merges: model
            .get("ignore_merges")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        bos_id: None,
    })
}

/// A SentencePiece-style BPE `tokenizer.json` (Llama 2, Mistral, Phi-3, Gemma as `transformers`
/// converts them): `byte_fallback`, tokens in raw UTF-8 with `▁` for spaces, a normalizer that
/// prepends `▁` and writes spaces as `▁` (or a `Metaspace` pre-tokenizer that does both without
/// splitting), merges applied by rank over each stretch of text between added tokens.
fn sentencepiece_bpe(
    root: &Value,
    model: &Value,
    added: Vec<AddedToken>,
    path: &Path,
) -> Result<Tokenizer> {
    let (add_space_prefix, escape_whitespace) = metaspace_rules(root)?;
    let vocab_obj = model
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or_else(|| shape_error(path, "model.vocab is not an object"))?;
    let size = vocab_obj
        .values()
        .filter_map(Value::as_u64)
        .chain(added.iter().map(|t| u64::from(t.id)))
        .max()
        .map_or(0, |m| m as usize + 1);
    let mut tokens = vec![String::new(); size];
    for (token, id) in vocab_obj {
        let id = id
            .as_u64()
            .filter(|&i| (i as usize) < size)
            .ok_or_else(|| shape_error(path, &format!("vocab entry {token:?} has no valid id")))?;
        tokens[id as usize] = token.clone();
    }
    for t in &added {
        tokens[t.id as usize] = t.content.clone();
    }
    // What each id decodes to: a byte token its byte, an added token its text, others with `▁`
    // turned back into spaces.
    let pieces = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| {
            if added.iter().any(|a| a.id as usize == id) {
                t.as_bytes().to_vec()
            } else if let Some(b) = spm::byte_token_value(t) {
                vec![b]
            } else {
                spm::unescape(t)
            }
        })
        .collect();
    let merges: Vec<(Vec<u8>, Vec<u8>)> = merge_pairs(model, path)?
        .into_iter()
        .map(|(a, b)| (a.into_bytes(), b.into_bytes()))
        .collect();
    let (pieces_table, merge_table) = spm::intern_merges(&merges);
    let sp = SentencePiece::new(
        &tokens,
        Merging::Ranks {
            merges: merge_table,
            pieces: pieces_table,
            split: PreTokenizer::with_split(Split::None),
            ignore_merges: model
                .get("ignore_merges")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            newline_words: false,
        },
        add_space_prefix,
        escape_whitespace,
    );
    let id_of = |text: &str| added.iter().find(|t| t.content == text).map(|t| t.id);
    let (bos, eos) = (
        id_of("<s>").or(id_of("<bos>")),
        id_of("</s>").or(id_of("<eos>")),
    );
    Tokenizer::from_sentencepiece(sp, pieces, added, bos, eos)
}

/// `model.merges` as `(left, right)` strings, written `"left right"` or `["left", "right"]`.
fn merge_pairs(model: &Value, path: &Path) -> Result<Vec<(String, String)>> {
    let merges = model
        .get("merges")
        .and_then(Value::as_array)
        .ok_or_else(|| shape_error(path, "model.merges is not an array"))?;
    merges
        .iter()
        .enumerate()
        .map(|(index, m)| {
            match m {
                Value::String(s) => s.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())),
                Value::Array(pair) if pair.len() == 2 => {
                    match (pair[0].as_str(), pair[1].as_str()) {
                        (Some(a), Some(b)) => Some((a.to_owned(), b.to_owned())),
                        _ => None,
                    }
                }
                _ => None,
            }
            .ok_or_else(|| BpeError::BadMerge {
                index,
                merge: m.to_string(),
                reason: "expected \"left right\" or [\"left\", \"right\"]",
            })
        })
        .collect()
}

/// `(add_space_prefix, escape_whitespace)` of a SentencePiece-style tokenizer: a normalizer of
/// `Prepend("▁")` and `Replace(" ", "▁")`, or a non-splitting `Metaspace` pre-tokenizer.
fn metaspace_rules(root: &Value) -> Result<(bool, bool)> {
    let steps = |v: Option<&Value>, list: &str| -> Vec<Value> {
        match v.filter(|v| !v.is_null()) {
            Some(v) if v.get("type").and_then(Value::as_str) == Some("Sequence") => v
                .get(list)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
            Some(v) => vec![v.clone()],
            None => Vec::new(),
        }
    };
    let (mut prepend, mut escape) = (false, false);
    for step in steps(root.get("normalizer"), "normalizers") {
        match step.get("type").and_then(Value::as_str) {
            Some("Prepend") if step.get("prepend").and_then(Value::as_str) == Some("▁") => {
                prepend = true;
            }
            Some("Replace")
                if step.get("content").and_then(Value::as_str) == Some("▁")
                    && step
                        .get("pattern")
                        .and_then(|p| p.get("String"))
                        .and_then(Value::as_str)
                        == Some(" ") =>
            {
                escape = true;
            }
            _ => {
                return Err(unsupported(format!(
                    "normalizer step {} in a byte_fallback (SentencePiece-style) tokenizer",
                    type_name(&step)
                )));
            }
        }
    }
    for step in steps(root.get("pre_tokenizer"), "pretokenizers") {
        match step.get("type").and_then(Value::as_str) {
            Some("Metaspace") if step.get("split").and_then(Value::as_bool) == Some(false) => {
                escape = true;
                prepend |= step
                    .get("prepend_scheme")
                    .and_then(Value::as_str)
                    .is_some_and(|s| s != "never");
            }
            _ => {
                return Err(unsupported(format!(
                    "pre-tokenizer {} in a byte_fallback (SentencePiece-style) tokenizer",
                    type_name(&step)
                )));
            }
        }
    }
    if !escape {
        return Err(unsupported(
            "a byte_fallback BPE without SentencePiece's `▁` for spaces",
        ));
    }
    Ok((prepend, escape))
}

/// The `added_tokens` of a `tokenizer.json`.
fn added_tokens(root: &Value, path: &Path) -> Result<Vec<AddedToken>> {
    Ok(match root.get("added_tokens") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|t| {
                let id = t
                    .get("id")
                    .and_then(Value::as_u64)
                    .and_then(|i| u32::try_from(i).ok());
                let content = t.get("content").and_then(Value::as_str);
                match (id, content) {
                    (Some(id), Some(content)) => Ok(AddedToken {
                        id,
                        content: content.to_owned(),
                        special: t.get("special").and_then(Value::as_bool).unwrap_or(false),
                    }),
                    _ => Err(shape_error(
                        path,
                        "an added token lacks \"id\" or \"content\"",
                    )),
                }
            })
            .collect::<Result<_>>()?,
        _ => Vec::new(),
    })
}

/// Parses merge `index` written as `"left right"` (merges.txt, GGUF, old tokenizer.json files).
pub(crate) fn merge_from_line(index: usize, line: &str) -> Result<(Vec<u8>, Vec<u8>)> {
    let (a, b) = line.split_once(' ').ok_or_else(|| BpeError::BadMerge {
        index,
        merge: line.to_owned(),
        reason: "expected two tokens separated by one space",
    })?;
    decode_merge(index, a, b)
}

/// Decodes the two byte-level strings of merge `index`.
pub(crate) fn decode_merge(index: usize, left: &str, right: &str) -> Result<(Vec<u8>, Vec<u8>)> {
    match (byte_level::decode_str(left), byte_level::decode_str(right)) {
        (Some(a), Some(b)) => Ok((a, b)),
        _ => Err(BpeError::BadMerge {
            index,
            merge: format!("{left} {right}"),
            reason: "not byte-level tokens",
        }),
    }
}

fn type_name(v: &Value) -> String {
    v.get("type")
        .and_then(Value::as_str)
        .unwrap_or("(untyped)")
        .to_owned()
}

fn parse_pre_tokenizer(v: &Value) -> Result<PreTokenizer> {
    let steps: Vec<&Value> = match v.get("type").and_then(Value::as_str) {
        Some("Sequence") => v
            .get("pretokenizers")
            .and_then(Value::as_array)
            .map(|a| a.iter().collect())
            .unwrap_or_default(),
        Some(_) => vec![v],
        None => {
            return Err(unsupported(
                "no ByteLevel pre-tokenizer: not a byte-level BPE tokenizer",
            ));
        }
    };
    let mut pre = PreTokenizer::with_split(Split::None);
    let mut regex: Option<Split> = None;
    let mut byte_level_seen = false;
    for (i, step) in steps.iter().enumerate() {
        match step.get("type").and_then(Value::as_str) {
            Some("Digits") if i == 0 => {
                if step.get("individual_digits").and_then(Value::as_bool) != Some(true) {
                    return Err(unsupported(
                        "Digits pre-tokenizer without individual_digits",
                    ));
                }
                pre.individual_digits = true;
            }
            Some("Split") if regex.is_none() && !byte_level_seen => {
                let pattern = step
                    .get("pattern")
                    .and_then(|p| p.get("Regex"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| unsupported("Split pre-tokenizer without a Regex pattern"))?;
                let behavior = step
                    .get("behavior")
                    .and_then(Value::as_str)
                    .unwrap_or("Isolated");
                if behavior != "Isolated"
                    || step.get("invert").and_then(Value::as_bool) == Some(true)
                {
                    return Err(unsupported(format!(
                        "Split pre-tokenizer with behavior {behavior}"
                    )));
                }
                regex = Some(Split::from_pattern(pattern)?);
            }
            Some("ByteLevel") if i + 1 == steps.len() => {
                byte_level_seen = true;
                pre.add_prefix_space = step
                    .get("add_prefix_space")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                let use_regex = step
                    .get("use_regex")
                    .and_then(Value::as_bool)
                    .unwrap_or(true);
                pre.split = match (use_regex, regex.take()) {
                    (true, None) => Split::Gpt2,
                    (false, Some(split)) => split,
                    (false, None) => Split::None,
                    (true, Some(_)) => {
                        return Err(unsupported(
                            "a Split regex followed by ByteLevel's own regex",
                        ));
                    }
                };
            }
            _ => {
                return Err(unsupported(format!(
                    "pre-tokenizer sequence {}",
                    Value::Array(steps.iter().map(|s| json!(type_name(s))).collect())
                )));
            }
        }
    }
    if !byte_level_seen {
        return Err(unsupported(
            "no ByteLevel pre-tokenizer: not a byte-level BPE tokenizer",
        ));
    }
    Ok(pre)
}

fn byte_level_json(use_regex: bool, add_prefix_space: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": true, "use_regex": use_regex})
}

fn pre_tokenizer_json(pre: &PreTokenizer) -> Value {
    let mut steps = Vec::new();
    if pre.individual_digits {
        steps.push(json!({"type": "Digits", "individual_digits": true}));
    }
    match &pre.split {
        Split::None => steps.push(byte_level_json(false, pre.add_prefix_space)),
        Split::Gpt2 => steps.push(byte_level_json(true, pre.add_prefix_space)),
        split => {
            let patterns: Vec<&str> = match split {
                Split::Llama(l) => l.patterns().collect(),
                other => other.pattern().into_iter().collect(),
            };
            for pattern in patterns {
                steps.push(json!({
                    "type": "Split",
                    "pattern": {"Regex": pattern},
                    "behavior": "Isolated",
                    "invert": false
                }));
            }
            steps.push(byte_level_json(false, pre.add_prefix_space));
        }
    }
    if steps.len() == 1 {
        steps.remove(0)
    } else {
        json!({"type": "Sequence", "pretokenizers": steps})
    }
}

/// Serializes a tokenizer as an HF `tokenizer.json` document.
pub fn to_json(tok: &Tokenizer) -> String {
    let parts = tok.parts();
    let mut vocab_sorted: Vec<&(Vec<u8>, u32)> = parts.vocab.iter().collect();
    vocab_sorted.sort_by_key(|(_, id)| *id);
    let mut vocab = Map::with_capacity(vocab_sorted.len());
    for (bytes, id) in vocab_sorted {
        vocab.insert(byte_level::encode_bytes(bytes), json!(id));
    }
    for t in &parts.added {
        vocab.entry(t.content.clone()).or_insert(json!(t.id));
    }
    let merges: Vec<Value> = parts
        .merges
        .iter()
        .map(|(a, b)| json!([byte_level::encode_bytes(a), byte_level::encode_bytes(b)]))
        .collect();
    let added: Vec<Value> = parts
        .added
        .iter()
        .map(|t| {
            json!({"id": t.id, "content": t.content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": t.special})
        })
        .collect();
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer_json(&parts.pre_tokenizer),
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": parts.ignore_merges, "vocab": vocab, "merges": merges
        }
    });
    // A `Value` always serializes (its map keys are strings); `{:#}` is its pretty form.
    format!("{doc:#}")
}

/// Loads GPT-2-style `vocab.json` + `merges.txt` (GPT-2 pre-tokenizer; `<|endoftext|>`, if present,
/// becomes a special token and the end-of-text id).
pub fn from_vocab_merges(vocab_path: &Path, merges_path: &Path) -> Result<Tokenizer> {
    let vocab_text =
        std::fs::read_to_string(vocab_path).map_err(|e| BpeError::io(vocab_path, e))?;
    let merges_text =
        std::fs::read_to_string(merges_path).map_err(|e| BpeError::io(merges_path, e))?;
    let vocab_map: Map<String, Value> =
        serde_json::from_str(&vocab_text).map_err(|e| json_error(vocab_path, e))?;
    let mut vocab = Vec::with_capacity(vocab_map.len());
    let mut added = Vec::new();
    for (token, id) in &vocab_map {
        let id = id
            .as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .ok_or_else(|| {
                shape_error(
                    vocab_path,
                    &format!("vocab entry {token:?} has no valid id"),
                )
            })?;
        let bytes = byte_level::decode_str(token).ok_or_else(|| BpeError::InvalidToken {
            token: token.clone(),
            id,
            reason: "not a byte-level token",
        })?;
        if token == "<|endoftext|>" {
            added.push(AddedToken {
                id,
                content: token.clone(),
                special: true,
            });
        } else {
            vocab.push((bytes, id));
        }
    }
    let mut merges = Vec::new();
    for (index, line) in merges_text.lines().enumerate() {
        if line.is_empty() || (index == 0 && line.starts_with("#version")) {
            continue;
        }
        merges.push(merge_from_line(index, line)?);
    }
    Tokenizer::from_parts(TokenizerParts {
        vocab,
        merges,
        eos_id: added.first().map(|t| t.id),
        added,
        pre_tokenizer: PreTokenizer::gpt2(),
        ignore_merges: false,
        bos_id: None,
    })
}
