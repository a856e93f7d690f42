//! llama.cpp's general regex path, reproduced: the pre-tokenizer regexes it has no hand-written
//! splitter for run through C++ `std::regex` (ECMAScript), which knows no Unicode classes. llama.cpp
//! works around that by *collapsing* the text: when a regex names `\p{L}`, `\p{N}`, `\p{P}`, `\p{M}`
//! or `\p{S}` (or `\p{Lu}`, `\p{Ll}`, `\p{Lt}`, `\p{Lm}`, `\p{Lo}`, all read as `\p{L}`), every
//! non-ASCII character is replaced by one stand-in per category (non-ASCII whitespace by `\x0B`), and
//! each `\p{..}` by a class of the stand-in plus the ASCII characters of that category. A regex
//! without categories runs on the code points themselves, non-ASCII whitespace again as `\x0B`.
//!
//! This module does the same with `fancy-regex`: stand-ins are private-use characters, and the few
//! escapes whose meaning differs between ECMAScript and Rust (`\d`, `\w`, `\b`) are spelled out in
//! ASCII. Matches are iterated as `std::regex_iterator` does: after an empty match the search moves
//! on by one character, and unmatched text between matches is a piece of its own.

use unicode_general_category::{GeneralCategory, get_general_category};

use crate::error::{BpeError, Result};
use crate::pretokenize::{Char, Class, INVALID, char_at};

/// The categories llama.cpp collapses, with their stand-in and the ASCII characters they hold.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Category {
    Number,
    Letter,
    Punctuation,
    Mark,
    Symbol,
}

impl Category {
    /// The `\p{..}` names llama.cpp recognizes.
    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "N" => Self::Number,
            "L" | "Lu" | "Ll" | "Lt" | "Lm" | "Lo" => Self::Letter,
            "P" => Self::Punctuation,
            "M" => Self::Mark,
            "S" => Self::Symbol,
            _ => return None,
        })
    }

    /// The private-use character standing for every non-ASCII character of this category.
    fn stand_in(self) -> char {
        match self {
            Self::Number => '\u{E0D1}',
            Self::Letter => '\u{E0D2}',
            Self::Punctuation => '\u{E0D3}',
            Self::Mark => '\u{E0D4}',
            Self::Symbol => '\u{E0D5}',
        }
    }

    /// The ASCII members, as inclusive ranges (llama.cpp's `k_ucat_map`).
    fn ascii(self) -> &'static [(u8, u8)] {
        match self {
            Self::Number => &[(b'0', b'9')],
            Self::Letter => &[(b'A', b'Z'), (b'a', b'z')],
            Self::Punctuation => &[
                (0x21, 0x23),
                (0x25, 0x2A),
                (0x2C, 0x2F),
                (0x3A, 0x3B),
                (0x3F, 0x40),
                (0x5B, 0x5D),
                (0x5F, 0x5F),
                (0x7B, 0x7B),
                (0x7D, 0x7D),
            ],
            Self::Mark => &[],
            Self::Symbol => &[
                (0x24, 0x24),
                (0x2B, 0x2B),
                (0x3C, 0x3E),
                (0x5E, 0x5E),
                (0x60, 0x60),
                (0x7C, 0x7C),
                (0x7E, 0x7E),
            ],
        }
    }

    /// The class items (without brackets) matching this category in collapsed text.
    fn class_items(self) -> String {
        let mut s = format!("\\x{{{:X}}}", u32::from(self.stand_in()));
        for &(lo, hi) in self.ascii() {
            s.push_str(&format!("\\x{{{lo:X}}}"));
            if hi != lo {
                s.push_str(&format!("-\\x{{{hi:X}}}"));
            }
        }
        s
    }
}

/// Stand-in for non-ASCII characters of no collapsed category (separators, controls, unassigned).
const OTHER_STAND_IN: char = '\u{E0D0}';
/// Stand-in for non-ASCII whitespace, in both modes.
const SPACE_STAND_IN: char = '\x0B';

/// Whether a regex names one of the categories llama.cpp collapses (its `k_ucat_enum` search).
fn names_category(pattern: &str) -> bool {
    ["N", "L", "P", "M", "S", "Lu", "Ll", "Lt", "Lm", "Lo"]
        .iter()
        .any(|name| pattern.contains(&format!("\\p{{{name}}}")))
}

/// One pre-tokenizer regex, run the way llama.cpp's `std::regex` fallback runs it.
#[derive(Debug)]
pub struct LlamaRegex {
    pattern: String,
    collapsed: bool,
    regex: fancy_regex::Regex,
}

impl LlamaRegex {
    /// Compiles a regex from llama.cpp's table; an error names the pattern and what is wrong.
    pub fn new(pattern: &str) -> Result<Self> {
        let collapsed = names_category(pattern);
        let bad =
            |why: String| BpeError::Unsupported(format!("pre-tokenizer regex {pattern:?}: {why}"));
        if collapsed && !pattern.is_ascii() {
            // llama.cpp refuses these too ("Regex includes both unicode categories and non-ASCII characters").
            return Err(bad(
                "mixes Unicode categories with non-ASCII characters".into()
            ));
        }
        let rust = translate(pattern, collapsed).map_err(bad)?;
        let regex = fancy_regex::Regex::new(&rust).map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            pattern: pattern.to_owned(),
            collapsed,
            regex,
        })
    }

    /// The regex as llama.cpp writes it.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// Splits `text` (one piece of the previous stage) at the matches, appending piece ends
    /// (offset by `base`) to `ends`. Unmatched stretches are pieces too; empty matches split.
    pub(crate) fn split(&self, text: &[u8], base: usize, ends: &mut Vec<usize>) {
        if text.is_empty() {
            return;
        }
        let (hay, offsets) = self.haystack(text);
        // `offsets[k]` is the position in `text` of the haystack's byte `k` (at char starts).
        let mut last = base;
        let mut push = |hay_pos: usize| {
            let end = base + offsets[hay_pos];
            if end > last {
                ends.push(end);
                last = end;
            }
        };
        let mut pos = 0;
        let mut after_empty = false;
        loop {
            let found = match self.regex.find_from_pos(&hay, pos) {
                Ok(Some(m)) => Some((m.start(), m.end())),
                // No match, or fancy-regex's backtracking limit: the rest stays one piece.
                Ok(None) | Err(_) => None,
            };
            let Some((start, end)) = found else { break };
            if after_empty && start == pos && start == end {
                // `std::regex_iterator` wants a non-empty match here, else moves on one character.
                match hay[pos..].chars().next() {
                    Some(c) => {
                        pos += c.len_utf8();
                        after_empty = false;
                        continue;
                    }
                    None => break,
                }
            }
            push(start);
            push(end);
            after_empty = start == end;
            pos = end;
        }
        push(hay.len());
    }

    /// The text as the regex sees it, and the map from its byte offsets back to `text`'s.
    fn haystack(&self, text: &[u8]) -> (String, Vec<usize>) {
        let mut hay = String::with_capacity(text.len());
        let mut offsets = Vec::with_capacity(text.len() + 1);
        let mut i = 0;
        while i < text.len() {
            let c = char_at(text, i);
            let stand_in = if self.collapsed { collapse(c) } else { wide(c) };
            for _ in 0..stand_in.len_utf8() {
                offsets.push(i);
            }
            hay.push(stand_in);
            i += c.len;
        }
        offsets.push(text.len());
        (hay, offsets)
    }
}

/// A character of collapsed text (llama.cpp's `text_collapsed`).
fn collapse(c: Char) -> char {
    if c.ch < 0x80 {
        return char::from_u32(c.ch).unwrap_or(OTHER_STAND_IN);
    }
    if c.class == Class::Space {
        return SPACE_STAND_IN;
    }
    // llama.cpp reads an invalid byte as U+FFFD, a symbol.
    let Some(ch) = char::from_u32(c.ch).filter(|_| c.ch != INVALID) else {
        return Category::Symbol.stand_in();
    };
    use GeneralCategory as G;
    let category = match get_general_category(ch) {
        G::UppercaseLetter
        | G::LowercaseLetter
        | G::TitlecaseLetter
        | G::ModifierLetter
        | G::OtherLetter => Category::Letter,
        G::DecimalNumber | G::LetterNumber | G::OtherNumber => Category::Number,
        G::NonspacingMark | G::SpacingMark | G::EnclosingMark => Category::Mark,
        G::ConnectorPunctuation
        | G::DashPunctuation
        | G::OpenPunctuation
        | G::ClosePunctuation
        | G::InitialPunctuation
        | G::FinalPunctuation
        | G::OtherPunctuation => Category::Punctuation,
        G::MathSymbol | G::CurrencySymbol | G::ModifierSymbol | G::OtherSymbol => Category::Symbol,
        _ => return OTHER_STAND_IN,
    };
    category.stand_in()
}

/// A character of the code-point text (llama.cpp's `wtext`).
fn wide(c: Char) -> char {
    if c.ch >= 0x80 && c.class == Class::Space {
        return SPACE_STAND_IN;
    }
    char::from_u32(c.ch).unwrap_or('\u{FFFD}')
}

/// Rewrites an ECMAScript regex from llama.cpp's table into `fancy-regex` syntax with the same
/// meaning on the haystack [`LlamaRegex::haystack`] builds.
fn translate(pattern: &str, collapsed: bool) -> Result<String, String> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = String::with_capacity(pattern.len() * 2);
    let mut inside = false;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\\' {
            let Some(&e) = chars.get(i + 1) else {
                return Err("ends with a backslash".into());
            };
            if e == 'p' && chars.get(i + 2) == Some(&'{') {
                let close = chars[i + 3..]
                    .iter()
                    .position(|&c| c == '}')
                    .map(|p| i + 3 + p)
                    .ok_or("unclosed \\p{")?;
                let name: String = chars[i + 3..close].iter().collect();
                let category = Category::from_name(&name)
                    .filter(|_| collapsed)
                    .ok_or_else(|| format!("unknown category \\p{{{name}}}"))?;
                if inside {
                    out.push_str(&category.class_items());
                } else {
                    out.push('[');
                    out.push_str(&category.class_items());
                    out.push(']');
                }
                i = close + 1;
                continue;
            }
            // ECMAScript's `\d`, `\w`, `\b` are ASCII-only; Rust's are Unicode.
            let ascii = match (e, inside) {
                ('d', false) => Some("[0-9]"),
                ('d', true) => Some("0-9"),
                ('D', false) => Some("[^0-9]"),
                ('w', false) => Some("[0-9A-Za-z_]"),
                ('w', true) => Some("0-9A-Za-z_"),
                ('W', false) => Some("[^0-9A-Za-z_]"),
                ('b', false) => Some("(?-u:\\b)"),
                ('B', false) => Some("(?-u:\\B)"),
                ('D' | 'W' | 'b' | 'B', true) => {
                    return Err(format!("\\{e} inside a character class"));
                }
                _ => None,
            };
            match ascii {
                Some(s) => out.push_str(s),
                None => {
                    out.push('\\');
                    out.push(e);
                }
            }
            i += 2;
            continue;
        }
        match c {
            '[' if inside => out.push_str("\\["),
            '[' => {
                inside = true;
                out.push('[');
                if chars.get(i + 1) == Some(&'^') {
                    out.push('^');
                    i += 1;
                }
            }
            ']' if inside => {
                inside = false;
                out.push(']');
            }
            // Rust's class set operators (`&&`, `--`, `~~`) are plain characters in ECMAScript.
            '&' | '~' if inside => {
                out.push('\\');
                out.push(c);
            }
            '-' if inside && chars.get(i + 1) == Some(&'-') => out.push_str("\\-"),
            c => out.push(c),
        }
        i += 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(pattern: &str, text: &str) -> Vec<String> {
        let re = LlamaRegex::new(pattern).unwrap();
        let mut ends = Vec::new();
        re.split(text.as_bytes(), 0, &mut ends);
        crate::pretokenize::split_at_ends(text, &ends)
    }

    #[test]
    fn categories_collapse_like_llama_cpp() {
        // Non-ASCII uppercase letters are just letters once collapsed: `\p{Lu}` matches `é`.
        assert_eq!(pieces(r"\p{Lu}+", "abÉé1"), ["abÉé", "1"]);
        assert_eq!(pieces(r"\p{N}", "a12٣"), ["a", "1", "2", "٣"]);
        assert_eq!(
            pieces(r"[\p{P}\$\+<=>\^~\|`]+", "a+b.,c"),
            ["a", "+", "b", ".,", "c"]
        );
        // Non-ASCII whitespace is `\s`; `\d` is ASCII only.
        assert_eq!(pieces(r"\s+", "a\u{3000} b"), ["a", "\u{3000} ", "b"]);
        assert_eq!(pieces(r"\d+", "1٣2"), ["1", "٣", "2"]);
    }

    #[test]
    fn empty_matches_split() {
        assert_eq!(
            pieces(r"(?=(\d{3})+(?!\d))", "1234567"),
            ["1", "234", "567"]
        );
    }

    #[test]
    fn literal_non_ascii_classes() {
        assert_eq!(
            pieces(r" ?[^(\s|.,!?…。，、।۔،)]+", "Hei maailma, mitä kuuluu…"),
            ["Hei", " maailma", ",", " mitä", " kuuluu", "…"]
        );
    }

    #[test]
    fn refuses_what_llama_cpp_refuses() {
        assert!(LlamaRegex::new(r"\p{L}é").is_err());
        assert!(LlamaRegex::new(r"\p{Han}+").is_err());
    }
}
