//! JWT-SVIDs (<https://github.com/spiffe/spiffe/blob/main/standards/JWT-SVID.md>): signed with the
//! trust domain's ES256 key, validated against the JWT authorities in the bundle of the subject's own
//! trust domain.

use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use fedmesh_api::SpiffeId;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair as _};
use serde_json::{Map, Value, json};

use crate::bundle::{BundleSet, JwtAuthority, JwtPublicKey};
use crate::svid::unix_secs;

/// Largest token we look at; real JWT-SVIDs are well under 4 KiB.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum JwtError {
    #[error("JWT-SVID is malformed: {0}")]
    Malformed(String),
    #[error(
        "JWT-SVID uses algorithm {0:?}, which is not allowed (use ES256, ES384, RS256-512 or PS256-512)"
    )]
    Algorithm(String),
    #[error("JWT-SVID has no \"kid\" header, so its signing key cannot be found")]
    MissingKid,
    #[error("JWT-SVID claim \"{0}\" is missing or has the wrong type")]
    Claim(&'static str),
    #[error("JWT-SVID subject is not a SPIFFE ID: {0}")]
    Subject(String),
    #[error("JWT-SVID for {id} expired at {exp}")]
    Expired { id: SpiffeId, exp: u64 },
    #[error("JWT-SVID for {id} is not meant for audience {audience:?} (it names {found:?})")]
    Audience {
        id: SpiffeId,
        audience: String,
        found: Vec<String>,
    },
    #[error("no trust bundle for trust domain {0}, so its JWT-SVIDs cannot be validated")]
    UnknownTrustDomain(String),
    #[error("the bundle of {trust_domain} has no JWT key {kid:?}")]
    UnknownKey { trust_domain: String, kid: String },
    #[error("JWT-SVID signature does not verify with key {0:?}")]
    BadSignature(String),
    #[error("cannot sign JWT-SVID: {0}")]
    Signing(String),
}

/// A trust domain's JWT signing key.
pub struct JwtSigner {
    kid: String,
    key: EcdsaKeyPair,
}

impl std::fmt::Debug for JwtSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSigner")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl JwtSigner {
    /// Loads a P-256 key from PKCS#8 DER.
    pub fn from_pkcs8(kid: String, pkcs8: &[u8]) -> Result<Self, JwtError> {
        let key = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8,
            &SystemRandom::new(),
        )
        .map_err(|e| JwtError::Signing(format!("JWT key is not a P-256 PKCS#8 key: {e}")))?;
        Ok(Self { kid, key })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn authority(&self) -> JwtAuthority {
        JwtAuthority {
            kid: self.kid.clone(),
            key: JwtPublicKey::EcP256(self.key.public_key().as_ref().to_vec()),
        }
    }

    pub fn sign(
        &self,
        subject: &SpiffeId,
        audience: &[String],
        issued_at: SystemTime,
        expires_at: SystemTime,
    ) -> Result<String, JwtError> {
        let header = json!({ "alg": "ES256", "kid": self.kid, "typ": "JWT" });
        let claims = json!({
            "sub": subject.to_string(),
            "aud": audience,
            "iat": unix_secs(issued_at),
            "exp": unix_secs(expires_at),
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self
            .key
            .sign(&SystemRandom::new(), signing_input.as_bytes())
            .map_err(|e| JwtError::Signing(e.to_string()))?;
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(sig.as_ref())
        ))
    }
}

/// A JWT-SVID that passed validation.
#[derive(Debug, Clone)]
pub struct ValidatedJwt {
    pub spiffe_id: SpiffeId,
    pub claims: Map<String, Value>,
}

/// Validates `token` for `audience` against the JWT authorities of its subject's trust domain.
pub fn validate(
    token: &str,
    audience: &str,
    bundles: &BundleSet,
    now: SystemTime,
) -> Result<ValidatedJwt, JwtError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(JwtError::Malformed(format!(
            "token is {} bytes, over the {MAX_TOKEN_BYTES} limit",
            token.len()
        )));
    }
    let mut parts = token.split('.');
    let (Some(h64), Some(c64), Some(s64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed(
            "expected three dot-separated parts (JWS compact serialization)".into(),
        ));
    };
    let decode = |what: &str, s: &str| {
        URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|e| JwtError::Malformed(format!("{what} is not base64url: {e}")))
    };
    let header: Map<String, Value> = serde_json::from_slice(&decode("header", h64)?)
        .map_err(|e| JwtError::Malformed(format!("header is not a JSON object: {e}")))?;
    let claims: Map<String, Value> = serde_json::from_slice(&decode("claims", c64)?)
        .map_err(|e| JwtError::Malformed(format!("claims are not a JSON object: {e}")))?;
    let sig = decode("signature", s64)?;

    let alg = header.get("alg").and_then(Value::as_str).unwrap_or("");
    let algorithm = verification_algorithm(alg).ok_or_else(|| JwtError::Algorithm(alg.into()))?;
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .ok_or(JwtError::MissingKid)?;

    let sub = claims
        .get("sub")
        .and_then(Value::as_str)
        .ok_or(JwtError::Claim("sub"))?;
    let spiffe_id = SpiffeId::new(sub).map_err(|e| JwtError::Subject(e.to_string()))?;
    let exp = claims
        .get("exp")
        .and_then(Value::as_u64)
        .ok_or(JwtError::Claim("exp"))?;
    let found: Vec<String> = match claims.get("aud") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        _ => return Err(JwtError::Claim("aud")),
    };

    let td = spiffe_id.trust_domain();
    let bundle = bundles
        .get(td)
        .ok_or_else(|| JwtError::UnknownTrustDomain(td.to_string()))?;
    let authority = bundle
        .jwt_authority(kid)
        .ok_or_else(|| JwtError::UnknownKey {
            trust_domain: td.to_string(),
            kid: kid.into(),
        })?;
    let signing_input = &token[..h64.len() + 1 + c64.len()];
    verify_signature(algorithm, &authority.key, signing_input.as_bytes(), &sig)
        .map_err(|_| JwtError::BadSignature(kid.into()))?;

    // Checked after the signature so an attacker learns nothing from the order of errors.
    if unix_secs(now) >= exp {
        return Err(JwtError::Expired { id: spiffe_id, exp });
    }
    if !found.iter().any(|a| a == audience) {
        return Err(JwtError::Audience {
            id: spiffe_id,
            audience: audience.into(),
            found,
        });
    }
    Ok(ValidatedJwt { spiffe_id, claims })
}

#[derive(Clone, Copy)]
enum Alg {
    Es256,
    Es384,
    Rsa(&'static signature::RsaParameters),
}

fn verification_algorithm(alg: &str) -> Option<Alg> {
    Some(match alg {
        "ES256" => Alg::Es256,
        "ES384" => Alg::Es384,
        "RS256" => Alg::Rsa(&signature::RSA_PKCS1_2048_8192_SHA256),
        "RS384" => Alg::Rsa(&signature::RSA_PKCS1_2048_8192_SHA384),
        "RS512" => Alg::Rsa(&signature::RSA_PKCS1_2048_8192_SHA512),
        "PS256" => Alg::Rsa(&signature::RSA_PSS_2048_8192_SHA256),
        "PS384" => Alg::Rsa(&signature::RSA_PSS_2048_8192_SHA384),
        "PS512" => Alg::Rsa(&signature::RSA_PSS_2048_8192_SHA512),
        _ => return None,
    })
}

fn verify_signature(alg: Alg, key: &JwtPublicKey, msg: &[u8], sig: &[u8]) -> Result<(), ()> {
    match (alg, key) {
        (Alg::Es256, JwtPublicKey::EcP256(point)) => {
            signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                .verify(msg, sig)
                .map_err(|_| ())
        }
        (Alg::Es384, JwtPublicKey::EcP384(point)) => {
            signature::UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, point)
                .verify(msg, sig)
                .map_err(|_| ())
        }
        (Alg::Rsa(params), JwtPublicKey::Rsa { n, e }) => signature::RsaPublicKeyComponents {
            n: n.as_slice(),
            e: e.as_slice(),
        }
        .verify(params, msg, sig)
        .map_err(|_| ()),
        _ => Err(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::SpiffeBundle;
    use fedmesh_api::TrustDomain;
    use std::time::Duration;

    fn signer(kid: &str) -> JwtSigner {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        JwtSigner::from_pkcs8(kid.into(), &key.serialize_der()).unwrap()
    }

    fn setup() -> (JwtSigner, BundleSet, SpiffeId) {
        let s = signer("k1");
        let mut set = BundleSet::new();
        set.update(
            SpiffeBundle::new(TrustDomain::new("east").unwrap())
                .with_jwt_authorities(vec![s.authority()]),
        );
        (s, set, SpiffeId::new("spiffe://east/ns/a/sa/b").unwrap())
    }

    #[test]
    fn sign_then_validate() {
        let (s, set, id) = setup();
        let now = SystemTime::now();
        let tok = s
            .sign(
                &id,
                &["db".into(), "web".into()],
                now,
                now + Duration::from_secs(60),
            )
            .unwrap();
        let v = validate(&tok, "web", &set, now).unwrap();
        assert_eq!(v.spiffe_id, id);
        assert_eq!(v.claims["sub"], id.to_string());
    }

    #[test]
    fn validation_failures_are_specific() {
        let (s, set, id) = setup();
        let now = SystemTime::now();
        let tok = s
            .sign(&id, &["db".into()], now, now + Duration::from_secs(60))
            .unwrap();
        assert!(matches!(
            validate(&tok, "web", &set, now),
            Err(JwtError::Audience { .. })
        ));
        assert!(matches!(
            validate(&tok, "db", &set, now + Duration::from_secs(61)),
            Err(JwtError::Expired { .. })
        ));
        assert!(matches!(
            validate(&tok, "db", &BundleSet::new(), now),
            Err(JwtError::UnknownTrustDomain(_))
        ));
        let other = signer("k1");
        let forged = other
            .sign(&id, &["db".into()], now, now + Duration::from_secs(60))
            .unwrap();
        assert!(matches!(
            validate(&forged, "db", &set, now),
            Err(JwtError::BadSignature(_))
        ));
        let unknown = signer("k2")
            .sign(&id, &["db".into()], now, now + Duration::from_secs(60))
            .unwrap();
        assert!(matches!(
            validate(&unknown, "db", &set, now),
            Err(JwtError::UnknownKey { .. })
        ));
        assert!(matches!(
            validate("a.b", "db", &set, now),
            Err(JwtError::Malformed(_))
        ));
        let none_alg = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none","kid":"k1"}"#),
            URL_SAFE_NO_PAD.encode(r#"{"sub":"spiffe://east/a","aud":"db","exp":99999999999}"#)
        );
        assert!(matches!(
            validate(&none_alg, "db", &set, now),
            Err(JwtError::Algorithm(_))
        ));
    }
}
