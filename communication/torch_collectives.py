"""Collectives over torch.distributed (gloo on CPU, NCCL on CUDA): the fast-fabric path and the
peer every benchmark is compared against.

Each instance owns its own process group built straight from a TCPStore (never the global
default group), so several generations can live in one process one after another. Ops are
issued in call order under a lock; torch.distributed matches them across ranks by that order,
so every rank must issue the same collectives in the same order (the engine does). A shift is a
send to rank+1 and a receive from rank-1 on the same group: even ranks send first, odd ranks
receive first, so blocking point-to-point backends (NCCL) cannot deadlock around the ring.
"""

from __future__ import annotations

import datetime
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist

from communication.collectives import CollectiveError, Key, completed
from communication.liveness import LivenessMesh

log = logging.getLogger(__name__)

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _parse_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"store_addr must be 'host:port', got {addr!r}")
    return host, int(port)


class TorchCollectives:
    """The Collectives protocol on a private torch.distributed process group."""

    def __init__(self, *, rank: int, world_size: int, store_addr: str, backend: str = "gloo",
                 timeout: float = 60.0, device: torch.device | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        self.timeout = timeout
        self.device = device
        self._lock = threading.Lock()
        self._waiter = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"torch-coll-r{rank}")
        self._closed = False
        self._pg = None
        self._mesh: LivenessMesh | None = None
        if world_size == 1:
            return
        host, port = _parse_addr(store_addr)
        td = datetime.timedelta(seconds=timeout)
        self._store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=td)
        # A peer that dies is named by the liveness mesh, not guessed from a gloo message.
        self._mesh = LivenessMesh(rank=rank, world_size=world_size, store=self._store,
                                  host=host, timeout=timeout)
        prefix = dist.PrefixStore(f"zerop2p/{backend}", self._store)
        if backend == "gloo":
            self._pg = dist.ProcessGroupGloo(prefix, rank, world_size, td)
        elif backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = td
            self._pg = dist.ProcessGroupNCCL(prefix, rank, world_size, opts)
        else:
            raise ValueError(f"unknown backend {backend!r}; expected 'gloo' or 'nccl'")
        log.info("rank %d: %s process group of %d ready via %s", rank, backend, world_size,
                 store_addr)

    # -- helpers -------------------------------------------------------------------------

    def _wire(self, t: torch.Tensor) -> torch.Tensor:
        """The tensor as the backend wants it: contiguous, on CPU for gloo, on CUDA for NCCL."""
        if self.backend == "gloo" and t.device.type != "cpu":
            t = t.cpu()
        elif self.backend == "nccl" and t.device.type != "cuda":
            t = t.to(self.device or torch.device("cuda"))
        return t.contiguous()

    def _launch(self, op: str, key: Key, start: Callable[[], tuple[object, Callable[[], object]]]
                ) -> Future:
        """Issue one op under the lock; resolve a concurrent future from its torch future."""
        fut: Future = Future()
        if self._closed:
            fut.set_exception(CollectiveError(f"{op} {key}: collectives closed", rank=self.rank))
            return fut
        try:
            with self._lock:
                work, finish = start()
        except Exception as exc:  # gloo can refuse at once (a peer already gone): same contract
            fut.set_exception(self._error(op, key, exc))
            return fut

        def wait() -> None:
            # Not every gloo op implements Work.get_future, so one FIFO thread waits instead.
            try:
                work.wait()
                fut.set_result(finish())
            except BaseException as exc:  # noqa: BLE001 - every failure becomes a CollectiveError
                fut.set_exception(self._error(op, key, exc))

        self._waiter.submit(wait)
        return fut

    def _error(self, op: str, key: Key, exc: BaseException) -> CollectiveError:
        lost = self._mesh.wait_lost(min(2.0, self.timeout)) if self._mesh else None
        if lost is not None:
            rank, address = lost
            return CollectiveError(
                f"{op} {key} on rank {self.rank}: peer rank {rank} at {address} is gone ({exc})",
                rank=rank, address=address)
        return CollectiveError(f"{op} {key} on rank {self.rank} failed: {exc}")

    # -- the protocol ----------------------------------------------------------------------

    def all_gather(self, key: Key, shard: torch.Tensor) -> Future[torch.Tensor]:
        """Concatenate every rank's equal-length 1-D shard in rank order."""
        if self.world_size == 1:
            return completed(shard.detach().clone())
        src = self._wire(shard.detach().reshape(-1))
        # Gathering is a byte copy: move bytes so every dtype works on every backend.
        src_bytes = src.view(torch.uint8)
        out = torch.empty(src_bytes.numel() * self.world_size, dtype=torch.uint8,
                          device=src.device)

        def start():
            work = self._pg._allgather_base(out, src_bytes)
            return work, lambda: out.view(shard.dtype).to(shard.device)

        return self._launch("all_gather", key, start)

    def reduce_scatter(self, key: Key, full: torch.Tensor, *,
                       feedback: torch.Tensor | None = None) -> Future[torch.Tensor]:
        """Rank r receives the sum over ranks of full[r*S:(r+1)*S]."""
        n = full.numel()
        if n % self.world_size:
            raise ValueError(f"reduce_scatter {key}: length {n} is not a multiple of world size "
                             f"{self.world_size}")
        if self.world_size == 1:
            return completed(full.detach().reshape(-1).clone())
        src = self._wire(full.detach().reshape(-1))
        if src.dtype in _LOW_PRECISION:
            src = src.float()
        out = torch.empty(n // self.world_size, dtype=src.dtype, device=src.device)

        def start():
            opts = dist.ReduceScatterOptions()
            opts.reduceOp = dist.ReduceOp.SUM
            work = self._pg._reduce_scatter_base(out, src, opts)
            return work, lambda: out.to(device=full.device, dtype=full.dtype)

        return self._launch("reduce_scatter", key, start)

    def all_reduce(self, key: Key, value: torch.Tensor) -> Future[torch.Tensor]:
        """Every rank receives the element-wise sum of all ranks' value."""
        if self.world_size == 1:
            return completed(value.detach().clone())
        buf = self._wire(value.detach())
        buf = buf.float() if buf.dtype in _LOW_PRECISION else buf.clone()

        def start():
            opts = dist.AllreduceOptions()
            opts.reduceOp = dist.ReduceOp.SUM
            work = self._pg.allreduce([buf], opts)
            return work, lambda: buf.to(device=value.device, dtype=value.dtype)

        return self._launch("all_reduce", key, start)

    def barrier(self, key: Key) -> Future[None]:
        """Complete once every rank has entered."""
        if self.world_size == 1:
            return completed(None)
        token = torch.zeros(1, device=self.device if self.backend == "nccl" else "cpu")

        def start():
            return self._pg.allreduce([token]), lambda: None

        return self._launch("barrier", key, start)

    def shift(self, key: Key, tensor: torch.Tensor) -> Future[torch.Tensor]:
        """Send tensor to rank+1, receive rank-1's (same shape and dtype on every rank)."""
        if self.world_size == 1:
            return completed(tensor.detach().clone())
        src = self._wire(tensor.detach())
        out = torch.empty_like(src)
        nxt, prv = (self.rank + 1) % self.world_size, (self.rank - 1) % self.world_size

        def start():
            send = lambda: self._pg.send([src], nxt, 0)  # noqa: E731
            recv = lambda: self._pg.recv([out], prv, 0)  # noqa: E731
            first, second = (send, recv) if self.rank % 2 == 0 else (recv, send)
            works = [first(), second()]
            return _AllWork(works), lambda: out.to(tensor.device)

        return self._launch("shift", key, start)

    def close(self) -> None:
        """Tear down the process group, the liveness mesh and the store connection."""
        if self._closed:
            return
        self._closed = True
        self._waiter.shutdown(wait=True)
        if self._pg is not None:
            try:
                self._pg.shutdown() if hasattr(self._pg, "shutdown") else None
            except Exception as exc:  # noqa: BLE001 - a dead peer may make shutdown complain
                log.debug("rank %d: process group shutdown: %s", self.rank, exc)
            self._pg = None
        if self._mesh is not None:
            self._mesh.close()


class _AllWork:
    """Several torch.distributed works waited on as one."""

    def __init__(self, works: list):
        self._works = works

    def wait(self) -> None:
        for work in self._works:
            work.wait()
