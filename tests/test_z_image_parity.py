"""Z-Image parity with diffusers' ZImageTransformer2DModel on tiny random configs (fp32 unless stated), plus
original-name checkpoint loading and LoRA loading against diffusers' own LoRA path."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file

from refs import (TINY_Z_IMAGE, max_rel_err, max_rel_err_list, run_torch_z_image, state_dict_np, tiny_z_image,
                  z_image_inputs)
from turbojax import models
from turbojax.convert.params import ConversionError, load_into, model_leaves
from turbojax.models.registry import config_from_dict, get_family, get_preset
from turbojax.models.z_image import (Z_IMAGE_TINY, Z_IMAGE_TURBO, ZImageConfig, patchify, plan_tokens,
                                     time_sinusoid)
from turbojax.convert.params import source_reader
from turbojax.models.z_image_keys import original_to_diffusers

TOL = 1e-4
FAM = get_family("z_image")


def to_jax(tm, sd=None, **model_kw):
    sd = state_dict_np(tm) if sd is None else sd
    cfg = config_from_dict(FAM, dict(tm.config), "torch model")
    abstract = nnx.eval_shape(lambda: FAM.model_cls(cfg, rngs=nnx.Rngs(0), **model_kw))
    return load_into(abstract, FAM, sd.__getitem__, {k: v.shape for k, v in sd.items()}, "torch model",
                     progress=False)


# ---- config, presets, key table --------------------------------------------------------------------------------

def test_presets_and_published_config():
    assert get_preset("z_image_turbo") == (FAM, Z_IMAGE_TURBO)
    assert get_preset("z_image_tiny")[1] == Z_IMAGE_TINY
    assert {k: getattr(Z_IMAGE_TINY, k) for k in TINY_Z_IMAGE} == TINY_Z_IMAGE
    published = {"_class_name": "ZImageTransformer2DModel", "_diffusers_version": "0.36.0.dev0",
                 "all_f_patch_size": [1], "all_patch_size": [2], "axes_dims": [32, 48, 48],
                 "axes_lens": [1536, 512, 512], "cap_feat_dim": 2560, "dim": 3840, "in_channels": 16,
                 "n_heads": 30, "n_kv_heads": 30, "n_layers": 30, "n_refiner_layers": 2, "norm_eps": 1e-05,
                 "qk_norm": True, "rope_theta": 256.0, "t_scale": 1000.0}
    assert config_from_dict(FAM, published, "config.json") == Z_IMAGE_TURBO
    # the diffusers class default differs from the published config (architectures.md §6.7)
    assert ZImageConfig().axes_lens == (1024, 512, 512)


def test_real_size_parameter_count_and_key_table():
    """The abstract 6B model has exactly the published parameter count and its table the 521 diffusers tensors."""
    model = nnx.eval_shape(lambda: FAM.model_cls(Z_IMAGE_TURBO, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16))
    leaves = model_leaves(model, FAM)
    assert sum(len(leaf.torch_keys) for leaf in leaves) == 521
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n == 6_154_908_736
    # every parameter carries logical axis names, one per dimension (stacked blocks add a leading layers axis)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata().get("axes")
        stacked = path[0] in ("noise_refiner", "context_refiner", "layers")
        assert axes is not None and len(axes) == len(var.shape) - stacked, (path, axes)


# ---- pieces ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("grid,cap_len", [((3, 5), 5), ((4, 4), 37), ((4, 8), 32), ((1, 1), 1)])
def test_patchify_positions_and_rope_match_diffusers(grid, cap_len):
    tm = tiny_z_image()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 1, 2 * grid[0], 2 * grid[1])).astype(np.float32)
    cap = rng.standard_normal((cap_len, 24)).astype(np.float32)
    (img,), (capp,), _, (img_pos,), (cap_pos,), (img_pad,), (cap_pad,) = tm.patchify_and_embed(
        [torch.tensor(x)], [torch.tensor(cap)], 2, 1)
    n = grid[0] * grid[1]
    np.testing.assert_array_equal(np.asarray(patchify(jnp.asarray(x), 2, 1)), img[:n].numpy())
    plan = plan_tokens(Z_IMAGE_TINY, [x.shape], [cap_len])
    np.testing.assert_array_equal(plan.img_kind[0] == 1, img_pad.numpy())
    np.testing.assert_array_equal(plan.cap_kind[0] == 1, cap_pad.numpy())
    # diffusers' caption position list is longer than the caption (it appends pad ids after a grid that already
    # covers the padding) and is cut to the sequence length later; compare what it actually uses
    lcp = len(capp)
    for (cos, sin), pos in ((plan.img_rope, img_pos), (plan.cap_rope, cap_pos[:lcp])):
        ref = tm.rope_embedder(pos)
        np.testing.assert_allclose(cos[0], ref.real.numpy(), atol=1e-6)
        np.testing.assert_allclose(sin[0], ref.imag.numpy(), atol=1e-6)
    uni_ref = tm.rope_embedder(torch.cat([img_pos, cap_pos[:lcp]]))
    np.testing.assert_allclose(plan.uni_rope[0][0], uni_ref.real.numpy(), atol=1e-6)


def test_time_sinusoid_matches_diffusers():
    from diffusers.models.transformers.transformer_z_image import TimestepEmbedder
    t = np.linspace(0.0, 1.0, 33).astype(np.float32) * np.float32(1000.0)
    ref = TimestepEmbedder.timestep_embedding(torch.tensor(t), 256).numpy()
    # args reach 1000 rad: one fp32 ulp of a frequency (torch's exp is not correctly rounded) is ~3e-5 there
    np.testing.assert_allclose(np.asarray(time_sinusoid(jnp.asarray(t))), ref, atol=1e-4)


@pytest.mark.parametrize("stack", ["noise_refiner", "context_refiner", "layers"])
def test_single_block_matches_diffusers(stack):
    tm = tiny_z_image(seed=1)
    ours = to_jax(tm, scan_layers=False)
    rng = np.random.default_rng(0)
    b, s, d = 2, 40, TINY_Z_IMAGE["dim"]
    x = rng.standard_normal((b, s, d)).astype(np.float32)
    adaln = rng.standard_normal((b, 64)).astype(np.float32)
    mask = np.ones((b, s), bool)
    mask[1, 29:] = False
    pos = np.stack([np.arange(s) % 7 + 3, np.arange(s) % 5, np.arange(s) // 5], axis=-1)
    freqs = tm.rope_embedder(torch.tensor(pos, dtype=torch.int64))[None].repeat(b, 1, 1)
    modulated = stack != "context_refiner"
    with torch.no_grad():
        block = getattr(tm, stack)[1]
        args = (torch.tensor(x), torch.tensor(mask), freqs) + ((torch.tensor(adaln),) if modulated else ())
        ref = block(*args).numpy()
    (out,) = getattr(ours, stack)[1](jnp.asarray(x), jnp.asarray(adaln) if modulated else None, jnp.asarray(mask),
                                     jnp.asarray(freqs.real.numpy()), jnp.asarray(freqs.imag.numpy()))
    assert max_rel_err(np.asarray(out), ref) < TOL


# ---- whole model -----------------------------------------------------------------------------------------------

CASES = {
    # ragged: image tokens 15 and 16 (not multiples of 32), captions 5 and 37 -> all four kinds of padding
    "ragged": dict(grids=((3, 5), (4, 4)), cap_lens=(5, 37)),
    # equal lengths after pad-to-32 but different real lengths: no batch mask, pad tokens differ per sample
    "same_padded": dict(grids=((3, 5), (2, 7)), cap_lens=(7, 20)),
    # exact multiples of 32: no pad tokens at all, single sample; two frames
    "exact": dict(grids=((4, 8),), cap_lens=(32,), frames=2),
}


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "loop"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_full_model_matches_diffusers(scan, case):
    tm = tiny_z_image(seed=2)
    inputs = z_image_inputs(np.random.default_rng(1), **CASES[case])
    ref = run_torch_z_image(tm, inputs)
    out = to_jax(tm, scan_layers=scan)(**inputs)
    assert isinstance(out, list) and len(out) == len(ref)
    assert max_rel_err_list(out, ref) < TOL


def test_batched_array_input_remat_and_return_tuple():
    tm = tiny_z_image(seed=3, n_layers=3)
    inputs = z_image_inputs(np.random.default_rng(2), grids=((3, 3), (3, 3), (3, 3)), cap_lens=(9, 9, 9))
    ref = run_torch_z_image(tm, inputs)
    model = to_jax(tm, scan_layers=True, remat="full")
    (out,) = model(np.stack(inputs["x"]), inputs["t"], np.stack(inputs["cap_feats"]), return_dict=False)
    assert max_rel_err_list(out, ref) < TOL
    # a scalar t is broadcast over the batch
    t0 = float(inputs["t"][0])
    ref0 = run_torch_z_image(tm, {**inputs, "t": np.full(3, t0, np.float32)})
    assert max_rel_err_list(model(**{**inputs, "t": t0}), ref0) < TOL


def test_bf16_compute_is_close():
    tm = tiny_z_image(seed=4)
    inputs = z_image_inputs(np.random.default_rng(3))
    ref = run_torch_z_image(tm, inputs)
    out = to_jax(tm, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)(**inputs)
    assert all(o.dtype == jnp.bfloat16 for o in out)
    assert max_rel_err_list(out, ref) < 5e-2


def test_bad_inputs_raise_clear_errors():
    tm = tiny_z_image()
    model = to_jax(tm)
    inputs = z_image_inputs(np.random.default_rng(4))
    x, t, caps = inputs["x"], inputs["t"], inputs["cap_feats"]
    with pytest.raises(ValueError, match="same length"):
        model(x, t, caps[:1])
    with pytest.raises(ValueError, match=r"x\[0\] must be \[C=4"):
        model([np.zeros((3, 1, 6, 10), np.float32), x[1]], t, caps)
    with pytest.raises(ValueError, match=r"x\[1\] must be \[C=4"):
        model([x[0], np.zeros((4, 1, 7, 8), np.float32)], t, caps)
    with pytest.raises(ValueError, match=r"cap_feats\[1\] must be"):
        model(x, t, [caps[0], np.zeros((4, 23), np.float32)])
    with pytest.raises(ValueError, match="4-D"):
        model([x[0][0], x[1]], t, caps)
    with pytest.raises(ValueError, match="one value per sample"):
        model(x, np.zeros(3, np.float32), caps)
    with pytest.raises(ValueError, match="axes_lens"):  # caption + image positions beyond the RoPE table
        model(x, t, [caps[0], np.zeros((250, 24), np.float32)])
    with pytest.raises(ValueError, match="patch_size"):
        model(x, t, caps, patch_size=1)
    with pytest.raises(NotImplementedError, match="Omni"):
        model(x, t, caps, siglip_feats=[None, None])
    with pytest.raises(NotImplementedError, match="Omni"):
        model([[x[0]], [x[1]]], t, [[caps[0]], [caps[1]]])
    with pytest.raises(NotImplementedError, match="controlnet"):
        model(x, t, caps, controlnet_block_samples={0: np.zeros(1)})
    with pytest.raises(NotImplementedError, match="joint_attention_kwargs"):
        model(x, t, caps, joint_attention_kwargs={"foo": 1})
    with pytest.raises(NotImplementedError, match="siglip"):
        dataclasses.replace(Z_IMAGE_TINY, siglip_feat_dim=32).validate()
    with pytest.raises(NotImplementedError, match="qk_norm"):
        dataclasses.replace(Z_IMAGE_TINY, qk_norm=False).validate()
    with pytest.raises(ValueError, match="axes_dims"):
        dataclasses.replace(Z_IMAGE_TINY, axes_dims=(8, 8, 12)).validate()


# ---- original (non-diffusers) checkpoint names ------------------------------------------------------------------

def to_original_names(sd: dict) -> dict:
    """Write a diffusers state dict in the original Z-Image layout (fused qkv, `model.diffusion_model.` prefix)."""
    out = {}
    for k, v in sd.items():
        m = re.fullmatch(r"(.+\.attention\.)to_([qkv])\.weight", k)
        if m:
            if m.group(2) == "q":
                base = m.group(1)
                out[base + "qkv.weight"] = np.concatenate([sd[base + f"to_{p}.weight"] for p in "qkv"])
            continue
        k = (k.replace(".attention.to_out.0.", ".attention.out.").replace(".attention.norm_q.", ".attention.q_norm.")
             .replace(".attention.norm_k.", ".attention.k_norm."))
        k = re.sub(r"^all_x_embedder\.2-1\.", "x_embedder.", k)
        out[re.sub(r"^all_final_layer\.2-1\.", "final_layer.", k)] = v
    out["norm_final.weight"] = np.ones(TINY_Z_IMAGE["dim"], np.float32)  # present in the release, unused
    return {"model.diffusion_model." + k: v for k, v in out.items()}


def test_original_checkpoint_names_load_to_the_same_model():
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers
    tm = tiny_z_image(seed=5)
    sd = state_dict_np(tm)
    orig = to_original_names(sd)
    assert any(k.endswith("attention.qkv.weight") for k in orig) and not any(".to_q." in k for k in orig)
    # our layout is the one diffusers' own converter maps back to the diffusers names
    conv = convert_z_image_transformer_checkpoint_to_diffusers({k: torch.tensor(v) for k, v in orig.items()})
    assert sorted(conv) == sorted(sd)
    assert all(np.array_equal(conv[k].numpy(), sd[k]) for k in sd)

    sources = original_to_diffusers(orig)
    assert sorted(sources) == sorted(sd)
    get, available = source_reader(sources, orig.__getitem__, lambda k: orig[k].shape)
    cfg = config_from_dict(FAM, dict(tm.config), "torch model")
    abstract = nnx.eval_shape(lambda: FAM.model_cls(cfg, rngs=nnx.Rngs(0)))
    ours = load_into(abstract, FAM, get, available, "original", progress=False)
    inputs = z_image_inputs(np.random.default_rng(5))
    out = ours(**inputs)
    base = to_jax(tm)(**inputs)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(out, base))
    assert max_rel_err_list(out, run_torch_z_image(tm, inputs)) < TOL
    # diffusers names map to themselves
    assert original_to_diffusers(sd) == {k: type(sources[k])(k) for k in sd}


def test_original_names_errors():
    sd = state_dict_np(tiny_z_image(seed=5))
    orig = {k[len("model.diffusion_model."):]: v for k, v in to_original_names(sd).items()}
    with pytest.raises(ValueError, match="both give 'layers.0.attention.to_q.weight'"):
        original_to_diffusers({**orig, "layers.0.attention.to_q.weight": sd["layers.0.attention.to_q.weight"]})
    with pytest.raises(ValueError, match="3 equal row blocks"):
        bad = {**orig, "layers.0.attention.qkv.weight": np.zeros((65, 64), np.float32)}
        source_reader(original_to_diffusers(bad), bad.__getitem__, lambda k: bad[k].shape)
    extra = {**orig, "layers.0.attention.mystery.weight": np.zeros(3, np.float32)}
    get, available = source_reader(original_to_diffusers(extra), extra.__getitem__, lambda k: extra[k].shape)
    cfg = config_from_dict(FAM, dict(tiny_z_image().config), "torch model")
    abstract = nnx.eval_shape(lambda: FAM.model_cls(cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(ConversionError, match="unexpected keys: layers.0.attention.mystery.weight"):
        load_into(abstract, FAM, get, available, "original", progress=False)


# ---- LoRA ------------------------------------------------------------------------------------------------------

def test_lora_family_table_matches_key_table():
    """Every Linear of the key table is a LoRA target of the `z_image` LoRA family and vice versa."""
    from turbojax.lora.families import get_family as lora_family
    fam = lora_family("z_image")
    index = FAM.keys.linear_index(FAM.stack_sizes(Z_IMAGE_TINY), True)
    names = {f"{c}.{i}.{m}" for c, mods in fam.blocks.items() for i in range(2) for m in mods}
    assert set(index) == names | set(fam.top_level)


LORA_TARGETS = [("layers.0.attention.to_q", 2), ("layers.1.attention.to_v", 3), ("layers.1.attention.to_out.0", 2),
                ("layers.0.feed_forward.w2", 3), ("noise_refiner.1.adaLN_modulation.0", 2),
                ("noise_refiner.0.feed_forward.w1", 2), ("context_refiner.1.attention.to_k", 4),
                ("all_x_embedder.2-1", 2), ("all_final_layer.2-1.linear", 3), ("cap_embedder.1", 2)]


def write_lora(path, tm, seed, layout):
    g = torch.Generator().manual_seed(seed)
    t = {}
    targets = LORA_TARGETS + ([("noise_refiner.1.attention.qkv", 3)] if layout == "dot_fused_qkv" else [])
    for name, r in targets:
        w = tm.get_submodule(name.replace(".qkv", ".to_q")).weight
        rows = w.shape[0] * (3 if name.endswith(".qkv") else 1)  # a fused qkv up stacks q, k, v rows
        down = torch.randn(r, w.shape[1], generator=g) * 0.3
        up = torch.randn(rows, r, generator=g) * 0.3
        alpha = torch.tensor(float(r) * 1.5)
        if layout == "diffusers":
            t[f"transformer.{name}.lora_A.weight"], t[f"transformer.{name}.lora_B.weight"] = down, up
        elif layout == "aitoolkit":  # ai-toolkit / ComfyUI: diffusion_model.* with peft spelling, no alpha
            t[f"diffusion_model.{name}.lora_A.weight"], t[f"diffusion_model.{name}.lora_B.weight"] = down, up
        elif layout == "comfy_original":  # original module names (attention.out), lora_down/up + alpha
            k = "diffusion_model." + name.replace("attention.to_out.0", "attention.out")
            t[f"{k}.lora_down.weight"], t[f"{k}.lora_up.weight"], t[f"{k}.alpha"] = down, up, alpha
        elif layout == "kohya":
            k = "lora_unet_" + name.replace(".", "_")
            t[f"{k}.lora_down.weight"], t[f"{k}.lora_up.weight"], t[f"{k}.alpha"] = down, up, alpha
        elif layout == "dot_fused_qkv":  # `.lora.down/up` spelling, original fused qkv (shared down, up in 3)
            k = "diffusion_model." + name
            t[f"{k}.lora.down.weight"], t[f"{k}.lora.up.weight"], t[f"{k}.alpha"] = down, up, alpha
        else:
            raise ValueError(layout)
    save_file({k: v.contiguous() for k, v in t.items()}, str(path))


@pytest.mark.parametrize("layout,scan", [("diffusers", True), ("aitoolkit", True), ("comfy_original", False),
                                         ("kohya", True), ("dot_fused_qkv", True)])
def test_lora_layouts_match_diffusers(tmp_path, layout, scan):
    from diffusers import ZImagePipeline
    tm = tiny_z_image(seed=10)
    tm.save_pretrained(tmp_path / "transformer")
    file = tmp_path / "l.safetensors"
    write_lora(file, tm, 1, layout)
    inputs = z_image_inputs(np.random.default_rng(0))
    base = run_torch_z_image(tm, inputs)
    ours = models.from_diffusers(tmp_path / "transformer", loras=[(file, 0.7)], scan_layers=scan, progress=False)
    sd, meta = ZImagePipeline.lora_state_dict(str(file), return_lora_metadata=True)
    ZImagePipeline.load_lora_into_transformer(sd, transformer=tm, adapter_name="a", metadata=meta)
    tm.set_adapters(["a"], weights=[0.7])
    ref = run_torch_z_image(tm, inputs)
    assert max_rel_err_list(base, ref) > 1e-2, "the LoRA must change the output for the test to mean anything"
    assert max_rel_err_list(ours(**inputs), ref) < TOL
