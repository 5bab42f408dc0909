"""The decode loop of a replica: one model thread owns every live stream and steps them together.

A stream is opened with its cache and the prefill's logits (`DecodeBatcher.open`, on the event
loop, which picks its first token at once). From then on the model thread owns the stream's
row: each step runs the ready rows as one `ModelRunner.decode_batch` (projections and MLPs once
over all rows, attention per stream over its own ragged cache), picks each row's next token
(`TokenPicker`: sampling, EOS, stop strings, max_new_tokens: what `ModelRunner.generate`, the
one-sequence reference, does) and hands it to the stream's asyncio queue through
`loop.call_soon_threadsafe`. Streams join and leave between steps (continuous batching).

A row sits out a step while it waits for
- its recall: the merged rows its last step asked for are fetched on the event loop
  (services/decode/recall.py) and swapped into its cache by the model thread before its next
  step, so only that thread ever changes a cache it steps;
- its reader: a stream runs at most `ahead` tokens ahead of the consumer of its queue (a slow
  client slows its own stream, not the others, and holds no unbounded queue).
A client that goes away closes its stream, and its row leaves at the next step.

The model thread starts with the first stream and then waits for the next one when there is
nothing to step (a thread that ran torch work and ends shortly before the process exits can
abort the process). No thread per stream: the event loop awaits queues.

Threads and OpenMP: the model thread is meant to be the only thread of a decode replica that
runs parallel torch work. libgomp keeps a team of worker threads for every thread that ever
ran a parallel region, for as long as that thread lives; once those teams hold more threads
than the process has CPUs, every worker sleeps after each parallel region instead of spinning
and is woken by the next one, about 900 times per one-stream decode step of the default model
at 2 torch threads, which made a step about 2x slower (docs/engine.md, "Threads"). So the first
token is picked here too (not on the event loop in `open`), and `run` puts other torch work of
the decode path (joining a fetched chain) on this thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import resource
import threading
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from headwise.cache.compact import CompactCache
from headwise.errors import InvalidInput
from headwise.models.runner import DecodeStats
from headwise.models.sampling import SamplingParams, TokenPicker

log = logging.getLogger("headwise.decode")
AHEAD = 8  # tokens a stream may run ahead of its reader


@dataclass(eq=False)
class _Row:
    """One stream in the model thread."""

    cache: CompactCache
    picker: TokenPicker
    threshold: float | None
    recall: object | None  # services.decode.recall.Recall
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    stats: DecodeStats = field(default_factory=DecodeStats)
    token: int = 0  # the last token picked: the input of the row's next step
    sent: int = 0  # tokens handed to the queue (model thread)
    taken: int = 0  # tokens the reader took (event loop)
    waiting: bool = False  # its recall is being fetched
    last_step: int = 0  # the batcher step it last ran in (the longest-waiting rows go first)
    task: asyncio.Future | None = None  # the recall fetch under way


def _cpu_wall() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, time.perf_counter()


class ThreadGuard:
    """One torch thread while the process gets far less CPU than its torch threads need.

    An unthrottled OpenMP team spins between parallel regions; on cores that other processes
    hold, a spinning worker and its master wait for each other (a one-stream step of the default
    model at 2 threads went from about 80 ms to seconds on 2 cores at load 30). Over every
    `window` steps at n > 1 threads the process's CPU time within the steps is compared with their
    wall time: under `floor` cores on average, the model thread steps at one thread for the next
    `hold` steps, then tries n again. `clock() -> (cpu_s, wall_s)`."""

    def __init__(self, window: int = 4, floor: float = 0.75, hold: int = 256, clock=_cpu_wall):
        self.window, self.floor, self.hold, self.clock = window, floor, hold, clock
        self.threads: int | None = None  # the configured count, read at the first step
        self.left = 0  # steps still to run at one thread
        self.n, self.cpu, self.wall = 0, 0.0, 0.0  # the window so far
        self.fallbacks = 0
        self._t0: tuple[float, float] | None = None

    def before(self) -> None:
        if self.threads is None:
            self.threads = torch.get_num_threads()
        if self.threads > 1 and self.left == 0:
            self._t0 = self.clock()

    def after(self) -> None:
        if self.threads is None or self.threads == 1:
            return
        if self.left > 0:
            self.left -= 1
            if self.left == 0:
                torch.set_num_threads(self.threads)
            return
        (c0, w0), (c1, w1) = self._t0, self.clock()
        self.n, self.cpu, self.wall = self.n + 1, self.cpu + c1 - c0, self.wall + w1 - w0
        if self.n < self.window:
            return
        starved = self.cpu < self.floor * self.wall
        self.n, self.cpu, self.wall = 0, 0.0, 0.0
        if starved:
            log.warning("decode steps got under %.2f cores at %d torch threads: one thread for %d steps",
                        self.floor, self.threads, self.hold)
            torch.set_num_threads(1)
            self.left, self.fallbacks = self.hold, self.fallbacks + 1


def _settle(fut: asyncio.Future, res, err: BaseException | None) -> None:
    if not fut.done():
        fut.set_exception(err) if err is not None else fut.set_result(res)


class _End:
    """The end of a stream's tokens; `error` when its step failed."""

    def __init__(self, error: BaseException | None = None):
        self.error = error


class Stream:
    """The tokens of one sequence, as an async iterator; `close` (idempotent) gives its row back."""

    def __init__(self, batcher: DecodeBatcher, row: _Row):
        self._batcher, self._row, self._closed = batcher, row, False

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> int:
        row = self._row
        item = await row.out.get()
        if isinstance(item, _End):
            self._closed = True  # the model thread let the row go before it sent the end
            if item.error is not None:
                raise item.error
            raise StopAsyncIteration
        row.taken += 1
        if row.sent - row.taken == self._batcher.ahead - 1:  # it was held for its reader: it may run again
            self._batcher._post("wake", row)
        return item

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._row.task is not None:
            self._row.task.cancel()
        self._batcher._post("close", self._row)


class DecodeBatcher:
    def __init__(self, runner, max_batch: int = 32, ahead: int = AHEAD):
        if max_batch < 1 or ahead < 1:
            raise ValueError(f"max_batch={max_batch} and ahead={ahead} must both be at least 1")
        self.runner, self.max_batch, self.ahead = runner, max_batch, ahead
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # whether the thread was started
        self._thread: threading.Thread | None = None
        self._rows: dict[_Row, None] = {}  # the model thread's, in the order they joined
        self.steps = 0  # batched model steps run
        self.rows = 0  # sequence steps in them (rows / steps = mean batch size)
        self.guard = ThreadGuard()

    @property
    def live(self) -> int:
        """Rows the model thread holds (streams opened and not yet ended or closed)."""
        return len(self._rows)

    def figures(self) -> dict:
        return {"batched_steps": self.steps, "mean_batch": self.rows / self.steps if self.steps else 0.0,
                "live_streams": self.live, "one_thread_fallbacks": self.guard.fallbacks}

    # ---- the event loop's side ----------------------------------------------------
    def open(self, cache: CompactCache, logits: Tensor, params: SamplingParams, recall_threshold: float | None = None,
             recall=None) -> Stream:
        """A stream over `cache` (it grows in place) from the prefill's `logits` [V]. `recall` (a
        services.decode.recall.Recall) swaps in merged rows' originals; it needs `recall_threshold`.
        The model thread picks every token, the first (from `logits`, no step) included."""
        row = _Row(cache, TokenPicker(params, self.runner.eos_ids, self.runner.tokenizer), recall_threshold,
                   recall, asyncio.get_running_loop(), asyncio.Queue())
        self._post("open", row, logits)
        return Stream(self, row)

    async def run(self, fn, *args):
        """`fn(*args)` on the model thread, between steps (torch work of the decode path that
        would otherwise run on the event loop: see the module's note on threads)."""
        fut = asyncio.get_running_loop().create_future()
        self._post("job", None, (fn, args, fut))
        return await fut

    def _post(self, kind: str, row: _Row, data=None) -> None:
        self._inbox.put((kind, row, data))
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name="decode-batch", daemon=True)
                    self._thread.start()

    async def _fetch(self, row: _Row, wanted: list) -> None:
        fetched = await row.recall.fetch(wanted)
        self._post("recalled", row, fetched)

    def _start_fetch(self, row: _Row, wanted: list) -> None:
        row.task = asyncio.ensure_future(self._fetch(row, wanted))

    # ---- the model thread -----------------------------------------------------------
    def _loop(self) -> None:
        while True:
            self._take(block=not self._ready())
            batch = self._pick()
            if batch:
                self._step(batch)

    def _ready(self) -> list[_Row]:
        return [r for r in self._rows if not r.waiting and r.sent - r.taken < self.ahead]

    def _take(self, block: bool) -> None:
        """Handle what the event loop posted; with nothing to step, wait for it."""
        if block:
            self._handle(*self._inbox.get())
        while True:
            try:
                self._handle(*self._inbox.get_nowait())
            except queue.Empty:
                return

    def _handle(self, kind: str, row: _Row | None, data) -> None:
        if kind == "open":
            row.token = row.picker.pick(data)  # the first token needs no step
            self._send(row, row.token)
            if row.picker.done:
                self._call(row, row.out.put_nowait, _End())
            else:
                self._rows[row] = None
        elif kind == "job":
            fn, args, fut = data
            try:
                res, err = fn(*args), None
            except Exception as e:  # noqa: BLE001 - the caller gets it
                res, err = None, e
            loop = fut.get_loop()
            try:
                loop.call_soon_threadsafe(_settle, fut, res, err)
            except RuntimeError:  # its event loop is closed
                pass
        elif kind == "close":
            self._rows.pop(row, None)
        elif kind == "recalled" and row in self._rows:
            row.recall.apply(row.cache, data)
            row.waiting = False

    def _pick(self) -> list[_Row]:
        """The ready rows that waited longest, at most max_batch; a row past the context ends alone."""
        batch = []
        for r in sorted(self._ready(), key=lambda r: r.last_step):  # stable: the join order among equals
            if r.cache.seq_len + 1 > self.runner.max_positions:
                self._end(r, InvalidInput(f"sequence of {r.cache.seq_len + 1} tokens exceeds the model's context "
                                          f"of {self.runner.max_positions} tokens"))
            elif len(batch) < self.max_batch:
                batch.append(r)
        return batch

    def _step(self, batch: list[_Row]) -> None:
        try:
            self.guard.before()
            logits = self.runner.decode_batch([r.token for r in batch], [r.cache for r in batch],
                                              [r.threshold for r in batch], [r.stats for r in batch])  # [B, V]
            self.guard.after()
        except Exception as e:  # noqa: BLE001 - every stream of the batch gets the error, the thread goes on
            log.exception("batched decode step of %d streams failed", len(batch))
            for r in batch:
                self._end(r, e)
            return
        self.steps += 1
        self.rows += len(batch)
        for r, row_logits in zip(batch, logits, strict=True):
            r.last_step = self.steps
            r.token = r.picker.pick(row_logits)
            self._send(r, r.token)
            if r.picker.done:
                self._end(r)
                continue
            wanted = r.recall.wanted(r.cache, r.stats) if r.recall is not None else None
            if wanted:
                r.waiting = True
                self._call(r, self._start_fetch, r, wanted)

    def _send(self, row: _Row, token: int) -> None:
        row.sent += 1
        self._call(row, row.out.put_nowait, token)

    def _end(self, row: _Row, error: BaseException | None = None) -> None:
        self._rows.pop(row, None)  # before the reader hears of the end: `live` has counted it out
        self._call(row, row.out.put_nowait, _End(error))

    def _call(self, row: _Row, fn, *args) -> None:
        try:
            row.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the stream's event loop is closed: nobody reads it any more
            self._rows.pop(row, None)
