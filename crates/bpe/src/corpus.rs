//! Streaming a corpus of text files in bounded chunks, each cut where it cannot change
//! pre-tokenization (see [`crate::pretokenize::is_safe_boundary`]).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{BpeError, Result};
use crate::pretokenize::is_safe_boundary;

/// Default chunk size: 1 MiB.
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;

/// A piece of one document of the corpus.
#[derive(Debug)]
pub struct Chunk {
    /// Index of the file it comes from.
    pub doc: usize,
    /// Whether this chunk starts its document.
    pub doc_start: bool,
    /// Whether this chunk lies after the split point (see [`ChunkReader::split_at`]).
    pub after_split: bool,
    /// The bytes (any bytes; not necessarily valid UTF-8).
    pub bytes: Vec<u8>,
}

/// Reads files one after another in chunks of about `chunk_bytes`, holding at most a few chunks in memory.
pub struct ChunkReader {
    files: Vec<PathBuf>,
    next_file: usize,
    current: Option<File>,
    carry: Vec<u8>,
    chunk_bytes: usize,
    /// Bytes of the corpus handed out so far.
    position: u64,
    split_at: Option<u64>,
    split_done: bool,
    doc_start: bool,
}

/// Total size in bytes of `files`, checking that each can be opened.
pub fn total_bytes(files: &[PathBuf]) -> Result<u64> {
    files.iter().try_fold(0u64, |sum, f| {
        let meta = std::fs::metadata(f).map_err(|e| BpeError::io(f, e))?;
        if meta.is_dir() {
            return Err(BpeError::io(
                f,
                std::io::Error::other("is a directory, expected a text file"),
            ));
        }
        Ok(sum + meta.len())
    })
}

impl ChunkReader {
    /// Reads `files` in order, in chunks of about `chunk_bytes`.
    pub fn new(files: Vec<PathBuf>, chunk_bytes: usize) -> Self {
        Self {
            files,
            next_file: 0,
            current: None,
            carry: Vec::new(),
            chunk_bytes: chunk_bytes.max(1024),
            position: 0,
            split_at: None,
            split_done: false,
            doc_start: false,
        }
    }

    /// Cuts a chunk at the first safe boundary at or after corpus byte `position`; chunks from there
    /// on report `after_split`. Used for train / validation splits.
    pub fn split_at(mut self, position: u64) -> Self {
        self.split_at = Some(position);
        self
    }

    fn path(&self) -> &Path {
        &self.files[self.next_file.saturating_sub(1)]
    }

    /// Reads until `buf` holds at least `want` bytes or the file ends; returns true at end of file.
    fn fill(&mut self, buf: &mut Vec<u8>, want: usize) -> Result<bool> {
        let Some(file) = self.current.as_mut() else {
            return Ok(true);
        };
        while buf.len() < want {
            let old = buf.len();
            buf.resize(want, 0);
            let n = match file.read(&mut buf[old..]) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
                Err(e) => {
                    let path = self.path().to_owned();
                    return Err(BpeError::io(path, e));
                }
            };
            buf.truncate(old + n);
            if n == 0 {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The next chunk, or `None` at the end of the corpus.
    pub fn next_chunk(&mut self) -> Result<Option<Chunk>> {
        loop {
            if self.current.is_none() {
                let Some(path) = self.files.get(self.next_file) else {
                    return Ok(None);
                };
                let file = File::open(path).map_err(|e| BpeError::io(path, e))?;
                self.current = Some(file);
                self.next_file += 1;
                self.doc_start = true;
                self.carry.clear();
            }
            if let Some(split) = self.split_at
                && !self.split_done
                && self.position >= split
            {
                self.split_done = true;
            }
            let mut buf = std::mem::take(&mut self.carry);
            let mut eof = self.fill(&mut buf, self.chunk_bytes)?;
            let mut cut = if eof {
                buf.len()
            } else {
                last_safe_boundary(&buf)
            };
            // No safe boundary (e.g. no newlines): read further, then cut at a UTF-8 boundary.
            while cut == 0 && !eof {
                let want = buf.len() + self.chunk_bytes;
                eof = self.fill(&mut buf, want)?;
                cut = if eof {
                    buf.len()
                } else if buf.len() >= 8 * self.chunk_bytes {
                    char_boundary_before(&buf, buf.len())
                } else {
                    last_safe_boundary(&buf)
                };
            }
            let after_split = self.split_done;
            if let Some(split) = self.split_at
                && !self.split_done
                && self.position + cut as u64 > split
            {
                let from = (split - self.position) as usize;
                if let Some(q) = (from.max(1)..cut).find(|&q| is_safe_boundary(&buf, q)) {
                    cut = q;
                }
                self.split_done = true;
            }
            if buf.is_empty() {
                self.current = None;
                continue;
            }
            self.carry = buf.split_off(cut);
            if eof && self.carry.is_empty() {
                self.current = None;
            }
            self.position += buf.len() as u64;
            let chunk = Chunk {
                doc: self.next_file - 1,
                doc_start: std::mem::take(&mut self.doc_start),
                after_split,
                bytes: buf,
            };
            return Ok(Some(chunk));
        }
    }
}

fn last_safe_boundary(buf: &[u8]) -> usize {
    (1..buf.len())
        .rev()
        .find(|&q| is_safe_boundary(buf, q))
        .unwrap_or(0)
}

fn char_boundary_before(buf: &[u8], mut q: usize) -> usize {
    while q > 0 && q < buf.len() && buf[q] & 0xC0 == 0x80 {
        q -= 1;
    }
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn chunks_reassemble_and_cut_safely() {
        let dir = tempfile::tempdir().unwrap();
        let line = "Some words here, and more.\n\n  Indented line\nnext\n";
        let a = write(dir.path(), "a.txt", &line.repeat(200));
        let b = write(dir.path(), "b.txt", "second doc\nwith two lines");
        let mut reader = ChunkReader::new(vec![a, b], 1024);
        let mut docs = [Vec::new(), Vec::new()];
        let mut starts = 0;
        while let Some(c) = reader.next_chunk().unwrap() {
            if c.doc_start {
                starts += 1;
            }
            assert!(c.bytes.len() <= 2048);
            if c.doc == 0 && docs[0].len() + c.bytes.len() < line.len() * 200 {
                assert!(c.bytes.ends_with(b"\n"));
            }
            docs[c.doc].extend_from_slice(&c.bytes);
        }
        assert_eq!(starts, 2);
        assert_eq!(docs[0], line.repeat(200).as_bytes());
        assert_eq!(docs[1], b"second doc\nwith two lines");
    }

    #[test]
    fn split_point_is_honoured() {
        let dir = tempfile::tempdir().unwrap();
        let text: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        let a = write(dir.path(), "a.txt", &text);
        let split = (text.len() as f64 * 0.9) as u64;
        let mut reader = ChunkReader::new(vec![a], 1024).split_at(split);
        let (mut train, mut val) = (Vec::new(), Vec::new());
        while let Some(c) = reader.next_chunk().unwrap() {
            if c.after_split { &mut val } else { &mut train }.extend_from_slice(&c.bytes);
        }
        assert!(train.len() as u64 >= split && (train.len() as u64) < split + 16);
        assert!(val.starts_with(b"line "));
        assert_eq!([train, val].concat(), text.as_bytes());
    }

    #[test]
    fn missing_file_is_an_error() {
        let mut reader = ChunkReader::new(vec![PathBuf::from("/nonexistent/kiln.txt")], 1024);
        assert!(matches!(reader.next_chunk(), Err(BpeError::Io { .. })));
    }
}
