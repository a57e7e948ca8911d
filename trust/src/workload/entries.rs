//! Registration entries: which callers get which SPIFFE ID, by SPIRE-style selectors.
//!
//! ```yaml
//! entries:
//!   - spiffe_id: spiffe://east.example/ns/default/sa/web
//!     selectors: ["unix:uid:1000"]     # unix:uid:N, unix:gid:N, unix:path:/abs/exe
//!     hint: internal                   # optional, passed to the workload
//!     ttl: 30m                         # optional SVID TTL (default: the CA's)
//!   # With the Kubernetes attestor (`fedmesh agent --k8s-node`): one identity per service
//!   # account, for the proxy container of every pod on the node.
//!   - spiffe_id: spiffe://east.example/ns/{ns}/sa/{sa}
//!     selectors: ["k8s:container-name:fedmesh-proxy"]
//! ```
//! A caller matches an entry when it has *every* selector of the entry. Kubernetes selectors
//! are `k8s:ns:`, `k8s:sa:`, `k8s:pod-name:`, `k8s:pod-uid:`, `k8s:pod-label:KEY:VALUE`,
//! `k8s:container-name:` and `k8s:node-name:`. An ID with `{ns}` and `{sa}` (each a whole path
//! segment) is a template: it stands for one entry per service account with pods on the node,
//! each with the template's selectors plus `k8s:ns:NS` and `k8s:sa:SA`.

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
    /// `k8s:KEY:VALUE`, from the Kubernetes attestor; KEY is one of [`K8S_SELECTOR_KEYS`].
    K8s(String, String),
}

/// The keys of `k8s:` selectors.
pub const K8S_SELECTOR_KEYS: &[&str] = &[
    "ns",
    "sa",
    "pod-name",
    "pod-uid",
    "pod-label",
    "container-name",
    "node-name",
];

const SUPPORTED: &str = "use unix:uid:N, unix:gid:N, unix:path:/abs/exe or k8s:KEY:VALUE (KEY: ns, sa, pod-name, pod-uid, pod-label, container-name, node-name)";

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnixUid(u) => write!(f, "unix:uid:{u}"),
            Self::UnixGid(g) => write!(f, "unix:gid:{g}"),
            Self::UnixPath(p) => write!(f, "unix:path:{}", p.display()),
            Self::K8s(k, v) => write!(f, "k8s:{k}:{v}"),
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
                _ => Err(format!("selector {s:?} is not supported; {SUPPORTED}")),
            },
            Some(("k8s", rest)) => match rest.split_once(':') {
                Some((k, v)) if K8S_SELECTOR_KEYS.contains(&k) => {
                    if v.is_empty() {
                        Err(format!("selector {s:?}: k8s:{k} needs a value"))
                    } else if k == "pod-label" && !v.contains(':') {
                        Err(format!(
                            "selector {s:?}: write k8s:pod-label:KEY:VALUE (e.g. k8s:pod-label:app:web)"
                        ))
                    } else {
                        Ok(Self::K8s(k.to_string(), v.to_string()))
                    }
                }
                _ => Err(format!("selector {s:?} is not supported; {SUPPORTED}")),
            },
            _ => Err(format!("selector {s:?} is not supported; {SUPPORTED}")),
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

/// An entry whose SPIFFE ID has `{ns}` and `{sa}` placeholders, expanded per service account
/// (see the module's documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryTemplate {
    pub spiffe_id: String,
    pub selectors: BTreeSet<Selector>,
    pub hint: String,
    pub ttl: Option<Duration>,
}

/// The placeholders a template may use.
pub const TEMPLATE_PLACEHOLDERS: &[&str] = &["{ns}", "{sa}"];

impl EntryTemplate {
    /// The entry for pods of namespace `ns` running as service account `sa`, or the reason the
    /// names do not make a valid ID.
    pub fn expand(&self, ns: &str, sa: &str) -> Result<RegistrationEntry, String> {
        // Each value fills exactly one path segment: no '/', nothing SPIFFE forbids.
        for (what, v) in [("namespace", ns), ("service account", sa)] {
            let ok = !v.is_empty()
                && v != "."
                && v != ".."
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
            if !ok {
                return Err(format!("{what} {v:?} cannot be a SPIFFE ID path segment"));
            }
        }
        let id = self.spiffe_id.replace("{ns}", ns).replace("{sa}", sa);
        let spiffe_id = SpiffeId::new(&id).map_err(|e| format!("{id}: {e}"))?;
        let mut selectors = self.selectors.clone();
        selectors.insert(Selector::K8s("ns".into(), ns.into()));
        selectors.insert(Selector::K8s("sa".into(), sa.into()));
        Ok(RegistrationEntry {
            spiffe_id,
            selectors,
            hint: self.hint.clone(),
            ttl: self.ttl,
        })
    }
}

/// A parsed entries file: fixed entries and templates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryFile {
    pub entries: Vec<RegistrationEntry>,
    pub templates: Vec<EntryTemplate>,
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

/// Reads and validates an entries file, templates included.
pub fn load_entry_file(path: &Path, trust_domain: &TrustDomain) -> Result<EntryFile, EntriesError> {
    let text = std::fs::read_to_string(path).map_err(|source| EntriesError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_entry_file(&text, path, trust_domain)
}

/// Parses fixed entries only: a template is refused, since nothing would expand it.
pub fn parse_entries(
    text: &str,
    path: &Path,
    trust_domain: &TrustDomain,
) -> Result<Vec<RegistrationEntry>, EntriesError> {
    let file = parse_entry_file(text, path, trust_domain)?;
    if let Some(t) = file.templates.first() {
        return Err(EntriesError::Parse {
            path: path.to_path_buf(),
            reason: format!(
                "{} is a template ({{ns}}/{{sa}}), which needs the Kubernetes attestor: run the agent with --k8s-node",
                t.spiffe_id
            ),
        });
    }
    Ok(file.entries)
}

/// A template has `{ns}` and `{sa}`, each once as a whole path segment, and no other braces:
/// otherwise two service accounts could get one ID (`sa/{sa}` across namespaces, `{ns}-{sa}`
/// for a-b/c and a/b-c).
fn check_template(id: &str, trust_domain: &TrustDomain) -> Result<(), String> {
    let path = id
        .strip_prefix("spiffe://")
        .and_then(|r| r.split_once('/'))
        .map_or("", |(_, p)| p);
    let segments: Vec<&str> = path.split('/').collect();
    let stray = |s: &&str| {
        let rest = TEMPLATE_PLACEHOLDERS
            .iter()
            .fold(s.to_string(), |r, p| r.replace(p, ""));
        rest.contains('{') || rest.contains('}')
    };
    if segments.iter().any(stray) {
        return Err("the only placeholders an ID may have are {ns} and {sa}".into());
    }
    if !TEMPLATE_PLACEHOLDERS
        .iter()
        .all(|p| segments.iter().filter(|s| *s == p).count() == 1)
    {
        return Err(format!(
            "a template needs {{ns}} and {{sa}}, each once as a whole path segment (like spiffe://{trust_domain}/ns/{{ns}}/sa/{{sa}}), so that no two service accounts share an ID"
        ));
    }
    Ok(())
}

pub fn parse_entry_file(
    text: &str,
    path: &Path,
    trust_domain: &TrustDomain,
) -> Result<EntryFile, EntriesError> {
    let file: EntriesFile = serde_saphyr::from_str(text).map_err(|e| EntriesError::Parse {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut out = Vec::with_capacity(file.entries.len());
    let mut templates = Vec::new();
    for (index, raw) in file.entries.into_iter().enumerate() {
        let err = |reason: String| EntriesError::Entry {
            path: path.to_path_buf(),
            index,
            spiffe_id: raw.spiffe_id.clone(),
            reason,
        };
        let template = raw.spiffe_id.contains('{');
        // A template is checked with sample names in its placeholders.
        let checked = if template {
            check_template(&raw.spiffe_id, trust_domain).map_err(err)?;
            raw.spiffe_id.replace("{ns}", "ns").replace("{sa}", "sa")
        } else {
            raw.spiffe_id.clone()
        };
        let spiffe_id = SpiffeId::new(&checked).map_err(|e| err(e.to_string()))?;
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
        if template {
            templates.push(EntryTemplate {
                spiffe_id: raw.spiffe_id.clone(),
                selectors,
                hint: raw.hint.unwrap_or_default(),
                ttl,
            });
        } else {
            out.push(RegistrationEntry {
                spiffe_id,
                selectors,
                hint: raw.hint.unwrap_or_default(),
                ttl,
            });
        }
    }
    Ok(EntryFile {
        entries: out,
        templates,
    })
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
    fn templates_expand_per_namespace_and_service_account() {
        let text = "entries:\n  - spiffe_id: spiffe://east.example/ns/{ns}/sa/{sa}\n    selectors: [\"k8s:container-name:fedmesh-proxy\"]\n  - spiffe_id: spiffe://east.example/gw\n    selectors: [\"unix:uid:1338\"]\n";
        let f = parse_entry_file(text, Path::new("e.yaml"), &td()).unwrap();
        assert_eq!((f.entries.len(), f.templates.len()), (1, 1));
        let e = f.templates[0].expand("shop", "api").unwrap();
        assert_eq!(
            e.spiffe_id.to_string(),
            "spiffe://east.example/ns/shop/sa/api"
        );
        let sels: Vec<String> = e.selectors.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            sels,
            [
                "k8s:container-name:fedmesh-proxy",
                "k8s:ns:shop",
                "k8s:sa:api"
            ]
        );
        let k = |k: &str, v: &str| Selector::K8s(k.into(), v.into());
        let proxy = BTreeSet::from([
            k("ns", "shop"),
            k("sa", "api"),
            k("container-name", "fedmesh-proxy"),
        ]);
        assert!(e.matches(&proxy));
        let app = BTreeSet::from([k("ns", "shop"), k("sa", "api"), k("container-name", "app")]);
        assert!(!e.matches(&app), "the app container of the same pod");
        assert!(f.templates[0].expand("shop", "a/b").is_err());
        assert!(parse_entries(text, Path::new("e.yaml"), &td()).is_err());
        for s in ["k8s:pod-label:app:web", "k8s:node-name:n1", "unix:uid:3"] {
            assert_eq!(s.parse::<Selector>().unwrap().to_string(), s);
        }
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
                "entries:\n  - spiffe_id: spiffe://east.example/x\n    selectors: [\"k8s:namespace:a\"]\n",
                "not supported",
            ),
            (
                "entries:\n  - spiffe_id: spiffe://east.example/x\n    selectors: [\"k8s:pod-label:app\"]\n",
                "KEY:VALUE",
            ),
            (
                "entries:\n  - spiffe_id: spiffe://east.example/ns/{namespace}\n    selectors: [\"k8s:ns:a\"]\n",
                "placeholders",
            ),
            (
                "entries:\n  - spiffe_id: spiffe://east.example/ns/{ns}/sa/{sa}\n    selectors: [\"k8s:ns:a\"]\n",
                "--k8s-node",
            ),
            (
                "entries:\n  - spiffe_id: spiffe://east.example/sa/{sa}\n    selectors: [\"k8s:ns:a\"]\n",
                "whole path segment",
            ),
            (
                "entries:\n  - spiffe_id: spiffe://east.example/{ns}-{sa}\n    selectors: [\"k8s:ns:a\"]\n",
                "whole path segment",
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
