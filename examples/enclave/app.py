"""The example application: an HTTP server on 127.0.0.1:$PORT inside the enclave.

It reads its key from $KEY_FILE (put there by keyutil run before the app starts), prints
the key's size, never the key (stdout reaches the host through the log bridge), and answers
GET /healthz with 200 once it has the key. Replace it with your application.
"""

from __future__ import annotations

import http.server
import json
import os
import sys


def main() -> None:
    with open(os.environ["KEY_FILE"], "rb") as f:
        key_size = len(f.read())
    print(f"app: key loaded ({key_size} bytes); serving on 127.0.0.1:{os.environ['PORT']}")
    sys.stdout.flush()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.path == "/healthz"
            body = json.dumps({"status": "ok", "key_bytes": key_size} if ok else {}).encode()
            self.send_response(200 if ok else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            print(f"app: {self.address_string()} {format % args}", flush=True)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler)
    server.serve_forever()


if __name__ == "__main__":
    main()
