"""Qwen-Image parity with diffusers' QwenImageTransformer2DModel on tiny random configs (fp32)."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from refs import TINY_QWEN, max_rel_err, qwen_inputs, run_torch, state_dict_np, tiny_qwen
from turbojax.convert.params import load_into
from turbojax.models.qwen_image import QwenImageConfig, qwen_rope_positions
from turbojax.models.registry import config_from_dict, get_family
from turbojax.nn.layers import timestep_sinusoid
from turbojax.nn.rope import rope_angles

TOL = 1e-4
FAM = get_family("qwen_image")


def to_jax(tm, **model_kw):
    sd = state_dict_np(tm)
    cfg = config_from_dict(FAM, dict(tm.config), "torch model")
    abstract = nnx.eval_shape(lambda: FAM.model_cls(cfg, rngs=nnx.Rngs(0), **model_kw))
    return load_into(abstract, FAM, sd.__getitem__, {k: v.shape for k, v in sd.items()}, "torch model",
                     progress=False)


@pytest.mark.parametrize("shape,text_len", [((1, 4, 6), 7), ((1, 5, 3), 4), ((1, 7, 7), 1)])
def test_rope_tables_match_diffusers(shape, text_len):
    tm = tiny_qwen()
    img_f, txt_f = tm.pos_embed([shape], max_txt_seq_len=text_len, device=torch.device("cpu"))
    ip, tp = qwen_rope_positions([shape], text_len)
    for ours, ref in ((ip, img_f), (tp, txt_f)):
        ang = rope_angles(ours, TINY_QWEN["axes_dims_rope"], 10000.0)
        np.testing.assert_allclose(np.cos(ang), ref.real.numpy(), atol=1e-6)
        np.testing.assert_allclose(np.sin(ang), ref.imag.numpy(), atol=1e-6)


def test_timestep_sinusoid_matches_diffusers():
    from diffusers.models.embeddings import Timesteps
    t = np.array([0.0, 0.02, 0.5, 0.75, 1.0], np.float32)
    ref = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)(torch.tensor(t)).numpy()
    np.testing.assert_allclose(np.asarray(timestep_sinusoid(jnp.asarray(t), 256)), ref, atol=2e-4)


def test_single_block_matches_diffusers():
    tm = tiny_qwen(seed=1)
    ours = to_jax(tm, scan_layers=False)
    rng = np.random.default_rng(0)
    b, n, l, d = 2, 12, 5, tm.inner_dim
    img = rng.standard_normal((b, n, d)).astype(np.float32)
    txt = rng.standard_normal((b, l, d)).astype(np.float32)
    temb = rng.standard_normal((b, d)).astype(np.float32)
    mask = np.ones((b, l), bool)
    mask[1, 3:] = False
    img_f, txt_f = tm.pos_embed([(1, 3, 4)], max_txt_seq_len=l, device=torch.device("cpu"))
    with torch.no_grad():
        ref_txt, ref_img = tm.transformer_blocks[0](
            hidden_states=torch.tensor(img), encoder_hidden_states=torch.tensor(txt),
            encoder_hidden_states_mask=torch.tensor(mask), temb=torch.tensor(temb), image_rotary_emb=(img_f, txt_f))
    ip, tp = qwen_rope_positions([(1, 3, 4)], l)
    ia, ta = (rope_angles(p, TINY_QWEN["axes_dims_rope"], 10000.0) for p in (ip, tp))
    rope = ((jnp.cos(ia), jnp.sin(ia)), (jnp.cos(ta), jnp.sin(ta)))
    key_mask = jnp.concatenate([jnp.asarray(mask), jnp.ones((b, n), bool)], axis=1)
    out_img, out_txt = ours.transformer_blocks[0](jnp.asarray(img), jnp.asarray(txt),
                                                  jax_silu(temb), key_mask, rope)
    assert max_rel_err(out_img, ref_img.numpy()) < TOL
    # padded text rows are garbage in both implementations (never used as keys); compare valid rows only
    valid = mask[..., None]
    assert max_rel_err(np.where(valid, out_txt, 0), np.where(valid, ref_txt.numpy(), 0)) < TOL


def jax_silu(x):
    import jax
    return jax.nn.silu(jnp.asarray(x))


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "loop"])
@pytest.mark.parametrize("h,w,pad_from", [(4, 6, (None, 4)), (5, 3, (2, 6)), (2, 2, (None, None))])
def test_full_model_matches_diffusers(scan, h, w, pad_from):
    tm = tiny_qwen(seed=2)
    inputs = qwen_inputs(np.random.default_rng(1), h=h, w=w, pad_from=pad_from)
    ref = run_torch(tm, inputs)
    out = np.asarray(to_jax(tm, scan_layers=scan)(**inputs))
    assert out.shape == ref.shape
    assert max_rel_err(out, ref) < TOL


def test_mask_none_and_remat_and_return_tuple():
    tm = tiny_qwen(seed=3, num_layers=3)
    inputs = qwen_inputs(np.random.default_rng(2), batch=1, h=3, w=5, pad_from=(None,))
    inputs["encoder_hidden_states_mask"] = None
    ref = run_torch(tm, inputs)
    model = to_jax(tm, scan_layers=True, remat="full")
    (out,) = model(**inputs, return_dict=False)
    assert max_rel_err(np.asarray(out), ref) < TOL


def test_bf16_compute_is_close():
    tm = tiny_qwen(seed=4)
    inputs = qwen_inputs(np.random.default_rng(3))
    ref = run_torch(tm, inputs)
    out = to_jax(tm, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)(**inputs)
    assert out.dtype == jnp.bfloat16
    assert max_rel_err(np.asarray(out, np.float32), ref) < 5e-2


def test_bad_inputs_raise_clear_errors():
    tm = tiny_qwen()
    model = to_jax(tm)
    inputs = qwen_inputs(np.random.default_rng(4))
    with pytest.raises(ValueError, match="img_shapes"):
        model(**{**inputs, "img_shapes": [[(1, 3, 3)]] * 2})
    with pytest.raises(ValueError, match="encoder_hidden_states_mask"):
        model(**{**inputs, "encoder_hidden_states_mask": np.ones((2, 3))})
    with pytest.raises(ValueError, match="hidden_states must be"):
        model(**{**inputs, "hidden_states": np.ones((2, 24, 5), np.float32)})
    with pytest.raises(NotImplementedError, match="zero_cond_t"):
        QwenImageConfig(zero_cond_t=True).validate()
