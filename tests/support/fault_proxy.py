"""A fault-injecting HTTP proxy for the test S3 (moto) on loopback: storage storms on demand.

Point a client's ``endpoint_url`` at :attr:`FaultProxy.url` instead of moto's. Every request is forwarded to
moto unchanged, except those a :class:`Fault` picks: the first ``times`` requests for each matching object are
answered with ``503 SlowDown`` (S3's throttling answer) or cut mid-body (headers promise the whole object, half
of it is sent, then the connection is closed), and later ones go through. :attr:`FaultProxy.stats` counts what
was injected and how many requests each object took, which is how a test knows the retries that were used.
"""

from __future__ import annotations

import http.client
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Literal
from urllib.parse import urlsplit

__all__ = ["Fault", "FaultProxy", "FaultStats"]

_SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
              b"<Message>Please reduce your request rate.</Message><RequestId>fault-proxy</RequestId></Error>")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


@dataclass(frozen=True)
class Fault:
    """Fail the first ``times`` requests of every object ``match(method, path)`` accepts, with ``kind``."""

    kind: Literal["503", "cut"]
    times: int
    match: Callable[[str, str], bool]


@dataclass
class FaultStats:
    """What the proxy saw: requests per object path and faults injected per kind."""

    requests: Counter = field(default_factory=Counter)
    injected: Counter = field(default_factory=Counter)
    faulted: Counter = field(default_factory=Counter)  # faults per object path

    def retries_of(self, path: str) -> int:
        """Requests for ``path`` beyond the first (every injected fault costs the client one retry)."""
        return max(0, self.requests[path] - 1)


class FaultProxy:
    """Forwarding proxy on 127.0.0.1 in front of ``upstream`` (``http://127.0.0.1:PORT``); a context manager."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname, parts.port)
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self.stats = FaultStats()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _handle(self) -> None:
                proxy._serve(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def set_faults(self, *faults: Fault) -> FaultStats:
        """Replace the faults and start fresh counts; returns the new :class:`FaultStats`."""
        with self._lock:
            self._faults = list(faults)
            self.stats = FaultStats()
            return self.stats

    def clear(self) -> None:
        """No more faults (counts are kept)."""
        with self._lock:
            self._faults = []

    # -- forwarding ------------------------------------------------------------------------------------

    def _decide(self, method: str, path: str) -> str | None:
        with self._lock:
            self.stats.requests[path] += 1
            for fault in self._faults:
                if fault.match(method, path) and self.stats.faulted[path] < fault.times:
                    self.stats.faulted[path] += 1
                    self.stats.injected[fault.kind] += 1
                    return fault.kind
        return None

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        method, target = handler.command, handler.path
        body = self._request_body(handler)
        path = urlsplit(target).path
        fault = self._decide(method, path)
        if fault == "503":
            handler.send_response(503, "Slow Down")
            handler.send_header("Content-Type", "application/xml")
            handler.send_header("Content-Length", str(len(_SLOW_DOWN)))
            handler.end_headers()
            if method != "HEAD":
                handler.wfile.write(_SLOW_DOWN)
            return
        upstream = http.client.HTTPConnection(*self._upstream, timeout=60)
        try:
            headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP_BY_HOP}
            if body is not None:
                headers["Content-Length"] = str(len(body))
            upstream.request(method, target, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            status, reason, answer_headers = response.status, response.reason, response.getheaders()
        finally:
            upstream.close()
        handler.send_response(status, reason)
        for key, value in answer_headers:
            # A HEAD answer keeps the object's length; other answers carry the body read here.
            if key.lower() not in _HOP_BY_HOP and (method == "HEAD" or key.lower() != "content-length"):
                handler.send_header(key, value)
        if method != "HEAD":
            handler.send_header("Content-Length", str(len(data)))
        if fault == "cut":
            handler.send_header("Connection", "close")
        handler.end_headers()
        if method == "HEAD":
            return
        if fault == "cut" and len(data) > 1:
            handler.wfile.write(data[: len(data) // 2])
            handler.wfile.flush()
            handler.close_connection = True
            try:
                handler.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        handler.wfile.write(data)

    @staticmethod
    def _request_body(handler: BaseHTTPRequestHandler) -> bytes | None:
        if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(handler.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                chunks.append(handler.rfile.read(size))
                handler.rfile.readline()
            return b"".join(chunks)
        length = int(handler.headers.get("Content-Length") or 0)
        return handler.rfile.read(length) if length else (b"" if handler.command in ("PUT", "POST") else None)
