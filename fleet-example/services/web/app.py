"""A small HTTP service: JSON greeting on /, liveness on /healthz. Standard library only."""

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
            reply = {"greeting": os.environ.get("GREETING", "hello"), "host": socket.gethostname()}
            body, kind = (json.dumps(reply) + "\n").encode(), "application/json"
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
