"""One run per output folder: rank 0 holds `run.output_dir/RUN_LOCK.json` for the life of the run.

Two copies of one command would otherwise resume from the same checkpoint, commit over each other
and write every metric twice. The lock is a file created with O_CREAT | O_EXCL (atomic on local
filesystems and on NFS v3 and later, unlike `flock`, which NFS may not carry between nodes) holding
the holder's host, pid, start time and a heartbeat that a thread rewrites every few seconds.

A second launch into a live run exits 2 naming the holder. A lock is stale, and taken over with a
log line, when its heartbeat is older than `run.lock_timeout_s` (a holder on any node that stopped
without releasing: SIGKILL, a lost node), or at once when its holder ran on this host and that
process is gone. Heartbeats are compared with this node's clock: keep node clocks in sync (NTP) to
well within the timeout.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
import uuid

from i2v.core.errors import I2VError

LOCK_FILE = "RUN_LOCK.json"


class RunLocked(I2VError):
    """Another live run holds the output folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _read(path: str) -> dict | None:
    """The lock's record; {} for a file being written (empty or partial), None when there is none."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


class RunLock:
    def __init__(self, directory: str, timeout_s: float, created_dir: bool, log=print):
        self.directory, self.timeout_s, self.created_dir, self.log = directory, timeout_s, created_dir, log
        self.path = os.path.join(directory, LOCK_FILE)
        self.token = uuid.uuid4().hex
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                       "started": time.time(), "heartbeat": time.time()}
        self.lost: str | None = None  # why the lock is no longer ours, if it is not
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking it --------------------------------------------------------------

    @classmethod
    def acquire(cls, directory: str, timeout_s: float, log=print) -> "RunLock":
        """Take the lock on `directory` (created if missing), or raise RunLocked naming the holder."""
        created = not os.path.isdir(directory)
        os.makedirs(directory, exist_ok=True)
        lock = cls(directory, timeout_s, created, log)
        for _ in range(5):  # a few rounds: another contender may take over a stale lock at the same time
            if lock._create():
                lock._start_heartbeat()
                atexit.register(lock.release)
                return lock
            holder = _read(lock.path)
            if holder is None:
                continue  # released meanwhile
            if holder == {}:  # being written: give its writer a moment
                time.sleep(0.2)
                holder = _read(lock.path)
                if holder in ({}, None):
                    age = time.time() - os.path.getmtime(lock.path) if holder == {} else 0.0
                    if holder is None or age <= timeout_s:
                        continue
                    holder = {"token": None, "heartbeat": os.path.getmtime(lock.path)}
            why = lock._stale_reason(holder)
            if why is None:
                lock._release_dir()
                raise RunLocked(lock._in_use(holder))
            lock._take_over(holder, why)
        lock._release_dir()
        raise RunLocked(f"run.output_dir: could not take {lock.path}: other launches keep taking it")

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.record, indent=1))
            f.flush()
            os.fsync(f.fileno())
        return True

    def _stale_reason(self, holder: dict) -> str | None:
        """Why `holder` may be taken over, or None while it is alive."""
        me = socket.gethostname()
        if holder.get("host") == me and isinstance(holder.get("pid"), int):
            if holder["pid"] == os.getpid():
                return "it was held by this process"
            if not _alive(holder["pid"]):
                return f"its process {holder['pid']} on this host is gone"
        age = time.time() - float(holder.get("heartbeat", 0))
        if age > self.timeout_s:
            return f"no heartbeat for {age:.0f} s (run.lock_timeout_s={self.timeout_s:g})"
        return None

    def _take_over(self, holder: dict, why: str) -> None:
        # One contender at a time, under a guard file made with O_EXCL: the lock it judged stale is read
        # again under the guard and moved away only if it is still that one. Without the guard, a slow
        # contender could move away the fresh lock another one had just created in its place.
        guard = f"{self.path}.takeover"
        try:
            os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            try:  # a guard older than the timeout was left by a contender that died holding it
                if time.time() - os.path.getmtime(guard) > self.timeout_s:
                    os.remove(guard)
            except FileNotFoundError:
                pass
            time.sleep(0.2)  # another contender is taking over: look again when it is done
            return
        try:
            current = _read(self.path)
            if current is None or current.get("token") != holder.get("token"):
                return  # released or replaced meanwhile: the next round looks again
            moved = f"{self.path}.stale-{self.token}"
            os.rename(self.path, moved)
            os.remove(moved)
            self.log(f"run.output_dir: took over the lock of {self._who(holder)}: {why}")
        finally:
            os.remove(guard)

    # -- holding it -------------------------------------------------------------

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        every = max(0.5, min(self.timeout_s / 4, 15.0))
        while not self._stop.wait(every):
            current = _read(self.path)
            if not current or current.get("token") != self.token:
                self.lost = f"{self.path} was taken over by {self._who(current or {})}"
                self.log(f"warning: {self.lost}; this run no longer holds its output folder")
                return
            self.record["heartbeat"] = time.time()
            tmp = f"{self.path}.tmp-{self.token}"
            with open(tmp, "w") as f:
                f.write(json.dumps(self.record, indent=1))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)  # the name never disappears: no contender's O_EXCL can win

    def check(self) -> None:
        """Raise when another run took the folder over (it judged this one stale): never write over it."""
        if self.lost:
            raise RunLocked(f"run.output_dir: {self.lost}; stopping without writing (raise run.lock_timeout_s "
                            "if heartbeats can stall this long)")

    def release(self) -> None:
        """Stop the heartbeat, remove the lock if it is still ours, and the folder if this run made it
        and left nothing in it (a run stopped by a config error leaves no empty folder behind)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if (_read(self.path) or {}).get("token") == self.token:
            os.remove(self.path)
        self._release_dir()

    def _release_dir(self) -> None:
        if self.created_dir:
            try:
                os.rmdir(self.directory)  # only if empty
            except OSError:
                pass

    # -- messages ---------------------------------------------------------------

    @staticmethod
    def _who(holder: dict) -> str:
        started = holder.get("started")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
        return f"host {holder.get('host', '?')} pid {holder.get('pid', '?')} (started {since})"

    def _in_use(self, holder: dict) -> str:
        age = time.time() - float(holder.get("heartbeat", 0))
        return (f"run.output_dir: {self.directory} is in use by the run of {self._who(holder)}, heartbeat "
                f"{age:.0f} s ago ({self.path}). Wait for it to finish or stop it, or choose another "
                f"run.output_dir; a lock without a heartbeat for run.lock_timeout_s ({self.timeout_s:g} s) is "
                "taken over")
