//! GPT-2's reversible byte ↔ printable-character mapping, used by byte-level BPE vocabularies
//! (`vocab.json`, `tokenizer.json`, GGUF `tokenizer.ggml.tokens`) to store arbitrary bytes as text.

use std::sync::OnceLock;

struct Tables {
    byte_to_char: [char; 256],
    /// Indexed by `char as u32` for the 324 code points the mapping uses; `u16::MAX` = unmapped.
    char_to_byte: Vec<u16>,
}

fn tables() -> &'static Tables {
    static TABLES: OnceLock<Tables> = OnceLock::new();
    TABLES.get_or_init(|| {
        let mut byte_to_char = ['\0'; 256];
        let mut next_extra = 256u32;
        for b in 0..=255u8 {
            let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
            let code = if printable {
                u32::from(b)
            } else {
                next_extra += 1;
                next_extra - 1
            };
            byte_to_char[usize::from(b)] = char::from_u32(code).unwrap_or('\0');
        }
        let mut char_to_byte = vec![u16::MAX; 512];
        for (b, c) in byte_to_char.iter().enumerate() {
            char_to_byte[*c as usize] = b as u16;
        }
        Tables {
            byte_to_char,
            char_to_byte,
        }
    })
}

/// The printable character GPT-2 uses to stand for `byte`.
pub fn byte_to_char(byte: u8) -> char {
    tables().byte_to_char[usize::from(byte)]
}

/// The byte a GPT-2 byte-level character stands for, or `None` if `c` is not one of the 256.
pub fn char_to_byte(c: char) -> Option<u8> {
    let t = tables();
    match t.char_to_byte.get(c as usize) {
        Some(&b) if b != u16::MAX => Some(b as u8),
        _ => None,
    }
}

/// Encodes raw bytes as a byte-level token string (e.g. `b" the"` → `"Ġthe"`).
pub fn encode_bytes(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| byte_to_char(b)).collect()
}

/// Decodes a byte-level token string back to raw bytes; `None` if a character is outside the mapping.
pub fn decode_str(token: &str) -> Option<Vec<u8>> {
    token.chars().map(char_to_byte).collect()
}

/// GPT-2's order of the 256 byte tokens: printable bytes first, then the remapped ones.
pub fn gpt2_byte_order() -> impl Iterator<Item = u8> {
    let t = tables();
    let mut order: Vec<u8> = (0..=255u8).collect();
    order.sort_by_key(|&b| t.byte_to_char[usize::from(b)]);
    order.into_iter()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_matches_gpt2() {
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(byte_to_char(b'!'), '!');
        assert_eq!(byte_to_char(0), 'Ā');
        assert_eq!(byte_to_char(0xA0), 'ł');
        assert_eq!(byte_to_char(0xAD), 'Ń');
        for b in 0..=255u8 {
            assert_eq!(char_to_byte(byte_to_char(b)), Some(b));
        }
        assert_eq!(char_to_byte('a'), Some(b'a'));
        assert_eq!(char_to_byte('€'), None);
        assert_eq!(encode_bytes(" the".as_bytes()), "Ġthe");
        assert_eq!(decode_str("Ġthe").as_deref(), Some(&b" the"[..]));
        let order: Vec<u8> = gpt2_byte_order().collect();
        assert_eq!(order[0], b'!');
        assert_eq!(order.len(), 256);
    }
}
