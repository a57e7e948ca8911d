//! SPIFFE trust bundles in the standard JWK Set format
//! (<https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE_Trust_Domain_and_Bundle.md>),
//! and [`BundleSet`], the per-trust-domain store that keeps federated bundles side by side.
//!
//! Bundles of different trust domains are never merged: a peer is verified only against the bundle of
//! the trust domain named in its own SPIFFE ID, so one cluster's CA cannot vouch for another's IDs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use fedmesh_api::TrustDomain;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use x509_parser::prelude::*;

/// The `use` of a JWK that carries an X.509 authority.
pub const USE_X509_SVID: &str = "x509-svid";
/// The `use` of a JWK that carries a JWT-SVID signing key.
pub const USE_JWT_SVID: &str = "jwt-svid";

/// Largest bundle document we accept; real ones are a few KiB.
pub const MAX_BUNDLE_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BundleError {
    #[error("bundle for {trust_domain} is not valid JSON: {reason}")]
    NotJson {
        trust_domain: String,
        reason: String,
    },
    #[error("bundle for {trust_domain} is {size} bytes, more than the {MAX_BUNDLE_BYTES} allowed")]
    TooLarge { trust_domain: String, size: usize },
    #[error("bundle for {trust_domain} has no \"keys\" array; a SPIFFE bundle is a JWK Set")]
    MissingKeys { trust_domain: String },
    #[error("bundle for {trust_domain}: key {index} is not a JSON object")]
    KeyNotObject { trust_domain: String, index: usize },
    #[error(
        "bundle for {trust_domain}: key {index} has no \"use\" (expected \"x509-svid\" or \"jwt-svid\")"
    )]
    MissingUse { trust_domain: String, index: usize },
    #[error(
        "bundle for {trust_domain}: x509-svid key {index} must carry exactly one certificate in \"x5c\", found {count}"
    )]
    X5cCount {
        trust_domain: String,
        index: usize,
        count: usize,
    },
    #[error("bundle for {trust_domain}: x509-svid key {index}: {reason}")]
    BadCertificate {
        trust_domain: String,
        index: usize,
        reason: String,
    },
    #[error("bundle for {trust_domain}: jwt-svid key {index} has no \"kid\"")]
    MissingKid { trust_domain: String, index: usize },
    #[error("bundle for {trust_domain}: jwt-svid key {index} ({kid}): {reason}")]
    BadJwtKey {
        trust_domain: String,
        index: usize,
        kid: String,
        reason: String,
    },
    #[error("bundle for {trust_domain}: two jwt-svid keys share kid {kid:?}")]
    DuplicateKid { trust_domain: String, kid: String },
    #[error("bundle for {trust_domain}: \"{field}\" must be a non-negative integer")]
    BadField {
        trust_domain: String,
        field: &'static str,
    },
}

/// A public key that verifies JWT-SVIDs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JwtPublicKey {
    /// Uncompressed SEC1 point (0x04 || x || y).
    EcP256(Vec<u8>),
    EcP384(Vec<u8>),
    /// Big-endian modulus and exponent.
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwtAuthority {
    pub kid: String,
    pub key: JwtPublicKey,
}

/// One trust domain's bundle: its X.509 authorities and JWT keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpiffeBundle {
    trust_domain: TrustDomain,
    x509_authorities: Vec<CertificateDer<'static>>,
    jwt_authorities: Vec<JwtAuthority>,
    sequence: u64,
    refresh_hint: Option<Duration>,
}

#[derive(Serialize, Deserialize)]
struct JwkSetDoc {
    keys: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spiffe_sequence: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spiffe_refresh_hint: Option<u64>,
}

impl SpiffeBundle {
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            x509_authorities: Vec::new(),
            jwt_authorities: Vec::new(),
            sequence: 0,
            refresh_hint: None,
        }
    }

    pub fn with_x509_authorities(mut self, certs: Vec<CertificateDer<'static>>) -> Self {
        self.x509_authorities = certs;
        self
    }

    pub fn with_jwt_authorities(mut self, keys: Vec<JwtAuthority>) -> Self {
        self.jwt_authorities = keys;
        self
    }

    pub fn with_sequence(mut self, sequence: u64) -> Self {
        self.sequence = sequence;
        self
    }

    pub fn with_refresh_hint(mut self, hint: Option<Duration>) -> Self {
        self.refresh_hint = hint;
        self
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }
    pub fn x509_authorities(&self) -> &[CertificateDer<'static>] {
        &self.x509_authorities
    }
    pub fn jwt_authorities(&self) -> &[JwtAuthority] {
        &self.jwt_authorities
    }
    pub fn jwt_authority(&self, kid: &str) -> Option<&JwtAuthority> {
        self.jwt_authorities.iter().find(|a| a.kid == kid)
    }
    pub fn sequence(&self) -> u64 {
        self.sequence
    }
    pub fn refresh_hint(&self) -> Option<Duration> {
        self.refresh_hint
    }

    /// The X.509 authorities as concatenated DER, the Workload API's bundle encoding.
    pub fn x509_authorities_der(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.x509_authorities.iter().map(|c| c.len()).sum());
        for c in &self.x509_authorities {
            out.extend_from_slice(c);
        }
        out
    }

    /// The X.509 authorities as PEM.
    pub fn x509_authorities_pem(&self) -> String {
        self.x509_authorities
            .iter()
            .map(|c| der_to_pem("CERTIFICATE", c))
            .collect()
    }

    /// The SPIFFE bundle document (JWK Set) as JSON.
    pub fn to_json(&self) -> String {
        let mut keys = Vec::new();
        for cert in &self.x509_authorities {
            let mut jwk = Map::new();
            jwk.insert("use".into(), USE_X509_SVID.into());
            // The key parameters are informative; the certificate in x5c is authoritative.
            if let Some(params) = public_key_params_of_cert(cert) {
                jwk.extend(params);
            }
            jwk.insert(
                "x5c".into(),
                Value::Array(vec![STANDARD.encode(cert).into()]),
            );
            keys.push(Value::Object(jwk));
        }
        for auth in &self.jwt_authorities {
            let mut jwk = jwt_key_params(&auth.key);
            jwk.insert("use".into(), USE_JWT_SVID.into());
            jwk.insert("kid".into(), auth.kid.clone().into());
            keys.push(Value::Object(jwk));
        }
        let doc = JwkSetDoc {
            keys,
            spiffe_sequence: Some(self.sequence),
            spiffe_refresh_hint: self.refresh_hint.map(|d| d.as_secs().max(1)),
        };
        serde_json::to_string_pretty(&doc).unwrap_or_else(|_| "{\"keys\":[]}".into())
    }

    /// Only the JWT keys, as a JWK Set: what the Workload API's `FetchJWTBundles` returns.
    pub fn jwt_jwks_json(&self) -> String {
        let keys: Vec<Value> = self
            .jwt_authorities
            .iter()
            .map(|auth| {
                let mut jwk = jwt_key_params(&auth.key);
                jwk.insert("use".into(), USE_JWT_SVID.into());
                jwk.insert("kid".into(), auth.kid.clone().into());
                Value::Object(jwk)
            })
            .collect();
        serde_json::json!({ "keys": keys }).to_string()
    }

    /// Parses a SPIFFE bundle document. Keys with an unknown `use` are skipped, as the spec asks;
    /// a key of a known use that is malformed fails the whole bundle, so no authority is silently lost.
    pub fn from_json(trust_domain: TrustDomain, json: &[u8]) -> Result<Self, BundleError> {
        let td = trust_domain.to_string();
        if json.len() > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge {
                trust_domain: td,
                size: json.len(),
            });
        }
        let root: Value = serde_json::from_slice(json).map_err(|e| BundleError::NotJson {
            trust_domain: td.clone(),
            reason: e.to_string(),
        })?;
        let obj = root.as_object().ok_or_else(|| BundleError::MissingKeys {
            trust_domain: td.clone(),
        })?;
        let keys =
            obj.get("keys")
                .and_then(Value::as_array)
                .ok_or_else(|| BundleError::MissingKeys {
                    trust_domain: td.clone(),
                })?;
        let u64_field = |field: &'static str| -> Result<Option<u64>, BundleError> {
            match obj.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v.as_u64().map(Some).ok_or(BundleError::BadField {
                    trust_domain: td.clone(),
                    field,
                }),
            }
        };
        let sequence = u64_field("spiffe_sequence")?.unwrap_or(0);
        let refresh_hint = u64_field("spiffe_refresh_hint")?.map(Duration::from_secs);

        let mut bundle = SpiffeBundle::new(trust_domain)
            .with_sequence(sequence)
            .with_refresh_hint(refresh_hint);
        for (index, key) in keys.iter().enumerate() {
            let key = key.as_object().ok_or_else(|| BundleError::KeyNotObject {
                trust_domain: td.clone(),
                index,
            })?;
            match key.get("use").and_then(Value::as_str) {
                Some(USE_X509_SVID) => {
                    let x5c = key.get("x5c").and_then(Value::as_array);
                    let count = x5c.map_or(0, Vec::len);
                    let Some([cert]) = x5c.map(Vec::as_slice) else {
                        return Err(BundleError::X5cCount {
                            trust_domain: td.clone(),
                            index,
                            count,
                        });
                    };
                    let bad = |reason: String| BundleError::BadCertificate {
                        trust_domain: td.clone(),
                        index,
                        reason,
                    };
                    let b64 = cert
                        .as_str()
                        .ok_or_else(|| bad("x5c entry is not a string".into()))?;
                    let der = STANDARD
                        .decode(b64)
                        .map_err(|e| bad(format!("x5c entry is not base64: {e}")))?;
                    parse_x509_certificate(&der)
                        .map_err(|e| bad(format!("x5c entry is not an X.509 certificate: {e}")))?;
                    bundle.x509_authorities.push(CertificateDer::from(der));
                }
                Some(USE_JWT_SVID) => {
                    let kid = key
                        .get("kid")
                        .and_then(Value::as_str)
                        .filter(|k| !k.is_empty())
                        .ok_or_else(|| BundleError::MissingKid {
                            trust_domain: td.clone(),
                            index,
                        })?
                        .to_string();
                    if bundle.jwt_authority(&kid).is_some() {
                        return Err(BundleError::DuplicateKid {
                            trust_domain: td.clone(),
                            kid,
                        });
                    }
                    let parsed = parse_jwt_key(key).map_err(|reason| BundleError::BadJwtKey {
                        trust_domain: td.clone(),
                        index,
                        kid: kid.clone(),
                        reason,
                    })?;
                    bundle
                        .jwt_authorities
                        .push(JwtAuthority { kid, key: parsed });
                }
                Some(_) => continue,
                None => {
                    return Err(BundleError::MissingUse {
                        trust_domain: td.clone(),
                        index,
                    });
                }
            }
        }
        Ok(bundle)
    }

    /// Reads X.509 authorities from PEM (for `--federated-bundle` files and upstream roots).
    pub fn from_pem(trust_domain: TrustDomain, pem: &[u8]) -> Result<Self, BundleError> {
        let certs = parse_pem_certificates(pem).map_err(|reason| BundleError::BadCertificate {
            trust_domain: trust_domain.to_string(),
            index: 0,
            reason,
        })?;
        Ok(Self::new(trust_domain).with_x509_authorities(certs))
    }

    /// Reads either format: a JWK Set (starts with `{`) or PEM certificates.
    pub fn from_json_or_pem(trust_domain: TrustDomain, data: &[u8]) -> Result<Self, BundleError> {
        if data.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
            Self::from_json(trust_domain, data)
        } else {
            Self::from_pem(trust_domain, data)
        }
    }
}

/// Parses every CERTIFICATE block of a PEM document; an empty document is an error.
pub fn parse_pem_certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls_pki_types::pem::PemObject;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("malformed PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no CERTIFICATE blocks found in PEM".into());
    }
    for c in &certs {
        parse_x509_certificate(c).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    }
    Ok(certs)
}

pub fn der_to_pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn public_key_params_of_cert(der: &[u8]) -> Option<Map<String, Value>> {
    let (_, cert) = parse_x509_certificate(der).ok()?;
    let spki = cert.public_key();
    let key = match spki.parsed().ok()? {
        x509_parser::public_key::PublicKey::EC(point) => {
            let curve_oid = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())?;
            if curve_oid == x509_parser::oid_registry::OID_EC_P256 {
                JwtPublicKey::EcP256(point.data().to_vec())
            } else if curve_oid == x509_parser::oid_registry::OID_NIST_EC_P384 {
                JwtPublicKey::EcP384(point.data().to_vec())
            } else {
                return None;
            }
        }
        x509_parser::public_key::PublicKey::RSA(rsa) => JwtPublicKey::Rsa {
            n: strip_leading_zeros(rsa.modulus).to_vec(),
            e: strip_leading_zeros(rsa.exponent).to_vec(),
        },
        _ => return None,
    };
    Some(jwt_key_params(&key))
}

fn strip_leading_zeros(b: &[u8]) -> &[u8] {
    let i = b
        .iter()
        .position(|&x| x != 0)
        .unwrap_or(b.len().saturating_sub(1));
    &b[i..]
}

fn jwt_key_params(key: &JwtPublicKey) -> Map<String, Value> {
    let mut m = Map::new();
    match key {
        JwtPublicKey::EcP256(p) | JwtPublicKey::EcP384(p) => {
            let (crv, len) = match key {
                JwtPublicKey::EcP256(_) => ("P-256", 32),
                _ => ("P-384", 48),
            };
            m.insert("kty".into(), "EC".into());
            m.insert("crv".into(), crv.into());
            if p.len() == 1 + 2 * len {
                m.insert("x".into(), URL_SAFE_NO_PAD.encode(&p[1..1 + len]).into());
                m.insert("y".into(), URL_SAFE_NO_PAD.encode(&p[1 + len..]).into());
            }
        }
        JwtPublicKey::Rsa { n, e } => {
            m.insert("kty".into(), "RSA".into());
            m.insert("n".into(), URL_SAFE_NO_PAD.encode(n).into());
            m.insert("e".into(), URL_SAFE_NO_PAD.encode(e).into());
        }
    }
    m
}

fn parse_jwt_key(key: &Map<String, Value>) -> Result<JwtPublicKey, String> {
    let field = |name: &str| -> Result<Vec<u8>, String> {
        let s = key
            .get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("missing \"{name}\""))?;
        URL_SAFE_NO_PAD
            .decode(s.trim_end_matches('='))
            .map_err(|e| format!("\"{name}\" is not base64url: {e}"))
    };
    match key.get("kty").and_then(Value::as_str) {
        Some("EC") => {
            let (len, p256) = match key.get("crv").and_then(Value::as_str) {
                Some("P-256") => (32, true),
                Some("P-384") => (48, false),
                other => return Err(format!("unsupported curve {other:?} (P-256 or P-384)")),
            };
            let (x, y) = (field("x")?, field("y")?);
            if x.len() != len || y.len() != len {
                return Err(format!("x and y must be {len} bytes each"));
            }
            let mut point = Vec::with_capacity(1 + 2 * len);
            point.push(4);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            Ok(if p256 {
                JwtPublicKey::EcP256(point)
            } else {
                JwtPublicKey::EcP384(point)
            })
        }
        Some("RSA") => Ok(JwtPublicKey::Rsa {
            n: field("n")?,
            e: field("e")?,
        }),
        other => Err(format!("unsupported key type {other:?} (EC or RSA)")),
    }
}

/// What happened when a bundle was offered to a [`BundleSet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleUpdate {
    Added,
    Replaced,
    Unchanged,
    /// Refused: its sequence is older than the one held (a replay or a rollback).
    Stale {
        held: u64,
        offered: u64,
    },
}

/// Bundles keyed by trust domain, side by side, never merged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BundleSet {
    bundles: BTreeMap<TrustDomain, Arc<SpiffeBundle>>,
}

impl BundleSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, td: &TrustDomain) -> Option<&Arc<SpiffeBundle>> {
        self.bundles.get(td)
    }

    /// Stores `bundle` as its trust domain's bundle, replacing the previous one unless the offered
    /// sequence is older.
    pub fn update(&mut self, bundle: SpiffeBundle) -> BundleUpdate {
        self.update_arc(Arc::new(bundle))
    }

    pub fn update_arc(&mut self, bundle: Arc<SpiffeBundle>) -> BundleUpdate {
        match self.bundles.get(bundle.trust_domain()) {
            Some(held) if **held == *bundle => BundleUpdate::Unchanged,
            Some(held) if bundle.sequence() < held.sequence() => BundleUpdate::Stale {
                held: held.sequence(),
                offered: bundle.sequence(),
            },
            Some(_) => {
                self.bundles.insert(bundle.trust_domain().clone(), bundle);
                BundleUpdate::Replaced
            }
            None => {
                self.bundles.insert(bundle.trust_domain().clone(), bundle);
                BundleUpdate::Added
            }
        }
    }

    pub fn remove(&mut self, td: &TrustDomain) -> Option<Arc<SpiffeBundle>> {
        self.bundles.remove(td)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<SpiffeBundle>> {
        self.bundles.values()
    }

    pub fn trust_domains(&self) -> impl Iterator<Item = &TrustDomain> {
        self.bundles.keys()
    }

    pub fn len(&self) -> usize {
        self.bundles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bundles.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn td(s: &str) -> TrustDomain {
        TrustDomain::new(s).unwrap()
    }

    fn test_cert() -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn round_trips_x509_and_jwt_keys() {
        let point = {
            let mut p = vec![4u8];
            p.extend((0..64).map(|i| i as u8));
            p
        };
        let bundle = SpiffeBundle::new(td("east"))
            .with_x509_authorities(vec![test_cert(), test_cert()])
            .with_jwt_authorities(vec![JwtAuthority {
                kid: "k1".into(),
                key: JwtPublicKey::EcP256(point),
            }])
            .with_sequence(7)
            .with_refresh_hint(Some(Duration::from_secs(300)));
        let json = bundle.to_json();
        let v: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["spiffe_sequence"], 7);
        assert_eq!(v["spiffe_refresh_hint"], 300);
        assert_eq!(v["keys"][0]["use"], "x509-svid");
        assert_eq!(v["keys"][0]["kty"], "EC");
        assert_eq!(v["keys"][2]["use"], "jwt-svid");
        let back = SpiffeBundle::from_json(td("east"), json.as_bytes()).unwrap();
        assert_eq!(back, bundle);
    }

    #[test]
    fn malformed_bundles_get_specific_errors() {
        let east = || td("east");
        type Check = fn(&BundleError) -> bool;
        let cases: Vec<(&str, Check)> = vec![
            ("not json", |e| matches!(e, BundleError::NotJson { .. })),
            ("[]", |e| matches!(e, BundleError::MissingKeys { .. })),
            ("{}", |e| matches!(e, BundleError::MissingKeys { .. })),
            (r#"{"keys": [1]}"#, |e| {
                matches!(e, BundleError::KeyNotObject { index: 0, .. })
            }),
            (r#"{"keys": [{"kty":"EC"}]}"#, |e| {
                matches!(e, BundleError::MissingUse { index: 0, .. })
            }),
            (r#"{"keys": [{"use":"x509-svid"}]}"#, |e| {
                matches!(e, BundleError::X5cCount { count: 0, .. })
            }),
            (r#"{"keys": [{"use":"x509-svid","x5c":["a","b"]}]}"#, |e| {
                matches!(e, BundleError::X5cCount { count: 2, .. })
            }),
            (r#"{"keys": [{"use":"x509-svid","x5c":["!!!"]}]}"#, |e| {
                matches!(e, BundleError::BadCertificate { .. })
            }),
            (r#"{"keys": [{"use":"x509-svid","x5c":["AAAA"]}]}"#, |e| {
                matches!(e, BundleError::BadCertificate { .. })
            }),
            (r#"{"keys": [{"use":"jwt-svid","kty":"EC"}]}"#, |e| {
                matches!(e, BundleError::MissingKid { .. })
            }),
            (
                r#"{"keys": [{"use":"jwt-svid","kid":"a","kty":"EC","crv":"P-521"}]}"#,
                |e| matches!(e, BundleError::BadJwtKey { .. }),
            ),
            (r#"{"keys": [], "spiffe_sequence": -1}"#, |e| {
                matches!(e, BundleError::BadField { .. })
            }),
        ];
        for (input, check) in cases {
            let err = SpiffeBundle::from_json(east(), input.as_bytes()).expect_err(input);
            assert!(check(&err), "{input}: unexpected {err:?}");
            assert!(err.to_string().contains("east"), "{err}");
        }
    }

    #[test]
    fn unknown_key_uses_are_skipped() {
        let b = SpiffeBundle::from_json(
            td("east"),
            br#"{"keys":[{"use":"something-new","kty":"EC"}],"spiffe_sequence":3}"#,
        )
        .unwrap();
        assert!(b.x509_authorities().is_empty());
        assert_eq!(b.sequence(), 3);
    }

    #[test]
    fn pem_and_json_are_both_accepted() {
        let cert = test_cert();
        let pem = der_to_pem("CERTIFICATE", &cert);
        let b = SpiffeBundle::from_json_or_pem(td("east"), pem.as_bytes()).unwrap();
        assert_eq!(b.x509_authorities(), &[cert]);
        let j = SpiffeBundle::from_json_or_pem(td("east"), b.to_json().as_bytes()).unwrap();
        assert_eq!(j.x509_authorities(), b.x509_authorities());
        assert!(SpiffeBundle::from_pem(td("east"), b"junk").is_err());
    }

    #[test]
    fn bundle_set_keeps_domains_apart_and_refuses_rollback() {
        let mut set = BundleSet::new();
        let e1 = SpiffeBundle::new(td("east"))
            .with_x509_authorities(vec![test_cert()])
            .with_sequence(2);
        let w1 = SpiffeBundle::new(td("west")).with_x509_authorities(vec![test_cert()]);
        assert_eq!(set.update(e1.clone()), BundleUpdate::Added);
        assert_eq!(set.update(w1.clone()), BundleUpdate::Added);
        assert_eq!(set.update(e1.clone()), BundleUpdate::Unchanged);
        assert_eq!(set.len(), 2);
        assert_eq!(
            set.get(&td("west")).unwrap().x509_authorities(),
            w1.x509_authorities()
        );
        let old = SpiffeBundle::new(td("east")).with_sequence(1);
        assert_eq!(
            set.update(old),
            BundleUpdate::Stale {
                held: 2,
                offered: 1
            }
        );
        let e2 = e1
            .clone()
            .with_sequence(3)
            .with_x509_authorities(vec![test_cert()]);
        assert_eq!(set.update(e2.clone()), BundleUpdate::Replaced);
        assert_eq!(**set.get(&td("east")).unwrap(), e2);
        assert_eq!(
            set.get(&td("west")).unwrap().x509_authorities(),
            w1.x509_authorities()
        );
    }

    proptest! {
        #[test]
        fn arbitrary_json_never_panics(s in "\\PC{0,200}") {
            let _ = SpiffeBundle::from_json(td("east"), s.as_bytes());
        }

        #[test]
        fn arbitrary_key_objects_never_panic(
            use_ in prop::option::of(prop_oneof![Just("x509-svid"), Just("jwt-svid"), Just("x")]),
            kty in prop::option::of(prop_oneof![Just("EC"), Just("RSA"), Just("oct")]),
            crv in prop::option::of(prop_oneof![Just("P-256"), Just("P-384")]),
            x in prop::option::of("[A-Za-z0-9_-]{0,64}"),
            y in prop::option::of("[A-Za-z0-9_-]{0,64}"),
            kid in prop::option::of("[a-z]{0,4}"),
            x5c in prop::option::of(prop::collection::vec("[A-Za-z0-9+/=]{0,12}", 0..3)),
        ) {
            let mut key = Map::new();
            if let Some(v) = use_ { key.insert("use".into(), v.into()); }
            if let Some(v) = kty { key.insert("kty".into(), v.into()); }
            if let Some(v) = crv { key.insert("crv".into(), v.into()); }
            if let Some(v) = x { key.insert("x".into(), v.into()); }
            if let Some(v) = y { key.insert("y".into(), v.into()); }
            if let Some(v) = kid { key.insert("kid".into(), v.into()); }
            if let Some(v) = x5c { key.insert("x5c".into(), v.into()); }
            let doc = serde_json::json!({ "keys": [Value::Object(key)] }).to_string();
            let _ = SpiffeBundle::from_json(td("east"), doc.as_bytes());
        }
    }
}
