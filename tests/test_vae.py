"""VAE parity with diffusers (AutoencoderKLQwenImage, AutoencoderKL as used by FLUX / Z-Image) on tiny random
configs in fp32: encode / decode, tiling (against diffusers' own tiled paths), latent (de)normalisation, clamping,
conversion round trips and input checks."""
import dataclasses

import numpy as np
import pytest
import torch
from flax import nnx

from refs import max_rel_err, perturb_, state_dict_np
from turbojax import models
from turbojax.convert.__main__ import main as cli
from turbojax.convert.keytable import Leaf
from turbojax.convert.params import load_into
from turbojax.models.registry import config_from_dict, get_family

TOL = 1e-4
QWEN_FAM, KL_FAM = get_family("qwen_image_vae"), get_family("autoencoder_kl")

TINY_QWEN_VAE = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                     temperal_downsample=[False, True, True],
                     latents_mean=[0.1, -0.2, 0.3, -0.4], latents_std=[1.5, 0.5, 2.0, 1.0])
TINY_KL = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
               sample_size=32, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
               use_post_quant_conv=False)
# diffusers' tiling with 32-pixel tiles every 24 pixels: both classes then tile the same way
QWEN_TILES = dict(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24,
                  tile_sample_stride_width=24)


def tiny_qwen_vae(seed=0, **overrides):
    from diffusers import AutoencoderKLQwenImage
    torch.manual_seed(seed)
    return perturb_(AutoencoderKLQwenImage(**{**TINY_QWEN_VAE, **overrides}), seed, std=0.1)


def tiny_kl(seed=0, **overrides):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return perturb_(AutoencoderKL(**{**TINY_KL, **overrides}), seed, std=0.1)


def to_jax(tm, fam):
    sd = state_dict_np(tm)
    cfg = config_from_dict(fam, dict(tm.config), "torch model")
    abstract = nnx.eval_shape(lambda: fam.model_cls(cfg, rngs=nnx.Rngs(0)))
    return load_into(abstract, fam, sd.__getitem__, {k: v.shape for k, v in sd.items()}, "torch model",
                     progress=False)


@pytest.fixture(scope="module")
def qwen():
    tm = tiny_qwen_vae()
    return tm, to_jax(tm, QWEN_FAM)


@pytest.fixture(scope="module")
def kl():
    tm = tiny_kl()
    return tm, to_jax(tm, KL_FAM)


def images(shape, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def latents(shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---- key-table kinds ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("perm,shape", [((2, 3, 1, 0), (5, 3, 3, 2)), ((2, 3, 4, 1, 0), (5, 3, 3, 1, 2)),
                                        (None, (4, 1, 1, 1))])
def test_conv_leaf_layouts_are_exact_inverses(perm, shape):
    leaf = Leaf(("k",), ("w",), False, False, perm)
    t = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    j = leaf.to_jax([t])
    assert leaf.torch_shape(j.shape) == shape
    (back,) = leaf.to_torch(j)
    assert back.flags.c_contiguous and back.tobytes() == t.tobytes()


# ---- Qwen-Image VAE -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 3, 1, 24, 40), (1, 3, 1, 16, 16)])
def test_qwen_encode_matches_diffusers(qwen, shape):
    tm, vae = qwen
    x = images(shape)
    with torch.no_grad():
        ref = tm.encode(torch.tensor(x)).latent_dist
    dist = vae.encode(x).latent_dist
    assert dist.mean.shape == tuple(ref.mean.shape)
    assert max_rel_err(dist.mean, ref.mean.numpy()) < TOL
    assert max_rel_err(dist.logvar, ref.logvar.numpy()) < TOL
    assert max_rel_err(dist.std, ref.std.numpy()) < TOL
    assert dist.mode() is dist.mean


def test_qwen_decode_matches_diffusers_and_clamps(qwen):
    tm, vae = qwen
    z = latents((2, 4, 1, 3, 5))
    with torch.no_grad():
        ref = tm.decode(torch.tensor(z)).sample.numpy()
        raw = tm.decoder(tm.post_quant_conv(torch.tensor(z))).numpy()  # before the clamp
    out = np.asarray(vae.decode(z).sample)
    assert out.shape == ref.shape == (2, 3, 1, 24, 40)
    assert max_rel_err(out, ref) < TOL
    assert np.abs(raw).max() > 1.0 and out.min() >= -1.0 and out.max() <= 1.0  # the clamp is exercised
    # 4-D input gives 4-D output, same values
    (out4,) = vae.decode(z[:, :, 0], return_dict=False)
    np.testing.assert_array_equal(np.asarray(out4), out[:, :, 0])


def test_qwen_forward_and_latent_normalisation(qwen):
    tm, vae = qwen
    x = images((1, 3, 1, 16, 24), seed=3)
    with torch.no_grad():
        ref = tm(torch.tensor(x)).sample.numpy()
    assert max_rel_err(np.asarray(vae(x).sample), ref) < TOL
    z = latents((2, 4, 1, 3, 5))
    mean = np.array(TINY_QWEN_VAE["latents_mean"], np.float32).reshape(1, 4, 1, 1, 1)
    std = np.array(TINY_QWEN_VAE["latents_std"], np.float32).reshape(1, 4, 1, 1, 1)
    z_dit = np.asarray(vae.normalize_latents(z))
    np.testing.assert_allclose(z_dit, (z - mean) / std, rtol=1e-6, atol=1e-6)
    # the Qwen pipeline's decode-side formula: latents / (1 / std) + mean
    pipe = (torch.tensor(z_dit) / (1.0 / torch.tensor(std)) + torch.tensor(mean)).numpy()
    np.testing.assert_allclose(np.asarray(vae.denormalize_latents(z_dit)), pipe, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(pipe, z, atol=1e-5)


def test_qwen_tiled_decode_matches_diffusers_tiling(qwen):
    tm, vae = qwen
    z = latents((1, 4, 1, 7, 9), seed=5)
    tm.enable_tiling(**QWEN_TILES)
    try:
        with torch.no_grad():
            ref_tiled = tm.decode(torch.tensor(z)).sample.clamp(-1, 1).numpy()
    finally:
        tm.disable_tiling()
    full = np.asarray(vae.decode(z).sample)
    vae.enable_tiling(**QWEN_TILES)
    try:
        tiled = np.asarray(vae.decode(z).sample)
    finally:
        vae.disable_tiling()
    assert tiled.shape == full.shape == (1, 3, 1, 56, 72)
    assert max_rel_err(tiled, ref_tiled) < TOL  # same tiles, same blending as diffusers
    seam = float(np.abs(tiled - full).max())
    print(f"qwen tiled-vs-untiled decode: max |diff| {seam:.3g}, mean {np.abs(tiled - full).mean():.3g}")
    assert seam > 0  # the tiled path really ran


def test_qwen_tiled_encode_matches_diffusers_tiling(qwen):
    tm, vae = qwen
    x = images((1, 3, 1, 56, 72), seed=6)
    tm.enable_tiling(**QWEN_TILES)
    try:
        with torch.no_grad():
            ref = tm.encode(torch.tensor(x)).latent_dist.mean.numpy()
    finally:
        tm.disable_tiling()
    full = np.asarray(vae.encode(x).latent_dist.mean)
    vae.enable_tiling(**QWEN_TILES)
    try:
        tiled = np.asarray(vae.encode(x).latent_dist.mean)
    finally:
        vae.disable_tiling()
    assert max_rel_err(tiled, ref) < TOL
    print(f"qwen tiled-vs-untiled encode: max rel diff {max_rel_err(tiled, full):.3g}")


def test_qwen_bad_inputs(qwen):
    _, vae = qwen
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(images((1, 3, 1, 20, 24)))
    with pytest.raises(ValueError, match="3 channels"):
        vae.encode(images((1, 4, 1, 16, 16)))
    with pytest.raises(ValueError, match="single images"):
        vae.encode(images((1, 3, 2, 16, 16)))
    with pytest.raises(ValueError, match="4 channels"):
        vae.decode(latents((1, 16, 1, 2, 2)))
    with pytest.raises(ValueError, match="expected"):
        vae.decode(latents((4, 2, 2)))
    with pytest.raises(ValueError, match="multiple of 8"):
        vae.enable_tiling(30, 32, 24, 24)
    with pytest.raises(NotImplementedError, match="attn_scales"):
        models.create(dataclasses.replace(QWEN_FAM.presets["qwen_image_vae_tiny"], attn_scales=(1.0,)))


# ---- AutoencoderKL (FLUX / Z-Image) -----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 3, 24, 40), (1, 3, 16, 16)])
def test_kl_encode_decode_match_diffusers(kl, shape):
    tm, vae = kl
    x = images(shape)
    z = latents((shape[0], 4, shape[2] // 8, shape[3] // 8))
    with torch.no_grad():
        ref = tm.encode(torch.tensor(x)).latent_dist
        ref_dec = tm.decode(torch.tensor(z)).sample.numpy()
    dist = vae.encode(x).latent_dist
    assert max_rel_err(dist.mean, ref.mean.numpy()) < TOL
    assert max_rel_err(dist.logvar, ref.logvar.numpy()) < TOL
    dec = np.asarray(vae.decode(z).sample)
    assert dec.shape == ref_dec.shape
    assert max_rel_err(dec, ref_dec) < TOL


def test_kl_with_quant_convs_and_no_mid_attention():
    tm = tiny_kl(seed=3, use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=False,
                 block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=2)
    vae = to_jax(tm, KL_FAM)
    x = images((2, 3, 8, 12), seed=4)
    with torch.no_grad():
        ref = tm(torch.tensor(x)).sample.numpy()
    assert max_rel_err(np.asarray(vae(x).sample), ref) < TOL


def test_kl_latent_normalisation(kl):
    _, vae = kl
    z = latents((2, 4, 3, 5))
    z_dit = np.asarray(vae.normalize_latents(z))
    np.testing.assert_allclose(z_dit, (z - 0.1159) * 0.3611, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(vae.denormalize_latents(z_dit)), z, atol=1e-5)


def test_kl_tiled_decode_and_encode_match_diffusers_tiling(kl):
    tm, vae = kl
    z = latents((1, 4, 7, 9), seed=5)
    x = images((1, 3, 56, 72), seed=6)
    tm.enable_tiling()
    try:
        with torch.no_grad():
            ref_dec = tm.decode(torch.tensor(z)).sample.numpy()
            ref_enc = tm.encode(torch.tensor(x)).latent_dist.mean.numpy()
    finally:
        tm.disable_tiling()
    full = np.asarray(vae.decode(z).sample)
    vae.enable_tiling(32, 0.25)  # diffusers' defaults: tiles of sample_size (32 here), 25 % overlap
    try:
        tiled = np.asarray(vae.decode(z).sample)
        tiled_enc = np.asarray(vae.encode(x).latent_dist.mean)
    finally:
        vae.disable_tiling()
    assert tiled.shape == full.shape == ref_dec.shape == (1, 3, 56, 72)
    assert max_rel_err(tiled, ref_dec) < TOL
    assert max_rel_err(tiled_enc, ref_enc) < TOL
    seam = max_rel_err(tiled, full)
    print(f"kl tiled-vs-untiled decode: max rel diff {seam:.3g}")
    assert seam > 0  # the tiled path really ran


def test_kl_bad_inputs(kl):
    _, vae = kl
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(images((1, 3, 16, 12)))
    with pytest.raises(ValueError, match="3 channels"):
        vae.encode(images((1, 1, 16, 16)))
    with pytest.raises(ValueError, match="4 channels"):
        vae.decode(latents((1, 16, 2, 2)))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        vae.encode(images((1, 3, 1, 16, 16)))
    with pytest.raises(NotImplementedError, match="block types"):
        dataclasses.replace(KL_FAM.presets["flux_vae_tiny"], down_block_types=("CrossAttnDownBlock2D",) * 4
                            ).validate()


def test_default_tiling_settings_match_diffusers():
    for tm, fam, names in ((tiny_qwen_vae(), QWEN_FAM, ("tile_sample_min_height", "tile_sample_min_width",
                                                       "tile_sample_stride_height", "tile_sample_stride_width")),
                           (tiny_kl(), KL_FAM, ("tile_sample_min_size", "tile_latent_min_size",
                                                "tile_overlap_factor"))):
        cfg = config_from_dict(fam, dict(tm.config), "torch model")
        vae = nnx.eval_shape(lambda: fam.model_cls(cfg, rngs=nnx.Rngs(0)))
        assert vae.use_tiling is False
        assert {n: getattr(vae, n) for n in names} == {n: getattr(tm, n) for n in names}

@pytest.mark.parametrize("which", ["qwen", "kl"])
def test_tiling_seam_error_shrinks_with_tile_size(request, which):
    """Random tiny decoders are far from smooth (every output pixel depends on the whole latent through the mid
    attention and deep receptive fields), so tiled output differs a lot from untiled output; what must hold is
    that larger tiles (more context per tile) cut the error. Measured numbers are printed (run with -s)."""
    tm, vae = request.getfixturevalue(which)
    z = latents((1, 4, 1, 12, 12) if which == "qwen" else (1, 4, 12, 12), seed=8)
    full = np.asarray(vae.decode(z).sample)
    errs = {}
    for tile in (32, 64):
        if which == "qwen":
            vae.enable_tiling(tile, tile, tile * 3 // 4, tile * 3 // 4)
        else:
            vae.enable_tiling(tile)  # 25 % overlap
        try:
            tiled = np.asarray(vae.decode(z).sample)
        finally:
            vae.disable_tiling()
        d = np.abs(tiled - full)
        errs[tile] = (float(d.mean() / np.abs(full).mean()), max_rel_err(tiled, full))
        print(f"{which} {tile}px tiles: mean |tiled - untiled| / mean |untiled| {errs[tile][0]:.3g}, "
              f"max rel {errs[tile][1]:.3g}")
    assert errs[64][0] < errs[32][0] and errs[64][1] <= errs[32][1]

# ---- conversion -------------------------------------------------------------------------------------------------

def files_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("which", ["qwen", "kl"])
def test_conversion_round_trip_is_byte_exact_and_loads(tmp_path, which):
    tm = tiny_qwen_vae(seed=7) if which == "qwen" else tiny_kl(seed=7)
    tm.save_pretrained(tmp_path / "src")
    assert cli(["to-jax", str(tmp_path / "src"), str(tmp_path / "jax"), "--no-progress"]) == 0
    assert cli(["to-torch", str(tmp_path / "jax"), str(tmp_path / "back"), "--no-progress"]) == 0
    assert files_bytes(tmp_path / "back") == files_bytes(tmp_path / "src")
    if which == "qwen":  # the unused temporal convs survive too
        assert any(".time_conv." in k for k in tm.state_dict())
    z = latents((1, 4, 1, 2, 3) if which == "qwen" else (1, 4, 2, 3))
    with torch.no_grad():
        ref = tm.decode(torch.tensor(z)).sample.numpy()
    for folder in ("src", "jax"):
        vae = models.from_diffusers(tmp_path / folder, progress=False)
        assert type(vae).__name__ == ("AutoencoderKLQwenImage" if which == "qwen" else "AutoencoderKL")
        assert max_rel_err(np.asarray(vae.decode(z).sample), ref) < TOL


# ---- decoder remat (the DINO discriminator differentiates through the decode) ---------------------------------

@pytest.mark.parametrize("which", ["qwen", "kl"])
def test_decoder_remat_same_values_and_gradients_fewer_saved(which, request):
    """`decoder(z, remat=True)` checkpoints each resnet / upsampler of the up blocks: the same image and the same
    gradient w.r.t. the latents, and the backward pass keeps fewer residuals."""
    import jax
    import jax.numpy as jnp
    _, vae = request.getfixturevalue(which)
    decoder = vae.decoder
    z = jnp.asarray(latents((2, 8, 8, 4)))  # NHWC latents of a 64x64 image

    def loss(z, remat):
        return jnp.sum(jnp.square(decoder(z, remat=remat)))
    plain, ck = (jax.value_and_grad(lambda z, r=r: loss(z, r))(z) for r in (False, True))
    np.testing.assert_allclose(np.asarray(ck[0]), np.asarray(plain[0]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ck[1]), np.asarray(plain[1]), rtol=1e-4, atol=1e-5 * float(
        jnp.abs(plain[1]).max()))

    def saved_bytes(remat):  # what the backward keeps: the arrays held by the VJP closure (its residuals)
        _, vjp = jax.vjp(lambda z: loss(z, remat), z)
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(vjp) if hasattr(x, "dtype"))
    assert saved_bytes(True) < 0.5 * saved_bytes(False), (saved_bytes(True), saved_bytes(False))
