"""One writer at a time in a run folder: ``RunLock``.

``mamlpp-train`` (and each run of ``mamlpp-reproduce train``) holds the lock of its run folder
while it writes there; ``mamlpp-eval`` and ``mamlpp-reproduce table`` hold it while they score a
run and write its report. A second writer is refused at once with one line naming the holder.

NOTE [Run folder lock]
    The lock is the file ``RUN/.lock``, opened and locked with ``fcntl.flock(LOCK_EX | LOCK_NB)``
    for as long as the holder writes, and holding one JSON line about the holder: pid, host,
    start time (UTC) and command. The kernel drops a ``flock`` when its process dies, however it
    dies, so:

    * a live holder on this host: the ``flock`` fails and the newcomer is refused, naming it;
    * a dead holder on this host (killed, crashed, power cut): the ``flock`` succeeds but the file
      still names the holder, whose pid is no longer running; the newcomer says so and takes the
      lock over;
    * a holder on another host is never taken over without being asked: the file names that
      host, and the newcomer refuses, whatever the ``flock`` says (its process cannot be checked
      from here), until ``--break-lock`` says it is gone.

    Releasing unlinks the file, then closes it. A newcomer that locked a file which was unlinked
    meanwhile (the holder released it between the open and the ``flock``) sees that the path
    names another file and starts again.

    Network file systems: the content check works wherever the file's content is visible to
    every host (it is written and fsync'ed before the holder starts). The ``flock`` excludes
    processes on other hosts only where the file system passes locks to its server (Linux NFS
    clients turn ``flock`` into NFS byte-range locks, which the server arbitrates, unless the
    mount uses ``nolock`` or ``local_lock=flock|all``); elsewhere it excludes processes of the
    same host only, and two hosts starting within the same instant could both proceed. Where
    the file system has no locks at all (``flock`` fails with ENOLCK, EOPNOTSUPP or ENOSYS), the
    content alone decides, with the same instant's race. docs/training.md says this for users.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

__all__ = ["LOCK_NAME", "LockHolder", "RunLock", "RunLockedError", "lock_holder"]

LOCK_NAME = ".lock"

try:  # POSIX; elsewhere the content of the lock file alone decides
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


@dataclass
class LockHolder:
    """Who holds (or held) a run folder's lock."""

    pid: int
    host: str
    started: str  # ISO 8601, UTC
    command: str

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} since {self.started} ({self.command})"

    @classmethod
    def me(cls, command: str) -> "LockHolder":
        now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
        return cls(pid=os.getpid(), host=socket.gethostname(), started=now.strftime("%Y-%m-%d %H:%M:%S UTC"),
                   command=command)

    @classmethod
    def parse(cls, text: str) -> Optional["LockHolder"]:
        try:
            d = json.loads(text)
            return cls(pid=int(d["pid"]), host=str(d["host"]), started=str(d["started"]), command=str(d["command"]))
        except (ValueError, KeyError, TypeError):
            return None


class RunLockedError(RuntimeError):
    """Another process holds the run folder's lock (``holder``: a ``LockHolder`` or None when
    its file could not be read)."""

    def __init__(self, message: str, holder: Optional[LockHolder]) -> None:
        super().__init__(message)
        self.holder = holder


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return False
    return True


def _read(path: Path) -> Optional[LockHolder]:
    try:
        return LockHolder.parse(path.read_text())
    except OSError:
        return None


def lock_holder(run_dir: str | os.PathLike) -> Optional[LockHolder]:
    """The holder of ``run_dir``'s lock when one is likely live: a lock file naming a process of
    another host, or of this host that still runs; None otherwise. Reads only (a hint for
    reports; ``RunLock`` is what decides)."""
    h = _read(Path(run_dir) / LOCK_NAME)
    if h is None:
        return None
    if h.host == socket.gethostname() and not _pid_alive(h.pid):
        return None
    return h


class RunLock:
    """The exclusive lock of a run folder (NOTE [Run folder lock]).

    Args:
        run_dir: the folder (created when missing).
        command: what the holder is, for the messages others see ("mamlpp-train", ...).
        break_lock: take over a lock that another host holds (after the user checked that
            its process is gone); a lock held by a live process of this host is never broken.
        wait: seconds to wait for a live holder of this host to finish (0: refuse at once;
            ``math.inf``: as long as it takes).
        advice: what the refusal of a live holder suggests.
        log: where the one-line notes go (a stale lock taken over, a lock broken, waiting).
    """

    def __init__(self, run_dir: str | os.PathLike, command: str, *, break_lock: bool = False, wait: float = 0.0,
                 advice: str = "wait until it finishes, or use another run folder",
                 log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.command = command
        self.break_lock = bool(break_lock)
        self.wait = float(wait)
        self.advice = advice
        self.log = log
        self._fd: Optional[int] = None
        self.holder: Optional[LockHolder] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001  (interpreter shutdown)
            pass

    def _refuse(self, holder: Optional[LockHolder], why: str) -> RunLockedError:
        who = holder.describe() if holder is not None else "another process (its lock file cannot be read)"
        return RunLockedError(f"run folder {self.run_dir} is locked by {who}{why}", holder)

    def acquire(self) -> "RunLock":
        """Take the lock, or raise ``RunLockedError`` naming its holder."""
        if self._fd is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.wait
        said_waiting = False
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                got = self._flock(fd)
                if got is False:  # a live process holds it (here, or elsewhere where locks reach the server)
                    holder = _read(self.path)
                    if time.monotonic() < deadline:
                        if not said_waiting:
                            self.log(f"{self.command}: waiting for {self.run_dir} (locked by "
                                     f"{holder.describe() if holder else 'another process'})")
                            said_waiting = True
                        os.close(fd)
                        time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
                        continue
                    raise self._refuse(holder, f"; {self.advice}")
                try:
                    same_file = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same_file = False
                if not same_file:  # released (unlinked) between our open and our flock
                    os.close(fd)
                    continue
                old = LockHolder.parse(os.pread(fd, 4096, 0).decode(errors="replace"))
                if old is not None and not self._may_take_over(old, flock_held=got is True):
                    if time.monotonic() < deadline and old.host == socket.gethostname():
                        os.close(fd)
                        time.sleep(0.5)
                        continue
                    raise self._refuse(old, self._why_not(old))
                me = LockHolder.me(self.command)
                data = (json.dumps(asdict(me)) + "\n").encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, data, 0)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            self._fd, self.holder = fd, me
            return self

    def _flock(self, fd: int) -> Optional[bool]:
        """True: locked; False: held by another; None: the file system has no locks."""
        if fcntl is None:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in _NO_LOCKS:
                return None
            raise

    def _may_take_over(self, old: LockHolder, flock_held: bool) -> bool:
        """Whether a lock file naming ``old`` may be taken over (saying so)."""
        if old.host != socket.gethostname():
            if not self.break_lock:
                return False
            self.log(f"{self.command}: breaking the lock of {self.run_dir} held by {old.describe()} (--break-lock)")
            return True
        alive = _pid_alive(old.pid) and old.pid != os.getpid()
        if alive and not flock_held:  # no file-system locks: the pid is all we know
            return False
        state = "is no longer running" if not _pid_alive(old.pid) else "no longer holds it"
        self.log(f"{self.command}: taking over the stale lock of {self.run_dir}: {old.describe()} {state}")
        return True

    def _why_not(self, old: LockHolder) -> str:
        if old.host != socket.gethostname():
            return (f"; its process cannot be checked from host {socket.gethostname()}. If it is no longer running, "
                    f"pass --break-lock")
        return f"; {self.advice}"

    def release(self) -> None:
        """Unlink the lock file and drop the lock (a no-op when not held)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
        finally:
            os.close(fd)
