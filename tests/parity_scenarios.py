"""The training scenarios every parity test runs sharded and in one process; small and fast."""

from __future__ import annotations

from worker.data.config import DataConfig
from worker.models.config import ModelConfig
from worker.models.loading import minilm_path
from worker.models.lora import LoraSettings
from worker.train.config import TrainConfig
from worker.train.optim import OptimConfig
from worker.train.traffic import TrafficConfig

STEPS = 3
ROWS = 6  # divisible by world sizes 1, 2 and 3
# Adam turns tiny gradient differences (float32 summation order) into update differences of up
# to a few percent of lr on near-zero gradients, so lr bounds the weight difference we can ask for.
LR = 1e-3
# Adam's eps: at 1e-8, g / (sqrt(v) + eps) on a near-zero gradient is about sign(g), so float32
# noise in g decides the update; 1e-6 keeps such elements' updates proportional to g.
EPS = 1e-6
DATA = DataConfig(source="stdlib", seq_len=32, max_tokens=200_000)


def _cfg(**kw) -> TrainConfig:
    base = dict(model=ModelConfig(name="tiny-gpt2"), data=DATA, steps=STEPS, micro_batch_rows=ROWS,
                optim=OptimConfig(lr=LR, eps=EPS, schedule="constant", max_grad_norm=None))
    base.update(kw)
    return TrainConfig(**base)


SCENARIOS: dict[str, TrainConfig] = {
    "gpt2": _cfg(),
    "llama": _cfg(model=ModelConfig(name="tiny-llama")),
    "accum": _cfg(grad_accum=2),
    "clip": _cfg(optim=OptimConfig(lr=LR, eps=EPS, schedule="constant", max_grad_norm=0.05)),
    "cosine": _cfg(steps=4, optim=OptimConfig(lr=LR, eps=EPS, schedule="cosine", warmup_steps=2,
                                              max_grad_norm=1.0)),
    "sgd": _cfg(optim=OptimConfig(optimizer="sgd", lr=0.1, momentum=0.9, schedule="linear",
                                  max_grad_norm=None)),
    "lora": _cfg(lora=LoraSettings(rank=4, alpha=8.0)),
    "bf16": _cfg(mixed_precision="bf16"),
    "fp16": _cfg(mixed_precision="fp16"),  # static loss scale; CPU float16 kernels
    # hidden 35: every unit's size is odd and not a multiple of 3, so slices are padded
    "uneven": _cfg(model=ModelConfig(name="tiny-gpt2", hidden_size=35, num_heads=5)),
    "again": _cfg(),  # "gpt2" once more: the same seed must give bit-identical weights
    # Traffic options that move fewer bytes and must not change the arithmetic's result.
    "accum_step": _cfg(grad_accum=2, traffic=TrafficConfig(grad_sync="step")),
    "lora_replicated": _cfg(lora=LoraSettings(rank=4, alpha=8.0),
                            traffic=TrafficConfig(frozen="replicate")),
    "keep_gathered": _cfg(traffic=TrafficConfig(reshard_after_forward=False)),
    "prefetch2": _cfg(traffic=TrafficConfig(prefetch_depth=2)),
    # Norms and biases (< 1000 elements) whole on every rank; with LoRA, adapters too, and a
    # replicated base: a step is one all-reduce, no gather, no reduce-scatter.
    "small_replicated": _cfg(traffic=TrafficConfig(persist_threshold=1000)),
    "lora_local": _cfg(lora=LoraSettings(rank=4, alpha=8.0),
                       traffic=TrafficConfig(frozen="replicate", persist_threshold=10_000)),
    # Activation checkpointing: each block unit replayed in backward, its gather found in place.
    "recompute": _cfg(activation_checkpointing=True, grad_accum=2),
    "lora_recompute": _cfg(lora=LoraSettings(rank=4, alpha=8.0), activation_checkpointing=True),
    # Weight decay 0.1 off for biases and LayerNorms (the default), then on for everything: each
    # rank decays only its owned slice's elements of decayed slots; hidden 35 puts slot edges
    # anywhere in the slices.
    "decay_groups": _cfg(model=ModelConfig(name="tiny-gpt2", hidden_size=35, num_heads=5),
                         optim=OptimConfig(lr=LR, eps=EPS, schedule="constant",
                                           max_grad_norm=None, weight_decay=0.1)),
    "decay_all": _cfg(model=ModelConfig(name="tiny-gpt2", hidden_size=35, num_heads=5),
                      optim=OptimConfig(lr=LR, eps=EPS, schedule="constant", max_grad_norm=None,
                                        weight_decay=0.1, decay_all=True)),
}
# bf16 compute with int8 parameters on the wire: a wrong codec for a bf16 run, which the
# mixed-precision check must reject (gRPC only: torch.distributed sends raw tensors).
SCENARIOS["bf16_int8"] = _cfg(mixed_precision="bf16", traffic=TrafficConfig(param_codec="int8"))
GRPC_ONLY = {"bf16_int8"}
MINILM = minilm_path()
if MINILM is not None:  # a real pretrained model from a local directory, fine-tuned with LoRA
    # eps 1e-6: the zero-initialised lora_B starts with near-zero gradients, where Adam's
    # g / (|g| + eps) turns float32 summation-order noise into visible update differences.
    SCENARIOS["minilm_lora"] = _cfg(
        model=ModelConfig(name=MINILM, task="sequence-classification", num_labels=2),
        data=DataConfig(source="stdlib", seq_len=24, max_examples=120), steps=4,
        micro_batch_rows=12, lora=LoraSettings(rank=4, alpha=8.0),
        optim=OptimConfig(lr=1e-2, eps=1e-6, schedule="constant", max_grad_norm=1.0))

# Max abs difference allowed against the single-process float32 run.
TOLERANCE = {name: 1e-5 for name in SCENARIOS}
# Mixed precision is compared with a single-process run under the same policy (bf16 or fp16
# compute, fp32 masters): the weights' updates (final minus initial) may differ by this share of
# the reference's update (L2 over all trainable weights), and each step's loss by LOSS_TOL.
# An untrained model scores 1.0; "bf16_int8" (a wrong codec) must score above it.
MIXED = {"bf16": "bf16", "fp16": "fp16", "bf16_int8": "bf16"}  # scenario -> reference policy
UPDATE_TOL = 0.05
LOSS_TOL = 5e-3
