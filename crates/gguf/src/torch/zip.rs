//! The stored-zip subset PyTorch checkpoints use: uncompressed entries, the central directory,
//! ZIP64, and CRC-32.
//!
//! The writer lays entries out exactly as PyTorch's writer (miniz with PyTorch's padding) does:
//! each local header's extra field carries an `FB` padding record so that the entry's data starts
//! at a multiple of 64, entries with data are followed by a data descriptor, and a ZIP64
//! end-of-central-directory record is always written. Besides the central directory, which every
//! zip reader uses, this matters to `torch.load(mmap=True)` (it maps the data in place) and to
//! PyTorch's `calculate_storage_offsets` loader, which computes record offsets from this layout.

use std::collections::HashSet;
use std::io::{self, Write};

use super::error::TorchError;

const LOCAL_SIG: u32 = 0x0403_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const DESCRIPTOR_SIG: u32 = 0x0807_4b50;
const EOCD_SIG: u32 = 0x0605_4b50;
const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const LOCAL_HEADER_LEN: usize = 30;
const CENTRAL_HEADER_LEN: usize = 46;
const EOCD_LEN: usize = 22;
const ZIP64_EXTRA_ID: u16 = 0x0001;
/// Bit 3: sizes and CRC follow the data in a data descriptor. Bit 11: UTF-8 names.
const FLAG_DESCRIPTOR: u16 = 0x0008;
const FLAG_UTF8: u16 = 0x0800;
/// Entry data alignment in files PyTorch writes.
pub(crate) const ALIGNMENT: u64 = 64;

/// CRC-32 (IEEE 802.3, as zip uses), slice-by-8.
pub(crate) fn crc32(data: &[u8]) -> u32 {
    static TABLES: [[u32; 256]; 8] = crc_tables();
    let mut crc = !0u32;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let lo = crc ^ u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        crc = TABLES[7][(lo & 0xff) as usize]
            ^ TABLES[6][((lo >> 8) & 0xff) as usize]
            ^ TABLES[5][((lo >> 16) & 0xff) as usize]
            ^ TABLES[4][(lo >> 24) as usize]
            ^ TABLES[3][c[4] as usize]
            ^ TABLES[2][c[5] as usize]
            ^ TABLES[1][c[6] as usize]
            ^ TABLES[0][c[7] as usize];
    }
    for &b in chunks.remainder() {
        crc = TABLES[0][((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

const fn crc_tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut i = 0;
    while i < 256 {
        let mut k = 1;
        while k < 8 {
            t[k][i] = (t[k - 1][i] >> 8) ^ t[0][(t[k - 1][i] & 0xff) as usize];
            k += 1;
        }
        i += 1;
    }
    t
}

/// One entry of an archive: where its (stored) data lies in the archive's bytes.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub name: String,
    pub start: usize,
    pub len: usize,
    pub crc32: u32,
}

impl Entry {
    /// The entry's data in `archive`.
    pub fn data<'a>(&self, archive: &'a [u8]) -> &'a [u8] {
        &archive[self.start..self.start + self.len]
    }

    /// Fails unless the data's CRC-32 is the recorded one.
    pub fn verify(&self, archive: &[u8]) -> Result<(), TorchError> {
        let found = crc32(self.data(archive));
        if found == self.crc32 {
            Ok(())
        } else {
            Err(TorchError::CrcMismatch {
                entry: self.name.clone(),
                expected: self.crc32,
                found,
            })
        }
    }
}

fn bytes_at<'a>(data: &'a [u8], at: u64, len: usize, what: &str) -> Result<&'a [u8], TorchError> {
    usize::try_from(at)
        .ok()
        .and_then(|at| data.get(at..at.checked_add(len)?))
        .ok_or_else(|| TorchError::Truncated {
            what: what.to_owned(),
            offset: at,
        })
}

fn le16(d: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([d[at], d[at + 1]])
}

fn le32(d: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(d[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(d: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(d[at..at + 8].try_into().expect("8 bytes"))
}

fn corrupt(msg: impl Into<String>) -> TorchError {
    TorchError::CorruptZip(msg.into())
}

/// The archive's directory: central-directory position and entry count.
struct Directory {
    offset: u64,
    size: u64,
    entries: u64,
}

fn find_directory(data: &[u8]) -> Result<Directory, TorchError> {
    if data.len() < EOCD_LEN {
        return Err(TorchError::truncated("end-of-central-directory record", 0));
    }
    let last = data.len() - EOCD_LEN;
    let first = last.saturating_sub(usize::from(u16::MAX));
    let eocd = (first..=last)
        .rev()
        .find(|&p| {
            le32(data, p) == EOCD_SIG
                && p + EOCD_LEN + usize::from(le16(data, p + 20)) <= data.len()
        })
        .ok_or_else(|| corrupt("no end-of-central-directory record (truncated file?)"))?;
    let e = &data[eocd..];
    let mut dir = Directory {
        offset: u64::from(le32(e, 16)),
        size: u64::from(le32(e, 12)),
        entries: u64::from(le16(e, 10)),
    };
    if eocd >= 20 && le32(data, eocd - 20) == ZIP64_LOCATOR_SIG {
        let at = le64(data, eocd - 20 + 8);
        let rec = bytes_at(data, at, 56, "ZIP64 end-of-central-directory record")?;
        if le32(rec, 0) != ZIP64_EOCD_SIG {
            return Err(corrupt("ZIP64 locator does not point at a ZIP64 record"));
        }
        dir = Directory {
            entries: le64(rec, 32),
            size: le64(rec, 40),
            offset: le64(rec, 48),
        };
    } else if le16(e, 4) != 0 || le16(e, 6) != 0 {
        return Err(TorchError::UnsupportedFormat(
            "multi-disk zip archive".into(),
        ));
    }
    Ok(dir)
}

/// The entries of a stored zip archive, in central-directory order. Every range is checked to
/// lie inside `data`; CRCs are not checked here (see [`Entry::verify`]).
pub(crate) fn read_entries(data: &[u8]) -> Result<Vec<Entry>, TorchError> {
    let dir = find_directory(data)?;
    let cd_len = usize::try_from(dir.size).map_err(|_| corrupt("central directory too large"))?;
    let cd = bytes_at(data, dir.offset, cd_len, "central directory")?;
    // Each header takes at least 46 bytes: a bogus count cannot make us allocate much.
    if dir.entries > (cd.len() / CENTRAL_HEADER_LEN) as u64 {
        return Err(corrupt(format!(
            "{} entries cannot fit in a {}-byte central directory",
            dir.entries,
            cd.len()
        )));
    }
    let mut entries = Vec::with_capacity(dir.entries as usize);
    let mut names = HashSet::new();
    let mut pos = 0usize;
    for _ in 0..dir.entries {
        let at = dir.offset + pos as u64;
        let h = bytes_at(
            cd,
            pos as u64,
            CENTRAL_HEADER_LEN,
            "central directory header",
        )
        .map_err(|_| TorchError::truncated("central directory header", at as usize))?;
        if le32(h, 0) != CENTRAL_SIG {
            return Err(corrupt(format!(
                "bad central directory signature at byte {at}"
            )));
        }
        let (flags, method, crc) = (le16(h, 8), le16(h, 10), le32(h, 16));
        let (name_len, extra_len, comment_len) = (
            usize::from(le16(h, 28)),
            usize::from(le16(h, 30)),
            usize::from(le16(h, 32)),
        );
        let var = bytes_at(
            cd,
            (pos + CENTRAL_HEADER_LEN) as u64,
            name_len + extra_len,
            "entry name",
        )
        .map_err(|_| TorchError::truncated("central directory entry", at as usize))?;
        let name = std::str::from_utf8(&var[..name_len])
            .map_err(|_| corrupt(format!("entry name at byte {at} is not UTF-8")))?
            .to_owned();
        if flags & 1 != 0 {
            return Err(TorchError::UnsupportedFormat(format!(
                "encrypted zip entry `{name}`"
            )));
        }
        if method != 0 {
            return Err(TorchError::Compressed {
                entry: name,
                method,
            });
        }
        let mut comp = u64::from(le32(h, 20));
        let mut size = u64::from(le32(h, 24));
        let mut local = u64::from(le32(h, 42));
        let mut extra = &var[name_len..];
        while extra.len() >= 4 {
            let (id, len) = (le16(extra, 0), usize::from(le16(extra, 2)));
            let field = extra.get(4..4 + len).ok_or_else(|| {
                corrupt(format!("entry `{name}`: extra field runs past its header"))
            })?;
            if id == ZIP64_EXTRA_ID {
                // The 64-bit values present are those whose 32-bit field is saturated, in this
                // order.
                let mut values = field.chunks_exact(8).map(|c| le64(c, 0));
                for v in [&mut size, &mut comp, &mut local] {
                    if *v == u64::from(u32::MAX) {
                        *v = values.next().ok_or_else(|| {
                            corrupt(format!("entry `{name}`: ZIP64 extra field is too short"))
                        })?;
                    }
                }
            }
            extra = &extra[4 + len..];
        }
        if comp != size {
            return Err(corrupt(format!(
                "stored entry `{name}` has compressed size {comp} != size {size}"
            )));
        }
        let lh = bytes_at(data, local, LOCAL_HEADER_LEN, "local file header")?;
        if le32(lh, 0) != LOCAL_SIG {
            return Err(corrupt(format!(
                "entry `{name}`: no local header at byte {local}"
            )));
        }
        let (lname, lextra) = (usize::from(le16(lh, 26)), usize::from(le16(lh, 28)));
        let local_name = bytes_at(
            data,
            local + LOCAL_HEADER_LEN as u64,
            lname,
            "local file name",
        )?;
        if local_name != name.as_bytes() {
            return Err(corrupt(format!(
                "entry `{name}`: local header names another file"
            )));
        }
        let start = local + (LOCAL_HEADER_LEN + lname + lextra) as u64;
        let len = usize::try_from(size).map_err(|_| corrupt("entry too large"))?;
        bytes_at(data, start, len, &format!("data of entry `{name}`"))?;
        if !names.insert(name.clone()) {
            return Err(corrupt(format!("duplicate entry `{name}`")));
        }
        entries.push(Entry {
            name,
            start: start as usize,
            len,
            crc32: crc,
        });
        pos += CENTRAL_HEADER_LEN + name_len + extra_len + comment_len;
    }
    Ok(entries)
}

/// Writes a stored zip archive to a byte stream, laid out as PyTorch's writer lays it out.
pub(crate) struct ZipWriter<'w> {
    out: &'w mut dyn Write,
    pos: u64,
    central: Vec<u8>,
    count: u64,
    /// Sizes and offsets at or above this use ZIP64 fields (`u32::MAX`; smaller in tests).
    zip64_at: u64,
}

impl<'w> ZipWriter<'w> {
    /// A writer that switches to ZIP64 fields for sizes and offsets from `zip64_at` on
    /// (`u32::MAX`; tests use small values to exercise the ZIP64 paths on small archives).
    pub fn with_zip64_threshold(out: &'w mut dyn Write, zip64_at: u64) -> Self {
        ZipWriter {
            out,
            pos: 0,
            central: Vec::new(),
            count: 0,
            zip64_at,
        }
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    fn sat32(&self, v: u64) -> u32 {
        if v >= self.zip64_at {
            u32::MAX
        } else {
            v as u32
        }
    }

    /// Appends a stored entry whose data starts at a multiple of [`ALIGNMENT`].
    pub fn add(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        let name_len = u16::try_from(name.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "zip entry name too long"))?;
        let size = data.len() as u64;
        let offset = self.pos;
        let (big_size, big_offset) = (size >= self.zip64_at, offset >= self.zip64_at);
        let zip64 = big_size || big_offset;
        let crc = crc32(data);

        // Local header extra: ZIP64 sizes/offset where needed, then PyTorch's `FB` padding
        // record (4-byte header, then 'Z's) sized so that the data starts aligned.
        let mut extra = Vec::new();
        if zip64 {
            let fields = zip64_fields(big_size, big_offset, size, offset);
            extra.extend_from_slice(&ZIP64_EXTRA_ID.to_le_bytes());
            extra.extend_from_slice(&(fields.len() as u16).to_le_bytes());
            extra.extend_from_slice(&fields);
        }
        let unpadded = offset + (LOCAL_HEADER_LEN + name.len() + extra.len() + 4) as u64;
        let pad = ((ALIGNMENT - unpadded % ALIGNMENT) % ALIGNMENT) as u16;
        extra.extend_from_slice(b"FB");
        extra.extend_from_slice(&pad.to_le_bytes());
        extra.resize(extra.len() + usize::from(pad), b'Z');

        // Entries with data are written as a stream would be (miniz's way): zero CRC and sizes
        // in the local header, the real ones in a data descriptor after the data.
        let descriptor = size > 0;
        let flags = FLAG_UTF8 | if descriptor { FLAG_DESCRIPTOR } else { 0 };
        let version: u16 = if zip64 { 45 } else { 0 };
        let local_size = if big_size { u32::MAX } else { 0 };
        let mut h = Vec::with_capacity(LOCAL_HEADER_LEN + name.len() + extra.len());
        h.extend_from_slice(&LOCAL_SIG.to_le_bytes());
        h.extend_from_slice(&version.to_le_bytes());
        h.extend_from_slice(&flags.to_le_bytes());
        h.extend_from_slice(&[0; 6]); // method (stored), time, date
        h.extend_from_slice(&0u32.to_le_bytes()); // CRC: in the descriptor (0 when empty)
        h.extend_from_slice(&local_size.to_le_bytes());
        h.extend_from_slice(&local_size.to_le_bytes());
        h.extend_from_slice(&name_len.to_le_bytes());
        h.extend_from_slice(&(extra.len() as u16).to_le_bytes());
        h.extend_from_slice(name.as_bytes());
        h.extend_from_slice(&extra);
        self.put(&h)?;
        debug_assert_eq!(self.pos % ALIGNMENT, 0);
        self.put(data)?;
        if descriptor {
            let mut d = Vec::with_capacity(24);
            d.extend_from_slice(&DESCRIPTOR_SIG.to_le_bytes());
            d.extend_from_slice(&crc.to_le_bytes());
            if zip64 {
                d.extend_from_slice(&size.to_le_bytes());
                d.extend_from_slice(&size.to_le_bytes());
            } else {
                d.extend_from_slice(&(size as u32).to_le_bytes());
                d.extend_from_slice(&(size as u32).to_le_bytes());
            }
            self.put(&d)?;
        }

        // Central directory header: ZIP64 extra with the saturated fields only.
        let fields = zip64_fields(big_size, big_offset, size, offset);
        let mut c = Vec::with_capacity(CENTRAL_HEADER_LEN + name.len() + 4 + fields.len());
        c.extend_from_slice(&CENTRAL_SIG.to_le_bytes());
        c.extend_from_slice(&version.to_le_bytes()); // made by
        c.extend_from_slice(&version.to_le_bytes()); // needed
        c.extend_from_slice(&flags.to_le_bytes());
        c.extend_from_slice(&[0; 6]); // method, time, date
        c.extend_from_slice(&crc.to_le_bytes());
        c.extend_from_slice(&self.sat32(size).to_le_bytes());
        c.extend_from_slice(&self.sat32(size).to_le_bytes());
        c.extend_from_slice(&name_len.to_le_bytes());
        let extra_len = if fields.is_empty() {
            0
        } else {
            4 + fields.len()
        };
        c.extend_from_slice(&(extra_len as u16).to_le_bytes());
        c.extend_from_slice(&[0; 10]); // comment length, disk, internal and external attributes
        c.extend_from_slice(&self.sat32(offset).to_le_bytes());
        c.extend_from_slice(name.as_bytes());
        if !fields.is_empty() {
            c.extend_from_slice(&ZIP64_EXTRA_ID.to_le_bytes());
            c.extend_from_slice(&(fields.len() as u16).to_le_bytes());
            c.extend_from_slice(&fields);
        }
        self.central.extend_from_slice(&c);
        self.count += 1;
        Ok(())
    }

    /// Writes the central directory and the (ZIP64 and classic) end records.
    pub fn finish(mut self) -> io::Result<()> {
        let cd_offset = self.pos;
        let central = std::mem::take(&mut self.central);
        self.put(&central)?;
        let cd_size = central.len() as u64;
        let zip64_at = self.pos;
        let mut e = Vec::with_capacity(56 + 20 + EOCD_LEN);
        e.extend_from_slice(&ZIP64_EOCD_SIG.to_le_bytes());
        e.extend_from_slice(&44u64.to_le_bytes()); // size of the rest of the record
        e.extend_from_slice(&0x031eu16.to_le_bytes()); // made by: Unix, 3.0 (as miniz)
        e.extend_from_slice(&45u16.to_le_bytes());
        e.extend_from_slice(&[0; 8]); // disk numbers
        e.extend_from_slice(&self.count.to_le_bytes());
        e.extend_from_slice(&self.count.to_le_bytes());
        e.extend_from_slice(&cd_size.to_le_bytes());
        e.extend_from_slice(&cd_offset.to_le_bytes());
        e.extend_from_slice(&ZIP64_LOCATOR_SIG.to_le_bytes());
        e.extend_from_slice(&0u32.to_le_bytes());
        e.extend_from_slice(&zip64_at.to_le_bytes());
        e.extend_from_slice(&1u32.to_le_bytes());
        let count16 = if self.count >= u64::from(u16::MAX) {
            u16::MAX
        } else {
            self.count as u16
        };
        e.extend_from_slice(&EOCD_SIG.to_le_bytes());
        e.extend_from_slice(&[0; 4]); // disk numbers
        e.extend_from_slice(&count16.to_le_bytes());
        e.extend_from_slice(&count16.to_le_bytes());
        e.extend_from_slice(&self.sat32(cd_size).to_le_bytes());
        e.extend_from_slice(&self.sat32(cd_offset).to_le_bytes());
        e.extend_from_slice(&0u16.to_le_bytes()); // comment length
        self.put(&e)?;
        self.out.flush()
    }
}

/// The ZIP64 extra field's values for an entry: both sizes if they do not fit 32 bits, then the
/// offset if it does not.
fn zip64_fields(big_size: bool, big_offset: bool, size: u64, offset: u64) -> Vec<u8> {
    let mut fields = Vec::new();
    if big_size {
        fields.extend_from_slice(&size.to_le_bytes());
        fields.extend_from_slice(&size.to_le_bytes());
    }
    if big_offset {
        fields.extend_from_slice(&offset.to_le_bytes());
    }
    fields
}
