//! llm.c token shards: an atomic writer and a memory-mapped reader (the
//! trainer's batch sampler reads them through [`TokenShard::read_into`]).
//!
//! The on-disk format is the one written by llm.c's
//! `dev/data/data_common.py::write_datafile` and read by `llmc/dataloader.h`:
//!
//! * a header of [`HEADER_INTS`] (256) little-endian `i32`s: `header[0]` is
//!   [`SHARD_MAGIC`], `header[1]` the version (1: tokens are `u16`, 2: tokens
//!   are `u32`), `header[2]` the number of tokens, the rest zero;
//! * then the tokens, little-endian, two or four bytes each.
//!
//! A valid file is exactly `1024 + n_tokens * width` bytes long.

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use kiln_gguf::atomic::AtomicFile;
use memmap2::Mmap;

/// Magic number in `header[0]` of every llm.c token shard.
pub const SHARD_MAGIC: i32 = 20240520;

/// Number of little-endian `i32`s in a shard header.
pub const HEADER_INTS: usize = 256;

/// Size of a shard header in bytes (`HEADER_INTS * 4`).
pub const HEADER_BYTES: usize = HEADER_INTS * 4;

/// Largest token count a header can record (`header[2]` is an `i32`).
pub const MAX_TOKENS: u64 = i32::MAX as u64;

/// Storage width of the tokens in a shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenWidth {
    /// Two bytes per token (header version 1).
    U16,
    /// Four bytes per token (header version 2).
    U32,
}

impl TokenWidth {
    /// The narrowest width that holds every id of a vocabulary of
    /// `vocab_size` tokens: `U16` when `vocab_size <= 65536`, else `U32`.
    pub fn for_vocab(vocab_size: usize) -> TokenWidth {
        if vocab_size <= 1 << 16 {
            TokenWidth::U16
        } else {
            TokenWidth::U32
        }
    }

    /// Bytes per token: 2 or 4.
    pub fn bytes(&self) -> usize {
        match self {
            TokenWidth::U16 => 2,
            TokenWidth::U32 => 4,
        }
    }

    /// The header version that marks this width: 1 or 2.
    pub fn version(&self) -> i32 {
        match self {
            TokenWidth::U16 => 1,
            TokenWidth::U32 => 2,
        }
    }

    /// The width a header version stands for, if it is a known one.
    pub fn from_version(version: i32) -> Option<TokenWidth> {
        match version {
            1 => Some(TokenWidth::U16),
            2 => Some(TokenWidth::U32),
            _ => None,
        }
    }

    /// Largest token id this width can store.
    pub fn max_token(&self) -> u32 {
        match self {
            TokenWidth::U16 => u32::from(u16::MAX),
            TokenWidth::U32 => u32::MAX,
        }
    }
}

/// Errors from writing or reading token shards.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// An I/O operation on `path` failed.
    #[error("token shard {}: I/O error: {source}", path.display())]
    Io {
        /// The file being read or written.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// `header[0]` is not [`SHARD_MAGIC`].
    #[error(
        "token shard {}: bad magic number {found} (expected {SHARD_MAGIC}); not an llm.c token shard",
        path.display()
    )]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The value found in `header[0]`.
        found: i32,
    },
    /// `header[1]` is neither 1 (`u16` tokens) nor 2 (`u32` tokens).
    #[error(
        "token shard {}: unsupported version {version} (expected 1 for u16 tokens or 2 for u32 tokens)",
        path.display()
    )]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The value found in `header[1]`.
        version: i32,
    },
    /// `header[2]` (the token count) is negative.
    #[error("token shard {}: negative token count {count} in header", path.display())]
    BadTokenCount {
        /// The file.
        path: PathBuf,
        /// The value found in `header[2]`.
        count: i32,
    },
    /// The file is shorter than its header says it should be.
    #[error(
        "token shard {}: truncated: expected {expected_bytes} bytes, found {actual_bytes}",
        path.display()
    )]
    Truncated {
        /// The file.
        path: PathBuf,
        /// The size the header implies (or the header size, if even that is missing).
        expected_bytes: u64,
        /// The file's actual size.
        actual_bytes: u64,
    },
    /// The file is longer than its header says it should be.
    #[error(
        "token shard {}: trailing data: expected {expected_bytes} bytes, found {actual_bytes}",
        path.display()
    )]
    TrailingData {
        /// The file.
        path: PathBuf,
        /// The size the header implies.
        expected_bytes: u64,
        /// The file's actual size.
        actual_bytes: u64,
    },
    /// A token id does not fit the shard's token width.
    #[error("token {token} does not fit in a {width:?} token shard (max {})", width.max_token())]
    TokenTooLarge {
        /// The offending token id.
        token: u32,
        /// The shard's width.
        width: TokenWidth,
    },
    /// Writing would exceed the `i32` token count of the header.
    #[error(
        "token shard {}: {tokens} tokens exceed the header's limit of {MAX_TOKENS}",
        path.display()
    )]
    TooManyTokens {
        /// The file being written.
        path: PathBuf,
        /// The count the write would have reached.
        tokens: u64,
    },
    /// A read of `len` tokens at `start` runs past the end of the shard.
    #[error(
        "token shard {}: read of {len} tokens at {start} is out of range for {tokens} tokens",
        path.display()
    )]
    OutOfRange {
        /// First token requested.
        start: usize,
        /// Number of tokens requested.
        len: usize,
        /// Tokens in the shard.
        tokens: usize,
        /// The file.
        path: PathBuf,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ShardError + '_ {
    move |source| ShardError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Encode an llm.c shard header for `n_tokens` tokens of `width`.
fn encode_header(width: TokenWidth, n_tokens: i32) -> [u8; HEADER_BYTES] {
    let mut header = [0u8; HEADER_BYTES];
    header[0..4].copy_from_slice(&SHARD_MAGIC.to_le_bytes());
    header[4..8].copy_from_slice(&width.version().to_le_bytes());
    header[8..12].copy_from_slice(&n_tokens.to_le_bytes());
    header
}

/// Writes an llm.c token shard atomically ([`kiln_gguf::atomic::AtomicFile`]).
///
/// Tokens go to a temp sibling of `path` behind a placeholder (all-zero) header;
/// [`finish`](ShardWriter::finish) writes the real header, fsyncs and renames the temp file onto
/// `path`. Dropping the writer without finishing removes the temp file, so `path` never holds a
/// partial shard.
#[derive(Debug)]
pub struct ShardWriter {
    path: PathBuf,
    out: Option<AtomicFile>,
    width: TokenWidth,
    count: u64,
    scratch: Vec<u8>,
}

impl ShardWriter {
    /// Start writing a shard of `width` tokens that will appear at `path`
    /// once [`finish`](ShardWriter::finish) succeeds.
    pub fn create(path: impl AsRef<Path>, width: TokenWidth) -> Result<Self, ShardError> {
        let path = path.as_ref().to_path_buf();
        let file = AtomicFile::create(&path).map_err(io_err(&path))?;
        // From here on, dropping the AtomicFile cleans the temp file up on any error.
        let mut writer = ShardWriter {
            path,
            out: Some(file),
            width,
            count: 0,
            scratch: Vec::new(),
        };
        let placeholder = [0u8; HEADER_BYTES];
        writer.write_raw(&placeholder)?;
        Ok(writer)
    }

    fn write_raw(&mut self, bytes: &[u8]) -> Result<(), ShardError> {
        let path = &self.path;
        match self.out.as_mut() {
            Some(out) => out.write_all(bytes).map_err(io_err(path)),
            None => Err(ShardError::Io {
                path: path.clone(),
                source: io::Error::other("shard writer already closed"),
            }),
        }
    }

    /// Append tokens. Fails with [`ShardError::TokenTooLarge`] (writing none
    /// of `tokens`) if one does not fit the width, and with
    /// [`ShardError::TooManyTokens`] past the header's `i32` count.
    pub fn write_tokens(&mut self, tokens: &[u32]) -> Result<(), ShardError> {
        let max = self.width.max_token();
        if let Some(&token) = tokens.iter().find(|&&t| t > max) {
            return Err(ShardError::TokenTooLarge {
                token,
                width: self.width,
            });
        }
        let new_count = self.count.saturating_add(tokens.len() as u64);
        if new_count > MAX_TOKENS {
            return Err(ShardError::TooManyTokens {
                path: self.path.clone(),
                tokens: new_count,
            });
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut result = Ok(());
        for chunk in tokens.chunks(16 * 1024) {
            scratch.clear();
            match self.width {
                TokenWidth::U16 => {
                    for &t in chunk {
                        // Checked above: every token fits in u16.
                        scratch.extend_from_slice(&(t as u16).to_le_bytes());
                    }
                }
                TokenWidth::U32 => {
                    for &t in chunk {
                        scratch.extend_from_slice(&t.to_le_bytes());
                    }
                }
            }
            result = self.write_raw(&scratch);
            if result.is_err() {
                break;
            }
        }
        self.scratch = scratch;
        result?;
        self.count = new_count;
        Ok(())
    }

    /// Number of tokens written so far.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// Whether no tokens have been written yet.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The token width of the shard being written.
    pub fn width(&self) -> TokenWidth {
        self.width
    }

    /// The final path the shard will have after [`finish`](ShardWriter::finish).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write the real header, fsync, and atomically rename the temp file onto
    /// the final path. Returns the number of tokens written. On error the
    /// temp file is removed and the final path is left untouched.
    pub fn finish(mut self) -> Result<u64, ShardError> {
        let path = self.path.clone();
        let Some(mut file) = self.out.take() else {
            return Err(ShardError::Io {
                path,
                source: io::Error::other("shard writer already closed"),
            });
        };
        // `write_tokens` keeps count <= MAX_TOKENS = i32::MAX.
        let count = i32::try_from(self.count).map_err(|_| ShardError::TooManyTokens {
            path: path.clone(),
            tokens: self.count,
        })?;
        let header = encode_header(self.width, count);
        file.seek(SeekFrom::Start(0)).map_err(io_err(&path))?;
        file.write_all(&header).map_err(io_err(&path))?;
        file.commit().map_err(io_err(&path))?;
        Ok(self.count)
    }
}

/// Decode little-endian tokens of `width` from `bytes` into `out`
/// (as many as both hold).
fn decode_into(bytes: &[u8], width: TokenWidth, out: &mut [u32]) {
    match width {
        TokenWidth::U16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = u32::from(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        TokenWidth::U32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
    }
}

fn read_i32(bytes: &[u8], index: usize) -> i32 {
    let mut b = [0u8; 4];
    if let Some(s) = bytes.get(index * 4..index * 4 + 4) {
        b.copy_from_slice(s);
    }
    i32::from_le_bytes(b)
}

/// A memory-mapped, validated llm.c token shard.
///
/// The file must not be modified or truncated while it is open (the usual
/// memory-map caveat); shards are written once by [`ShardWriter`] and then
/// only read.
#[derive(Debug)]
pub struct TokenShard {
    mmap: Mmap,
    width: TokenWidth,
    len: usize,
    path: PathBuf,
}

impl TokenShard {
    /// Open and validate a shard: magic, version, and that the file size is
    /// exactly `1024 + n_tokens * width`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ShardError> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(io_err(&path))?;
        // SAFETY: the mapping is read-only; like every reader of memory-mapped
        // files we rely on the file not being modified while it is mapped
        // (documented on `TokenShard`). Shards are immutable once renamed into
        // place by `ShardWriter`.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io_err(&path))?;
        let actual_bytes = mmap.len() as u64;
        if mmap.len() < HEADER_BYTES {
            return Err(ShardError::Truncated {
                path,
                expected_bytes: HEADER_BYTES as u64,
                actual_bytes,
            });
        }
        let magic = read_i32(&mmap, 0);
        if magic != SHARD_MAGIC {
            return Err(ShardError::BadMagic { path, found: magic });
        }
        let version = read_i32(&mmap, 1);
        let Some(width) = TokenWidth::from_version(version) else {
            return Err(ShardError::UnsupportedVersion { path, version });
        };
        let count = read_i32(&mmap, 2);
        let Ok(n_tokens) = u64::try_from(count) else {
            return Err(ShardError::BadTokenCount { path, count });
        };
        // n_tokens < 2^31 and width <= 4, so this cannot overflow u64.
        let expected_bytes = HEADER_BYTES as u64 + n_tokens * width.bytes() as u64;
        if actual_bytes < expected_bytes {
            return Err(ShardError::Truncated {
                path,
                expected_bytes,
                actual_bytes,
            });
        }
        if actual_bytes > expected_bytes {
            return Err(ShardError::TrailingData {
                path,
                expected_bytes,
                actual_bytes,
            });
        }
        // The whole file is mapped, so n_tokens * width <= mmap.len() fits usize.
        let len = usize::try_from(n_tokens).map_err(|_| ShardError::Truncated {
            path: path.clone(),
            expected_bytes,
            actual_bytes,
        })?;
        Ok(TokenShard {
            mmap,
            width,
            len,
            path,
        })
    }

    /// Number of tokens in the shard.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the shard holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Width of the stored tokens.
    pub fn width(&self) -> TokenWidth {
        self.width
    }

    /// Path the shard was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The token bytes (everything after the header).
    fn data(&self) -> &[u8] {
        self.mmap.get(HEADER_BYTES..).unwrap_or_default()
    }

    /// Bytes of tokens `start..start + n`, if in range.
    fn token_bytes(&self, start: usize, n: usize) -> Option<&[u8]> {
        let end = start.checked_add(n)?;
        if end > self.len {
            return None;
        }
        let w = self.width.bytes();
        self.data().get(start * w..end * w)
    }

    /// Token at index `i`, or `None` past the end.
    pub fn get(&self, i: usize) -> Option<u32> {
        let bytes = self.token_bytes(i, 1)?;
        let mut out = [0u32; 1];
        decode_into(bytes, self.width, &mut out);
        Some(out[0])
    }

    /// Copy tokens `start..start + out.len()` into `out`; fails with
    /// [`ShardError::OutOfRange`] if the window runs past the end.
    pub fn read_into(&self, start: usize, out: &mut [u32]) -> Result<(), ShardError> {
        let bytes = self
            .token_bytes(start, out.len())
            .ok_or_else(|| ShardError::OutOfRange {
                start,
                len: out.len(),
                tokens: self.len,
                path: self.path.clone(),
            })?;
        decode_into(bytes, self.width, out);
        Ok(())
    }

    /// All tokens, decoded into a vector.
    pub fn to_vec(&self) -> Vec<u32> {
        let mut out = vec![0u32; self.len];
        decode_into(self.data(), self.width, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn write_shard(path: &Path, width: TokenWidth, tokens: &[u32]) -> u64 {
        let mut w = ShardWriter::create(path, width).unwrap();
        w.write_tokens(tokens).unwrap();
        w.finish().unwrap()
    }

    /// Bytes of a shard exactly as llm.c's `write_datafile` (numpy) produces them.
    fn llmc_bytes(magic: i32, version: i32, count: i32, toks: &[u32], width: usize) -> Vec<u8> {
        let mut header = [0i32; HEADER_INTS];
        header[0] = magic;
        header[1] = version;
        header[2] = count;
        let mut v: Vec<u8> = header.iter().flat_map(|x| x.to_le_bytes()).collect();
        for &t in toks {
            if width == 2 {
                v.extend_from_slice(&(t as u16).to_le_bytes());
            } else {
                v.extend_from_slice(&t.to_le_bytes());
            }
        }
        v
    }

    fn dir_entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn width_helpers() {
        assert_eq!(TokenWidth::for_vocab(50257), TokenWidth::U16);
        assert_eq!(TokenWidth::for_vocab(65536), TokenWidth::U16);
        assert_eq!(TokenWidth::for_vocab(65537), TokenWidth::U32);
        assert_eq!(TokenWidth::for_vocab(128256), TokenWidth::U32);
        assert_eq!(TokenWidth::U16.bytes(), 2);
        assert_eq!(TokenWidth::U32.bytes(), 4);
        assert_eq!(TokenWidth::U16.version(), 1);
        assert_eq!(TokenWidth::U32.version(), 2);
        assert_eq!(TokenWidth::from_version(2), Some(TokenWidth::U32));
        assert_eq!(TokenWidth::from_version(3), None);
    }

    #[test]
    fn round_trip_u16() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.bin");
        let toks = vec![0, 1, 2, 65535, 50256, 7, 65535, 0];
        let mut w = ShardWriter::create(&path, TokenWidth::U16).unwrap();
        assert!(w.is_empty());
        w.write_tokens(&toks[..3]).unwrap();
        w.write_tokens(&[]).unwrap();
        w.write_tokens(&toks[3..]).unwrap();
        assert_eq!(w.len(), 8);
        assert_eq!(w.finish().unwrap(), 8);
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            1024 + 2 * toks.len() as u64
        );
        let s = TokenShard::open(&path).unwrap();
        assert_eq!(s.len(), 8);
        assert!(!s.is_empty());
        assert_eq!(s.width(), TokenWidth::U16);
        assert_eq!(s.path(), path.as_path());
        assert_eq!(s.to_vec(), toks);
        assert_eq!(s.get(3), Some(65535));
        assert_eq!(s.get(7), Some(0));
        assert_eq!(s.get(8), None);
        assert_eq!(s.get(usize::MAX), None);
        let mut buf = [0u32; 3];
        s.read_into(2, &mut buf).unwrap();
        assert_eq!(buf, [2, 65535, 50256]);
        s.read_into(8, &mut []).unwrap();
        assert!(matches!(
            s.read_into(6, &mut buf),
            Err(ShardError::OutOfRange {
                start: 6,
                len: 3,
                tokens: 8,
                ..
            })
        ));
        assert!(matches!(
            s.read_into(usize::MAX, &mut buf),
            Err(ShardError::OutOfRange { .. })
        ));
        // Only the final file remains.
        assert_eq!(dir_entries(dir.path()), vec!["a.bin".to_string()]);
    }

    #[test]
    fn round_trip_u32() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.bin");
        let toks = vec![0, 65535, 65536, 100000, 128255, u32::MAX, 3];
        assert_eq!(write_shard(&path, TokenWidth::U32, &toks), 7);
        assert_eq!(fs::metadata(&path).unwrap().len(), 1024 + 4 * 7);
        let s = TokenShard::open(&path).unwrap();
        assert_eq!(s.width(), TokenWidth::U32);
        assert_eq!(s.to_vec(), toks);
        assert_eq!(s.get(3), Some(100000));
        let mut buf = [0u32; 2];
        s.read_into(4, &mut buf).unwrap();
        assert_eq!(buf, [128255, u32::MAX]);
    }

    #[test]
    fn empty_shard_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.bin");
        assert_eq!(write_shard(&path, TokenWidth::U16, &[]), 0);
        let s = TokenShard::open(&path).unwrap();
        assert!(s.is_empty());
        assert_eq!(s.to_vec(), Vec::<u32>::new());
        assert_eq!(s.get(0), None);
    }

    #[test]
    fn header_bytes_match_llmc() {
        let dir = tempfile::tempdir().unwrap();
        for (width, toks) in [
            (TokenWidth::U16, vec![0u32, 65535, 42, 50256]),
            (TokenWidth::U32, vec![0u32, 100000, 65535, 7]),
        ] {
            let path = dir.path().join(format!("{width:?}.bin"));
            write_shard(&path, width, &toks);
            let got = fs::read(&path).unwrap();
            let want = llmc_bytes(
                20240520,
                width.version(),
                toks.len() as i32,
                &toks,
                width.bytes(),
            );
            assert_eq!(got, want);
            // Spot-check the raw header ints and that the rest is zero.
            assert_eq!(&got[0..4], &20240520i32.to_le_bytes());
            assert_eq!(&got[0..4], &[0x88, 0xD8, 0x34, 0x01]);
            assert_eq!(&got[4..8], &width.version().to_le_bytes());
            assert_eq!(&got[8..12], &(toks.len() as i32).to_le_bytes());
            assert!(got[12..1024].iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn opens_numpy_written_shard() {
        // What llm.c's write_datafile (numpy) writes for [0, 1, 300, 65535]:
        // header = np.zeros(256, np.int32); header[:3] = 20240520, 1, 4;
        // f.write(header.tobytes()); f.write(np.array(toks, np.uint16).tobytes())
        let mut bytes = vec![0u8; 1024];
        bytes[0..12].copy_from_slice(&[0x88, 0xD8, 0x34, 0x01, 1, 0, 0, 0, 4, 0, 0, 0]);
        bytes.extend_from_slice(&[0x00, 0x00, 0x01, 0x00, 0x2C, 0x01, 0xFF, 0xFF]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("np16.bin");
        fs::write(&path, &bytes).unwrap();
        let s = TokenShard::open(&path).unwrap();
        assert_eq!(s.width(), TokenWidth::U16);
        assert_eq!(s.to_vec(), vec![0, 1, 300, 65535]);

        // Version 2 (uint32) for [100000, 65536, 5].
        let mut bytes = vec![0u8; 1024];
        bytes[0..12].copy_from_slice(&[0x88, 0xD8, 0x34, 0x01, 2, 0, 0, 0, 3, 0, 0, 0]);
        bytes.extend_from_slice(&[
            0xA0, 0x86, 0x01, 0x00, 0x00, 0x00, 0x01, 0x00, 0x05, 0x00, 0x00, 0x00,
        ]);
        let path = dir.path().join("np32.bin");
        fs::write(&path, &bytes).unwrap();
        let s = TokenShard::open(&path).unwrap();
        assert_eq!(s.width(), TokenWidth::U32);
        assert_eq!(s.to_vec(), vec![100000, 65536, 5]);
    }

    #[test]
    fn bad_magic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.bin");
        fs::write(&path, llmc_bytes(20240521, 1, 2, &[1, 2], 2)).unwrap();
        let err = TokenShard::open(&path).unwrap_err();
        assert!(
            matches!(
                err,
                ShardError::BadMagic {
                    found: 20240521,
                    ..
                }
            ),
            "{err}"
        );
        let msg = err.to_string();
        assert!(msg.contains("m.bin") && msg.contains("magic"), "{msg}");
    }

    #[test]
    fn unsupported_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.bin");
        for version in [0, 3, -1, 7] {
            fs::write(&path, llmc_bytes(SHARD_MAGIC, version, 2, &[1, 2], 2)).unwrap();
            let err = TokenShard::open(&path).unwrap_err();
            assert!(
                matches!(err, ShardError::UnsupportedVersion { version: v, .. } if v == version),
                "{err}"
            );
            assert!(err.to_string().contains("v.bin"));
        }
    }

    #[test]
    fn negative_count() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.bin");
        fs::write(&path, llmc_bytes(SHARD_MAGIC, 1, -5, &[], 2)).unwrap();
        assert!(matches!(
            TokenShard::open(&path),
            Err(ShardError::BadTokenCount { count: -5, .. })
        ));
    }

    #[test]
    fn truncated_files() {
        let dir = tempfile::tempdir().unwrap();
        for width in [TokenWidth::U16, TokenWidth::U32] {
            let full_path = dir.path().join("full.bin");
            let toks: Vec<u32> = (0..10).collect();
            write_shard(&full_path, width, &toks);
            let full = fs::read(&full_path).unwrap();
            let total = full.len() as u64;
            assert_eq!(total, 1024 + 10 * width.bytes() as u64);
            let path = dir.path().join("cut.bin");
            for cut in [0usize, 1, 4, 11, 12, 500, 1023] {
                fs::write(&path, &full[..cut]).unwrap();
                let err = TokenShard::open(&path).unwrap_err();
                assert!(
                    matches!(
                        err,
                        ShardError::Truncated { expected_bytes: 1024, actual_bytes, .. }
                            if actual_bytes == cut as u64
                    ),
                    "cut {cut}: {err}"
                );
                assert!(err.to_string().contains("cut.bin"));
            }
            for cut in [1024usize, 1025, full.len() - 1] {
                fs::write(&path, &full[..cut]).unwrap();
                let err = TokenShard::open(&path).unwrap_err();
                assert!(
                    matches!(
                        err,
                        ShardError::Truncated { expected_bytes, actual_bytes, .. }
                            if expected_bytes == total && actual_bytes == cut as u64
                    ),
                    "cut {cut}: {err}"
                );
            }
        }
    }

    #[test]
    fn over_long_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("long.bin");
        for extra in [1usize, 2, 1000] {
            let mut bytes = llmc_bytes(SHARD_MAGIC, 1, 3, &[1, 2, 3], 2);
            bytes.extend(std::iter::repeat_n(0u8, extra));
            fs::write(&path, &bytes).unwrap();
            let err = TokenShard::open(&path).unwrap_err();
            assert!(
                matches!(
                    err,
                    ShardError::TrailingData { expected_bytes: 1030, actual_bytes, .. }
                        if actual_bytes == 1030 + extra as u64
                ),
                "{err}"
            );
        }
    }

    #[test]
    fn missing_file_is_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.bin");
        let err = TokenShard::open(&path).unwrap_err();
        assert!(matches!(err, ShardError::Io { .. }));
        assert!(err.to_string().contains("nope.bin"));
    }

    #[test]
    fn token_too_large_for_u16() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.bin");
        let mut w = ShardWriter::create(&path, TokenWidth::U16).unwrap();
        w.write_tokens(&[1, 2]).unwrap();
        let err = w.write_tokens(&[3, 70000, 4]).unwrap_err();
        assert!(
            matches!(
                err,
                ShardError::TokenTooLarge {
                    token: 70000,
                    width: TokenWidth::U16
                }
            ),
            "{err}"
        );
        // The failed call wrote nothing; the writer is still usable.
        assert_eq!(w.len(), 2);
        w.write_tokens(&[65535]).unwrap();
        assert_eq!(w.finish().unwrap(), 3);
        assert_eq!(TokenShard::open(&path).unwrap().to_vec(), vec![1, 2, 65535]);

        // 70000 is fine in a U32 shard.
        let mut w = ShardWriter::create(dir.path().join("t32.bin"), TokenWidth::U32).unwrap();
        w.write_tokens(&[70000]).unwrap();
    }

    #[test]
    fn too_many_tokens_for_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.bin");
        let mut w = ShardWriter::create(&path, TokenWidth::U16).unwrap();
        // Pretend i32::MAX - 1 tokens were already written.
        w.count = MAX_TOKENS - 1;
        w.write_tokens(&[1]).unwrap();
        let err = w.write_tokens(&[2]).unwrap_err();
        assert!(
            matches!(err, ShardError::TooManyTokens { tokens, .. } if tokens == MAX_TOKENS + 1),
            "{err}"
        );
        assert_eq!(w.len(), MAX_TOKENS);
        drop(w);
        assert!(dir_entries(dir.path()).is_empty());
    }

    #[test]
    fn drop_without_finish_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.bin");
        {
            let mut w = ShardWriter::create(&path, TokenWidth::U16).unwrap();
            w.write_tokens(&[1, 2, 3]).unwrap();
            // Mid-write, only the temp file exists.
            assert!(!path.exists());
            let entries = dir_entries(dir.path());
            assert!(
                entries.len() == 1
                    && entries[0].starts_with(".d.bin.")
                    && entries[0].ends_with(".tmp"),
                "{entries:?}"
            );
        }
        assert!(!path.exists());
        assert!(dir_entries(dir.path()).is_empty());
    }

    #[test]
    fn unfinished_rewrite_keeps_old_shard() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keep.bin");
        write_shard(&path, TokenWidth::U16, &[9, 8, 7]);
        {
            let mut w = ShardWriter::create(&path, TokenWidth::U16).unwrap();
            w.write_tokens(&[1; 100]).unwrap();
        }
        assert_eq!(TokenShard::open(&path).unwrap().to_vec(), vec![9, 8, 7]);
        // A finished rewrite replaces it.
        write_shard(&path, TokenWidth::U32, &[100000]);
        assert_eq!(TokenShard::open(&path).unwrap().to_vec(), vec![100000]);
        assert_eq!(dir_entries(dir.path()), vec!["keep.bin".to_string()]);
    }

    #[test]
    fn missing_dirs_are_created_and_a_file_in_the_way_is_an_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("new/dir/x.bin");
        let mut w = ShardWriter::create(&nested, TokenWidth::U16).unwrap();
        w.write_tokens(&[5]).unwrap();
        w.finish().unwrap();
        assert_eq!(TokenShard::open(&nested).unwrap().to_vec(), vec![5]);
        let blocker = dir.path().join("file");
        fs::write(&blocker, b"").unwrap();
        let target = blocker.join("x.bin");
        let err = ShardWriter::create(&target, TokenWidth::U16).unwrap_err();
        assert!(
            matches!(&err, ShardError::Io { path, .. } if *path == target),
            "{err}"
        );
    }

    #[test]
    fn error_messages_name_the_problem() {
        let e = ShardError::TokenTooLarge {
            token: 70000,
            width: TokenWidth::U16,
        };
        assert!(e.to_string().contains("70000") && e.to_string().contains("U16"));
        let e = ShardError::Truncated {
            path: PathBuf::from("x/train_000.bin"),
            expected_bytes: 2048,
            actual_bytes: 100,
        };
        let m = e.to_string();
        assert!(m.contains("train_000.bin") && m.contains("2048") && m.contains("100"));
    }
}
