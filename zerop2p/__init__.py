"""zerop2p's public client: drive a worker group from Python with Tinker's names.

    from zerop2p import ServiceClient, types
    service = ServiceClient("http://coordinator:8000", token=...)
    training = service.create_lora_training_client("tiny-gpt2", rank=8)

It imports nothing from the worker (no torch needed on the client's machine)."""

from zerop2p import types
from zerop2p.client import SamplingClient, ServiceClient, TrainingClient
from zerop2p.futures import APIFuture
from zerop2p.http import OperationFailedError, ServiceError
from zerop2p.types import (
    AdamParams,
    Datum,
    DPParams,
    ForwardBackwardOutput,
    ModelInput,
    OptimStepResponse,
    SampledSequence,
    SampleResponse,
    SamplingParams,
    TensorData,
)

__all__ = ["APIFuture", "AdamParams", "DPParams", "Datum", "ForwardBackwardOutput",
           "ModelInput", "OperationFailedError", "OptimStepResponse", "SampleResponse", "SampledSequence",
           "SamplingClient", "SamplingParams", "ServiceClient", "ServiceError", "TensorData",
           "TrainingClient", "types"]
