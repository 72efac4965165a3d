"""Step 4: stream converted rows into shards (`NAME.tmp`, renamed when complete), in plan order."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from common.safetensors_io import TAGS

from ..errors import CliError
from . import files
from .encode import convert_job
from .files import INTERRUPT_ENV, sha256_file
from .journal import Journal
from .plan import Job, OutTensor, Plan, Shard
from .validate import SourceReader


def _header_bytes(entries: list[OutTensor]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for e in entries:
        header[e.name] = {"dtype": e.tag, "shape": list(e.shape), "data_offsets": [off, off + e.nbytes]}
        off += e.nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    return len(hb).to_bytes(8, "little") + hb


class ShardFile:
    """One output shard streamed to `NAME.tmp`: header first, then each tensor's rows in plan order (a tensor
    may arrive in several row pieces), hashed as written."""

    def __init__(self, root: Path, shard: Shard):
        self.shard, self.path = shard, root / shard.relpath
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.sha = hashlib.sha256()
        self.size = 0
        self.next = 0  # entry being written
        self.row = 0  # rows of it written so far
        self._f = open(self.tmp, "wb")
        self._write(memoryview(_header_bytes(shard.entries)))

    def _write(self, mv: memoryview) -> None:
        try:
            self._f.write(mv)
        except OSError as e:
            raise CliError(f"{self.tmp}: write failed ({e.strerror})") from None
        self.sha.update(mv)
        self.size += mv.nbytes

    @property
    def current(self) -> OutTensor:
        return self.shard.entries[self.next]

    def write(self, o: OutTensor, row0: int, a: np.ndarray) -> None:
        """Rows [row0, row0 + len(a)) of entry `o`, which must be the current entry's next rows."""
        want = self.current
        if o != want or row0 != self.row or TAGS.get(a.dtype) != o.tag or tuple(a.shape[1:]) != o.shape[1:] \
                or row0 + a.shape[0] > o.shape[0]:
            raise AssertionError(f"{self.path}: got {o.name} rows {row0}+{a.shape} {a.dtype}, planned {want} "
                                 f"at row {self.row}")
        a = np.ascontiguousarray(a)
        self._write(memoryview(a.reshape(-1).view(np.uint8)))
        self.row += a.shape[0]
        if self.row == o.shape[0]:
            self.next += 1
            self.row = 0

    @property
    def complete(self) -> bool:
        return self.next == len(self.shard.entries)

    def finish(self) -> tuple[int, str]:
        try:
            self._f.flush()
            os.fsync(self._f.fileno())  # the journal will vouch for this file: make it durable first
            self._f.close()
            os.replace(self.tmp, self.path)
        except OSError as e:
            raise CliError(f"{self.path}: cannot finish ({e.strerror})") from None
        return self.size, self.sha.hexdigest()

    def abort(self) -> None:
        self._f.close()
        self.tmp.unlink(missing_ok=True)


class _SourceHasher(threading.Thread):
    """sha256 of every source file, concurrently with the conversion (hashlib releases the GIL)."""

    def __init__(self, src: Path, files: list[str]):
        super().__init__(daemon=True, name="source-hasher")
        self.src, self.files = src, files
        self._halt = threading.Event()
        self._out: dict[str, dict] = {}
        self._err: BaseException | None = None

    def run(self) -> None:
        try:
            for f in self.files:
                size, sha = sha256_file(self.src / f, self._halt)
                self._out[f] = {"size": size, "sha256": sha}
        except BaseException as e:  # reported by result()
            self._err = e

    def stop(self) -> None:
        self._halt.set()

    def result(self) -> dict[str, dict]:
        self.join()
        if isinstance(self._err, OSError):
            raise CliError(f"{self.src}: cannot hash source file ({self._err})")
        if self._err is not None:
            raise self._err
        return self._out


class _Writer(threading.Thread):
    """Appends converted tensors, in plan order, to each part's open shard; hashes as it writes; records each
    finished shard in the journal. A thread of its own so that while a write blocks on the disk (the kernel
    throttles writers once dirty pages pile up) the workers keep converting into a byte-bounded queue.
    Owns the journal while running (the main thread only queues)."""

    def __init__(self, plan: Plan, dst: Path, journal: Journal, max_bytes: int, interrupt_after: int):
        super().__init__(name="shard-writer", daemon=True)
        self.plan, self.dst, self.journal = plan, dst, journal
        self.max_bytes, self.interrupt_after = max_bytes, interrupt_after
        self.cv = threading.Condition()
        self.items: deque = deque()
        self.queued = 0
        self.closed = self.halt = False
        self.error: BaseException | None = None
        self.open_files: dict[str, ShardFile] = {}
        self.pending: dict[tuple[str, str], deque] = {}  # (part, tensor) -> row pieces not yet writable
        self.todo: dict[str, deque] = {}  # part -> its shards still to write, in order
        for sh in plan.shards:
            if not sh.done:
                self.todo.setdefault(sh.part, deque()).append(sh)
        self.finished = 0

    # -- main thread --
    def put(self, job: Job, outs: list, status: str) -> None:
        nbytes = sum(a.nbytes for _, _, a in outs)
        with self.cv:
            # wait for room (one item always fits in an empty queue); timeouts keep Ctrl-C responsive
            while self.queued and self.queued + nbytes > self.max_bytes and self.error is None:
                self.cv.wait(0.2)
            self.check()
            self.items.append((job, outs, status, nbytes))
            self.queued += nbytes
            self.cv.notify_all()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def finish(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify_all()
        while self.is_alive():
            self.join(0.2)
        self.check()

    def stop(self) -> None:
        with self.cv:
            self.halt = True
            self.cv.notify_all()
        while self.is_alive():
            self.join(0.2)

    # -- writer thread --
    def run(self) -> None:
        try:
            while True:
                with self.cv:
                    while not self.items and not self.closed and not self.halt:
                        self.cv.wait()
                    if self.halt or not self.items:
                        return
                    job, outs, status, nbytes = self.items.popleft()
                self._write(job, outs, status)
                del outs
                with self.cv:
                    self.queued -= nbytes
                    self.cv.notify_all()
        except BaseException as e:  # reported to the main thread by check()
            with self.cv:
                self.error = e
                self.cv.notify_all()
        finally:
            if self.error is not None or self.halt:
                for f in self.open_files.values():
                    f.abort()
                self.open_files.clear()

    def _write(self, job: Job, outs: list, status: str) -> None:
        name = job.tensor.src.name
        prev = self.journal.status.get(name)
        self.journal.status[name] = "rounded" if "rounded" in (prev, status) else status
        for o, row0, a in outs:
            if self.plan.shard_of[(o.part, o.name)].done:
                continue  # this output's shard was kept by --resume
            self.pending.setdefault((o.part, o.name), deque()).append((row0, a))
            self._drain(o.part)

    def _drain(self, part: str) -> None:
        """Write what the part's current entry can take. Pieces of a later entry wait in `pending`: only a
        weight's scale does (it follows the weight in the file), so that buffer stays small."""
        while True:
            f = self.open_files.get(part)
            if f is None:
                todo = self.todo[part]
                if not todo or not self.pending.get((part, todo[0].entries[0].name)):
                    return  # a shard is opened when its first tensor's first rows arrive
                f = self.open_files[part] = ShardFile(self.dst, todo[0])
            q = self.pending.get((part, f.current.name))
            if not q:
                return
            row0, a = q.popleft()
            f.write(f.current, row0, a)
            if f.complete:
                size, sha = f.finish()
                del self.open_files[part]
                sh = self.todo[part].popleft()
                sh.done = True
                self.journal.record(sh.relpath, size, sha)
                self.finished += 1
                if self.interrupt_after and self.finished >= self.interrupt_after:
                    raise KeyboardInterrupt  # the test hook: surfaces in the main thread via check()


def _execute(plan: Plan, dst: Path, reader: SourceReader, workers: int, group: int | None,
             journal: Journal) -> dict:
    """Run the jobs in plan order through a thread pool with a bounded look-ahead; stream into shards."""
    from tqdm import tqdm

    todo = [j for j in plan.jobs if any(not plan.shard_of[(o.part, o.name)].done for o in j.outputs)]
    total = sum(j.nbytes for j in todo)
    window = workers + 2  # jobs being converted ahead of the writer queue
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="convert")
    writer = _Writer(plan, dst, journal, files.WRITE_QUEUE_BYTES, int(os.environ.get(INTERRUPT_ENV, "0") or 0))
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="convert", file=sys.stderr, disable=None,
               dynamic_ncols=True)
    inflight: deque = deque()
    it = iter(todo)
    n_done = 0

    def fill() -> None:
        while len(inflight) < window:
            j = next(it, None)
            if j is None:
                return
            inflight.append((j, pool.submit(convert_job, j, reader, group)))

    writer.start()
    try:
        fill()
        while inflight:
            job, fut = inflight.popleft()
            outs, status = fut.result()
            fill()
            writer.put(job, outs, status)
            del outs
            n_done += 1
            bar.update(job.nbytes)
            bar.set_postfix_str(f"{n_done}/{len(todo)} jobs", refresh=False)
        writer.finish()
        missing = [sh.relpath for sh in plan.shards if not sh.done]
        if missing or writer.open_files:
            raise AssertionError(f"shards not completed: {missing[:3]}")
    except BaseException:
        writer.stop()  # aborts open shards: their .tmp files are removed; the journal stays consistent
        for _, fut in inflight:
            fut.cancel()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        bar.close()
    pool.shutdown(wait=True)
    journal.save()
    # over every tensor, including those of shards a --resume kept (their status is in the journal)
    exactness = Counter(journal.status[t.src.name] for t in plan.tensors)
    rounded = [t.src.name for t in plan.tensors if journal.status[t.src.name] == "rounded"][:10]
    return {"src_bytes": total, "exactness": {"exact": exactness["exact"], "rounded": exactness["rounded"],
                                              "quantized": exactness["quantized"], "kept": exactness["kept"],
                                              "rounded_examples": rounded}}
