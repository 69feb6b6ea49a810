"""The fused deformable-attention kernel against transformers' PyTorch path, through Triton's CPU interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[3]

PARITY = r"""
import torch
from transformers.models.grounding_dino.modeling_grounding_dino import MultiScaleDeformableAttention
from grit_pipeline.grounding.msda_triton import msda_fused

torch.manual_seed(0)
shapes_list = [(5, 7), (3, 4), (2, 2)]
B, H, D, Q, P = 2, 2, 8, 11, 3
L = len(shapes_list)
shapes = torch.tensor(shapes_list)
starts = torch.cat([torch.zeros(1, dtype=torch.long), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
S = int((shapes[:, 0] * shapes[:, 1]).sum())
value = torch.randn(B, S, H, D)
# Locations a little past the map on every side: the zero padding of grid_sample is part of the contract.
loc = torch.rand(B, Q, H, L, P, 2) * 1.3 - 0.15
weights = torch.softmax(torch.randn(B, Q, H, L * P), -1).view(B, Q, H, L, P)
ref = MultiScaleDeformableAttention()(value, shapes, shapes_list, starts, loc, weights, 64)
got = msda_fused(value, shapes, starts, loc, weights, block_q=4)
err32 = (got - ref).abs().max().item()
got16 = msda_fused(value.bfloat16(), shapes, starts, loc, weights, block_q=4)
assert got16.dtype == torch.bfloat16
err16 = (got16.float() - ref).abs().max().item()
print(f"{err32:.3e} {err16:.3e} {ref.abs().max().item():.3f}")
"""


def test_fused_kernel_matches_the_pytorch_path_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", PARITY], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    err32, err16, scale = (float(v) for v in out.stdout.split()[-3:])
    assert scale > 0.1  # the outputs are not all zero
    assert err32 < 1e-5
    assert err16 < 3e-2  # bf16 values, fp32 accumulation


def test_kernel_is_not_installed_on_cpu(tiny_grounding_dino_path):
    from grit_pipeline.config import DetectorConfig
    from grit_pipeline.grounding import make_detector

    det = make_detector(DetectorConfig(model=str(tiny_grounding_dino_path), device="cpu", msda_kernel="triton"))
    det.setup()
    names = {type(m).__name__ for m in det.model.modules()}
    assert "FusedMultiScaleDeformableAttention" not in names and "MultiScaleDeformableAttention" in names
    assert any("PyTorch path" in n for n in det.notes)
