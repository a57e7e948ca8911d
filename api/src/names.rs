//! Names that travel between clusters: cluster names, service keys, localities. Each is validated
//! at the edge (CLI flags, YAML, protocol messages) so the rest of the code can trust it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error(
        "{what} {value:?} is not a DNS label: {reason} (lowercase letters, digits and '-', at most 63 characters, starting and ending with a letter or digit)"
    )]
    NotDnsLabel {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error(
        "service {0:?} is not NAMESPACE/NAME (or NAME.NAMESPACE, NAME.NAMESPACE.svc.cluster.local, NAME.NAMESPACE.svc.clusterset.local)"
    )]
    NotServiceKey(String),
    #[error("locality {0:?} is not REGION or REGION/ZONE")]
    NotLocality(String),
}

/// Checks an RFC 1123 DNS label, the rule Kubernetes applies to namespaces and service names.
pub fn check_dns_label(what: &'static str, value: &str) -> Result<(), NameError> {
    let err = |reason| NameError::NotDnsLabel {
        what,
        value: value.to_string(),
        reason,
    };
    if value.is_empty() {
        return Err(err("it is empty"));
    }
    if value.len() > 63 {
        return Err(err("it is longer than 63 characters"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(err("it contains a character other than a-z, 0-9 and '-'"));
    }
    if value.starts_with('-') || value.ends_with('-') {
        return Err(err("it starts or ends with '-'"));
    }
    Ok(())
}

macro_rules! label_type {
    ($(#[$m:meta])* $name:ident, $what:literal) => {
        $(#[$m])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            pub fn new(value: &str) -> Result<Self, NameError> {
                check_dns_label($what, value)?;
                Ok(Self(value.to_string()))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::new(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

label_type!(
    /// A cluster's name in the clusterset (`east`). Also used in SNI names and DNS.
    ClusterName,
    "cluster name"
);
label_type!(
    /// A Kubernetes namespace.
    Namespace,
    "namespace"
);
label_type!(
    /// A Kubernetes service name.
    ServiceName,
    "service name"
);

/// A service in the clusterset: `namespace/name`. The same key in every cluster is the same
/// service (MCS "namespace sameness").
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub namespace: Namespace,
    pub name: ServiceName,
}

impl ServiceKey {
    pub fn new(namespace: &str, name: &str) -> Result<Self, NameError> {
        Ok(Self {
            namespace: Namespace::new(namespace)?,
            name: ServiceName::new(name)?,
        })
    }

    /// A service as people type it: `NAMESPACE/NAME`, or a DNS name `NAME.NAMESPACE`,
    /// `NAME.NAMESPACE.svc`, `NAME.NAMESPACE.svc.cluster.local` or
    /// `NAME.NAMESPACE.svc.clusterset.local` (a trailing dot allowed).
    pub fn from_user_input(s: &str) -> Result<Self, NameError> {
        if s.contains('/') {
            return s.parse();
        }
        let dns = s.trim_end_matches('.');
        let rest = ["svc.clusterset.local", "svc.cluster.local", "svc"]
            .iter()
            .find_map(|suffix| dns.strip_suffix(suffix)?.strip_suffix('.'))
            .unwrap_or(dns);
        match rest.split('.').collect::<Vec<_>>()[..] {
            [name, namespace] => Self::new(namespace, name),
            _ => Err(NameError::NotServiceKey(s.to_string())),
        }
    }

    /// `<name>.<namespace>.svc.clusterset.local`
    pub fn clusterset_dns_name(&self) -> String {
        format!("{}.{}.svc.clusterset.local", self.name, self.namespace)
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl fmt::Debug for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServiceKey({self})")
    }
}

impl FromStr for ServiceKey {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let (ns, name) = s
            .split_once('/')
            .ok_or_else(|| NameError::NotServiceKey(s.to_string()))?;
        Self::new(ns, name)
    }
}

impl Serialize for ServiceKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ServiceKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Where endpoints run: a region and optionally a zone (the `topology.kubernetes.io` labels).
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Locality {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub region: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub zone: String,
}

impl Locality {
    pub fn new(region: &str, zone: &str) -> Self {
        Self {
            region: region.to_string(),
            zone: zone.to_string(),
        }
    }

    /// How close `other` is to `self`: 0 same zone, 1 same region, 2 elsewhere.
    pub fn distance(&self, other: &Locality) -> u8 {
        if !self.region.is_empty() && self.region == other.region {
            if !self.zone.is_empty() && self.zone == other.zone {
                0
            } else {
                1
            }
        } else {
            2
        }
    }
}

impl fmt::Display for Locality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.region.is_empty(), self.zone.is_empty()) {
            (true, _) => f.write_str("-"),
            (false, true) => f.write_str(&self.region),
            (false, false) => write!(f, "{}/{}", self.region, self.zone),
        }
    }
}

impl fmt::Debug for Locality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Locality({self})")
    }
}

impl FromStr for Locality {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let (region, zone) = s.split_once('/').unwrap_or((s, ""));
        if region.is_empty() || zone.contains('/') {
            return Err(NameError::NotLocality(s.to_string()));
        }
        Ok(Self::new(region, zone))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_service_is_taken_in_the_forms_people_type() {
        let want = ServiceKey::new("shop", "api").unwrap();
        for form in [
            "shop/api",
            "api.shop",
            "api.shop.svc",
            "api.shop.svc.cluster.local",
            "api.shop.svc.clusterset.local",
            "api.shop.svc.clusterset.local.",
        ] {
            assert_eq!(ServiceKey::from_user_input(form).unwrap(), want, "{form}");
        }
        for bad in ["api", "a.b.c", "api.shop.svc.example.com", "Shop/api", ""] {
            let e = ServiceKey::from_user_input(bad).unwrap_err().to_string();
            assert!(e.contains("NAME") || e.contains("label"), "{bad}: {e}");
        }
    }

    #[test]
    fn labels_follow_rfc1123() {
        assert!(ClusterName::new("east-1").is_ok());
        for bad in [
            "",
            "East",
            "-east",
            "east-",
            "ea_st",
            "a.b",
            &"a".repeat(64),
        ] {
            let err = ClusterName::new(bad).unwrap_err().to_string();
            assert!(err.contains("cluster name"), "{err}");
        }
    }

    #[test]
    fn service_keys_parse_and_print() {
        let k: ServiceKey = "default/web".parse().unwrap();
        assert_eq!(k.to_string(), "default/web");
        assert_eq!(k.clusterset_dns_name(), "web.default.svc.clusterset.local");
        assert!("web".parse::<ServiceKey>().is_err());
        assert!("default/Web".parse::<ServiceKey>().is_err());
        assert!("a/b/c".parse::<ServiceKey>().is_err());
    }

    #[test]
    fn locality_distance() {
        let a = Locality::new("us", "us-a");
        assert_eq!(a.distance(&Locality::new("us", "us-a")), 0);
        assert_eq!(a.distance(&Locality::new("us", "us-b")), 1);
        assert_eq!(a.distance(&Locality::new("eu", "eu-a")), 2);
        assert_eq!("us/us-a".parse::<Locality>().unwrap(), a);
        assert!("".parse::<Locality>().is_err());
    }

    proptest! {
        #[test]
        fn valid_labels_round_trip(s in "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?") {
            let c = ClusterName::new(&s).unwrap();
            prop_assert_eq!(c.to_string(), s);
        }

        #[test]
        fn any_string_is_checked_without_panic(s in "\\PC{0,70}") {
            let _ = ClusterName::new(&s);
            let _ = s.parse::<ServiceKey>();
            let _ = s.parse::<Locality>();
        }
    }
}

/// Checks an east-west gateway address as a cluster publishes it: `host:port` with a DNS name or an
/// IP literal (IPv6 in brackets), a port in 1..65535, and no address that names no single host
/// (unspecified, multicast, broadcast). Every cluster's sidecars connect to what a peer publishes
/// here, so nothing else is accepted.
pub fn check_gateway_address(addr: &str) -> Result<(), String> {
    let (host, port) = addr.rsplit_once(':').ok_or("expected host:port")?;
    port.parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or("port is not in 1..65535")?;
    let bracketed = host.starts_with('[') && host.ends_with(']');
    let host = if bracketed {
        &host[1..host.len() - 1]
    } else {
        host
    };
    if host.is_empty() || host.len() > 253 {
        return Err("empty or overlong host".into());
    }
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        if ip.is_ipv6() != bracketed {
            return Err("an IPv6 address must be written in brackets, [addr]:port".into());
        }
        let broadcast = matches!(ip, std::net::IpAddr::V4(v4) if v4.is_broadcast());
        if ip.is_unspecified() || ip.is_multicast() || broadcast {
            return Err(format!("{ip} is not the address of one host"));
        }
        return Ok(());
    }
    if bracketed {
        return Err(format!("[{host}] is not an IPv6 address"));
    }
    for label in host.split('.') {
        check_dns_label("gateway host", &label.to_ascii_lowercase()).map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod gateway_tests {
    use super::check_gateway_address;

    #[test]
    fn gateway_addresses_name_one_host_and_port() {
        for ok in [
            "127.0.0.1:15443",
            "gw.east.example:443",
            "[2001:db8::1]:15443",
            "[::1]:15443",
        ] {
            assert_eq!(check_gateway_address(ok), Ok(()), "{ok}");
        }
        for bad in [
            "127.0.0.1",
            "127.0.0.1:0",
            "127.0.0.1:70000",
            "0.0.0.0:15443",
            "[::]:15443",
            "224.0.0.1:15443",
            "255.255.255.255:15443",
            "2001:db8::1:15443",
            "[gw.example]:443",
            "gw_east:443",
            ":443",
        ] {
            assert!(check_gateway_address(bad).is_err(), "{bad}");
        }
    }
}
