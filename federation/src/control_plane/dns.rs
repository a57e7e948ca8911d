//! Clusterset DNS (KEP-1645): `<service>.<namespace>.svc.clusterset.local` answers with the
//! service's clusterset IP (A), and `_<port>._<proto>.<service>.<namespace>.svc.clusterset.local`
//! with SRV records. Served with hickory-server over UDP and TCP from the control plane's current
//! snapshot; names outside the zone are refused (this is not a recursive resolver).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use fedmesh_api::ServiceKey;
use fedmesh_api::pb::federation as pb;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Metadata, ResponseCode};
use hickory_server::proto::rr::rdata::{A, SRV};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Snapshot;

pub const ZONE: &str = "svc.clusterset.local.";
/// Short: imports and VIPs can change at any time.
const TTL: u32 = 5;

struct ClustersetDns {
    snapshot: watch::Receiver<Arc<Snapshot>>,
}

/// What a query name asks for.
#[derive(Debug, PartialEq, Eq)]
enum Ask {
    Service(ServiceKey),
    Port {
        port: String,
        proto: String,
        service: ServiceKey,
    },
}

fn parse_name(name: &str) -> Option<Ask> {
    let rest = name.to_ascii_lowercase();
    let rest = rest.strip_suffix(ZONE)?.strip_suffix('.')?.to_string();
    let labels: Vec<&str> = rest.split('.').collect();
    match labels.as_slice() {
        [svc, ns] => ServiceKey::new(ns, svc).ok().map(Ask::Service),
        [port, proto, svc, ns] => Some(Ask::Port {
            port: port.strip_prefix('_')?.to_string(),
            proto: proto.strip_prefix('_')?.to_uppercase(),
            service: ServiceKey::new(ns, svc).ok()?,
        }),
        _ => None,
    }
}

impl ClustersetDns {
    /// Answer records and response code for one question.
    fn answer(&self, qname: &str, qtype: RecordType) -> (ResponseCode, Vec<Record>, Vec<Record>) {
        let Some(ask) = parse_name(qname) else {
            return if qname.to_ascii_lowercase().ends_with(ZONE) {
                (ResponseCode::NXDomain, vec![], vec![])
            } else {
                (ResponseCode::Refused, vec![], vec![])
            };
        };
        let snap = self.snapshot.borrow().clone();
        let key = match &ask {
            Ask::Service(k) | Ask::Port { service: k, .. } => k,
        };
        let Some(import) = snap.clusterset.imports.get(key) else {
            return (ResponseCode::NXDomain, vec![], vec![]);
        };
        let vip = snap.vips.get(key).copied();
        let svc_name = Name::from_str(&key.clusterset_dns_name())
            .ok()
            .map(|mut n| {
                n.set_fqdn(true);
                n
            });
        let Ok(qn) = Name::from_str(qname) else {
            return (ResponseCode::FormErr, vec![], vec![]);
        };
        // Headless: no clusterset IP; the ready endpoints of this cluster, which are directly
        // reachable (remote endpoints are reachable only through their gateways).
        let addresses: Vec<std::net::Ipv4Addr> = if is_headless(import) {
            snap.local
                .endpoints(key)
                .iter()
                .filter(|e| e.ready)
                .filter_map(|e| e.address.parse().ok())
                .collect()
        } else {
            vip.into_iter().collect()
        };
        let a_records = |name: Name| -> Vec<Record> {
            addresses
                .iter()
                .map(|ip| Record::from_rdata(name.clone(), TTL, RData::A(A(*ip))))
                .collect()
        };
        match ask {
            Ask::Service(_) => match qtype {
                RecordType::A | RecordType::ANY => (ResponseCode::NoError, a_records(qn), vec![]),
                // No IPv6 clusterset IPs: the name exists, no AAAA data.
                _ => (ResponseCode::NoError, vec![], vec![]),
            },
            Ask::Port { port, proto, .. } => {
                let Some(p) = import
                    .ports
                    .iter()
                    .find(|p| p.name == port && p.protocol.eq_ignore_ascii_case(&proto))
                else {
                    return (ResponseCode::NXDomain, vec![], vec![]);
                };
                if !matches!(qtype, RecordType::SRV | RecordType::ANY) {
                    return (ResponseCode::NoError, vec![], vec![]);
                }
                let Some(target) = svc_name else {
                    return (ResponseCode::ServFail, vec![], vec![]);
                };
                let srv = Record::from_rdata(
                    qn,
                    TTL,
                    RData::SRV(SRV::new(0, 100, p.port as u16, target.clone())),
                );
                (ResponseCode::NoError, vec![srv], a_records(target))
            }
        }
    }
}

fn is_headless(i: &pb::Import) -> bool {
    i.r#type == pb::ServiceType::Headless as i32
}

#[async_trait::async_trait]
impl RequestHandler for ClustersetDns {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let builder = MessageResponseBuilder::from_message_request(request);
        let info = match request.request_info() {
            Ok(i) => i,
            Err(_) => {
                let resp = builder.error_msg(&request.metadata, ResponseCode::FormErr);
                return send(&mut response_handle, resp, &request.metadata).await;
            }
        };
        let qname = info.query.name().to_string();
        let (code, answers, additionals) = self.answer(&qname, info.query.query_type());
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = code != ResponseCode::Refused;
        metadata.response_code = code;
        let resp = builder.build(metadata, answers.iter(), [], [], additionals.iter());
        send(&mut response_handle, resp, &request.metadata).await
    }
}

async fn send<'a, R: ResponseHandler>(
    h: &mut R,
    resp: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    req: &Metadata,
) -> ResponseInfo {
    match h.send_response(resp).await {
        Ok(info) => info,
        Err(e) => {
            tracing::debug!(error = %e, "cannot send DNS response");
            let mut m = Metadata::response_from_request(req);
            m.response_code = ResponseCode::ServFail;
            ResponseInfo::from(hickory_server::proto::op::Header {
                metadata: m,
                counts: Default::default(),
            })
        }
    }
}

/// Serves DNS on the given sockets until `shutdown`.
pub fn serve(
    snapshot: watch::Receiver<Arc<Snapshot>>,
    udp: tokio::net::UdpSocket,
    tcp: tokio::net::TcpListener,
    shutdown: CancellationToken,
) {
    let mut server = hickory_server::Server::new(ClustersetDns { snapshot });
    server.register_socket(udp);
    server.register_listener(tcp, Duration::from_secs(5), 4096);
    tokio::spawn(async move {
        shutdown.cancelled().await;
        let _ = server.shutdown_gracefully().await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_strictly() {
        assert_eq!(
            parse_name("web.shop.svc.clusterset.local."),
            Some(Ask::Service("shop/web".parse().unwrap()))
        );
        assert_eq!(
            parse_name("_http._tcp.web.shop.svc.clusterset.local."),
            Some(Ask::Port {
                port: "http".into(),
                proto: "TCP".into(),
                service: "shop/web".parse().unwrap()
            })
        );
        assert_eq!(parse_name("web.shop.svc.cluster.local."), None);
        assert_eq!(parse_name("a.web.shop.svc.clusterset.local."), None);
        assert_eq!(parse_name("http._tcp.web.shop.svc.clusterset.local."), None);
    }
}
