"""``ServiceClient``, ``TrainingClient`` and ``SamplingClient``: Tinker's client, for a zerop2p
coordinator and the worker group serving it.

Each call is numbered (``seq``) and posted at once, in call order, so ``optim_step`` submitted
before ``forward_backward``'s result is awaited runs after it; a retried POST carries the same
seq and body and never runs twice. Every method returns an ``APIFuture``; each has an
``_async`` twin (a coroutine returning the future, which is itself awaitable)."""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from typing import Any

from zerop2p.futures import APIFuture, in_thread
from zerop2p.http import Http, ServiceError
from zerop2p.requests import ModelInfo, SessionRequest
from zerop2p.types import (
    AdamParams,
    Datum,
    DPParams,
    ForwardBackwardOutput,
    ModelInput,
    OptimStepResponse,
    SampleResponse,
    SamplingParams,
    SaveWeightsResponse,
    StateInfo,
)

CREATE_TIMEOUT_S = 600.0  # building (or loading) the model on the workers


class _Session:
    """One session's numbering: the next seq, taken and posted under a lock. A POST whose
    fate is unknown (the service stayed unreachable) is posted again, same seq and body, before
    the next call: it may have been stored, and then it runs (its call raised, its result
    is still in the session's log)."""

    def __init__(self, http: Http, session_id: str, last_seq: int = 0) -> None:
        self.http, self.session_id = http, session_id
        self._last = last_seq
        self._unsure: dict | None = None
        self._lock = threading.Lock()
        self._ordered: dict[int, asyncio.Lock] = {}  # per event loop: the async twins' order

    def _post(self, request: dict) -> None:
        try:
            self.http.request("POST", f"/service/sessions/{self.session_id}/ops", json=request)
        except ServiceError as err:
            self._unsure = request if err.status is None else None
            raise
        self._unsure = None
        self._last = request["seq"]

    def submit(self, kind: str, body: dict[str, Any], parse) -> APIFuture:
        with self._lock:
            if self._unsure is not None:
                self._post(self._unsure)
            seq = self._last + 1
            self._post({"seq": seq, "kind": kind, "body": body})
        return APIFuture(self.http, self.session_id, seq, kind, parse)

    async def submit_async(self, call, *args: Any) -> APIFuture:
        """An ``_async`` twin: submissions of one event loop go out in call order (the lock
        is FIFO and taken before the first suspension), off the loop's thread."""
        lock = self._ordered.setdefault(id(asyncio.get_running_loop()), asyncio.Lock())
        async with lock:
            return await in_thread(call, *args)


def _create(http: Http, request: SessionRequest, timeout: float) -> tuple[_Session, ModelInfo]:
    """Create (or re-attach to) a session and wait for the workers to build its model."""
    record = http.request("POST", "/service/sessions", json=request.model_dump())
    made = APIFuture(http, request.session_id, 0, "create", lambda r: ModelInfo(**r["model"]))
    return _Session(http, request.session_id, record["last_seq"]), made.result(timeout)


class SamplingClient:
    """Samples from a session's model on the worker group."""

    def __init__(self, session: _Session, model: ModelInfo) -> None:
        self._session, self.model = session, model

    @property
    def session_id(self) -> str:
        return self._session.session_id

    def sample(self, prompt: ModelInput, num_samples: int = 1,
               sampling_params: SamplingParams | None = None) -> APIFuture[SampleResponse]:
        body = {"prompt": prompt.model_dump(), "num_samples": num_samples,
                "sampling_params": (sampling_params or SamplingParams()).model_dump()}
        return self._session.submit("sample", body, SampleResponse.model_validate)

    def compute_logprobs(self, prompt: ModelInput) -> APIFuture[list[float | None]]:
        """Each prompt token's log-probability given those before it (None for the first)."""
        return self._session.submit("compute_logprobs", {"prompt": prompt.model_dump()},
                                    lambda r: r["logprobs"])

    async def sample_async(self, prompt: ModelInput, num_samples: int = 1,
                           sampling_params: SamplingParams | None = None
                           ) -> APIFuture[SampleResponse]:
        return await self._session.submit_async(self.sample, prompt, num_samples,
                                                sampling_params)

    async def compute_logprobs_async(self, prompt: ModelInput) -> APIFuture[list[float | None]]:
        return await self._session.submit_async(self.compute_logprobs, prompt)

    def get_info(self) -> ModelInfo:
        """The model the workers built: vocabulary, positions, parameter counts, LoRA."""
        return self.model


class TrainingClient(SamplingClient):
    """A training session: gradients accumulate over ``forward_backward`` calls until
    ``optim_step``; it samples from its current weights too (``sample``)."""

    def __init__(self, service: ServiceClient, session: _Session, model: ModelInfo) -> None:
        super().__init__(session, model)
        self.service = service

    def forward_backward(self, data: list[Datum], loss_fn: str = "cross_entropy"
                         ) -> APIFuture[ForwardBackwardOutput]:
        body = {"data": [d.model_dump() for d in data], "loss_fn": loss_fn}
        return self._session.submit("forward_backward", body,
                                    ForwardBackwardOutput.model_validate)

    def optim_step(self, adam_params: AdamParams, dp: DPParams | None = None
                   ) -> APIFuture[OptimStepResponse]:
        body = {"adam_params": adam_params.model_dump(),
                "dp": None if dp is None else dp.model_dump()}
        return self._session.submit("optim_step", body, OptimStepResponse.model_validate)

    def save_state(self, name: str) -> APIFuture[SaveWeightsResponse]:
        """Weights and optimizer as a sharded checkpoint on the workers; ``.path`` names it."""
        return self._session.submit("save_state", {"name": name}, SaveWeightsResponse.model_validate)

    def load_state(self, path: str) -> APIFuture[dict]:
        """Weights from a saved state; the optimizer starts afresh."""
        return self._session.submit("load_state", {"path": path, "with_optimizer": False}, dict)

    def load_state_with_optimizer(self, path: str) -> APIFuture[dict]:
        return self._session.submit("load_state", {"path": path, "with_optimizer": True}, dict)

    def save_weights_for_sampler(self, name: str) -> APIFuture[SaveWeightsResponse]:
        """Export the weights: a Hugging Face directory (full) or a peft adapter (LoRA)."""
        return self._session.submit("save_weights_for_sampler", {"name": name},
                                    SaveWeightsResponse.model_validate)

    def save_weights_and_get_sampling_client(self, name: str) -> SamplingClient:
        """Save a state and open a sampling session on exactly those weights."""
        path = self.save_state(name).result().path
        return self.service.create_sampling_client(model_path=path)

    def forward(self, data: list[Datum], loss_fn: str = "cross_entropy"
                ) -> APIFuture[ForwardBackwardOutput]:
        """Loss and logprobs only: no gradient (an evaluation)."""
        body = {"data": [d.model_dump() for d in data], "loss_fn": loss_fn}
        return self._session.submit("forward", body, ForwardBackwardOutput.model_validate)

    async def forward_async(self, data: list[Datum], loss_fn: str = "cross_entropy"
                            ) -> APIFuture[ForwardBackwardOutput]:
        return await self._session.submit_async(self.forward, data, loss_fn)

    def list_states(self) -> list[StateInfo]:
        return self.service.list_states(self.session_id)

    async def list_states_async(self) -> list[StateInfo]:
        return await in_thread(self.list_states)

    async def save_weights_and_get_sampling_client_async(self, name: str) -> SamplingClient:
        return await in_thread(self.save_weights_and_get_sampling_client, name)

    async def forward_backward_async(self, data: list[Datum], loss_fn: str = "cross_entropy"
                                     ) -> APIFuture[ForwardBackwardOutput]:
        return await self._session.submit_async(self.forward_backward, data, loss_fn)

    async def optim_step_async(self, adam_params: AdamParams, dp: DPParams | None = None
                               ) -> APIFuture[OptimStepResponse]:
        return await self._session.submit_async(self.optim_step, adam_params, dp)

    async def save_state_async(self, name: str) -> APIFuture[SaveWeightsResponse]:
        return await self._session.submit_async(self.save_state, name)

    async def load_state_async(self, path: str) -> APIFuture[dict]:
        return await self._session.submit_async(self.load_state, path)

    async def load_state_with_optimizer_async(self, path: str) -> APIFuture[dict]:
        return await self._session.submit_async(self.load_state_with_optimizer, path)

    async def save_weights_for_sampler_async(self, name: str) -> APIFuture[SaveWeightsResponse]:
        return await self._session.submit_async(self.save_weights_for_sampler, name)


class ServiceClient:
    """The entry point: ``ServiceClient(base_url, token=...)`` (default ``$ZEROP2P_SERVICE_URL``
    and ``$ZEROP2P_TOKEN``), then training or sampling clients."""

    def __init__(self, base_url: str | None = None, token: str | None = None, *,
                 retry_for: float = 120.0, verify: str | bool = True) -> None:
        base_url = base_url or os.environ.get("ZEROP2P_SERVICE_URL")
        if not base_url:
            raise ValueError("ServiceClient needs base_url (or $ZEROP2P_SERVICE_URL): the "
                             "coordinator's URL, e.g. http://10.0.0.1:8000")
        self.http = Http(base_url, token=token or os.environ.get("ZEROP2P_TOKEN"),
                         retry_for=retry_for, verify=verify)

    def close(self) -> None:
        self.http.close()

    def _session(self, *, session_id: str | None, timeout: float, **config: Any):
        request = SessionRequest(session_id=session_id or f"s-{uuid.uuid4().hex[:12]}", **config)
        if request.source_problem():
            raise ValueError(request.source_problem())
        return _create(self.http, request, timeout)

    def create_lora_training_client(self, base_model: str, rank: int = 32, *,
                                    alpha: float | None = None, seed: int = 0,
                                    session_id: str | None = None,
                                    timeout: float = CREATE_TIMEOUT_S) -> TrainingClient:
        """LoRA of ``rank`` on ``base_model`` (a preset name or a model directory on the
        workers); ``session_id`` re-attaches to an existing session."""
        session, model = self._session(session_id=session_id, timeout=timeout,
                                       base_model=base_model, lora_rank=rank, lora_alpha=alpha,
                                       seed=seed)
        return TrainingClient(self, session, model)

    def create_full_training_client(self, base_model: str, *, seed: int = 0,
                                    session_id: str | None = None,
                                    timeout: float = CREATE_TIMEOUT_S) -> TrainingClient:
        """Full fine-tuning: every parameter trains."""
        session, model = self._session(session_id=session_id, timeout=timeout,
                                       base_model=base_model, seed=seed)
        return TrainingClient(self, session, model)

    def create_training_client_from_state(self, path: str, *, with_optimizer: bool = False,
                                          session_id: str | None = None,
                                          timeout: float = CREATE_TIMEOUT_S) -> TrainingClient:
        """A new session starting from a saved state (its model, LoRA and weights)."""
        session, model = self._session(session_id=session_id, timeout=timeout,
                                       from_state=path, with_optimizer=with_optimizer)
        return TrainingClient(self, session, model)

    def create_sampling_client(self, model_path: str | None = None, *,
                               base_model: str | None = None,
                               timeout: float = CREATE_TIMEOUT_S) -> SamplingClient:
        """Sample from a saved state (``model_path``) or from a base model."""
        session, model = self._session(session_id=None, timeout=timeout,
                                       base_model=base_model, from_state=model_path)
        return SamplingClient(session, model)

    def list_states(self, session_id: str | None = None) -> list[StateInfo]:
        rows = self.http.request("GET", "/service/states",
                                 params={"session_id": session_id} if session_id else None)
        return [StateInfo.model_validate(r) for r in rows]

    async def list_states_async(self, session_id: str | None = None) -> list[StateInfo]:
        return await in_thread(self.list_states, session_id)

    async def create_lora_training_client_async(self, *args, **kwargs) -> TrainingClient:
        return await in_thread(self.create_lora_training_client, *args, **kwargs)

    async def create_full_training_client_async(self, *args, **kwargs) -> TrainingClient:
        return await in_thread(self.create_full_training_client, *args, **kwargs)

    async def create_training_client_from_state_async(self, *args, **kwargs) -> TrainingClient:
        return await in_thread(self.create_training_client_from_state, *args, **kwargs)

    async def create_sampling_client_async(self, *args, **kwargs) -> SamplingClient:
        return await in_thread(self.create_sampling_client, *args, **kwargs)
