"""The service's HTTP bodies: sessions, operations by kind, their records and results.

The client sends them, the coordinator validates them (and stores them in SQLite), workers
read and answer them. An operation is ``(session, seq)``: seq 0 is the session's creation,
then one per call in submission order, so a retried POST never runs anything twice."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from zerop2p.types import (
    MAX_DATUMS,
    MAX_SAMPLES,
    AdamParams,
    Datum,
    DPParams,
    ModelInput,
    SamplingParams,
)

MAX_SAMPLED_TOKENS = 2**18  # tokens one sample request may produce (~7 MB of result)
SESSION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
Status = Literal["queued", "running", "done", "failed", "cancelled"]
FINISHED = ("done", "failed", "cancelled")


class _Body(BaseModel):
    # strict: ``true`` is not a seq, ``"3"`` is not a rank (the coordinator's fields are too)
    model_config = ConfigDict(extra="forbid", strict=True)


class SessionRequest(_Body):
    """A training (or sampling) session: which model, LoRA or full, and where it starts from."""

    session_id: str = Field(pattern=SESSION_ID_PATTERN)
    base_model: str | None = Field(None, min_length=1, max_length=4096)  # or from_state's
    lora_rank: int | None = Field(None, ge=1, le=4096)  # None: full fine-tuning
    lora_alpha: float | None = Field(None, gt=0)
    seed: int = Field(0, ge=0, le=2**53)
    from_state: str | None = Field(None, max_length=4096)
    with_optimizer: bool = False

    def source_problem(self) -> str | None:
        """Why the model's source is ambiguous (None: it is not). A rule between fields, so
        the coordinator answers it as a conflict (409), not as a schema violation."""
        if (self.base_model is None) == (self.from_state is None):
            return "give exactly one of base_model and from_state"
        if self.from_state is not None and self.lora_rank is not None:
            return "from_state carries its own LoRA configuration; drop lora_rank"
        return None


class ForwardBackwardBody(_Body):
    data: list[Datum] = Field(min_length=1, max_length=MAX_DATUMS)
    loss_fn: Literal["cross_entropy"] = "cross_entropy"


class OptimStepBody(_Body):
    adam_params: AdamParams
    dp: DPParams | None = None


class SaveBody(_Body):
    name: str = Field(pattern=NAME_PATTERN)


class LoadBody(_Body):
    path: str = Field(min_length=1, max_length=4096)
    with_optimizer: bool = False


class SampleBody(_Body):
    prompt: ModelInput
    num_samples: int = Field(1, ge=1, le=MAX_SAMPLES)
    sampling_params: SamplingParams = Field(default_factory=SamplingParams)

    @model_validator(mode="after")
    def _bounded(self) -> SampleBody:
        total = self.num_samples * self.sampling_params.max_tokens
        if total > MAX_SAMPLED_TOKENS:  # the answer must fit the result's body cap
            raise ValueError(f"num_samples x max_tokens = {total} exceeds {MAX_SAMPLED_TOKENS}")
        return self


class LogprobsBody(_Body):
    prompt: ModelInput


BODIES: dict[str, type[_Body]] = {
    "create": SessionRequest, "forward_backward": ForwardBackwardBody,
    "forward": ForwardBackwardBody,
    "optim_step": OptimStepBody, "save_state": SaveBody, "save_weights_for_sampler": SaveBody,
    "load_state": LoadBody, "sample": SampleBody, "compute_logprobs": LogprobsBody,
}
Kind = Literal["forward_backward", "forward", "optim_step", "save_state", "save_weights_for_sampler",
               "load_state", "sample", "compute_logprobs"]


class OperationRequest(_Body):
    """One call, numbered by the client: seq = the session's last + 1 (or a retry of one)."""

    seq: int = Field(ge=1, le=2**53)
    kind: Kind
    body: dict[str, Any]


class ModelInfo(_Body):
    """What the workers report once a session's model is built: the coordinator validates
    later bodies against it."""

    vocab_size: int
    max_positions: int
    trainable_params: int
    total_params: int
    lora: bool


class OperationRecord(_Body):
    session_id: str
    seq: int
    id: int  # global order over all sessions: the order workers run operations in
    kind: str
    status: Status
    body: dict[str, Any] | None = None  # for workers (GET /service/next)
    result: dict[str, Any] | None = None
    error: str | None = None


class SessionRecord(_Body):
    session_id: str
    config: SessionRequest
    model: ModelInfo | None
    last_seq: int
    base_seq: int | None  # the newest state operations are replayed from after a lost worker
    base_path: str | None
    created_at: float


class NextOperation(_Body):
    """A worker's next operation, with its session (so a re-formed group can rebuild it)."""

    operation: OperationRecord | None
    session: SessionRecord | None = None
    noise_salt: str | None = None  # seeds the session's DP noise (with the seq); workers only


class ResultRequest(_Body):
    worker_id: str = Field(max_length=128)
    generation: int = Field(ge=0, le=2**53)
    result: dict[str, Any] | None = None
    error: str | None = None


class BaseRequest(_Body):
    """A clean state of a session (no gradient pending) covering operations up to ``seq``."""

    worker_id: str = Field(max_length=128)
    generation: int = Field(ge=0, le=2**53)
    seq: int = Field(ge=0, le=2**53)
    path: str = Field(min_length=1, max_length=4096)


class ResumePoint(_Body):
    """Where a (re-)formed serving group starts reading operations: after ``after``."""

    after: int
