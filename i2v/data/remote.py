"""Shard streams from object storage (`http://`, `https://`, `s3://`) that survive network faults.

A remote shard is read as one byte stream, `ResumingReader`, which knows how far it got. When the
connection breaks or stalls in the middle, it asks for the rest with a byte range starting where it
broke (`Range: bytes=N-`), so the tar parser above it sees every byte once: no sample is repeated
and none is lost. A server that ignores the range gets the reopened stream's first N bytes read and
dropped, which keeps the same guarantee at a higher cost.

What each fault does (`data.remote.*` sets the bounds):

| fault                               | what happens                                                   |
|-------------------------------------|----------------------------------------------------------------|
| drop, reset or short body mid-shard | reopen at the byte reached; a retry                             |
| 429, 5xx, refused connection        | wait `backoff_s` x 2^n (at most 30 s), reopen; a retry          |
| no byte for `timeout_s` (stall)     | the socket read times out; a retry                              |
| 404 / NoSuchKey, 401/403, DNS error | `RemoteError`: the shard is counted bad, named by URL and reason |
| more than `retries` retries in a row| `RemoteError` (retries exhausted): counted bad the same way      |

Retries in a row are those without a byte read in between: a stream that keeps making progress keeps
going. A rank therefore waits at most (retries + 1) x (timeout_s + backoff) on one shard before
it is counted and skipped. `retry_count()` is this process's total of retries, which the trainer
reports as `data/remote_retries`.

HTTP is read with the standard library's client (urllib / http.client) rather than curl: every
request's status, `Content-Range` and socket timeout are in our hands, so a resume can check that the
server answers from the right byte, and no subprocess or pipe sits between the tar parser and the
network. S3 (and MinIO, Ceph and other S3-compatible stores) goes through boto3 with its standard
credential chain (environment, ~/.aws, instance roles); the endpoint comes from
`data.remote.endpoint_url` or, when that is unset, boto3's own `AWS_ENDPOINT_URL`.
"""

from __future__ import annotations

import http.client
import io
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Callable, Iterable, Iterator

from i2v.config import RemoteConfig

HTTP = ("http://", "https://")
S3 = ("s3://",)

# Reasons a remote shard is counted bad (BadSamples reasons).
MISSING = "remote shard missing"
DENIED = "remote access denied"
UNREACHABLE = "remote host not found"
GAVE_UP = "remote retries exhausted"
REFUSED = "remote request refused"

_lock = threading.Lock()
_retries = 0


def retry_count() -> int:
    """Retries made by the remote readers of this process so far."""
    return _retries


def _count_retry() -> None:
    global _retries
    with _lock:
        _retries += 1


def is_remote(url: str) -> bool:
    return url.startswith(HTTP + S3)


class RemoteError(OSError):
    """A remote shard that cannot be read (missing, denied, unreachable, or retried out).

    `reason` is the counted reason and `detail` names the URL and what the server said; both are kept
    as attributes since webdataset rewrites the exception's args when it passes it on.
    """

    def __init__(self, url: str, reason: str, detail: str):
        super().__init__(f"{url}: {reason} ({detail})")
        self.url, self.reason, self.detail = url, reason, f"{url}: {detail}"


class _Transient(Exception):
    """A failure worth another try (5xx, 429, drop, stall, refused connection)."""


# --------------------------------------------------------------------------- sources


class _HttpSource:
    def __init__(self, url: str, cfg: RemoteConfig):
        self.url, self.cfg = url, cfg

    def open(self, start: int, end: int | None = None):
        """(body, the object's size or None, bytes to drop before `start` is reached)."""
        headers = {"Range": _range(start, end)} if start or end is not None else {}
        try:
            resp = urllib.request.urlopen(urllib.request.Request(self.url, headers=headers), timeout=self.cfg.timeout_s)
        except urllib.error.HTTPError as e:
            e.close()
            code = e.code
            if code in (404, 410):
                raise RemoteError(self.url, MISSING, f"HTTP {code} {e.reason}") from None
            if code in (401, 403):
                raise RemoteError(self.url, DENIED, f"HTTP {code} {e.reason}") from None
            if code == 429 or code >= 500:
                raise _Transient(f"HTTP {code} {e.reason}") from None
            raise RemoteError(self.url, REFUSED, f"HTTP {code} {e.reason}") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, socket.gaierror):
                raise RemoteError(self.url, UNREACHABLE, f"cannot resolve the host: {e.reason}") from None
            raise _Transient(f"cannot connect: {e.reason}") from None
        except (OSError, http.client.HTTPException) as e:  # a timeout or reset before the headers
            raise _Transient(f"{type(e).__name__}: {e}") from None
        skip = 0
        if resp.status == 206:
            m = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != start:
                resp.close()
                raise RemoteError(self.url, REFUSED, f"asked for bytes from {start}, the server answered "
                                                     f"Content-Range {resp.headers.get('Content-Range')!r}")
            total = int(m.group(3)) if m.group(3) != "*" else None
        else:  # 200: the whole object again, whatever was asked
            length = resp.headers.get("Content-Length")
            total = int(length) if length is not None else None
            skip = start
        return _Http1(resp), total, skip


class _Http1:
    """An HTTP response read with one socket read per call (`read1`): the buffered `readinto` waits
    to fill the whole buffer, and a stall in the middle would throw away what it had received."""

    def __init__(self, resp):
        self.resp = resp

    def readinto(self, b) -> int:
        data = self.resp.read1(len(b))
        b[: len(data)] = data
        return len(data)

    def read(self, n: int) -> bytes:
        return self.resp.read1(n)

    def close(self) -> None:
        self.resp.close()


def _s3_parts(url: str) -> tuple[str, str]:
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket or not key:
        raise RemoteError(url, MISSING, "expected s3://bucket/key")
    return bucket, key


_clients: dict = {}


def s3_client(cfg: RemoteConfig):
    """One boto3 S3 client per process and settings (a client is not safe to share across fork)."""
    key = (os.getpid(), cfg.endpoint_url, os.environ.get("AWS_ENDPOINT_URL"), cfg.timeout_s)
    if key not in _clients:
        import boto3
        from botocore.config import Config as BotoConfig

        # boto3's own retries are off: ours resume at the byte reached and are counted.
        boto = BotoConfig(connect_timeout=cfg.timeout_s, read_timeout=cfg.timeout_s,
                          retries={"total_max_attempts": 1, "mode": "standard"})
        _clients[key] = boto3.session.Session().client("s3", endpoint_url=cfg.endpoint_url or None, config=boto)
    return _clients[key]


def _s3_transient_types() -> tuple:
    from botocore import exceptions as be

    return (be.ConnectionError, be.HTTPClientError, be.ReadTimeoutError, be.IncompleteReadError,
            be.ResponseStreamingError)


class _S3Body:
    """boto3's StreamingBody with `readinto`, and its stream errors made transient."""

    def __init__(self, body):
        self.body = body

    def readinto(self, b) -> int:
        # Small reads: a read that times out loses what it had gathered, so keep each one short.
        data = self.body.read(min(len(b), 1 << 16))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.body.close()


class _S3Source:
    def __init__(self, url: str, cfg: RemoteConfig):
        self.url, self.cfg = url, cfg
        self.bucket, self.key = _s3_parts(url)

    def open(self, start: int, end: int | None = None):
        from botocore.exceptions import ClientError, EndpointConnectionError

        kw = {"Bucket": self.bucket, "Key": self.key, **({"Range": _range(start, end)} if start or end is not None else {})}
        try:
            r = s3_client(self.cfg).get_object(**kw)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            what = f"{code or 'error'} (HTTP {status})"
            if code in ("NoSuchKey", "NoSuchBucket", "404") or status == 404:
                raise RemoteError(self.url, MISSING, what) from None
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403") or status in (401, 403):
                raise RemoteError(self.url, DENIED, what) from None
            if status == 429 or status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout"):
                raise _Transient(what) from None
            raise RemoteError(self.url, REFUSED, what) from None
        except EndpointConnectionError as e:
            if _caused_by(e, socket.gaierror):
                raise RemoteError(self.url, UNREACHABLE, f"cannot resolve the endpoint: {e}") from None
            raise _Transient(str(e)) from None
        except _s3_transient_types() as e:
            raise _Transient(f"{type(e).__name__}: {e}") from None
        m = re.match(r"bytes (\d+)-(\d+)/(\d+)", r.get("ContentRange", "") or "")
        if start and (not m or int(m.group(1)) != start):
            r["Body"].close()
            raise RemoteError(self.url, REFUSED, f"asked for bytes from {start}, got ContentRange {r.get('ContentRange')!r}")
        total = int(m.group(3)) if m else r.get("ContentLength")
        skip = start if not m else 0  # a store that ignored the range
        return _S3Body(r["Body"]), total, skip


def _range(start: int, end: int | None) -> str:
    return f"bytes={start}-" + (str(end - 1) if end is not None else "")


def _caused_by(e: BaseException, kind: type) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, kind):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


# --------------------------------------------------------------------------- the reader


class ResumingReader(io.RawIOBase):
    """One remote object as a read-once byte stream that resumes at the byte where a read failed.

    Opened eagerly, so a missing or denied shard raises `RemoteError` at once. After a `RemoteError`
    every further read raises it again: the tar parser above never gets a second, partial run.
    """

    def __init__(self, url: str, cfg: RemoteConfig, source=None, sleep: Callable[[float], None] = time.sleep,
                 start: int = 0, end: int | None = None):
        super().__init__()
        self.url, self.cfg, self.sleep = url, cfg, sleep
        self.source = source or (_S3Source(url, cfg) if url.startswith(S3) else _HttpSource(url, cfg))
        self.pos = start  # the next byte to hand out
        self.end = end  # read bytes [start, end) only; None: to the object's end
        self.total: int | None = None  # the object's size
        self.size: int | None = end  # where the stream ends
        self.body = None
        self.failed: RemoteError | None = None
        self.retries = 0  # of this stream
        self._attempt(lambda: None)

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        body, total, skip = self.source.open(self.pos, self.end)
        if self.total is None:
            self.total = total
        elif total is not None and total != self.total:
            body.close()
            raise RemoteError(self.url, REFUSED, f"the object changed size from {self.total} to {total} bytes mid-read")
        if self.size is None:
            self.size = total
        elif total is not None and self.size > total:
            body.close()
            raise RemoteError(self.url, REFUSED, f"asked for bytes up to {self.size}, the object has {total}")
        while skip:  # a server that ignored the range: drop what was already handed out
            chunk = body.read(min(skip, 1 << 20))
            if not chunk:
                raise _Transient(f"connection closed while skipping to byte {self.pos}")
            skip -= len(chunk)
        self.body = body

    def _attempt(self, step: Callable[[], int | None]):
        """Run `step` (after opening the body if needed), retrying transient failures."""
        if self.failed is not None:
            raise self.failed
        in_a_row = 0
        while True:
            try:
                if self.body is None:
                    self._open()
                return step()
            except RemoteError as e:
                self._drop_body()
                self.failed = e
                raise
            except (_Transient, OSError, http.client.HTTPException, *_s3_errors()) as e:
                self._drop_body()
                in_a_row += 1
                if in_a_row > self.cfg.retries:
                    at = f" at byte {self.pos}" + (f" of {self.size}" if self.size else "")
                    self.failed = RemoteError(self.url, GAVE_UP, f"{self.cfg.retries} retries{at} "
                                              f"(data.remote.retries); last: {_describe(e)}")
                    raise self.failed from None
                self.retries += 1
                _count_retry()
                self.sleep(min(self.cfg.backoff_s * 2 ** (in_a_row - 1), 30.0))

    def _read_some(self, b) -> int:
        if self.size is not None and self.pos >= self.size:
            return 0
        if self.size is not None and len(b) > self.size - self.pos:  # a server that sent more than asked
            b = memoryview(b)[: self.size - self.pos]
        n = self.body.readinto(b)  # at most one socket read (see _Http1): what arrived is kept
        if not n:
            if self.size is None:
                return 0  # no declared size: the server's end is the end
            raise _Transient(f"the connection ended at byte {self.pos} of {self.size}")
        self.pos += n
        return n

    def readinto(self, b) -> int:
        if len(b) == 0:
            return 0
        return self._attempt(lambda: self._read_some(b))

    def _drop_body(self) -> None:
        if self.body is not None:
            try:
                self.body.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close
                pass
            self.body = None

    def close(self) -> None:
        self._drop_body()
        super().close()


def _s3_errors() -> tuple:
    try:
        return _s3_transient_types()
    except ImportError:
        return ()


def _describe(e: BaseException) -> str:
    return str(e) if isinstance(e, _Transient) else f"{type(e).__name__}: {e}"


def open_shard(url: str, cfg: RemoteConfig | None = None):
    """A binary stream of one shard: local path, http(s):// or s3:// (resuming); other URLs via webdataset."""
    cfg = cfg or RemoteConfig()
    if is_remote(url):
        return io.BufferedReader(ResumingReader(url, cfg), buffer_size=1 << 20)
    if "://" not in url and not url.startswith("pipe:"):
        return open(url, "rb")
    from webdataset import gopen

    return gopen.gopen(url)


def read_object(url: str, cfg: RemoteConfig | None = None) -> bytes | None:
    """A whole small object (a manifest, the empty prompt): its bytes, or None when it does not exist."""
    try:
        with open_shard(url, cfg) as f:
            return f.read()
    except RemoteError as e:
        if e.reason == MISSING:
            return None
        raise


def shard_streams(items: Iterable[dict], handler: Callable[[BaseException], bool],
                  cfg: RemoteConfig | None = None) -> Iterator[dict]:
    """webdataset's `url_opener` stage with our openers: {"url"} -> {"url", "stream"}; a shard that
    cannot be opened goes to `handler` (True: skip it, False: stop)."""
    for item in items:
        url = item["url"]
        try:
            stream = open_shard(url, cfg)
        except Exception as exn:  # noqa: BLE001 - the handler decides and counts
            if handler(exn):
                continue
            break
        try:
            yield {**item, "stream": stream}
        finally:
            stream.close()


def parent_url(spec: str) -> str:
    """The folder of a shard spec (`s3://b/latents/latents-{00..07}.tar` -> `s3://b/latents`)."""
    return spec.rstrip("/") if spec.endswith("/") else spec.split("{")[0].rsplit("/", 1)[0]


def tar_samples(items: Iterable[dict], handler: Callable[[BaseException], bool],
                cfg: RemoteConfig | None = None) -> Iterator[dict]:
    """{"url"} items -> raw WebDataset samples ({"__key__", "__url__", ext: bytes}), shards opened here."""
    from webdataset import tariterators

    files = tariterators.tar_file_expander(shard_streams(items, handler, cfg), handler=handler)
    return tariterators.group_by_keys(files, handler=handler)


class OutputFolder:
    """Where a job's results go: a local directory, or an `s3://bucket/prefix` reached through a local
    staging directory (made and cleared by the job, see data_prep/precompute.py). A file is written locally (to a temporary name, renamed into place) and then
    `publish`ed: uploaded whole (an S3 object appears only once complete) and removed locally. Local
    folders are their own staging directory, and `publish` leaves them be."""

    def __init__(self, spec: str, cfg: RemoteConfig | None = None, staging: str | None = None):
        self.spec, self.cfg = spec.rstrip("/"), cfg or RemoteConfig()
        self.remote = spec.startswith(S3)
        if self.remote:
            self.bucket, _, prefix = self.spec[len("s3://"):].partition("/")
            self.prefix = f"{prefix}/" if prefix else ""
            import hashlib
            import tempfile

            # One staging folder per output and rank, so that a rerun after a kill clears what it left.
            tag = f"{hashlib.sha256(self.spec.encode()).hexdigest()[:12]}-rank{os.environ.get('RANK', '0')}"
            self.local = staging or os.path.join(tempfile.gettempdir(), f"i2v-staging-{tag}")
        else:
            self.local = spec

    def url(self, name: str) -> str:
        return f"{self.spec}/{name}"

    def exists(self, name: str) -> bool:
        if not self.remote:
            return os.path.isfile(os.path.join(self.local, name))
        from botocore.exceptions import ClientError

        try:
            s3_client(self.cfg).head_object(Bucket=self.bucket, Key=self.prefix + name)
            return True
        except ClientError as e:
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return False
            raise RemoteError(self.url(name), DENIED, str(e)) from None

    def read(self, name: str) -> bytes | None:
        if not self.remote:
            path = os.path.join(self.local, name)
            if not os.path.isfile(path):
                return None
            with open(path, "rb") as f:
                return f.read()
        return read_object(self.url(name), self.cfg)

    def publish(self, name: str) -> None:
        """Upload the staged file `name` (then remove it locally); nothing to do for a local folder."""
        if not self.remote:
            return
        path = os.path.join(self.local, name)
        s3_client(self.cfg).upload_file(path, self.bucket, self.prefix + name)
        os.remove(path)


def read_ranges(url: str, spans: list[tuple[int, int]], cfg: RemoteConfig | None = None,
                gap: int = 1 << 16) -> list[bytes]:
    """The bytes of each (offset, size) span of one object, by range requests: spans closer than `gap`
    bytes are fetched together, so a run of neighbouring samples costs one request. Each request
    resumes and retries as a shard stream does; a failure raises `RemoteError`."""
    cfg = cfg or RemoteConfig()
    order = sorted(range(len(spans)), key=lambda i: spans[i][0])
    out: list[bytes] = [b""] * len(spans)
    i = 0
    while i < len(order):
        j, lo, hi = i, spans[order[i]][0], sum(spans[order[i]])
        while j + 1 < len(order) and spans[order[j + 1]][0] <= hi + gap:
            j += 1
            hi = max(hi, sum(spans[order[j]]))
        reader = ResumingReader(url, cfg, start=lo, end=hi)
        try:
            data = io.BufferedReader(reader, buffer_size=1 << 20).read()
        finally:
            reader.close()
        if len(data) != hi - lo:
            raise RemoteError(url, REFUSED, f"bytes {lo}-{hi - 1}: got {len(data)} bytes")
        for k in order[i:j + 1]:
            off, size = spans[k]
            out[k] = data[off - lo: off - lo + size]
        i = j + 1
    return out


def list_s3(folder: str, suffix: str, cfg: RemoteConfig | None = None) -> list[str]:
    """The objects directly under `s3://bucket/prefix/` whose names end in `suffix`, sorted, as URLs."""
    bucket, _, prefix = folder[len("s3://"):].partition("/")
    from botocore.exceptions import BotoCoreError, ClientError

    urls: list[str] = []
    try:
        for page in s3_client(cfg or RemoteConfig()).get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix, Delimiter="/"):
            urls += [f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", []) if o["Key"].endswith(suffix)]
    except (ClientError, BotoCoreError) as e:
        raise RemoteError(folder, REFUSED, f"cannot list it: {e}") from None
    return sorted(urls)
