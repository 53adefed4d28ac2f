"""Tiny PyTorch reference models (diffusers) with non-trivial random weights, shared by the parity tests."""
from __future__ import annotations

import numpy as np
import torch

TINY_QWEN = dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                 in_channels=16, out_channels=4, axes_dims_rope=(4, 6, 6))


def perturb_(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter: default inits zero some layers, which would hide wiring mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


def tiny_qwen(seed: int = 0, **overrides):
    from diffusers import QwenImageTransformer2DModel
    torch.manual_seed(seed)
    return perturb_(QwenImageTransformer2DModel(**{**TINY_QWEN, **overrides}), seed)


def state_dict_np(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
            for k, v in module.state_dict().items()}


def qwen_inputs(rng: np.random.Generator, *, batch=2, h=4, w=6, text_len=7, in_channels=16, text_dim=24,
                pad_from=(None, 4)):
    """Packed latents [B, h*w, C], text [B, L, D], mask with sample b valid up to pad_from[b], sigmas in (0, 1)."""
    x = rng.standard_normal((batch, h * w, in_channels)).astype(np.float32)
    ctx = rng.standard_normal((batch, text_len, text_dim)).astype(np.float32)
    mask = np.ones((batch, text_len), np.float32)
    for b, p in enumerate(pad_from[:batch]):
        if p is not None:
            mask[b, p:] = 0
    t = rng.uniform(0.05, 0.95, size=(batch,)).astype(np.float32)
    return dict(hidden_states=x, encoder_hidden_states=ctx, encoder_hidden_states_mask=mask, timestep=t,
                img_shapes=[[(1, h, w)]] * batch)


def run_torch(model, inputs: dict) -> np.ndarray:
    kw = {k: (torch.tensor(v) if isinstance(v, np.ndarray) else v) for k, v in inputs.items()}
    with torch.no_grad():
        return model(**kw).sample.float().numpy()


def max_rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    """Max abs error relative to the output scale (max |ref|)."""
    return float(np.abs(np.asarray(out, np.float64) - ref).max() / max(np.abs(ref).max(), 1e-12))


# ---- Z-Image -----------------------------------------------------------------------------------------------------

TINY_Z_IMAGE = dict(in_channels=4, dim=64, n_layers=2, n_refiner_layers=2, n_heads=2, n_kv_heads=2, cap_feat_dim=24,
                    axes_dims=(8, 12, 12), axes_lens=(256, 64, 64))


def tiny_z_image(seed: int = 0, **overrides):
    """Tiny diffusers ZImageTransformer2DModel; `perturb_` also makes the (zero-initialised) pad tokens non-zero."""
    from diffusers import ZImageTransformer2DModel
    torch.manual_seed(seed)
    return perturb_(ZImageTransformer2DModel(**{**TINY_Z_IMAGE, **overrides}), seed)


def z_image_inputs(rng: np.random.Generator, *, grids=((3, 5), (4, 4)), cap_lens=(5, 37), in_channels=4,
                   cap_dim=24, frames=1):
    """Per-sample latents [C, F, 2*gh, 2*gw] (patch grids gh x gw), captions [L_i, cap_dim], t = 1 - sigma."""
    x = [rng.standard_normal((in_channels, frames, 2 * gh, 2 * gw)).astype(np.float32) for gh, gw in grids]
    caps = [rng.standard_normal((n, cap_dim)).astype(np.float32) for n in cap_lens]
    t = rng.uniform(0.05, 0.95, size=(len(grids),)).astype(np.float32)
    return dict(x=x, t=t, cap_feats=caps)


def run_torch_z_image(model, inputs: dict) -> list[np.ndarray]:
    with torch.no_grad():
        out = model([torch.tensor(a) for a in inputs["x"]], torch.tensor(inputs["t"]),
                    [torch.tensor(c) for c in inputs["cap_feats"]]).sample
    return [o.float().numpy() for o in out]


def max_rel_err_list(outs, refs) -> float:
    """`max_rel_err` over per-sample outputs (shapes must match sample by sample)."""
    assert len(outs) == len(refs)
    for o, r in zip(outs, refs):
        assert tuple(np.shape(o)) == tuple(r.shape), (np.shape(o), r.shape)
    return max(max_rel_err(np.asarray(o, np.float32), r) for o, r in zip(outs, refs))


# ---- pipelines and torch -> JAX models (sampler parity) ------------------------------------------------------------

def to_jax_model(tm: torch.nn.Module, family: str, **model_kw):
    """Our model with the torch model's weights (fp32), through the same loader as `from_diffusers`."""
    from flax import nnx

    from turbojax.convert.params import load_into
    from turbojax.models.registry import config_from_dict, get_family
    fam = get_family(family)
    sd = state_dict_np(tm)
    cfg = config_from_dict(fam, dict(tm.config), "torch model")
    abstract = nnx.eval_shape(lambda: fam.model_cls(cfg, rngs=nnx.Rngs(0), **model_kw))
    return load_into(abstract, fam, sd.__getitem__, {k: v.shape for k, v in sd.items()}, "torch model",
                     progress=False)


def tiny_qwen_pipeline(transformer, scheduler_config: dict):
    """`QwenImagePipeline` without text encoder; the tiny VAE only sets the 8x latent scale (never run)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=transformer.config.in_channels // 4, dim_mult=[1, 1, 1, 1],
                                 num_res_blocks=1)
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler_config), vae=vae,
                             text_encoder=None, tokenizer=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_z_image_pipeline(transformer, scheduler_config: dict):
    """`ZImagePipeline` without text encoder; the tiny VAE (4 blocks -> 8x) only sets the latent scale."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(4, 4, 4, 4), layers_per_block=1, norm_num_groups=2,
                        latent_channels=transformer.config.in_channels)
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler_config), vae=vae,
                          text_encoder=None, tokenizer=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe
