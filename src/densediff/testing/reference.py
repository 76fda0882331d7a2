"""Slow, plain references that the fast implementations are checked against."""

from __future__ import annotations

import math

import torch

__all__ = ["naive_ms_deform_attn"]


def naive_ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights):
    """Loop-by-loop bilinear sampling, pixel-centre convention, zero outside the map."""
    b_size, _, heads, _ = value.shape
    _, queries, _, _, points, _ = sampling_locations.shape
    shapes = [tuple(int(v) for v in hw) for hw in spatial_shapes]
    starts = [sum(h * w for h, w in shapes[:lvl]) for lvl in range(len(shapes))]
    batch_out = []
    for b in range(b_size):
        query_out = []
        for q in range(queries):
            head_out = []
            for m in range(heads):
                acc = torch.zeros_like(value[0, 0, 0])
                for lvl, (h, w) in enumerate(shapes):
                    for p in range(points):
                        # pixel (i, j) has its centre at ((j + 0.5) / W, (i + 0.5) / H)
                        px = sampling_locations[b, q, m, lvl, p, 0] * w - 0.5
                        py = sampling_locations[b, q, m, lvl, p, 1] * h - 0.5
                        x0, y0 = math.floor(px.item()), math.floor(py.item())
                        fx, fy = px - x0, py - y0
                        sample = torch.zeros_like(acc)
                        for i, wy in ((y0, 1 - fy), (y0 + 1, fy)):
                            for j, wx in ((x0, 1 - fx), (x0 + 1, fx)):
                                if 0 <= i < h and 0 <= j < w:
                                    sample = sample + wy * wx * value[b, starts[lvl] + i * w + j, m]
                        acc = acc + attention_weights[b, q, m, lvl, p] * sample
                head_out.append(acc)
            query_out.append(torch.cat(head_out))
        batch_out.append(torch.stack(query_out))
    return torch.stack(batch_out)
