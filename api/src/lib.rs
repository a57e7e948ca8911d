//! fedmesh's shared vocabulary: identities, names, the MCS CRD types and the protocols between
//! components. No I/O lives here.

pub mod authn;
pub mod authz;
pub mod federation;
pub mod gateway;
pub mod identity;
pub mod mcs;
pub mod names;
pub mod policy;
pub mod rollout;

pub use identity::{IdError, SpiffeId, TrustDomain};
pub use names::{ClusterName, Locality, NameError, Namespace, ServiceKey, ServiceName};

/// Generated protocol types and gRPC stubs.
pub mod pb {
    /// Hub ⇄ control plane.
    pub mod federation {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("fedmesh.federation.v1");
    }
    /// Control plane ⇄ data plane (sidecars, gateways).
    pub mod dataplane {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("fedmesh.dataplane.v1");
    }
    /// Control plane ⇄ node agent.
    pub mod identity {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("fedmesh.identity.v1");
    }
}

/// The newest federation protocol version this build speaks.
pub const FEDERATION_PROTOCOL_VERSION: u32 = 1;

/// The newest data-plane protocol version this build speaks.
pub const DATAPLANE_PROTOCOL_VERSION: u32 = 1;

/// Implements `tokio::io::AsyncWrite` for a stream wrapper `$ty<S>` by handing every call to its
/// `inner: S` field: for the wrappers that change only what is read (byte counting, a replayed
/// prefix, a rewritten header). The using crate depends on tokio.
#[macro_export]
macro_rules! delegate_async_write {
    ($ty:ident) => {
        impl<S: ::tokio::io::AsyncWrite + ::std::marker::Unpin> ::tokio::io::AsyncWrite for $ty<S> {
            fn poll_write(
                mut self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
                buf: &[u8],
            ) -> ::std::task::Poll<::std::io::Result<usize>> {
                ::std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
            }
            fn poll_flush(
                mut self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
            ) -> ::std::task::Poll<::std::io::Result<()>> {
                ::std::pin::Pin::new(&mut self.inner).poll_flush(cx)
            }
            fn poll_shutdown(
                mut self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
            ) -> ::std::task::Poll<::std::io::Result<()>> {
                ::std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
            }
            fn poll_write_vectored(
                mut self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
                bufs: &[::std::io::IoSlice<'_>],
            ) -> ::std::task::Poll<::std::io::Result<usize>> {
                ::std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
            }
            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }
        }
    };
}

/// The largest OTLP trace export any hop takes (a sidecar's app relay, a control plane's relay,
/// the hub's intake): one limit along the way, so nothing relayed is refused further on.
pub const MAX_OTLP_EXPORT_BYTES: usize = 4 << 20;
