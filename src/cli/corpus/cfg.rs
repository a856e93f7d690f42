//! Which `[target.'…'.dependencies]` tables apply: `cfg(…)` expressions and target triples,
//! evaluated against the platform this binary was compiled for.

/// The `cfg` names and `key = "value"` pairs of a platform.
#[derive(Debug, Clone, Default)]
pub struct Platform {
    /// `target_arch`-`target_vendor`-`target_os`(-`target_env`) words, to match a bare triple.
    triple_words: Vec<String>,
    /// Set `cfg` options: `(name, None)` for `unix`, `(key, Some(value))` for `target_os = "linux"`.
    options: Vec<(String, Option<String>)>,
}

impl Platform {
    /// The platform this binary was compiled for (the host of a default `cargo build`).
    pub fn current() -> Self {
        use std::env::consts;
        let mut options: Vec<(String, Option<String>)> = vec![
            ("target_os".into(), Some(consts::OS.into())),
            ("target_family".into(), Some(consts::FAMILY.into())),
            ("target_arch".into(), Some(consts::ARCH.into())),
            (
                "target_pointer_width".into(),
                Some((usize::BITS).to_string()),
            ),
            (
                "target_endian".into(),
                Some(
                    if cfg!(target_endian = "little") {
                        "little"
                    } else {
                        "big"
                    }
                    .into(),
                ),
            ),
            (
                "panic".into(),
                Some(
                    if cfg!(panic = "abort") {
                        "abort"
                    } else {
                        "unwind"
                    }
                    .into(),
                ),
            ),
        ];
        if !consts::FAMILY.is_empty() {
            options.push((consts::FAMILY.into(), None));
        }
        let env = [
            ("gnu", cfg!(target_env = "gnu")),
            ("musl", cfg!(target_env = "musl")),
            ("msvc", cfg!(target_env = "msvc")),
            ("sgx", cfg!(target_env = "sgx")),
        ]
        .into_iter()
        .find_map(|(name, on)| on.then_some(name))
        .unwrap_or("");
        options.push(("target_env".into(), Some(env.into())));
        let vendor = [
            ("apple", cfg!(target_vendor = "apple")),
            ("pc", cfg!(target_vendor = "pc")),
            ("fortanix", cfg!(target_vendor = "fortanix")),
        ]
        .into_iter()
        .find_map(|(name, on)| on.then_some(name))
        .unwrap_or("unknown");
        options.push(("target_vendor".into(), Some(vendor.into())));
        for (width, on) in [
            ("8", cfg!(target_has_atomic = "8")),
            ("16", cfg!(target_has_atomic = "16")),
            ("32", cfg!(target_has_atomic = "32")),
            ("64", cfg!(target_has_atomic = "64")),
            ("ptr", cfg!(target_has_atomic = "ptr")),
        ] {
            if on {
                options.push(("target_has_atomic".into(), Some(width.into())));
            }
        }
        for (feature, on) in [
            ("sse", cfg!(target_feature = "sse")),
            ("sse2", cfg!(target_feature = "sse2")),
            ("neon", cfg!(target_feature = "neon")),
            ("crt-static", cfg!(target_feature = "crt-static")),
        ] {
            if on {
                options.push(("target_feature".into(), Some(feature.into())));
            }
        }
        let triple_words = [consts::ARCH, vendor, consts::OS, env]
            .into_iter()
            .filter(|w| !w.is_empty())
            .map(str::to_owned)
            .collect();
        Self {
            triple_words,
            options,
        }
    }

    /// A platform with the given options (`"unix"`, `"target_os=linux"`), for tests.
    #[cfg(test)]
    pub fn with(options: &[&str]) -> Self {
        Self {
            triple_words: Vec::new(),
            options: options
                .iter()
                .map(|o| match o.split_once('=') {
                    Some((k, v)) => (k.into(), Some(v.into())),
                    None => ((*o).into(), None),
                })
                .collect(),
        }
    }

    /// Whether a `[target.SPEC]` table applies: SPEC is `cfg(…)` or a target triple. A malformed
    /// `cfg` applies nowhere.
    pub fn matches(&self, spec: &str) -> bool {
        let spec = spec.trim();
        if let Some(expr) = spec.strip_prefix("cfg(").and_then(|s| s.strip_suffix(')')) {
            let mut parser = Parser {
                rest: expr,
                platform: self,
            };
            let value = parser.expr();
            return value.unwrap_or(false) && parser.rest.trim().is_empty();
        }
        // A triple such as x86_64-unknown-linux-gnu: its arch and OS must be ours.
        let words: Vec<&str> = spec.split('-').collect();
        words.first().copied() == self.triple_words.first().map(String::as_str)
            && self
                .triple_words
                .get(2)
                .is_some_and(|os| words.contains(&os.as_str()))
    }

    fn has(&self, key: &str, value: Option<&str>) -> bool {
        self.options
            .iter()
            .any(|(k, v)| k == key && v.as_deref() == value)
    }
}

/// Recursive descent over `all(…)`, `any(…)`, `not(…)`, `name` and `key = "value"`.
struct Parser<'a> {
    rest: &'a str,
    platform: &'a Platform,
}

impl<'a> Parser<'a> {
    fn expr(&mut self) -> Option<bool> {
        let name = self.ident()?;
        if self.eat('(') {
            let mut values = Vec::new();
            while !self.eat(')') {
                values.push(self.expr()?);
                if !self.eat(',') {
                    self.eat(')').then_some(())?;
                    break;
                }
            }
            return match name {
                "all" => Some(values.iter().all(|&v| v)),
                "any" => Some(values.iter().any(|&v| v)),
                "not" if values.len() == 1 => Some(!values[0]),
                _ => None,
            };
        }
        if self.eat('=') {
            let value = self.string()?;
            return Some(self.platform.has(name, Some(value)));
        }
        Some(self.platform.has(name, None))
    }

    fn ident(&mut self) -> Option<&'a str> {
        self.rest = self.rest.trim_start();
        let end = self
            .rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(self.rest.len());
        if end == 0 {
            return None;
        }
        let (name, rest) = self.rest.split_at(end);
        self.rest = rest;
        Some(name)
    }

    fn string(&mut self) -> Option<&'a str> {
        self.rest = self.rest.trim_start().strip_prefix('"')?;
        let end = self.rest.find('"')?;
        let (value, rest) = self.rest.split_at(end);
        self.rest = &rest[1..];
        Some(value)
    }

    fn eat(&mut self, c: char) -> bool {
        self.rest = self.rest.trim_start();
        match self.rest.strip_prefix(c) {
            Some(rest) => {
                self.rest = rest;
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evaluates_cfg_expressions() {
        let linux = Platform::with(&["unix", "target_os=linux", "target_arch=x86_64"]);
        assert!(linux.matches("cfg(unix)"));
        assert!(!linux.matches("cfg(windows)"));
        assert!(linux.matches(r#"cfg(target_os = "linux")"#));
        assert!(linux.matches(r#"cfg(not(target_arch = "wasm32"))"#));
        assert!(linux.matches(r#"cfg(all(unix, not(target_os="macos")))"#));
        assert!(!linux.matches(r#"cfg(all(target_family = "wasm", target_os = "unknown"))"#));
        assert!(linux.matches(r#"cfg(any(windows, target_os = "linux"))"#));
        assert!(!linux.matches("cfg(any())"));
        assert!(linux.matches("cfg(all())"));
        assert!(!linux.matches("cfg(loom)"), "custom cfgs are off");
        assert!(!linux.matches("cfg(unix"), "malformed");
        assert!(!linux.matches("cfg(unix) x"), "trailing text");
    }

    #[test]
    fn the_current_platform_matches_itself() {
        let here = Platform::current();
        assert!(here.matches(&format!(r#"cfg(target_os = "{}")"#, std::env::consts::OS)));
        assert_eq!(here.matches("cfg(unix)"), cfg!(unix));
        assert_eq!(here.matches("cfg(windows)"), cfg!(windows));
        assert!(!here.matches("cfg(target_os = \"none-such\")"));
        let (arch, os) = (std::env::consts::ARCH, std::env::consts::OS);
        assert!(here.matches(&format!("{arch}-unknown-{os}")));
        assert!(!here.matches(&format!("{arch}-unknown-none-such")));
    }
}
