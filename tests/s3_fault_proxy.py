"""A small HTTP proxy on loopback that sits between an S3 client and SeaweedFS and misbehaves
on request: answers 503 SlowDown, delays answers, or cuts a connection in the middle of a
request body. Test tool for the storage fault tests (tests/test_s3_faults.py).

The Host header is forwarded unchanged, so SigV4 signatures made for the proxy's address
still verify at the server.
"""

from __future__ import annotations

import http.client
import http.server
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

#: A fault decides, per request, what the proxy does: None = forward it, "503" = answer
#: SlowDown, "reset" = read part of the body and drop the connection, ("delay", s) = wait.
Fault = Callable[[str, str, int], object]


@dataclass
class FaultProxy:
    upstream_host: str
    upstream_port: int
    fault: Fault = field(default=lambda method, path, n: None)
    requests: list[tuple[str, str, object]] = field(default_factory=list)
    _server: http.server.ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                n = len(proxy.requests)
                action = proxy.fault(self.command, self.path, n)
                proxy.requests.append((self.command, self.path, action))
                length = int(self.headers.get("Content-Length") or 0)
                if action == "reset":
                    self.rfile.read(min(length, 1024))
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                body = self.rfile.read(length) if length else b""
                if action == "503":
                    msg = (b"<?xml version=\"1.0\"?><Error><Code>SlowDown</Code>"
                           b"<Message>fault injected</Message></Error>")
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                if isinstance(action, tuple) and action[0] == "delay":
                    time.sleep(float(action[1]))
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port,
                                                  timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() not in ("connection", "proxy-connection")}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    head = self.command == "HEAD"  # its Content-Length is the object's size
                    for k, v in resp.getheaders():
                        skip = ("transfer-encoding", "connection") + (() if head else ("content-length",))
                        if k.lower() not in skip:
                            self.send_header(k, v)
                    if not head:
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True,
                         name="s3-fault-proxy").start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
