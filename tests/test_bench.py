"""The benchmarks' bookkeeping: GEMM lists vs the analytic FLOP counts, and a tiny run of the GEMM floor timer."""
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import forward  # noqa: E402
import gemm_floor  # noqa: E402
from turbojax.models.qwen_image import QwenImageConfig  # noqa: E402
from turbojax.models.z_image import ZImageConfig  # noqa: E402


def gemm_flops(gemms, skip_rows: int | None = None) -> float:
    return float(sum(2 * m * k * n * c for (m, k, n), c in gemms.items() if m != skip_rows))


@pytest.mark.parametrize("batch,n_img,n_txt", [(1, 1024, 64), (2, 12, 7)])
def test_qwen_image_gemms_match_flop_count(batch, n_img, n_txt):
    cfg = QwenImageConfig(num_layers=3, attention_head_dim=32, num_attention_heads=4, joint_attention_dim=96,
                          in_channels=64, out_channels=16, axes_dims_rope=(4, 14, 14))
    gemms = gemm_floor.qwen_image_gemms(cfg, batch, n_img, n_txt)
    assert gemm_flops(gemms) == forward.model_flops("qwen_image", cfg, batch, n_img, n_txt)["total"]


@pytest.mark.parametrize("batch,n_img,n_txt", [(1, 1024, 64), (3, 40, 5)])
def test_z_image_gemms_match_flop_count(batch, n_img, n_txt):
    cfg = ZImageConfig(dim=192, n_layers=2, n_refiner_layers=1, n_heads=3, n_kv_heads=3, cap_feat_dim=80,
                       axes_dims=(16, 24, 24))
    gemms = gemm_floor.z_image_gemms(cfg, batch, n_img, n_txt)
    # model_flops leaves out the per-sample products (timestep MLP, modulation): compare the token-sized ones.
    assert gemm_flops(gemms, skip_rows=batch) == forward.model_flops("z_image", cfg, batch, n_img, n_txt)["total"]


def test_gemm_floor_sums_counts():
    out = gemm_floor.gemm_floor({(8, 16, 4): 3, (4, 4, 4): 1}, jnp.float32, torch.float32, iters=2)
    assert [(r["m"], r["count"]) for r in out["shapes"]] == [(8, 3), (4, 1)]  # largest work first
    assert out["jax_ms"] == pytest.approx(sum(r["jax_ms"] * r["count"] for r in out["shapes"]))
    assert out["torch_ms"] == pytest.approx(sum(r["torch_ms"] * r["count"] for r in out["shapes"]))
