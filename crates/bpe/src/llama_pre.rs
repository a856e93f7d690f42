//! llama.cpp's BPE pre-tokenizers, by `tokenizer.ggml.pre` name: the regex list of each type (as in
//! `llama-vocab.cpp`), whether a word that is itself a token skips the merges (`ignore_merges`), and
//! whether tokens are GPT-2 byte-level strings or raw UTF-8 with `▁` for spaces.
//!
//! Like llama.cpp, each regex splits every piece the previous one left, and the regexes llama.cpp
//! has hand-written splitters for (GPT-2, Llama 3, Qwen 2, Qwen 3.5, Kimi-K2, newline runs, AFMoE
//! digit groups) use the equivalent splitters here; the rest run through [`LlamaRegex`].

use std::sync::Arc;

use crate::error::{BpeError, Result};
use crate::llama_regex::LlamaRegex;
use crate::pretokenize::{
    Char, Cl100kFamily, Class, PreTokenizer, Split, char_at, split_cl100k_family,
    split_digits_then, split_gpt2,
};

/// The regexes llama.cpp replaces with hand-written splitters (compared as strings, as it does).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_ICASE: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const NEWLINES: &str = r"[^\n]+|[\n]+";
const KIMI_K2: &str = r"\p{Han}+";
const AFMOE_DIGITS: &str = r"\p{AFMoE_digits}";
const TINY_AYA_DIGITS: &str = r"\d{1,3}(?=(?:\d{3})*\b)";
/// Not a hand-written splitter in llama.cpp, but the same as [`split_digits_then`].
const DIGITS: &str = r"\p{N}";

// Non-ASCII characters in the regexes below are written as `\u{..}` escapes: llama.cpp's source
// holds some characters that Unicode normalization would silently change (U+1F7D, U+212A, ...).

/// The main regex of several pre-types that llama.cpp runs through `std::regex`.
const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GRANITE_EMB_MULTI: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))*((?=[\p{L}\p{M}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))+((?=[\p{L}\p{M}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const CASED_WORDS: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const DEEPSEEK3_WORDS: &str = "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+";
const CJK_KANA: &str = "[\u{4E00}-\u{9FA5}\u{3040}-\u{309F}\u{30A0}-\u{30FF}]+";
const DEEPSEEK_CJK: &str = "[\u{4E00}-\u{9FA5}\u{800}-\u{4E00}\u{AC00}-\u{D7FF}]+";
const PORO: &str = " ?[^(\\s|.,!?\u{2026}\u{3002}\u{FF0C}\u{3001}\u{964}\u{6D4}\u{60C})]+";
const QWEN2_NO_CONTRACTIONS: &str =
    r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How llama.cpp tokenizes the words of one `tokenizer.ggml.pre` type.
#[derive(Clone, Debug)]
pub(crate) struct LlamaPre {
    /// The split of the text into words.
    pub pre_tokenizer: PreTokenizer,
    /// A word that is itself a token is that token, without merges.
    pub ignore_merges: bool,
    /// Tokens are raw UTF-8 with `▁` for spaces and `<0xXX>` byte tokens (Gemma 4), not GPT-2
    /// byte-level strings.
    pub raw_utf8: bool,
    /// Spaces are written `▁` before the merges (with `raw_utf8`).
    pub escape_whitespace: bool,
}

/// The regex list and flags llama.cpp uses for `tokenizer.ggml.pre == name`; an unknown name is an
/// error naming the field and the value, as in llama.cpp.
pub(crate) fn llama_pre(name: &str) -> Result<LlamaPre> {
    let mut ignore_merges = false;
    let mut raw_utf8 = false;
    let mut escape_whitespace = false;
    let regexes: &[&str] = match name {
        "default" => &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" => {
            ignore_merges = true;
            &[LLAMA3]
        }
        "minicpm5" => {
            ignore_merges = true;
            &[
                r"\p{N}{1,3}",
                r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            ]
        }
        "jais-2" => &[
            r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}",
        ],
        "dbrx" | "smaug-bpe" => &[LLAMA3],
        "deepseek-llm" => &[
            "[\r\n]",
            "\\s?[A-Za-z\u{B5}\u{C0}-\u{D6}\u{D8}-\u{F6}\u{F8}-\u{1BA}\u{1BC}-\u{1BF}\u{1C4}-\u{293}\u{295}-\u{2AF}\u{370}-\u{373}\u{376}\u{377}\u{37B}-\u{37D}\u{37F}\u{386}\u{388}-\u{38A}\u{38C}\u{38E}-\u{3A1}\u{3A3}-\u{3F5}\u{3F7}-\u{481}\u{48A}-\u{52F}\u{531}-\u{556}\u{10A0}-\u{10C5}\u{13A0}-\u{13F5}\u{13F8}-\u{13FD}\u{1C90}-\u{1CBA}\u{1CBD}-\u{1CBF}\u{1D00}-\u{1D2B}\u{1D6B}-\u{1D77}\u{1D79}-\u{1D9A}\u{1E00}-\u{1F15}\u{1F18}-\u{1F1D}\u{1F20}-\u{1F45}\u{1F48}-\u{1F4D}\u{1F50}-\u{1F57}\u{1F59}\u{1F5B}\u{1F5D}\u{1F5F}-\u{1F7D}\u{1F80}-\u{1FB4}\u{1FB6}-\u{1FBC}\u{1FBE}\u{1FC2}-\u{1FC4}\u{1FC6}-\u{1FCC}\u{1FD0}-\u{1FD3}\u{1FD6}-\u{1FDB}\u{1FE0}-\u{1FEC}\u{1FF2}-\u{1FF4}\u{1FF6}-\u{1FFC}\u{2102}\u{2107}\u{210A}-\u{2113}\u{2115}\u{2119}-\u{211D}\u{2124}\u{2126}\u{2128}\u{212A}-\u{212D}\u{212F}-\u{2134}\u{2139}\u{213C}-\u{213F}\u{2145}-\u{2149}\u{214E}\u{2183}\u{2184}\u{2C00}-\u{2C7B}\u{2C7E}-\u{2CE4}\u{2CEB}-\u{2CEE}\u{2CF2}\u{2CF3}\u{A640}-\u{A66D}\u{A680}-\u{A69B}\u{A722}-\u{A76F}\u{A771}-\u{A787}\u{A78B}-\u{A78E}\u{AB70}-\u{ABBF}\u{FB00}-\u{FB06}\u{FB13}-\u{FB17}\u{FF21}-\u{FF3A}\u{FF41}-\u{FF5A}\u{10400}-\u{1044F}\u{104B0}-\u{104D3}\u{104D8}-\u{104FB}\u{10C80}-\u{10CB2}\u{10CC0}-\u{10CF2}\u{118A0}-\u{118DF}\u{1E900}-\u{1E943}]+",
            "\\s?[!-/:-~\u{FF01}-\u{FF0F}\u{FF1A}-\u{FF5E}\u{2018}-\u{201F}\u{3000}-\u{3002}]+",
            "\\s+$",
            DEEPSEEK_CJK,
            r"\p{N}+",
        ],
        "deepseek-coder" => &["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", DEEPSEEK_CJK, DIGITS],
        "deepseek-v3" | "hunyuan-dense" | "joyai-llm" | "hy_v4" => {
            &[r"\p{N}{1,3}", CJK_KANA, DEEPSEEK3_WORDS]
        }
        "spark2_5" => &[
            r"\p{N}{1,3}",
            CJK_KANA,
            "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+|[\r\n]|\\s+(?!\\S)|\\s+",
            DIGITS,
        ],
        "youtu" => {
            ignore_merges = true;
            &[
                "[\u{AC00}-\u{D7A3}\u{3131}-\u{318E}]+|[\u{FF01}\u{2026}\u{201C}\u{201D}\u{2018}\u{2019}\u{2014}\u{FF1A}\u{FF1B}\u{FF0C}\u{3001}-\u{303F}\u{FE30}-\u{FE4F}]+|[\u{3105}-\u{312F}]+|[\u{4E00}-\u{9FA5}\u{3040}-\u{309F}\u{30A0}-\u{30FF}]+",
                r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            ]
        }
        "falcon" => &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9][0-9][0-9]"],
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b"
        | "mellum2" => &[DIGITS, GPT2],
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de"
        | "a.x-4.0" | "mellum" | "modern-bert" | "jina-v1-en" | "jina-v2-code" | "roberta-bpe"
        | "exaone4" | "mpt" | "olmo" | "jais" | "trillion" | "granite-docling" => &[GPT2],
        "gemma4" | "granite-embed-multi-311m" | "sarvam-moe" => {
            raw_utf8 = true;
            escape_whitespace = true;
            &[NEWLINES]
        }
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" | "stablelm2" | "hunyuan"
        | "solar-open" | "grok-2" => &[QWEN2],
        "qwen35" => &[QWEN35],
        "poro-chat" | "bloom" | "gpt3-finnish" => &[PORO],
        "chatglm-bpe" => &[LLAMA3],
        "glm4" | "glm5" => {
            ignore_merges = true;
            &[LLAMA3]
        }
        "viking" => &[PORO, DIGITS],
        "tekken" => {
            ignore_merges = true;
            &[TEKKEN]
        }
        "chameleon" => &[
            "<sentinel:[0-9]+>",
            "(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
            r"([\t\n]|    |  )",
            DIGITS,
            r"[\p{P}!-/:-@\[-`{-~]",
            GPT2,
        ],
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => &[GPT4O],
        "granite-embed-multi-97m" => {
            ignore_merges = true;
            &[GRANITE_EMB_MULTI]
        }
        "tiny_aya" | "cohere2moe" => &[TINY_AYA_DIGITS, CASED_WORDS],
        "kimi-k2" => &[KIMI_K2],
        "superbpe" => &[r"\p{N}+", r"(?=(\d{3})+(?!\d))"],
        "bailingmoe" | "bailingmoe2" | "llada-moe" => &[
            r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
        ],
        "seed-coder" => &[
            r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
        "ufakzeka" => &[QWEN2_NO_CONTRACTIONS],
        "afmoe" => &[
            AFMOE_DIGITS,
            "[\u{4E00}-\u{9FFF}\u{3400}-\u{4DBF}\u{8C48}-\u{FAFF}\u{3040}-\u{309F}\u{30A0}-\u{30FF}\u{FF65}-\u{FF9F}\u{2F00}-\u{2FDF}\u{E40}-\u{E7F}\u{E80}-\u{EFF}\u{1780}-\u{17FF}\u{1000}-\u{109F}\u{AA60}-\u{AA7F}\u{A9E0}-\u{A9FF}\u{AC00}-\u{D7AF}\u{1100}-\u{11FF}]+",
            DEEPSEEK3_WORDS,
        ],
        "laguna" => &[NEWLINES, QWEN2],
        "exaone-moe" => &[
            r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+",
        ],
        "whitespace" => {
            raw_utf8 = true;
            &[r"\S+"]
        }
        other => {
            return Err(BpeError::Unsupported(format!(
                "tokenizer.ggml.pre = {other:?} is not a pre-tokenizer type llama.cpp knows"
            )));
        }
    };
    Ok(LlamaPre {
        pre_tokenizer: pre_tokenizer(name, regexes)?,
        ignore_merges,
        raw_utf8,
        escape_whitespace,
    })
}

/// The pre-tokenizer for a regex list, reusing the plain GPT-2 forms where they fit (so that the
/// tokenizer's `tokenizer.json` export stays the familiar one).
fn pre_tokenizer(name: &str, regexes: &[&'static str]) -> Result<PreTokenizer> {
    Ok(match regexes {
        [GPT2] => PreTokenizer::gpt2(),
        [DIGITS, GPT2] => PreTokenizer {
            individual_digits: true,
            ..PreTokenizer::gpt2()
        },
        _ => PreTokenizer::with_split(Split::Llama(Arc::new(LlamaSplit::new(name, regexes)?))),
    })
}

/// One regex of a llama.cpp pre-tokenizer.
#[derive(Debug)]
enum Stage {
    Gpt2,
    Cl100k(Cl100kFamily),
    Digits,
    Newlines,
    KimiK2,
    /// AFMoE's and Tiny Aya's digit grouping (the regex it stands for).
    DigitGroups(&'static str),
    Regex(LlamaRegex),
}

impl Stage {
    fn new(pattern: &'static str) -> Result<Self> {
        let llama = |max_digits, marks| {
            Stage::Cl100k(Cl100kFamily {
                max_digits,
                marks,
                long_s: false,
            })
        };
        Ok(match pattern {
            GPT2 => Stage::Gpt2,
            LLAMA3 | LLAMA3_ICASE => llama(3, false),
            QWEN2 => llama(1, false),
            QWEN35 => llama(1, true),
            DIGITS => Stage::Digits,
            NEWLINES => Stage::Newlines,
            KIMI_K2 => Stage::KimiK2,
            AFMOE_DIGITS | TINY_AYA_DIGITS => Stage::DigitGroups(pattern),
            _ => Stage::Regex(LlamaRegex::new(pattern)?),
        })
    }

    fn split(&self, text: &[u8], base: usize, ends: &mut Vec<usize>) {
        if text.is_empty() {
            return;
        }
        match self {
            Stage::Gpt2 => split_gpt2(text, base, ends),
            Stage::Cl100k(family) => split_cl100k_family(text, base, ends, *family),
            Stage::Digits => split_digits_then(&Split::None, text, base, ends),
            Stage::Newlines => split_newlines(text, base, ends),
            Stage::KimiK2 => split_kimi_k2(text, base, ends),
            Stage::DigitGroups(_) => split_digit_groups(text, base, ends),
            Stage::Regex(re) => re.split(text, base, ends),
        }
    }

    fn pattern(&self) -> &str {
        match self {
            Stage::Gpt2 => GPT2,
            Stage::Cl100k(f) if f.marks => QWEN35,
            Stage::Cl100k(f) if f.max_digits == 1 => QWEN2,
            Stage::Cl100k(_) => LLAMA3,
            Stage::Digits => DIGITS,
            Stage::Newlines => NEWLINES,
            Stage::KimiK2 => KIMI_K2,
            Stage::DigitGroups(pattern) => pattern,
            Stage::Regex(re) => re.pattern(),
        }
    }
}

/// A llama.cpp pre-tokenizer: its regexes, each applied to the pieces the previous one left.
#[derive(Debug)]
pub struct LlamaSplit {
    name: String,
    stages: Vec<Stage>,
}

impl LlamaSplit {
    fn new(name: &str, regexes: &[&'static str]) -> Result<Self> {
        Ok(Self {
            name: name.to_owned(),
            stages: regexes
                .iter()
                .map(|r| Stage::new(r))
                .collect::<Result<_>>()?,
        })
    }

    /// The `tokenizer.ggml.pre` name this split was built for.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The regexes, in order, as llama.cpp writes them.
    pub fn patterns(&self) -> impl Iterator<Item = &str> {
        self.stages.iter().map(Stage::pattern)
    }

    pub(crate) fn split(&self, text: &[u8], base: usize, ends: &mut Vec<usize>) {
        let Some((first, rest)) = self.stages.split_first() else {
            ends.push(base + text.len());
            return;
        };
        if rest.is_empty() {
            first.split(text, base, ends);
            return;
        }
        let mut pieces = Vec::with_capacity(text.len() / 4 + 1);
        first.split(text, 0, &mut pieces);
        for stage in rest {
            let mut next = Vec::with_capacity(pieces.len() * 2);
            let mut start = 0;
            for &end in &pieces {
                stage.split(&text[start..end], start, &mut next);
                start = end;
            }
            pieces = next;
        }
        ends.extend(pieces.into_iter().map(|e| base + e));
    }
}

/// `[^\n]+|[\n]+`: runs of newlines and runs of everything else.
fn split_newlines(text: &[u8], base: usize, ends: &mut Vec<usize>) {
    let mut i = 0;
    while i < text.len() {
        let newline = text[i] == b'\n';
        while i < text.len() && (text[i] == b'\n') == newline {
            i += 1;
        }
        ends.push(base + i);
    }
}

/// llama.cpp's AFMoE / Tiny Aya digit grouping: a run of digits is cut into groups of three from
/// the right; the text before a run joins its first group (llama.cpp's quirk, kept).
fn split_digit_groups(text: &[u8], base: usize, ends: &mut Vec<usize>) {
    let chars = decode(text);
    let mut prev_end = 0;
    let mut push = |end: usize, ends: &mut Vec<usize>| {
        if end > prev_end {
            ends.push(base + end);
            prev_end = end;
        }
    };
    let mut k = 0;
    while k < chars.len() {
        if chars[k].1.class != Class::Number {
            k += 1;
            continue;
        }
        let run_start = k;
        while k < chars.len() && chars[k].1.class == Class::Number {
            k += 1;
        }
        let count = k - run_start;
        let mut cut = run_start + count % 3;
        if cut == run_start {
            cut += 3;
        }
        while cut <= k {
            push(end_of(&chars, text, cut), ends);
            cut += 3;
        }
    }
    push(text.len(), ends);
}

/// The characters of `text` with their byte offsets.
fn decode(text: &[u8]) -> Vec<(usize, Char)> {
    let mut chars = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        let c = char_at(text, i);
        chars.push((i, c));
        i += c.len;
    }
    chars
}

/// Byte offset where character `k` starts (the text's length past the end).
fn end_of(chars: &[(usize, Char)], text: &[u8], k: usize) -> usize {
    chars.get(k).map_or(text.len(), |(i, _)| *i)
}

/// llama.cpp's hand-written Kimi-K2 splitter: runs of Han characters, then the cl100k-style pattern
/// with Han excluded from letters and contractions after the word.
fn split_kimi_k2(text: &[u8], base: usize, ends: &mut Vec<usize>) {
    let chars = decode(text);
    let n = chars.len();
    let cpt = |k: usize| chars.get(k).map(|(_, c)| c.ch);
    let class = |k: usize| chars.get(k).map(|(_, c)| c.class);
    let is_han = |k: usize| cpt(k).is_some_and(is_han);
    let letter = |k: usize| class(k) == Some(Class::Letter) && !is_han(k);
    let lower = |k: usize| cpt(k).map(|c| if c < 0x80 { c | 0x20 } else { c });
    let mut prev_end = 0;
    let mut push = |end: usize, ends: &mut Vec<usize>| {
        if end > prev_end {
            ends.push(base + end_of(&chars, text, end));
            prev_end = end;
        }
    };
    let mut pos = 0;
    while pos < n {
        let c = chars[pos].1;
        let crlf = c.ch == u32::from(b'\r') || c.ch == u32::from(b'\n');
        if is_han(pos) {
            while is_han(pos) {
                pos += 1;
            }
            push(pos, ends);
            continue;
        }
        let lead = !(crlf || c.class == Class::Letter || c.class == Class::Number);
        if letter(pos) || (lead && letter(pos + 1)) {
            if lead {
                pos += 1;
            }
            while letter(pos) {
                pos += 1;
            }
            if cpt(pos) == Some(u32::from(b'\'')) && pos + 1 < n {
                let (a, b) = (lower(pos + 1), lower(pos + 2).filter(|_| pos + 2 < n));
                let is = |ch: u8| Some(u32::from(ch));
                if [b's', b't', b'm', b'd'].iter().any(|&x| a == is(x)) {
                    pos += 2;
                } else if (a == is(b'r') && b == is(b'e'))
                    || (a == is(b'v') && b == is(b'e'))
                    || (a == is(b'l') && b == is(b'l'))
                {
                    pos += 3;
                }
            }
            push(pos, ends);
            continue;
        }
        if c.class == Class::Number {
            let mut ini = pos;
            while class(pos) == Some(Class::Number) {
                pos += 1;
                if pos - ini >= 3 {
                    push(pos, ends);
                    ini = pos;
                }
            }
            push(pos, ends);
            continue;
        }
        let other = |k: usize| class(k) == Some(Class::Other);
        let start = if c.ch == u32::from(b' ') {
            pos + 1
        } else {
            pos
        };
        if other(start) {
            pos = start;
            while other(pos) {
                pos += 1;
            }
            while matches!(cpt(pos), Some(0x0D | 0x0A)) {
                pos += 1;
            }
            push(pos, ends);
            continue;
        }
        let mut count = 0;
        let mut last_crlf = None;
        while class(pos + count) == Some(Class::Space) {
            if matches!(cpt(pos + count), Some(0x0D | 0x0A)) {
                last_crlf = Some(pos + count + 1);
            }
            count += 1;
        }
        pos = match last_crlf {
            Some(end) => end,
            None if count > 1 && pos + count < n => pos + count - 1,
            None if count > 0 => pos + count,
            None => pos + 1,
        };
        push(pos, ends);
    }
    push(n, ends);
}

/// llama.cpp's `unicode_cpt_is_han`.
fn is_han(ch: u32) -> bool {
    matches!(ch,
        0x4E00..=0x9FFF
        | 0x3400..=0x4DBF
        | 0x20000..=0x2A6DF
        | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F
        | 0x2B820..=0x2CEAF
        | 0x2CEB0..=0x2EBEF
        | 0xF900..=0xFAFF
        | 0x2F800..=0x2FA1F)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every pre-type name llama.cpp knows builds (the regexes all compile).
    #[test]
    fn every_type_builds() {
        for name in NAMES {
            llama_pre(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert!(matches!(
            llama_pre("no-such-type"),
            Err(BpeError::Unsupported(_))
        ));
    }

    fn pieces(split: &Stage, text: &str) -> Vec<String> {
        let mut ends = Vec::new();
        split.split(text.as_bytes(), 0, &mut ends);
        crate::pretokenize::split_at_ends(text, &ends)
    }

    const SAMPLES: &[&str] = &[
        "Hello world",
        " Hello  world!  ",
        "I'm here, you're there; they'll've it's 'quoted' ''s I'M ſ 'ſ",
        "\n\n\nAct One:\nA line of verse, then a blank line.\r\n\r\n  x",
        "numbers 1234567 and ½ and ٣٤٥ then 12ab3",
        "   leading and trailing   \t\n ",
        "tabs\tand\u{a0}nbsp\u{3000}ideographic space",
        "中文字符测试，标点。 emoji 🦙🦙 and e\u{301} combining ह\u{093f}न्दी",
        "(hello) [world] {x} 'single' \"double\" --- ... !!! ?!",
        "Äpfel w048 7tuijk dsdfhu нещо на Български ირიბი",
    ];

    /// The hand-written splitters give what the regex they replace gives through the `std::regex`
    /// path (for GPT-2 and the cl100k family; llama.cpp's hand-written ones are its reference).
    #[test]
    fn hand_written_splitters_match_their_regexes() {
        for pattern in [GPT2, LLAMA3, QWEN2, QWEN35, DIGITS, NEWLINES] {
            let fast = Stage::new(pattern).unwrap();
            let slow = Stage::Regex(LlamaRegex::new(pattern).unwrap());
            for s in SAMPLES {
                assert_eq!(pieces(&fast, s), pieces(&slow, s), "{pattern} on {s:?}");
            }
        }
    }

    #[test]
    fn digit_groups_from_the_right() {
        let s = Stage::DigitGroups(AFMOE_DIGITS);
        assert_eq!(pieces(&s, "1234567"), ["1", "234", "567"]);
        assert_eq!(pieces(&s, "ab123456 x"), ["ab123", "456", " x"]);
    }

    #[test]
    fn kimi_k2_separates_han() {
        let s = Stage::KimiK2;
        assert_eq!(
            pieces(&s, "Hello中文世界 it's 12345"),
            ["Hello", "中文世界", " it's", " ", "123", "45"]
        );
    }

    /// The names accepted in llama.cpp's `llama_vocab::impl::load`.
    const NAMES: &[&str] = &[
        "default",
        "llama3",
        "llama-v3",
        "llama-bpe",
        "falcon3",
        "falcon-h1",
        "pixtral",
        "midm-2.0",
        "lfm2",
        "jina-v5-nano",
        "minicpm5",
        "jais-2",
        "dbrx",
        "smaug-bpe",
        "deepseek-llm",
        "deepseek-coder",
        "deepseek-v3",
        "hunyuan-dense",
        "joyai-llm",
        "hy_v4",
        "spark2_5",
        "youtu",
        "falcon",
        "starcoder",
        "refact",
        "command-r",
        "smollm",
        "codeshell",
        "exaone",
        "minerva-7b",
        "mellum2",
        "gpt-2",
        "phi-2",
        "jina-es",
        "jina-de",
        "gigachat",
        "jina-v2-es",
        "jina-v2-de",
        "a.x-4.0",
        "mellum",
        "modern-bert",
        "jina-v1-en",
        "jina-v2-code",
        "roberta-bpe",
        "exaone4",
        "mpt",
        "olmo",
        "jais",
        "trillion",
        "granite-docling",
        "gemma4",
        "granite-embed-multi-311m",
        "sarvam-moe",
        "qwen2",
        "deepseek-r1-qwen",
        "kormo",
        "f2llmv2",
        "megrez",
        "stablelm2",
        "hunyuan",
        "solar-open",
        "grok-2",
        "qwen35",
        "poro-chat",
        "bloom",
        "gpt3-finnish",
        "chatglm-bpe",
        "glm4",
        "glm5",
        "viking",
        "tekken",
        "chameleon",
        "gpt-4o",
        "llama4",
        "kanana2",
        "talkie",
        "minimax-m2",
        "granite-embed-multi-97m",
        "tiny_aya",
        "cohere2moe",
        "kimi-k2",
        "superbpe",
        "bailingmoe",
        "bailingmoe2",
        "llada-moe",
        "seed-coder",
        "ufakzeka",
        "afmoe",
        "laguna",
        "exaone-moe",
        "whitespace",
    ];
}
