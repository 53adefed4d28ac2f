"""Samplers equal diffusers' QwenImagePipeline / ZImagePipeline (output_type="latent") on tiny fp32 models, plus the
bf16 arithmetic of the Qwen-Image pipeline (timestep quantisation, scheduler step, true CFG) checked bit for bit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from refs import max_rel_err, tiny_qwen, tiny_qwen_pipeline, tiny_z_image, tiny_z_image_pipeline, to_jax_model
from turbojax import sampling as SM
from turbojax import schedules as S

TOL = 1e-4
H, W = 64, 96  # 8 x 12 latents, 4 x 6 Qwen tokens
BATCH = 2


# ---- latent layout -------------------------------------------------------------------------------------------

def test_pack_unpack_match_diffusers():
    from diffusers import QwenImagePipeline
    x = np.random.default_rng(0).standard_normal((2, 1, 4, 8, 12)).astype(np.float32)  # the pipeline's noise shape
    ref = QwenImagePipeline._pack_latents(torch.tensor(x), 2, 4, 8, 12).numpy()
    np.testing.assert_array_equal(np.asarray(SM.pack_latents(x[:, 0])), ref)
    np.testing.assert_array_equal(np.asarray(SM.pack_latents(x.transpose(0, 2, 1, 3, 4))), ref)  # VAE layout
    back = QwenImagePipeline._unpack_latents(torch.tensor(ref), H, W, 8).numpy()
    np.testing.assert_array_equal(np.asarray(SM.unpack_latents(ref, H, W)), back)
    np.testing.assert_array_equal(back[:, :, 0], x[:, 0])
    with pytest.raises(ValueError, match="multiples of 16"):
        SM.unpack_latents(ref, 72, 96)


def test_noise_layouts():
    key = jax.random.key(3)
    q = SM.qwen_image_noise(key, 2, H, W, channels=4)
    z = SM.z_image_noise(key, 2, H, W, channels=4)
    assert q.shape == (2, 24, 16) and z.shape == (2, 4, 8, 12) and q.dtype == z.dtype == jnp.float32
    # the same draw: Qwen's noise is the packed view of the [B, C, H/8, W/8] normal sample
    np.testing.assert_array_equal(np.asarray(SM.unpack_latents(q, H, W))[:, :, 0], np.asarray(z))


# ---- Qwen-Image ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen_models():
    tm = tiny_qwen(seed=5)
    return tm, to_jax_model(tm, "qwen_image")


def _qwen_text(rng, length, pad_from):
    ctx = rng.standard_normal((BATCH, length, 24)).astype(np.float32)
    mask = np.ones((BATCH, length), np.int64)
    mask[0, pad_from:] = 0
    return ctx, mask


@pytest.mark.parametrize("preset,steps,cfg,neg_len", [
    ("qwen_image_lightning", 2, 1.0, None),
    ("qwen_image_lightning", 2, 4.0, 7),       # same text length: one batched forward
    ("qwen_image", 8, 1.0, None),
    ("qwen_image", 8, 4.0, 5),                 # different lengths: two forwards
    ("qwen_image_lightning", 8, 2.5, 7),
])
def test_qwen_image_sampler_matches_pipeline(qwen_models, preset, steps, cfg, neg_len):
    tm, model = qwen_models
    config = S.PRESETS[preset]
    pipe = tiny_qwen_pipeline(tm, config.to_dict())
    rng = np.random.default_rng(steps)
    latents = np.asarray(SM.qwen_image_noise(jax.random.key(steps), BATCH, H, W, channels=4))
    ctx, mask = _qwen_text(rng, 7, 4)
    neg, neg_mask = _qwen_text(rng, neg_len, 3) if neg_len else (None, None)
    tt = (lambda a: None if a is None else torch.tensor(a))
    ref = pipe(prompt_embeds=tt(ctx), prompt_embeds_mask=tt(mask), negative_prompt_embeds=tt(neg),
               negative_prompt_embeds_mask=tt(neg_mask), true_cfg_scale=cfg, height=H, width=W,
               num_inference_steps=steps, latents=torch.tensor(latents), output_type="latent").images.numpy()
    sigmas = config.sigmas(steps, height=H, width=W)
    np.testing.assert_array_equal(sigmas, pipe.scheduler.sigmas.numpy())
    out = SM.sample_qwen_image(model, latents, ctx, sigmas, height=H, width=W, prompt_embeds_mask=mask,
                               negative_prompt_embeds=neg, negative_prompt_embeds_mask=neg_mask, true_cfg_scale=cfg)
    assert out.shape == ref.shape and out.dtype == jnp.float32
    assert max_rel_err(np.asarray(out), ref) < TOL


def test_qwen_sigma_values_do_not_recompile_and_euler_sample_compat(qwen_models):
    _, model = qwen_models
    rng = np.random.default_rng(1)
    latents = np.asarray(SM.qwen_image_noise(jax.random.key(0), BATCH, H, W, channels=4))
    ctx, mask = _qwen_text(rng, 7, 4)
    run = (lambda s, **kw: np.asarray(SM.sample_qwen_image(model, latents, ctx, s, height=H, width=W,
                                                           prompt_embeds_mask=mask, **kw)))
    a = run(S.explicit_sigmas([1.0, 0.75]))
    size = SM._qwen_loop._cache_size()
    b = run(S.explicit_sigmas([1.0, 0.5]))
    assert SM._qwen_loop._cache_size() == size and not np.allclose(a, b)
    # sample.py's entry point: no CFG, fp32 latents, model time = sigma
    c = SM.euler_sample(model, latents, ctx, mask, [1.0, 0.75, 0.0], img_shapes=((1, 4, 6),))
    np.testing.assert_allclose(np.asarray(c), run(S.explicit_sigmas([1.0, 0.75]), precision="fp32"), atol=1e-6)
    assert max_rel_err(np.asarray(c), a) < TOL  # fp32 model: the modes differ only by timestep rounding
    np.testing.assert_array_equal(np.asarray(SM.sample(model, latents, ctx, S.explicit_sigmas([1.0, 0.75]),
                                                       height=H, width=W, prompt_embeds_mask=mask)), a)


def test_qwen_input_errors(qwen_models):
    _, model = qwen_models
    latents = np.zeros((BATCH, 24, 16), np.float32)
    ctx = np.zeros((BATCH, 7, 24), np.float32)
    sig = S.explicit_sigmas([1.0, 0.75])
    with pytest.raises(ValueError, match="packed"):
        SM.sample_qwen_image(model, latents, ctx, sig, height=H, width=2 * W)
    with pytest.raises(ValueError, match="prompt_embeds_mask"):
        SM.sample_qwen_image(model, latents, ctx, sig, height=H, width=W, prompt_embeds_mask=np.ones((BATCH, 3)))
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        SM.sample_qwen_image(model, latents, ctx, sig, height=H, width=W, negative_prompt_embeds=ctx[:, :, :5])
    with pytest.raises(ValueError, match="precision"):
        SM.sample_qwen_image(model, latents, ctx, sig, height=H, width=W, precision="fp16")
    with pytest.raises(ValueError, match="at least two"):
        SM.sample_qwen_image(model, latents, ctx, [1.0], height=H, width=W)


# ---- bf16 pipeline arithmetic (architectures.md §1.8), against torch on the same bf16 tensors -----------------------

def _bf16(t: torch.Tensor):
    return jnp.asarray(t.float().numpy()).astype(jnp.bfloat16)


def _np(a):
    return np.asarray(jnp.asarray(a).astype(jnp.float32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_qwen_model_timesteps_match_pipeline(dtype):
    from diffusers import FlowMatchEulerDiscreteScheduler
    jdt = {torch.bfloat16: jnp.bfloat16, torch.float16: jnp.float16, torch.float32: jnp.float32}[dtype]
    for cfg, n in ((S.QWEN_IMAGE, 8), (S.QWEN_IMAGE, 50), (S.QWEN_IMAGE_LIGHTNING, 8)):
        sched = FlowMatchEulerDiscreteScheduler.from_config(cfg.to_dict())
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=cfg.mu(83 * 83))
        ref = (sched.timesteps.expand(1, n)[0].to(dtype) / 1000).float().numpy()  # the pipeline's expression
        np.testing.assert_array_equal(SM.qwen_model_timesteps(sched.sigmas.numpy(), jdt), ref)
    quantised = SM.qwen_model_timesteps(S.QWEN_IMAGE_LIGHTNING.sigmas(8), jnp.bfloat16)
    assert quantised[4] == 0.75390625 and quantised[1] == 0.95703125


def test_bf16_euler_step_and_true_cfg_are_bit_exact():
    from diffusers import FlowMatchEulerDiscreteScheduler
    g = torch.Generator().manual_seed(0)
    sched = FlowMatchEulerDiscreteScheduler.from_config(S.QWEN_IMAGE.to_dict())
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 8, 8), mu=0.7)
    sched.set_begin_index(0)
    sig = sched.sigmas.numpy()
    x = torch.randn(2, 24, 16, generator=g).bfloat16()
    ours = _bf16(x)
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(2, 24, 16, generator=g).bfloat16()
        x = sched.step(v, t, x, return_dict=False)[0]
        ours = SM.euler_step(ours, _bf16(v), sig[i], sig[i + 1])
        assert x.dtype == torch.bfloat16 and ours.dtype == jnp.bfloat16
        np.testing.assert_array_equal(_np(ours), x.float().numpy())
    cond, neg = (torch.randn(2, 24, 16, generator=g).bfloat16() for _ in range(2))
    comb = neg + 4.0 * (cond - neg)  # the pipeline's lines, in bf16
    ref = comb * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
    out = SM.qwen_true_cfg(_bf16(cond), _bf16(neg), 4.0)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(_np(out), ref.float().numpy())


def test_bf16_model_sampling_runs_in_pipeline_dtype(qwen_models):
    tm, _ = qwen_models
    model = to_jax_model(tm, "qwen_image", param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    rng = np.random.default_rng(2)
    latents = np.asarray(SM.qwen_image_noise(jax.random.key(1), BATCH, H, W, channels=4))
    ctx, mask = _qwen_text(rng, 7, 4)
    kw = dict(height=H, width=W, prompt_embeds_mask=mask, negative_prompt_embeds=ctx[::-1], true_cfg_scale=3.0)
    sig = S.QWEN_IMAGE_LIGHTNING.sigmas(2)
    a = SM.sample_qwen_image(model, latents, ctx, sig, **kw)
    b = SM.sample_qwen_image(model, latents, ctx, sig, precision="fp32", **kw)
    assert a.dtype == jnp.bfloat16 and b.dtype == jnp.float32
    assert max_rel_err(_np(a), np.asarray(b)) < 5e-2


# ---- Z-Image ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def z_models():
    tm = tiny_z_image(seed=5)
    return tm, to_jax_model(tm, "z_image")


@pytest.mark.parametrize("steps,guidance,norm,trunc", [
    (2, 0.0, False, 1.0),    # Turbo: no CFG
    (2, 4.0, False, 1.0),    # pos and neg as one ragged batch
    (8, 0.0, False, 1.0),
    (8, 4.0, 1.1, 1.0),      # cfg_normalization caps the norm
    (8, 3.0, False, 0.5),    # cfg_truncation: late steps without CFG (lax.cond)
])
def test_z_image_sampler_matches_pipeline(z_models, steps, guidance, norm, trunc):
    tm, model = z_models
    pipe = tiny_z_image_pipeline(tm, S.Z_IMAGE_TURBO.to_dict())
    rng = np.random.default_rng(steps)
    latents = np.asarray(SM.z_image_noise(jax.random.key(steps), BATCH, H, W, channels=4))
    caps = [rng.standard_normal((n, 24)).astype(np.float32) for n in (7, 40)]
    negs = [rng.standard_normal((n, 24)).astype(np.float32) for n in (3, 5)]
    ref = pipe(prompt_embeds=[torch.tensor(c) for c in caps], negative_prompt_embeds=[torch.tensor(c) for c in negs],
               guidance_scale=guidance, cfg_normalization=norm, cfg_truncation=trunc, height=H, width=W,
               num_inference_steps=steps, latents=torch.tensor(latents), output_type="latent").images.numpy()
    sigmas = S.Z_IMAGE_TURBO.sigmas(steps, "z_image")
    np.testing.assert_array_equal(sigmas, pipe.scheduler.sigmas.numpy())
    out = SM.sample_z_image(model, latents, caps, sigmas, negative_prompt_embeds=negs, guidance_scale=guidance,
                            cfg_normalization=norm, cfg_truncation=trunc)
    assert out.shape == ref.shape and out.dtype == jnp.float32
    assert max_rel_err(np.asarray(out), ref) < TOL


def test_z_image_model_time_and_errors(z_models):
    _, model = z_models
    sig = S.Z_IMAGE_TURBO.sigmas(8, "z_image")
    np.testing.assert_allclose(SM.z_image_model_timesteps(sig), 1 - sig[:-1], atol=1e-7)
    latents = np.zeros((BATCH, 4, 8, 12), np.float32)
    caps = [np.zeros((3, 24), np.float32)] * BATCH
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        SM.sample_z_image(model, latents, caps, sig)
    with pytest.raises(ValueError, match="one entry per latent"):
        SM.sample_z_image(model, latents, caps[:1], sig, guidance_scale=0.0)
    with pytest.raises(ValueError, match=r"latents must be \[B, 4"):
        SM.sample_z_image(model, latents[:, :3], caps, sig, guidance_scale=0.0)
    # an array of captions (all tokens valid) is the same as the list
    a = SM.sample_z_image(model, latents + 1, np.ones((BATCH, 3, 24), np.float32), sig[[0, -1]], guidance_scale=0.0)
    b = SM.sample_z_image(model, latents + 1, [np.ones((3, 24), np.float32)] * BATCH, sig[[0, -1]],
                          guidance_scale=0.0)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
