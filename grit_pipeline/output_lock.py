"""An exclusive lease on an output: one build writes into it at a time.

The lease is one small file, ``OUTPUT/.grit-lock.json``: who holds it (host, pid, a random token), when it was taken
and the holder's last heartbeat (Unix time, rewritten every ``ttl_s / 4`` seconds by a thread of the driver).

- Taking it: exclusive create (see :meth:`OutputStore.create_exclusive`). Where the file exists, its holder is alive
  unless the heartbeat is older than ``ttl_s`` or the holder is a process of this host that no longer exists; a live
  holder makes the new build refuse, naming the holder. A dead holder's lease is taken over: deleted, then created
  exclusively again, so of two builds taking over at once only one gets it.
- Keeping it: before each heartbeat the holder reads the lease back; if the token is no longer its own (another
  build took it over after this one stalled for longer than ``ttl_s``), the lease is lost and the build stops.
- Guarantees: with exclusive create (local filesystems, S3) two live builds never both hold the lease. Staleness is
  judged by wall clocks, so hosts must agree on the time to well within ``ttl_s``. On a store without exclusive
  create the lease is best effort (a write, then a read-back of the token).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from grit_pipeline.output_store import ExclusiveCreateUnsupported, OutputStore

LOCK_NAME = ".grit-lock.json"


class OutputLocked(RuntimeError):
    """Another live build holds the output's lease."""


class LeaseLost(RuntimeError):
    """This build's lease was taken over (it stalled for longer than the lease's time to live)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLease:
    """``with OutputLease(store, ttl_s):`` holds the output's lease, with a heartbeat, until the block ends."""

    def __init__(self, store: OutputStore, ttl_s: float = 60.0):
        self.store = store
        self.ttl_s = max(float(ttl_s), 1.0)
        self.token = uuid.uuid4().hex
        self.record: dict[str, Any] = {
            "holder": {"host": socket.gethostname(), "pid": os.getpid()},
            "token": self.token,
            "taken_at": time.time(),
            "heartbeat": time.time(),
            "ttl_s": self.ttl_s,
        }
        self.held = False
        self.lost: str | None = None
        self.took_over: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking and giving back --------------------------------------------------------------------------------

    def _data(self) -> bytes:
        self.record["heartbeat"] = time.time()
        return (json.dumps(self.record, indent=1) + "\n").encode("utf-8")

    def _read(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.store.read_bytes(LOCK_NAME))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable or half-written by a store without atomic writes: treat as a stale lease
        return data if isinstance(data, dict) else {}

    def holder_alive(self, lease: dict[str, Any]) -> bool:
        try:
            age = time.time() - float(lease.get("heartbeat", 0))
            ttl = float(lease.get("ttl_s", self.ttl_s))
        except (TypeError, ValueError):
            return False
        if age > ttl:
            return False
        holder = lease.get("holder") or {}
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            return _pid_alive(holder["pid"])
        return True

    def _create(self) -> bool:
        try:
            return self.store.create_exclusive(LOCK_NAME, self._data())
        except ExclusiveCreateUnsupported:
            if self._read() is not None:
                return False
            self.store.write_bytes(LOCK_NAME, self._data())
            time.sleep(0.2)
            return (self._read() or {}).get("token") == self.token

    def acquire(self) -> None:
        """Take the lease or raise :class:`OutputLocked`."""
        for _ in range(3):
            if self._create():
                break
            lease = self._read()
            if lease is None:
                continue  # released between our create and our read: try again
            if self.holder_alive(lease):
                holder = lease.get("holder") or {}
                age = time.time() - float(lease.get("heartbeat", 0) or 0)
                raise OutputLocked(
                    f"{self.store.url} is being written by another build (host {holder.get('host')}, pid "
                    f"{holder.get('pid')}, last heartbeat {age:.0f} s ago; its lease lasts {lease.get('ttl_s')} s "
                    f"without one). Wait for it to end, or use another output"
                )
            self.took_over = lease
            self.store.delete(LOCK_NAME)
        else:
            raise OutputLocked(f"{self.store.url}: another build took the lease at the same time; try again")
        self.held = True
        self._thread = threading.Thread(target=self._beat, name="grit-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self.held and self.lost is None:
            try:
                if (self._read() or {}).get("token") == self.token:
                    self.store.delete(LOCK_NAME)
            except OSError:
                pass  # the lease then goes stale and is taken over by the next build
        self.held = False

    def __enter__(self) -> OutputLease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- keeping it --------------------------------------------------------------------------------------------

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                current = self._read()
                if current is not None and current.get("token") not in (None, self.token):
                    self.lost = f"the output's lease was taken over by {current.get('holder')}"
                    return
                self.store.write_bytes(LOCK_NAME, self._data())
            except OSError:
                continue  # a missed heartbeat; the lease lasts ttl_s

    def check(self) -> None:
        """Raise :class:`LeaseLost` when the lease is no longer this build's."""
        if self.lost:
            raise LeaseLost(self.lost)
