"""End to end: a tiny diffusers pipeline saved locally; diffusers and our sample.py / pipeline on the same folder,
prompt and initial latents give the same image (Qwen-Image with and without true CFG, with a LoRA; Z-Image)."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from refs import perturb_, tiny_qwen, tiny_z_image

REPO = Path(__file__).resolve().parent.parent
# pass copies to diffusers: ZImagePipeline rewrites the prompt list in place with its chat template
PROMPTS = ["a red cat sitting on a blue chair", "mountain lake at dawn"]
TEXT = dict(vocab_size=320, hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def make_tokenizer():
    from turbojax.testing import tiny_qwen_tokenizer
    return tiny_qwen_tokenizer(PROMPTS)


def qwen_pipeline_torch(seed=0):
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    text = dict(TEXT, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 1],
                                                          "rope_theta": 1e6})
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=24)
    te = perturb_(Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision)), seed)
    vae = perturb_(AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                          latents_mean=[0.1, -0.2, 0.3, -0.4], latents_std=[1.5, 0.5, 2.0, 1.0]),
                   seed, std=0.1)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                            base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                                            time_shift_type="exponential")
    pipe = QwenImagePipeline(scheduler=sched, vae=vae, text_encoder=te, tokenizer=make_tokenizer(),
                             transformer=tiny_qwen(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def z_image_pipeline_torch(seed=0):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from transformers import Qwen3Config, Qwen3Model
    torch.manual_seed(seed)
    te = perturb_(Qwen3Model(Qwen3Config(**TEXT, head_dim=8, rope_theta=1e6)), seed)
    vae = perturb_(AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                 block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=4,
                                 norm_num_groups=4, scaling_factor=0.3611, shift_factor=0.1159,
                                 use_quant_conv=False, use_post_quant_conv=False), seed, std=0.1)
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=te,
                          tokenizer=make_tokenizer(), transformer=tiny_z_image(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def to_uint8(images: np.ndarray) -> np.ndarray:
    return (images * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen") / "Qwen-Image-tiny"
    qwen_pipeline_torch().save_pretrained(folder)
    return reloaded(folder), folder


@pytest.fixture(scope="module")
def zimage(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zimage") / "Z-Image-tiny"
    z_image_pipeline_torch().save_pretrained(folder)
    return reloaded(folder), folder


def reloaded(folder):
    """The reference reads the saved folder too, so both sides use exactly the files on disk (a freshly trained
    tiny BPE in memory is not guaranteed to tokenize like its saved copy)."""
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compare(ours_u8, ref_float):
    """Images agree to within one uint8 level on almost every pixel (rounding at .5 boundaries may differ)."""
    ref_u8 = to_uint8(ref_float)
    diff = np.abs(ours_u8.astype(int) - ref_u8.astype(int))
    assert ours_u8.shape == ref_u8.shape
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    assert ref_u8.std() > 5, "images must not be flat for the comparison to mean anything"


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [1.0, 3.0], ids=["no_cfg", "true_cfg"])
def test_qwen_pipeline_matches_diffusers(qwen, cfg):
    from turbojax import pipelines
    pipe, folder = qwen
    ours = pipelines.from_diffusers(folder, progress=False)
    h = w = 64
    noise = np.asarray(ours.noise(0, len(PROMPTS), h, w))
    with torch.no_grad():
        ref = pipe(list(PROMPTS), negative_prompt=[" "] * 2 if cfg > 1 else None, true_cfg_scale=cfg, height=h, width=w,
                   num_inference_steps=3, latents=torch.tensor(noise), output_type="np").images
    timings = {}
    out = ours(PROMPTS, negative_prompt=" " if cfg > 1 else None, guidance=cfg, steps=3, width=w, height=h,
               noise=noise, timings=timings)
    compare(out, ref)
    assert set(timings) >= {"text_encode", "transformer", "vae_decode"}


@pytest.mark.slow
def test_qwen_pipeline_tiled_decode_matches_diffusers(qwen):
    """The tiled decode stage (jitted latent prep, tiles, host blending, jitted quantisation) against diffusers'
    pipeline with its VAE tiling on, same tiles."""
    from turbojax import pipelines
    pipe, folder = qwen
    ours = pipelines.from_diffusers(folder, progress=False)
    tiles = dict(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24,
                 tile_sample_stride_width=24)
    h, w = 64, 80
    noise = np.asarray(ours.noise(2, len(PROMPTS), h, w))
    pipe.vae.enable_tiling(**tiles)
    try:
        with torch.no_grad():
            ref = pipe(list(PROMPTS), height=h, width=w, num_inference_steps=2, latents=torch.tensor(noise),
                       output_type="np").images
    finally:
        pipe.vae.disable_tiling()
    ours.vae.enable_tiling(**tiles)
    assert ours.vae.wants_tiling(h // 8, w // 8)
    compare(ours(PROMPTS, steps=2, width=w, height=h, noise=noise), ref)
    untiled = ours(PROMPTS, steps=2, width=w, height=h, noise=noise, tiled_decode=False)
    assert np.abs(untiled.astype(int) - to_uint8(ref).astype(int)).max() > 1  # tiling really changed the image


@pytest.mark.slow
def test_z_image_pipeline_matches_diffusers(zimage):
    from turbojax import pipelines
    pipe, folder = zimage
    ours = pipelines.from_diffusers(folder, progress=False)
    h, w = 64, 48
    noise = np.asarray(ours.noise(1, len(PROMPTS), h, w))
    with torch.no_grad():
        ref = pipe(list(PROMPTS), guidance_scale=0.0, height=h, width=w, num_inference_steps=2,
                   latents=torch.tensor(noise), output_type="np").images
    compare(ours(PROMPTS, guidance=0.0, steps=2, width=w, height=h, noise=noise), ref)


@pytest.mark.slow
def test_sample_py_with_lora_matches_diffusers(qwen, tmp_path):
    from test_lora_model import random_modules, write_layout
    pipe, folder = qwen
    write_layout(tmp_path / "lora.safetensors", random_modules(pipe.transformer, 5), "comfy")
    h = w = 48
    from turbojax.sampling import qwen_image_noise
    import jax
    noise = np.asarray(qwen_image_noise(jax.random.key(3), 1, h, w, 4))
    np.save(tmp_path / "noise.npy", noise)
    r = subprocess.run([sys.executable, "sample.py", "--model", str(folder), "--prompt", PROMPTS[0],
                        "--config", "configs/sample_qwen_image_turbo_2step.py", "--lora",
                        f"{tmp_path / 'lora.safetensors'}:0.8", "--width", str(w), "--height", str(h),
                        "--noise", str(tmp_path / "noise.npy"), "--dtype", "float32", "--out",
                        str(tmp_path / "img.png")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    from diffusers import QwenImagePipeline
    from PIL import Image
    from diffusers import FlowMatchEulerDiscreteScheduler
    import math
    ref_pipe = QwenImagePipeline.from_pretrained(folder)
    ref_pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        ref_pipe.scheduler.config, base_shift=math.log(3), max_shift=math.log(3), shift_terminal=None)
    ref_pipe.set_progress_bar_config(disable=True)
    ref_pipe.load_lora_weights(str(tmp_path / "lora.safetensors"), adapter_name="x")
    ref_pipe.set_adapters(["x"], [0.8])
    with torch.no_grad():
        ref = ref_pipe(PROMPTS[0], true_cfg_scale=1.0, height=h, width=w, num_inference_steps=2,
                       latents=torch.tensor(noise), output_type="np").images
    img = Image.open(tmp_path / "img.png")
    assert img.text["prompt"] == PROMPTS[0] and img.text["steps"] == "2" and img.text["guidance"] == "1.0"
    compare(np.asarray(img)[None], ref)


@pytest.mark.slow
def test_sample_py_bad_input(qwen, zimage, tmp_path):
    _, folder = qwen
    _, zfolder = zimage

    def run(*args):
        return subprocess.run([sys.executable, "sample.py", "--model", str(folder), "--out",
                               str(tmp_path / "o.png"), *args], cwd=REPO, capture_output=True, text=True, timeout=600)

    r = run("--prompt", "x", "--width", "100")
    assert r.returncode != 0 and "multiples of 16" in r.stderr
    (tmp_path / "empty.txt").write_text("\n\n")
    r = run("--prompts-file", str(tmp_path / "empty.txt"))
    assert r.returncode != 0 and "holds no prompts" in r.stderr
    # a Z-Image LoRA on a Qwen-Image pipeline
    from test_lora_model import write_layout
    write_layout(tmp_path / "z.safetensors", {"layers.0.attention.to_q": (
        torch.zeros(2, 64), torch.zeros(64, 2), 2.0)}, "comfy")
    r = run("--prompt", "x", "--lora", str(tmp_path / "z.safetensors"), "--width", "32", "--height", "32")
    assert r.returncode != 0 and "z.safetensors" in r.stderr and "qwen_image" in r.stderr
    # a pipeline folder missing a component
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(zfolder, broken)
    shutil.rmtree(broken / "vae")
    r = subprocess.run([sys.executable, "sample.py", "--model", str(broken), "--prompt", "x", "--out",
                        str(tmp_path / "o.png")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "missing pipeline components ['vae']" in r.stderr
    assert not (tmp_path / "o.png").exists()


@pytest.mark.slow
def test_pipeline_export_round_trip(zimage, tmp_path):
    """A whole pipeline folder -> turbojax export (loads to the same images) -> diffusers folder (byte-exact)."""
    from turbojax import pipelines
    from turbojax.convert.__main__ import main as cli
    _, folder = zimage
    assert cli(["to-jax", str(folder), str(tmp_path / "jax"), "--no-progress"]) == 0
    assert cli(["to-torch", str(tmp_path / "jax"), str(tmp_path / "back"), "--no-progress"]) == 0
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            assert (tmp_path / "back" / f.relative_to(folder)).read_bytes() == f.read_bytes(), f
    a = pipelines.from_diffusers(folder, progress=False)
    b = pipelines.from_diffusers(tmp_path / "jax", progress=False)
    kw = dict(guidance=0.0, steps=2, width=32, height=32, seed=4)
    np.testing.assert_array_equal(a(PROMPTS[:1], **kw), b(PROMPTS[:1], **kw))
