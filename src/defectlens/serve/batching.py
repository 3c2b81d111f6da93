"""Scoring requests together: one worker thread per model gathers the images of concurrent
requests into one batch, scores it, and hands each request its own predictions.

How long a batch waits for company (never more than `max_wait_s`): for requests still being
read and decoded, and for as many requests as were recently in the service at once. The
second rule is for clients that send their next image when the last answer comes back: with
4 of them, the requests answered together return while the others are scored, and without
it the batches settle at 2 images each, which on PaDiM costs nearly what 4 do. A lone client
never waits (one request was in the service at a time).

Why a thread and not the event loop: scoring is seconds of numpy/onnxruntime work that must
not block the loop serving other requests (and the engines release the GIL while they run).
Why one worker per model: a predictor is not thread-safe, and one batch at a time keeps the
machine's cores for that batch. The queue is bounded: a request that finds it full is refused
at once (HTTP 503) instead of waiting behind work the server cannot finish in time.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from defectlens.prediction import Prediction, Predictor, source_name


class QueueFull(Exception):
    """The model's queue holds `queue_size` requests already."""


@dataclass
class _Job:
    images: list[np.ndarray]
    future: Future = field(default_factory=Future)


_STOP = object()
PEAK_WINDOW = 8  # batches over which the recent number of requests at once is remembered


class Batcher:
    """A model's scoring queue and worker (see the module docstring)."""

    def __init__(
        self,
        predictor: Predictor,
        max_batch: int,
        max_wait_s: float,
        queue_size: int,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        """`on_batch(images, seconds)` hears of every batch scored: how well batching works
        is the first thing to look at when throughput disappoints."""
        self.predictor = predictor
        self.on_batch = on_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._arriving = 0  # requests announced but not yet queued (being read and decoded)
        self._scoring = 0  # requests in the batch being scored
        self._peak = 0  # most requests in the service at once since the last batch began
        self._peaks: deque[int] = deque(maxlen=PEAK_WINDOW)  # that, for recent batches
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="defectlens-batcher", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def depth(self) -> int:
        """Requests waiting (not counting the batch being scored)."""
        return self._queue.qsize()

    def announce(self) -> None:
        """A request is on its way (being read and decoded): a batch waits for it, up to
        `max_wait_s`. With none on its way, a batch is scored at once: a lone request does
        not pay the wait. Every announce needs a `withdraw`, after its `submit` if any."""
        with self._lock:
            self._arriving += 1

    def withdraw(self) -> None:
        with self._lock:
            self._arriving -= 1

    def submit(self, images: list[np.ndarray]) -> Future:
        """Queue one request's decoded images (RGB uint8); the future gets, in order, each
        image's Prediction, or the exception that kept it from being scored. Raises QueueFull
        when the queue is full."""
        job = _Job(images)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull from None
        with self._lock:  # this request is still counted as arriving until its withdraw
            at_once = self._queue.qsize() + self._scoring + max(self._arriving - 1, 0)
            self._peak = max(self._peak, at_once)
        return job.future

    def _expected(self) -> int:
        """Requests a batch may wait for: the most that were recently in the service at once."""
        with self._lock:
            return max(self._peaks, default=1)

    def close(self, timeout: float | None = None) -> None:
        """Finish every queued request, then stop the worker."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        pending: _Job | None = None
        while True:
            job = pending if pending is not None else self._queue.get()
            pending = None
            if job is _STOP:
                return
            jobs, count = [job], len(job.images)
            deadline = time.monotonic() + self.max_wait_s
            expected = self._expected()
            while count < self.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    with self._lock:
                        awaited = self._arriving > 0 or len(jobs) < expected
                    if not awaited or remaining <= 0:
                        break
                    try:  # short polls, so a request that stops arriving ends the wait
                        more = self._queue.get(timeout=min(remaining, 0.001))
                    except queue.Empty:
                        continue
                if more is _STOP or count + len(more.images) > self.max_batch:
                    pending = more  # scored next round (or ends the worker after this batch)
                    break
                jobs.append(more)
                count += len(more.images)
            with self._lock:  # `submit` saw the most at once; a carried-over job may add one
                self._scoring = len(jobs)
                self._peaks.append(max(self._peak, len(jobs)))
                self._peak = 0
            try:
                self._score(jobs)
            except Exception as exc:  # a bug here must fail the requests, not the worker
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
            finally:
                with self._lock:
                    self._scoring = 0

    def _score(self, jobs: list[_Job]) -> None:
        live = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        if not live:
            return
        # Views, so that each entry is its own object: predictions are matched back to their
        # images by position-derived names, and the same array sent twice must not collide.
        images = [image.view() for job in live for image in job.images]
        failed: dict[str, Exception] = {}
        start = time.perf_counter()
        try:
            scored = {
                p.source: p
                for p in self.predictor.iter_predict(
                    images, on_error=lambda name, exc: failed.__setitem__(name, exc)
                )
            }
        except Exception as exc:  # every waiting request hears of it; the worker goes on
            for job in live:
                job.future.set_exception(exc)
            return
        if self.on_batch is not None:
            self.on_batch(len(images), time.perf_counter() - start)
        # An image the model could not score (a non-finite map) fails alone, not its batch.
        results: list[Prediction | Exception] = []
        for i in range(len(images)):
            name = source_name(images[i], i)
            results.append(scored[name] if name in scored else failed[name])
        start = 0
        for job in live:
            job.future.set_result(results[start : start + len(job.images)])
            start += len(job.images)
