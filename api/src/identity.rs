//! SPIFFE IDs and trust domains, validated per the SPIFFE-ID specification
//! (<https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md>).
//!
//! Parsing is strict: a value that is not exactly a valid SPIFFE ID is refused with an error that
//! names the offending character or segment, so an operator can fix a typo in a registration entry
//! or a policy without guessing.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// `spiffe://` — the only scheme a SPIFFE ID may have, lowercase.
pub const SCHEME_PREFIX: &str = "spiffe://";
/// The SPIFFE-ID spec caps a whole ID at 2048 bytes.
pub const MAX_ID_LEN: usize = 2048;
/// ... and the trust domain name at 255 bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a string is not a valid SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("empty SPIFFE ID")]
    Empty,
    #[error("{input:?} does not start with \"spiffe://\" (the scheme must be spiffe, lowercase)")]
    WrongScheme { input: String },
    #[error("{input:?} has no trust domain after \"spiffe://\"")]
    MissingTrustDomain { input: String },
    #[error(
        "trust domain {trust_domain:?} contains {ch:?} at byte {pos}; only lowercase letters, digits, '.', '-' and '_' are allowed"
    )]
    BadTrustDomainChar {
        trust_domain: String,
        ch: char,
        pos: usize,
    },
    #[error("trust domain {trust_domain:?} is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong { trust_domain: String },
    #[error("{input:?} has an empty path segment (\"//\" or a trailing \"/\")")]
    EmptySegment { input: String },
    #[error("{input:?} has a \".\" or \"..\" path segment, which SPIFFE IDs forbid")]
    DotSegment { input: String },
    #[error(
        "path of {input:?} contains {ch:?}; only letters, digits, '.', '-' and '_' are allowed in segments"
    )]
    BadPathChar { input: String, ch: char },
    #[error("SPIFFE ID is {len} bytes, more than the {MAX_ID_LEN} the spec allows")]
    TooLong { len: usize },
}

/// A trust domain name such as `east.example`. One per cluster in fedmesh.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (`east.example`) or a trust domain ID (`spiffe://east.example`).
    pub fn new(input: &str) -> Result<Self, IdError> {
        if input.is_empty() {
            return Err(IdError::Empty);
        }
        if let Some(rest) = input.strip_prefix(SCHEME_PREFIX) {
            let id = SpiffeId::new(input)?;
            if !id.path().is_empty() {
                return Err(IdError::BadTrustDomainChar {
                    trust_domain: rest.to_string(),
                    ch: '/',
                    pos: rest.find('/').unwrap_or(0),
                });
            }
            return Ok(id.trust_domain);
        }
        validate_trust_domain(input)?;
        Ok(Self(input.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `spiffe://<trust domain>`, the key the Workload API uses for bundles.
    pub fn id_string(&self) -> String {
        format!("{SCHEME_PREFIX}{}", self.0)
    }

    /// The trust domain's own SPIFFE ID (no path), carried by CA certificates.
    pub fn to_spiffe_id(&self) -> SpiffeId {
        SpiffeId {
            trust_domain: self.clone(),
            path: String::new(),
        }
    }

    /// A workload ID in this trust domain: `spiffe://<td>/ns/<namespace>/sa/<service account>`.
    pub fn workload_id(&self, namespace: &str, service_account: &str) -> Result<SpiffeId, IdError> {
        SpiffeId::new(&format!(
            "{SCHEME_PREFIX}{}/ns/{namespace}/sa/{service_account}",
            self.0
        ))
    }
}

fn validate_trust_domain(td: &str) -> Result<(), IdError> {
    if td.is_empty() {
        return Err(IdError::Empty);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(IdError::TrustDomainTooLong {
            trust_domain: td.to_string(),
        });
    }
    for (pos, ch) in td.char_indices() {
        if !(ch.is_ascii_lowercase() || ch.is_ascii_digit() || matches!(ch, '.' | '-' | '_')) {
            return Err(IdError::BadTrustDomainChar {
                trust_domain: td.to_string(),
                ch,
                pos,
            });
        }
    }
    Ok(())
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A validated SPIFFE ID: `spiffe://<trust domain><path>`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    /// Empty, or `/seg(/seg)*`.
    path: String,
}

impl SpiffeId {
    pub fn new(input: &str) -> Result<Self, IdError> {
        if input.is_empty() {
            return Err(IdError::Empty);
        }
        if input.len() > MAX_ID_LEN {
            return Err(IdError::TooLong { len: input.len() });
        }
        let rest = input
            .strip_prefix(SCHEME_PREFIX)
            .ok_or_else(|| IdError::WrongScheme {
                input: input.to_string(),
            })?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if td.is_empty() {
            return Err(IdError::MissingTrustDomain {
                input: input.to_string(),
            });
        }
        validate_trust_domain(td)?;
        if !path.is_empty() {
            for segment in path[1..].split('/') {
                if segment.is_empty() {
                    return Err(IdError::EmptySegment {
                        input: input.to_string(),
                    });
                }
                if segment == "." || segment == ".." {
                    return Err(IdError::DotSegment {
                        input: input.to_string(),
                    });
                }
                if let Some(ch) = segment
                    .chars()
                    .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
                {
                    return Err(IdError::BadPathChar {
                        input: input.to_string(),
                        ch,
                    });
                }
            }
        }
        Ok(Self {
            trust_domain: TrustDomain(td.to_string()),
            path: path.to_string(),
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The path, empty or starting with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        &self.trust_domain == td
    }

    /// The namespace and service account of an ID of the form `/ns/<ns>/sa/<sa>`.
    pub fn namespace_and_service_account(&self) -> Option<(&str, &str)> {
        let mut it = self.path.strip_prefix('/')?.split('/');
        match (it.next(), it.next(), it.next(), it.next(), it.next()) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME_PREFIX}{}{}", self.trust_domain.0, self.path)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({self})")
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SpiffeId::new(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for TrustDomain {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TrustDomain {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TrustDomain::new(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_valid_ids() {
        let id = SpiffeId::new("spiffe://east.example/ns/default/sa/web").unwrap();
        assert_eq!(id.trust_domain().as_str(), "east.example");
        assert_eq!(id.path(), "/ns/default/sa/web");
        assert_eq!(id.namespace_and_service_account(), Some(("default", "web")));
        assert_eq!(id.to_string(), "spiffe://east.example/ns/default/sa/web");
        let td = SpiffeId::new("spiffe://east.example").unwrap();
        assert_eq!(td.path(), "");
        assert_eq!(td.namespace_and_service_account(), None);
    }

    type Check = fn(&IdError) -> bool;

    #[test]
    fn refuses_malformed_ids_with_specific_errors() {
        let cases: &[(&str, Check)] = &[
            ("", |e| matches!(e, IdError::Empty)),
            ("http://east/a", |e| {
                matches!(e, IdError::WrongScheme { .. })
            }),
            ("SPIFFE://east/a", |e| {
                matches!(e, IdError::WrongScheme { .. })
            }),
            ("spiffe://", |e| {
                matches!(e, IdError::MissingTrustDomain { .. })
            }),
            ("spiffe:///a", |e| {
                matches!(e, IdError::MissingTrustDomain { .. })
            }),
            ("spiffe://East/a", |e| {
                matches!(e, IdError::BadTrustDomainChar { ch: 'E', .. })
            }),
            ("spiffe://east:8080/a", |e| {
                matches!(e, IdError::BadTrustDomainChar { ch: ':', .. })
            }),
            ("spiffe://user@east/a", |e| {
                matches!(e, IdError::BadTrustDomainChar { ch: '@', .. })
            }),
            ("spiffe://east/a//b", |e| {
                matches!(e, IdError::EmptySegment { .. })
            }),
            ("spiffe://east/a/", |e| {
                matches!(e, IdError::EmptySegment { .. })
            }),
            ("spiffe://east/", |e| {
                matches!(e, IdError::EmptySegment { .. })
            }),
            ("spiffe://east/a/../b", |e| {
                matches!(e, IdError::DotSegment { .. })
            }),
            ("spiffe://east/./b", |e| {
                matches!(e, IdError::DotSegment { .. })
            }),
            ("spiffe://east/a?b", |e| {
                matches!(e, IdError::BadPathChar { ch: '?', .. })
            }),
            ("spiffe://east/a#b", |e| {
                matches!(e, IdError::BadPathChar { ch: '#', .. })
            }),
            ("spiffe://east/a%20b", |e| {
                matches!(e, IdError::BadPathChar { ch: '%', .. })
            }),
        ];
        for (input, check) in cases {
            let err = SpiffeId::new(input).expect_err(input);
            assert!(check(&err), "{input:?}: unexpected error {err:?}");
            assert!(!err.to_string().is_empty());
        }
        let long = format!("spiffe://east/{}", "a".repeat(MAX_ID_LEN));
        assert!(matches!(SpiffeId::new(&long), Err(IdError::TooLong { .. })));
        let long_td = format!("spiffe://{}/a", "a".repeat(256));
        assert!(matches!(
            SpiffeId::new(&long_td),
            Err(IdError::TrustDomainTooLong { .. })
        ));
    }

    #[test]
    fn trust_domain_accepts_name_or_id() {
        assert_eq!(TrustDomain::new("east").unwrap().as_str(), "east");
        assert_eq!(TrustDomain::new("spiffe://east").unwrap().as_str(), "east");
        assert!(TrustDomain::new("spiffe://east/ns").is_err());
        assert!(TrustDomain::new("East").is_err());
        assert_eq!(
            TrustDomain::new("east").unwrap().id_string(),
            "spiffe://east"
        );
    }

    #[test]
    fn serde_round_trip_validates() {
        let id: SpiffeId = serde_json::from_str("\"spiffe://a/b\"").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"spiffe://a/b\"");
        let err = serde_json::from_str::<SpiffeId>("\"spiffe://a/../b\"").unwrap_err();
        assert!(err.to_string().contains(".."), "{err}");
    }

    fn td_strategy() -> impl Strategy<Value = String> {
        "[a-z0-9._-]{1,40}"
    }
    fn segment_strategy() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9._-]{1,20}".prop_filter("dot segments", |s| s != "." && s != "..")
    }

    proptest! {
        #[test]
        fn valid_ids_round_trip(td in td_strategy(), segs in prop::collection::vec(segment_strategy(), 0..6)) {
            let mut s = format!("spiffe://{td}");
            for seg in &segs { s.push('/'); s.push_str(seg); }
            let id = SpiffeId::new(&s).unwrap();
            prop_assert_eq!(id.to_string(), s.clone());
            prop_assert_eq!(id.trust_domain().as_str(), td.as_str());
            let again: SpiffeId = id.to_string().parse().unwrap();
            prop_assert_eq!(again, id);
        }

        #[test]
        fn arbitrary_strings_never_panic_and_valid_ones_round_trip(s in "\\PC{0,80}") {
            if let Ok(id) = SpiffeId::new(&s) {
                prop_assert_eq!(id.to_string(), s);
            }
        }

        #[test]
        fn uppercase_in_trust_domain_is_refused(td in "[a-z]{0,5}[A-Z][a-z]{0,5}") {
            let s = format!("spiffe://{td}/x");
            let refused = matches!(SpiffeId::new(&s), Err(IdError::BadTrustDomainChar { .. }));
            prop_assert!(refused);
        }
    }
}
