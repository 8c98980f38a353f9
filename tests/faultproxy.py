"""A fault-injecting HTTP proxy on loopback, in front of the real S3 test server: throttling (503 SlowDown), server
errors (500 InternalError), downloads cut mid-body and uploads cut mid-body, on a deterministic schedule.

The proxy forwards each request to the server as it came (the Host header too, so SigV4 signatures made for the
proxy's address still verify) and applies the fault of the request's number in the schedule: ``faults`` maps
"every k-th request" to a fault, checked in order. It only ever listens on and connects to 127.0.0.1, and stops with
:meth:`FaultProxy.close`.
"""

from __future__ import annotations

import http.client
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal

Fault = Literal["slowdown", "internal", "cut_download", "cut_upload"]
HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
}


class FaultProxy:
    def __init__(self, upstream_port: int, faults: list[tuple[int, Fault]]) -> None:
        self.upstream_port = upstream_port
        self.faults = faults
        self.requests = 0
        self.injected: Counter[str] = Counter()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
                pass

            def _any(self) -> None:
                proxy.handle(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any  # noqa: N815 - http.server's names

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _fault_for(self, method: str) -> Fault | None:
        with self._lock:
            self.requests += 1
            n = self.requests
        for every, fault in self.faults:
            if n % every:
                continue
            if fault == "cut_download" and method != "GET":
                continue
            if fault == "cut_upload" and method not in ("PUT", "POST"):
                continue
            with self._lock:
                self.injected[fault] += 1
            return fault
        return None

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        fault = self._fault_for(h.command)
        if fault == "cut_upload" and length > 1:
            h.rfile.read(length // 2)  # take half the body, then drop the connection
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        body = h.rfile.read(length) if length else b""
        if fault in ERRORS:
            status, code, message = ERRORS[fault]
            xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
                   f"</Error>").encode()
            h.send_response(status)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(xml)))
            h.end_headers()
            h.wfile.write(xml)
            return
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=60)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in HOP}
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        h.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in HOP and (k.lower() != "content-length" or h.command == "HEAD"):
                h.send_header(k, v)
        if h.command != "HEAD":
            h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command == "HEAD":
            return
        if fault == "cut_download" and len(data) > 1:
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        h.wfile.write(data)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
