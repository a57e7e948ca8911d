"""A small OpenID-style token issuer for the request-authentication tests, on real PyJWT.

It serves its JWK Set at GET /jwks.json and signs ES256 tokens on request:
  GET /token?kid=K&iss=I&aud=A&exp=SECONDS_FROM_NOW&sub=S&groups=a,b  -> the token
  POST /rotate                                                        -> a new key; the old one
                                                                         leaves the JWK Set
  GET /token?...&foreign=1  -> signed by a key that is not in the JWK Set (same kid)
  GET /token?...&alg=none   -> not signed at all
It prints its port on the first line of stdout, then serves until stdin closes.
"""

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm


class Keys:
    def __init__(self):
        self.lock = threading.Lock()
        self.serial = 0
        self.current = self.new()

    def new(self):
        self.serial += 1
        return (f"key-{self.serial}", ec.generate_private_key(ec.SECP256R1()))

    def rotate(self):
        with self.lock:
            old = self.current
            self.current = self.new()
            return old[0], self.current[0]

    def jwks(self):
        with self.lock:
            kid, key = self.current
        jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
        jwk.update({"kid": kid, "use": "sig", "alg": "ES256"})
        return {"keys": [jwk]}


KEYS = Keys()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, status, body, kind="application/json"):
        data = body.encode()
        self.send_response(status)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        url = urlparse(self.path)
        if url.path == "/jwks.json":
            return self.reply(200, json.dumps(KEYS.jwks()))
        if url.path != "/token":
            return self.reply(404, "not found", "text/plain")
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        with KEYS.lock:
            kid, key = KEYS.current
        if q.get("foreign"):
            key = ec.generate_private_key(ec.SECP256R1())
        claims = {"iss": q.get("iss", "https://login.example.com"), "sub": q.get("sub", "ann")}
        if "aud" in q:
            claims["aud"] = q["aud"]
        if "exp" in q:
            claims["exp"] = int(time.time()) + int(q["exp"])
        if "groups" in q:
            claims["groups"] = q["groups"].split(",")
        if q.get("alg") == "none":
            token = jwt.encode(claims, None, algorithm="none")
        else:
            token = jwt.encode(claims, key, algorithm="ES256", headers={"kid": q.get("kid", kid)})
        return self.reply(200, token, "text/plain")

    def do_POST(self):
        if urlparse(self.path).path != "/rotate":
            return self.reply(404, "not found", "text/plain")
        old, new = KEYS.rotate()
        return self.reply(200, json.dumps({"old": old, "new": new}))


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sys.stdin.read()
    server.shutdown()


if __name__ == "__main__":
    main()
