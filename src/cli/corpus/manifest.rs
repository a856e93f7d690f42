//! `Cargo.toml`: a package's features and the dependencies that a build of it can compile, and
//! the workspace's members.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use toml::{Table, Value};

use super::cfg::Platform;

/// A dependency declaration (one entry of a `[dependencies]`-like table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dependency {
    /// The key it is declared under (what features refer to).
    pub key: String,
    /// The package's real name (`package = "…"` when renamed).
    pub package: String,
    /// The version requirement, if any.
    pub req: Option<String>,
    /// Only compiled when a feature enables it.
    pub optional: bool,
    /// Whether the dependency's `default` feature is on.
    pub default_features: bool,
    /// Features it turns on in the dependency.
    pub features: Vec<String>,
}

/// What the dependency walk needs of a package manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    /// `[package] name`.
    pub name: String,
    /// `[features]`.
    pub features: BTreeMap<String, Vec<String>>,
    /// Normal and build dependencies, including the target-specific ones that apply to the
    /// platform; never dev-dependencies.
    pub deps: Vec<Dependency>,
}

impl Manifest {
    /// Parses a manifest; `workspace_deps` resolves `dep.workspace = true` entries.
    pub fn parse(
        text: &str,
        workspace_deps: Option<&Table>,
        platform: &Platform,
    ) -> anyhow::Result<Self> {
        let doc: Table = text.parse()?;
        Self::from_table(&doc, workspace_deps, platform)
    }

    fn from_table(
        doc: &Table,
        workspace_deps: Option<&Table>,
        platform: &Platform,
    ) -> anyhow::Result<Self> {
        let Some(name) = doc
            .get("package")
            .and_then(|p| p.get("name"))
            .and_then(Value::as_str)
        else {
            bail!("no [package] name");
        };
        let mut features = BTreeMap::new();
        for (feature, values) in doc
            .get("features")
            .and_then(Value::as_table)
            .into_iter()
            .flatten()
        {
            let values = values
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect();
            features.insert(feature.clone(), values);
        }
        let mut tables: Vec<&Table> = Vec::new();
        for kind in ["dependencies", "build-dependencies", "build_dependencies"] {
            tables.extend(doc.get(kind).and_then(Value::as_table));
        }
        for (spec, target) in doc
            .get("target")
            .and_then(Value::as_table)
            .into_iter()
            .flatten()
        {
            if !platform.matches(spec) {
                continue;
            }
            for kind in ["dependencies", "build-dependencies", "build_dependencies"] {
                tables.extend(target.get(kind).and_then(Value::as_table));
            }
        }
        let mut deps = Vec::new();
        for table in tables {
            for (key, value) in table {
                deps.push(
                    dependency(key, value, workspace_deps)
                        .with_context(|| format!("dependency `{key}` of `{name}`"))?,
                );
            }
        }
        Ok(Self {
            name: name.to_owned(),
            features,
            deps,
        })
    }

    /// Whether some feature names the optional dependency `key` as `dep:key` (which removes the
    /// implicit feature of the same name).
    pub fn has_explicit_dep_feature(&self, key: &str) -> bool {
        let explicit = format!("dep:{key}");
        self.features.values().flatten().any(|v| *v == explicit)
    }
}

/// One dependency entry: `"1.0"` or a table, possibly `workspace = true`.
fn dependency(
    key: &str,
    value: &Value,
    workspace_deps: Option<&Table>,
) -> anyhow::Result<Dependency> {
    let mut dep = Dependency {
        key: key.to_owned(),
        package: key.to_owned(),
        req: None,
        optional: false,
        default_features: true,
        features: Vec::new(),
    };
    let table = match value {
        Value::String(req) => {
            dep.req = Some(req.clone());
            return Ok(dep);
        }
        Value::Table(table) => table,
        _ => bail!("neither a version nor a table"),
    };
    if table.get("workspace").and_then(Value::as_bool) == Some(true) {
        let Some(inherited) = workspace_deps.and_then(|w| w.get(key)) else {
            bail!("`workspace = true`, but [workspace.dependencies] has no `{key}`");
        };
        dep = dependency(key, inherited, None)?;
        // A member may add features, never remove the workspace's defaults.
        dep.optional = false;
    }
    apply_fields(&mut dep, table);
    Ok(dep)
}

fn apply_fields(dep: &mut Dependency, table: &Table) {
    if let Some(package) = table.get("package").and_then(Value::as_str) {
        dep.package = package.to_owned();
    }
    if let Some(req) = table.get("version").and_then(Value::as_str) {
        dep.req = Some(req.to_owned());
    }
    if let Some(optional) = table.get("optional").and_then(Value::as_bool) {
        dep.optional = optional;
    }
    let default_features = table
        .get("default-features")
        .or_else(|| table.get("default_features"))
        .and_then(Value::as_bool);
    if let Some(on) = default_features {
        dep.default_features = on;
    }
    for feature in table
        .get("features")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(f) = feature.as_str()
            && !dep.features.iter().any(|g| g == f)
        {
            dep.features.push(f.to_owned());
        }
    }
}

/// A workspace: its members' manifests and the members a plain `cargo build` compiles.
#[derive(Debug, Clone)]
pub struct Workspace {
    /// Every member: its manifest and its directory.
    pub members: Vec<(Manifest, PathBuf)>,
    /// Names of the members `cargo build` builds in the root: `default-members`, else the root
    /// package, else all members.
    pub default_members: Vec<String>,
}

impl Workspace {
    /// Reads the workspace whose root manifest is `root/Cargo.toml`.
    pub fn load(root: &Path, platform: &Platform) -> anyhow::Result<Self> {
        let root_manifest = root.join("Cargo.toml");
        let doc: Table = read(&root_manifest)?
            .parse()
            .with_context(|| format!("parsing {}", root_manifest.display()))?;
        let workspace = doc.get("workspace").and_then(Value::as_table);
        let workspace_deps = workspace
            .and_then(|w| w.get("dependencies"))
            .and_then(Value::as_table);
        let dirs = |key: &str| -> anyhow::Result<Option<Vec<PathBuf>>> {
            let Some(list) = workspace.and_then(|w| w.get(key)).and_then(Value::as_array) else {
                return Ok(None);
            };
            let mut dirs = Vec::new();
            for pattern in list.iter().filter_map(Value::as_str) {
                dirs.extend(expand(root, pattern)?);
            }
            Ok(Some(dirs))
        };
        let mut member_dirs = dirs("members")?.unwrap_or_default();
        let has_root_package = doc.contains_key("package");
        if has_root_package && !member_dirs.iter().any(|d| same_dir(d, root)) {
            member_dirs.insert(0, root.to_path_buf());
        }
        let mut members = Vec::new();
        for dir in member_dirs {
            let path = dir.join("Cargo.toml");
            let manifest = if same_dir(&dir, root) {
                Manifest::from_table(&doc, workspace_deps, platform)
            } else {
                Manifest::parse(&read(&path)?, workspace_deps, platform)
            }
            .with_context(|| format!("reading {}", path.display()))?;
            members.push((manifest, dir));
        }
        let name_of = |dir: &Path| {
            members
                .iter()
                .find(|(_, d)| same_dir(d, dir))
                .map(|(m, _)| m.name.clone())
        };
        let default_members = match dirs("default-members")? {
            Some(dirs) => dirs.iter().filter_map(|d| name_of(d)).collect(),
            None if has_root_package => name_of(root).into_iter().collect(),
            None => members.iter().map(|(m, _)| m.name.clone()).collect(),
        };
        if members.is_empty() {
            bail!("{} declares no package", root_manifest.display());
        }
        Ok(Self {
            members,
            default_members,
        })
    }
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn same_dir(a: &Path, b: &Path) -> bool {
    a.components()
        .filter(|c| c.as_os_str() != ".")
        .eq(b.components().filter(|c| c.as_os_str() != "."))
}

/// A member path, or `dir/*` (the subdirectories of `dir` that hold a `Cargo.toml`, sorted).
fn expand(root: &Path, pattern: &str) -> anyhow::Result<Vec<PathBuf>> {
    let Some(parent) = pattern.strip_suffix("/*") else {
        if pattern.contains(['*', '?', '[']) {
            bail!("workspace member pattern {pattern:?} is not supported (only `dir/*`)");
        }
        let pattern = pattern.trim_start_matches("./").trim_end_matches('/');
        return Ok(vec![match pattern {
            "" | "." => root.to_path_buf(),
            _ => root.join(pattern),
        }]);
    };
    let dir = root.join(parent);
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("Cargo.toml").is_file())
        .collect();
    dirs.sort();
    Ok(dirs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dependencies_features_and_targets() {
        let text = r#"
[package]
name = "demo"
version = "1.0.0"

[features]
default = ["fast"]
fast = ["dep:simd", "log?/std"]

[dependencies]
log = { version = "0.4", optional = true }
simd = { version = "0.2", optional = true, default-features = false }
renamed = { package = "real-name", version = "=2.1.0", features = ["a", "b"] }
plain = "1.2"

[dependencies.tabled]
version = "3"
default_features = false

[build-dependencies]
cc = "1"

[dev-dependencies]
criterion = "0.5"

[target.'cfg(windows)'.dependencies]
winapi = "0.3"

[target.'cfg(unix)'.dependencies]
libc = "0.2"
"#;
        let m = Manifest::parse(text, None, &Platform::with(&["unix"])).unwrap();
        assert_eq!(m.name, "demo");
        assert_eq!(m.features["fast"], vec!["dep:simd", "log?/std"]);
        let keys: Vec<&str> = m.deps.iter().map(|d| d.key.as_str()).collect();
        assert_eq!(
            keys,
            ["log", "plain", "renamed", "simd", "tabled", "cc", "libc"],
            "no dev-dependency, no windows-only one"
        );
        let dep = |k: &str| m.deps.iter().find(|d| d.key == k).unwrap();
        assert!(dep("log").optional && dep("log").default_features);
        assert!(!dep("simd").default_features && !dep("tabled").default_features);
        assert_eq!(dep("renamed").package, "real-name");
        assert_eq!(dep("renamed").req.as_deref(), Some("=2.1.0"));
        assert_eq!(dep("renamed").features, ["a", "b"]);
        assert_eq!(dep("plain").req.as_deref(), Some("1.2"));
        assert!(m.has_explicit_dep_feature("simd"));
        assert!(!m.has_explicit_dep_feature("log"));
    }

    #[test]
    fn rejects_bad_manifests() {
        let platform = Platform::default();
        assert!(Manifest::parse("[dependencies]\nx = \"1\"\n", None, &platform).is_err());
        let err = Manifest::parse(
            "[package]\nname = \"a\"\n[dependencies]\nx = 3\n",
            None,
            &platform,
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("`x`"), "{err:#}");
        let err = Manifest::parse(
            "[package]\nname = \"a\"\n[dependencies]\nx.workspace = true\n",
            None,
            &platform,
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("workspace.dependencies"),
            "{err:#}"
        );
    }

    #[test]
    fn loads_a_workspace_with_inherited_dependencies() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(
            root.join("Cargo.toml"),
            r#"
[workspace]
members = [".", "crates/*"]
[workspace.dependencies]
core-lib = { path = "crates/core", version = "0.1.0" }
serde = { version = "1", default-features = false, features = ["derive"] }

[package]
name = "app"
version = "0.1.0"

[dependencies]
core-lib.workspace = true
serde = { workspace = true, features = ["std"], optional = true }
"#,
        )
        .unwrap();
        for (name, deps) in [("core", "serde.workspace = true\n"), ("extra", "")] {
            let d = root.join("crates").join(name);
            std::fs::create_dir_all(&d).unwrap();
            let package = if name == "core" { "core-lib" } else { name };
            std::fs::write(
                d.join("Cargo.toml"),
                format!("[package]\nname = \"{package}\"\n[dependencies]\n{deps}"),
            )
            .unwrap();
        }
        let ws = Workspace::load(root, &Platform::default()).unwrap();
        let names: Vec<&str> = ws.members.iter().map(|(m, _)| m.name.as_str()).collect();
        assert_eq!(names, ["app", "core-lib", "extra"]);
        assert_eq!(ws.default_members, ["app"], "the root package");
        let app = &ws.members[0].0;
        let serde = app.deps.iter().find(|d| d.key == "serde").unwrap();
        assert_eq!(serde.req.as_deref(), Some("1"));
        assert!(serde.optional && !serde.default_features);
        assert_eq!(serde.features, ["derive", "std"]);
        let core = &ws.members[1].0;
        assert!(!core.deps[0].optional && core.deps[0].features == ["derive"]);

        std::fs::write(root.join("crates/extra/Cargo.toml"), "[package]\nname = [").unwrap();
        let err = Workspace::load(root, &Platform::default()).unwrap_err();
        assert!(format!("{err:#}").contains("extra"), "{err:#}");
    }
}
