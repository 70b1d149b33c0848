"""Consistent self-attention: a diffusers attention processor that shares identity.

In a UNet's self-attention layers every image attends to its own tokens only.
Here, an image of a scene also attends to the keys and values of its
characters' *identity images* (portraits drawn in the same batch, from the
character's own seed), at every denoising step and in the layers chosen by
the ``attention_layers`` setting. The identity images themselves attend only
to themselves, so they come out the same in every batch, and so does every
scene that uses them.

``strength`` weighs each identity token against the image's own tokens: 1
treats them alike, lower values add ``log(strength)`` to the identity tokens'
attention logits. With no links set, the processor runs the layer's original
processor unchanged, so installing it changes nothing until a batch asks for it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class IdentityLinks:
    """What the current batch shares; set by the renderer around one pipeline call.

    ``links[i]`` lists the batch positions of the identity images image ``i``
    attends to (empty for images that attend only to themselves). Positions
    count prompts, before classifier-free guidance doubles the batch.
    """

    links: tuple[tuple[int, ...], ...] | None = None
    strength: float = 1.0

    def clear(self) -> None:
        self.links = None


class ConsistentSelfAttentionProcessor:
    """Self-attention over an image's own tokens plus its identity images' tokens."""

    def __init__(self, inner: Any, shared: IdentityLinks) -> None:
        self.inner = inner
        self.shared = shared

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        links = self.shared.links
        if (
            links is None
            or encoder_hidden_states is not None
            or attention_mask is not None
            or not any(links)
            or hidden_states.shape[0] % len(links)
        ):
            return self.inner(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        return self._shared_attention(attn, hidden_states, temb, links)

    def _shared_attention(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        temb: torch.Tensor | None,
        links: Sequence[tuple[int, ...]],
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        batch, tokens, _ = hidden_states.shape
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (
            t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        images = len(links)
        out = torch.empty_like(query)
        alone = [row for row in range(batch) if not links[row % images]]
        if alone:
            out[alone] = F.scaled_dot_product_attention(query[alone], key[alone], value[alone])
        bias = math.log(self.shared.strength) if self.shared.strength != 1.0 else 0.0
        for row in range(batch):
            shared = links[row % images]
            if not shared:
                continue
            # Classifier-free guidance stacks [unconditional..., conditional...]: an image
            # attends to its identity images in the same half.
            base = row - row % images
            rows = [base + position for position in shared]
            extra_k = key[rows].transpose(0, 1).reshape(1, attn.heads, -1, head_dim)
            extra_v = value[rows].transpose(0, 1).reshape(1, attn.heads, -1, head_dim)
            full_k = torch.cat([key[row : row + 1], extra_k], dim=2)
            full_v = torch.cat([value[row : row + 1], extra_v], dim=2)
            mask = None
            if bias:
                mask = torch.zeros(1, 1, 1, full_k.shape[2], dtype=query.dtype, device=query.device)
                mask[..., tokens:] = bias
            out[row : row + 1] = F.scaled_dot_product_attention(
                query[row : row + 1], full_k, full_v, attn_mask=mask
            )

        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install_consistent_self_attention(
    unet: Any, layers: Sequence[str], shared: IdentityLinks
) -> tuple[str, ...]:
    """Wrap the self-attention processors of ``unet`` whose names start with one of ``layers``.

    Call it after anything else that sets processors (loading an IP-Adapter resets
    them all). Returns the wrapped processor names; raises ValueError when
    ``layers`` matches no self-attention layer.
    """
    processors = dict(unet.attn_processors)
    wrapped = []
    for name, processor in processors.items():
        if not name.endswith("attn1.processor"):
            continue
        if any(name == layer or name.startswith(layer.rstrip(".") + ".") for layer in layers):
            processors[name] = ConsistentSelfAttentionProcessor(processor, shared)
            wrapped.append(name)
    if not wrapped:
        raise ValueError(
            f"attention_layers {list(layers)} match no self-attention layer of the UNet; "
            "use prefixes such as up_blocks, mid_block or down_blocks.1"
        )
    unet.set_attn_processor(processors)
    return tuple(wrapped)
