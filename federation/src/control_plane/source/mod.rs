//! Where a control plane learns its cluster's Services, EndpointSlices and ServiceExports: from
//! Kubernetes (kube-rs watchers) or from a directory of the same YAML objects. Both produce one
//! model, [`LocalObjects`]; everything past the source is shared.

pub mod dir;
pub mod kube;
pub mod pods;

use std::collections::BTreeMap;

use fedmesh_api::authn::{PeerAuthentication, RequestAuthentication};
use fedmesh_api::authz::AuthorizationPolicy;
use fedmesh_api::federation::FederatedTrustDomain;
use fedmesh_api::gateway::{GRPCRoute, HTTPRoute};
use fedmesh_api::mcs::{ServiceExport, condition, reason};
use fedmesh_api::pb::federation as pb;
use fedmesh_api::policy::TrafficPolicy;
use fedmesh_api::rollout::Rollout;
use fedmesh_api::{Namespace, ServiceKey};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::Value;

/// The label EndpointSlices carry to name their Service.
pub const LABEL_SERVICE: &str = "kubernetes.io/service-name";

/// The objects a source currently sees.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LocalObjects {
    pub services: BTreeMap<ServiceKey, Service>,
    /// Keyed by `namespace/slice-name`.
    pub slices: BTreeMap<String, EndpointSlice>,
    pub exports: BTreeMap<ServiceKey, ServiceExport>,
    /// Traffic policies, keyed by their own namespace and name.
    pub policies: BTreeMap<ServiceKey, TrafficPolicy>,
    /// Authorization policies, keyed by their own namespace and name.
    pub authz_policies: BTreeMap<ServiceKey, AuthorizationPolicy>,
    /// PeerAuthentications and RequestAuthentications, keyed by their own namespace and name.
    pub peer_authns: BTreeMap<ServiceKey, PeerAuthentication>,
    pub request_authns: BTreeMap<ServiceKey, RequestAuthentication>,
    /// Gateway API routes, keyed by their own namespace/name.
    pub http_routes: BTreeMap<ServiceKey, HTTPRoute>,
    pub grpc_routes: BTreeMap<ServiceKey, GRPCRoute>,
    /// Trust domains outside the clusterset this cluster federates with (cluster-scoped, keyed
    /// by name).
    pub federated_tds: BTreeMap<String, FederatedTrustDomain>,
    /// Rollouts, keyed by their own namespace and name.
    pub rollouts: BTreeMap<ServiceKey, Rollout>,
}

/// An endpoint of a local service, for the data plane.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct LocalEndpoint {
    pub address: String,
    pub zone: String,
    pub ready: bool,
    /// Port name → port number on this endpoint.
    pub ports: Vec<(String, u16)>,
}

/// The `Valid=False` reason of an export the hub would refuse (e.g. a port protocol other than
/// TCP, UDP or SCTP); the message is the hub's own.
pub const INVALID_EXPORT: &str = "InvalidExport";

/// A ServiceExport that could not be exported, and why (becomes its `Valid=False` condition).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    pub reason: &'static str,
    pub message: String,
}

impl LocalObjects {
    /// Adds (or replaces) an object read from YAML, keyed as its kind is.
    pub fn insert(&mut self, o: &Object) {
        fn by_key<T: Clone>(
            map: &mut BTreeMap<ServiceKey, T>,
            m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
            o: &T,
        ) {
            if let Some(k) = key_of(m) {
                map.insert(k, o.clone());
            }
        }
        match o {
            Object::Service(s) => by_key(&mut self.services, &s.metadata, &**s),
            Object::ServiceExport(e) => by_key(&mut self.exports, &e.metadata, &**e),
            Object::TrafficPolicy(p) => by_key(&mut self.policies, &p.metadata, &**p),
            Object::AuthorizationPolicy(p) => by_key(&mut self.authz_policies, &p.metadata, &**p),
            Object::PeerAuthentication(p) => by_key(&mut self.peer_authns, &p.metadata, &**p),
            Object::RequestAuthentication(p) => by_key(&mut self.request_authns, &p.metadata, &**p),
            Object::HttpRoute(r) => by_key(&mut self.http_routes, &r.metadata, &**r),
            Object::GrpcRoute(r) => by_key(&mut self.grpc_routes, &r.metadata, &**r),
            Object::Rollout(r) => by_key(&mut self.rollouts, &r.metadata, &**r),
            Object::FederatedTrustDomain(f) => {
                if let Some(name) = &f.metadata.name {
                    self.federated_tds.insert(name.clone(), (**f).clone());
                }
            }
            Object::EndpointSlice(s) => {
                let ns = s
                    .metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into());
                let name = s.metadata.name.clone().unwrap_or_default();
                let mut s = (**s).clone();
                s.metadata.namespace = Some(ns.clone());
                self.slices.insert(format!("{ns}/{name}"), s);
            }
        }
    }

    /// Parses multi-document YAML as the directory source does and adds every object (tests).
    #[cfg(test)]
    pub fn from_yaml(yaml: &str) -> Self {
        let mut l = Self::default();
        for doc in yaml.split("\n---\n") {
            let v: Value = serde_saphyr::from_str(doc).expect("YAML");
            if let Some(o) = parse_object(v).expect("an object fedmesh reads") {
                l.insert(&o);
            }
        }
        l
    }

    /// Ready endpoints of a service, from its EndpointSlices.
    pub fn endpoints(&self, key: &ServiceKey) -> Vec<LocalEndpoint> {
        let mut out: Vec<LocalEndpoint> = self
            .slices
            .values()
            .filter(|s| slice_owner(s).as_ref() == Some(key))
            .flat_map(slice_endpoints)
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Every service's endpoints, reading each EndpointSlice once (for whole-cluster views).
    pub fn endpoints_by_service(&self) -> BTreeMap<ServiceKey, Vec<LocalEndpoint>> {
        let mut out: BTreeMap<ServiceKey, Vec<LocalEndpoint>> = BTreeMap::new();
        for s in self.slices.values() {
            if let Some(key) = slice_owner(s) {
                out.entry(key).or_default().extend(slice_endpoints(s));
            }
        }
        for eps in out.values_mut() {
            eps.sort();
            eps.dedup();
        }
        out
    }

    /// The export of `key` as published to the hub, or why it cannot be exported.
    /// `created_unix` is the export's age (oldest wins conflicts).
    pub fn export(
        &self,
        key: &ServiceKey,
        region: &str,
        created_unix: i64,
    ) -> Result<pb::Export, Invalid> {
        let Some(svc) = self.services.get(key) else {
            return Err(Invalid {
                reason: reason::NO_SERVICE,
                message: format!(
                    "there is no Service {} in namespace {}",
                    key.name, key.namespace
                ),
            });
        };
        let spec = svc.spec.clone().unwrap_or_default();
        if spec.type_.as_deref() == Some("ExternalName") {
            return Err(Invalid {
                reason: reason::INVALID_SERVICE_TYPE,
                message: "ExternalName services cannot be exported".into(),
            });
        }
        let headless = spec.cluster_ip.as_deref() == Some("None");
        let ports = spec
            .ports
            .iter()
            .flatten()
            .map(|p| pb::Port {
                name: p.name.clone().unwrap_or_default(),
                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                port: p.port.max(0) as u32,
                app_protocol: p.app_protocol.clone().unwrap_or_default(),
            })
            .collect();
        let mut by_zone: BTreeMap<String, (u32, u32)> = BTreeMap::new();
        for e in self.endpoints(key) {
            let c = by_zone.entry(e.zone).or_default();
            c.1 += 1;
            if e.ready {
                c.0 += 1;
            }
        }
        Ok(pb::Export {
            service: key.to_string(),
            r#type: if headless {
                pb::ServiceType::Headless as i32
            } else {
                pb::ServiceType::ClusterSetIp as i32
            },
            ports,
            session_affinity: spec
                .session_affinity
                .filter(|a| a != "None")
                .unwrap_or_default(),
            session_affinity_timeout_seconds: spec
                .session_affinity_config
                .and_then(|c| c.client_ip)
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(0)
                .max(0) as u32,
            endpoints: by_zone
                .into_iter()
                .map(|(zone, (ready, total))| pb::LocalityEndpoints {
                    region: region.to_string(),
                    zone,
                    ready,
                    total,
                })
                .collect(),
            created_unix,
        })
    }
}

/// The service an EndpointSlice belongs to (its namespace and `kubernetes.io/service-name`).
fn slice_owner(s: &EndpointSlice) -> Option<ServiceKey> {
    let ns = s.metadata.namespace.as_deref()?;
    let name = s.metadata.labels.as_ref()?.get(LABEL_SERVICE)?;
    format!("{ns}/{name}").parse().ok()
}

/// An EndpointSlice's addresses with their zone, readiness and named ports.
fn slice_endpoints(s: &EndpointSlice) -> Vec<LocalEndpoint> {
    let ports: Vec<(String, u16)> = s
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            Some((
                p.name.clone().unwrap_or_default(),
                u16::try_from(p.port?).ok()?,
            ))
        })
        .collect();
    let mut out = Vec::new();
    for e in s.endpoints.iter().flatten() {
        let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
        for a in &e.addresses {
            out.push(LocalEndpoint {
                address: a.clone(),
                zone: e.zone.clone().unwrap_or_default(),
                ready,
                ports: ports.clone(),
            });
        }
    }
    out
}

/// The ServiceExport conditions for one export, per KEP-1645.
pub fn export_conditions(
    validity: &Result<(), Invalid>,
    ready: Option<Result<(), String>>,
    conflicts: &[&pb::Conflict],
) -> Vec<(String, bool, String, String)> {
    let mut out = Vec::new();
    match validity {
        Ok(()) => out.push((
            condition::VALID.into(),
            true,
            reason::EXPORTED.into(),
            "the Service is exported to the clusterset".into(),
        )),
        Err(i) => out.push((
            condition::VALID.into(),
            false,
            i.reason.into(),
            i.message.clone(),
        )),
    }
    if validity.is_ok() {
        match ready {
            Some(Ok(())) => out.push((
                condition::READY.into(),
                true,
                reason::EXPORTED.into(),
                "the hub accepted the export; other clusters import it".into(),
            )),
            Some(Err(e)) => out.push((condition::READY.into(), false, "PublishRefused".into(), e)),
            None => out.push((
                condition::READY.into(),
                false,
                reason::PENDING.into(),
                "waiting for the hub to accept the export".into(),
            )),
        }
        if conflicts.is_empty() {
            out.push((
                condition::CONFLICT.into(),
                false,
                reason::NO_CONFLICTS.into(),
                "no conflicting exports".into(),
            ));
        } else {
            let reason = match conflicts[0].field.as_str() {
                "type" => reason::TYPE_CONFLICT,
                "sessionAffinity" => reason::SESSION_AFFINITY_CONFLICT,
                _ => reason::PORT_CONFLICT,
            };
            let msg = conflicts
                .iter()
                .map(|c| c.message.clone())
                .collect::<Vec<_>>()
                .join("; ");
            out.push((condition::CONFLICT.into(), true, reason.into(), msg));
        }
    }
    out
}

/// One object from a YAML document.
#[derive(Clone, Debug)]
pub enum Object {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    ServiceExport(Box<ServiceExport>),
    TrafficPolicy(Box<TrafficPolicy>),
    AuthorizationPolicy(Box<AuthorizationPolicy>),
    PeerAuthentication(Box<PeerAuthentication>),
    RequestAuthentication(Box<RequestAuthentication>),
    HttpRoute(Box<HTTPRoute>),
    GrpcRoute(Box<GRPCRoute>),
    FederatedTrustDomain(Box<FederatedTrustDomain>),
    Rollout(Box<Rollout>),
}

impl Object {
    /// `Kind namespace/name`, for duplicate detection and messages.
    pub fn id(&self) -> String {
        let (kind, m) = match self {
            Object::Service(o) => ("Service", &o.metadata),
            Object::EndpointSlice(o) => ("EndpointSlice", &o.metadata),
            Object::ServiceExport(o) => ("ServiceExport", &o.metadata),
            Object::TrafficPolicy(o) => ("TrafficPolicy", &o.metadata),
            Object::AuthorizationPolicy(o) => ("AuthorizationPolicy", &o.metadata),
            Object::PeerAuthentication(o) => ("PeerAuthentication", &o.metadata),
            Object::RequestAuthentication(o) => ("RequestAuthentication", &o.metadata),
            Object::HttpRoute(o) => ("HTTPRoute", &o.metadata),
            Object::GrpcRoute(o) => ("GRPCRoute", &o.metadata),
            Object::Rollout(o) => ("Rollout", &o.metadata),
            Object::FederatedTrustDomain(o) => {
                return format!(
                    "FederatedTrustDomain {}",
                    o.metadata.name.as_deref().unwrap_or("")
                );
            }
        };
        format!(
            "{kind} {}/{}",
            m.namespace.as_deref().unwrap_or("default"),
            m.name.as_deref().unwrap_or("")
        )
    }
}

/// Parses one YAML document into an object we understand. Errors say what is wrong and where.
pub fn parse_object(doc: Value) -> Result<Option<Object>, String> {
    if doc.is_null() {
        return Ok(None); // an empty document (e.g. a trailing `---`)
    }
    let api_version = doc
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let kind = doc
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let name = doc
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .map(String::from)
        .ok_or_else(|| format!("{kind} has no metadata.name"))?;
    let namespace = doc
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    Namespace::new(&namespace).map_err(|e| format!("{kind} {name}: {e}"))?;
    let what = format!("{kind} {namespace}/{name}");
    let obj = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Service") => {
            fedmesh_api::ServiceName::new(&name).map_err(|e| format!("{what}: {e}"))?;
            let o: Service = typed(&doc, &what)?;
            Object::Service(Box::new(o))
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            Object::EndpointSlice(Box::new(typed(&doc, &what)?))
        }
        ("multicluster.x-k8s.io/v1alpha1", "ServiceExport") => {
            fedmesh_api::ServiceName::new(&name).map_err(|e| format!("{what}: {e}"))?;
            Object::ServiceExport(Box::new(typed(&doc, &what)?))
        }
        ("fedmesh.io/v1alpha1", "TrafficPolicy") => {
            fedmesh_api::ServiceName::new(&name).map_err(|e| format!("{what}: {e}"))?;
            // Its meaning is checked by the control plane, which reports on its status.
            let p: TrafficPolicy = typed(&doc, &what)?;
            Object::TrafficPolicy(Box::new(p))
        }
        ("fedmesh.io/v1alpha1", "AuthorizationPolicy") => {
            fedmesh_api::ServiceName::new(&name).map_err(|e| format!("{what}: {e}"))?;
            Object::AuthorizationPolicy(Box::new(typed(&doc, &what)?))
        }
        ("fedmesh.io/v1alpha1", "PeerAuthentication") => {
            fedmesh_api::ServiceName::new(&name).map_err(|e| format!("{what}: {e}"))?;
            Object::PeerAuthentication(Box::new(typed(&doc, &what)?))
        }
        ("fedmesh.io/v1alpha1", "RequestAuthentication") => {
            fedmesh_api::ServiceName::new(&name).map_err(|e| format!("{what}: {e}"))?;
            Object::RequestAuthentication(Box::new(typed(&doc, &what)?))
        }
        ("fedmesh.io/v1alpha1", "Rollout") => {
            // Its meaning is checked by the control plane, which says what is wrong on its status.
            Object::Rollout(Box::new(typed(&doc, &what)?))
        }
        ("fedmesh.io/v1alpha1", "FederatedTrustDomain") => {
            // Cluster-scoped: a namespace in the document is ignored, as Kubernetes does.
            Object::FederatedTrustDomain(Box::new(typed(&doc, &format!("{kind} {name}"))?))
        }
        ("gateway.networking.k8s.io/v1", "HTTPRoute") => {
            fedmesh_api::ServiceName::new(&name).map_err(|e| format!("{what}: route {e}"))?;
            Object::HttpRoute(Box::new(typed(&doc, &what)?))
        }
        ("gateway.networking.k8s.io/v1", "GRPCRoute") => {
            fedmesh_api::ServiceName::new(&name).map_err(|e| format!("{what}: route {e}"))?;
            Object::GrpcRoute(Box::new(typed(&doc, &what)?))
        }
        ("", _) | (_, "") => return Err(format!("document has no apiVersion or kind ({what})")),
        _ => {
            return Err(format!(
                "{api_version} {kind} is not a kind fedmesh reads (Service v1, EndpointSlice discovery.k8s.io/v1, ServiceExport multicluster.x-k8s.io/v1alpha1, HTTPRoute and GRPCRoute gateway.networking.k8s.io/v1, TrafficPolicy, AuthorizationPolicy, PeerAuthentication, RequestAuthentication, FederatedTrustDomain and Rollout fedmesh.io/v1alpha1)"
            ));
        }
    };
    Ok(Some(obj))
}

/// Deserializes into `T` and refuses fields `T` does not know (a misspelt field would otherwise
/// be silently ignored).
fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(
    doc: &Value,
    what: &str,
) -> Result<T, String> {
    let t: T = serde_json::from_value(doc.clone()).map_err(|e| format!("{what}: {e}"))?;
    let back = serde_json::to_value(&t).map_err(|e| format!("{what}: {e}"))?;
    let mut unknown = Vec::new();
    find_unknown(doc, &back, String::new(), &mut unknown);
    // status is written by controllers; never an input error.
    unknown.retain(|p| !p.starts_with(".status"));
    if !unknown.is_empty() {
        return Err(format!("{what}: unknown field(s) {}", unknown.join(", ")));
    }
    Ok(t)
}

fn find_unknown(orig: &Value, known: &Value, path: String, out: &mut Vec<String>) {
    match (orig, known) {
        (Value::Object(o), Value::Object(k)) => {
            for (key, v) in o {
                let p = format!("{path}.{key}");
                match k.get(key) {
                    Some(kv) => find_unknown(v, kv, p, out),
                    // A default value may be dropped on re-serialization; only report real content.
                    None if !is_empty(v) => out.push(p),
                    None => {}
                }
            }
        }
        (Value::Array(o), Value::Array(k)) => {
            for (i, (a, b)) in o.iter().zip(k).enumerate() {
                find_unknown(a, b, format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::String(s) => s.is_empty(),
        Value::Number(n) => n.as_f64() == Some(0.0),
    }
}

/// Key of a namespaced object.
pub fn key_of(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Option<ServiceKey> {
    ServiceKey::new(
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref()?,
    )
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(s: &str) -> Value {
        serde_saphyr::from_str(s).unwrap()
    }

    #[test]
    fn objects_parse_and_unknown_fields_are_named() {
        let svc = parse_object(yaml(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  ports: [{name: http, port: 80}]\n",
        ))
        .unwrap()
        .unwrap();
        assert_eq!(svc.id(), "Service shop/web");
        let err = parse_object(yaml(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  portz: [{port: 80}]\n",
        ))
        .unwrap_err();
        assert!(err.contains("unknown field(s) .spec.portz"), "{err}");
        let err = parse_object(yaml(
            "apiVersion: v1\nkind: Service\nmetadata: {name: Web}\n",
        ))
        .unwrap_err();
        assert!(err.contains("service name"), "{err}");
        let err = parse_object(yaml(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n",
        ))
        .unwrap_err();
        assert!(err.contains("not a kind fedmesh reads"), "{err}");
        let err = parse_object(yaml("kind: Service\nmetadata: {name: x}\n")).unwrap_err();
        assert!(err.contains("no apiVersion"), "{err}");
        let err = parse_object(yaml(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: eighty}]}\n",
        ))
        .unwrap_err();
        assert!(err.contains("Service default/web"), "{err}");
    }

    #[test]
    fn exports_derive_ports_type_and_endpoints_by_zone() {
        let mut objs = LocalObjects::default();
        let key: ServiceKey = "shop/web".parse().unwrap();
        let Some(Object::Service(s)) = parse_object(yaml(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  clusterIP: None\n  sessionAffinity: ClientIP\n  ports: [{name: http, port: 80, appProtocol: http}]\n",
        )).unwrap() else { panic!() };
        objs.services.insert(key.clone(), *s);
        let Some(Object::EndpointSlice(es)) = parse_object(yaml(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n- addresses: [10.0.0.1]\n  zone: a\n- addresses: [10.0.0.2]\n  zone: b\n  conditions: {ready: false}\n",
        )).unwrap() else { panic!() };
        objs.slices.insert("shop/web-1".into(), *es);
        let e = objs.export(&key, "us", 42).unwrap();
        assert_eq!(e.r#type, pb::ServiceType::Headless as i32);
        assert_eq!(e.session_affinity, "ClientIP");
        assert_eq!(e.ports[0].port, 80);
        assert_eq!(e.ports[0].protocol, "TCP");
        let zones: Vec<_> = e
            .endpoints
            .iter()
            .map(|l| (l.zone.as_str(), l.ready, l.total))
            .collect();
        assert_eq!(zones, vec![("a", 1, 1), ("b", 0, 1)]);
        assert_eq!(
            objs.endpoints(&key)[0].ports,
            vec![("http".to_string(), 8080)]
        );
        let missing = objs
            .export(&"shop/db".parse().unwrap(), "us", 0)
            .unwrap_err();
        assert_eq!(missing.reason, reason::NO_SERVICE);
    }
}
