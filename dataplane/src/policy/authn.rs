//! Request authentication as the callee's sidecar decides it: a service's
//! RequestAuthentications, compiled once per configuration — keys decoded from the JWK Sets the
//! control plane fetched, one [`Validation`] per key (issuer, audiences, the key's algorithms).
//!
//! A request to a service with any RequestAuthentication must carry a token (from
//! `Authorization: Bearer` or a header a rule names) that the rule of its issuer validates:
//! signature by a key of that issuer (by `kid` when the token names one), `exp` (required) and
//! `nbf` with 60 s of leeway, and an audience. `alg: none` and symmetric algorithms are never
//! accepted. A request without a token passes only when every policy allows it
//! (`allowMissing`). What fails is refused with the reason, never silently let through.
//!
//! A token verified once is remembered with its claims (bounded, per compiled set) and not
//! verified again while it is within its `exp`/`nbf` window: a user's session sends the same token
//! many times, and the signature check is most of the cost.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use fedmesh_api::pb::dataplane as pb;
use http::HeaderMap;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

/// A validated token's claims.
pub type Claims = Map<String, Value>;

const RSA_ALGS: [Algorithm; 6] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

struct Key {
    kid: Option<String>,
    key: DecodingKey,
    validation: Validation,
}

struct Rule {
    issuer: String,
    keys: Vec<Key>,
    /// Why this issuer's tokens cannot be validated (no keys), if so.
    error: Option<String>,
    /// (header, prefix); empty: `Authorization: Bearer`.
    from: Vec<(http::HeaderName, String)>,
}

struct AuthnPolicy {
    name: String,
    rules: Vec<Rule>,
    allow_missing: bool,
    invalid: Option<String>,
}

/// Tokens a set of policies validated lately, with their claims: the same token (a user's
/// session) is not verified again until it expires, as Envoy's JWT cache does. Bounded (emptied
/// when full); a new configuration compiles a new set, with an empty cache, so a rotated key
/// never vouches for a token.
#[derive(Default)]
struct Verified(Mutex<HashMap<Box<str>, Arc<Claims>>>);

/// Tokens remembered per compiled set.
const VERIFIED_MAX: usize = 1024;
/// The clock skew allowed on `exp` and `nbf` (jsonwebtoken's default).
const LEEWAY_SECS: u64 = 60;

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Verified {
    /// The claims of `token` if it was verified and is still in its validity window.
    fn get(&self, token: &str) -> Option<Arc<Claims>> {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let c = m.get(token)?;
        let now = now_secs();
        let exp = c.get("exp").and_then(Value::as_u64)?;
        let nbf = c.get("nbf").and_then(Value::as_u64).unwrap_or(0);
        (now <= exp + LEEWAY_SECS && now + LEEWAY_SECS >= nbf).then(|| c.clone())
    }

    fn put(&self, token: &str, claims: Arc<Claims>) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= VERIFIED_MAX {
            m.clear();
        }
        m.insert(token.into(), claims);
    }
}

/// A service's RequestAuthentications, ready to validate tokens.
#[derive(Clone, Default)]
pub struct Authn {
    policies: Arc<[AuthnPolicy]>,
    verified: Arc<Verified>,
    /// As the control plane sent them: two compiled sets are equal when these are.
    source: Vec<pb::RequestAuthn>,
}

impl PartialEq for Authn {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}
impl Eq for Authn {}

impl std::fmt::Debug for Authn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.policies.iter().map(|p| &p.name))
            .finish()
    }
}

/// Why a request was not authenticated (answered 401).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unauthenticated(pub String);

impl std::fmt::Display for Unauthenticated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The algorithms a JWK may verify: its own `alg` when it names an asymmetric one, else those of
/// its key type. Symmetric keys verify nothing.
fn algorithms(jwk: &Jwk) -> Result<Vec<Algorithm>, String> {
    let by_type = match &jwk.algorithm {
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            ref c => return Err(format!("curve {c:?} is not supported (P-256, P-384)")),
        },
        AlgorithmParameters::RSA(_) => RSA_ALGS.to_vec(),
        AlgorithmParameters::OctetKeyPair(_) => vec![Algorithm::EdDSA],
        AlgorithmParameters::OctetKey(_) => {
            return Err("symmetric (oct) keys are not accepted in a JWK Set".into());
        }
    };
    match jwk.common.key_algorithm.map(|a| a.to_string()) {
        Some(a) => {
            let alg: Algorithm = a
                .parse()
                .map_err(|_| format!("alg {a} is not a signature algorithm"))?;
            if !by_type.contains(&alg) {
                return Err(format!("alg {a} does not fit the key's type"));
            }
            Ok(vec![alg])
        }
        None => Ok(by_type),
    }
}

fn rule(r: &pb::JwtRule) -> Rule {
    let mut out = Rule {
        issuer: r.issuer.clone(),
        keys: Vec::new(),
        error: (!r.jwks_error.is_empty()).then(|| r.jwks_error.clone()),
        from: r
            .from_headers
            .iter()
            .filter_map(|h| {
                let name = http::HeaderName::from_bytes(h.name.as_bytes()).ok()?;
                Some((name, h.prefix.clone()))
            })
            .collect(),
    };
    if out.error.is_some() {
        return out;
    }
    let set: JwkSet = match serde_json::from_str(&r.jwks) {
        Ok(s) => s,
        Err(e) => {
            out.error = Some(format!("its JWK Set is not valid JSON: {e}"));
            return out;
        }
    };
    let mut problems = Vec::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        let key = algorithms(jwk).and_then(|algs| {
            let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
            let mut v = Validation::new(algs[0]);
            v.algorithms = algs;
            v.set_issuer(&[&r.issuer]);
            if r.audiences.is_empty() {
                v.validate_aud = false;
            } else {
                v.set_audience(&r.audiences);
            }
            v.validate_nbf = true;
            Ok(Key {
                kid: jwk.common.key_id.clone(),
                key,
                validation: v,
            })
        });
        match key {
            Ok(k) => out.keys.push(k),
            Err(e) => problems.push(format!("key {i}: {e}")),
        }
    }
    if out.keys.is_empty() {
        out.error = Some(if problems.is_empty() {
            "its JWK Set has no keys".into()
        } else {
            format!("no usable key in its JWK Set ({})", problems.join("; "))
        });
    }
    out
}

impl From<&[pb::RequestAuthn]> for Authn {
    fn from(list: &[pb::RequestAuthn]) -> Self {
        let policies = list
            .iter()
            .map(|p| AuthnPolicy {
                name: p.name.clone(),
                rules: p.rules.iter().map(rule).collect(),
                allow_missing: p.allow_missing,
                invalid: (!p.invalid.is_empty()).then(|| p.invalid.clone()),
            })
            .collect();
        Self {
            policies,
            verified: Arc::default(),
            source: list.to_vec(),
        }
    }
}

/// Segment `n` of a token (0: header, 1: payload), decoded but not verified: to pick the rule
/// to check it against, and to name what is wrong when it is refused.
fn unverified_segment(token: &str, n: usize) -> Result<Map<String, Value>, &'static str> {
    use base64::Engine;
    let part = token
        .split('.')
        .nth(n)
        .ok_or("the token is not a JWT (header.payload.signature)")?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|_| "the token's payload is not base64url")?;
    serde_json::from_slice(&bytes).map_err(|_| "the token's payload is not a JSON object")
}

/// The unverified `iss` of a token: which rule to check it against.
fn issuer_of(token: &str) -> Result<String, String> {
    match unverified_segment(token, 1)?.remove("iss") {
        Some(Value::String(iss)) => Ok(iss),
        _ => Err("the token has no iss claim".into()),
    }
}

/// The `alg` a token's header claims, unverified (for the message when it is refused).
fn unverified_alg(token: &str) -> Option<String> {
    match unverified_segment(token, 0).ok()?.remove("alg") {
        Some(Value::String(alg)) => Some(alg),
        _ => None,
    }
}

fn why(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::ExpiredSignature => "the token has expired".into(),
        K::ImmatureSignature => "the token is not valid yet (nbf)".into(),
        K::InvalidAudience => "the token's audience is not accepted".into(),
        K::InvalidIssuer => "the token's issuer is not accepted".into(),
        K::InvalidSignature => "the token's signature does not verify".into(),
        K::InvalidAlgorithm => "the token's algorithm does not fit the issuer's key".into(),
        K::MissingRequiredClaim(c) => format!("the token has no {c} claim"),
        other => format!("the token is malformed ({other:?})"),
    }
}

impl Authn {
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The request's token: from the headers a rule names, or `Authorization: Bearer` (for
    /// rules that name none).
    fn token<'h>(&self, headers: &'h HeaderMap) -> Option<&'h str> {
        let rules = || self.policies.iter().flat_map(|p| p.rules.iter());
        let named = rules().flat_map(|r| r.from.iter()).find_map(|(h, prefix)| {
            headers
                .get(h)?
                .to_str()
                .ok()?
                .strip_prefix(prefix.as_str())
                .map(str::trim)
        });
        if named.is_some() || !rules().any(|r| r.from.is_empty()) {
            return named.filter(|t| !t.is_empty());
        }
        let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
        let (scheme, token) = v.split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim())
            .filter(|t| !t.is_empty())
    }

    /// Validates the request's token. `Ok(None)`: no policy, or no token where every policy
    /// allows that.
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
    ) -> Result<Option<Arc<Claims>>, Unauthenticated> {
        if self.policies.is_empty() {
            return Ok(None);
        }
        let fail = |m: String| Err(Unauthenticated(m));
        if let Some(p) = self.policies.iter().find(|p| p.invalid.is_some()) {
            return fail(format!(
                "{} is invalid: {}",
                p.name,
                p.invalid.as_deref().unwrap_or_default()
            ));
        }
        let Some(token) = self.token(headers) else {
            if self.policies.iter().all(|p| p.allow_missing) {
                return Ok(None);
            }
            return fail(format!(
                "a JWT is required ({}): send it as Authorization: Bearer <token>",
                self.names()
            ));
        };
        if let Some(claims) = self.verified.get(token) {
            return Ok(Some(claims));
        }
        let iss = issuer_of(token).map_err(|m| Unauthenticated(m.to_string()))?;
        let Some(rule) = self
            .policies
            .iter()
            .flat_map(|p| p.rules.iter())
            .find(|r| r.issuer == iss)
        else {
            return fail(format!(
                "issuer {iss:?} is not accepted ({})",
                self.issuers()
            ));
        };
        if let Some(e) = &rule.error {
            return fail(format!("the keys of issuer {iss} are not available: {e}"));
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| {
            Unauthenticated(match unverified_alg(token).as_deref() {
                Some(a) if a.eq_ignore_ascii_case("none") => {
                    "the token is not signed (alg none), which is never accepted".to_string()
                }
                Some(a) => format!("the token's algorithm {a} is not accepted"),
                None => format!("the token's header is not valid: {e}"),
            })
        })?;
        if matches!(
            header.alg,
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
        ) {
            return fail(format!(
                "the token's algorithm {:?} is symmetric, which is never accepted",
                header.alg
            ));
        }
        let candidates: Vec<&Key> = match &header.kid {
            Some(kid) => rule
                .keys
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid.as_str()))
                .collect(),
            None => rule.keys.iter().collect(),
        };
        if candidates.is_empty() {
            return fail(format!(
                "issuer {iss} has no key {:?} (its keys may have rotated; the control plane refreshes them)",
                header.kid.unwrap_or_default()
            ));
        }
        let mut last = None;
        for k in candidates {
            match jsonwebtoken::decode::<Claims>(token, &k.key, &k.validation) {
                Ok(data) => {
                    let claims = Arc::new(data.claims);
                    self.verified.put(token, claims.clone());
                    return Ok(Some(claims));
                }
                Err(e) => last = Some(e),
            }
        }
        fail(last.map(|e| why(&e)).unwrap_or_default())
    }

    fn names(&self) -> String {
        self.policies
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn issuers(&self) -> String {
        let list: Vec<&str> = self
            .policies
            .iter()
            .flat_map(|p| p.rules.iter().map(|r| r.issuer.as_str()))
            .collect();
        format!("accepted: {}", list.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use jsonwebtoken::{EncodingKey, Header};
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};

    const ISS: &str = "https://login.example.com";

    /// A P-256 key: its signing key and its JWK.
    fn key(kid: &str) -> (EncodingKey, serde_json::Value) {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let public = pair.public_key().as_ref();
        let jwk = serde_json::json!({
            "kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
            "x": B64.encode(&public[1..33]), "y": B64.encode(&public[33..]),
        });
        (EncodingKey::from_ec_der(pkcs8.as_ref()), jwk)
    }

    fn sign(k: &EncodingKey, kid: &str, claims: serde_json::Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(kid.into());
        jsonwebtoken::encode(&h, &claims, k).unwrap()
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn authn(jwks: &[serde_json::Value], allow_missing: bool) -> Authn {
        Authn::from(
            &[pb::RequestAuthn {
                name: "RequestAuthentication shop/users".into(),
                rules: vec![pb::JwtRule {
                    issuer: ISS.into(),
                    audiences: vec!["shop".into()],
                    jwks: serde_json::json!({ "keys": jwks }).to_string(),
                    ..Default::default()
                }],
                allow_missing,
                invalid: String::new(),
            }][..],
        )
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        h
    }

    fn refused(a: &Authn, h: &HeaderMap) -> String {
        a.authenticate(h).unwrap_err().0
    }

    #[test]
    fn a_valid_token_yields_its_claims_and_each_defect_is_named() {
        let (k1, jwk1) = key("k1");
        let (other, _) = key("k1");
        let a = authn(&[jwk1], false);
        let good = serde_json::json!({"iss": ISS, "aud": "shop", "sub": "ann", "exp": now() + 600});
        let claims = a
            .authenticate(&bearer(&sign(&k1, "k1", good.clone())))
            .unwrap()
            .unwrap();
        assert_eq!(claims["sub"], "ann");

        let with = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut c = good.clone();
            f(&mut c);
            refused(&a, &bearer(&sign(&k1, "k1", c)))
        };
        assert_eq!(
            with(&|c| c["exp"] = (now() - 3600).into()),
            "the token has expired"
        );
        assert!(
            with(&|c| c["iss"] = "https://evil.example".into())
                .starts_with("issuer \"https://evil.example\" is not accepted")
        );
        assert_eq!(
            with(&|c| c["aud"] = "billing".into()),
            "the token's audience is not accepted"
        );
        assert_eq!(
            with(&|c| {
                c.as_object_mut().unwrap().remove("exp");
            }),
            "the token has no exp claim"
        );
        assert_eq!(
            refused(&a, &bearer(&sign(&other, "k1", good.clone()))),
            "the token's signature does not verify"
        );
        assert!(refused(&a, &bearer(&sign(&k1, "k9", good.clone()))).contains("has no key \"k9\""));
        // alg none: an unsigned token with the right claims.
        let none = format!(
            "{}.{}.",
            B64.encode(br#"{"alg":"none","typ":"JWT"}"#),
            B64.encode(good.to_string())
        );
        assert_eq!(
            refused(&a, &bearer(&none)),
            "the token is not signed (alg none), which is never accepted"
        );
        // HS256 signed with the public key as the secret: the classic algorithm confusion.
        let hs = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &good,
            &EncodingKey::from_secret(b"public key bytes"),
        )
        .unwrap();
        assert_eq!(
            refused(&a, &bearer(&hs)),
            "the token's algorithm HS256 is symmetric, which is never accepted"
        );
        assert!(refused(&a, &HeaderMap::new()).starts_with("a JWT is required"));
        assert_eq!(
            refused(&a, &bearer("abc")),
            "the token is not a JWT (header.payload.signature)"
        );
    }

    #[test]
    fn a_missing_token_passes_only_where_every_policy_allows_it_and_named_headers_are_read() {
        let (k1, jwk1) = key("k1");
        let a = authn(std::slice::from_ref(&jwk1), true);
        assert_eq!(a.authenticate(&HeaderMap::new()), Ok(None));
        // A token that does not validate is refused all the same.
        assert_eq!(
            refused(&a, &bearer("x.y.z")),
            "the token's payload is not base64url"
        );

        let from_header = Authn::from(
            &[pb::RequestAuthn {
                name: "RequestAuthentication shop/users".into(),
                rules: vec![pb::JwtRule {
                    issuer: ISS.into(),
                    jwks: serde_json::json!({ "keys": [jwk1] }).to_string(),
                    from_headers: vec![pb::JwtHeader {
                        name: "x-jwt".into(),
                        prefix: "Token ".into(),
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }][..],
        );
        let token = sign(
            &k1,
            "k1",
            serde_json::json!({"iss": ISS, "exp": now() + 60}),
        );
        // Authorization is not where this rule looks.
        assert!(refused(&from_header, &bearer(&token)).starts_with("a JWT is required"));
        let mut h = HeaderMap::new();
        h.insert("x-jwt", format!("Token {token}").parse().unwrap());
        assert!(from_header.authenticate(&h).unwrap().is_some());
    }

    #[test]
    fn keys_that_cannot_be_used_refuse_tokens_with_the_reason() {
        let broken = Authn::from(
            &[pb::RequestAuthn {
                name: "RequestAuthentication shop/users".into(),
                rules: vec![pb::JwtRule {
                    issuer: ISS.into(),
                    jwks_error: "GET https://login.example.com/jwks: connection refused".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }][..],
        );
        let (k1, _) = key("k1");
        let token = sign(
            &k1,
            "k1",
            serde_json::json!({"iss": ISS, "exp": now() + 60}),
        );
        assert!(refused(&broken, &bearer(&token)).contains("connection refused"));
        let symmetric = authn(&[serde_json::json!({"kty": "oct", "k": "c2VjcmV0"})], false);
        assert!(
            refused(&symmetric, &bearer(&token)).contains("symmetric (oct) keys are not accepted")
        );
    }

    /// A verified token is remembered with its claims until it expires (then it is verified
    /// again, and refused); the cache is bounded.
    #[test]
    fn verified_tokens_are_remembered_only_while_valid() {
        let v = Verified::default();
        let claims =
            |exp: u64| Arc::new(serde_json::json!({"exp": exp}).as_object().unwrap().clone());
        v.put("fresh", claims(now() + 600));
        v.put("old", claims(now() - 3600));
        v.put("no-exp", Arc::new(Claims::new()));
        assert!(v.get("fresh").is_some());
        assert!(v.get("old").is_none());
        assert!(v.get("no-exp").is_none());
        assert!(v.get("never-seen").is_none());
        for i in 0..VERIFIED_MAX + 1 {
            v.put(&format!("t{i}"), claims(now() + 600));
        }
        assert!(v.0.lock().unwrap().len() <= VERIFIED_MAX);
    }
}
