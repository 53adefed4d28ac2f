"""DINOv2 feature extractor: parity with transformers' `Dinov2Model` / `Dinov2WithRegistersModel` (tiny random
models, fp32), position-embedding resampling, checkpoint conversion, config errors and the preprocessing helper."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from refs import max_rel_err, perturb_, state_dict_np
from turbojax import models
from turbojax.convert.__main__ import main as cli
from turbojax.convert.params import check_keys, flat_params, load_into, model_leaves, source_reader
from turbojax.models.dinov2 import (DINOV2_PRESETS, Dinov2Config, DINOV2_REG_PRESETS, IMAGENET_MEAN, IMAGENET_STD,
                                    bicubic_matrix, dino_preprocess)
from turbojax.models.registry import ConfigError, get_family, read_component_config

TOL = 1e-4
TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, patch_size=4, image_size=16,
            layerscale_value=0.5)
TRAINED, OTHER = (16, 16), (24, 12)  # pixel sizes: the 4 x 4 trained grid, and a 6 x 3 grid (interpolated)


def tiny_torch(registers: bool, seed: int = 0, **overrides):
    """A tiny transformers DINOv2 with non-trivial weights; the position embeddings are scaled up so that a wrong
    resampling shows far above the tolerance."""
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel
    torch.manual_seed(seed)
    kw = {**TINY, **overrides}
    tm = (Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=2, **kw)) if registers
          else Dinov2Model(Dinov2Config(**kw)))
    perturb_(tm, seed)
    with torch.no_grad():
        tm.embeddings.position_embeddings.mul_(20.0)
    return tm


def saved(tm, path):
    tm.save_pretrained(path)
    return path


def pixels(hw, seed=0, batch=2):
    return np.random.default_rng(seed).standard_normal((batch, 3) + tuple(hw)).astype(np.float32)


def torch_states(tm, x):
    with torch.no_grad():
        out = tm(pixel_values=torch.tensor(x), output_hidden_states=True)
    return out.last_hidden_state.numpy(), [h.numpy() for h in out.hidden_states]


def nhwc(x):
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def check_parity(model, tm, hw, layers=(0, 2)):
    x = pixels(hw)
    last, hidden = torch_states(tm, x)
    out = model(nhwc(x), layers=layers)
    assert out.last_hidden_state.shape == last.shape
    assert max_rel_err(out.last_hidden_state, last) < TOL
    assert len(out.hidden_states) == len(layers)
    for i, h in zip(layers, out.hidden_states):
        assert max_rel_err(h, hidden[i + 1]) < TOL  # transformers' entry 0 is the embeddings


# ---------------------------------------------------------------------------------------------------------------
# parity

@pytest.mark.parametrize("scan", [True, False], ids=["scan", "loop"])
@pytest.mark.parametrize("registers", [False, True], ids=["dinov2", "registers"])
def test_matches_transformers(tmp_path, registers, scan):
    tm = tiny_torch(registers, seed=1)
    model = models.from_diffusers(saved(tm, tmp_path / "dino"), scan_layers=scan, progress=False)
    assert model.family == ("dinov2_with_registers" if registers else "dinov2")
    assert model.num_prefix_tokens == (3 if registers else 1)
    check_parity(model, tm, TRAINED)
    check_parity(model, tm, OTHER, layers=(1,))


def test_swiglu_without_mask_token_matches_transformers(tmp_path):
    tm = tiny_torch(False, seed=2, use_swiglu_ffn=True, use_mask_token=False, hidden_act="gelu_pytorch_tanh")
    keys = set(load_file(saved(tm, tmp_path / "dino") / "model.safetensors"))
    assert "encoder.layer.0.mlp.weights_in.weight" in keys and "embeddings.mask_token" not in keys
    model = models.from_diffusers(tmp_path / "dino", progress=False)
    check_parity(model, tm, (12, 20), layers=(2, 0))  # shrinks one axis, grows the other; taps in any order


def test_registers_swiglu_matches_transformers(tmp_path):
    tm = tiny_torch(True, seed=3, use_swiglu_ffn=True)
    model = models.from_diffusers(saved(tm, tmp_path / "dino"), scan_layers=False, progress=False)
    check_parity(model, tm, (8, 28), layers=(1,))


@pytest.mark.parametrize("antialias", [False, True])
def test_bicubic_matrix_matches_torch_interpolate(antialias):
    x = np.random.default_rng(0).standard_normal((1, 3, 37, 5)).astype(np.float32)
    for n_h, n_w in ((16, 9), (37, 5), (64, 3), (4, 12)):  # shrink, identity, grow, mixed
        ref = torch.nn.functional.interpolate(torch.tensor(x), size=(n_h, n_w), mode="bicubic", align_corners=False,
                                              antialias=antialias).numpy()
        ours = np.einsum("oh,bchw,pw->bcop", bicubic_matrix(37, n_h, antialias), x, bicubic_matrix(5, n_w, antialias))
        assert np.abs(ours - ref).max() < 5e-6 * np.abs(ref).max()
    # the two variants really differ (so the parity tests tell them apart)
    assert np.abs(bicubic_matrix(37, 16, True) - bicubic_matrix(37, 16, False)).max() > 1e-2


def test_in_memory_names_load_and_bf16_is_close():
    """transformers' in-memory state dict (q_proj, ...) loads through the same table; bf16 compute stays close."""
    tm = tiny_torch(False, seed=4)
    fam = get_family("dinov2")
    cfg = models.config_from_dict(fam, tm.config.to_dict(), "torch model")
    sd = state_dict_np(tm)
    assert "encoder.layer.0.attention.q_proj.weight" in sd
    get, available = source_reader(fam.source_names(sd), sd.__getitem__, lambda k: sd[k].shape)
    x = pixels(OTHER, seed=5)
    last, hidden = torch_states(tm, x)
    for dtype, tol in ((jnp.float32, TOL), (jnp.bfloat16, 5e-2)):
        abstract = models.abstract_model(fam, cfg, param_dtype=dtype)
        model = load_into(abstract, fam, get, available, "torch model", progress=False)
        out = model(nhwc(x), layers=(1,))
        assert out.last_hidden_state.dtype == dtype
        assert max_rel_err(out.last_hidden_state, last) < tol
        assert max_rel_err(out.hidden_states[0], hidden[2]) < tol
    tm_swiglu = tiny_torch(False, use_swiglu_ffn=True)
    with pytest.raises(ValueError, match="gate_proj / up_proj"):
        fam.source_names(state_dict_np(tm_swiglu))


# ---------------------------------------------------------------------------------------------------------------
# conversion

@pytest.mark.parametrize("registers", [False, True], ids=["dinov2", "registers"])
def test_convert_round_trip_is_bit_identical(tmp_path, registers):
    tm = tiny_torch(registers, seed=6, use_swiglu_ffn=registers)
    src = saved(tm, tmp_path / "src")
    assert cli(["to-jax", str(src), str(tmp_path / "jax"), "--no-progress"] + ([] if registers else ["--no-scan"])) == 0
    assert cli(["to-torch", str(tmp_path / "jax"), str(tmp_path / "back"), "--no-progress"]) == 0
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes(), k
    assert (src / "config.json").read_bytes() == (tmp_path / "back" / "config.json").read_bytes()
    # the export opens directly and computes what transformers does
    exported = models.from_orbax(tmp_path / "jax", progress=False)
    assert exported.scan_layers == registers
    check_parity(exported, tm, OTHER, layers=(0,))


def test_real_size_presets_match_transformers():
    """Published sizes: transformers' real-size models (meta device) pass our strict key/shape check."""
    import transformers
    for name, cls in (("dinov2_base", "Dinov2Model"), ("dinov2_with_registers_large", "Dinov2WithRegistersModel")):
        fam, cfg = models.get_preset(name)
        tcls = getattr(transformers, cls)
        raw = {k: getattr(cfg, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                            "patch_size", "image_size")}
        with torch.device("meta"):
            tm = tcls(tcls.config_class(**raw))
        sd = tm.state_dict()
        available = {n: tuple(sd[s.key].shape) for n, s in fam.source_names(sd).items()}
        model = models.abstract_model(fam, cfg)
        check_keys(model_leaves(model, fam), flat_params(model), available, name)
    # giant: the SwiGLU width (4096 for 1536 x 4) through the parameter count
    from transformers import Dinov2Config, Dinov2Model
    with torch.device("meta"):
        tm = Dinov2Model(Dinov2Config(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24,
                                      use_swiglu_ffn=True, image_size=518))
    ours = flat_params(models.abstract_model(*models.get_preset("dinov2_giant")))
    assert sum(int(np.prod(v.shape)) for v in ours.values()) == sum(p.numel() for p in tm.parameters())
    assert models.create("dinov2_with_registers_tiny").family == "dinov2_with_registers"
    assert models.create(DINOV2_PRESETS["dinov2_tiny"]).family == "dinov2"
    assert DINOV2_REG_PRESETS["dinov2_with_registers_giant"].mlp_hidden == 4096


# ---------------------------------------------------------------------------------------------------------------
# errors

BASE_CONFIG = {"architectures": ["Dinov2Model"], "model_type": "dinov2", "hidden_size": 32, "num_hidden_layers": 2,
               "num_attention_heads": 4, "patch_size": 4, "image_size": 16, "mlp_ratio": 4, "hidden_act": "gelu",
               "drop_path_rate": 0.1, "hidden_dropout_prob": 0.1, "out_features": ["stage2"]}


@pytest.mark.parametrize("change, message", [
    ({"hidden_act": "gelu_fast"}, "hidden_act 'gelu_fast' is not implemented"),
    ({"num_attention_heads": 3}, "must be a multiple of num_attention_heads"),
    ({"image_size": [16, 20]}, "only square sizes"),
    ({"patch_size": 0}, "'patch_size' is 0"),
    ({"head_dim": 16}, "head_dim 16"),
    ({"model_type": "vit"}, "model_type 'vit' is not 'dinov2'"),
    ({"qkv_bias": "yes"}, "key 'qkv_bias' is \"yes\""),
    ({"architectures": ["Dinov2WithRegistersModel"], "model_type": "dinov2_with_registers",
      "num_register_tokens": 0}, "key 'num_register_tokens' is 0"),
])
def test_bad_configs_raise_clearly(tmp_path, change, message):
    (tmp_path / "config.json").write_text(json.dumps({**BASE_CONFIG, **change}))
    with pytest.raises(ConfigError, match=message) as e:
        read_component_config(tmp_path)
    assert "config.json" in str(e.value)


def test_dropout_and_backbone_keys_are_ignored_and_cli_reports_one_line(tmp_path, capsys):
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**BASE_CONFIG, "image_size": [16, 16]}))
    fam, cfg, _ = read_component_config(tmp_path / "ok")
    assert fam.name == "dinov2" and cfg == Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                        patch_size=4, image_size=16)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**BASE_CONFIG, "hidden_act": "mish"}))
    assert cli(["to-jax", str(tmp_path / "bad"), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "hidden_act 'mish'" in err[0]
    assert not (tmp_path / "out").exists()


def test_bad_inputs_raise():
    model = models.create("dinov2_tiny")
    with pytest.raises(ValueError, match="multiples of the patch size 4"):
        model(np.zeros((1, 18, 16, 3), np.float32))
    with pytest.raises(ValueError, match=r"NHWC \[B, H, W, 3\]"):
        model(np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(ValueError, match=r"layers \[3\] out of range"):
        model(np.zeros((1, 16, 16, 3), np.float32), layers=(3,))
    with pytest.raises(ValueError, match="must be float"):
        model(np.zeros((1, 16, 16, 3), np.uint8))


# ---------------------------------------------------------------------------------------------------------------
# preprocessing

def test_preprocess_matches_torch_and_is_differentiable():
    rng = np.random.default_rng(7)
    images = rng.uniform(-1, 1, (2, 30, 21, 3)).astype(np.float32)
    out = dino_preprocess(jnp.asarray(images), (28, 14), patch_size=14)
    assert out.shape == (2, 28, 14, 3) and out.dtype == jnp.float32
    # reference: torch's antialiased bilinear on [0, 1] images, then ImageNet normalisation
    x01 = torch.tensor((images + 1) / 2).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(x01, size=(28, 14), mode="bilinear", antialias=True, align_corners=False)
    ref = ((ref.permute(0, 2, 3, 1).numpy() - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD))
    assert np.abs(np.asarray(out) - ref).max() < 1e-5
    # same size: no resampling, only the normalisation
    same = dino_preprocess(jnp.asarray(images[:, :28, :14]), (28, 14))
    assert np.abs(np.asarray(same) - (((images[:, :28, :14] + 1) / 2 - IMAGENET_MEAN) / IMAGENET_STD)).max() < 1e-5

    # gradients flow through the preprocessing and the (frozen) model back to the pixels
    model = models.create("dinov2_with_registers_tiny", scan_layers=True)

    def loss(img):
        feats = model.forward(dino_preprocess(img, 16, patch_size=4), layers=(1,))
        return jnp.mean(feats.hidden_states[0] ** 2) + jnp.mean(feats.last_hidden_state[:, 0])

    g = jax.jit(jax.grad(loss))(jnp.asarray(images))
    assert g.shape == images.shape and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0
    with pytest.raises(ValueError, match="multiples of patch_size 14"):
        dino_preprocess(jnp.asarray(images), 256)
