//! Why a proxy answered a request itself: one enum, each variant with its HTTP status, the
//! `fedmesh-proxy-error` value (also the metric label) and a message that says what was wrong and
//! what to do — the sidecar's counterpart of the gateway's `Refusal`.

use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use crate::http::{Body, PROXY_ERROR, full};

#[derive(Clone, Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(
        "{0} is not a service of the clusterset known to this sidecar (use NAME.NAMESPACE.svc.clusterset.local[:PORT])"
    )]
    NoRoute(String),
    #[error(
        "HTTP/1.1 upgrades (WebSocket) are not meshed yet; declare the port as tcp (name it tcp-*) to carry it opaquely"
    )]
    Upgrade,
    #[error("bad request: {0}")]
    BadRequest(String),
    /// Routes bind the request's service port and none of their rules matches it.
    #[error(
        "no route rule of {service} matches {method} {path}: HTTPRoutes or GRPCRoutes bind this port of the service and none of their rules matches (add a rule, or one without matches to catch the rest)"
    )]
    NoMatchingRoute {
        service: String,
        method: String,
        path: String,
    },
    /// The matched rule cannot be applied (its route's status says the same).
    #[error("{source_route} cannot be applied: {reason} (fix the route; its status says the same)")]
    RouteInvalid {
        source_route: String,
        reason: String,
    },
    /// The backend the request drew resolves to nothing.
    #[error("{0}")]
    BackendUnresolved(String),
    /// A TrafficPolicy's fault injection answered instead of the service.
    #[error("fault injected by the TrafficPolicy of {policy_of}")]
    FaultInjected {
        status: StatusCode,
        policy_of: String,
    },
    /// A rate limit has no token left; one will be there after `retry_after`.
    #[error("rate limit of {what} exceeded ({limit}); retry after {retry_after:?}")]
    RateLimited {
        what: String,
        limit: String,
        retry_after: Duration,
    },
    /// A circuit breaker's limit is reached: answered at once, nothing sent.
    #[error("{0}")]
    Overloaded(String),
    #[error("reading the request body failed: {0}")]
    RequestBody(String),
    #[error("{dest} did not answer within {after:?}")]
    Timeout { dest: String, after: Duration },
    /// Nothing could be tried (the message says why).
    #[error("{0}")]
    Unavailable(String),
    /// A connection to a peer could not be made; nothing was sent.
    #[error("{message}")]
    Connect {
        /// `connect_failed`, `tls_failed`, `alpn_mismatch`, `h2_handshake_failed`.
        label: &'static str,
        /// TLS and ALPN failures are answered 502 (the peer is not what it should be), others 503.
        bad_peer: bool,
        message: String,
    },
    #[error("the connection to {target} failed: {error}")]
    UpstreamReset { target: String, error: String },
    #[error("{0}")]
    Denied(String),
    /// A RequestAuthentication wanted a valid JWT and did not get one.
    #[error("{0}")]
    Unauthenticated(String),
    #[error("this sidecar has no configuration from its control plane yet")]
    NotReady,
    /// An inbound connection whose destination (its SNI) this sidecar does not serve to that
    /// caller: every request on it is answered with the reason.
    #[error("{message}")]
    NotAdmitted {
        /// 421 for a destination that is not here, 403 for one not exported, 503 before the
        /// first configuration.
        status: StatusCode,
        /// `no-sni`, `bad-sni`, `wrong-cluster`, `unknown-service`, `not-an-endpoint`,
        /// `not-exported`, `not-ready`.
        kind: &'static str,
        message: String,
    },
    #[error("the app at {app} does not accept connections: {error}")]
    AppUnreachable { app: String, error: String },
    #[error("the app at {app} failed the request: {error}")]
    AppError { app: String, error: String },
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoRoute(_) => StatusCode::NOT_FOUND,
            Self::Upgrade => StatusCode::NOT_IMPLEMENTED,
            Self::BadRequest(_) | Self::RequestBody(_) => StatusCode::BAD_REQUEST,
            Self::NoMatchingRoute { .. } => StatusCode::NOT_FOUND,
            Self::RouteInvalid { .. } | Self::BackendUnresolved(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            Self::FaultInjected { status, .. } => *status,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::Unavailable(_) | Self::NotReady | Self::AppUnreachable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Connect { bad_peer: true, .. } => StatusCode::BAD_GATEWAY,
            Self::Connect { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamReset { .. } | Self::AppError { .. } => StatusCode::BAD_GATEWAY,
            Self::Denied(_) => StatusCode::FORBIDDEN,
            Self::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Self::NotAdmitted { status, .. } => *status,
        }
    }

    /// The `fedmesh-proxy-error` value, also the `reason` label of the error metric.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NoRoute(_) => "no-route",
            Self::Upgrade => "upgrade",
            Self::BadRequest(_) => "bad-request",
            Self::NoMatchingRoute { .. } => "no-matching-route",
            Self::RouteInvalid { .. } => "route-invalid",
            Self::BackendUnresolved(_) => "backend-unresolved",
            Self::FaultInjected { .. } => "fault-injected",
            Self::RateLimited { .. } => "rate-limited",
            Self::Overloaded(_) => "overloaded",
            Self::RequestBody(_) => "request-body",
            Self::Timeout { .. } => "timeout",
            Self::Unavailable(_) => "unavailable",
            Self::Connect { label, .. } => label,
            Self::UpstreamReset { .. } => "upstream-reset",
            Self::Denied(_) => "denied",
            Self::Unauthenticated(_) => "unauthenticated",
            Self::NotReady => "not-ready",
            Self::AppUnreachable { .. } => "app-unreachable",
            Self::AppError { .. } => "app-error",
            Self::NotAdmitted { kind, .. } => kind,
        }
    }

    /// The gRPC status a gRPC caller gets for this error: the HTTP status mapped as gRPC
    /// specifies (`doc/http-grpc-status-mapping.md`), with the cases a proxy knows better named
    /// exactly (a timeout is `DEADLINE_EXCEEDED`, a denial `PERMISSION_DENIED`).
    pub fn grpc_code(&self) -> u32 {
        match self {
            Self::Timeout { .. } => 4,
            Self::Denied(_) => 7,
            Self::Unauthenticated(_) => 16,
            Self::NoRoute(_) | Self::NoMatchingRoute { .. } | Self::Upgrade => 12,
            _ => match self.status().as_u16() {
                400 => 13,
                401 => 16,
                403 => 7,
                404 => 12,
                429 | 502 | 503 | 504 => 14,
                _ => 2,
            },
        }
    }

    /// The response for a caller: a gRPC caller (`content-type: application/grpc...`) gets a
    /// trailers-only answer with [`ProxyError::grpc_code`], as its client library can read it;
    /// anyone else [`ProxyError::into_response`].
    pub fn into_response_for(self, grpc: bool) -> Response<Body> {
        if grpc {
            return crate::http::grpc_error(self.grpc_code(), self.kind(), &self.to_string());
        }
        self.into_response()
    }

    /// The response a caller gets: the status, `fedmesh-proxy-error`, and the message as text.
    pub fn into_response(self) -> Response<Body> {
        let mut r = proxy_response(self.status(), self.kind(), &self.to_string());
        if let Self::RateLimited { retry_after, .. } = &self {
            // Whole seconds, rounded up (RFC 9110 10.2.3).
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        if let Self::Unauthenticated(_) = &self {
            // RFC 6750 §3: the scheme the caller should use (the reason is in the body).
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer error=\"invalid_token\""),
            );
        }
        r
    }
}

/// A response the proxy made itself.
pub fn proxy_response(status: StatusCode, kind: &'static str, message: &str) -> Response<Body> {
    let mut r = Response::new(full(format!("fedmesh: {message}\n")));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(PROXY_ERROR, HeaderValue::from_static(kind));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grpc_caller_gets_a_trailers_only_status_it_can_read_and_others_get_text() {
        let reset = || ProxyError::UpstreamReset {
            target: "west".into(),
            error: "connection reset".into(),
        };
        let r = reset().into_response_for(true);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["content-type"], "application/grpc");
        assert_eq!(r.headers()["grpc-status"], "14", "UNAVAILABLE");
        assert_eq!(r.headers()[PROXY_ERROR], "upstream-reset");
        let r = reset().into_response_for(false);
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
        assert!(r.headers().get("grpc-status").is_none());
        let timeout = ProxyError::Timeout {
            dest: "shop/api".into(),
            after: Duration::from_secs(1),
        };
        assert_eq!(timeout.grpc_code(), 4, "DEADLINE_EXCEEDED");
        assert_eq!(
            ProxyError::NoRoute("x".into()).grpc_code(),
            12,
            "UNIMPLEMENTED"
        );
        assert_eq!(ProxyError::Overloaded("x".into()).grpc_code(), 14);
    }
}
