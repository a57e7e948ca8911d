//! What each data-plane proxy receives: the services it routes to, not the whole cluster.
//!
//! Any SVID of the trust domain may open the config stream, and the whole service map names every
//! Service, endpoint address and policy of every namespace and every cluster: a compromised
//! workload would learn the clusterset's layout at once. So a stream is scoped by who opened it:
//! - a sidecar gets the services of its own namespace (from its SPIFFE ID,
//!   `spiffe://TD/ns/NAMESPACE/sa/...`) and those it subscribes to when it first meets them — by
//!   name (`web.billing.svc.cluster.local`) or by address (a clusterset IP, a cluster IP), as
//!   Linkerd's proxies ask their destination service; an ID of another shape gets only what it
//!   subscribes to;
//! - a gateway (role `gateway`, an ID in the system namespace) gets the services its cluster
//!   exports, which is all it admits.

use std::collections::BTreeSet;

use fedmesh_api::SpiffeId;
use fedmesh_api::pb::dataplane as pb;
use tonic::Status;

use super::config_stream::ServiceMap;

/// Subscriptions one stream may hold: far more than a proxy calls, few enough to bound memory.
pub const MAX_SUBSCRIPTIONS: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Role {
    Gateway,
    Sidecar { namespace: Option<String> },
}

/// One stream's scope.
#[derive(Clone, Debug)]
pub struct ProxyScope {
    role: Role,
    subscribed: BTreeSet<String>,
}

impl ProxyScope {
    /// The scope of a stream opened by `caller` as `role`, holding `subscriptions` from before.
    pub fn for_caller(
        caller: &SpiffeId,
        role: &str,
        system_namespace: &str,
        subscriptions: &[String],
    ) -> Result<Self, Status> {
        let namespace = caller.namespace_and_service_account().map(|(ns, _)| ns);
        let role = match role {
            "gateway" if namespace == Some(system_namespace) => Role::Gateway,
            "gateway" => {
                return Err(Status::permission_denied(format!(
                    "{caller} may not stream a gateway's configuration: gateways run as identities of namespace {system_namespace}"
                )));
            }
            _ => Role::Sidecar {
                namespace: namespace.map(str::to_string),
            },
        };
        let mut scope = Self {
            role,
            subscribed: BTreeSet::new(),
        };
        for s in subscriptions.iter().take(MAX_SUBSCRIPTIONS) {
            if s.parse::<fedmesh_api::ServiceKey>().is_ok() {
                scope.subscribed.insert(s.clone());
            }
        }
        Ok(scope)
    }

    fn visible(&self, key: &str, svc: &pb::Service) -> bool {
        match &self.role {
            Role::Gateway => svc.exported,
            Role::Sidecar { namespace } => {
                self.subscribed.contains(key)
                    || namespace
                        .as_deref()
                        .is_some_and(|ns| key.split_once('/').is_some_and(|(n, _)| n == ns))
            }
        }
    }

    /// Whether a sidecar's stream is sent service `key` (`svc`): what its reports about the
    /// service may count for.
    pub fn sees(&self, key: &str, svc: &pb::Service) -> bool {
        self.role != Role::Gateway && self.visible(key, svc)
    }

    /// The part of `all` this stream receives: what it may see, and the services the routes of
    /// those send to (a route of web sending to web-v2 needs web-v2's endpoints).
    pub fn view(&self, all: &ServiceMap) -> ServiceMap {
        let mut out: ServiceMap = all
            .iter()
            .filter(|(k, s)| self.visible(k, s))
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        if self.role == Role::Gateway {
            return out;
        }
        let referenced: Vec<String> = out
            .values()
            .filter_map(|s| s.policy.as_ref())
            .flat_map(|p| &p.routes)
            .flat_map(|r| {
                let mirrors = r
                    .filters
                    .iter()
                    .chain(r.backend_refs.iter().flat_map(|b| &b.filters))
                    .filter_map(|f| match &f.kind {
                        Some(pb::filter::Kind::Mirror(m)) => m.backend.as_ref(),
                        _ => None,
                    });
                r.backend_refs.iter().chain(mirrors)
            })
            .filter(|b| !b.service.is_empty())
            .map(|b| b.service.clone())
            .filter(|k| !out.contains_key(k))
            .collect();
        for k in referenced {
            if let Some(s) = all.get(&k) {
                out.insert(k, s.clone());
            }
        }
        out
    }

    /// Keys subscribed to, for sending whole on a resumed stream.
    pub fn subscribed(&self) -> impl Iterator<Item = &String> {
        self.subscribed.iter()
    }

    /// Adds what `req` names and `all` holds; returns the names it could not find (or could not
    /// add: past [`MAX_SUBSCRIPTIONS`], or asked by a gateway, which sees only exports).
    pub fn subscribe(&mut self, req: &pb::Subscribe, all: &ServiceMap) -> Vec<String> {
        let mut not_found = Vec::new();
        // A clusterset IP, a cluster IP, or an endpoint's own address (a pod IP).
        let by_address = |a: &str| {
            all.iter()
                .find(|(_, s)| {
                    !a.is_empty()
                        && (s.vip == a
                            || s.cluster_ip == a
                            || s.endpoints.iter().any(|e| e.address == a))
                })
                .map(|(k, _)| k.clone())
        };
        let wanted = req
            .services
            .iter()
            .map(|s| (s, all.contains_key(s).then(|| s.clone())))
            .chain(req.addresses.iter().map(|a| (a, by_address(a))));
        for (asked, key) in wanted {
            match key {
                Some(k)
                    if self.role != Role::Gateway
                        && (self.subscribed.len() < MAX_SUBSCRIPTIONS
                            || self.subscribed.contains(&k)) =>
                {
                    self.subscribed.insert(k);
                }
                _ => not_found.push(asked.clone()),
            }
        }
        not_found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(key: &str, vip: &str, exported: bool) -> (String, pb::Service) {
        (
            key.to_string(),
            pb::Service {
                key: key.to_string(),
                vip: vip.to_string(),
                exported,
                ..Default::default()
            },
        )
    }

    fn all() -> ServiceMap {
        [
            svc("shop/web", "", true),
            svc("shop/cart", "", false),
            svc("billing/ledger", "241.0.0.7", false),
            svc("billing/audit", "", true),
        ]
        .into_iter()
        .collect()
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::new(s).unwrap()
    }

    fn keys(m: &ServiceMap) -> Vec<&str> {
        m.keys().map(String::as_str).collect()
    }

    #[test]
    fn a_sidecar_sees_its_namespace_and_what_it_subscribes_to() {
        let mut s = ProxyScope::for_caller(
            &id("spiffe://east.example/ns/shop/sa/web"),
            "sidecar",
            "fedmesh-system",
            &[],
        )
        .unwrap();
        assert_eq!(keys(&s.view(&all())), ["shop/cart", "shop/web"]);
        let nf = s.subscribe(
            &pb::Subscribe {
                services: vec!["billing/nope".into()],
                addresses: vec!["241.0.0.7".into(), "10.9.9.9".into()],
            },
            &all(),
        );
        assert_eq!(nf, ["billing/nope", "10.9.9.9"]);
        assert_eq!(
            keys(&s.view(&all())),
            ["billing/ledger", "shop/cart", "shop/web"]
        );
    }

    #[test]
    fn gateways_see_exports_and_only_the_system_namespace_may_be_one() {
        let g = ProxyScope::for_caller(
            &id("spiffe://east.example/ns/fedmesh-system/sa/gw"),
            "gateway",
            "fedmesh-system",
            &[],
        )
        .unwrap();
        assert_eq!(keys(&g.view(&all())), ["billing/audit", "shop/web"]);
        let err = ProxyScope::for_caller(
            &id("spiffe://east.example/ns/shop/sa/web"),
            "gateway",
            "fedmesh-system",
            &[],
        )
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn other_ids_get_only_their_subscriptions_kept_across_reconnects() {
        let s = ProxyScope::for_caller(
            &id("spiffe://east.example/web"),
            "sidecar",
            "fedmesh-system",
            &["shop/web".into(), "not a key".into()],
        )
        .unwrap();
        assert_eq!(keys(&s.view(&all())), ["shop/web"]);
    }
}
