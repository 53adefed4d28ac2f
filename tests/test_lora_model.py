"""LoRA on the Qwen-Image model vs diffusers' own `load_lora_weights` path, for every released key layout."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from refs import max_rel_err, qwen_inputs, run_torch, tiny_qwen
from turbojax import lora, models

TOL = 1e-4

# (diffusers module name, rank) -- a mix of block and top-level linears with different ranks
TARGETS = [("transformer_blocks.0.attn.to_q", 2), ("transformer_blocks.1.attn.to_v", 3),
           ("transformer_blocks.0.attn.add_k_proj", 2), ("transformer_blocks.1.attn.to_out.0", 4),
           ("transformer_blocks.0.img_mlp.net.0.proj", 2), ("transformer_blocks.1.txt_mlp.net.2", 3),
           ("transformer_blocks.0.img_mod.1", 2), ("img_in", 2), ("proj_out", 3)]


def random_modules(tm, seed, targets=TARGETS):
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for name, r in targets:
        w = tm.get_submodule(name).weight
        mods[name] = (torch.randn(r, w.shape[1], generator=g) * 0.3, torch.randn(w.shape[0], r, generator=g) * 0.3,
                      float(r) * 1.5)
    return mods


def write_layout(path, mods, layout):
    """Write modules in one exact real-world key layout."""
    t, meta = {}, None
    for name, (down, up, alpha) in mods.items():
        if layout == "comfy":
            t[f"diffusion_model.{name}.lora_down.weight"] = down
            t[f"diffusion_model.{name}.lora_up.weight"] = up
            t[f"diffusion_model.{name}.alpha"] = torch.tensor(alpha)
        elif layout == "kohya":
            k = "lora_unet_" + name.replace(".", "_")
            t[f"{k}.lora_down.weight"], t[f"{k}.lora_up.weight"], t[f"{k}.alpha"] = down, up, torch.tensor(alpha)
        elif layout == "diffsynth":
            t[f"{name}.lora_A.default.weight"], t[f"{name}.lora_B.default.weight"] = down, up
        elif layout in ("diffusers", "diffusers_meta"):
            t[f"transformer.{name}.lora_A.weight"], t[f"transformer.{name}.lora_B.weight"] = down, up
        else:
            raise ValueError(layout)
    if layout == "diffusers_meta":
        ranks = {n: d.shape[0] for n, (d, _, _) in mods.items()}
        cfg = {"r": 2, "lora_alpha": 3.0, "target_modules": sorted(mods),
               "rank_pattern": {n: r for n, r in ranks.items() if r != 2},
               "alpha_pattern": {n: a for n, (_, _, a) in mods.items() if a != 3.0}}
        meta = {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in cfg.items()})}
    save_file({k: v.contiguous() for k, v in t.items()}, str(path), metadata=meta)


def diffusers_with_loras(tm, files_and_scales):
    from diffusers import QwenImagePipeline
    names = []
    for i, (f, _) in enumerate(files_and_scales):
        sd, meta = QwenImagePipeline.lora_state_dict(str(f), return_lora_metadata=True)
        QwenImagePipeline.load_lora_into_transformer(sd, transformer=tm, adapter_name=f"a{i}", metadata=meta)
        names.append(f"a{i}")
    tm.set_adapters(names, weights=[s for _, s in files_and_scales])
    return tm


@pytest.mark.parametrize("layout", ["diffusers", "diffusers_meta", "comfy", "kohya", "diffsynth"])
def test_layout_matches_diffusers_load_lora_weights(tmp_path, layout):
    tm = tiny_qwen(seed=10)
    tm.save_pretrained(tmp_path / "transformer")
    write_layout(tmp_path / "l.safetensors", random_modules(tm, 1), layout)
    inputs = qwen_inputs(np.random.default_rng(0))
    ours = models.from_diffusers(tmp_path / "transformer", loras=[(tmp_path / "l.safetensors", 0.7)], progress=False)
    ref = run_torch(diffusers_with_loras(tm, [(tmp_path / "l.safetensors", 0.7)]), inputs)
    base = run_torch(tiny_qwen(seed=10), inputs)
    assert max_rel_err(base, ref) > 1e-2, "the LoRA must change the output for the test to mean anything"
    assert max_rel_err(np.asarray(ours(**inputs)), ref) < TOL


@pytest.mark.parametrize("scan", [True, False])
def test_two_loras_and_unscanned(tmp_path, scan):
    tm = tiny_qwen(seed=11)
    tm.save_pretrained(tmp_path / "transformer")
    write_layout(tmp_path / "a.safetensors", random_modules(tm, 2), "comfy")
    write_layout(tmp_path / "b.safetensors", random_modules(tm, 3, TARGETS[:4]), "kohya")
    specs = [(tmp_path / "a.safetensors", 1.0), (tmp_path / "b.safetensors", -0.5)]
    inputs = qwen_inputs(np.random.default_rng(1))
    ours = models.from_diffusers(tmp_path / "transformer", loras=specs, scan_layers=scan, progress=False)
    ref = run_torch(diffusers_with_loras(tm, specs), inputs)
    assert max_rel_err(np.asarray(ours(**inputs)), ref) < TOL


@pytest.mark.parametrize("layout", ["diffusers", "comfy"])
def test_save_then_diffusers_load_gives_our_output(tmp_path, layout):
    import jax
    tm = tiny_qwen(seed=12)
    tm.save_pretrained(tmp_path / "transformer")
    base = models.from_diffusers(tmp_path / "transformer", progress=False)
    adapter = lora.init_adapter(base, [r"transformer_blocks\.attn\.to_(q|k)", r"transformer_blocks\.img_mlp\.fc1",
                                       "proj_out"], rank=3, alpha=5.0, rng=jax.random.key(0))
    # give B non-zero values (a freshly initialised adapter is a no-op)
    adapter = jax.tree.map(lambda x: x, adapter)
    for i, path in enumerate(sorted(adapter)):
        adapter[path]["b"] = jax.random.normal(jax.random.key(i), adapter[path]["b"].shape) * 0.2
    lora.save(tmp_path / "mine.safetensors", adapter, base, layout=layout)
    inputs = qwen_inputs(np.random.default_rng(2))
    ours = np.asarray(lora.apply(base, adapter)(**inputs))
    ref = run_torch(diffusers_with_loras(tm, [(tmp_path / "mine.safetensors", 1.0)]), inputs)
    assert max_rel_err(ours, ref) < TOL
    # and our own loader reads our file back to the same model
    again = models.from_diffusers(tmp_path / "transformer", loras=[tmp_path / "mine.safetensors"], progress=False)
    assert max_rel_err(np.asarray(again(**inputs)), ref) < TOL


def test_merge_unmerge_and_errors(tmp_path):
    import jax
    tm = tiny_qwen(seed=13)
    tm.save_pretrained(tmp_path / "transformer")
    base = models.from_diffusers(tmp_path / "transformer", progress=False)
    adapter = lora.init_adapter(base, r".*attn\.to_v", rank=2, rng=jax.random.key(1))
    adapter = {p: dict(e, b=e["b"] + 0.1) for p, e in adapter.items()}
    merged = lora.apply(base, adapter)
    back = lora.unapply(merged, adapter)
    k0 = base.transformer_blocks.attn.to_v.kernel[...]
    assert float(abs(merged.transformer_blocks.attn.to_v.kernel[...] - k0).max()) > 1e-3
    np.testing.assert_allclose(np.asarray(back.transformer_blocks.attn.to_v.kernel[...]), np.asarray(k0), atol=1e-6)
    with pytest.raises(ValueError, match="match no Linear"):
        lora.init_adapter(base, "nonexistent", rank=2, rng=jax.random.key(0))
    # a LoRA for a module the model does not have (layer 5 of a 2-layer model)
    write_layout(tmp_path / "bad.safetensors", {"transformer_blocks.5.attn.to_q": (
        torch.zeros(2, 32), torch.zeros(32, 2), 2.0)}, "comfy")
    with pytest.raises(ValueError, match="transformer_blocks.5.attn.to_q"):
        models.from_diffusers(tmp_path / "transformer", loras=[tmp_path / "bad.safetensors"], progress=False)
    # mis-shaped
    write_layout(tmp_path / "bad2.safetensors", {"transformer_blocks.0.attn.to_q": (
        torch.zeros(2, 31), torch.zeros(32, 2), 2.0)}, "comfy")
    with pytest.raises(ValueError, match="to_q"):
        models.from_diffusers(tmp_path / "transformer", loras=[tmp_path / "bad2.safetensors"], progress=False)
