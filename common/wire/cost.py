"""Bytes per micro-batch by the DESIGN.md formula, from the shapes and the layer roles alone.

With N tokens (B*T), codec bytes per element c (each direction may use its own codec), embedding
width E, head input width E_out and, per input group g of a layer, its input width H_g and summed
output width O_g:
- up:   embeddings N*E*c, hidden grad N*E_out*c (training), the mask N*1,
        per present group N*O_g*c, per group that takes part in backward N*H_g*c;
- down: final hidden N*E_out*c, per present group N*H_g*c, per backward group N*O_g*c.
Present groups: every target group of a layer whose role is not ABSENT; backward groups: those of
FORWARD_BACKWARD layers (when training). For int8 each tensor also carries one float32 scale per
block. Message headers are not included: the device reports whole serialized sizes separately.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.pb.dlora.v1 import dlora_pb2 as pb
from common.wire.codecs import codec_spec


@dataclass(frozen=True)
class WireCost:
    """Payload bytes of one micro-batch by direction."""

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
