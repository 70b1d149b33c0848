"""The consistent self-attention processor on one real diffusers attention layer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from storyreel_diffusion.attention import (
    ConsistentSelfAttentionProcessor,
    IdentityLinks,
    install_consistent_self_attention,
)

TOKENS, CHANNELS, HEADS = 6, 8, 2


@pytest.fixture
def layer() -> Attention:
    torch.manual_seed(0)
    return Attention(query_dim=CHANNELS, heads=HEADS, dim_head=CHANNELS // HEADS).eval()


def expected_shared(layer: Attention, hidden: torch.Tensor, row: int, rows: list[int], bias=0.0):
    """Attention of image ``row`` over its own tokens and those of ``rows``, by hand."""

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], -1, HEADS, CHANNELS // HEADS).transpose(1, 2)

    q, k, v = (heads(f(hidden)) for f in (layer.to_q, layer.to_k, layer.to_v))
    keys = torch.cat([k[row], *(k[r] for r in rows)], dim=1)[None]
    values = torch.cat([v[row], *(v[r] for r in rows)], dim=1)[None]
    mask = torch.zeros(1, 1, 1, keys.shape[2])
    mask[..., TOKENS:] = bias
    out = F.scaled_dot_product_attention(q[row : row + 1], keys, values, attn_mask=mask)
    out = out.transpose(1, 2).reshape(1, TOKENS, CHANNELS)
    return layer.to_out[1](layer.to_out[0](out))


def test_without_links_the_layer_computes_what_it_did_before(layer):
    hidden = torch.randn(3, TOKENS, CHANNELS)
    plain = AttnProcessor2_0()(layer, hidden)
    shared = ConsistentSelfAttentionProcessor(AttnProcessor2_0(), IdentityLinks())
    assert torch.equal(shared(layer, hidden), plain)
    # Cross-attention layers are never shared.
    links = IdentityLinks(links=((), (0,), ()))
    context = torch.randn(3, 4, CHANNELS)
    processor = ConsistentSelfAttentionProcessor(AttnProcessor2_0(), links)
    assert torch.equal(
        processor(layer, hidden, context), AttnProcessor2_0()(layer, hidden, context)
    )


def test_a_linked_image_attends_to_its_identity_images_keys_and_values(layer):
    # Batch: identity image 0, identity image 1, a scene linked to both, a scene alone.
    hidden = torch.randn(4, TOKENS, CHANNELS)
    links = IdentityLinks(links=((), (), (0, 1), ()))
    out = ConsistentSelfAttentionProcessor(AttnProcessor2_0(), links)(layer, hidden)
    plain = AttnProcessor2_0()(layer, hidden)
    torch.testing.assert_close(out[2:3], expected_shared(layer, hidden, 2, [0, 1]))
    assert not torch.allclose(out[2], plain[2])
    for alone in (0, 1, 3):
        torch.testing.assert_close(out[alone], plain[alone])


def test_guidance_halves_share_within_their_own_half(layer):
    # Classifier-free guidance doubles the batch: [uncond id, uncond scene, cond id, cond scene].
    hidden = torch.randn(4, TOKENS, CHANNELS)
    links = IdentityLinks(links=((), (0,)))
    out = ConsistentSelfAttentionProcessor(AttnProcessor2_0(), links)(layer, hidden)
    torch.testing.assert_close(out[1:2], expected_shared(layer, hidden, 1, [0]))
    torch.testing.assert_close(out[3:4], expected_shared(layer, hidden, 3, [2]))


def test_strength_weighs_identity_tokens_by_its_logarithm(layer):
    hidden = torch.randn(2, TOKENS, CHANNELS)
    links = IdentityLinks(links=((), (0,)), strength=0.25)
    out = ConsistentSelfAttentionProcessor(AttnProcessor2_0(), links)(layer, hidden)
    torch.testing.assert_close(
        out[1:2], expected_shared(layer, hidden, 1, [0], bias=math.log(0.25))
    )


def test_install_wraps_only_matching_self_attention_layers(tiny_sd):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd / "unet")
    wrapped = install_consistent_self_attention(unet, ["up_blocks"], IdentityLinks())
    assert wrapped and all(n.startswith("up_blocks.") and ".attn1." in n for n in wrapped)
    kinds = {name: type(p).__name__ for name, p in unet.attn_processors.items()}
    assert {kinds[name] for name in wrapped} == {"ConsistentSelfAttentionProcessor"}
    assert all(kinds[n] != "ConsistentSelfAttentionProcessor" for n in kinds if n not in wrapped)
    with pytest.raises(ValueError, match="match no self-attention layer"):
        install_consistent_self_attention(unet, ["no_such_block"], IdentityLinks())
