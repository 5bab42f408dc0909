"""Continuous batching of decode steps: one model thread steps every live stream of a replica together.

Each stream runs `ModelRunner.generate` (sampling, stop strings, EOS) in a thread of its own
with `step=batcher.step`: the call queues (token, cache) and blocks until its logits are
ready. The model thread takes what is queued, waits a moment (`gather_s`) for the other live
streams' steps to arrive, and runs them as one `ModelRunner.decode_batch`: projections and
MLPs once over all rows, attention per stream over its own ragged cache. Streams join and
leave between steps; a stream that is cancelled simply stops queuing.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future

from torch import Tensor

from headwise.errors import InvalidInput

log = logging.getLogger("headwise.decode")


class DecodeBatcher:
    def __init__(self, runner, max_batch: int = 32, gather_s: float = 0.003):
        self.runner, self.max_batch, self.gather_s = runner, max_batch, gather_s
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self.live = 0  # streams that will queue steps (joined and not yet left)
        self.steps = 0  # batched model steps run
        self.rows = 0  # sequence steps in them (rows / steps = mean batch size)
        self._thread = threading.Thread(target=self._loop, name="decode-batch", daemon=True)
        self._thread.start()

    # ---- streams ------------------------------------------------------------------
    def join(self) -> None:
        with self._lock:
            self.live += 1

    def leave(self) -> None:
        with self._lock:
            self.live -= 1

    def step(self, token: int, cache, recall_threshold: float | None = None, stats=None) -> Tensor:
        """`ModelRunner.decode_step`'s contract, run in a batch; called from a stream's thread."""
        if cache.seq_len + 1 > self.runner.max_positions:  # checked here so one stream cannot fail a batch
            raise InvalidInput(f"sequence of {cache.seq_len + 1} tokens exceeds the model's context of "
                               f"{self.runner.max_positions} tokens")
        fut: Future = Future()
        self._q.put((token, cache, recall_threshold, stats, fut))
        return fut.result()

    def figures(self) -> dict:
        return {"batched_steps": self.steps, "mean_batch": self.rows / self.steps if self.steps else 0.0}

    # ---- the model thread -----------------------------------------------------------
    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            batch = [item]
            deadline = time.monotonic() + self.gather_s
            while len(batch) < min(self.max_batch, max(1, self.live)):
                left = deadline - time.monotonic()
                try:
                    nxt = self._q.get(timeout=left) if left > 0 else self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._q.put(None)
                    break
                batch.append(nxt)
            self._run(batch)

    def _run(self, batch: list[tuple]) -> None:
        try:
            logits = self.runner.decode_batch([b[0] for b in batch], [b[1] for b in batch], [b[2] for b in batch],
                                              [b[3] for b in batch])
        except BaseException as e:  # noqa: BLE001 - every waiting stream gets the error, the thread goes on
            log.exception("batched decode step of %d streams failed", len(batch))
            for b in batch:
                b[4].set_exception(e)
            return
        self.steps += 1
        self.rows += len(batch)
        for b, row in zip(batch, logits, strict=True):
            b[4].set_result(row)
