"""A deadline for every collective of a rank, and which peer is to blame when one is missed.

gloo and HCCL take a process-group timeout, but not every blocking path honours it: a peer stopped with
SIGSTOP keeps its sockets open, and rank 0 was seen blocking in `all_to_all_single` for good despite
`--dist-timeout 10`. So each rank runs one daemon thread that
- heartbeats into the rendezvous store every HEARTBEAT seconds: `dsv4/hb/<rank>` = "<beat> <seq>", where seq
  counts the collectives this rank has entered (ranks run collectives in the same order, in lockstep);
- ends the process (exit code EXIT_COLLECTIVE) when the collective the rank is in has run past its deadline
  (--dist-timeout plus a grace, so the backend's own timeout reports first where it works), after naming the
  peers to blame: a peer whose heartbeat stopped is not responding (stopped, frozen or dead); a peer whose
  seq is behind has not reached the collective (busy or stuck elsewhere).
The verdict is also written to `dsv4/stuck` in the store, where the `--nproc` launcher reads it.

The main thread is blocked inside the backend, so it cannot be interrupted; the watchdog ends the process
with os._exit, as a rank's own failure path does.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

EXIT_COLLECTIVE = 75  # the exit code of a rank whose collective failed (ascend.distributed re-exports it)
HEARTBEAT = 1.0  # seconds between heartbeats
GRACE = 2.0  # seconds past the timeout before the watchdog acts (the backend's own error comes first)
STUCK_KEY = "dsv4/stuck"


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.timeout: float | None = None
        self.seq = 0
        self.current: tuple[str, float, float] | None = None  # (what, deadline, bound)
        self.thread: threading.Thread | None = None
        self.store: Any = None
        self.rank = 0
        self.world = 1
        self.beat = 0
        self.stopping = False


_S = _State()


def set_timeout(seconds: float | None) -> None:
    """The bound for every collective of this process (the --dist-timeout); None = unbounded."""
    _S.timeout = seconds


def _store_and_rank() -> tuple[Any, int, int] | None:
    try:
        import torch.distributed as dist
        from torch.distributed import distributed_c10d as c10d

        if not dist.is_initialized():
            return None
        store = c10d._get_default_store()
        # the default group's store adds a prefix; the launcher reads the key without it
        store = getattr(store, "_underlying_non_prefix_store", None) or store
        return store, dist.get_rank(), dist.get_world_size()
    except Exception:  # the store is an implementation detail: without it the peers just go unnamed
        return None


def _bounded(fn: Any, seconds: float) -> Any:
    """fn() on a helper thread, None if it does not return within `seconds` (a store on a stopped peer)."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception:  # a store that went away: nothing to report
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    return out[0] if out else None


def _read_peers() -> dict[int, tuple[int, int]]:
    s = _S
    got = {}
    for r in range(s.world):
        if r == s.rank:
            continue
        key = f"dsv4/hb/{r}"
        try:
            if s.store.check([key]):
                beat, seq = s.store.get(key).decode().split()
                got[r] = (int(beat), int(seq))
        except Exception:
            pass
    return got


def blame(my_seq: int | None = None) -> str:
    """Which peers are to blame for a collective that does not finish: '' when it cannot be told."""
    s = _S
    if s.store is None or s.world <= 1:
        return ""
    my_seq = s.seq if my_seq is None else my_seq
    first = _bounded(_read_peers, 5.0)
    if first is None:
        return ""
    time.sleep(2.5 * HEARTBEAT)
    second = _bounded(_read_peers, 5.0) or {}
    frozen = [r for r in range(s.world) if r != s.rank and (r not in second or second[r][0] == first.get(r, (0, 0))[0])]
    behind = [r for r, (_, seq) in second.items() if r not in frozen and seq < my_seq]
    parts = []
    if frozen:
        parts.append(f"rank{'s' if len(frozen) > 1 else ''} {', '.join(map(str, frozen))} "
                     f"{'are' if len(frozen) > 1 else 'is'} not responding (stopped, frozen or dead)")
    if behind:
        parts.append(f"rank{'s' if len(behind) > 1 else ''} {', '.join(map(str, behind))} "
                     f"{'have' if len(behind) > 1 else 'has'} not reached this collective (busy or stuck elsewhere)")
    return "; ".join(parts)


def report(verdict: str) -> None:
    """Leave the verdict in the store for the launcher."""
    if verdict and _S.store is not None:
        _bounded(lambda: _S.store.set(STUCK_KEY, f"{_S.rank}|{verdict}"), 5.0)


def _loop() -> None:
    s = _S
    last_beat = 0.0
    while not s.stopping:
        now = time.monotonic()
        if now - last_beat >= HEARTBEAT and s.store is not None:
            s.beat += 1
            _bounded(lambda: s.store.set(f"dsv4/hb/{s.rank}", f"{s.beat} {s.seq}"), 5.0)
            last_beat = now
        cur = s.current
        if cur is not None and time.monotonic() > cur[1]:
            what, _, bound = cur
            verdict = blame()
            report(verdict)
            msg = f"{what} did not finish within the --dist-timeout of {bound:g} s"
            print(f"dsv4 generate: rank {s.rank}: error: {msg}" + (f": {verdict}" if verdict else
                  " (another rank is stuck or dead)"), file=sys.stderr, flush=True)
            os._exit(EXIT_COLLECTIVE)
        time.sleep(0.25)


def _ensure_thread() -> None:
    s = _S
    if s.store is None:
        found = _store_and_rank()
        if found is not None:
            s.store, s.rank, s.world = found
    if s.thread is not None:
        return
    s.thread = threading.Thread(target=_loop, name="dsv4-collective-watchdog", daemon=True)
    s.thread.start()


@contextmanager
def watch(what: str, bound: float | None = None) -> Iterator[None]:
    """Mark the calling thread as inside collective `what` for at most `bound` seconds (default: the
    process-wide timeout); past it, the watchdog ends the process naming the peers to blame."""
    s = _S
    bound = s.timeout if bound is None else bound
    with s.lock:
        s.seq += 1
    if bound is None:
        yield
        return
    _ensure_thread()
    prev = s.current
    s.current = (what, time.monotonic() + bound + GRACE, bound)
    try:
        yield
    finally:
        s.current = prev


def reset() -> None:
    """Forget the store and counters (the process group was destroyed); the thread keeps running idle."""
    s = _S
    s.current, s.store, s.seq = None, None, 0


def stop() -> None:
    """Stop heartbeating and forget the store, before the process group and its store are torn down: a heartbeat
    still inside the store's C++ client while the store is destroyed at exit aborts the process ("terminate
    called without an active exception"). A later collective starts a new thread."""
    s = _S
    s.stopping = True
    t = s.thread
    if t is not None and t is not threading.current_thread():
        t.join(HEARTBEAT + 6.0)  # its store call is bounded by 5 s
    s.thread, s.stopping = None, False
    reset()
