"""bench/vae_floor.py's bookkeeping: its convolution list is what the decode runs, and its FLOPs match a closed form."""
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import vae_floor  # noqa: E402
from turbojax.models.vae_qwen_image import QWEN_IMAGE_VAE_TINY, AutoencoderKLQwenImage, QwenImageVAEConfig  # noqa: E402


def closed_form_flops(cfg, size: int) -> float:
    """Decoder convolution FLOPs written out level by level (multiply-add = 2): at latent side n, the convolutions
    of level i run at n * 2^i; widths d = base * mult reversed."""
    d = [cfg.base_dim * m for m in (cfg.dim_mult[-1],) + tuple(cfg.dim_mult)[::-1]]
    n, z, nr = size // 8, cfg.z_dim, cfg.num_res_blocks

    def conv(side, ci, co, k):
        return 2 * side * side * k * k * ci * co

    total = conv(n, z, z, 1) + conv(n, z, d[0], 3)
    total += 2 * (2 * conv(n, d[0], d[0], 3)) + conv(n, d[0], 3 * d[0], 1) + conv(n, d[0], d[0], 1)  # mid block
    for i in range(len(cfg.dim_mult)):
        side, cin, cout = n * 2 ** i, d[i] // (2 if i else 1), d[i + 1]
        total += conv(side, cin, cout, 3) + conv(side, cout, cout, 3) + (conv(side, cin, cout, 1) if cin != cout else 0)
        total += nr * 2 * conv(side, cout, cout, 3)
        if i < len(cfg.dim_mult) - 1:
            total += conv(2 * side, cout, cout // 2, 3)
    return float(total + conv(n * 2 ** (len(cfg.dim_mult) - 1), d[-1], cfg.input_channels, 3))


@pytest.mark.parametrize("cfg,size", [(QWEN_IMAGE_VAE_TINY, 32), (QwenImageVAEConfig(base_dim=8, z_dim=16), 64),
                                      (QwenImageVAEConfig(base_dim=96, z_dim=16), 16)])
def test_conv_list_is_the_traced_decode_and_matches_the_closed_form(cfg, size):
    vae = nnx.eval_shape(lambda: AutoencoderKLQwenImage(cfg, rngs=nnx.Rngs(0)))
    convs = vae_floor.decode_convs(cfg, size)
    assert vae_floor.traced_convs(vae, size) == convs
    assert vae_floor.conv_flops(convs) == closed_form_flops(cfg, size)


def test_conv_floor_sums_counts():
    out = vae_floor.conv_floor({(8, 8, 4, 8, 3): 3, (8, 8, 8, 4, 1): 1}, jnp.float32, iters=2, with_torch=True)
    assert [(r["k"], r["count"]) for r in out["shapes"]] == [(3, 3), (1, 1)]  # largest work first
    assert out["jax_ms"] == pytest.approx(sum(r["jax_ms"] * r["count"] for r in out["shapes"]))
    assert out["torch_ms"] == pytest.approx(sum(r["torch_ms"] * r["count"] for r in out["shapes"]))
