//! What the outbound layers tell each other about a request, through its extensions: where it
//! goes ([`RouteCtx`], set by the route layer), which targets it has tried ([`Tried`], shared by
//! all its attempts), and how an attempt failed ([`AttemptError`], which may hand the request
//! back when nothing of it was sent).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedmesh_dataplane::config::{RoutingTable, Scope, ServiceEntry};
use fedmesh_dataplane::error::ProxyError;
use fedmesh_dataplane::http::Body;
use fedmesh_dataplane::policy::{Backend, Route};
use fedmesh_dataplane::target::Target;
use http::Request;

use crate::dest::Dest;

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Where a request goes and by which rules: the configuration snapshot it routes by, its
/// service, and the route of the service's policy it matched.
#[derive(Clone)]
pub(crate) struct RouteCtx {
    pub table: Arc<RoutingTable>,
    pub entry: Arc<ServiceEntry>,
    pub dest: Dest,
    /// Index of the matched route in the policy.
    pub route: Option<usize>,
    /// A `cluster.local` name: this cluster only, no split across clusters.
    pub local_only: bool,
}

impl RouteCtx {
    pub fn route(&self) -> Option<&Route> {
        self.route.and_then(|i| self.entry.policy.routes.get(i))
    }

    /// The weighted backends that apply: the route's, else the service's; none for local names.
    pub fn split(&self) -> &[Backend] {
        match self.route() {
            _ if self.local_only => &[],
            Some(r) if !r.backends.is_empty() => &r.backends,
            _ => &self.entry.policy.split,
        }
    }

    /// The whole request's time limit.
    pub fn timeout(&self) -> Option<Duration> {
        self.route()
            .and_then(|r| r.timeout)
            .or(self.entry.policy.request_timeout)
    }

    /// Retries of gateway failures (502-504) the policy allows.
    pub fn app_retries(&self) -> u32 {
        self.route()
            .map(|r| r.retries)
            .filter(|n| *n > 0)
            .unwrap_or(self.entry.policy.retries)
    }

    pub fn connect_timeout(&self) -> Option<Duration> {
        self.entry.policy.connect_timeout
    }

    /// The targets the request's name reaches.
    pub fn candidates(&self) -> &[Target] {
        let scope = if self.local_only {
            Scope::Local
        } else {
            self.dest.scope
        };
        self.entry.targets_for(scope, self.dest.port)
    }
}

/// The targets a request has tried, in order (shared by its attempts).
#[derive(Clone, Default)]
pub(crate) struct Tried(Arc<Mutex<Vec<Target>>>);

impl Tried {
    pub fn push(&self, t: Target) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(t);
    }

    pub fn snapshot(&self) -> Vec<Target> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn last(&self) -> Option<Target> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last()
            .cloned()
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

/// The context a layer needs, or the error that says the stack was assembled wrong.
pub(crate) fn route_ctx<B>(req: &Request<B>) -> Result<RouteCtx, ProxyError> {
    req.extensions()
        .get::<RouteCtx>()
        .cloned()
        .ok_or_else(|| ProxyError::BadRequest("the request reached a layer before routing".into()))
}
