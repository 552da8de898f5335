"""A small HTTP service: JSON greeting on /, liveness on /healthz, and /private, which needs
the API token the fleet hands it as a secret (``API_TOKEN``, from secrets/web.sops.yaml) in an
``Authorization: Bearer`` header. Standard library only."""

import hmac
import json
import os
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/healthz":
            body, kind = b"ok\n", "text/plain"
        elif self.path == "/":
            reply = {
                "greeting": os.environ.get("GREETING", "hello"),
                "host": socket.gethostname(),
                "api_token": "set" if os.environ.get("API_TOKEN") else "missing",  # never the value
            }
            body, kind = (json.dumps(reply) + "\n").encode(), "application/json"
        elif self.path == "/private":
            token = os.environ.get("API_TOKEN", "")
            given = self.headers.get("Authorization", "").removeprefix("Bearer ")
            if not token or not hmac.compare_digest(given.encode(), token.encode()):
                self.send_error(403)
                return
            body, kind = b"welcome\n", "text/plain"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        sys.stdout.write(f"web: {self.address_string()} {format % args}\n")
        sys.stdout.flush()


def main() -> None:
    port = int(os.environ.get("PORT", "8080"))
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    print(f"web: listening on port {port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
