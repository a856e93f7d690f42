//! Pre-tokenization: splitting text into the pieces BPE runs on, before any merge.
//!
//! The GPT-2 and cl100k (GPT-4 / Llama 3) patterns are hand-written state machines that reproduce
//! their regexes exactly (leftmost-first alternation, greedy runs, `\s+(?!\S)` look-ahead), over bytes:
//! an invalid UTF-8 byte is a one-byte "other" character, so any byte string splits losslessly.
//! Any other regex runs through `fancy-regex`.

use std::sync::{Arc, OnceLock};

use unicode_general_category::{GeneralCategory, get_general_category};

pub use crate::llama_pre::LlamaSplit;

/// GPT-2's pre-tokenizer regex (HF `ByteLevel { use_regex: true }`).
pub const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// GPT-4's cl100k pre-tokenizer regex (Llama 3 uses the same one).
pub const CL100K_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Llama 3's spelling of the cl100k regex (same language, written without `(?i:)`).
pub const LLAMA3_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How text is split into pieces before BPE.
#[derive(Clone, Debug)]
pub enum Split {
    /// No split: the whole text is one piece (HF `ByteLevel { use_regex: false }`).
    None,
    /// GPT-2's regex ([`GPT2_PATTERN`]).
    Gpt2,
    /// GPT-4's cl100k regex ([`CL100K_PATTERN`]), also Llama 3's.
    Cl100k,
    /// Any other regex, applied as an HF `Split { behavior: Isolated }`.
    Regex(Arc<RegexSplit>),
    /// llama.cpp's pre-tokenizer for one `tokenizer.ggml.pre` type: a list of regexes applied one
    /// after another, each splitting the pieces of the previous one further.
    Llama(Arc<LlamaSplit>),
}

impl Split {
    /// Picks the fast splitter for a known pattern, or compiles a custom one.
    pub fn from_pattern(pattern: &str) -> Result<Self, Box<fancy_regex::Error>> {
        Ok(match pattern {
            GPT2_PATTERN => Split::Gpt2,
            CL100K_PATTERN | LLAMA3_PATTERN => Split::Cl100k,
            _ => Split::Regex(Arc::new(RegexSplit::new(pattern)?)),
        })
    }

    /// The regex this split stands for (`None` for no split).
    pub fn pattern(&self) -> Option<&str> {
        match self {
            Split::None => None,
            Split::Gpt2 => Some(GPT2_PATTERN),
            Split::Cl100k => Some(CL100K_PATTERN),
            Split::Regex(r) => Some(&r.pattern),
            Split::Llama(_) => None,
        }
    }
}

/// A compiled custom split regex.
#[derive(Debug)]
pub struct RegexSplit {
    pattern: String,
    regex: fancy_regex::Regex,
}

impl RegexSplit {
    /// Compiles `pattern` with `fancy-regex` (look-around supported).
    pub fn new(pattern: &str) -> Result<Self, Box<fancy_regex::Error>> {
        Ok(Self {
            pattern: pattern.to_owned(),
            regex: fancy_regex::Regex::new(pattern).map_err(Box::new)?,
        })
    }
}

/// The full pre-tokenizer: optional digit isolation, then the split pattern.
#[derive(Clone, Debug)]
pub struct PreTokenizer {
    /// Isolate every Unicode number character before splitting (HF `Digits { individual_digits: true }`).
    pub individual_digits: bool,
    /// The split pattern.
    pub split: Split,
    /// Prepend a space when the text does not start with one (HF `ByteLevel { add_prefix_space }`).
    pub add_prefix_space: bool,
}

impl PreTokenizer {
    /// GPT-2's pre-tokenizer.
    pub fn gpt2() -> Self {
        Self::with_split(Split::Gpt2)
    }

    /// A pre-tokenizer that only applies `split`.
    pub fn with_split(split: Split) -> Self {
        Self {
            individual_digits: false,
            split,
            add_prefix_space: false,
        }
    }

    /// Splits `text` into pieces, appending each piece's end offset (relative to `text`) to `ends`.
    /// Pieces are contiguous and cover `text` exactly.
    pub fn split_into(&self, text: &[u8], ends: &mut Vec<usize>) {
        if self.individual_digits {
            split_digits_then(&self.split, text, 0, ends);
        } else {
            split_with(&self.split, text, 0, ends);
        }
    }

    /// Convenience: the pieces of `text` as byte slices.
    pub fn pieces<'t>(&self, text: &'t [u8]) -> Vec<&'t [u8]> {
        let mut ends = Vec::new();
        self.split_into(text, &mut ends);
        let mut start = 0;
        ends.iter()
            .map(|&end| {
                let piece = &text[start..end];
                start = end;
                piece
            })
            .collect()
    }
}

/// Whether a chunk of a longer text may end at `pos` without changing how the whole text splits:
/// true right after a `\n` that is followed by a non-whitespace character. Holds for every split
/// pattern here except `Split::None` and custom regexes, where it is the conventional line cut.
pub fn is_safe_boundary(text: &[u8], pos: usize) -> bool {
    pos > 0
        && pos < text.len()
        && text[pos - 1] == b'\n'
        && char_at(text, pos).class != Class::Space
}

fn split_with(split: &Split, text: &[u8], base: usize, ends: &mut Vec<usize>) {
    if text.is_empty() {
        return;
    }
    match split {
        Split::None => ends.push(base + text.len()),
        Split::Gpt2 => split_gpt2(text, base, ends),
        Split::Cl100k => split_cl100k(text, base, ends),
        Split::Regex(re) => split_regex(&re.regex, text, base, ends),
        Split::Llama(l) => l.split(text, base, ends),
    }
}

/// Isolates every number character (`\p{N}`), splitting the text between them with `split`.
pub(crate) fn split_digits_then(split: &Split, text: &[u8], base: usize, ends: &mut Vec<usize>) {
    let mut segment_start = 0;
    let mut i = 0;
    while i < text.len() {
        let c = char_at(text, i);
        if c.class == Class::Number {
            split_with(split, &text[segment_start..i], base + segment_start, ends);
            ends.push(base + i + c.len);
            segment_start = i + c.len;
        }
        i += c.len;
    }
    split_with(split, &text[segment_start..], base + segment_start, ends);
}

/// GPT-2's pattern (`'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`).
pub(crate) fn split_gpt2(text: &[u8], base: usize, ends: &mut Vec<usize>) {
    let n = text.len();
    let mut i = 0;
    while i < n {
        let c = char_at(text, i);
        let end = 'piece: {
            if c.ch == u32::from(b'\'')
                && let Some(len) = contraction(&text[i + 1..], false, false)
            {
                break 'piece i + 1 + len;
            }
            // ` ?\p{L}+ | ?\p{N}+ | ?[^\s\p{L}\p{N}]+`: a space joins the run that follows it.
            let (start, class) = if c.ch == u32::from(b' ') && i + 1 < n {
                let next = char_at(text, i + 1);
                if next.class == Class::Space {
                    (i, Class::Space)
                } else {
                    (i + 1, next.class)
                }
            } else {
                (i, c.class)
            };
            match class {
                Class::Space => whitespace_end(text, i, false),
                class => run_end(text, start, class, usize::MAX),
            }
        };
        ends.push(base + end);
        i = end;
    }
}

fn split_cl100k(text: &[u8], base: usize, ends: &mut Vec<usize>) {
    split_cl100k_family(text, base, ends, Cl100kFamily::CL100K);
}

/// The variants of the cl100k pattern that llama.cpp writes out by hand (`llama3`, `qwen2`, `qwen35`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Cl100kFamily {
    /// `\p{N}{1,max_digits}`.
    pub max_digits: usize,
    /// Combining marks join letters (`[\p{L}\p{M}]+`, Qwen 3.5).
    pub marks: bool,
    /// `(?i:'s)` also matches U+017F LATIN SMALL LETTER LONG S (regex case folding, as in HF and
    /// tiktoken); llama.cpp lowercases ASCII only.
    pub long_s: bool,
}

impl Cl100kFamily {
    /// GPT-4's cl100k with regex case folding.
    pub const CL100K: Self = Self {
        max_digits: 3,
        marks: false,
        long_s: true,
    };
}

/// The cl100k family of patterns:
/// `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`.
pub(crate) fn split_cl100k_family(
    text: &[u8],
    base: usize,
    ends: &mut Vec<usize>,
    family: Cl100kFamily,
) {
    let n = text.len();
    let letter = |c: Char| c.class == Class::Letter || (family.marks && is_mark(c));
    let other = |c: Char| c.class == Class::Other && !(family.marks && is_mark(c));
    let mut i = 0;
    while i < n {
        let c = char_at(text, i);
        let end = 'piece: {
            if c.ch == u32::from(b'\'')
                && let Some(len) = contraction(&text[i + 1..], true, family.long_s)
            {
                break 'piece i + 1 + len;
            }
            // `[^\r\n\p{L}\p{N}]?\p{L}+`
            if letter(c) {
                break 'piece run_end_by(text, i, letter, usize::MAX);
            }
            let is_crlf = c.ch == u32::from(b'\r') || c.ch == u32::from(b'\n');
            let next = (i + c.len < n).then(|| char_at(text, i + c.len));
            if !is_crlf && c.class != Class::Number && next.is_some_and(letter) {
                break 'piece run_end_by(text, i + c.len, letter, usize::MAX);
            }
            // `\p{N}{1,3}`
            if c.class == Class::Number {
                break 'piece run_end(text, i, Class::Number, family.max_digits);
            }
            // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
            let other_start = if other(c) {
                Some(i)
            } else if c.ch == u32::from(b' ') && next.is_some_and(other) {
                Some(i + 1)
            } else {
                None
            };
            if let Some(start) = other_start {
                let mut end = run_end_by(text, start, other, usize::MAX);
                while end < n && (text[end] == b'\r' || text[end] == b'\n') {
                    end += 1;
                }
                break 'piece end;
            }
            whitespace_end(text, i, true)
        };
        ends.push(base + end);
        i = end;
    }
}

/// Length of the contraction suffix (`s`, `t`, `re`, `ve`, `m`, `ll`, `d`) at the start of `rest`.
fn contraction(rest: &[u8], ignore_case: bool, long_s: bool) -> Option<usize> {
    let lower = |i: usize| -> Option<u8> {
        let b = *rest.get(i)?;
        Some(if ignore_case {
            b.to_ascii_lowercase()
        } else {
            b
        })
    };
    match lower(0)? {
        b's' | b't' | b'm' | b'd' => Some(1),
        b'r' if lower(1) == Some(b'e') => Some(2),
        b'v' if lower(1) == Some(b'e') => Some(2),
        b'l' if lower(1) == Some(b'l') => Some(2),
        // U+017F LATIN SMALL LETTER LONG S case-folds to `s` under `(?i)`.
        0xC5 if ignore_case && long_s && rest.get(1) == Some(&0xBF) => Some(2),
        _ => None,
    }
}

/// End of the run of `class` characters starting at `start`, at most `max_chars` long.
fn run_end(text: &[u8], start: usize, class: Class, max_chars: usize) -> usize {
    run_end_by(text, start, |c| c.class == class, max_chars)
}

/// End of the run of characters satisfying `keep` starting at `start`, at most `max_chars` long.
#[inline]
fn run_end_by(text: &[u8], start: usize, keep: impl Fn(Char) -> bool, max_chars: usize) -> usize {
    let mut j = start;
    let mut count = 0;
    while j < text.len() && count < max_chars {
        let c = char_at(text, j);
        if !keep(c) {
            break;
        }
        j += c.len;
        count += 1;
    }
    j
}

/// End of the whitespace piece starting at `i`: `\s*[\r\n]+` (with `crlf`), else `\s+(?!\S)`, else `\s+`.
fn whitespace_end(text: &[u8], i: usize, crlf: bool) -> usize {
    let mut j = i;
    let mut last_start = i;
    let mut count = 0;
    let mut last_crlf_end = None;
    while j < text.len() {
        let c = char_at(text, j);
        if c.class != Class::Space {
            break;
        }
        if crlf && (c.ch == u32::from(b'\r') || c.ch == u32::from(b'\n')) {
            last_crlf_end = Some(j + c.len);
        }
        last_start = j;
        j += c.len;
        count += 1;
    }
    if let Some(end) = last_crlf_end {
        return end;
    }
    if j == text.len() || count == 1 {
        j
    } else {
        last_start
    }
}

fn split_regex(regex: &fancy_regex::Regex, text: &[u8], base: usize, ends: &mut Vec<usize>) {
    let mut pos = 0;
    while pos < text.len() {
        match std::str::from_utf8(&text[pos..]) {
            Ok(s) => {
                split_regex_str(regex, s, base + pos, ends);
                return;
            }
            Err(e) => {
                let valid = e.valid_up_to();
                if let Ok(s) = std::str::from_utf8(&text[pos..pos + valid]) {
                    split_regex_str(regex, s, base + pos, ends);
                }
                let bad = e.error_len().unwrap_or(text.len() - pos - valid);
                for k in 1..=bad {
                    ends.push(base + pos + valid + k);
                }
                pos += valid + bad;
            }
        }
    }
}

fn split_regex_str(regex: &fancy_regex::Regex, s: &str, base: usize, ends: &mut Vec<usize>) {
    let mut last = 0;
    for m in regex.find_iter(s) {
        // A backtracking limit hit leaves the rest as one piece rather than failing the encode.
        let Ok(m) = m else { break };
        if m.start() > last {
            ends.push(base + m.start());
        }
        if m.end() > m.start() {
            ends.push(base + m.end());
        }
        last = m.end();
    }
    if last < s.len() {
        ends.push(base + s.len());
    }
}

/// The character classes the split patterns distinguish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Class {
    /// `\p{L}`
    Letter,
    /// `\p{N}`
    Number,
    /// `\s` (Unicode White_Space)
    Space,
    /// Everything else, including an invalid UTF-8 byte.
    Other,
}

/// One decoded character: its code point ([`INVALID`] for a byte that is not UTF-8), its length in
/// bytes and its class.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Char {
    pub ch: u32,
    pub len: usize,
    pub class: Class,
}

/// The code point of a byte that does not start a valid UTF-8 sequence.
pub(crate) const INVALID: u32 = u32::MAX;

/// Decodes the character at `i` (which must be `< text.len()`); an invalid sequence is one `Other` byte.
#[inline]
pub(crate) fn char_at(text: &[u8], i: usize) -> Char {
    let b0 = text[i];
    if b0 < 0x80 {
        return Char {
            ch: u32::from(b0),
            len: 1,
            class: ASCII_CLASS[usize::from(b0)],
        };
    }
    let (ch, len) = decode_multibyte(&text[i..]);
    let class = if ch == INVALID {
        Class::Other
    } else {
        class_of(ch)
    };
    Char { ch, len, class }
}

fn decode_multibyte(s: &[u8]) -> (u32, usize) {
    let b0 = s[0];
    let (len, init, min) = match b0 {
        0xC2..=0xDF => (2, u32::from(b0 & 0x1F), 0x80),
        0xE0..=0xEF => (3, u32::from(b0 & 0x0F), 0x800),
        0xF0..=0xF4 => (4, u32::from(b0 & 0x07), 0x10000),
        _ => return (INVALID, 1),
    };
    if s.len() < len {
        return (INVALID, 1);
    }
    let mut ch = init;
    for &b in &s[1..len] {
        if b & 0xC0 != 0x80 {
            return (INVALID, 1);
        }
        ch = (ch << 6) | u32::from(b & 0x3F);
    }
    if ch < min || ch > 0x10FFFF || (0xD800..=0xDFFF).contains(&ch) {
        return (INVALID, 1);
    }
    (ch, len)
}

const ASCII_CLASS: [Class; 128] = {
    let mut t = [Class::Other; 128];
    let mut i = 0;
    while i < 128 {
        let b = i as u8;
        t[i] = if b.is_ascii_alphabetic() {
            Class::Letter
        } else if b.is_ascii_digit() {
            Class::Number
        } else if matches!(b, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r') {
            Class::Space
        } else {
            Class::Other
        };
        i += 1;
    }
    t
};

fn class_of(ch: u32) -> Class {
    static BMP: OnceLock<Vec<Class>> = OnceLock::new();
    if ch < 0x10000 {
        let table = BMP.get_or_init(|| (0..0x10000u32).map(class_of_slow).collect());
        return table[ch as usize];
    }
    class_of_slow(ch)
}

/// Whether `c` is a combining mark (`\p{M}`: Mn, Mc, Me).
pub(crate) fn is_mark(c: Char) -> bool {
    if c.ch < 0x300 || c.class != Class::Other {
        return false;
    }
    static BMP: OnceLock<Vec<u64>> = OnceLock::new();
    let mark = |ch: u32| {
        char::from_u32(ch).is_some_and(|c| {
            matches!(
                get_general_category(c),
                GeneralCategory::NonspacingMark
                    | GeneralCategory::SpacingMark
                    | GeneralCategory::EnclosingMark
            )
        })
    };
    if c.ch < 0x10000 {
        let bits = BMP.get_or_init(|| {
            let mut bits = vec![0u64; 0x10000 / 64];
            for ch in 0..0x10000u32 {
                if mark(ch) {
                    bits[(ch / 64) as usize] |= 1 << (ch % 64);
                }
            }
            bits
        });
        return bits[(c.ch / 64) as usize] >> (c.ch % 64) & 1 == 1;
    }
    mark(c.ch)
}

fn class_of_slow(ch: u32) -> Class {
    let Some(c) = char::from_u32(ch) else {
        return Class::Other;
    };
    if c.is_whitespace() {
        return Class::Space;
    }
    use GeneralCategory as G;
    match get_general_category(c) {
        G::UppercaseLetter
        | G::LowercaseLetter
        | G::TitlecaseLetter
        | G::ModifierLetter
        | G::OtherLetter => Class::Letter,
        G::DecimalNumber | G::LetterNumber | G::OtherNumber => Class::Number,
        _ => Class::Other,
    }
}

/// `text` cut at the piece ends a splitter wrote (for the splitters' tests).
#[cfg(test)]
pub(crate) fn split_at_ends(text: &str, ends: &[usize]) -> Vec<String> {
    let mut start = 0;
    ends.iter()
        .map(|&e| {
            let piece = text[start..e].to_owned();
            start = e;
            piece
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(pre: &PreTokenizer, text: &str) -> Vec<String> {
        pre.pieces(text.as_bytes())
            .into_iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect()
    }

    fn regex_pieces(pattern: &str, text: &str) -> Vec<String> {
        let re = fancy_regex::Regex::new(pattern).unwrap();
        let mut ends = Vec::new();
        split_regex_str(&re, text, 0, &mut ends);
        split_at_ends(text, &ends)
    }

    const SAMPLES: &[&str] = &[
        "Hello world",
        " Hello  world!  ",
        "I'm here, you're there; they'll've it's 'quoted' ''s",
        "I'M HERE YOU'RE ſ 'ſ THEY'LL",
        "\n\n\nAct One:\nA line of verse, then a blank line.\r\n\r\n  x",
        "numbers 1234567 and ½ and ٣٤٥ then 12ab3",
        "   leading and trailing   \t\n ",
        "tabs\tand\u{a0}nbsp\u{3000}ideographic space",
        "中文字符测试，标点。 emoji 🦙🦙 and e\u{301} combining",
        "(hello) [world] {x} 'single' \"double\" --- ... !!! ?!",
        "a\u{2028}b\u{85}c\u{200b}d",
        "Äpfel w048 7tuijk dsdfhu нещо на Български ირიბი",
        "",
        " ",
        "\n",
        "  \n  \n",
    ];

    #[test]
    fn gpt2_matches_its_regex() {
        let pre = PreTokenizer::gpt2();
        for s in SAMPLES {
            assert_eq!(
                pieces(&pre, s),
                regex_pieces(GPT2_PATTERN, s),
                "input {s:?}"
            );
        }
    }

    #[test]
    fn cl100k_matches_its_regex() {
        let pre = PreTokenizer::with_split(Split::Cl100k);
        for s in SAMPLES {
            assert_eq!(
                pieces(&pre, s),
                regex_pieces(CL100K_PATTERN, s),
                "input {s:?}"
            );
            assert_eq!(
                pieces(&pre, s),
                regex_pieces(LLAMA3_PATTERN, s),
                "input {s:?}"
            );
        }
    }

    #[test]
    fn digits_are_isolated_first() {
        let pre = PreTokenizer {
            individual_digits: true,
            ..PreTokenizer::gpt2()
        };
        assert_eq!(
            pieces(&pre, "in 2024, x  12"),
            ["in", " ", "2", "0", "2", "4", ",", " x", "  ", "1", "2"]
        );
    }

    #[test]
    fn invalid_bytes_split_losslessly() {
        let text: &[u8] = b"ok \xff\xfe bad \xe4\xb8 cut";
        for pre in [
            PreTokenizer::gpt2(),
            PreTokenizer::with_split(Split::Cl100k),
        ] {
            let joined: Vec<u8> = pre.pieces(text).concat();
            assert_eq!(joined, text);
        }
    }

    #[test]
    fn safe_boundaries() {
        let t = b"a\n\nb\n c";
        assert!(is_safe_boundary(t, 3));
        assert!(!is_safe_boundary(t, 2));
        assert!(!is_safe_boundary(t, 5));
    }
}
