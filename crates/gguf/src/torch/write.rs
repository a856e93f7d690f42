//! Writing a checkpoint: the zip layout `torch.save` produces.
//!
//! Records, in PyTorch's order: `archive/data.pkl`, `archive/.format_version` (`1`),
//! `archive/.storage_alignment` (`64`), `archive/byteorder` (`little`), `archive/data/<key>`
//! for each storage in key order, `archive/version` (`3\n`). `archive` is the folder name
//! PyTorch uses when it writes to a stream; readers take whatever folder the first entry is in.

use std::io::{self, Write};

use super::pickle::Pickled;
use super::zip::ZipWriter;

/// The archive's folder.
pub(crate) const ARCHIVE: &str = "archive";

/// Writes the zip archive of a pickled checkpoint. Sizes and offsets from `zip64_at` on use
/// ZIP64 fields (`u32::MAX` outside tests).
pub(crate) fn write_archive(
    out: &mut dyn Write,
    pickled: &Pickled<'_>,
    zip64_at: u64,
) -> io::Result<()> {
    let mut zip = ZipWriter::with_zip64_threshold(out, zip64_at);
    zip.add(&format!("{ARCHIVE}/data.pkl"), &pickled.pickle)?;
    zip.add(&format!("{ARCHIVE}/.format_version"), b"1")?;
    zip.add(&format!("{ARCHIVE}/.storage_alignment"), b"64")?;
    zip.add(&format!("{ARCHIVE}/byteorder"), b"little")?;
    for (key, bytes) in &pickled.storages {
        zip.add(&format!("{ARCHIVE}/data/{key}"), bytes)?;
    }
    zip.add(&format!("{ARCHIVE}/version"), b"3\n")?;
    zip.finish()
}
