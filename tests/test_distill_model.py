"""Model-side pieces of distillation: feature taps equal diffusers' block outputs (forward hooks), and LoRA applied
unmerged inside the blocks equals the merged LoRA, with gradients only for the factors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from refs import (max_rel_err, qwen_inputs, run_torch, run_torch_z_image, tiny_qwen, tiny_z_image, to_jax_model,
                  z_image_inputs)
from turbojax import lora
from turbojax.lora import unmerged

TOL = 1e-4


def _hooked(blocks, taps, pick):
    feats, handles = {}, []
    for i in taps:
        handles.append(blocks[i].register_forward_hook(
            lambda m, a, out, i=i: feats.__setitem__(i, pick(out).detach().float().numpy())))
    return feats, handles


@pytest.mark.parametrize("scan", [True, False])
def test_qwen_image_taps_equal_diffusers_block_outputs(scan):
    tm = tiny_qwen(num_layers=3)
    model = to_jax_model(tm, "qwen_image", scan_layers=scan)
    inputs = qwen_inputs(np.random.default_rng(0))
    taps = (0, 2)
    feats, handles = _hooked(tm.transformer_blocks, taps, lambda out: out[1])  # (txt, img) -> image stream
    ref = run_torch(tm, inputs)
    for h in handles:
        h.remove()
    out, ours = model.forward(jnp.asarray(inputs["hidden_states"]), jnp.asarray(inputs["encoder_hidden_states"]),
                              jnp.asarray(inputs["encoder_hidden_states_mask"]), jnp.asarray(inputs["timestep"]),
                              ((1, 4, 6),), taps=taps)
    assert max_rel_err(np.asarray(out), ref) < TOL
    for j, i in enumerate(taps):
        assert ours[j].shape == feats[i].shape
        assert max_rel_err(np.asarray(ours[j]), feats[i]) < TOL, i
    with pytest.raises(ValueError, match="out of range"):
        model.forward(jnp.asarray(inputs["hidden_states"]), jnp.asarray(inputs["encoder_hidden_states"]), None,
                      jnp.asarray(inputs["timestep"]), ((1, 4, 6),), taps=(3,))


@pytest.mark.parametrize("scan", [True, False])
def test_z_image_taps_equal_diffusers_block_outputs(scan):
    tm = tiny_z_image(n_layers=3)
    model = to_jax_model(tm, "z_image", scan_layers=scan)
    inputs = z_image_inputs(np.random.default_rng(1), grids=((4, 4), (4, 4)), cap_lens=(5, 9))
    taps = (1, 2)
    feats, handles = _hooked(tm.layers, taps, lambda out: out)
    ref = run_torch_z_image(tm, inputs)
    for h in handles:
        h.remove()
    outs, ours = model.forward([jnp.asarray(a) for a in inputs["x"]], jnp.asarray(inputs["t"]),
                               [jnp.asarray(c) for c in inputs["cap_feats"]], taps=taps)
    for o, r in zip(outs, ref):
        assert max_rel_err(np.asarray(o), r) < TOL
    n_img = 16  # 4x4 patches per sample, already a multiple of... padded to 32 by the model
    for j, i in enumerate(taps):
        # diffusers' unified sequence per sample is [image (padded to 32) | caption]; the image rows come first
        ref_img = feats[i][:, :n_img]
        assert max_rel_err(np.asarray(ours[j])[:, :n_img], ref_img) < TOL, i


@pytest.mark.parametrize("scan", [True, False])
def test_unmerged_lora_equals_merged_and_trains_only_factors(scan):
    model = to_jax_model(tiny_qwen(), "qwen_image", scan_layers=scan)
    targets = [r"transformer_blocks(\.\d+)?\.attn\.to_(q|v)", r"transformer_blocks(\.\d+)?\.img_mlp\.fc2", "proj_out"]
    adapter = lora.init_adapter(model, targets, rank=3, alpha=6.0, rng=jax.random.key(0))
    rng = np.random.default_rng(1)
    adapter = {p: dict(e, b=jnp.asarray(rng.standard_normal(e["b"].shape) * 0.1, jnp.float32))
               for p, e in adapter.items()}
    graphdef, base = nnx.split(model)
    role = unmerged.make_role(graphdef, base, adapter)
    assert set(role.scales.values()) == {2.0}
    inputs = qwen_inputs(np.random.default_rng(2))
    args = [jnp.asarray(inputs[k]) for k in ("hidden_states", "encoder_hidden_states",
                                              "encoder_hidden_states_mask", "timestep")]
    merged = lora.apply(model, [(adapter, 1.0)]).forward(*args, ((1, 4, 6),))
    factors = unmerged.factors_of(adapter)
    ours = jax.jit(lambda f: role.model(base, f).forward(*args, ((1, 4, 6),)))(factors)
    assert max_rel_err(np.asarray(ours), np.asarray(merged)) < 1e-5
    grads = jax.grad(lambda f: jnp.sum(role.model(base, f).forward(*args, ((1, 4, 6),)) ** 2))(factors)
    assert jax.tree.structure(grads) == jax.tree.structure(factors)
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))
    back = unmerged.adapter_of(role, factors)
    np.testing.assert_allclose(np.asarray(next(iter(back.values()))["scale"]).ravel()[0], 2.0)
    # the base state is untouched: no LoRA variable leaked into it
    assert not any("lora" in ".".join(map(str, p)) for p, _ in nnx.to_flat_state(base))


def test_fold_scales_keeps_the_delta():
    a = np.random.default_rng(0).standard_normal((2, 5, 3)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((2, 3, 4)).astype(np.float32)
    adapter = {"m": {"a": a, "b": b, "scale": np.array([0.5, 0.0], np.float32)}}
    with pytest.raises(ValueError, match="differ"):
        unmerged.uniform_scale("m", adapter["m"]["scale"])
    folded = unmerged.fold_scales(adapter)
    np.testing.assert_allclose(lora.delta(folded["m"]), lora.delta(adapter["m"]), atol=1e-6)
