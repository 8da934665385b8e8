"""A fault-injecting HTTP proxy in front of the moto S3 endpoint: real S3 error responses on the wire.

The code under test talks to it exactly as to AWS (pyarrow's and boto3's own HTTP clients);
the proxy forwards every request to moto unchanged, except that it answers

- a share ``fault_rate`` of requests with S3's ``503 SlowDown`` (seeded, counted);
- requests signed with an access key in ``bad_keys`` with ``403 InvalidAccessKeyId``;
- requests for a bucket in ``denied_buckets`` with ``403 AccessDenied``,

which moto itself does not do (it accepts any credentials).
"""

from __future__ import annotations

import http.client
import random
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_ERROR = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
          '<RequestId>olr-fault-proxy</RequestId></Error>')


class FaultProxy:
    def __init__(self, upstream: str, fault_rate: float = 0.0, seed: int = 0,
                 bad_keys: tuple[str, ...] = (), denied_buckets: tuple[str, ...] = ()):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.fault_rate, self.bad_keys, self.denied_buckets = fault_rate, set(bad_keys), set(denied_buckets)
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.requests = self.faults = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _error(self, status: int, code: str, message: str) -> None:
                body = b"" if self.command == "HEAD" else _ERROR.format(code=code, message=message).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self) -> None:
                body = self._body()
                bucket = self.path.lstrip("/").split("/", 1)[0].split("?", 1)[0]
                key = re.search(r"Credential=([^/]+)/", self.headers.get("Authorization", ""))
                with proxy.lock:
                    proxy.requests += 1
                    fault = proxy.rng.random() < proxy.fault_rate
                    proxy.faults += fault
                if key and key.group(1) in proxy.bad_keys:
                    return self._error(403, "InvalidAccessKeyId",
                                       "The AWS Access Key Id you provided does not exist in our records.")
                if bucket in proxy.denied_buckets:
                    return self._error(403, "AccessDenied", "Access Denied")
                if fault:
                    return self._error(503, "SlowDown", "Please reduce your request rate.")
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "expect")}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FaultProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
