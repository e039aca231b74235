"""One sharded unit: its owned slices, its gather buffer, and the state that says which exist.

The unit keeps one persistent *full* buffer in the compute dtype whose storage is resized to 0
when the unit is SHARDED. Every parameter of the unit is a view into that buffer, set once at
sharding time, so tensors autograd saved during forward (views of parameters) become valid again
when the buffer is refilled before backward, and the memory is really released in between.

With ``replicate_frozen`` the frozen region (a LoRA base) lives whole on every rank in its own
buffer that is never freed, and the all-gather carries the trainable region only; a unit with
nothing left to gather is always UNSHARDED. ``residual`` is the error feedback of a lossy
gradient codec (what the wire lost last time, sent with the next gradient); ``local_grad`` the
gradient accumulated without reduce-scattering (``grad_sync="step"``).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from concurrent.futures import Future

import torch
from torch import nn

from communication.collectives import Collectives, Key, result
from worker.engine.sharding import FlatLayout, owned_range, region_slice

log = logging.getLogger(__name__)


class UnitState(enum.Enum):
    """Which tensors hold memory: SHARDED only the owned slices; UNSHARDED also the full buffer."""

    SHARDED = "sharded"  # full buffer has no storage; only owned slices live
    GATHERING = "gathering"  # an all-gather is in flight; the full buffer is still empty
    UNSHARDED = "unsharded"  # full buffer holds every parameter; module can run


class ShardedUnit:
    """Owned fp32 master slice (trainable), owned frozen slice, and the gather/free machinery.

    ``trainable_shard`` and ``frozen_shard`` are the per-rank element counts S of the two
    padded regions (see the note in sharding.py); ``reduced`` says whether this backward has
    already reduce-scattered the unit's gradient."""

    def __init__(self, layout: FlatLayout, module: nn.Module, params: dict[str, nn.Parameter], *,
                 rank: int, world_size: int, compute_dtype: torch.dtype, device: torch.device,
                 replicate_frozen: bool = False, error_feedback: bool = False):
        self.layout = layout
        self.index = layout.unit
        self.is_root = layout.unit == 0  # wraps the whole model: gathered through to backward
        self.module = module
        self.rank = rank
        self.world_size = world_size
        self.compute_dtype = compute_dtype
        self.device = device
        self.trainable_shard, self.frozen_shard = layout.shard_sizes(world_size)
        self.params = [params[s.name] for s in layout.slots]
        self.trainable_params = [p for s, p in zip(layout.slots, self.params) if s.trainable]
        self.grads_seen = 0  # trainable parameters whose grad arrived in this backward
        self.reduced = False
        self.replicate_frozen = replicate_frozen and self.frozen_shard > 0
        # Elements of each rank's row in the all-gather: trainable, then frozen unless replicated.
        self.gathered_frozen = 0 if self.replicate_frozen else self.frozen_shard
        self.row = self.trainable_shard + self.gathered_frozen

        a, b = owned_range(self.trainable_shard, rank)
        own = region_slice(layout, params, trainable=True, start=a, stop=b, dtype=torch.float32)
        self.master = nn.Parameter(own.to(device), requires_grad=self.trainable_shard > 0)
        self.residual = (torch.zeros(self.trainable_shard * world_size, dtype=torch.float32)
                         if error_feedback and self.trains else None)
        self.local_grad: torch.Tensor | None = None
        # set by a measuring backward (per_datum.py): takes each local gradient instead of it
        # being kept, so a datum's gradient norm is read and the gradient dropped at once
        self.grad_sink: Callable[[torch.Tensor], None] | None = None
        fa, fb = owned_range(self.frozen_shard, rank)
        n_train = self.trainable_shard * world_size
        self.full = torch.empty(n_train + self.gathered_frozen * world_size, dtype=compute_dtype,
                                device=device)
        if self.replicate_frozen:
            whole = region_slice(layout, params, trainable=False, start=0,
                                 stop=self.frozen_shard * world_size, dtype=torch.float32)
            self.frozen_full = whole.to(device=device, dtype=compute_dtype)
            self.frozen = self.frozen_full[fa:fb]  # the owned slice, as a checkpoint saves it
        else:
            self.frozen_full = self.full[n_train:]
            self.frozen = region_slice(layout, params, trainable=False, start=fa, stop=fb,
                                       dtype=torch.float32).to(device=device, dtype=compute_dtype)
        self._nbytes = self.full.untyped_storage().nbytes()
        self.full_bytes = self._nbytes
        for slot, p in zip(layout.slots, self.params):
            region = self.full if slot.trainable else self.frozen_full
            p.data = region[slot.offset : slot.offset + slot.numel].view(slot.shape)
        self.state = UnitState.UNSHARDED
        self.free()
        self._gather: Future | None = None
        self._gather_key: Key | None = None

    @property
    def trains(self) -> bool:
        """Whether the unit has trainable elements (a gradient to reduce, a slice to step)."""
        return self.trainable_shard > 0

    @property
    def owned_real(self) -> int:
        """Elements of the owned trainable slice that are parameters; the rest (the last
        ranks' tail) is padding, zero and never to be touched."""
        return max(0, min(self.trainable_shard,
                          self.layout.trainable_numel - self.rank * self.trainable_shard))

    # --- parameters -------------------------------------------------------------------------
    def local_shard(self) -> torch.Tensor:
        """What this rank contributes to an all-gather: its trainable then (unless replicated)
        frozen slice."""
        own = self.master.detach().to(self.compute_dtype)
        return torch.cat([own, self.frozen]) if self.gathered_frozen else own

    @property
    def needs_gather(self) -> bool:
        """False when every element is resident anyway (frozen and replicated)."""
        return self.row > 0

    def begin_gather(self, collectives: Collectives, key: Key) -> None:
        """Start the all-gather unless the unit is already gathering or unsharded."""
        if self.state is not UnitState.SHARDED:
            return
        self._gather = collectives.all_gather(key, self.local_shard())
        self._gather_key = key
        self.state = UnitState.GATHERING

    def wait_gathered(self, timeout: float) -> None:
        """Block until the full parameters are in place (gathering first if needed)."""
        if self.state is UnitState.UNSHARDED:
            return
        if self.state is UnitState.SHARDED:
            raise RuntimeError(f"unit {self.index}: wait_gathered before begin_gather")
        gathered = result(self._gather, key=self._gather_key, rank=self.rank, timeout=timeout)
        self._gather = None
        row = self.row
        if gathered.numel() != self.world_size * row:
            raise RuntimeError(
                f"unit {self.index} key {self._gather_key}: all-gather returned "
                f"{gathered.numel()} elements, expected {self.world_size * row}"
            )
        self.full.untyped_storage().resize_(self._nbytes)
        rows = gathered.view(self.world_size, row)
        n_train = self.trainable_shard * self.world_size
        # .data: refill storage without bumping the version counter of saved views.
        full = self.full.data
        full[:n_train].view(self.world_size, self.trainable_shard).copy_(
            rows[:, : self.trainable_shard])
        if self.gathered_frozen:
            full[n_train:].view(self.world_size, self.gathered_frozen).copy_(
                rows[:, self.trainable_shard :])
        self.state = UnitState.UNSHARDED

    def free(self) -> None:
        """Release the full buffer's memory; owned slices (and a replicated frozen region)
        stay. A unit with nothing to gather stays UNSHARDED."""
        if self.state is UnitState.GATHERING:
            raise RuntimeError(f"unit {self.index}: free while a gather is in flight")
        if not self.needs_gather:
            self.state = UnitState.UNSHARDED
            return
        self.full.untyped_storage().resize_(0)
        self.state = UnitState.SHARDED

    # --- gradients --------------------------------------------------------------------------
    def begin_backward(self) -> None:
        """A new backward: no grads seen, nothing reduced yet."""
        self.grads_seen = 0
        self.reduced = False

    def keep_local_grad(self, flat: torch.Tensor) -> None:
        """Accumulate a micro-batch's full gradient here instead of reduce-scattering it (or
        hand it to ``grad_sink`` and keep nothing)."""
        if self.grad_sink is not None:
            self.grad_sink(flat)
        elif self.local_grad is None:
            self.local_grad = flat
        else:
            self.local_grad.add_(flat)

    def take_local_grad(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat`` plus what was accumulated locally since the last reduce-scatter."""
        kept, self.local_grad = self.local_grad, None
        return flat if kept is None else kept.add_(flat)

    def take_flat_grad(self) -> torch.Tensor:
        """The unit's full padded fp32 gradient (zeros where none arrived); clears ``.grad``."""
        flat = torch.zeros(self.trainable_shard * self.world_size, dtype=torch.float32,
                           device=self.device)
        for slot, p in zip(self.layout.slots, self.params):
            if not slot.trainable:
                continue
            if p.grad is not None:
                flat[slot.offset : slot.offset + slot.numel].copy_(p.grad.reshape(-1))
                p.grad = None
        return flat

    def add_owned_grad(self, owned: torch.Tensor, scale: float) -> None:
        """Accumulate a reduced owned gradient slice (times ``scale``) into ``master.grad``."""
        if owned.numel() != self.trainable_shard:
            raise RuntimeError(
                f"unit {self.index}: reduce-scatter returned {owned.numel()} elements, "
                f"expected {self.trainable_shard}"
            )
        owned = owned.to(device=self.device, dtype=torch.float32) * scale
        if self.master.grad is None:
            self.master.grad = owned
        else:
            self.master.grad.add_(owned)
