"""Text encoders: Qwen2.5-VL (Qwen-Image) and Qwen3 (Z-Image) LLM parity with transformers, checkpoint layouts,
configs, and prompt-encoding parity with the diffusers pipelines' own functions (tiny random models, fp32)."""
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file

from refs import max_rel_err, perturb_, state_dict_np
from turbojax import models
from turbojax.convert.params import ConversionError, check_keys, flat_params, load_into, model_leaves, source_reader
from turbojax.models.qwen_llm import QWEN2_5_VL_7B, QWEN3_4B, rope_tables
from turbojax.models.registry import ConfigError, config_from_dict, get_family, read_component_config
from turbojax.nn.attention import _chunked_attention, attention
from turbojax.text import (PromptTruncationWarning, encode_qwen_image_prompts, encode_z_image_prompts,
                           load_tokenizer)

TOL = 1e-4
VL, Q3 = get_family("qwen2_5_vl_text"), get_family("qwen3_text")
VOCAB = 320
TINY_TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2)


def tiny_vl(seed=0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    # eps 1e-5 and mrope [2, 1, 1] (sums to head_dim / 2 = 4) so that config reading is exercised
    text = dict(TINY_TEXT, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1e6})
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, bos_token_id=None, eos_token_id=None)
    return perturb_(Qwen2_5_VLForConditionalGeneration(cfg), seed)


def tiny_qwen3(seed=0, causal_lm=False):
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model
    torch.manual_seed(seed)
    cfg = Qwen3Config(**TINY_TEXT, head_dim=16, rope_theta=1e6)  # 4 x 16 != 32 hidden, like Qwen3-4B
    return perturb_((Qwen3ForCausalLM if causal_lm else Qwen3Model)(cfg), seed)


def to_jax(fam, tm, **model_kw):
    """Our model from a torch module's in-memory state dict (transformers' module names)."""
    cfg = config_from_dict(fam, tm.config.to_dict(), "torch model")
    sd = state_dict_np(tm)
    get, available = source_reader(fam.source_names(sd), sd.__getitem__, lambda k: sd[k].shape)
    abstract = nnx.eval_shape(lambda: fam.model_cls(cfg, rngs=nnx.Rngs(0), **model_kw))
    return load_into(abstract, fam, get, available, "torch model", progress=False)


def inputs(seed=0, batch=3, length=11):
    """Random ids with a full row, a right-padded row and a left-padded row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (3, length))
    mask = np.ones((3, length), np.int64)
    mask[1, 7:] = 0
    mask[2, :3] = 0
    return ids[:batch], mask[:batch]


def torch_hidden(tm, ids, mask):
    with torch.no_grad():
        out = tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    return [h.numpy() for h in out.hidden_states]


def valid_err(out, ref, mask):
    """Error over real tokens only: padded rows are garbage in both implementations and never used."""
    keep = mask.astype(bool)[..., None]
    return max_rel_err(np.where(keep, np.asarray(out, np.float32), 0), np.where(keep, ref, 0))


# ---------------------------------------------------------------------------------------------------------------
# LLM parity

@pytest.mark.parametrize("scan", [True, False], ids=["scan", "loop"])
@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3"])
def test_llm_matches_transformers(kind, scan):
    tm, fam = (tiny_vl(1), VL) if kind == "qwen2_5_vl" else (tiny_qwen3(1), Q3)
    ids, mask = inputs()
    ref = torch_hidden(tm, ids, mask)
    model = to_jax(fam, tm, scan_layers=scan)
    out = model(ids, mask, output_hidden_states=True)
    assert len(out.hidden_states) == len(ref) == 4
    for ours, theirs in zip(out.hidden_states, ref):
        assert valid_err(ours, theirs, mask) < TOL
    assert valid_err(out.last_hidden_state, ref[-1], mask) < TOL  # hidden_states[-1] is after the final norm
    # only the requested state is kept, the others are None
    sel = model(ids, mask, output_hidden_states=[-2])
    assert sel.hidden_states[0] is None and sel.hidden_states[-1] is None
    assert valid_err(sel.hidden_states[-2], ref[-2], mask) < TOL


def test_llm_without_mask_remat_and_chunked_attention():
    tm = tiny_qwen3(2)
    ids, _ = inputs(1, batch=2)
    ref = torch_hidden(tm, ids, np.ones_like(ids))
    for kw in (dict(remat="full"), dict(attention_impl="chunked")):
        out = to_jax(Q3, tm, **kw)(ids, output_hidden_states=-2)
        assert max_rel_err(out.last_hidden_state, ref[-1]) < TOL
        assert max_rel_err(out.hidden_states[-2], ref[-2]) < TOL


def test_bf16_compute_is_close():
    tm = tiny_vl(3)
    ids, mask = inputs(2)
    ref = torch_hidden(tm, ids, mask)
    out = to_jax(VL, tm, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)(ids, mask, output_hidden_states=[-2])
    assert out.last_hidden_state.dtype == jnp.bfloat16
    assert valid_err(out.last_hidden_state, ref[-1], mask) < 5e-2
    assert valid_err(out.hidden_states[-2], ref[-2], mask) < 5e-2


def test_causal_attention_implementations_agree():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 21, 3, 8)), jnp.float32) for _ in range(3))
    mask = jnp.asarray(np.arange(21)[None, :] < np.array([[21], [13]]))
    ref = attention(q, k, v, mask, causal=True)
    # hand-written reference: softmax over keys j <= i that the mask keeps
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
    allowed = np.tril(np.ones((21, 21), bool))[None, None] & np.asarray(mask)[:, None, None, :]
    p = np.where(allowed, np.exp(logits - logits.max(-1, keepdims=True)), 0)
    expect = np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)
    rows = np.asarray(mask)[..., None, None]
    assert np.abs(np.where(rows, ref - expect, 0)).max() < 1e-5
    for qb, kb in ((None, None), (8, 8), (5, 16)):  # single block and online softmax over several key blocks
        out = _chunked_attention(q, k, v, mask, 8 ** -0.5, q_block=qb, kv_block=kb, causal=True)
        assert np.abs(np.asarray(out - ref)).max() < 1e-5
    # causal=False is unchanged
    assert np.abs(np.asarray(attention(q, k, v, mask) - attention(q, k, v, mask, causal=False))).max() == 0


def test_mrope_reduces_to_standard_rope_for_text():
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding
    tm = tiny_vl()
    rot = Qwen2_5_VLRotaryEmbedding(tm.config.text_config)
    pos = torch.arange(40)[None, None, :].expand(3, 2, -1)  # text tokens: the same position on all 3 axes
    cos, sin = rot(torch.zeros(1, dtype=torch.float32), pos)
    ours_cos, ours_sin = rope_tables(40, 8, 1e6)
    np.testing.assert_allclose(cos[0].numpy(), ours_cos, atol=1e-6)
    np.testing.assert_allclose(sin[1].numpy(), ours_sin, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and configs

def _check_folder(folder, tm, fam_name):
    ids, mask = inputs(3)
    ref = torch_hidden(tm, ids, mask)
    model = models.from_diffusers(folder, progress=False)
    assert model.family == fam_name
    out = model(ids, mask, output_hidden_states=[-2])
    assert valid_err(out.last_hidden_state, ref[-1], mask) < TOL
    assert valid_err(out.hidden_states[-2], ref[-2], mask) < TOL


def test_qwen2_5_vl_checkpoint_layouts(tmp_path):
    tm = tiny_vl(4)
    tm.save_pretrained(tmp_path / "disk")
    keys = set(load_file(tmp_path / "disk" / "model.safetensors"))
    # transformers 5.x still writes the published on-disk names: model.layers.N / visual.* / lm_head
    assert "model.layers.0.self_attn.q_proj.bias" in keys and any(k.startswith("visual.") for k in keys)
    assert "lm_head.weight" in keys and not any(k.startswith("model.language_model.") for k in keys)
    _check_folder(tmp_path / "disk", tm, "qwen2_5_vl_text")

    # the in-memory module names (model.language_model.* / model.visual.*), as some tools save them
    (tmp_path / "mem").mkdir()
    shutil.copy(tmp_path / "disk" / "config.json", tmp_path / "mem")
    save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, tmp_path / "mem" / "model.safetensors")
    assert any(k.startswith("model.language_model.layers.") for k in load_file(tmp_path / "mem" / "model.safetensors"))
    _check_folder(tmp_path / "mem", tm, "qwen2_5_vl_text")

    # a flat (pre-text_config) config.json, as in the published Qwen-Image text_encoder, means the same model
    nested = json.loads((tmp_path / "disk" / "config.json").read_text())
    flat = {k: v for k, v in nested.items() if k != "text_config"}
    flat.update({k: v for k, v in nested["text_config"].items() if k != "rope_parameters"})
    flat.update(rope_theta=1e6, rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]})
    (tmp_path / "mem" / "config.json").write_text(json.dumps(flat))
    assert read_component_config(tmp_path / "mem")[1] == read_component_config(tmp_path / "disk")[1]

    # unknown tensors still fail by name; the ignored prefixes do not hide them
    sd = load_file(tmp_path / "disk" / "model.safetensors")
    sd["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(sd, tmp_path / "mem" / "model.safetensors")
    with pytest.raises(ConversionError, match="layers.0.self_attn.extra.weight"):
        models.from_diffusers(tmp_path / "mem", progress=False)
    with pytest.raises(ValueError, match="both give"):
        VL.source_names(["model.layers.0.mlp.up_proj.weight", "model.language_model.layers.0.mlp.up_proj.weight"])


@pytest.mark.parametrize("causal_lm", [False, True], ids=["Qwen3Model", "Qwen3ForCausalLM"])
def test_qwen3_checkpoint_layouts(tmp_path, causal_lm):
    tm = tiny_qwen3(5, causal_lm)
    tm.save_pretrained(tmp_path / "te")
    keys = set(load_file(tmp_path / "te" / "model.safetensors"))
    assert ("model.layers.0.self_attn.q_norm.weight" in keys) == causal_lm
    _check_folder(tmp_path / "te", tm, "qwen3_text")
    if not causal_lm:  # the conversion CLI path: Orbax export, loaded back through our own config format
        from turbojax.convert.folders import to_jax as export
        export(tmp_path / "te", tmp_path / "jax", progress=False)
        _check_folder(tmp_path / "jax", tm, "qwen3_text")


def test_unsupported_configs_raise(tmp_path):
    tm = tiny_qwen3()
    base = tm.config.to_dict()
    cases = [({"use_sliding_window": True, "sliding_window": 8}, "sliding"),
             ({"hidden_act": "gelu"}, "hidden_act"),
             ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}}, "yarn"),
             ({"layer_types": ["sliding_attention"] * 3}, "layer_types"),
             ({"model_type": "qwen3_moe"}, "model_type")]
    for override, match in cases:
        with pytest.raises(ConfigError, match=match):
            config_from_dict(Q3, {**base, **override}, "config.json")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ConfigError, match="LlamaForCausalLM"):
        read_component_config(tmp_path)


# The published configs (flat Qwen2.5-VL layout of Qwen-Image's text_encoder, Qwen3-4B's config)
QWEN_IMAGE_TEXT_ENCODER = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584, "image_token_id": 151655,
    "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 128000,
    "max_window_layers": 28, "model_type": "qwen2_5_vl", "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
    "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "use_sliding_window": False, "video_token_id": 151656, "vision_end_token_id": 151653,
    "vision_start_token_id": 151652, "vision_token_id": 151654, "vocab_size": 152064,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2}}
QWEN3_4B_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2560, "initializer_range": 0.02,
    "intermediate_size": 9728, "max_position_embeddings": 40960, "max_window_layers": 36, "model_type": "qwen3",
    "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3"])
def test_real_size_presets_match_transformers_shapes(kind):
    """The real configs parse to our presets, and transformers' real-size state dict (built on the meta device)
    passes our strict key/shape check."""
    import transformers
    fam, raw, preset = ((VL, QWEN_IMAGE_TEXT_ENCODER, QWEN2_5_VL_7B) if kind == "qwen2_5_vl"
                        else (Q3, QWEN3_4B_CONFIG, QWEN3_4B))
    assert config_from_dict(fam, raw, "config.json") == preset
    cls = getattr(transformers, raw["architectures"][0])
    with torch.device("meta"):
        tm = cls(cls.config_class(**raw))
    available = {name: tuple(tm.state_dict()[s.key].shape) for name, s in fam.source_names(tm.state_dict()).items()}
    model = models.abstract_model(fam, preset)
    check_keys(model_leaves(model, fam), flat_params(model), available, "meta model")


# ---------------------------------------------------------------------------------------------------------------
# Prompt encoding vs the pipelines

PROMPTS = ["a red cat sitting on a blue chair", "mountain", "A photo of a quiet lake at sunset, with clouds"]
LONG = "a red cat sitting on a blue chair near the window, " * 60


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A tiny byte-level BPE wrapped as a Qwen2Tokenizer, saved and loaded back like a pipeline's tokenizer/."""
    from turbojax.testing import tiny_qwen_tokenizer
    tok = tiny_qwen_tokenizer(PROMPTS)
    folder = tmp_path_factory.mktemp("pipe") / "tokenizer"
    tok.save_pretrained(folder)
    loaded = load_tokenizer(folder)
    assert len(loaded) <= VOCAB and loaded.padding_side == "right"
    return loaded


def _qwen_image_reference(tm, tok, prompts, msl):
    from diffusers import QwenImagePipeline
    pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=tm, tokenizer=tok, transformer=None)
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(list(prompts), device=torch.device("cpu"), max_sequence_length=msl)
    return embeds.numpy(), (None if mask is None else mask.numpy())


@pytest.mark.parametrize("prompts,msl", [(PROMPTS, 512), (PROMPTS[:1], 512), (PROMPTS, 9)],
                         ids=["batch", "single", "short_msl"])
def test_qwen_image_prompt_encoding_matches_pipeline(tokenizer, prompts, msl):
    tm = tiny_vl(6)
    llm = to_jax(VL, tm)
    ref_embeds, ref_mask = _qwen_image_reference(tm, tokenizer, prompts, msl)
    for bucket in (64, 0):  # bucketing (extra right padding) must not change anything
        if msl < 512:
            with pytest.warns(PromptTruncationWarning, match="tokens were dropped"):
                embeds, mask = encode_qwen_image_prompts(tokenizer, llm, prompts, msl, bucket=bucket)
        else:
            embeds, mask = encode_qwen_image_prompts(tokenizer, llm, prompts, msl, bucket=bucket)
        assert embeds.shape == ref_embeds.shape
        assert (mask is None) == (ref_mask is None)
        if mask is not None:
            np.testing.assert_array_equal(np.asarray(mask), ref_mask)
        assert max_rel_err(embeds, ref_embeds) < TOL


def test_qwen_image_long_prompt_and_left_padding(tokenizer):
    tm = tiny_vl(7)
    llm = to_jax(VL, tm)
    prompts = [LONG * 2, "mountain"]
    assert len(tokenizer(LONG * 2)["input_ids"]) > 1024 + 34  # the tokenizer limit truncates too
    ref_embeds, ref_mask = _qwen_image_reference(tm, tokenizer, prompts, 512)
    with pytest.warns(PromptTruncationWarning, match=r"prompt 0 .* the last \d+ tokens were dropped"):
        embeds, mask = encode_qwen_image_prompts(tokenizer, llm, prompts)
    assert embeds.shape == ref_embeds.shape == (2, 512, 32)
    np.testing.assert_array_equal(np.asarray(mask), ref_mask)
    assert max_rel_err(embeds, ref_embeds) < TOL
    # a left-padding tokenizer: positions stay 0..S-1 over the padded row (transformers 5.x), nothing is cut
    left = tokenizer.__class__.from_pretrained(tokenizer.name_or_path, padding_side="left")
    ref_embeds, ref_mask = _qwen_image_reference(tm, left, PROMPTS, 512)
    embeds, mask = encode_qwen_image_prompts(left, llm, PROMPTS)
    np.testing.assert_array_equal(np.asarray(mask), ref_mask)
    assert max_rel_err(embeds, ref_embeds) < TOL


@pytest.mark.parametrize("msl", [512, 24])
def test_z_image_prompt_encoding_matches_pipeline(tokenizer, msl):
    from diffusers import ZImagePipeline
    tm = tiny_qwen3(8)
    llm = to_jax(Q3, tm)
    prompts = PROMPTS + ([LONG] if msl < 512 else [])
    pipe = ZImagePipeline(scheduler=None, vae=None, text_encoder=tm, tokenizer=tokenizer, transformer=None)
    with torch.no_grad():  # _encode_prompt rewrites its prompt list in place: give it a copy
        ref = [r.numpy() for r in pipe._encode_prompt(list(prompts), device=torch.device("cpu"),
                                                      max_sequence_length=msl)]
    if msl < 512:
        with pytest.warns(PromptTruncationWarning, match="Z-Image prompt"):
            out = encode_z_image_prompts(tokenizer, llm, prompts, msl)
    else:
        out = encode_z_image_prompts(tokenizer, llm, prompts, msl)
    assert [o.shape for o in out] == [r.shape for r in ref]
    assert max(max_rel_err(o, r) for o, r in zip(out, ref)) < TOL


def test_llm_compiles_once_per_bucket(tokenizer):
    llm = to_jax(Q3, tiny_qwen3(9))
    from turbojax.models.qwen_llm import _jitted_forward
    encode_z_image_prompts(tokenizer, llm, ["mountain"])
    before = _jitted_forward._cache_size()
    encode_z_image_prompts(tokenizer, llm, ["a red cat sitting on a blue chair"])  # other length, same bucket
    assert _jitted_forward._cache_size() == before
