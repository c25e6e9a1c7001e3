"""A real HTTP server on 127.0.0.1 serving one virt-builder index, counting downloads."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class IndexServer:
    """Serves ``body`` at ``uri``; change ``body`` to change what the next download gets."""

    def __init__(self, body: str) -> None:
        self.hits = 0
        self.body = body.encode()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                # curl (virt-builder) may ask first; only a GET is a download.
                self._headers(outer.body)

            def do_GET(self) -> None:
                body = outer.body  # one answer per request, whatever changes meanwhile
                outer.hits += 1
                self._headers(body)
                self.wfile.write(body)

            def _headers(self, body: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.httpd.server_address[1]}/index"


@contextlib.contextmanager
def serve(body: str) -> Iterator[IndexServer]:
    """An IndexServer running for the duration of the block."""
    server = IndexServer(body)
    thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        thread.join()
