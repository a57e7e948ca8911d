//! X.509-SVIDs: the key pair and CSR a workload side creates, the signed chain it gets back, and
//! the checks that an X.509 certificate is a well-formed SVID.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fedmesh_api::{IdError, SpiffeId};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::*;

/// An X.509-SVID with its private key. The key never leaves the process that generated it, except
/// over the Workload API to the workload it belongs to.
pub struct X509Svid {
    pub id: SpiffeId,
    /// Leaf first, then any intermediates (never the root).
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivatePkcs8KeyDer<'static>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Clone for X509Svid {
    fn clone(&self) -> Self {
        Self {
            id: self.id.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            not_before: self.not_before,
            not_after: self.not_after,
        }
    }
}

impl std::fmt::Debug for X509Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("X509Svid")
            .field("id", &self.id)
            .field("chain_len", &self.chain.len())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl X509Svid {
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }
}

/// A fresh P-256 key pair and a CSR carrying `id` as its only URI SAN.
pub fn new_key_and_csr(id: &SpiffeId) -> Result<(KeyPair, Vec<u8>), rcgen::Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let csr = csr_for(&key, &[id.to_string()])?;
    Ok((key, csr))
}

/// A CSR for `key` with the given URI SANs (tests use several to check that the CA refuses them).
pub fn csr_for(key: &KeyPair, uris: &[String]) -> Result<Vec<u8>, rcgen::Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "fedmesh");
    params.subject_alt_names = uris
        .iter()
        .map(|u| Ok(SanType::URI(u.as_str().try_into()?)))
        .collect::<Result<_, rcgen::Error>>()?;
    Ok(params.serialize_request(key)?.der().to_vec())
}

/// What we read back from a certificate.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub spiffe_id: SpiffeId,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub is_ca: bool,
    pub serial_hex: String,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SvidError {
    #[error("certificate is not valid X.509 DER: {0}")]
    Malformed(String),
    #[error("certificate has no URI SAN, so it carries no SPIFFE ID")]
    NoSpiffeId,
    #[error("certificate has {0} URI SANs; an X509-SVID carries exactly one SPIFFE ID")]
    MultipleUris(usize),
    #[error("certificate's URI SAN is not a valid SPIFFE ID: {0}")]
    BadId(#[from] IdError),
}

/// Reads the SPIFFE ID and validity of a certificate (leaf or CA).
pub fn inspect(der: &[u8]) -> Result<CertInfo, SvidError> {
    let (_, cert) = parse_x509_certificate(der).map_err(|e| SvidError::Malformed(e.to_string()))?;
    let uris: Vec<&str> = cert
        .subject_alternative_name()
        .map_err(|e| SvidError::Malformed(e.to_string()))?
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let spiffe_id = match uris.as_slice() {
        [] => return Err(SvidError::NoSpiffeId),
        [one] => SpiffeId::new(one)?,
        many => return Err(SvidError::MultipleUris(many.len())),
    };
    let validity = cert.validity();
    Ok(CertInfo {
        spiffe_id,
        not_before: asn1_to_system(validity.not_before),
        not_after: asn1_to_system(validity.not_after),
        is_ca: cert.is_ca(),
        serial_hex: cert.raw_serial_as_string().replace(':', ""),
    })
}

/// The trust domain a CA certificate is an authority of: the one its SPIFFE ID names (fedmesh and
/// SPIRE authorities carry `spiffe://<trust domain>`). `None` for a leaf or a CA without one.
pub fn trust_domain_of_authority(der: &[u8]) -> Option<fedmesh_api::TrustDomain> {
    inspect(der)
        .ok()
        .filter(|i| i.is_ca)
        .map(|i| i.spiffe_id.trust_domain().clone())
}

pub(crate) fn asn1_to_system(t: ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH
    }
}

/// Seconds since the epoch, for JSON state and logs.
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

pub fn from_unix_secs(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// RFC 3339 text of a time, for messages.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = unix_secs(t) as i64;
    ::time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|d| {
            d.format(&::time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("@{secs}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_carries_the_id() {
        let id = SpiffeId::new("spiffe://east/ns/a/sa/b").unwrap();
        let (_key, csr) = new_key_and_csr(&id).unwrap();
        let parsed =
            rcgen::CertificateSigningRequestParams::from_der(&csr.as_slice().into()).unwrap();
        assert_eq!(
            parsed.params.subject_alt_names,
            vec![rcgen::SanType::URI(
                rcgen::string::Ia5String::try_from(id.to_string()).unwrap()
            )],
            "the CSR's only SAN is the SPIFFE ID as a URI"
        );
    }

    #[test]
    fn inspect_refuses_non_svids() {
        assert!(matches!(inspect(b"garbage"), Err(SvidError::Malformed(_))));
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec!["example.com".to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(inspect(cert.der()).unwrap_err(), SvidError::NoSpiffeId);
    }
}
