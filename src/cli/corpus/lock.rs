//! `Cargo.lock`: the exact packages of the workspace's dependency graph and their edges.

use std::path::Path;

use anyhow::{Context, bail};

/// One `[[package]]` of a lock file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockedPackage {
    /// Package name.
    pub name: String,
    /// Exact version.
    pub version: String,
    /// `registry+…`, `sparse+…` or `git+…`; `None` for workspace members and path packages.
    pub source: Option<String>,
    /// The packages it depends on (indices into [`Lockfile::packages`]), for any feature set,
    /// platform or dependency kind.
    pub deps: Vec<usize>,
}

impl LockedPackage {
    /// Whether the package comes from a package registry (its sources under `registry/src`).
    pub fn is_from_registry(&self) -> bool {
        self.source
            .as_deref()
            .is_some_and(|s| s.starts_with("registry+") || s.starts_with("sparse+"))
    }
}

/// A parsed `Cargo.lock`.
#[derive(Debug, Clone, Default)]
pub struct Lockfile {
    /// Its packages, in file order.
    pub packages: Vec<LockedPackage>,
}

impl Lockfile {
    /// Reads and parses a lock file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Parses a lock file's text (format versions 1 to 4).
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let doc: toml::Table = text.parse()?;
        let Some(entries) = doc.get("package").and_then(|p| p.as_array()) else {
            bail!("no [[package]] entries");
        };
        let mut packages = Vec::with_capacity(entries.len());
        let mut dep_refs = Vec::with_capacity(entries.len());
        for entry in entries {
            let field = |key: &str| entry.get(key).and_then(|v| v.as_str()).map(str::to_owned);
            let (Some(name), Some(version)) = (field("name"), field("version")) else {
                bail!("a [[package]] without name or version: {entry}");
            };
            let refs: Vec<String> = entry
                .get("dependencies")
                .and_then(|d| d.as_array())
                .into_iter()
                .flatten()
                .filter_map(|d| d.as_str().map(str::to_owned))
                .collect();
            packages.push(LockedPackage {
                name,
                version,
                source: field("source"),
                deps: Vec::new(),
            });
            dep_refs.push(refs);
        }
        let mut lock = Self { packages };
        for (i, refs) in dep_refs.into_iter().enumerate() {
            let mut deps = Vec::with_capacity(refs.len());
            for r in &refs {
                let Some(j) = lock.find_ref(r) else {
                    bail!(
                        "{} {} depends on {r:?}, which is not a [[package]] (or is ambiguous)",
                        lock.packages[i].name,
                        lock.packages[i].version
                    );
                };
                deps.push(j);
            }
            lock.packages[i].deps = deps;
        }
        Ok(lock)
    }

    /// The package a `dependencies` entry names: `"name"`, `"name version"` or
    /// `"name version (source)"`.
    fn find_ref(&self, r: &str) -> Option<usize> {
        let mut words = r.splitn(3, ' ');
        let name = words.next()?;
        let version = words.next();
        let source = words
            .next()
            .and_then(|s| s.strip_prefix('(')?.strip_suffix(')'));
        let mut found = self.packages.iter().enumerate().filter(|(_, p)| {
            p.name == name
                && version.is_none_or(|v| p.version == v)
                && source.is_none_or(|s| p.source.as_deref() == Some(s))
        });
        let first = found.next()?.0;
        found.next().is_none().then_some(first)
    }

    /// The workspace member (a package without source) called `name`.
    pub fn member(&self, name: &str) -> Option<usize> {
        self.packages
            .iter()
            .position(|p| p.name == name && p.source.is_none())
    }

    /// The packages that `package` depends on under the name `name` whose version satisfies
    /// `req` (all of them when the requirement cannot be read; usually exactly one).
    pub fn dep_named(&self, package: usize, name: &str, req: Option<&str>) -> Vec<usize> {
        let named: Vec<usize> = self.packages[package]
            .deps
            .iter()
            .copied()
            .filter(|&d| self.packages[d].name == name)
            .collect();
        if named.len() <= 1 {
            return named;
        }
        let matching: Vec<usize> = named
            .iter()
            .copied()
            .filter(|&d| req.is_none_or(|r| compatible(r, &self.packages[d].version)))
            .collect();
        if matching.is_empty() { named } else { matching }
    }
}

/// Whether `version` can satisfy the requirement `req`, judged by its first comparator's
/// leading numbers: `1.2` and `^1.2` take 1.x, `0.9` takes 0.9.x, `=0.21.0` takes 0.21.0.
/// Only used to tell apart two locked versions of one package, which differ there.
fn compatible(req: &str, version: &str) -> bool {
    let first = req.split(',').next().unwrap_or("").trim();
    let exact = first.starts_with('=');
    let numbers = |s: &str| -> Vec<u64> {
        s.trim_start_matches(['^', '~', '=', '>', '<', ' '])
            .split(['+', '-'])
            .next()
            .unwrap_or("")
            .split('.')
            .map_while(|n| n.parse().ok())
            .collect()
    };
    let (want, have) = (numbers(first), numbers(version));
    if want.is_empty() || first.starts_with(['>', '<']) {
        return true;
    }
    // Caret semantics: the numbers up to and including the first non-zero one must match.
    let significant = if exact {
        want.len()
    } else {
        want.iter()
            .position(|&n| n != 0)
            .map_or(want.len(), |i| i + 1)
    };
    want.iter()
        .zip(&have)
        .take(significant)
        .all(|(w, h)| w == h)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCK: &str = r#"
version = 4

[[package]]
name = "app"
version = "0.1.0"
dependencies = ["rand 0.8.5", "rand 0.9.1", "serde"]

[[package]]
name = "rand"
version = "0.8.5"
source = "registry+https://github.com/rust-lang/crates.io-index"

[[package]]
name = "rand"
version = "0.9.1"
source = "registry+https://github.com/rust-lang/crates.io-index"

[[package]]
name = "serde"
version = "1.0.200"
source = "sparse+https://index.crates.io/"
"#;

    #[test]
    fn parses_packages_and_edges() {
        let lock = Lockfile::parse(LOCK).unwrap();
        assert_eq!(lock.packages.len(), 4);
        let app = lock.member("app").unwrap();
        assert_eq!(lock.packages[app].deps, vec![1, 2, 3]);
        assert!(!lock.packages[app].is_from_registry());
        assert!(lock.packages[3].is_from_registry());
        assert_eq!(lock.member("serde"), None, "not a member: it has a source");
        assert_eq!(lock.dep_named(app, "serde", Some("1")), vec![3]);
        assert_eq!(lock.dep_named(app, "rand", Some("0.9")), vec![2]);
        assert_eq!(lock.dep_named(app, "rand", Some("^0.8.1")), vec![1]);
        assert_eq!(lock.dep_named(app, "rand", Some(">=0.8")), vec![1, 2]);
        assert_eq!(lock.dep_named(app, "rand", None), vec![1, 2]);
        assert!(lock.dep_named(app, "log", Some("0.4")).is_empty());
    }

    #[test]
    fn rejects_dangling_and_malformed_locks() {
        let dangling = "[[package]]\nname = \"a\"\nversion = \"1.0.0\"\ndependencies = [\"b\"]\n";
        let err = Lockfile::parse(dangling).unwrap_err().to_string();
        assert!(err.contains("\"b\""), "{err}");
        assert!(Lockfile::parse("version = 4\n").is_err());
        assert!(Lockfile::parse("[[package]]\nname = \"a\"\n").is_err());
        assert!(Lockfile::parse("not toml at all [").is_err());
    }

    #[test]
    fn version_requirements() {
        assert!(compatible("1", "1.9.3"));
        assert!(!compatible("1", "2.0.0"));
        assert!(compatible("0.9", "0.9.4"));
        assert!(!compatible("0.9", "0.10.0"));
        assert!(compatible("=0.21.0", "0.21.0"));
        assert!(!compatible("=0.21.0", "0.21.1"));
        assert!(compatible("~1.2", "1.2.9"));
        assert!(compatible("1.2.2", "1.2.2+spec-1.1.0"));
    }
}
