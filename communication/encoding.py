"""What each destination of a direct collective receives: encoded parts, the copy this rank
keeps, and the error feedback of a lossy reduce-scatter.

- One tensor for every rank (an all-gather's shard) is encoded once; with a lossy codec the
  rank keeps the *decoded* copy, so every rank's result holds the same rows.
- Distinct parts (a reduce-scatter's rows) with ``feedback``: part d goes out as
  ``encode(part_d + feedback_d)`` and ``feedback_d`` becomes what the codec lost, to be sent
  with the next step's part (error feedback, as in 1-bit Adam and ZeRO++'s qgZ). The part a
  rank keeps is never encoded, so its feedback stays 0.
- Otherwise nothing is encoded here: the push encodes each part itself.
"""

from __future__ import annotations

import torch

from communication.codec import RawCodec


def encode_parts(parts: list[torch.Tensor], *, rank: int, dests: list[int], codec,
                 feedback: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, dict[int, torch.Tensor | None]]:
    """(the part this rank keeps, {dest: its encoded bytes, or None to encode at send})."""
    wires: dict[int, torch.Tensor | None] = {d: None for d in dests}
    own = parts[rank]
    if isinstance(codec, RawCodec) or not own.numel():
        return own, wires
    if len(parts) > 1 and all(p is parts[0] for p in parts):
        wire = codec.encode(own)
        return codec.decode(wire, own.numel(), own.dtype), {d: wire for d in dests}
    if feedback is not None:
        n = own.numel()
        for d in dests:
            sent = parts[d] + feedback[d * n:(d + 1) * n]
            wires[d] = codec.encode(sent)
            feedback[d * n:(d + 1) * n] = sent - codec.decode(wires[d], n, sent.dtype)
    return own, wires
