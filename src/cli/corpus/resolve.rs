//! The packages a default `cargo build` compiles: a walk of the lock file's graph from the
//! default members with their default features, following non-optional dependencies and the
//! optional ones that enabled features switch on, features unified per package.

use std::collections::{BTreeSet, HashMap, VecDeque};

use super::lock::Lockfile;
use super::manifest::{Dependency, Manifest};

/// The outcome of the walk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    /// Reached packages whose manifest was found (indices into the lock file), sorted.
    pub packages: Vec<usize>,
    /// Reached packages whose manifest was not found (so their dependencies were not followed).
    pub unavailable: Vec<usize>,
}

enum Step {
    /// The package is part of the build: its non-optional dependencies are too.
    Reach(usize),
    /// Turn on a feature of a package.
    Feature(usize, String),
    /// Turn on the (optional) dependency declared under `key` in a package.
    Dep(usize, String),
}

/// Walks the graph from `roots` (lock indices of the default members, with default features).
/// `manifest_of` gives a package's manifest, `None` when it is not on disk.
pub fn default_build(
    lock: &Lockfile,
    roots: &[usize],
    mut manifest_of: impl FnMut(usize) -> Option<Manifest>,
) -> Resolved {
    let mut manifests: HashMap<usize, Option<Manifest>> = HashMap::new();
    let mut features: HashMap<usize, BTreeSet<String>> = HashMap::new();
    let mut enabled: HashMap<usize, BTreeSet<String>> = HashMap::new();
    // `dep?/feature` requests waiting for `dep` to be enabled: (package, dep key) -> features.
    let mut weak: HashMap<(usize, String), Vec<String>> = HashMap::new();
    let mut queue: VecDeque<Step> = VecDeque::new();
    for &root in roots {
        queue.push_back(Step::Reach(root));
        queue.push_back(Step::Feature(root, "default".into()));
    }
    while let Some(step) = queue.pop_front() {
        match step {
            Step::Reach(p) => {
                if manifests.contains_key(&p) {
                    continue;
                }
                let manifest = manifest_of(p);
                if let Some(m) = &manifest {
                    for dep in m.deps.iter().filter(|d| !d.optional) {
                        enabled.entry(p).or_default().insert(dep.key.clone());
                        activate(lock, p, dep, &mut queue);
                    }
                }
                manifests.insert(p, manifest);
                // Features requested before the package was reached take effect now.
                for f in features.remove(&p).unwrap_or_default() {
                    queue.push_back(Step::Feature(p, f));
                }
            }
            Step::Feature(p, f) => {
                let Some(Some(m)) = manifests.get(&p) else {
                    // Not reached yet (or not on disk): remember it for `Reach`.
                    features.entry(p).or_default().insert(f);
                    continue;
                };
                if !features.entry(p).or_default().insert(f.clone()) {
                    continue;
                }
                let Some(values) = m.features.get(&f) else {
                    // An optional dependency's implicit feature.
                    if m.deps.iter().any(|d| d.optional && d.key == f)
                        && !m.has_explicit_dep_feature(&f)
                    {
                        queue.push_back(Step::Dep(p, f));
                    }
                    continue;
                };
                for value in values {
                    if let Some(key) = value.strip_prefix("dep:") {
                        queue.push_back(Step::Dep(p, key.to_owned()));
                    } else if let Some((key, feature)) = value.split_once('/') {
                        if let Some(key) = key.strip_suffix('?') {
                            if enabled.get(&p).is_some_and(|e| e.contains(key)) {
                                dep_feature(lock, p, m, key, feature, &mut queue);
                            } else {
                                let pending = weak.entry((p, key.to_owned())).or_default();
                                pending.push(feature.to_owned());
                            }
                        } else {
                            queue.push_back(Step::Dep(p, key.to_owned()));
                            if m.features.contains_key(key) {
                                queue.push_back(Step::Feature(p, key.to_owned()));
                            }
                            dep_feature(lock, p, m, key, feature, &mut queue);
                        }
                    } else {
                        queue.push_back(Step::Feature(p, value.clone()));
                    }
                }
            }
            Step::Dep(p, key) => {
                let Some(Some(m)) = manifests.get(&p) else {
                    continue;
                };
                if !enabled.entry(p).or_default().insert(key.clone()) {
                    continue;
                }
                for dep in m.deps.iter().filter(|d| d.key == key) {
                    activate(lock, p, dep, &mut queue);
                }
                for feature in weak.remove(&(p, key.clone())).unwrap_or_default() {
                    dep_feature(lock, p, m, &key, &feature, &mut queue);
                }
            }
        }
    }
    let mut resolved = Resolved::default();
    let mut reached: Vec<(usize, bool)> = manifests
        .into_iter()
        .map(|(p, m)| (p, m.is_some()))
        .collect();
    reached.sort_unstable();
    for (p, found) in reached {
        if found {
            resolved.packages.push(p);
        } else {
            resolved.unavailable.push(p);
        }
    }
    resolved
}

/// Makes the package behind `dep` part of the build, with the features it asks for.
fn activate(lock: &Lockfile, p: usize, dep: &Dependency, queue: &mut VecDeque<Step>) {
    for target in lock.dep_named(p, &dep.package, dep.req.as_deref()) {
        queue.push_back(Step::Reach(target));
        if dep.default_features {
            queue.push_back(Step::Feature(target, "default".into()));
        }
        for f in &dep.features {
            queue.push_back(Step::Feature(target, f.clone()));
        }
    }
}

/// `key/feature`: turns on `feature` in the package(s) declared under `key`.
fn dep_feature(
    lock: &Lockfile,
    p: usize,
    m: &Manifest,
    key: &str,
    feature: &str,
    queue: &mut VecDeque<Step>,
) {
    for dep in m.deps.iter().filter(|d| d.key == key) {
        for target in lock.dep_named(p, &dep.package, dep.req.as_deref()) {
            queue.push_back(Step::Feature(target, feature.to_owned()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::corpus::cfg::Platform;

    /// A lock file from `(name, deps)` pairs: every package a registry package, except `app`.
    fn lock(packages: &[(&str, &[&str])]) -> Lockfile {
        let mut text = String::from("version = 4\n");
        for (name, deps) in packages {
            text += &format!("[[package]]\nname = \"{name}\"\nversion = \"1.0.0\"\n");
            if *name != "app" {
                text += "source = \"registry+https://github.com/rust-lang/crates.io-index\"\n";
            }
            text += &format!("dependencies = {deps:?}\n");
        }
        Lockfile::parse(&text).unwrap()
    }

    fn names(lock: &Lockfile, ids: &[usize]) -> Vec<String> {
        ids.iter().map(|&i| lock.packages[i].name.clone()).collect()
    }

    #[test]
    fn follows_default_features_and_skips_the_rest() {
        // The lock holds every package any feature could need; the manifests say which are on.
        let lock = lock(&[
            ("app", &["burn", "criterion", "winapi", "missing"]),
            ("burn", &["flex", "wgpu", "log", "serde"]),
            ("flex", &["log"]),
            ("wgpu", &["naga"]),
            ("naga", &[]),
            ("log", &["serde"]),
            ("serde", &[]),
            ("criterion", &[]),
            ("winapi", &[]),
            ("missing", &[]),
        ]);
        let manifests: HashMap<&str, &str> = HashMap::from([
            (
                "app",
                r#"
[package]
name = "app"
[features]
default = ["cpu"]
cpu = ["burn/flex"]
gpu = ["burn/wgpu"]
[dependencies]
burn = { version = "1", default-features = false }
missing = "1"
[dev-dependencies]
criterion = "1"
[target.'cfg(windows)'.dependencies]
winapi = "1"
"#,
            ),
            (
                "burn",
                r#"
[package]
name = "burn"
[features]
default = ["std"]
std = ["log?/std"]
flex = ["dep:flex", "log"]
wgpu = ["dep:wgpu"]
[dependencies]
flex = { version = "1", optional = true }
wgpu = { version = "1", optional = true }
log = { version = "1", optional = true }
serde = { version = "1", optional = true }
"#,
            ),
            ("flex", "[package]\nname = \"flex\"\n"),
            (
                "wgpu",
                "[package]\nname = \"wgpu\"\n[dependencies]\nnaga = \"1\"\n",
            ),
            ("naga", "[package]\nname = \"naga\"\n"),
            (
                "log",
                "[package]\nname = \"log\"\n[features]\nstd = [\"serde\"]\n[dependencies]\nserde = { version = \"1\", optional = true }\n",
            ),
            ("serde", "[package]\nname = \"serde\"\n"),
            ("criterion", "[package]\nname = \"criterion\"\n"),
            ("winapi", "[package]\nname = \"winapi\"\n"),
        ]);
        let platform = Platform::with(&["unix"]);
        let mut asked = Vec::new();
        let resolved = default_build(&lock, &[0], |p| {
            asked.push(lock.packages[p].name.clone());
            let text = manifests.get(lock.packages[p].name.as_str())?;
            Some(Manifest::parse(text, None, &platform).unwrap())
        });
        // burn's `default` is off, but app's `cpu` turns on burn/flex, which enables `log`;
        // `log?/std` only applies through burn's `std`, which is off, so log's serde stays off.
        assert_eq!(
            names(&lock, &resolved.packages),
            ["app", "burn", "flex", "log"]
        );
        assert_eq!(names(&lock, &resolved.unavailable), ["missing"]);
        assert!(
            !asked
                .iter()
                .any(|n| n == "wgpu" || n == "criterion" || n == "winapi")
        );

        // With burn's defaults on, `log?/std` applies once `log` is enabled, whichever comes
        // first, and log's `std` feature enables its optional serde through the implicit feature.
        let with_std = default_build(&lock, &[1], |p| {
            let text = manifests.get(lock.packages[p].name.as_str())?;
            let mut m = Manifest::parse(text, None, &platform).unwrap();
            if m.name == "burn" {
                m.features
                    .insert("default".into(), vec!["flex".into(), "std".into()]);
            }
            Some(m)
        });
        assert_eq!(
            names(&lock, &with_std.packages),
            ["burn", "flex", "log", "serde"]
        );
    }
}
