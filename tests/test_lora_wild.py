"""LoRA files as released trainers write them: VideoX-Fun's Z-Image distill layout, LoKr, LoHa, DoRA, .diff/.diff_b.

Every file is written with the key spelling of the trainer that produces it (templates read from their code):
  VideoX-Fun  `lora_unet__<module, dots as underscores>.lora_down.weight` / `.lora_up.weight` / `.alpha`
              (its LoRANetwork joins "lora_unet" + "." + "" (the root module) + "." + child name, then "." -> "_")
  LyCORIS     `lycoris_<module flattened>.lokr_w1` / `.lokr_w2[_a|_b]` / `.hada_w1_a` ... / `.alpha` / `.dora_scale`
  ai-toolkit  `diffusion_model.<module>.lokr_w1` ... (its Z-Image / Qwen-Image LoKr), kohya `lora_unet_` + DoRA
  ComfyUI     `diffusion_model.<module>.diff` / `.diff_b` (full-weight / bias deltas)
The reference merges the same tensors by hand in fp64 with ComfyUI's rules (comfy/weight_adapter/*.py), written
out here independently of turbojax.lora.lycoris, into the diffusers model, whose output ours must match; where
diffusers reads the format itself (Z-Image LoKr) it is a second reference.
"""
import copy

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from refs import (max_rel_err, max_rel_err_list, qwen_inputs, run_torch, run_torch_z_image, tiny_qwen, tiny_z_image,
                  z_image_inputs)
from turbojax import lora, models
from turbojax.lora.formats import LoraFormatError, read_lora

TOL = 1e-4
EPS32 = float(np.finfo(np.float32).eps)

QWEN_MODULES = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_k",
                "transformer_blocks.0.attn.to_out.0", "transformer_blocks.1.attn.add_v_proj",
                "transformer_blocks.0.img_mlp.net.0.proj", "transformer_blocks.1.txt_mlp.net.2",
                "transformer_blocks.0.img_mod.1", "img_in", "proj_out"]
Z_MODULES = ["layers.0.attention.to_q", "layers.1.attention.to_out.0", "layers.0.feed_forward.w1",
             "layers.1.adaLN_modulation.0", "noise_refiner.0.attention.to_k", "noise_refiner.1.feed_forward.w2",
             "context_refiner.0.attention.to_v", "context_refiner.1.feed_forward.w3", "all_x_embedder.2-1",
             "all_final_layer.2-1.linear", "cap_embedder.1", "t_embedder.mlp.2"]


# ---------------------------------------------------------------------------------------------------------------
# patches (tensors keyed by their file suffix), files, and the hand merge

def _split(n):
    """A factor pair (a, n // a) with a small a > 1, as LyCORIS' factorization picks for these tiny sizes."""
    for a in (4, 2, 3):
        if n % a == 0 and n > a:
            return a, n // a
    raise AssertionError(n)


def make_patch(kind, w, rng, scale=0.3):
    """One module's tensors for `kind`; `w` is the torch Linear (its weight sets shapes and DoRA magnitudes)."""
    out, inn = w.weight.shape
    r = int(rng.integers(2, 5))
    g = lambda *s: (rng.standard_normal(s) * scale).astype(np.float32)  # noqa: E731
    p = {}
    if kind in ("lora", "dora_out", "dora_in", "lora_diff_b"):
        p["lora_down.weight"], p["lora_up.weight"] = g(r, inn), g(out, r)
        p["alpha"] = np.array(r * 1.5, np.float32)
    elif kind.startswith("lokr"):
        (a, b), (c, d) = _split(out), _split(inn)
        if kind == "lokr_full":  # both factors full: LoKr applies no alpha even though the file has one
            p["lokr_w1"], p["lokr_w2"] = g(a, c), g(b, d)
        elif kind == "lokr_w2":  # LyCORIS default: w1 full, w2 factorised
            p["lokr_w1"], p["lokr_w2_a"], p["lokr_w2_b"] = g(a, c), g(b, r), g(r, d)
        else:  # decompose_both; different ranks so that it shows which one scales (ComfyUI: w2's)
            p["lokr_w1_a"], p["lokr_w1_b"], p["lokr_w2_a"], p["lokr_w2_b"] = g(a, r + 1), g(r + 1, c), g(b, r), g(r, d)
        p["alpha"] = np.array(r * 2.0, np.float32)
    elif kind == "loha":
        p["hada_w1_a"], p["hada_w1_b"], p["hada_w2_a"], p["hada_w2_b"] = g(out, r), g(r, inn), g(out, r), g(r, inn)
        p["alpha"] = np.array(r * 0.75, np.float32)
    elif kind == "diff":
        p["diff"] = g(out, inn) * 0.3
    if kind in ("dora_out", "dora_in"):
        # trained magnitudes start at the weight's norm: keep them near it so that the rescale stays sane
        wt = w.weight.detach().double().numpy()
        n = np.linalg.norm(wt, axis=1, keepdims=True) if kind == "dora_out" else np.linalg.norm(wt, axis=0)[None]
        p["dora_scale"] = (n * (1 + 0.3 * rng.standard_normal(n.shape))).astype(np.float32)
    if kind in ("diff", "lora_diff_b") and w.bias is not None:
        p["diff_b"] = g(out)
    return p


def make_patches(tm, names, kinds, seed):
    rng = np.random.default_rng(seed)
    return {n: make_patch(kinds[i % len(kinds)], tm.get_submodule(n), rng) for i, n in enumerate(names)}


PREFIX = {"kohya": lambda n: "lora_unet_" + n.replace(".", "_"),
          "videox": lambda n: "lora_unet__" + n.replace(".", "_"),
          "lycoris": lambda n: "lycoris_" + n.replace(".", "_"),
          "comfy": lambda n: "diffusion_model." + n}


def write(path, patches, style):
    t = {f"{PREFIX[style](n)}.{suffix}": v for n, p in patches.items() for suffix, v in p.items()}
    save_file(t, str(path))
    return path


def ref_patch(W, b, p, s):
    """ComfyUI's merge of one module in fp64: W [out, in], b [out] or None, strength s."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    alpha = float(p["alpha"]) if "alpha" in p else None
    d, sc = None, 1.0
    if "lora_up.weight" in p:
        d = p["lora_up.weight"] @ p["lora_down.weight"]
        sc = 1.0 if alpha is None else alpha / p["lora_down.weight"].shape[0]
    elif any(k.startswith("lokr_") for k in p):
        dim = None
        w1 = p.get("lokr_w1")
        if w1 is None:
            w1, dim = p["lokr_w1_a"] @ p["lokr_w1_b"], p["lokr_w1_b"].shape[0]
        w2 = p.get("lokr_w2")
        if w2 is None:
            w2, dim = p["lokr_w2_a"] @ p["lokr_w2_b"], p["lokr_w2_b"].shape[0]
        d = np.kron(w1, w2)
        sc = alpha / dim if alpha is not None and dim is not None else 1.0
    elif "hada_w1_a" in p:
        d = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
        sc = 1.0 if alpha is None else alpha / p["hada_w1_b"].shape[0]
    elif "diff" in p:
        d = p["diff"]
    if d is not None and "dora_scale" in p:
        calc = W + sc * d
        m = p["dora_scale"]
        if m.shape[0] == W.shape[0]:  # ComfyUI: the base weight's norm on the output axis
            norm = np.linalg.norm(W, axis=1, keepdims=True)
        else:
            norm = np.linalg.norm(calc, axis=0, keepdims=True)
        W = W + s * (calc * (m / (norm + EPS32)) - W)
    elif d is not None:
        W = W + s * sc * d
    if "diff_b" in p:
        b = b + s * p["diff_b"]
    return W, b


def hand_merged(tm, patch_sets):
    """A copy of the torch model with `[(patches, strength), ...]` merged in order, in fp64."""
    tm = copy.deepcopy(tm)
    with torch.no_grad():
        for name in dict.fromkeys(n for patches, _ in patch_sets for n in patches):
            lin = tm.get_submodule(name)
            W = lin.weight.double().numpy()
            b = None if lin.bias is None else lin.bias.double().numpy()
            for patches, s in patch_sets:
                if name in patches:
                    W, b = ref_patch(W, b, patches[name], s)
            lin.weight.copy_(torch.from_numpy(W))
            if b is not None:
                lin.bias.copy_(torch.from_numpy(b))
    return tm


FAMILIES = {"qwen_image": (tiny_qwen, qwen_inputs, run_torch, max_rel_err, QWEN_MODULES),
            "z_image": (tiny_z_image, z_image_inputs, run_torch_z_image, max_rel_err_list, Z_MODULES)}


def check(tmp_path, family, files, patch_sets, scan=True, seed=10):
    """Our model with `files` merged matches the hand-merged diffusers model; the patches change the output."""
    build, inputs_fn, run, err, _ = FAMILIES[family]
    tm = build(seed=seed)
    tm.save_pretrained(tmp_path / "transformer")
    inputs = inputs_fn(np.random.default_rng(0))
    ref = run(hand_merged(tm, patch_sets), inputs)
    assert err(run(tm, inputs), ref) > 1e-2, "the patches must change the output for the test to mean anything"
    ours = models.from_diffusers(tmp_path / "transformer", loras=files, scan_layers=scan, progress=False)
    out = ours(**inputs)
    assert err(out if family == "z_image" else np.asarray(out), ref) < TOL
    return tm, inputs, ref


# ---------------------------------------------------------------------------------------------------------------
# each layout on both families

CASES = {  # name: (key style, kinds cycled over the modules)
    "videox_lora": ("videox", ["lora"]),
    "lycoris_lokr": ("lycoris", ["lokr_w2", "lokr_full", "lokr_both"]),
    "aitoolkit_lokr": ("comfy", ["lokr_both", "lokr_w2", "lokr_full"]),
    "lycoris_loha": ("lycoris", ["loha"]),
    "kohya_dora": ("kohya", ["dora_out", "dora_in"]),
    "comfy_dora": ("comfy", ["dora_in", "dora_out"]),
    "comfy_diff": ("comfy", ["diff", "lora_diff_b"]),
    "lycoris_mixed": ("lycoris", ["lora", "loha", "lokr_w2", "dora_in", "diff"]),
}


@pytest.mark.parametrize("family", ["qwen_image", "z_image"])
@pytest.mark.parametrize("case", list(CASES))
def test_layout_matches_hand_merge(tmp_path, family, case):
    style, kinds = CASES[case]
    build, *_, names = FAMILIES[family]
    patches = make_patches(build(seed=10), names, kinds, seed=list(CASES).index(case))
    f = write(tmp_path / "l.safetensors", patches, style)
    check(tmp_path, family, [(f, 0.7)], [(patches, 0.7)])


def test_videox_fun_z_image_distill_every_linear(tmp_path):
    """The whole VideoX-Fun distill layout: every Linear of the model (refiners and top level included)."""
    tm = tiny_z_image(seed=10)
    names = [n for n, m in tm.named_modules() if isinstance(m, torch.nn.Linear)]
    assert any(n.startswith("context_refiner.") for n in names) and "t_embedder.mlp.0" in names
    patches = make_patches(tm, names, ["lora"], seed=3)
    f = write(tmp_path / "distill.safetensors", patches, "videox")
    from safetensors import safe_open
    with safe_open(str(f), "np") as fh:
        keys = set(fh.keys())
    assert {"lora_unet__noise_refiner_0_feed_forward_w1.lora_down.weight",
            "lora_unet__layers_1_attention_to_out_0.alpha",
            "lora_unet__context_refiner_1_attention_to_k.lora_up.weight",
            "lora_unet__all_x_embedder_2-1.alpha"} <= keys
    check(tmp_path, "z_image", [(f, 1.0)], [(patches, 1.0)], scan=False)
    got = read_lora(f, family="z_image")
    assert len(got) == len(names) and all(isinstance(m, lora.LoraModule) for m in got.values())  # plain, trainable


def test_z_image_lokr_matches_diffusers(tmp_path):
    """diffusers reads ai-toolkit's Z-Image LoKr (peft LoKr): a reference independent of our hand merge.

    Only the w1-full forms: diffusers 0.42 / peft 0.21 drop `lokr_w1_a` / `lokr_w1_b` with a warning (they expect a
    full w1), which ComfyUI and we merge (covered against the hand merge above)."""
    from diffusers import ZImagePipeline
    tm = tiny_z_image(seed=10)
    patches = make_patches(tm, Z_MODULES, ["lokr_w2", "lokr_full"], seed=5)
    f = write(tmp_path / "lokr.safetensors", patches, "comfy")
    _, inputs, ref = check(tmp_path, "z_image", [(f, 1.0)], [(patches, 1.0)])
    sd, meta = ZImagePipeline.lora_state_dict(str(f), return_lora_metadata=True)
    ZImagePipeline.load_lora_into_transformer(sd, transformer=tm, adapter_name="k", metadata=meta)
    assert max_rel_err_list(run_torch_z_image(tm, inputs), ref) < TOL


def test_order_strengths_and_unscanned(tmp_path):
    """Several files in order (DoRA sees the weight the earlier ones left), negative strength, no scan."""
    tm = tiny_qwen(seed=10)
    a = make_patches(tm, QWEN_MODULES, ["lora"], seed=1)
    b = make_patches(tm, QWEN_MODULES[:5], ["dora_out", "dora_in"], seed=2)
    c = make_patches(tm, QWEN_MODULES[3:], ["lokr_w2", "diff"], seed=3)
    fa = write(tmp_path / "a.safetensors", a, "comfy")
    fb = write(tmp_path / "b.safetensors", b, "kohya")
    fc = write(tmp_path / "c.safetensors", c, "lycoris")
    check(tmp_path, "qwen_image", [(fa, 0.5), (fb, 0.8), (fc, -0.6)], [(a, 0.5), (b, 0.8), (c, -0.6)], scan=False)


def test_apply_unapply_and_plain_path_unchanged(tmp_path):
    tm = tiny_qwen(seed=11)
    tm.save_pretrained(tmp_path / "transformer")
    base = models.from_diffusers(tmp_path / "transformer", progress=False)
    lokr = write(tmp_path / "k.safetensors", make_patches(tm, QWEN_MODULES, ["lokr_w2", "diff"], seed=4), "lycoris")
    adapter = lora.load(lokr, base)
    assert all(set(e) == {"merge"} for e in adapter.values())
    merged = lora.apply(base, [(adapter, 0.9)])
    back = lora.unapply(merged, [(adapter, 0.9)])
    k0 = np.asarray(base.transformer_blocks.attn.to_q.kernel[...])
    assert np.abs(np.asarray(merged.transformer_blocks.attn.to_q.kernel[...]) - k0).max() > 1e-2
    np.testing.assert_allclose(np.asarray(back.transformer_blocks.attn.to_q.kernel[...]), k0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(back.img_in.bias[...]), np.asarray(base.img_in.bias[...]), atol=1e-6)
    # plain LoRA: unchanged low-rank entries, and a list strength is undone too (it used to be added twice)
    plain = lora.load(write(tmp_path / "p.safetensors", make_patches(tm, QWEN_MODULES, ["lora"], seed=6), "videox"),
                      base)
    assert all(set(e) == {"a", "b", "scale"} for e in plain.values())
    both = [(plain, 0.8), (adapter, -0.4)]
    back = lora.unapply(lora.apply(base, both), both)
    np.testing.assert_allclose(np.asarray(back.transformer_blocks.attn.to_q.kernel[...]), k0, atol=1e-5)
    back = lora.unapply(lora.apply(base, [(plain, 0.8)]), [(plain, 0.8)])
    np.testing.assert_allclose(np.asarray(back.transformer_blocks.attn.to_q.kernel[...]), k0, atol=1e-5)
    dora = write(tmp_path / "d.safetensors", make_patches(tm, QWEN_MODULES[:2], ["dora_out"], seed=5), "kohya")
    d_adapter = lora.load(dora, base)
    with pytest.raises(ValueError, match="DoRA"):
        lora.unapply(lora.apply(base, d_adapter), d_adapter)
    with pytest.raises(LoraFormatError, match="merge-only"):
        lora.save(tmp_path / "out.safetensors", adapter, base)
    assert not (tmp_path / "out.safetensors").exists()


def test_sharded_model_keeps_shardings(tmp_path):
    """Merging a merge-only file into a model sharded over the 8-device mesh keeps every parameter's sharding."""
    from turbojax.sharding import make_mesh
    tm = tiny_qwen(seed=12)
    tm.save_pretrained(tmp_path / "transformer")
    patches = make_patches(tm, QWEN_MODULES, ["lokr_w2", "dora_in", "diff"], seed=7)
    f = write(tmp_path / "m.safetensors", patches, "lycoris")
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    base = models.from_diffusers(tmp_path / "transformer", mesh=mesh, progress=False)
    merged = lora.apply(base, [(lora.load(f, base), 0.6)])
    assert any(a is not None for a in base.transformer_blocks.attn.to_q.kernel[...].sharding.spec)  # sharded
    assert (merged.transformer_blocks.attn.to_q.kernel[...].sharding.spec
            == base.transformer_blocks.attn.to_q.kernel[...].sharding.spec)
    assert merged.img_in.bias[...].sharding.spec == base.img_in.bias[...].sharding.spec
    inputs = qwen_inputs(np.random.default_rng(0))
    assert max_rel_err(np.asarray(merged(**inputs)), run_torch(hand_merged(tm, [(patches, 0.6)]), inputs)) < TOL


# ---------------------------------------------------------------------------------------------------------------
# refusals: one line naming the key

def _q(shape_in=32, shape_out=32):
    rng = np.random.default_rng(0)
    return rng.standard_normal((2, shape_in)).astype(np.float32), rng.standard_normal((shape_out, 2)).astype(np.float32)


@pytest.mark.parametrize("case,match", [
    ("unknown", r"'diffusion_model\.transformer_blocks\.0\.attn\.to_q\.weight'.*not a LoRA.*LyCORIS lycoris_"),
    ("lokr_tucker", r"lokr_t2'.*Tucker"),
    ("lokr_shape", r"lokr_w1'.*\[out, in\] = \[32, 64\].*\[32, 32\]"),
    ("lokr_missing", r"lokr_w1'.*no lokr_w2"),
    ("loha_missing", r"hada_w1_a'.*no hada_w2_a / hada_w2_b"),
    ("dora_shape", r"dora_scale'.*\[out, 1\].*got \[2, 32\]"),
    ("dora_alone", r"dora_scale'.*no LoRA / LoKr / LoHa"),
    ("two_kinds", r"both lora .* and lokr"),
    ("bias_no_bias", r"diff_b'.*layers\.0\.attention\.to_q.*no bias"),
    ("diff_shape", r"\.diff'.*\[out, in\] = \[32, 31\]"),
    ("videox_unknown", r"lora_unet__layers_0_attention_to_x"),
    ("peft_dora", r"lora_magnitude_vector.*not supported"),
])
def test_errors(tmp_path, case, match):
    family = "z_image" if case in ("bias_no_bias", "videox_unknown") else "qwen_image"
    d, u = _q()
    q = "diffusion_model.transformer_blocks.0.attn.to_q"
    t = {}
    if case == "unknown":
        t = {f"{q}.weight": u @ d}
    elif case == "lokr_tucker":
        t = {f"{q}.lokr_w1": np.ones((4, 4), np.float32), f"{q}.lokr_w2_a": np.ones((8, 2), np.float32),
             f"{q}.lokr_w2_b": np.ones((2, 2), np.float32), f"{q}.lokr_t2": np.ones((2, 2, 1, 1), np.float32)}
    elif case == "lokr_shape":
        t = {f"{q}.lokr_w1": np.ones((4, 8), np.float32), f"{q}.lokr_w2": np.ones((8, 8), np.float32)}
    elif case == "lokr_missing":
        t = {f"{q}.lokr_w1": np.ones((4, 4), np.float32)}
    elif case == "loha_missing":
        t = {f"{q}.hada_w1_a": u, f"{q}.hada_w1_b": d}
    elif case in ("dora_shape", "two_kinds"):
        t = {f"{q}.lora_down.weight": d, f"{q}.lora_up.weight": u}
        if case == "dora_shape":
            t[f"{q}.dora_scale"] = np.ones((2, 32), np.float32)
        else:
            t[f"{q}.lokr_w1"] = np.ones((4, 4), np.float32)
    elif case == "dora_alone":
        t = {f"{q}.dora_scale": np.ones((32, 1), np.float32)}
    elif case == "bias_no_bias":
        t = {"diffusion_model.layers.0.attention.to_q.diff_b": np.ones((64,), np.float32)}
    elif case == "diff_shape":
        t = {f"{q}.diff": np.ones((32, 31), np.float32)}
    elif case == "videox_unknown":
        t = {"lora_unet__layers_0_attention_to_x.lora_down.weight": d,
             "lora_unet__layers_0_attention_to_x.lora_up.weight": u}
    elif case == "peft_dora":
        t = {"transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector": np.ones((32,), np.float32)}
    path = tmp_path / "bad.safetensors"
    save_file(t, str(path))
    build = tiny_z_image if family == "z_image" else tiny_qwen
    tm = build(seed=0)
    tm.save_pretrained(tmp_path / "transformer")
    base = models.from_diffusers(tmp_path / "transformer", progress=False)
    with pytest.raises(LoraFormatError, match=match) as e:
        lora.load(path, base)
    assert "bad.safetensors" in str(e.value) and "\n" not in str(e.value)
