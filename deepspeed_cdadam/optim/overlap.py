"""Exchanges started during backward: each bucket's as soon as backward has produced its gradients.

As PyTorch DDP's buckets: the optimizer's parameters fill buckets of at most ``bucket_cap_mb`` in
forward order (``CompressedOptimizer.buckets``), so backward completes the last bucket first. A
gradient hook (``register_post_accumulate_grad_hook``) on every trainable parameter counts the
bucket's arrivals; a complete bucket is handed to one communication thread, which copies its
gradients into the bucket's flat buffer and runs both collectives of its exchange
(``MarkovExchange.prepare``) while backward goes on with earlier layers (torch's operators and
the collectives release the GIL). The exchanges run on a communicator of their own
(``own_communicator``), so the training loop may use the world group meanwhile.

Every rank must issue the same collectives in the same order: buckets are started in descending
index order only (bucket k waits for k + 1, also when its own gradients came first), and the ones
still waiting when ``step()`` begins are started there, in that order.

Nothing in the optimizer state changes before ``step()``: a prepared exchange keeps its messages and
applies its state changes at ``commit`` (``exchange.PreparedExchange``). So ``step()`` stays what it
was: the control message (step kind, non-finite flag) is agreed after the exchanges instead of
before, and a skipped step drops the prepared exchanges with the state untouched. The result is the
non-overlapped step's bit for bit (same messages, same sums in the same order;
``tests/optim/test_overlap.py``).

A gradient changed after its bucket's messages left (clipping or unscaling between backward and
``step()``, or a second backward accumulating into it) makes the prepared exchanges stale: any rank
that sees one says so in the control message, and every rank drops its prepared exchanges and runs
the step's exchanges again from the current gradients (correct, at twice the messages: for gradient
accumulation, wrap the micro-batches before the last in ``optimizer.no_overlap()``, as DDP's
``no_sync()``). A gradient set without backward (``p.grad = ...``) fires no hook: its bucket starts
in ``step()``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from ..exchange import PreparedExchange
from ..types import STEP

if TYPE_CHECKING:
    from .base import Bucket, CompressedOptimizer


class BackwardOverlap:
    """The gradient hooks and the communication thread of one optimizer (``overlap=True``)."""

    def __init__(self, optimizer: CompressedOptimizer) -> None:
        self.optimizer = optimizer
        self._lock = threading.Lock()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deepspeed-cdadam-overlap")
        self._paused = 0
        #: Buckets whose exchange started during backward (before ``step()``), over all steps.
        self.started_during_backward = 0
        #: Seconds, over all steps: the communication thread's exchanges (``prepare_s``) and the part of
        #: them ``step()`` waited for (``exposed_s``: started late, or not finished when step() began).
        self.prepare_s = 0.0
        self.exposed_s = 0.0
        #: CPU seconds the communication thread spent in those exchanges (``time.thread_time``: encoding,
        #: decoding, copies; not the wait for the network). Only ``prepare_s - prepare_cpu_s`` can hide
        #: behind backward for free; the CPU part needs a core (or a GPU stream) backward is not using.
        self.prepare_cpu_s = 0.0
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._on_gradient)
            for group in optimizer.param_groups
            for p in group["params"]
            if p.requires_grad
        ]
        self._new_round()

    def _new_round(self) -> None:
        """Forget the last step's buckets: the next backward starts a new round."""
        self._buckets: list[Bucket] | None = None
        self._bucket_of: dict[int, int] = {}
        self._arrived: dict[int, int] = {}  # bucket index -> parameters whose gradient arrived
        self._seen: dict[int, tuple[torch.Tensor, int]] = {}  # id(param) -> (its grad, the grad's version)
        self._started: dict[int, Future] = {}
        self._next = -1  # the bucket to start next (descending)
        self._stale = False

    def _round_buckets(self) -> list[Bucket]:
        if self._buckets is None:
            self._buckets = self.optimizer.buckets()
            self._bucket_of = {id(p): b.index for b in self._buckets for p in b.params}
            self._next = len(self._buckets) - 1
        return self._buckets

    @contextlib.contextmanager
    def paused(self):
        """No exchange starts during backward inside this block (gradient accumulation's micro-batches)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def _on_gradient(self, p: torch.Tensor) -> None:
        if self._paused or self.optimizer.ignore_steps:
            return
        with self._lock:
            buckets = self._round_buckets()
            index = self._bucket_of.get(id(p))
            if index is None:  # a parameter added to the optimizer since the round began: step() decides
                return
            if id(p) in self._seen or index in self._started:  # a second backward into this gradient
                self._stale = True
                return
            self._seen[id(p)] = (p.grad, p.grad._version)
            self._arrived[index] = self._arrived.get(index, 0) + 1
            while self._next >= 0 and self._arrived.get(self._next, 0) == len(buckets[self._next].params):
                self._start(buckets[self._next])
                self.started_during_backward += 1
                self._next -= 1

    def _start(self, bucket: Bucket) -> None:
        self._started[bucket.index] = self._thread.submit(self._prepare, bucket)

    @torch.no_grad()
    def _prepare(self, bucket: Bucket) -> PreparedExchange:
        """On the communication thread: the bucket's gradients into its flat buffer, then its collectives."""
        opt, start, cpu = self.optimizer, time.perf_counter(), time.thread_time()
        grad = opt.bucket_grad(bucket)
        state = opt.ensure_bucket_state(bucket, grad)
        exchange = opt._exchange_for(bucket.index, grad.numel())
        prepared = exchange.prepare(grad, state, step=state[STEP] + 1, group=bucket.index)
        self.prepare_s += time.perf_counter() - start
        self.prepare_cpu_s += time.thread_time() - cpu
        return prepared

    def finish(self, buckets: list[Bucket]) -> tuple[dict[int, PreparedExchange], bool]:
        """At ``step()``: start the buckets still waiting (descending order), wait for every bucket's
        collectives, and say whether any gradient changed after its bucket was started (stale here).
        Returns the prepared exchanges by bucket index (the round is then over)."""
        waited = time.perf_counter()
        with self._lock:
            round_buckets = self._round_buckets()
            same = [(b.key, [id(p) for p in b.params]) for b in round_buckets] == [
                (b.key, [id(p) for p in b.params]) for b in buckets
            ]
            if not same:  # the parameters changed since backward began: step() checks the layout
                self._stale = True
            while self._next >= 0:
                self._start(round_buckets[self._next])
                self._next -= 1
            started, stale, seen = self._started, self._stale, self._seen
            self._new_round()
        prepared = {index: future.result() for index, future in started.items()}  # re-raises a thread's error
        self.exposed_s += time.perf_counter() - waited
        for b in buckets:
            for p in b.params:
                if id(p) in seen:
                    grad, version = seen[id(p)]
                    if p.grad is not grad or grad._version != version:
                        stale = True
        return prepared, stale

    def drop_round(self) -> None:
        """Forget the round (a step that does not run): wait for its collectives, then drop them."""
        with self._lock:
            started = self._started
            self._new_round()
        for future in started.values():
            with contextlib.suppress(Exception):
                future.result()

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._thread.shutdown(wait=True)


def own_communicator(transport: Any) -> Any:
    """A communicator of ``transport``'s ranks for the communication thread (``Transport.split`` into one
    group: ``dist.new_group`` / ``MPI.Comm.Split``, a collective call every rank makes when building the
    optimizer). The training loop's collectives on the world group (a loss all-reduced for logging
    between backward and ``step()``) then never interleave with the exchanges on one communicator."""
    return transport.split([list(range(transport.world_size))])


def overlap_supported(optimizer: Any) -> None:
    """Raise a ValueError naming what stops ``overlap`` for this optimizer's parameters (CPU only for now)."""
    devices = {p.device.type for group in optimizer.param_groups for p in group["params"] if p.requires_grad}
    if devices - {"cpu"}:
        raise ValueError(
            f"overlap=True runs on CPU parameters only for now (these are on {sorted(devices)}): the CUDA "
            "streams of an exchange started during backward are not written yet. Set overlap to false."
        )
