//! What the outbound layers tell each other about a request, through its extensions: where it
//! goes ([`RouteCtx`], set by the route layer), which targets it has tried ([`Tried`], shared by
//! all its attempts), and how an attempt failed ([`AttemptError`], which may hand the request
//! back when nothing of it was sent).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedmesh_api::{ClusterName, ServiceKey};
use fedmesh_dataplane::config::{RoutingTable, Scope, ServiceEntry};
use fedmesh_dataplane::error::ProxyError;
use fedmesh_dataplane::hop::HopHeader;
use fedmesh_dataplane::http::Body;
use fedmesh_dataplane::policy::{ClusterShare, Policy, Route, RouteBackend};
use fedmesh_dataplane::target::Target;
use http::Request;

use crate::dest::Dest;

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Where a request goes and by which rules: the configuration snapshot it routes by, its
/// service, the rule of the service's policy it matched and the backend it drew.
#[derive(Clone)]
pub(crate) struct RouteCtx {
    pub table: Arc<RoutingTable>,
    pub entry: Arc<ServiceEntry>,
    pub dest: Dest,
    /// Index of the matched route in the policy.
    pub route: Option<usize>,
    /// The backend drawn among the route's `backendRefs`; `None`: the service itself.
    pub backend: Option<Drawn>,
    /// A `cluster.local` name: this cluster only, no split across clusters.
    pub local_only: bool,
}

/// A backend a request drew.
#[derive(Clone)]
pub(crate) struct Drawn {
    /// Index in the route's `route_backends` (`None`: a mirror's backend).
    pub index: Option<usize>,
    pub to: DrawnTarget,
}

#[derive(Clone)]
pub(crate) enum DrawnTarget {
    /// The service itself, in one cluster or wherever locality sends it.
    Parent(Option<ClusterName>),
    /// Another service: this cluster's endpoints (`Scope::Local`) or the clusterset's.
    Service {
        entry: Arc<ServiceEntry>,
        port: u16,
        scope: Scope,
    },
    /// One endpoint, addressed by its own address.
    Endpoint(Target),
}

impl RouteCtx {
    pub fn route(&self) -> Option<&Route> {
        self.route.and_then(|i| self.entry.policy.routes.get(i))
    }

    /// The backend drawn, as the route declared it (with its filters).
    pub fn route_backend(&self) -> Option<&RouteBackend> {
        let i = self.backend.as_ref()?.index?;
        self.route()?.route_backends.get(i)
    }

    /// The weighted clusters that apply: the drawn backend's cluster; none for local names,
    /// other services and the service itself (locality decides).
    pub fn split(&self) -> Vec<ClusterShare> {
        match self.backend.as_ref().map(|b| &b.to) {
            Some(DrawnTarget::Parent(Some(c))) if !self.local_only => vec![ClusterShare {
                cluster: Some(c.clone()),
                weight: 1,
            }],
            _ => Vec::new(),
        }
    }

    /// The whole request's time limit (the rule's `timeouts.request`).
    pub fn timeout(&self) -> Option<Duration> {
        self.route().and_then(|r| r.timeout)
    }

    /// One attempt's time limit.
    pub fn attempt_timeout(&self) -> Option<Duration> {
        self.route().and_then(|r| r.backend_timeout)
    }

    /// Which answers of the app are retried, how often and how far apart: the rule's `retry`
    /// (no codes listed: gateway failures, 502-504); none without one.
    pub fn app_retry(&self) -> AppRetry {
        match self.route().and_then(|r| r.retry.as_ref()) {
            Some(r) => AppRetry {
                codes: if r.codes.is_empty() {
                    GATEWAY_FAILURES.to_vec()
                } else {
                    r.codes.clone()
                },
                attempts: r.attempts,
                backoff: r.backoff,
            },
            None => AppRetry {
                codes: Vec::new(),
                attempts: 0,
                backoff: None,
            },
        }
    }

    pub fn connect_timeout(&self) -> Option<Duration> {
        self.entry.policy.connect_timeout
    }

    /// The targets the request's drawn backend reaches.
    pub fn candidates(&self) -> &[Target] {
        match &self.backend {
            Some(Drawn {
                to: DrawnTarget::Service { entry, port, scope },
                ..
            }) => return entry.targets_for(*scope, *port),
            Some(Drawn {
                to: DrawnTarget::Endpoint(t),
                ..
            }) => return std::slice::from_ref(t),
            _ => {}
        }
        let scope = if self.local_only {
            Scope::Local
        } else {
            self.dest.scope
        };
        self.entry.targets_for(scope, self.dest.port)
    }

    /// The service the request's backend is: the drawn one, else the addressed one.
    pub fn backend_entry(&self) -> &Arc<ServiceEntry> {
        match self.backend.as_ref().map(|b| &b.to) {
            Some(DrawnTarget::Service { entry, .. }) => entry,
            _ => &self.entry,
        }
    }

    pub fn backend_key(&self) -> &ServiceKey {
        &self.backend_entry().key
    }

    /// The backend service's own policy: its circuit breaker, failure accrual, balancing.
    pub fn backend_policy(&self) -> &Policy {
        &self.backend_entry().policy
    }

    /// The backend drawn, for spans: `None` when the request goes to the service itself.
    pub fn backend_name(&self) -> Option<String> {
        Some(match &self.backend.as_ref()?.to {
            DrawnTarget::Parent(Some(c)) => format!("{} in {c}", self.dest.service),
            DrawnTarget::Parent(None) => return None,
            DrawnTarget::Service { entry, port, .. } => format!("{}:{port}", entry.key),
            DrawnTarget::Endpoint(t) => t.key().to_string(),
        })
    }

    /// The matched rule, for spans: its source and name (`HTTPRoute shop/web-canary rule 0`).
    pub fn route_name(&self) -> Option<String> {
        let r = self.route()?;
        Some(match (r.source.is_empty(), r.name.is_empty()) {
            (true, _) => r.name.clone(),
            (false, true) => r.source.clone(),
            (false, false) => format!("{} {}", r.source, r.name),
        })
    }

    /// What the request is addressed to, for messages: the service, or the backend it drew.
    pub fn destination(&self) -> String {
        match self.backend.as_ref().map(|b| &b.to) {
            Some(DrawnTarget::Service { entry, port, .. }) => format!("{}:{port}", entry.key),
            Some(DrawnTarget::Endpoint(t)) => format!("{} at {}", self.dest, t.key()),
            _ => self.dest.to_string(),
        }
    }
}

/// The codes a rule's `retry` without codes retries.
const GATEWAY_FAILURES: [u16; 3] = [502, 503, 504];

/// Retries of answers from the app.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AppRetry {
    pub codes: Vec<u16>,
    /// Retries after the first try.
    pub attempts: u32,
    /// The least wait between attempts (doubled per retry, with jitter).
    pub backoff: Option<Duration>,
}

/// What happened to a request, shared by its layers and attempts: the targets tried in order
/// (with the locality tier of each) and the routing decision, for the layers that pick and for
/// the span and metrics the observe layer records when the request ends.
#[derive(Clone, Default)]
pub(crate) struct Tried(Arc<Mutex<Journal>>);

#[derive(Clone, Default)]
pub(crate) struct Journal {
    pub targets: Vec<Target>,
    /// The locality tier of each target tried ([`fedmesh_dataplane::balance::Balancer::tier_name`]).
    pub tiers: Vec<&'static str>,
    /// The routing decision, once the route layer made it.
    pub route: Option<Arc<RouteCtx>>,
    /// Targets ejected after this request's failures.
    pub ejected: u32,
    /// The gateway connection the last attempt rode, as the gateway knows it.
    pub connection: Option<HopHeader>,
}

impl Tried {
    fn with<T>(&self, f: impl FnOnce(&mut Journal) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn push(&self, t: Target, tier: &'static str) {
        self.with(|j| {
            j.targets.push(t);
            j.tiers.push(tier);
        })
    }

    pub fn snapshot(&self) -> Vec<Target> {
        self.with(|j| j.targets.clone())
    }

    pub fn last(&self) -> Option<Target> {
        self.with(|j| j.targets.last().cloned())
    }

    pub fn routed(&self, ctx: Arc<RouteCtx>) {
        self.with(|j| j.route = Some(ctx))
    }

    pub fn ejected(&self) {
        self.with(|j| j.ejected += 1)
    }

    pub fn connection(&self, hop: HopHeader) {
        self.with(|j| j.connection = Some(hop))
    }

    /// The name the drawn backend's requests are counted under for a rollout, if it has one.
    pub fn signals(&self) -> Option<Arc<str>> {
        self.with(|j| j.route.as_ref()?.route_backend()?.signals.clone())
    }

    pub fn journal(&self) -> Journal {
        self.with(|j| j.clone())
    }
}

/// An attempt that got no response.
pub(crate) struct AttemptError {
    pub error: ProxyError,
    /// The request, when none of it was sent: it can go elsewhere with its body.
    pub unsent: Option<Request<Body>>,
}

impl std::fmt::Debug for AttemptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttemptError")
            .field("error", &self.error)
            .field("unsent", &self.unsent.is_some())
            .finish()
    }
}

impl AttemptError {
    pub fn new(error: ProxyError) -> Self {
        Self {
            error,
            unsent: None,
        }
    }
}

impl From<ProxyError> for AttemptError {
    fn from(error: ProxyError) -> Self {
        Self::new(error)
    }
}

/// The context a layer needs (shared by the layers, set once by the route layer), or the error
/// that says the stack was assembled wrong.
pub(crate) fn route_ctx<B>(req: &Request<B>) -> Result<Arc<RouteCtx>, ProxyError> {
    req.extensions()
        .get::<Arc<RouteCtx>>()
        .cloned()
        .ok_or_else(|| ProxyError::BadRequest("the request reached a layer before routing".into()))
}
