"""Real servers for the remote-shard tests, on 127.0.0.1 only.

- `FaultyHTTPServer`: the standard library's HTTP server over a folder, with byte ranges
  (`Range: bytes=N-`) and faults queued per path: each GET of a path takes the next fault, if any.
    ("drop", n)          send the headers and the first n bytes of the object, then close the connection
    ("status", code)     answer `code` with no body (503 once, 429, ...)
    ("stall", n, secs)   send n bytes, then nothing for `secs` seconds (or until the server stops)
    ("always", code)     answer `code` to this and every later request (a 404, a 403)
  Every request is logged as (path, Range header or None). With `upstream=(host, port)` it is a proxy
  in front of another server (moto's S3), the faults applied to what that server answers.
- `moto_s3()`: moto's S3-compatible server in a thread, and the environment a boto3 client (or a
  subprocess) needs to reach it.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - the http.server name
        server: FaultyHTTPServer = self.server  # type: ignore[assignment]
        path = self.path.split("?")[0]
        rng = self.headers.get("Range")
        fault = server.next_fault(path, rng)
        if fault and fault[0] in ("status", "always"):
            self._empty(fault[1])
            return
        if server.upstream:
            self._relay(server, fault)
            return
        file = os.path.join(server.root, path.lstrip("/"))
        if not os.path.isfile(file):
            self._empty(404)
            return
        with open(file, "rb") as f:
            data = f.read()
        start = 0
        if rng and server.ranges:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/x-tar")
        self.end_headers()
        self._send(body, fault, server)

    def _relay(self, server, fault) -> None:
        """Proxy mode: the upstream's answer (headers and all), cut short by a "drop" fault."""
        conn = http.client.HTTPConnection(*server.upstream, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
        conn.request("GET", self.path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("connection", "transfer-encoding", "content-length", "date", "server"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self._send(body, fault, server)

    def _send(self, body: bytes, fault, server) -> None:
        """The body, or its first N bytes and then a dropped connection ("drop"), or after a stall ("stall")."""
        if fault and fault[0] in ("drop", "stall"):
            self.wfile.write(body[: fault[1]])
            self.wfile.flush()
            if fault[0] == "stall":
                server.stopping.wait(fault[2])
            self.close_connection = True
            return
        self.wfile.write(body)

    def _empty(self, code: int) -> None:
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()


class FaultyHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: str | None = None, ranges: bool = True, upstream: tuple[str, int] | None = None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root, self.ranges, self.upstream = str(root), ranges, upstream
        self.faults: dict[str, list[tuple]] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up is no news here
            super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def add_fault(self, path: str, *fault) -> None:
        with self._lock:
            self.faults.setdefault(path, []).append(tuple(fault))

    def next_fault(self, path: str, rng: str | None):
        with self._lock:
            self.requests.append((path, rng))
            queue = self.faults.get(path) or []
            if not queue:
                return None
            return queue[0] if queue[0][0] == "always" else queue.pop(0)

    def __enter__(self) -> "FaultyHTTPServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()


@contextlib.contextmanager
def moto_s3():
    """(endpoint URL, environment for boto3, (host, port)) of a moto S3 server on 127.0.0.1, stopped on exit."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint, "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint, env, (host, port)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
