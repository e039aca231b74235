"""The service's public types: Tinker's names and fields wherever a concept is shared, so a
loop written against Tinker ports with an import change. One definition: the client builds
requests with them, the coordinator validates bodies with them, workers answer in them.

Pure pydantic (no torch): a laptop running the client needs neither torch nor the worker."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_DATUMS = 4096  # rows in one forward_backward
MAX_TOKENS_PER_DATUM = 32_768
MAX_SAMPLES = 256
LOSS_FNS = ("cross_entropy",)
NON_FINITE = ("nan", "inf", "-inf")


class _Model(BaseModel):
    """A request's part: strict (``true`` is not a token id) and closed."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class _Result(BaseModel):
    """A worker's answer: lax, so a diverged loss sent as ``"nan"`` (JSON has no NaN) reads
    back as the float, and open to fields a newer worker adds."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class TensorData(_Model):
    """A flat list of numbers with its dtype and shape (Tinker's TensorData, without torch)."""

    data: list[float] | list[int]
    dtype: Literal["int64", "float32"] = "float32"
    shape: list[int] | None = None

    @field_validator("data", mode="before")
    @classmethod
    def _non_finite(cls, value: Any) -> Any:
        """Workers send NaN and infinities as strings (JSON has none): read them back."""
        if isinstance(value, list) and any(isinstance(v, str) for v in value):
            return [float(v) if v in NON_FINITE else v for v in value]
        return value

    def tolist(self) -> list:
        return list(self.data)

    @classmethod
    def coerce(cls, value: Any) -> TensorData:
        """A TensorData from itself, a list, a numpy array or a torch tensor (its ``tolist``)."""
        if isinstance(value, TensorData):
            return value
        if isinstance(value, dict):
            return cls.model_validate(value)
        if hasattr(value, "tolist"):
            value = value.tolist()
        values = list(value)
        dtype = "int64" if values and all(isinstance(v, int) and not isinstance(v, bool)
                                          for v in values) else "float32"
        return cls(data=values, dtype=dtype, shape=[len(values)])


class EncodedTextChunk(_Model):
    tokens: list[int]
    type: Literal["encoded_text"] = "encoded_text"


class ModelInput(_Model):
    """Token ids fed to the model, as chunks (Tinker's ModelInput; text chunks only)."""

    chunks: list[EncodedTextChunk]

    @classmethod
    def from_ints(cls, tokens: list[int]) -> ModelInput:
        return cls(chunks=[EncodedTextChunk(tokens=list(tokens))])

    def to_ints(self) -> list[int]:
        return [t for c in self.chunks for t in c.tokens]

    @property
    def length(self) -> int:
        return sum(len(c.tokens) for c in self.chunks)


class Datum(_Model):
    """One row: ``model_input`` and, for cross_entropy, ``target_tokens`` and ``weights`` of the
    same length (loss = sum of -weight * logprob(target) over positions)."""

    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData]

    @field_validator("loss_fn_inputs", mode="before")
    @classmethod
    def _tensors(cls, value: Any) -> Any:
        return {k: TensorData.coerce(v) for k, v in dict(value).items()}

    @model_validator(mode="after")
    def _shapes(self) -> Datum:
        n = self.model_input.length
        if not 0 < n <= MAX_TOKENS_PER_DATUM:
            raise ValueError(f"model_input has {n} tokens; 1..{MAX_TOKENS_PER_DATUM} allowed")
        for name in ("target_tokens", "weights"):
            if name not in self.loss_fn_inputs:
                raise ValueError(f"loss_fn_inputs lacks {name!r}")
            if len(self.loss_fn_inputs[name].data) != n:
                raise ValueError(f"loss_fn_inputs[{name!r}] has {len(self.loss_fn_inputs[name].data)}"
                                 f" values for {n} input tokens")
        for i, w in enumerate(self.loss_fn_inputs["weights"].data):
            if not math.isfinite(w):
                raise ValueError(f"weights[{i}] is {w}: weights must be finite")
        for i, t in enumerate(self.loss_fn_inputs["target_tokens"].data):
            if isinstance(t, float) and not (math.isfinite(t) and t.is_integer()):
                raise ValueError(f"target_tokens[{i}] is {t}: token ids are integers")
        return self

    def targets(self) -> list[int]:
        return [int(t) for t in self.loss_fn_inputs["target_tokens"].data]

    def weights(self) -> list[float]:
        return [float(w) for w in self.loss_fn_inputs["weights"].data]


class AdamParams(_Model):
    """AdamW for one step; given per call, so the schedule lives in the client's loop.
    ``grad_clip_norm`` 0 clips nothing; ``weight_decay`` skips biases and norms (the CLI's)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    learning_rate: float = Field(1e-4, ge=0)  # 0: a warm-up's first step
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-12, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip_norm: float = Field(0.0, ge=0)


class DPParams(_Model):
    """Differential privacy for one step: per-datum clipping to ``max_grad_norm`` and Gaussian
    noise of std ``noise_multiplier * max_grad_norm`` on the summed gradient; ``sample_rate``
    (the batch's share of the dataset) and ``delta`` feed Opacus' RDP accountant."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)
    noise_multiplier: float = Field(ge=0)
    max_grad_norm: float = Field(gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    sample_rate: float = Field(gt=0, le=1)


class DPMetrics(_Result):
    """Privacy spent so far; ``epsilon_spent`` None: unbounded (a step without noise)."""

    epsilon_spent: float | None
    delta: float
    steps: int


class ForwardBackwardOutput(_Result):
    """Per datum, ``logprobs`` of its target tokens; ``metrics``: loss:sum, tokens, datums."""

    loss_fn_output_type: str = "cross_entropy"
    loss_fn_outputs: list[dict[str, TensorData]]
    metrics: dict[str, float]

    @property
    def loss(self) -> float:
        return self.metrics["loss:sum"]


class OptimStepResponse(_Result):
    step: int
    learning_rate: float
    grad_norm: float
    dp_metrics: DPMetrics | None = None
    metrics: dict[str, float] = Field(default_factory=dict)


class SamplingParams(_Model):
    """``stop``: strings, or token ids, that end a sequence; temperature 0 is greedy."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)
    max_tokens: int = Field(16, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0)
    stop: list[str] | list[int] | None = None
    seed: int | None = Field(None, ge=0, le=2**53)
    top_k: int = -1  # Tinker's fields; only their defaults (no truncation) are served
    top_p: float = 1.0

    @model_validator(mode="after")
    def _untruncated(self) -> SamplingParams:
        if self.top_k != -1 or self.top_p != 1.0:
            raise ValueError(f"top_k={self.top_k}, top_p={self.top_p}: only untruncated "
                             "sampling (top_k -1, top_p 1) is served")
        return self


class SampledSequence(_Result):
    stop_reason: Literal["length", "stop"]
    tokens: list[int]
    logprobs: list[float] | None = None


class SampleResponse(_Result):
    sequences: list[SampledSequence]
    type: Literal["sample"] = "sample"


class SaveWeightsResponse(_Result):
    """Where the workers saved: ``path`` (a save_state's other fields are StateInfo's)."""

    path: str


class StateInfo(_Result):
    """A saved state: the sharded checkpoint's directory, bytes on disk, content hash."""

    name: str
    path: str
    size_bytes: int
    sha256: str
    step: int
    seq: int
