//! Registration entries: which callers get which SPIFFE ID, by SPIRE-style selectors.
//!
//! ```yaml
//! entries:
//!   - spiffe_id: spiffe://east.example/ns/default/sa/web
//!     selectors: ["unix:uid:1000"]     # unix:uid:N, unix:gid:N, unix:path:/abs/exe
//!     hint: internal                   # optional, passed to the workload
//!     ttl: 30m                         # optional SVID TTL (default: the CA's)
//! ```
//! A caller matches an entry when it has *every* selector of the entry.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use fedmesh_api::{SpiffeId, TrustDomain};
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Selector {
    UnixUid(u32),
    UnixGid(u32),
    UnixPath(PathBuf),
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnixUid(u) => write!(f, "unix:uid:{u}"),
            Self::UnixGid(g) => write!(f, "unix:gid:{g}"),
            Self::UnixPath(p) => write!(f, "unix:path:{}", p.display()),
        }
    }
}

impl FromStr for Selector {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parse_id = |v: &str, what: &str| {
            v.parse::<u32>()
                .map_err(|_| format!("selector {s:?}: {what} must be a number"))
        };
        match s.split_once(':') {
            Some(("unix", rest)) => match rest.split_once(':') {
                Some(("uid", v)) => Ok(Self::UnixUid(parse_id(v, "uid")?)),
                Some(("gid", v)) => Ok(Self::UnixGid(parse_id(v, "gid")?)),
                Some(("path", v)) if v.starts_with('/') => Ok(Self::UnixPath(PathBuf::from(v))),
                Some(("path", _)) => Err(format!(
                    "selector {s:?}: unix:path needs an absolute path to the executable"
                )),
                _ => Err(format!(
                    "selector {s:?} is not supported; use unix:uid:N, unix:gid:N or unix:path:/abs/exe"
                )),
            },
            _ => Err(format!(
                "selector {s:?} is not supported; use unix:uid:N, unix:gid:N or unix:path:/abs/exe"
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationEntry {
    pub spiffe_id: SpiffeId,
    pub selectors: BTreeSet<Selector>,
    pub hint: String,
    pub ttl: Option<Duration>,
}

impl RegistrationEntry {
    /// A stable key: the ID and its selectors.
    pub fn key(&self) -> String {
        let sels: Vec<String> = self.selectors.iter().map(|s| s.to_string()).collect();
        format!("{}|{}", self.spiffe_id, sels.join(","))
    }

    pub fn matches(&self, caller: &BTreeSet<Selector>) -> bool {
        self.selectors.is_subset(caller)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EntriesError {
    #[error("cannot read entries file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("entries file {path} is not valid: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("entries file {path}, entry {index} ({spiffe_id}): {reason}")]
    Entry {
        path: PathBuf,
        index: usize,
        spiffe_id: String,
        reason: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntriesFile {
    entries: Vec<RawEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    spiffe_id: String,
    selectors: Vec<String>,
    #[serde(default)]
    hint: Option<String>,
    #[serde(default)]
    ttl: Option<String>,
}

/// Reads and validates an entries file; every ID must belong to `trust_domain`.
pub fn load_entries(
    path: &Path,
    trust_domain: &TrustDomain,
) -> Result<Vec<RegistrationEntry>, EntriesError> {
    let text = std::fs::read_to_string(path).map_err(|source| EntriesError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_entries(&text, path, trust_domain)
}

pub fn parse_entries(
    text: &str,
    path: &Path,
    trust_domain: &TrustDomain,
) -> Result<Vec<RegistrationEntry>, EntriesError> {
    let file: EntriesFile = serde_saphyr::from_str(text).map_err(|e| EntriesError::Parse {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut out = Vec::with_capacity(file.entries.len());
    for (index, raw) in file.entries.into_iter().enumerate() {
        let err = |reason: String| EntriesError::Entry {
            path: path.to_path_buf(),
            index,
            spiffe_id: raw.spiffe_id.clone(),
            reason,
        };
        let spiffe_id = SpiffeId::new(&raw.spiffe_id).map_err(|e| err(e.to_string()))?;
        if !spiffe_id.is_member_of(trust_domain) {
            return Err(err(format!(
                "this agent issues only IDs of its trust domain {trust_domain}"
            )));
        }
        if raw.selectors.is_empty() {
            return Err(err(
                "an entry needs at least one selector (without one, every caller would match)"
                    .into(),
            ));
        }
        let selectors = raw
            .selectors
            .iter()
            .map(|s| s.parse::<Selector>())
            .collect::<Result<BTreeSet<_>, _>>()
            .map_err(err)?;
        let ttl = raw
            .ttl
            .as_deref()
            .map(humantime::parse_duration)
            .transpose()
            .map_err(|e| err(format!("ttl: {e} (write e.g. 30m or 1h)")))?;
        if ttl.is_some_and(|t| t.is_zero()) {
            return Err(err("ttl must be more than zero".into()));
        }
        out.push(RegistrationEntry {
            spiffe_id,
            selectors,
            hint: raw.hint.unwrap_or_default(),
            ttl,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("east.example").unwrap()
    }

    #[test]
    fn parses_the_documented_format() {
        let text = "entries:\n  - spiffe_id: spiffe://east.example/ns/default/sa/web\n    selectors: [\"unix:uid:1000\", \"unix:path:/usr/bin/web\"]\n    ttl: 30m\n";
        let e = parse_entries(text, Path::new("e.yaml"), &td()).unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].ttl, Some(Duration::from_secs(1800)));
        let caller = BTreeSet::from([
            Selector::UnixUid(1000),
            Selector::UnixGid(5),
            Selector::UnixPath("/usr/bin/web".into()),
        ]);
        assert!(e[0].matches(&caller));
        assert!(!e[0].matches(&BTreeSet::from([Selector::UnixUid(1000)])));
    }

    #[test]
    fn bad_entries_name_the_entry_and_the_problem() {
        let cases = [
            (
                "entries:\n  - spiffe_id: spiffe://west/x\n    selectors: [\"unix:uid:1\"]\n",
                "trust domain",
            ),
            (
                "entries:\n  - spiffe_id: spiffe://east.example/x\n    selectors: []\n",
                "at least one selector",
            ),
            (
                "entries:\n  - spiffe_id: spiffe://east.example/x\n    selectors: [\"k8s:ns:a\"]\n",
                "not supported",
            ),
            (
                "entries:\n  - spiffe_id: spiffe://east.example/x\n    selectors: [\"unix:uid:abc\"]\n",
                "must be a number",
            ),
            (
                "entries:\n  - spiffe_id: spiffe://east.example/../x\n    selectors: [\"unix:uid:1\"]\n",
                "..",
            ),
            (
                "entries:\n  - spiffe_id: spiffe://east.example/x\n    selectors: [\"unix:uid:1\"]\n    ttl: soon\n",
                "ttl",
            ),
            (
                "entries:\n  - spiffe_id: spiffe://east.example/x\n    selectorz: []\n",
                "unknown field",
            ),
            ("entries: [\n", "line 1"),
        ];
        for (text, want) in cases {
            let err = parse_entries(text, Path::new("e.yaml"), &td())
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{text:?}: {err}");
            assert!(err.contains("e.yaml"), "{err}");
        }
    }
}
