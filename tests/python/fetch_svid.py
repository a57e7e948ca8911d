#!/usr/bin/env python3
"""Asks the Workload API for an X.509-SVID with the PyPI `spiffe` package, as a workload would.

Usage: fetch_svid.py SOCKET_PATH
Prints {"spiffe_id": ...} and exits 0, or prints {"error": ...} and exits 3 when refused.
"""
import json
import sys

from spiffe import WorkloadApiClient


def main() -> int:
    try:
        with WorkloadApiClient(socket_path=f"unix://{sys.argv[1]}") as client:
            svid = client.fetch_x509_svid(timeout=20)
            print(json.dumps({"spiffe_id": str(svid.spiffe_id)}))
            return 0
    except Exception as e:  # noqa: BLE001 - the refusal is the outcome under test
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return 3


if __name__ == "__main__":
    sys.exit(main())
