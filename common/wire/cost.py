"""Payload bytes by the DESIGN.md formulas, from the shapes and the layer roles alone.

With N tokens (B*T), codec bytes per element c (each direction may use its own codec), embedding
width E, head input width E_out and, per input group g of a layer, its input width H_g and summed
output width O_g, one micro-batch of the `layerwise` protocol (step_cost) moves:
- up:   embeddings N*E*c, hidden grad N*E_out*c (training), the mask N*1,
        per present group N*O_g*c, per group that takes part in backward N*H_g*c;
- down: final hidden N*E_out*c, per present group N*H_g*c, per backward group N*O_g*c.
Present groups: every target group of a layer whose role is not ABSENT; backward groups: those of
FORWARD_BACKWARD layers (when training).

One optimizer step of the `adapter` protocol (adapter_step_cost), micro-batches of N_i tokens, with
c_w bytes per element of the weights codec, W the elements of the modules StepWeights carries and G
those of the trained modules (a module, one target in one layer, has r*(in+out)):
- up:   weights W*c_w once, then per micro-batch embeddings N_i*E*c, the mask N_i*1 and hidden
        grad N_i*E_out*c (training);
- down: per micro-batch final hidden N_i*E_out*c, and gradients G*c_w once (training).
W counts the modules of present layers the cloud does not hold yet on this stream: all of them on
a stream's first step, then the ones that changed (the trained ones, every step).

For int8 each tensor also carries one float32 scale per block. Message headers are not included:
the device reports whole serialized sizes separately.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.pb.dlora.v1 import dlora_pb2 as pb
from common.wire.codecs import codec_spec


@dataclass(frozen=True)
class WireCost:
    """Payload bytes by direction (of one micro-batch, or of one step: see the function)."""

    up: int
    down: int


def tensor_bytes(numel: int, codec: str, block_size: int) -> int:
    """Payload bytes of one encoded tensor."""
    spec = codec_spec(codec)
    if spec.codec == pb.INT8_BLOCKWISE:
        return numel + 4 * (-(-numel // block_size))
    return numel * spec.bytes_per_element


def step_cost(
    n_tokens: int,
    embed_width: int,
    head_width: int,
    groups: list[tuple[int, int]],
    roles: list[int],
    train: bool,
    codec_up: str,
    block_size: int,
    codec_down: str | None = None,
) -> WireCost:
    """Payload of one micro-batch.

    Args:
        groups: (H_g, O_g) of every target group of one layer (the same in every layer).
        roles: one LayerRole per layer.
        codec_up, codec_down: the codec of each direction (codec_down defaults to codec_up).
    """

    def up_b(width: int) -> int:
        return tensor_bytes(n_tokens * width, codec_up, block_size)

    def down_b(width: int) -> int:
        return tensor_bytes(n_tokens * width, codec_down or codec_up, block_size)

    up = up_b(embed_width) + n_tokens  # embeddings + uint8 mask
    down = down_b(head_width)
    if train:
        up += up_b(head_width)
    for role in roles:
        if role == pb.ABSENT:
            continue
        for h, o in groups:
            down += down_b(h)
            up += up_b(o)
            if train and role == pb.FORWARD_BACKWARD:
                down += down_b(o)
                up += up_b(h)
    return WireCost(up, down)


def adapter_step_cost(
    n_tokens: list[int],
    embed_width: int,
    head_width: int,
    weights_numel: int,
    trained_numel: int,
    train: bool,
    codec_up: str,
    block_size: int,
    codec_down: str | None = None,
    codec_weights: str = "float32",
) -> WireCost:
    """Payload of one optimizer step of the adapter protocol (all its micro-batches).

    Args:
        n_tokens: the tokens of each micro-batch (its B*T after padding), in order.
        weights_numel: W, elements of the modules the step's StepWeights carries
            (AdapterLayout.total_numel of its modules).
        trained_numel: G, elements of the trained modules, whose gradients LoraGrads returns.
        codec_up, codec_down: the activations' codec of each direction (codec_down defaults to codec_up).
        codec_weights: the codec of StepWeights.weights and LoraGrads.grads.
    """
    down_codec = codec_down or codec_up
    up = tensor_bytes(weights_numel, codec_weights, block_size)
    down = tensor_bytes(trained_numel, codec_weights, block_size) if train else 0
    for n in n_tokens:
        up += tensor_bytes(n * embed_width, codec_up, block_size) + n  # embeddings + uint8 mask
        down += tensor_bytes(n * head_width, down_codec, block_size)
        if train:
            up += tensor_bytes(n * head_width, codec_up, block_size)
    return WireCost(up, down)
