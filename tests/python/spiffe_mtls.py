#!/usr/bin/env python3
"""mTLS between SPIFFE workloads of different trust domains, as a workload outside the mesh does
it: its SVID and the bundles come from a Workload API (a SPIRE agent's or fedmesh's), the peer is
verified against the bundle of the peer's own trust domain and must present exactly the SPIFFE
ID expected.

  spiffe_mtls.py serve SOCKET PORT_FILE PEER_TRUST_DOMAIN
      HTTP/1.1 over mTLS on 127.0.0.1 (any free port, written to PORT_FILE); answers each request
      with the caller's SPIFFE ID and its own. Runs until killed.
  spiffe_mtls.py call SOCKET ADDR PEER_ID [--h2 SNI]
      One GET / to ADDR (HOST:PORT); prints JSON {"status", "body", "peer"}; --h2 speaks HTTP/2
      with that SNI (a fedmesh sidecar's inbound). Exits non-zero when the handshake or the
      peer's identity fails; the reason is printed.
  spiffe_mtls.py stream SOCKET ADDR PEER_ID STOP_FILE [--h2 SNI]
      A steady stream of calls as above, each on a new connection with the SVID and bundle the
      Workload API holds at that moment, until STOP_FILE exists (at most 2,000 calls or 300 s);
      prints JSON {"sent", "failed", "errors"} (the first errors' reasons).
  spiffe_mtls.py show SOCKET
      What the Workload API holds now: JSON {"id", "issuer" (the leaf's issuer, RFC 4514),
      "bundles": {trust domain: number of X.509 authorities}}.
"""
import json
import os
import socket
import ssl
import sys
import tempfile

from cryptography.hazmat.primitives import serialization
from spiffe import WorkloadApiClient
from spiffe.spiffe_id.spiffe_id import TrustDomain


def context(socket_path, peer_td, server):
    """An SSLContext holding this workload's SVID, trusting only `peer_td`'s bundle."""
    with WorkloadApiClient(socket_path=f"unix://{socket_path}") as client:
        ctx_data = client.fetch_x509_context(timeout=20)
    svid = ctx_data.default_svid
    bundle = ctx_data.x509_bundle_set.get_bundle_for_trust_domain(TrustDomain(peer_td))
    if bundle is None:
        have = sorted(str(b.trust_domain) for b in ctx_data.x509_bundle_set.bundles)
        raise SystemExit(f"the Workload API gave no bundle for {peer_td} (it gave {have})")
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM).decode()  # noqa: E731
    d = tempfile.mkdtemp()
    chain, key = os.path.join(d, "svid.pem"), os.path.join(d, "key.pem")
    with open(chain, "w") as f:
        f.write("".join(pem(c) for c in svid.cert_chain))
    with open(key, "wb") as f:
        f.write(svid.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # SVIDs name workloads by URI SAN, checked below
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(chain, key)
    ctx.load_verify_locations(cadata="".join(pem(a) for a in bundle.x509_authorities))
    return ctx, str(svid.spiffe_id)


def peer_id(tls):
    cert = tls.getpeercert()
    uris = [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]
    return uris[0] if len(uris) == 1 else None


def serve(socket_path, port_file, peer_td):
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    with open(port_file + ".tmp", "w") as f:
        f.write(str(lsock.getsockname()[1]))
    os.rename(port_file + ".tmp", port_file)
    while True:
        conn, _ = lsock.accept()
        try:
            # What the Workload API holds now: rotated SVIDs and bundles take effect at once.
            ctx, own = context(socket_path, peer_td, server=True)
            tls = ctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError) as e:
            print(f"handshake refused: {e}", file=sys.stderr, flush=True)
            conn.close()
            continue
        try:
            tls.recv(65536)
            body = json.dumps({"caller": peer_id(tls), "server": own}).encode()
            tls.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                        + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
                        + body)
        finally:
            tls.close()


def call(socket_path, addr, want_peer, sni):
    print(json.dumps(call_once(socket_path, addr, want_peer, sni)))


def call_once(socket_path, addr, want_peer, sni):
    peer_td = want_peer.split("/")[2]
    ctx, _ = context(socket_path, peer_td, server=False)
    if sni:
        ctx.set_alpn_protocols(["h2"])
    host, port = addr.rsplit(":", 1)
    raw = socket.create_connection((host, int(port)), timeout=20)
    tls = ctx.wrap_socket(raw, server_hostname=sni or None)
    got = peer_id(tls)
    if got != want_peer:
        raise SystemExit(f"the peer presented {got}, not {want_peer}")
    if sni:
        status, body = h2_get(tls, sni)
    else:
        tls.sendall(f"GET / HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split()[1])
    return {"status": status, "body": body.decode(errors="replace"), "peer": got}


def stream(socket_path, addr, want_peer, stop_file, sni):
    import time

    sent, failed, errors = 0, 0, []
    deadline = time.monotonic() + 300
    while not os.path.exists(stop_file) and sent < 2000 and time.monotonic() < deadline:
        sent += 1
        try:
            reply = call_once(socket_path, addr, want_peer, sni)
            if reply["status"] != 200:
                raise SystemExit(f"status {reply['status']}: {reply['body'][:200]}")
        except (SystemExit, Exception) as e:  # noqa: BLE001 - every failure is counted
            failed += 1
            if len(errors) < 5:
                errors.append(f"call {sent}: {type(e).__name__}: {e}")
        time.sleep(0.05)
    print(json.dumps({"sent": sent, "failed": failed, "errors": errors}), flush=True)


def h2_get(tls, authority):
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, [(":method", "GET"), (":path", "/"), (":scheme", "https"),
                               (":authority", authority)], end_stream=True)
    tls.sendall(conn.data_to_send())
    status, body = None, b""
    while True:
        data = tls.recv(65536)
        if not data:
            raise SystemExit("the connection closed before the response ended")
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                status = int(dict(ev.headers)[b":status"])
            elif isinstance(ev, h2.events.DataReceived):
                body += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                return status, body
        tls.sendall(conn.data_to_send())


def show(socket_path):
    with WorkloadApiClient(socket_path=f"unix://{socket_path}") as client:
        ctx_data = client.fetch_x509_context(timeout=20)
    svid = ctx_data.default_svid
    print(json.dumps({
        "id": str(svid.spiffe_id),
        "issuer": svid.leaf.issuer.rfc4514_string(),
        "bundles": {str(b.trust_domain): len(b.x509_authorities)
                    for b in ctx_data.x509_bundle_set.bundles},
    }))


def main():
    if sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3], sys.argv[4])
    elif sys.argv[1] == "call":
        sni = sys.argv[6] if len(sys.argv) > 6 and sys.argv[5] == "--h2" else ""
        call(sys.argv[2], sys.argv[3], sys.argv[4], sni)
    elif sys.argv[1] == "stream":
        sni = sys.argv[7] if len(sys.argv) > 7 and sys.argv[6] == "--h2" else ""
        stream(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sni)
    elif sys.argv[1] == "show":
        show(sys.argv[2])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
