//! Crash-safe writes, the one implementation every Kiln artifact goes through (tokenizers, token
//! shards, GGUF files, model directories, checkpoints).
//!
//! A file is written to a sibling temp file, flushed, `fsync`ed, renamed over the target, and the
//! directory is `fsync`ed so the rename itself survives a power cut: readers see the old file or
//! the new one, never a torn one, and a failed write leaves the old file as it was. A directory
//! ([`AtomicDir`]) is assembled under a sibling temp name and renamed into place the same way.
//!
//! ```
//! use std::io::Write;
//!
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("out.txt");
//! kiln_gguf::atomic::write(&path, b"first")?;
//! let mut file = kiln_gguf::atomic::AtomicFile::create(&path)?;
//! file.write_all(b"second")?;
//! drop(file); // not committed: the old content stays, the temp file is removed
//! assert_eq!(std::fs::read(&path)?, b"first");
//! # Ok::<(), std::io::Error>(())
//! ```

use std::fs::File;
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Distinguishes temp names of concurrent writers in one process.
static NEXT_TEMP: AtomicU64 = AtomicU64::new(0);

/// A sibling of `path` that no other writer (process or thread) picks: `.NAME.PID.N.tmp`.
pub fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(|| "kiln".into(), |n| n.to_string_lossy().into_owned());
    let n = NEXT_TEMP.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

/// Makes the directory entries of `dir` (a rename or a new file in it) durable. A no-op where
/// directories cannot be opened for syncing (Windows).
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    match File::open(dir) {
        Ok(d) => match d.sync_all() {
            // Some filesystems refuse fsync on directories; the rename is still atomic there.
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => Ok(()),
            other => other,
        },
        Err(_) if cfg!(windows) => Ok(()),
        Err(e) => Err(e),
    }
}

/// `fsync`s a file written by another library (e.g. inside an [`AtomicDir`] before its commit).
pub fn sync_file(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

fn parent_of(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new(""))
}

fn create_parent(path: &Path) -> io::Result<()> {
    let parent = parent_of(path);
    if parent.as_os_str().is_empty() {
        return Ok(());
    }
    std::fs::create_dir_all(parent)
}

/// A file being written atomically. Bytes go to a temp sibling of the target;
/// [`commit`](Self::commit) publishes them. Dropped without a commit, the temp file is removed and
/// the target is untouched. It is [`Write`] and [`Seek`] (formats that patch a header at the end).
#[derive(Debug)]
pub struct AtomicFile {
    target: PathBuf,
    temp: PathBuf,
    file: Option<BufWriter<File>>,
}

impl AtomicFile {
    /// Starts writing `path` (its parent directories are created).
    pub fn create(path: impl AsRef<Path>) -> io::Result<Self> {
        let target = path.as_ref().to_owned();
        if target.file_name().is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} has no file name", target.display()),
            ));
        }
        create_parent(&target)?;
        let temp = temp_sibling(&target);
        let file = File::create(&temp)?;
        Ok(Self {
            target,
            temp,
            file: Some(BufWriter::with_capacity(1 << 20, file)),
        })
    }

    /// The path the file will have once committed.
    pub fn path(&self) -> &Path {
        &self.target
    }

    fn writer(&mut self) -> io::Result<&mut BufWriter<File>> {
        self.file
            .as_mut()
            .ok_or_else(|| io::Error::other("atomic file already committed"))
    }

    /// Flushes, `fsync`s, renames the temp file over the target and `fsync`s the directory.
    pub fn commit(mut self) -> io::Result<()> {
        let writer = self
            .file
            .take()
            .ok_or_else(|| io::Error::other("atomic file already committed"))?;
        let file = writer
            .into_inner()
            .map_err(io::IntoInnerError::into_error)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&self.temp, &self.target)?;
        sync_dir(parent_of(&self.target))
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer()?.write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.writer()?.write_all(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.writer()?.flush()
    }
}

impl Seek for AtomicFile {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.writer()?.seek(pos)
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// Writes `bytes` to `path` atomically. A path that exists but is not a regular file
/// (`/dev/stdout`, a pipe) is written in place.
pub fn write(path: impl AsRef<Path>, bytes: &[u8]) -> io::Result<()> {
    write_with(path, |w| w.write_all(bytes))
}

/// Writes `path` atomically with what `fill` writes. A path that exists but is not a regular
/// file (`/dev/stdout`, a pipe) is written in place.
pub fn write_with(
    path: impl AsRef<Path>,
    fill: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> io::Result<()> {
    let path = path.as_ref();
    if std::fs::metadata(path).is_ok_and(|m| !m.is_file() && !m.is_dir()) {
        let mut out = BufWriter::new(std::fs::OpenOptions::new().write(true).open(path)?);
        fill(&mut out)?;
        return out.flush();
    }
    let mut file = AtomicFile::create(path)?;
    fill(&mut file)?;
    file.commit()
}

/// A directory assembled under a temp sibling name and renamed into place whole: a crash leaves
/// the previous directory (or none), never a half-written one. Write its files with [`write`](fn@write) /
/// [`AtomicFile`] under [`path`](Self::path). Dropped without a commit, the temp directory is
/// removed.
#[derive(Debug)]
pub struct AtomicDir {
    target: PathBuf,
    temp: PathBuf,
    committed: bool,
}

impl AtomicDir {
    /// Starts assembling the directory `path` (its parents are created).
    pub fn create(path: impl AsRef<Path>) -> io::Result<Self> {
        let target = path.as_ref().to_owned();
        if target.file_name().is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} has no directory name", target.display()),
            ));
        }
        create_parent(&target)?;
        let temp = temp_sibling(&target);
        std::fs::create_dir(&temp)?;
        Ok(Self {
            target,
            temp,
            committed: false,
        })
    }

    /// Where to write the directory's files until it is committed.
    pub fn path(&self) -> &Path {
        &self.temp
    }

    /// The path the directory will have once committed.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// `fsync`s the temp directory and renames it over the target (see [`publish_dir`]).
    pub fn commit(mut self) -> io::Result<()> {
        publish_dir(&self.temp, &self.target)?;
        self.committed = true;
        Ok(())
    }
}

/// Publishes a fully written directory: `fsync`s `staging`, renames it to `target` (an existing
/// `target` is moved aside first and removed after, and put back if the rename fails), then
/// `fsync`s the parent. For directories whose staging name must be known in advance (the ranks
/// of a distributed checkpoint write into one); otherwise use [`AtomicDir`].
pub fn publish_dir(staging: &Path, target: &Path) -> io::Result<()> {
    sync_dir(staging)?;
    let parent = parent_of(target);
    if target.exists() {
        let old = temp_sibling(target);
        std::fs::rename(target, &old)?;
        if let Err(e) = std::fs::rename(staging, target) {
            let _ = std::fs::rename(&old, target);
            return Err(e);
        }
        sync_dir(parent)?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    } else {
        std::fs::rename(staging, target)?;
        sync_dir(parent)
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn write_replaces_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("a.bin");
        write(&path, b"one").unwrap();
        write(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(entries(&dir.path().join("sub")), ["a.bin"]);
    }

    #[test]
    fn a_failed_fill_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.bin");
        write(&path, b"old").unwrap();
        let err = write_with(&path, |w| {
            w.write_all(b"partial")?;
            Err(io::Error::other("serialization failed"))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "serialization failed");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(entries(dir.path()), ["a.bin"]);
    }

    #[test]
    fn seek_patches_a_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.bin");
        let mut f = AtomicFile::create(&path).unwrap();
        f.write_all(&[0; 4]).unwrap();
        f.write_all(b"body").unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.write_all(b"HEAD").unwrap();
        assert!(!path.exists(), "nothing is visible before the commit");
        f.commit().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"HEADbody");
    }

    #[test]
    fn directories_are_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("model");
        for content in ["v1", "v2"] {
            let d = AtomicDir::create(&target).unwrap();
            write(d.path().join("weights"), content.as_bytes()).unwrap();
            assert!(d.path() != target);
            d.commit().unwrap();
            assert_eq!(
                std::fs::read(target.join("weights")).unwrap(),
                content.as_bytes()
            );
        }
        // An abandoned directory leaves the committed one and no temp directory behind.
        let d = AtomicDir::create(&target).unwrap();
        write(d.path().join("weights"), b"v3").unwrap();
        drop(d);
        assert_eq!(std::fs::read(target.join("weights")).unwrap(), b"v2");
        assert_eq!(entries(dir.path()), ["model"]);
    }

    #[test]
    fn non_regular_targets_are_written_in_place() {
        write("/dev/null", b"discarded").unwrap();
    }

    #[test]
    fn concurrent_writers_use_distinct_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shared.bin");
        std::thread::scope(|s| {
            for i in 0..8u8 {
                let path = &path;
                s.spawn(move || write(path, &[i; 1000]).unwrap());
            }
        });
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 1000);
        assert!(
            bytes.iter().all(|&b| b == bytes[0]),
            "one writer's bytes, whole"
        );
    }
}
