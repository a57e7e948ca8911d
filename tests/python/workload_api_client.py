#!/usr/bin/env python3
"""Drives `fedmesh agent` with the PyPI `spiffe` package, the way a Python workload would.

Usage: workload_api_client.py SOCKET_PATH
Prints one JSON object describing what it got; exits non-zero on any failure.
"""
import datetime
import json
import sys

from spiffe import WorkloadApiClient


def main() -> int:
    socket_path = sys.argv[1]
    out = {}
    with WorkloadApiClient(socket_path=f"unix://{socket_path}") as client:
        svid = client.fetch_x509_svid(timeout=10)
        out["spiffe_id"] = str(svid.spiffe_id)
        out["chain_len"] = len(svid.cert_chain)

        bundles = client.fetch_x509_bundles(timeout=10)
        out["bundle_trust_domains"] = sorted(str(b.trust_domain) for b in bundles.bundles)

        # The chain must validate against the bundle of the SVID's own trust domain.
        own = bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        chain = list(svid.cert_chain)
        for child, parent in zip(chain, chain[1:]):
            child.verify_directly_issued_by(parent)
        top = chain[-1]
        now = datetime.datetime.now(datetime.timezone.utc)
        verified = False
        for authority in own.x509_authorities:
            try:
                top.verify_directly_issued_by(authority)
                verified = True
            except Exception:  # noqa: BLE001 - try the next authority
                continue
        for cert in chain:
            assert cert.not_valid_before_utc <= now <= cert.not_valid_after_utc, "SVID not valid now"
        out["chain_verified"] = verified

        jwt = client.fetch_jwt_svid(audience={"payments"}, timeout=10)
        out["jwt_spiffe_id"] = str(jwt.spiffe_id)
        validated = client.validate_jwt_svid(jwt.token, "payments", timeout=10)
        out["jwt_validated_spiffe_id"] = str(validated.spiffe_id)
        try:
            client.validate_jwt_svid(jwt.token, "someone-else", timeout=10)
            out["wrong_audience_rejected"] = False
        except Exception as e:  # noqa: BLE001 - any refusal is the expected outcome
            out["wrong_audience_rejected"] = True
            out["wrong_audience_error"] = str(e)

        jwt_bundles = client.fetch_jwt_bundles(timeout=10)
        out["jwt_bundle_trust_domains"] = sorted(str(b.trust_domain) for b in jwt_bundles.bundles)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
