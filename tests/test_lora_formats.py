"""LoRA file I/O against diffusers/peft as the reference for what every layout means.

Each layout is written in its exact key spelling, loaded by diffusers into a tiny QwenImageTransformer2DModel whose
Linear weights are zero, and fused: the fused weight is then diffusers' effective delta, which must equal ours.
"""
import json

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from turbojax.lora.families import QWEN_IMAGE, Z_IMAGE
from turbojax.lora.formats import LoraFormatError, LoraModule, read_lora, save_lora

TINY = dict(num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, in_channels=16,
            out_channels=4, axes_dims_rope=(2, 2, 4))
TINY_Z = dict(dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6],
              axes_lens=[64, 32, 32])


def _zeroed(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.zero_()
    return model.eval()


def qwen_model():
    from diffusers import QwenImageTransformer2DModel
    return _zeroed(QwenImageTransformer2DModel(**TINY))


def z_model():
    from diffusers import ZImageTransformer2DModel
    return _zeroed(ZImageTransformer2DModel(**TINY_Z))


def linear_shapes(model) -> dict[str, tuple[int, int]]:
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.fixture(scope="module")
def shapes():
    return linear_shapes(qwen_model())


def fused_weights(model, names) -> dict[str, np.ndarray]:
    """Every Linear's weight after `fuse_lora` (base weights were zero, so this is diffusers' delta)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    model.fuse_lora()
    out = {}
    for n in names:
        m = model.get_submodule(n)
        w = m.get_base_layer().weight if isinstance(m, BaseTunerLayer) else m.weight
        out[n] = w.detach().float().numpy().copy()
    return out


def diffusers_deltas(path, family="qwen_image") -> dict[str, np.ndarray]:
    """What `Pipeline.load_lora_weights(path)` does to the transformer: convert, read metadata, inject, (fuse)."""
    from diffusers import QwenImagePipeline, ZImagePipeline
    pipe_cls, model = (QwenImagePipeline, qwen_model()) if family == "qwen_image" else (ZImagePipeline, z_model())
    names = linear_shapes(model)  # before injection wraps each Linear in a peft layer
    sd, md = pipe_cls.lora_state_dict(str(path), return_lora_metadata=True)
    pipe_cls.load_lora_into_transformer(sd, transformer=model, adapter_name="ref", metadata=md)
    return fused_weights(model, names)


def assert_matches_diffusers(ours, ref, shapes, atol=1e-6):
    """Our deltas equal diffusers' on every Linear, and diffusers changed nothing we did not."""
    for name, (o, i) in shapes.items():
        want = ours[name].delta() if name in ours else np.zeros((o, i), np.float32)
        np.testing.assert_allclose(want, ref[name], rtol=1e-5, atol=atol, err_msg=name)
    assert set(ours) <= set(shapes)


def random_lora(shapes, seed=0, names=None, ranks=(2, 3, 4), alphas=(1.5, 8.0, 3.0, 0.75)) -> dict:
    """Ranks and alphas differ per module (alpha != r), so any mis-scaling shows."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, n in enumerate(names or shapes):
        o, i = shapes[n]
        r = ranks[k % len(ranks)]
        out[n] = LoraModule(rng.standard_normal((r, i)).astype(np.float32) * 0.5,
                            rng.standard_normal((o, r)).astype(np.float32) * 0.5, alphas[k % len(alphas)])
    return out


def write_layout(path, lora, layout, metadata=None):
    """Write `lora` in one exact third-party key layout (independent of `save_lora`)."""
    t = {}
    for n, m in lora.items():
        if layout in ("diffusers", "diffusers_bare", "peft"):
            p = {"diffusers": "transformer.", "diffusers_bare": "", "peft": "base_model.model."}[layout]
            t[f"{p}{n}.lora_A.weight"], t[f"{p}{n}.lora_B.weight"] = m.down, m.up
        elif layout in ("comfy", "comfy_noalpha", "comfy_model", "comfy_AB"):
            p = "model.diffusion_model." if layout == "comfy_model" else "diffusion_model."
            a, b = ("lora_A", "lora_B") if layout == "comfy_AB" else ("lora_down", "lora_up")
            t[f"{p}{n}.{a}.weight"], t[f"{p}{n}.{b}.weight"] = m.down, m.up
            if layout != "comfy_noalpha":
                t[f"{p}{n}.alpha"] = np.array(m.alpha, np.float32)
        elif layout == "kohya":
            f = "lora_unet_" + n.replace(".", "_")
            t[f"{f}.lora_down.weight"], t[f"{f}.lora_up.weight"] = m.down, m.up
            t[f"{f}.alpha"] = np.array(m.alpha, np.float32)
        elif layout == "diffsynth":
            t[f"{n}.lora_A.default.weight"], t[f"{n}.lora_B.default.weight"] = m.down, m.up
        else:
            raise AssertionError(layout)
    save_file(t, str(path), metadata=metadata)
    return path


def with_alpha_r(lora):
    return {n: LoraModule(m.down, m.up, m.rank) for n, m in lora.items()}


# ---------------------------------------------------------------------------------------------------------------
# reading every layout, diffusers as reference

@pytest.mark.parametrize("layout,has_alpha", [("comfy", True), ("comfy_noalpha", False), ("kohya", True),
                                              ("diffsynth", False), ("diffusers", False)])
def test_layout_matches_diffusers(tmp_path, shapes, layout, has_alpha):
    lora = random_lora(shapes, seed=1)
    path = write_layout(tmp_path / f"{layout}.safetensors", lora, layout)
    ours = read_lora(path, module_shapes=shapes)
    assert set(ours) == set(shapes)
    assert_matches_diffusers(ours, diffusers_deltas(path), shapes)
    expect = lora if has_alpha else with_alpha_r(lora)  # no alpha data: diffusers/peft use scale 1
    for n, m in expect.items():
        assert ours[n].alpha == np.float32(m.alpha) and ours[n].rank == m.rank
        np.testing.assert_array_equal(ours[n].down, m.down)
        np.testing.assert_array_equal(ours[n].up, m.up)


@pytest.mark.parametrize("variant", ["comfy_model", "comfy_AB", "diffusers_bare", "peft"])
def test_prefix_variants_read_like_their_base_layout(tmp_path, shapes, variant):
    lora = random_lora(shapes, seed=2)
    base = "comfy" if variant.startswith("comfy") else "diffusers"
    ref = read_lora(write_layout(tmp_path / "base.safetensors", lora, base))
    got = read_lora(write_layout(tmp_path / "v.safetensors", lora, variant), module_shapes=shapes)
    assert set(got) == set(ref)
    for n in ref:
        assert got[n].alpha == ref[n].alpha
        np.testing.assert_array_equal(got[n].delta(), ref[n].delta())


def test_diffusers_written_metadata_with_patterns(tmp_path, shapes):
    """A file diffusers itself saves from a peft adapter whose LoraConfig uses suffix rank/alpha patterns."""
    from diffusers import QwenImagePipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    torch.manual_seed(0)
    model = qwen_model()
    cfg = LoraConfig(r=4, lora_alpha=6, init_lora_weights=False,
                     target_modules=["to_q", "to_k", "add_q_proj", "img_mlp.net.2", "txt_mod.1", "proj_out"],
                     rank_pattern={"to_q": 2, "img_mlp.net.2": 3}, alpha_pattern={"to_k": 5, "proj_out": 1.5})
    model.add_adapter(cfg, adapter_name="mine")
    meta = model.peft_config["mine"].to_dict()
    QwenImagePipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(
        model, adapter_name="mine"), transformer_lora_adapter_metadata=meta, weight_name="l.safetensors")
    path = tmp_path / "l.safetensors"
    ours = read_lora(path, module_shapes=shapes)
    assert ours["transformer_blocks.1.attn.to_q"].rank == 2 and ours["transformer_blocks.1.attn.to_q"].alpha == 6
    assert ours["transformer_blocks.0.attn.to_k"].alpha == 5 and ours["proj_out"].alpha == 1.5
    assert ours["transformer_blocks.0.img_mlp.net.2"].rank == 3 and ours["transformer_blocks.0.txt_mod.1"].alpha == 6
    assert_matches_diffusers(ours, diffusers_deltas(path), shapes)


def test_diffusers_metadata_alpha_not_r(tmp_path, shapes):
    """Hand-written diffusers file whose header says alpha != r (plain r / lora_alpha, one rank)."""
    lora = random_lora(shapes, seed=3, ranks=(4,), alphas=(2.0,))
    meta = {"transformer.r": 4, "transformer.lora_alpha": 2, "transformer.target_modules": sorted(lora)}
    path = write_layout(tmp_path / "m.safetensors", lora, "diffusers",
                        metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    ours = read_lora(path, module_shapes=shapes)
    assert all(m.alpha == 2.0 for m in ours.values())
    assert_matches_diffusers(ours, diffusers_deltas(path), shapes)


def test_rslora_metadata(tmp_path, shapes):
    names = ["img_in", "transformer_blocks.0.attn.to_v"]
    lora = random_lora(shapes, seed=4, names=names, ranks=(4,))
    meta = {"transformer.r": 4, "transformer.lora_alpha": 3, "transformer.use_rslora": True,
            "transformer.target_modules": names}
    path = write_layout(tmp_path / "rs.safetensors", lora, "diffusers",
                        metadata={"lora_adapter_metadata": json.dumps(meta)})
    ours = read_lora(path)
    assert ours["img_in"].scale == pytest.approx(3 / 2)
    assert_matches_diffusers(ours, diffusers_deltas(path), shapes)


def test_partial_lora_and_mixed_layouts(tmp_path, shapes):
    names = [n for n in shapes if n.startswith("transformer_blocks.")]
    lora = random_lora(shapes, seed=5, names=names)
    half = len(names) // 2
    a = write_layout(tmp_path / "a.safetensors", dict(list(lora.items())[:half]), "comfy")
    b = write_layout(tmp_path / "b.safetensors", dict(list(lora.items())[half:]), "kohya")
    from safetensors.numpy import load_file
    save_file({**load_file(str(a)), **load_file(str(b))}, str(tmp_path / "mix.safetensors"))
    got = read_lora(tmp_path / "mix.safetensors", module_shapes=shapes)
    assert set(got) == set(names)
    for n, m in lora.items():
        np.testing.assert_allclose(got[n].delta(), m.delta(), rtol=1e-6, atol=1e-7)
    # a LoRA touching only some modules leaves the rest alone in diffusers too
    assert_matches_diffusers(read_lora(a), diffusers_deltas(a), shapes)


def test_bf16_file(tmp_path, shapes):
    # diffusers folds alpha/r into the bf16 tensors *in bf16*; power-of-two scales keep that fold exact
    lora = random_lora(shapes, seed=6, ranks=(2, 4), alphas=(1.0, 8.0, 0.5, 4.0))
    t = {}
    for n, m in lora.items():
        t[f"diffusion_model.{n}.lora_down.weight"] = m.down.astype(ml_dtypes.bfloat16)
        t[f"diffusion_model.{n}.lora_up.weight"] = m.up.astype(ml_dtypes.bfloat16)
        t[f"diffusion_model.{n}.alpha"] = np.array(m.alpha, ml_dtypes.bfloat16)
    save_file(t, str(tmp_path / "bf.safetensors"))
    ours = read_lora(tmp_path / "bf.safetensors", module_shapes=shapes)
    assert all(m.down.dtype == np.float32 for m in ours.values())
    assert_matches_diffusers(ours, diffusers_deltas(tmp_path / "bf.safetensors"), shapes)


# ---------------------------------------------------------------------------------------------------------------
# writing

@pytest.mark.parametrize("layout", ["diffusers", "comfy"])
def test_save_round_trip_through_diffusers(tmp_path, shapes, layout):
    lora = random_lora(shapes, seed=7, ranks=(2, 3, 4, 3), alphas=(1.5, 8.0, 3.0, 0.75, 5.0))
    path = tmp_path / "out.safetensors"
    save_lora(path, lora, layout=layout)
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]  # no temp file left behind
    again = read_lora(path, module_shapes=shapes)
    assert set(again) == set(lora)
    for n, m in lora.items():
        assert again[n].alpha == m.alpha
        np.testing.assert_array_equal(again[n].down, m.down)
        np.testing.assert_array_equal(again[n].up, m.up)
    assert_matches_diffusers(lora, diffusers_deltas(path), shapes)
    if layout == "diffusers":
        # The model-level entry point reads the header only with use_safetensors=True: without it, diffusers 0.42
        # takes its pickle/.bin branch, which drops the header, and silently loads every module at scale 1.
        model = qwen_model()
        model.load_lora_adapter(str(path), adapter_name="direct", use_safetensors=True)
        assert_matches_diffusers(lora, fused_weights(model, shapes), shapes)


def test_save_fold_alpha(tmp_path, shapes):
    """Folded files need no alpha data: even diffusers' header-dropping model-level path gets our scale."""
    lora = random_lora(shapes, seed=12)
    path = tmp_path / "f.safetensors"
    save_lora(path, lora, fold_alpha=True)
    again = read_lora(path, module_shapes=shapes)
    assert all(m.alpha == m.rank for m in again.values())
    for n, m in lora.items():
        np.testing.assert_allclose(again[n].delta(), m.delta(), rtol=1e-6, atol=1e-6)
    model = qwen_model()
    model.load_lora_adapter(str(path), adapter_name="plain")  # header ignored on this path
    assert_matches_diffusers(lora, fused_weights(model, shapes), shapes)


def test_save_metadata_contents(tmp_path, shapes):
    from safetensors import safe_open
    lora = random_lora(shapes, seed=8, names=["proj_out", "img_in", "transformer_blocks.1.attn.to_q"],
                       ranks=(4, 4, 2), alphas=(4.0, 4.0, 0.5))
    path = tmp_path / "m.safetensors"
    save_lora(path, lora, metadata_extra={"trained_by": "turbojax"})
    with safe_open(str(path), "np") as f:
        header = f.metadata()
        keys = set(f.keys())
    assert header["format"] == "pt" and header["trained_by"] == "turbojax"
    meta = json.loads(header["lora_adapter_metadata"])
    assert meta["transformer.r"] == 4 and meta["transformer.lora_alpha"] == 4
    assert meta["transformer.rank_pattern"] == {"^transformer_blocks.1.attn.to_q": 2}
    assert meta["transformer.alpha_pattern"] == {"^transformer_blocks.1.attn.to_q": 0.5}
    assert sorted(meta["transformer.target_modules"]) == sorted(lora)
    assert "transformer.proj_out.lora_A.weight" in keys and "transformer.img_in.lora_B.weight" in keys
    with pytest.raises(LoraFormatError, match="format"):
        save_lora(tmp_path / "x.safetensors", lora, metadata_extra={"format": "np"})


def test_save_bf16(tmp_path, shapes):
    lora = random_lora(shapes, seed=9, ranks=(2, 4), alphas=(1.0, 8.0, 0.5, 4.0))  # see test_bf16_file
    for layout in ("diffusers", "comfy"):
        path = tmp_path / f"{layout}.safetensors"
        save_lora(path, lora, layout=layout, dtype="bf16")
        from safetensors import safe_open
        with safe_open(str(path), "np") as f:
            dts = {k: f.get_tensor(k).dtype for k in f.keys()}
        assert all(d == (np.float32 if k.endswith(".alpha") else ml_dtypes.bfloat16) for k, d in dts.items())
        again = read_lora(path, module_shapes=shapes)
        for n, m in lora.items():
            np.testing.assert_array_equal(again[n].up, m.up.astype(ml_dtypes.bfloat16).astype(np.float32))
            assert again[n].alpha == m.alpha
        assert_matches_diffusers(again, diffusers_deltas(path), shapes)


def test_save_is_atomic_on_error(tmp_path, shapes):
    path = tmp_path / "keep.safetensors"
    path.write_bytes(b"old")
    bad = {"transformer_blocks.0.attn.to_x": LoraModule(np.ones((2, 16)), np.ones((16, 2)), 2.0)}
    with pytest.raises(LoraFormatError, match="to_x"):
        save_lora(path, bad)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["keep.safetensors"]


# ---------------------------------------------------------------------------------------------------------------
# errors

def _one(shapes, name="transformer_blocks.0.attn.to_q", r=2):
    o, i = shapes[name]
    return np.ones((r, i), np.float32), np.ones((o, r), np.float32)


@pytest.mark.parametrize("case,match", [
    ("unknown_module", r"transformer_blocks\.0\.attn\.to_x"),
    ("not_in_model", r"transformer_blocks\.5\.attn\.to_q.*does not exist"),
    ("bad_up_shape", r"lora_up\.weight.*expected shape \[16, 2\].*got \[12, 2\]"),
    ("bad_down_shape", r"lora_down\.weight.*expected shape \[2, 16\].*got \[2, 8\]"),
    ("rank_mismatch", r"lora_up\.weight"),
    ("missing_up", r"lora_down\.weight.*has no up weight"),
    ("alpha_only", r"\.alpha.*has no down / up weight"),
    ("dora", r"dora_scale.*DoRA"),
    ("lokr", r"lokr_w1.*LoKr"),
    ("unparsable", r"'diffusion_model\.img_in\.weight'.*not a LoRA"),
    ("kohya_unknown", r"lora_unet_transformer_blocks_0_attn_to_x"),
    ("duplicate", r"both give the down"),
    ("metadata_rank", r"rank 2 but lora_adapter_metadata gives r=4"),
    ("alpha_and_metadata", r"both per-module alpha tensors"),
    ("bad_json", r"lora_adapter_metadata' is not valid JSON"),
    ("metadata_dora", r"use_dora"),
    ("bias", r"lora_B\.bias.*not a LoRA"),
])
def test_errors(tmp_path, shapes, case, match):
    d, u = _one(shapes)
    q = "diffusion_model.transformer_blocks.0.attn.to_q"
    t, meta = {f"{q}.lora_down.weight": d, f"{q}.lora_up.weight": u}, None
    if case == "unknown_module":
        t = {"transformer.transformer_blocks.0.attn.to_x.lora_A.weight": d,
             "transformer.transformer_blocks.0.attn.to_x.lora_B.weight": u}
    elif case == "not_in_model":
        t = {k.replace("blocks.0", "blocks.5"): v for k, v in t.items()}
    elif case == "bad_up_shape":
        t[f"{q}.lora_up.weight"] = np.ones((12, 2), np.float32)
    elif case == "bad_down_shape":
        t[f"{q}.lora_down.weight"] = np.ones((2, 8), np.float32)
    elif case == "rank_mismatch":
        t[f"{q}.lora_up.weight"] = np.ones((16, 3), np.float32)
    elif case == "missing_up":
        del t[f"{q}.lora_up.weight"]
    elif case == "alpha_only":
        t["diffusion_model.img_in.alpha"] = np.array(1.0, np.float32)
    elif case == "dora":
        t[f"{q}.dora_scale"] = np.ones((3, 16), np.float32)  # DoRA is read (test_lora_wild.py); a bad shape is not
    elif case == "lokr":
        t = {"transformer.transformer_blocks.0.attn.to_q.lokr_w1": d}
    elif case == "unparsable":
        t["diffusion_model.img_in.weight"] = np.ones((16, 16), np.float32)
    elif case == "kohya_unknown":
        t = {"lora_unet_transformer_blocks_0_attn_to_x.lora_down.weight": d,
             "lora_unet_transformer_blocks_0_attn_to_x.lora_up.weight": u}
    elif case == "duplicate":
        t[f"transformer.transformer_blocks.0.attn.to_q.lora_A.weight"] = d
    elif case == "metadata_rank":
        meta = {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 4})}
    elif case == "alpha_and_metadata":
        t[f"{q}.alpha"] = np.array(1.0, np.float32)
        meta = {"lora_adapter_metadata": json.dumps({"transformer.r": 2, "transformer.lora_alpha": 4})}
    elif case == "bad_json":
        meta = {"lora_adapter_metadata": "{not json"}
    elif case == "metadata_dora":
        meta = {"lora_adapter_metadata": json.dumps({"transformer.r": 2, "transformer.use_dora": True})}
    elif case == "bias":
        t[f"{q}.lora_B.bias"] = np.ones((16,), np.float32)
    path = tmp_path / "bad.safetensors"
    save_file(t, str(path), metadata=meta)
    with pytest.raises(LoraFormatError, match=match) as err:
        read_lora(path, module_shapes=shapes)
    assert "bad.safetensors" in str(err.value)


def test_save_argument_errors(tmp_path, shapes):
    lora = random_lora(shapes, seed=13, names=["img_in"])
    with pytest.raises(ValueError, match="layout"):
        save_lora(tmp_path / "x.safetensors", lora, layout="kohya")
    with pytest.raises(ValueError, match="dtype"):
        save_lora(tmp_path / "x.safetensors", lora, dtype=np.int8)
    with pytest.raises(LoraFormatError, match="empty"):
        save_lora(tmp_path / "x.safetensors", {})
    with pytest.raises(LoraFormatError, match="not"):
        LoraModule(np.ones((2, 4)), np.ones((4, 3)), 1.0)
    assert not list(tmp_path.iterdir())


def test_pickle_files_are_refused(tmp_path):
    for name in ("lora.bin", "lora.pt", "lora.ckpt"):
        p = tmp_path / name
        torch.save({"a": torch.ones(1)}, p)
        with pytest.raises(LoraFormatError, match=rf"{name}.*only \.safetensors"):
            read_lora(p)
    p = tmp_path / "disguised.safetensors"
    torch.save({"a": torch.ones(1)}, p)
    with pytest.raises(LoraFormatError, match="not a readable safetensors"):
        read_lora(p)


# ---------------------------------------------------------------------------------------------------------------
# family tables

def test_family_tables_match_diffusers_models(shapes):
    assert {n for n in shapes} == {n for n in shapes if QWEN_IMAGE.is_module(n)}
    expected = set(QWEN_IMAGE.top_level) | {f"transformer_blocks.{i}.{m}" for i in range(2)
                                            for m in QWEN_IMAGE.blocks["transformer_blocks"]}
    assert set(shapes) == expected
    z = linear_shapes(z_model())
    z_expected = set(Z_IMAGE.top_level) | {f"{c}.{i}.{m}" for c, n in
                                           (("layers", 2), ("noise_refiner", 1), ("context_refiner", 1))
                                           for i in range(n) for m in Z_IMAGE.blocks[c]}
    assert set(z) == z_expected
    for n in list(shapes) + list(z):  # the kohya reverse table inverts every flattening exactly
        fam = QWEN_IMAGE if n in shapes else Z_IMAGE
        assert fam.unflatten_kohya(n.replace(".", "_")) == n


def test_z_image_original_names_match_diffusers(tmp_path):
    """Z-Image trainer layout with the original fused `attention.qkv` and `attention.out` (dotted lora.down)."""
    shapes_z = linear_shapes(z_model())
    rng = np.random.default_rng(10)
    t = {}
    for c, n in (("layers", 2), ("noise_refiner", 1)):
        for i in range(n):
            for mod, rows, r, alpha in (("attention.qkv", 96, 4, 2.0), ("attention.out", 32, 3, 6.0),
                                        ("feed_forward.w1", 85, 2, 1.0)):
                key = f"diffusion_model.{c}.{i}.{mod}"
                t[f"{key}.lora.down.weight"] = rng.standard_normal((r, 32)).astype(np.float32)
                t[f"{key}.lora.up.weight"] = rng.standard_normal((rows, r)).astype(np.float32)
                t[f"{key}.alpha"] = np.array(alpha, np.float32)
    path = tmp_path / "z.safetensors"
    save_file(t, str(path))
    ours = read_lora(path, family="z_image", module_shapes=shapes_z)
    assert "layers.1.attention.to_v" in ours and "layers.0.attention.to_out.0" in ours
    np.testing.assert_array_equal(ours["layers.0.attention.to_k"].up,
                                  t["diffusion_model.layers.0.attention.qkv.lora.up.weight"][32:64])
    assert_matches_diffusers(ours, diffusers_deltas(path, family="z_image"), shapes_z)
    # and our writer's output loads into diffusers' Z-Image identically
    save_lora(tmp_path / "zw.safetensors", ours, family="z_image")
    assert_matches_diffusers(ours, diffusers_deltas(tmp_path / "zw.safetensors", family="z_image"), shapes_z)


def test_z_image_kohya_matches_diffusers(tmp_path):
    shapes_z = linear_shapes(z_model())
    lora = random_lora(shapes_z, seed=11)
    path = write_layout(tmp_path / "zk.safetensors", lora, "kohya")
    ours = read_lora(path, family="z_image", module_shapes=shapes_z)
    assert set(ours) == set(shapes_z)
    assert_matches_diffusers(ours, diffusers_deltas(path, family="z_image"), shapes_z)
