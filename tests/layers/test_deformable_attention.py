"""MultiScaleDeformableAttention against transformers' Deformable-DETR layer, its
initialisation, padding masks and errors."""

from __future__ import annotations

import math

import pytest
import torch

from mmlayers import MultiScaleDeformableAttention

SHAPES = [(6, 8), (3, 4), (2, 2), (1, 1)]
S = sum(h * w for h, w in SHAPES)


def hf_layer(dim, heads, levels, points):
    from transformers import DeformableDetrConfig
    from transformers.models.deformable_detr.modeling_deformable_detr import (
        DeformableDetrMultiscaleDeformableAttention,
    )

    config = DeformableDetrConfig(d_model=dim, num_feature_levels=levels,
                                  disable_custom_kernels=True)
    return DeformableDetrMultiscaleDeformableAttention(config, num_heads=heads,
                                                       n_points=points)


@pytest.mark.parametrize("coords", [2, 4])
def test_matches_transformers_deformable_detr(coords):
    torch.manual_seed(0)
    dim, heads, levels, points = 32, 4, len(SHAPES), 3
    ours = MultiScaleDeformableAttention(dim, num_heads=heads, num_levels=levels,
                                         num_points=points).double()
    # Non-trivial weights so that offsets and attention logits matter.
    with torch.no_grad():
        for param in ours.parameters():
            param.normal_(0, 0.3)
    theirs = hf_layer(dim, heads, levels, points).double()
    theirs.load_state_dict(ours.state_dict())
    b, n = 2, 7
    query = torch.randn(b, n, dim, dtype=torch.float64)
    value = torch.randn(b, S, dim, dtype=torch.float64)
    if coords == 2:
        ref = torch.rand(b, n, levels, 2, dtype=torch.float64)
    else:
        ref = torch.cat([torch.rand(b, n, levels, 2), torch.rand(b, n, levels, 2) * 0.5],
                        -1).double()
    shapes_t = torch.tensor(SHAPES)
    starts = torch.cat([shapes_t.new_zeros(1), shapes_t.prod(1).cumsum(0)[:-1]])
    expected, _ = theirs(query, encoder_hidden_states=value, reference_points=ref,
                         spatial_shapes=shapes_t, spatial_shapes_list=SHAPES,
                         level_start_index=starts)
    for backend in ("reference", "torch"):
        ours.backend = backend
        out = ours(query, ref, value, SHAPES, starts)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_initialisation_follows_deformable_detr():
    heads, levels, points = 8, 2, 3
    layer = MultiScaleDeformableAttention(64, num_heads=heads, num_levels=levels,
                                          num_points=points)
    assert torch.count_nonzero(layer.sampling_offsets.weight) == 0
    assert torch.count_nonzero(layer.attention_weights.weight) == 0
    assert torch.count_nonzero(layer.attention_weights.bias) == 0
    bias = layer.sampling_offsets.bias.view(heads, levels, points, 2)
    for head in range(heads):
        angle = 2 * math.pi * head / heads
        direction = torch.tensor([math.cos(angle), math.sin(angle)])
        direction = direction / direction.abs().max()
        for point in range(points):
            for level in range(levels):
                torch.testing.assert_close(bias[head, level, point], direction * (point + 1))
    assert torch.count_nonzero(layer.value_proj.bias) == 0
    assert torch.count_nonzero(layer.output_proj.bias) == 0


def test_padding_mask_hides_values():
    torch.manual_seed(1)
    layer = MultiScaleDeformableAttention(16, num_heads=2, num_levels=len(SHAPES),
                                          num_points=2)
    query, ref = torch.randn(1, 5, 16), torch.rand(1, 5, len(SHAPES), 2)
    value = torch.randn(1, S, 16)
    mask = torch.zeros(1, S, dtype=torch.bool)
    mask[:, 48:] = True  # everything but the first level is padding
    out = layer(query, ref, value, SHAPES, value_padding_mask=mask)
    perturbed = value.clone()
    perturbed[:, 48:] += 100.0
    torch.testing.assert_close(layer(query, ref, perturbed, SHAPES, value_padding_mask=mask),
                               out)
    assert not torch.allclose(layer(query, ref, perturbed, SHAPES), out)


def test_shared_reference_points_and_ratio():
    layer = MultiScaleDeformableAttention(32, num_heads=4, num_levels=len(SHAPES),
                                          num_points=2, ratio=0.5, value_dim=24, out_dim=8)
    query, value = torch.randn(2, 3, 32), torch.randn(2, S, 24)
    ref2 = torch.rand(2, 3, 2)
    out = layer(query, ref2, value, SHAPES)
    assert out.shape == (2, 3, 8)
    per_level = ref2[:, :, None].expand(2, 3, len(SHAPES), 2)
    torch.testing.assert_close(layer(query, per_level, value, SHAPES), out)
    assert layer.value_proj.out_features == 16


def test_bad_inputs():
    layer = MultiScaleDeformableAttention(16, num_heads=2, num_levels=len(SHAPES),
                                          num_points=2)
    query, ref, value = torch.randn(1, 5, 16), torch.rand(1, 5, len(SHAPES), 2), torch.randn(1, S, 16)
    with pytest.raises(ValueError, match=r"query must have shape \(b, n, 16\)"):
        layer(torch.randn(1, 5, 8), ref, value, SHAPES)
    with pytest.raises(ValueError, match=r"value must have shape"):
        layer(query, ref, torch.randn(1, S, 8), SHAPES)
    with pytest.raises(ValueError, match=r"spatial_shapes has 2 levels.*num_levels=4"):
        layer(query, ref, value[:, :60], SHAPES[:2])
    with pytest.raises(ValueError, match=r"reference_points must have shape"):
        layer(query, torch.rand(1, 5, 3), value, SHAPES)
    with pytest.raises(ValueError, match=r"cover Σ H·W = 65 tokens but value has s = 64"):
        layer(query, ref, value[:, :-1], SHAPES)
    with pytest.raises(ValueError, match=r"must be divisible by num_heads"):
        MultiScaleDeformableAttention(10, num_heads=3)
