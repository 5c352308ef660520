"""Every rank's heartbeat in the launcher's store, so that a collective that timed out names the
rank that stopped answering instead of blaming the rank that waited for it. ``reshuffle run``'s
ranks and :class:`~reshuffle.ShuffledData` in a user's own loop share one per process.

A rank beats from a daemon thread (a key per rank: wall time, host, pid) into the TCP store at
``MASTER_ADDR:MASTER_PORT`` (torchrun's and ``reshuffle run``'s agent hosts it, so it outlives
any one rank). Nothing reads the beats while the job is healthy: a rank whose collective failed
reads them once (:meth:`Heartbeat.silent`). A rank that is stopped (SIGSTOP), deadlocked outside
Python or cut off stops beating; a rank merely slow or waiting in a collective keeps beating.

A silent rank on the reporting rank's host is stopped with SIGKILL (after checking that the pid
is still that rank of this job), so the job ends at once instead of after the launcher's 30 s
grace for SIGTERM, which a stopped process never answers.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Concatenate, ParamSpec, Protocol, TypeVar

import torch.distributed as dist

from reshuffle.store.wire import PeerError

INTERVAL_S = 1.0
STALE_S = 10.0  # ten missed beats
STOP_WITHIN_S = 15.0  # longer than a store call's timeout (10 s, Heartbeat.connect)


@dataclass(frozen=True)
class Silence:
    rank: int
    age_s: float | None  # None: never beat
    host: str = ""
    pid: int = 0
    started: str = ""  # the process's start time on its host (tells a pid reused since from it)

    def describe(self, lost: bool = False) -> str:
        """``rank R hung: ...`` (a collective timed out), or ``rank R lost: ...`` (its connection
        broke: it died, was killed, or its node went down)."""
        if self.age_s is None:
            return f"rank {self.rank} hung: it never started its heartbeat"
        if lost:
            return (
                f"rank {self.rank} lost: its connection broke and it has not beaten for {self.age_s:.0f} s "
                f"(pid {self.pid} on {self.host}: it died, was killed, or its node went down)"
            )
        return (
            f"rank {self.rank} hung: no heartbeat for {self.age_s:.0f} s (pid {self.pid} on {self.host}: "
            "stopped, deadlocked, or its node unreachable)"
        )


class Heartbeat:
    def __init__(self, rank: int, world_size: int, store: dist.Store | None) -> None:
        self.rank, self.world_size, self.store = rank, world_size, store
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self._prefix = f"reshuffle/heartbeat/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{restart}/"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def connect(cls, rank: int, world_size: int) -> Heartbeat:
        """A heartbeat through the launcher's store; a silent one for a single process."""
        address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if world_size == 1 or not address or not port:
            return cls(rank, world_size, None)
        try:
            timeout = datetime.timedelta(seconds=10)
            store = dist.TCPStore(
                address, int(port), is_master=False, timeout=timeout, wait_for_workers=False
            )
        except Exception as error:  # training does not depend on it: say so and go on without
            logging.getLogger("reshuffle").warning(
                "no heartbeat (cannot reach the store at %s:%s: %s); a hung rank will not be named",
                address, port, error,
            )  # fmt: skip
            return cls(rank, world_size, None)
        return cls(rank, world_size, store)

    def start(self) -> Heartbeat:
        if self.store is not None:
            self._beat()  # before any collective can wait for this rank
            self._thread = threading.Thread(target=self._run, name="reshuffle-heartbeat", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating and wait for the thread: one left inside a store call when the interpreter
        exits is ended mid-call, and the process aborts ("terminate called without an active
        exception"). A beat is one short store call; a store that does not answer times out."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=STOP_WITHIN_S)

    def _beat(self) -> None:
        beat = f"{time.time():.3f} {socket.gethostname()} {os.getpid()} {_start_time(os.getpid())}"
        assert self.store is not None  # beats start once the store is known
        self.store.set(f"{self._prefix}{self.rank}", beat)

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            try:
                self._beat()
            except Exception:  # the store is gone: the job is ending; nothing to report here
                return

    def silent(self, stale_s: float = STALE_S) -> list[Silence]:
        """The other ranks whose last beat is older than ``stale_s`` (one read per rank)."""
        if self.store is None:
            return []
        found, now = [], time.time()
        for rank in range(self.world_size):
            key = f"{self._prefix}{rank}"
            if rank == self.rank:
                continue
            if not self.store.check([key]):
                found.append(Silence(rank, None))
                continue
            stamp, host, pid, started = self.store.get(key).decode().split(" ")
            if now - float(stamp) > stale_s:
                found.append(Silence(rank, now - float(stamp), host, int(pid), started))
        return found

    def stop_silent(self, silent: list[Silence]) -> list[int]:
        """SIGKILL the silent ranks on this host (the same process that beat, not a reused pid)."""
        stopped = []
        for rank in silent:
            if rank.host == socket.gethostname() and rank.started and _start_time(rank.pid) == rank.started:
                try:
                    os.kill(rank.pid, signal.SIGKILL)
                    stopped.append(rank.rank)
                except ProcessLookupError:
                    pass
        return stopped


def _start_time(pid: int) -> str:
    """When process ``pid`` started (clock ticks since boot; empty when unknown or gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


# What a rank's error says when it failed because another one did: not the cause.
CONSEQUENCES = ("PeerError", "Connection closed by peer", "Connection reset by peer", "Broken pipe",
                "DistBackendError", "Timed out", "timed out", "NCCL communicator was aborted")  # fmt: skip
HUNG = re.compile(r"rank (\d+) ((?:hung|lost): [^\n]*)")  # group 2: "hung: ..." / "lost: ..."
LOST = ("Connection reset", "Connection closed", "Broken pipe")  # a peer's process or node went away
STOPPED = "stopped rank(s)"  # in the error of the rank that stopped the silent one


def is_consequence(error: BaseException | str) -> bool:
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return any(marker in text for marker in CONSEQUENCES)


def name_the_silent(
    error: BaseException, heartbeat: Heartbeat | None, timeout_s: float = 300
) -> BaseException:
    """``error`` from a collective that failed because a peer stopped answering: a ``PeerError``
    that names that peer (and stops it when it runs on this host). Other errors pass unchanged."""
    if heartbeat is None or not is_consequence(error):
        return error
    lost = any(marker in str(error) for marker in LOST)
    # a broken connection is seen at once: wait a few beats to see whose stopped
    stale_s = 3.0 if lost else min(STALE_S, max(3.0, timeout_s / 2))
    deadline = time.monotonic() + (stale_s + 2 * INTERVAL_S if lost else 0.0)
    try:
        while not (silent := heartbeat.silent(stale_s)) and time.monotonic() < deadline:
            time.sleep(INTERVAL_S / 2)
    except Exception as unreadable:  # the store is unreachable too: nothing more to say than the error
        logging.getLogger("reshuffle").warning("could not read the other ranks' heartbeats: %s", unreadable)
        return error
    if not silent:
        return error
    hung = "; ".join(rank.describe(lost) for rank in silent)
    # logged before stopping it: the launcher may see the stopped rank die before this one
    logging.getLogger("reshuffle").error("%s", hung)
    stopped = heartbeat.stop_silent(silent)
    action = f"; rank {heartbeat.rank} {STOPPED} {', '.join(map(str, stopped))} (SIGKILL)" if stopped else ""
    return PeerError(f"rank {heartbeat.rank} failed because {hung}{action}")  # raised from ``error``


_lock = threading.Lock()
_shared: Heartbeat | None = None  # this process's heartbeat, while anything holds it
_holders = 0


def acquire(rank: int, world_size: int) -> Heartbeat:
    """This process's heartbeat, started by the first holder (one key per rank in the store, however
    many parts of the process want it: the trainer and the ShuffledData it drives)."""
    global _shared, _holders
    with _lock:
        if _shared is None:
            _shared = Heartbeat.connect(rank, world_size).start()
        _holders += 1
        return _shared


def release(heartbeat: Heartbeat) -> None:
    """Let go of :func:`acquire`'s heartbeat; the last holder stops it."""
    global _shared, _holders
    with _lock:
        if heartbeat is not _shared:
            return
        _holders -= 1
        if _holders == 0:
            heartbeat.stop()
            _shared = None


@contextlib.contextmanager
def watch(rank: int, world_size: int, timeout_s: float) -> Iterator[Heartbeat]:
    """Beat while the body runs; an error from a collective a silent peer broke names that peer."""
    heartbeat = acquire(rank, world_size)
    try:
        yield heartbeat
    except BaseException as error:
        named = name_the_silent(error, heartbeat, timeout_s)
        if named is error:
            raise
        raise named from error
    finally:
        release(heartbeat)


def named_in_logs(logs: Path, since: float) -> Iterator[tuple[int, str]]:
    """``(reporter, "rank R hung: ...")`` (or ``lost``) for every silent rank a rank logged in ``logs``
    (``rank-N.log`` files) at or after ``since``."""
    for path in sorted(logs.glob("rank-*.log")):
        reporter = int(path.stem.split("-")[1])
        for line in path.read_text(errors="replace").splitlines():
            hung = HUNG.search(line)
            if hung and _logged_at(line) >= since:
                yield reporter, hung.group(0)


def _logged_at(line: str) -> float:
    try:  # the log format's asctime: "2026-11-25 16:01:09,272 rank 0 ..."
        return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except ValueError:
        return 0.0


class Watch:
    """This process's heartbeat held by one part of a job (:class:`~reshuffle.ShuffledData`), so
    that an error a lost or hung peer caused names that peer (:meth:`named`). Holds nothing in a
    single process or without torch.distributed."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.heartbeat = acquire(dist.get_rank(), dist.get_world_size()) if several else None

    def named(self, error: BaseException) -> BaseException:
        """``error``, or a ``PeerError`` naming the silent peer that caused it."""
        return (
            name_the_silent(error, self.heartbeat, self.timeout_s) if isinstance(error, Exception) else error
        )

    def release(self) -> None:
        heartbeat, self.heartbeat = self.heartbeat, None
        if heartbeat is not None:
            release(heartbeat)


class Watched(Protocol):
    watch: Watch


Owner = TypeVar("Owner", bound=Watched)
Params = ParamSpec("Params")
Result = TypeVar("Result")


def names_lost_ranks(
    method: Callable[Concatenate[Owner, Params], Result],
) -> Callable[Concatenate[Owner, Params], Result]:
    """A method whose error, when a peer rank died or hung, names that rank (``PeerError``,
    raised from the original), through its owner's :class:`Watch`."""

    @functools.wraps(method)
    def named(owner: Owner, *args: Params.args, **kwargs: Params.kwargs) -> Result:
        try:
            return method(owner, *args, **kwargs)
        except Exception as error:
            found = owner.watch.named(error)
            if found is error:
                raise
            raise found from error

    return named
