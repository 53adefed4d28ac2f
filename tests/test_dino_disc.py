"""The DINOv2 discriminator (`gan.features = "dino"`) on tiny Qwen-Image / Z-Image pipelines and a tiny random
DINOv2: the decode matches the pipeline's, the GAN term alone reaches the student LoRA through DINO and the VAE
decode, the critic trains the heads, train.py runs and resumes exactly, config mistakes are one error line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from test_pipeline_e2e import qwen_pipeline_torch, z_image_pipeline_torch
from turbojax.training import config as config_lib

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {"qwen_image": "configs/qwen_image_dmd2_gan.py", "z_image": "configs/z_image_dmd2_gan.py"}
PX = 32  # image side: Qwen-Image 2 x 2 tokens, Z-Image 4 x 4 latents


@pytest.fixture(scope="module")
def dino_folder(tmp_path_factory):
    import torch
    from transformers import Dinov2Config, Dinov2Model
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("dino") / "dinov2-tiny"
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, patch_size=4,
                             image_size=16, intermediate_size=64)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    out = {}
    for family, make in (("qwen_image", qwen_pipeline_torch), ("z_image", z_image_pipeline_torch)):
        folder = tmp_path_factory.mktemp(family) / "pipe"
        make().save_pretrained(folder)
        out[family] = folder
    return out


def _cfg(family, folder, dino, config=None, **over):
    cfg = config_lib.load_config(REPO / (config or CONFIGS[family]))
    items = dict(init_from=str(folder), param_dtype="float32", dtype="float32", remat="none",
                 **{"data.width": PX, "data.height": PX, "gan.features": "dino", "gan.dino": str(dino),
                    "gan.dino_size": 16, "gan.hidden": 8, "lora.student.rank": 2, "lora.fake.rank": 2,
                    "batch_size": 2}, **over)
    for k, v in items.items():
        node = cfg
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return cfg


def _setup(family, folder, dino, config=None, **over):
    from turbojax import models
    from turbojax.distill import dino_disc, methods
    cfg = _cfg(family, folder, dino, config, **over)
    base = models.from_diffusers(Path(folder) / "transformer", progress=False)
    if family == "qwen_image":
        latent_shape, ctx_dim = ((PX // 16) ** 2, base.config.in_channels), base.config.joint_attention_dim
    else:
        latent_shape, ctx_dim = (base.config.in_channels, 1, PX // 8, PX // 8), base.config.cap_feat_dim
    loaded = dino_disc.load(cfg, base, latent_shape)
    method = methods.build(cfg, base, latent_shape, jax.random.key(1), cap_len=6, dino=loaded)
    rng = np.random.default_rng(0)
    batch = {"ctx": jnp.asarray(rng.standard_normal((2, 6, ctx_dim)), jnp.float32),
             "mask": jnp.ones((2, 6), jnp.float32),
             "real": jnp.asarray(rng.standard_normal((2, *latent_shape)), jnp.float32)}
    return cfg, method, method.frozen(nnx.state(base)), batch, loaded


@pytest.mark.parametrize("family", ["qwen_image", "z_image"])
def test_decode_matches_pipeline(pipes, dino_folder, family):
    """The discriminator's decode of model-layout latents is the pipeline's decode (unpack, de-normalise, VAE)."""
    from turbojax import pipelines
    _, method, frozen, batch, loaded = _setup(family, pipes[family], dino_folder)
    pipe = pipelines.from_diffusers(pipes[family], progress=False)
    ours = loaded.gan.images(frozen.vae, batch["real"])
    assert ours.shape == (2, PX, PX, 3)
    q = np.round(np.clip(np.asarray(ours) / 2 + 0.5, 0, 1) * 255).astype(np.int32)
    lat = batch["real"] if family == "qwen_image" else batch["real"][:, :, 0]  # the pipeline's Z-Image layout
    ref = pipe.decode(lat, height=PX, width=PX, tiled=False).astype(np.int32)
    assert np.abs(q - ref).max() <= 1  # the de-normalisation is the same affine map up to fp32 rounding
    assert np.abs(q - ref).mean() < 0.05
    # the DINO features of decoded images: CLS + patch tokens of the chosen blocks (registers dropped)
    feats = loaded.gan.features(frozen, batch["real"])
    assert loaded.gan.layers == (0, 1, 2)  # () -> fractions 0.25, 0.5, 0.75, 1.0 of 3 blocks
    assert [f.shape for f in feats] == [(2, 1 + 16, 32)] * 3  # 16 x 16 input, patch 4


@pytest.mark.parametrize("family", ["qwen_image", "z_image"])
def test_an_aspect_ratio_bucket_decodes_like_the_pipeline(pipes, dino_folder, family):
    """`at_latent_shape` (one discriminator per aspect-ratio bucket) shares the frozen arrays and decodes a
    non-square latent exactly as the pipeline does at that width and height."""
    from turbojax import pipelines
    from turbojax.distill import dino_disc
    from turbojax.distill.denoiser import latent_shape_for
    _, _, frozen, batch, loaded = _setup(family, pipes[family], dino_folder)
    channels = batch["real"].shape[-1] if family == "qwen_image" else batch["real"].shape[1]
    shape = latent_shape_for(family, channels, 32, 48)  # height 32, width 48
    wide = dino_disc.at_latent_shape(loaded, shape)
    assert wide.arrays is loaded.arrays and wide.gan.image_hw == (32, 48) and loaded.gan.image_hw == (PX, PX)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, *shape)), jnp.float32)
    ours = wide.gan.images(frozen.vae, x)
    assert ours.shape == (2, 32, 48, 3)
    pipe = pipelines.from_diffusers(pipes[family], progress=False)
    ref = pipe.decode(x if family == "qwen_image" else x[:, :, 0], height=32, width=48, tiled=False)
    q = np.round(np.clip(np.asarray(ours) / 2 + 0.5, 0, 1) * 255).astype(np.int32)
    assert np.abs(q - ref.astype(np.int32)).max() <= 1
    assert [f.shape for f in wide.gan.features(frozen, x)] == [(2, 1 + 16, 32)] * 3  # resized to the DINO size


@pytest.mark.parametrize("family,method_name", [("qwen_image", "dmd2"), ("z_image", "turbopp")])
def test_gan_term_alone_reaches_the_student(pipes, dino_folder, family, method_name):
    """DMD2 (DMD term off) and Turbo++ (boundary loss off, no DMD): the generator's loss is the DINO GAN term alone,
    and its gradient reaches every student LoRA (Turbo++: both per-step adapters, end to end)."""
    over = {"dmd.weight": 0.0, "gan.r1_weight": 0.1}
    if method_name == "turbopp":
        over |= {"turbopp.boundary_weight": 0.0, "turbopp.teacher_steps": 2}
    cfg, method, frozen, batch, _ = _setup(family, pipes[family], dino_folder,
                                           "configs/z_image_turbopp.py" if method_name == "turbopp" else None, **over)
    assert method.name == method_name
    gen, critic = method.turns
    params = method.params
    students = [g for g in params if g.startswith("student")]
    assert students == (["student"] if method_name == "dmd2" else ["student_1", "student_2"])
    key = jax.random.key(3)
    others = {g: params[g] for g in params if g not in students}
    (loss, m), grads = jax.value_and_grad(gen.loss, has_aux=True)({g: params[g] for g in students}, others, frozen,
                                                                   batch, key)
    np.testing.assert_allclose(float(loss), cfg.gan.weight * float(m["gan_g"]), rtol=1e-5)  # the GAN term alone
    for g in students:  # through the heads, DINO, the VAE decode and x0
        b_norm = float(optax.global_norm([f["b"] for f in grads[g].values()]))
        assert np.isfinite(b_norm) and b_norm > 0, g
    # the critic turn trains the heads (and DMD2's fake score), DMD2 with R1 on the heads' inputs
    critic_groups = {g: params[g] for g in critic.groups}
    (_, mc), g_c = jax.value_and_grad(critic.loss, has_aux=True)(
        critic_groups, {g: params[g] for g in params if g not in critic.groups}, frozen, batch, key)
    assert {"gan_d", "d_real", "d_fake"} <= set(mc) and np.isfinite(float(mc["gan_d"]))
    if method_name == "dmd2":
        assert float(mc["r1"]) > 0
    assert float(optax.global_norm(g_c["disc"])) > 0
    # nothing of DINO or the VAE is a trainable
    assert set(method.params) == set(students) | set(critic.groups)


def _run(family, folder, dino, prompts, workdir, *extra, steps=3, config=None):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    args = [sys.executable, str(REPO / "train.py"), "--config", config or CONFIGS[family], "--workdir", str(workdir),
            "--config.init_from", str(folder), "--config.data.prompts", str(prompts),
            "--config.param_dtype", "float32", "--config.dtype", "float32", "--config.remat", "none",
            "--config.data.width", str(PX), "--config.data.height", str(PX), "--config.data.teacher_samples", "2",
            "--config.data.teacher_steps", "2", "--config.data.max_sequence_length", "32",
            "--config.total_steps", str(steps), "--config.ttur_ratio", "1", "--config.batch_size", "2",
            "--config.lora.student.rank", "2", "--config.lora.fake.rank", "2", "--config.gan.hidden", "8",
            "--config.checkpoint_every", "1", "--config.log_every", "1", "--config.sample_every", "0",
            "--config.gan.features", "dino", "--config.gan.dino", str(dino), "--config.gan.dino_size", "16",
            "--config.opt.disc.lr", "1e-2", *extra]
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)


def _metrics(workdir):
    return {json.loads(line)["step"]: json.loads(line)
            for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()}


@pytest.mark.slow
def test_train_py_dmd2_with_dino_runs_and_resumes_exactly(tmp_path, pipes, dino_folder):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox in the snow\na lighthouse at dusk\n")
    folder = pipes["qwen_image"]
    r = _run("qwen_image", folder, dino_folder, prompts, tmp_path / "straight")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    straight = _metrics(tmp_path / "straight")
    assert sorted(straight) == [1, 2, 3]
    d_losses = [straight[s]["critic/gan_d"] for s in (1, 2, 3)]
    assert all(np.isfinite(d_losses)) and len(set(d_losses)) == 3  # the heads learn
    assert all(np.isfinite(straight[s]["generator/gan_g"]) for s in (1, 2, 3))
    r = _run("qwen_image", folder, dino_folder, prompts, tmp_path / "resumed", steps=2)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run("qwen_image", folder, dino_folder, prompts, tmp_path / "resumed")
    assert r.returncode == 0 and "resumed from step 2" in r.stdout, r.stderr[-3000:]
    resumed = _metrics(tmp_path / "resumed")
    for k, v in straight[3].items():
        assert resumed[3][k] == v, k
    from safetensors.numpy import load_file  # tensors, not bytes: the metadata records the run's step time
    ta, tb = load_file(tmp_path / "straight" / "lora.safetensors"), load_file(tmp_path / "resumed" / "lora.safetensors")
    assert ta.keys() == tb.keys() and len(ta) > 0
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)


@pytest.mark.slow
def test_train_py_z_image_turbopp_with_dino(tmp_path, pipes, dino_folder):
    """Turbo++ (per-step LoRAs, end to end) with the DINO discriminator through train.py on Z-Image."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox in the snow\na lighthouse at dusk\n")
    r = _run("z_image", pipes["z_image"], dino_folder, prompts, tmp_path / "w", "--config.turbopp.teacher_steps", "2",
             "--config.dmd.weight", "0", steps=2, config="configs/z_image_turbopp.py")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = _metrics(tmp_path / "w")
    assert sorted(m) == [1, 2] and all(np.isfinite(m[s]["critic/gan_d"]) for s in m)
    assert m[1]["critic/gan_d"] != m[2]["critic/gan_d"]
    assert all(np.isfinite(m[s]["generator/gan_g"]) for s in m)
    for name in ("lora_step1.safetensors", "lora_step2.safetensors"):
        assert (tmp_path / "w" / name).is_file(), sorted(p.name for p in (tmp_path / "w").iterdir())


def test_config_mistakes_are_one_error_line(tmp_path, pipes, dino_folder, capsys):
    import train
    from turbojax.training import run_cli
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    common = ["--config", CONFIGS["qwen_image"], "--config.init_from", str(pipes["qwen_image"]),
              "--config.data.prompts", str(prompts), "--config.gan.features", "dino",
              "--config.batch_size", "8"]  # divisible by the 8 simulated devices of the default mesh
    cases = [
        ([], "error: --config.gan.dino: give a DINOv2 folder"),
        (["--config.gan.dino", str(tmp_path / "nope")], "error: --config.gan.dino "),
        (["--config.gan.dino", str(pipes["qwen_image"] / "vae")], "not a DINOv2"),
        (["--config.gan.dino", str(dino_folder), "--config.gan.dino_size", "18"],
         "error: --config.gan.dino_size 18 must be a positive multiple of the DINOv2 patch size 4"),
        (["--config.gan.dino", str(dino_folder), "--config.gan.dino_layers", "0,7"],
         "error: --config.gan.dino_layers: block 7 out of range"),
        (["--config.gan.dino", str(dino_folder), "--config.method", "pcm"], "works with the methods dmd2, turbopp"),
    ]
    for i, (extra, want) in enumerate(cases):
        code = run_cli(train.main, common + ["--workdir", str(tmp_path / f"w{i}")] + extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and len(err) == 1 and err[0].startswith("error: ") and want in err[0], (extra, err)
        assert not (tmp_path / f"w{i}").exists()  # nothing created
    # the digits demo has no VAE and no DINO weights
    code = run_cli(train.main, ["--config.gan.features", "dino", "--workdir", str(tmp_path / "digits")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("error: --config.gan.features 'dino' needs"), err
