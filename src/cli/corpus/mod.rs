//! The quickstart's default corpus: the Rust sources of Kiln and of the packages its default
//! `cargo build` compiles, read from the checkout and the cargo registry, offline.
//!
//! The packages come from the workspace's manifests and `Cargo.lock` (the walk in [`resolve`]),
//! not from what happens to be downloaded: dev-dependencies, other platforms' packages and the
//! optional backends (`wgpu`, `cuda`) are never part of it, so the corpus is the same files on a
//! fresh machine, after `cargo test` or after a GPU build. The files are taken in a fixed
//! pseudo-random order (a hash of `name-version/path`) up to a size cap.

mod cfg;
mod lock;
mod manifest;
mod resolve;

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use cfg::Platform;
use lock::Lockfile;
use manifest::{Manifest, Workspace};

/// The chosen files and where they came from.
#[derive(Debug, Clone)]
pub struct Corpus {
    /// The files, in the corpus order.
    pub files: Vec<PathBuf>,
    /// Their total size.
    pub bytes: u64,
    /// Packages of the default build (Kiln's own included).
    pub packages: usize,
    /// Packages with at least one chosen file.
    pub used_packages: usize,
    /// `name-version` of packages of the default build that are not in the registry.
    pub missing: Vec<String>,
    /// The registry's source directories that were searched.
    pub registry: PathBuf,
}

/// A Rust source file of a package, with the key that fixes its place in the order.
struct SourceFile {
    key: String,
    package: usize,
    path: PathBuf,
    bytes: u64,
}

/// The default corpus of the checkout this binary was built from, up to about `max_bytes`.
pub fn default_corpus(max_bytes: u64) -> anyhow::Result<Corpus> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    if !root.join("Cargo.lock").is_file() {
        bail!(
            "the default corpus is read from Kiln's checkout ({}), which is not there (an installed \
             binary?); pass text files instead: kiln quickstart FILE...",
            root.display()
        );
    }
    let registry = cargo_home()
        .context("no cargo home (set CARGO_HOME or HOME), so no default corpus; pass FILE...")?
        .join("registry/src");
    from_checkout(root, &registry, &Platform::current(), max_bytes)
}

/// The default corpus of the workspace at `root`, with registry sources under `registry`
/// (`$CARGO_HOME/registry/src`).
fn from_checkout(
    root: &Path,
    registry: &Path,
    platform: &Platform,
    max_bytes: u64,
) -> anyhow::Result<Corpus> {
    let workspace = Workspace::load(root, platform)?;
    let lock = Lockfile::load(&root.join("Cargo.lock"))?;
    let mut roots = Vec::new();
    for name in &workspace.default_members {
        let Some(i) = lock.member(name) else {
            bail!("Cargo.lock has no workspace package `{name}`: is it up to date? (pass FILE...)");
        };
        roots.push(i);
    }
    let index_dirs = index_dirs(registry);
    let package_dir = |p: usize| -> Option<PathBuf> {
        let pkg = &lock.packages[p];
        if pkg.source.is_none() {
            return workspace
                .members
                .iter()
                .find(|(m, _)| m.name == pkg.name)
                .map(|(_, dir)| dir.clone());
        }
        if !pkg.is_from_registry() {
            return None;
        }
        let dir_name = format!("{}-{}", pkg.name, pkg.version);
        index_dirs
            .iter()
            .map(|d| d.join(&dir_name))
            .find(|d| d.join("Cargo.toml").is_file())
    };
    let mut manifest_error = None;
    let resolved = resolve::default_build(&lock, &roots, |p| {
        let pkg = &lock.packages[p];
        if pkg.source.is_none() {
            return workspace
                .members
                .iter()
                .find(|(m, _)| m.name == pkg.name)
                .map(|(m, _)| m.clone());
        }
        let path = package_dir(p)?.join("Cargo.toml");
        let parsed = std::fs::read_to_string(&path)
            .map_err(anyhow::Error::from)
            .and_then(|text| Manifest::parse(&text, None, platform))
            .with_context(|| format!("reading {}", path.display()));
        match parsed {
            Ok(m) => Some(m),
            Err(e) => {
                manifest_error.get_or_insert(e);
                None
            }
        }
    });
    if let Some(e) = manifest_error {
        return Err(e);
    }

    let mut sources = Vec::new();
    for &p in &resolved.packages {
        let Some(dir) = package_dir(p) else { continue };
        let pkg = &lock.packages[p];
        let src = dir.join("src");
        let mut paths = Vec::new();
        collect_rs(&src, &mut paths);
        for path in paths {
            let rel = path.strip_prefix(&src).unwrap_or(&path);
            let rel = rel.to_string_lossy().replace('\\', "/");
            sources.push(SourceFile {
                key: format!("{}-{}/src/{rel}", pkg.name, pkg.version),
                package: p,
                bytes: std::fs::metadata(&path).map_or(0, |m| m.len()),
                path,
            });
        }
    }
    if sources.is_empty() {
        bail!(
            "no Rust sources of Kiln's dependencies under {}; run `cargo build --release` first, or \
             pass FILE...",
            registry.display()
        );
    }
    sources
        .sort_by(|a, b| (fnv1a(a.key.as_bytes()), &a.key).cmp(&(fnv1a(b.key.as_bytes()), &b.key)));
    let mut corpus = Corpus {
        files: Vec::new(),
        bytes: 0,
        packages: resolved.packages.len() + resolved.unavailable.len(),
        used_packages: 0,
        missing: resolved
            .unavailable
            .iter()
            .map(|&p| format!("{}-{}", lock.packages[p].name, lock.packages[p].version))
            .collect(),
        registry: registry.to_path_buf(),
    };
    let mut used = std::collections::BTreeSet::new();
    for file in sources {
        if corpus.bytes >= max_bytes {
            break;
        }
        corpus.bytes += file.bytes;
        used.insert(file.package);
        corpus.files.push(file.path);
    }
    corpus.used_packages = used.len();
    Ok(corpus)
}

/// `$CARGO_HOME`, else `~/.cargo`.
fn cargo_home() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
        return Some(PathBuf::from(home));
    }
    std::env::home_dir().map(|h| h.join(".cargo"))
}

/// The per-index source directories under `registry/src`, sorted (usually just one).
fn index_dirs(registry: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(registry)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_rs(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    /// A workspace (`app` + member `core`) and a registry holding `dep`, the dev-dependency
    /// `devdep` and the optional `gpu`, none of which but `dep` may enter the corpus.
    fn fixture(root: &Path) -> PathBuf {
        write(
            &root.join("ws/Cargo.toml"),
            r#"
[workspace]
members = [".", "core"]
[workspace.dependencies]
core = { path = "core" }
[package]
name = "app"
version = "0.1.0"
[features]
default = []
gpu = ["dep:gpu"]
[dependencies]
core.workspace = true
gpu = { version = "1", optional = true }
[dev-dependencies]
devdep = "1"
"#,
        );
        write(
            &root.join("ws/core/Cargo.toml"),
            "[package]\nname = \"core\"\n[dependencies]\ndep = \"0.3\"\n",
        );
        write(
            &root.join("ws/Cargo.lock"),
            r#"
version = 4
[[package]]
name = "app"
version = "0.1.0"
dependencies = ["core", "devdep", "gpu"]
[[package]]
name = "core"
version = "0.1.0"
dependencies = ["dep"]
[[package]]
name = "dep"
version = "0.3.1"
source = "registry+https://github.com/rust-lang/crates.io-index"
[[package]]
name = "devdep"
version = "1.0.0"
source = "registry+https://github.com/rust-lang/crates.io-index"
[[package]]
name = "gpu"
version = "1.2.0"
source = "registry+https://github.com/rust-lang/crates.io-index"
"#,
        );
        write(&root.join("ws/src/main.rs"), "fn main() {}\n");
        write(&root.join("ws/core/src/lib.rs"), "pub fn core() {}\n");
        let index = root.join("home/registry/src/index.example-0123");
        for (pkg, name) in [
            ("dep-0.3.1", "dep"),
            ("devdep-1.0.0", "devdep"),
            ("gpu-1.2.0", "gpu"),
        ] {
            write(
                &index.join(pkg).join("Cargo.toml"),
                &format!("[package]\nname = \"{name}\"\n"),
            );
            write(&index.join(pkg).join("src/lib.rs"), &"// x\n".repeat(100));
            write(&index.join(pkg).join("src/inner/mod.rs"), "pub mod a;\n");
            write(&index.join(pkg).join("tests/t.rs"), "#[test] fn t() {}\n");
        }
        root.join("home/registry/src")
    }

    fn keys(corpus: &Corpus, root: &Path) -> Vec<String> {
        let mut keys: Vec<String> = corpus
            .files
            .iter()
            .map(|f| {
                let rel = f.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                rel.replace("home/registry/src/index.example-0123/", "")
            })
            .collect();
        keys.sort();
        keys
    }

    #[test]
    fn takes_the_default_build_only() {
        let dir = tempfile::tempdir().unwrap();
        let registry = fixture(dir.path());
        let platform = Platform::default();
        let corpus = from_checkout(&dir.path().join("ws"), &registry, &platform, u64::MAX).unwrap();
        assert_eq!(
            keys(&corpus, dir.path()),
            [
                "dep-0.3.1/src/inner/mod.rs",
                "dep-0.3.1/src/lib.rs",
                "ws/core/src/lib.rs",
                "ws/src/main.rs"
            ]
        );
        assert_eq!((corpus.packages, corpus.used_packages), (3, 3));
        assert_eq!(corpus.bytes, 500 + 11 + 17 + 13);
        assert!(corpus.missing.is_empty());

        // The cap: files are added until it is reached, in an order that does not depend on
        // where the registry is.
        let capped = from_checkout(&dir.path().join("ws"), &registry, &platform, 1).unwrap();
        assert_eq!(capped.files.len(), 1);
        let moved = tempfile::tempdir().unwrap();
        let other = fixture(moved.path());
        let again = from_checkout(&moved.path().join("ws"), &other, &platform, 1).unwrap();
        assert_eq!(keys(&capped, dir.path()), keys(&again, moved.path()));

        // A package of the build missing from the registry is reported, not fatal.
        std::fs::remove_dir_all(registry.join("index.example-0123/dep-0.3.1")).unwrap();
        let partial =
            from_checkout(&dir.path().join("ws"), &registry, &platform, u64::MAX).unwrap();
        assert_eq!(partial.missing, ["dep-0.3.1"]);
        assert_eq!(partial.files.len(), 2);
    }

    #[test]
    fn clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let registry = fixture(dir.path());
        let ws = dir.path().join("ws");
        let platform = Platform::default();
        let lock = std::fs::read_to_string(ws.join("Cargo.lock")).unwrap();
        std::fs::write(
            ws.join("Cargo.lock"),
            lock.replace("name = \"core\"", "name = \"c\""),
        )
        .unwrap();
        let err = from_checkout(&ws, &registry, &platform, 1).unwrap_err();
        assert!(format!("{err:#}").contains("Cargo.lock"), "{err:#}");
        std::fs::write(ws.join("Cargo.lock"), &lock).unwrap();

        let bad = registry.join("index.example-0123/dep-0.3.1/Cargo.toml");
        std::fs::write(&bad, "[package\n").unwrap();
        let err = from_checkout(&ws, &registry, &platform, 1).unwrap_err();
        assert!(format!("{err:#}").contains("dep-0.3.1"), "{err:#}");

        std::fs::remove_file(ws.join("src/main.rs")).unwrap();
        std::fs::remove_file(ws.join("core/src/lib.rs")).unwrap();
        let empty = dir.path().join("empty");
        let err = from_checkout(&ws, &empty, &platform, 1).unwrap_err();
        assert!(format!("{err:#}").contains("cargo build"), "{err:#}");
    }
}
