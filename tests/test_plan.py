"""AOT memory plan (`python -m turbojax.plan`) on a tiny config and a small TPU topology, and the activation
constraints at block boundaries (no-ops without a mesh, numerically neutral on the simulated 8-device mesh)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from turbojax import models
from turbojax.plan import cli
from turbojax.sharding import constrain, constrain_residual, make_mesh

TINY = ["--config", "configs/qwen_image_dmd2_gan.py", "--model", "qwen_image_tiny", "--topology", "v5e:2x2",
        "--resolution", "64", "--text-len", "16", "--attention", "xla", "--flops", "raw"]
KEYS = {"argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "total_bytes", "hbm_bytes", "fits",
        "flops_per_device", "est_step_seconds"}


def test_constrain_is_a_noop_without_a_mesh():
    x = jnp.ones((2, 3, 4))
    assert constrain(x, ("batch", "length", "embed")) is x
    tree = (x, jnp.ones((2, 4)))
    assert all(a is b for a, b in zip(constrain_residual(tree), tree))


def _tiny_forward(model):
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 16, 16)), jnp.float32)  # 4x4 latent grid, 16 packed channels
    ctx = jnp.asarray(rng.normal(size=(4, 8, 24)), jnp.float32)
    mask = jnp.asarray(np.arange(8)[None] < np.array([8, 5, 3, 8])[:, None])
    t = jnp.asarray([0.1, 0.5, 0.9, 0.3], jnp.float32)

    def f(state, x, ctx, mask, t):
        return nnx.merge(graphdef, state).forward(x, ctx, mask, t, ((1, 4, 4),))
    return jax.jit(f), (state, x, ctx, mask, t)


def test_residual_constraints_change_nothing_on_a_mesh():
    model = models.create("qwen_image_tiny", seed=0, remat="full")
    fn, args = _tiny_forward(model)
    plain_text = fn.lower(*args).as_text()
    want = fn(*args)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    with jax.set_mesh(mesh):
        lowered_text = fn.lower(*args).as_text()
        got = fn(*args)
    # the constraint is really there on the mesh (batch 4 over data x fsdp) and absent without it
    assert "sharding_constraint" in lowered_text or "@Sharding" in lowered_text
    assert "sharding_constraint" not in plain_text and "@Sharding" not in plain_text
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # two XLA:TPU compiles of the DMD2 + GAN turns (about a minute on an idle 2-core host)
def test_plan_cli_tiny_writes_every_step(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert cli.main(TINY + ["--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["topology"] == "v5e:2x2" and data["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert set(data["steps"]) == {"generator", "critic"}
    for name, s in data["steps"].items():
        assert KEYS <= set(s), name
        assert s["fits"] is True and s["hbm_bytes"] == int(15.75 * 2 ** 30)
        assert s["total_bytes"] == s["argument_bytes"] + s["output_bytes"] + s["temp_bytes"] - s["alias_bytes"]
        assert s["flops_per_device"] > 0 and s["est_step_seconds"] > 0
    assert "fits yes" in capsys.readouterr().out


@pytest.mark.slow
def test_plan_reports_out_of_hbm_without_crashing(tmp_path):
    out = tmp_path / "oom.json"
    # 16 samples per chip at 2048 px: XLA attention's fp32 logits alone are ~32 GiB per chip
    args = TINY[:6] + ["--resolution", "2048", "--batch-per-chip", "16", "--text-len", "16", "--attention", "xla",
                       "--flops", "raw", "--json", str(out)]
    assert cli.main(args) == 0
    steps = json.loads(out.read_text())["steps"]
    assert steps and all(s["fits"] is False for s in steps.values())
    s = next(iter(steps.values()))
    assert s["temp_bytes"] > s["hbm_bytes"] and "memory" in s["compiler_error"].lower()


def test_plan_bad_topology_is_one_error_line(capsys):
    assert cli.run(TINY[:4] + ["--topology", "v5e-256"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --topology 'v5e-256'")


def test_plan_bad_mesh_is_one_error_line(capsys):
    assert cli.run(TINY + ["--mesh", "data=3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --mesh")


def test_scanned_taps_match_the_loop_with_gradients():
    """The scan keeps only the tap rows (not every layer's output): values and gradients equal the looped stack."""
    scanned = nnx.state(models.create("qwen_image_tiny", seed=0, scan_layers=True, remat="full"))
    stacked = {tuple(str(k) for k in p): v for p, v in nnx.to_flat_state(scanned)}

    def run(scan):
        model = models.create("qwen_image_tiny", seed=1, scan_layers=scan, remat="full")
        graphdef, state = nnx.split(model)
        flat = []  # the same weights in both: the looped blocks get their layer of the scanned stack
        for p, v in nnx.to_flat_state(state):
            key = tuple(str(k) for k in p)
            if not scan and key[0] == "transformer_blocks":
                flat.append((p, v.replace(stacked[(key[0],) + key[2:]][...][int(key[1])])))
            else:
                flat.append((p, v.replace(stacked[key][...])))
        state = nnx.from_flat_state(flat)
        rng = np.random.default_rng(1)
        x = jnp.asarray(rng.normal(size=(2, 16, 16)), jnp.float32)
        ctx = jnp.asarray(rng.normal(size=(2, 8, 24)), jnp.float32)
        t = jnp.asarray([0.3, 0.8], jnp.float32)

        def loss(x):
            out, feats = nnx.merge(graphdef, state).forward(x, ctx, None, t, ((1, 4, 4),), taps=(1, 0, 1))
            return jnp.sum(out ** 2) + sum(jnp.sum(jnp.sin(f) * (j + 1)) for j, f in enumerate(feats)), feats
        (val, feats), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(x)
        return val, feats, grad
    v_s, f_s, g_s = run(True)
    v_l, f_l, g_l = run(False)
    np.testing.assert_allclose(v_s, v_l, rtol=1e-5)
    for a, b in zip(f_s, f_l):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_s, g_l, rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(g_s).max()) > 0


def test_lora_factors_an_fsdp_mesh_leaves_whole_get_their_rank_split():
    """On an fsdp-only mesh the `b` of a heads/mlp kernel (and the `a` of an mlp-input kernel) had no axis: at 20B
    half the LoRA state was replicated on every chip. Their rank dim now goes over fsdp when it divides."""
    from jax.sharding import PartitionSpec as P

    from turbojax.distill import sharded
    _, state = nnx.split(models.create("qwen_image_tiny", seed=0))

    def factors(r):
        sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
        return {"student": {"transformer_blocks.attn.to_q": {"a": sds(2, 32, r), "b": sds(2, r, 32)},
                            "transformer_blocks.img_mlp.fc2": {"a": sds(2, 128, r), "b": sds(2, r, 32)}}}
    sh = sharded.trainable_shardings(factors(8), state, make_mesh(1, 8, 1))["student"]
    assert sh["transformer_blocks.attn.to_q"]["a"].spec == P(None, "fsdp", None)  # like the kernel's in-dim
    assert sh["transformer_blocks.attn.to_q"]["b"].spec == P(None, "fsdp", None)  # heads: no axis -> rank
    assert sh["transformer_blocks.img_mlp.fc2"]["a"].spec == P(None, None, "fsdp")  # mlp: no axis -> rank
    assert sh["transformer_blocks.img_mlp.fc2"]["b"].spec == P(None, None, "fsdp")
    odd = sharded.trainable_shardings(factors(4), state, make_mesh(1, 8, 1))["student"]  # 4 % 8: stays whole
    assert odd["transformer_blocks.attn.to_q"]["b"].spec == P(None, None, None)
    # with tensor > 1 the kernel's own axes apply, as before
    tp = sharded.trainable_shardings(factors(8), state, make_mesh(1, 4, 2))["student"]
    assert tp["transformer_blocks.attn.to_q"]["b"].spec == P(None, None, "tensor")


@pytest.mark.slow  # 2 step compiles + 4 small unrolled ones
def test_plan_flops_corrected_for_the_scan(tmp_path):
    """`--flops layers` counts every scanned layer (cost analysis counts a scan body once): above the raw figure."""
    raw, fixed = tmp_path / "raw.json", tmp_path / "layers.json"
    assert cli.main(TINY + ["--steps", "critic", "--json", str(raw)]) == 0
    assert cli.main(TINY[:-2] + ["--flops", "layers", "--steps", "critic", "--json", str(fixed)]) == 0
    r, f = (json.loads(p.read_text())["steps"]["critic"] for p in (raw, fixed))
    assert "layers" in f["flops_method"] and f["flops_per_device"] > 1.2 * r["flops_per_device"]


# ---- the DINOv2 discriminator (gan.features dino): frozen DINOv2 + VAE decoder built abstractly, shared assembly ----

DINO = ["--config.gan.features", "dino", "--dino", "dinov2-tiny", "--config.gan.dino_size", "16"]


@pytest.mark.slow  # one XLA:TPU compile: the generator turn, which decodes the student's samples with gradients
def test_plan_dino_gan_compiles_and_reports(tmp_path, capsys):
    out = tmp_path / "dino.json"
    assert cli.main(TINY + DINO + ["--steps", "generator", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["gan_features"] == "dino"
    d = data["dino_gan"]
    assert d["dino"] == "dinov2-tiny" and d["vae"] == "qwen_image_vae_tiny" and d["dino_layers"] == [0, 1, 2]
    assert d["dino_size"] == [16, 16] and d["image_hw"] == [64, 64] and d["vae_dtype"] == "float32"
    assert d["dino_params"] > 0 and d["vae_decoder_params"] > 0
    s = data["steps"]["generator"]
    assert KEYS <= set(s) and s["fits"] is True and s["temp_bytes"] > 0
    assert s["total_bytes"] == s["argument_bytes"] + s["output_bytes"] + s["temp_bytes"] - s["alias_bytes"]
    assert "DINO GAN on: dinov2-tiny" in capsys.readouterr().out


@pytest.mark.parametrize("config,model,vae", [
    ("configs/qwen_image_dmd2_gan.py", "qwen_image_tiny", "qwen_image_vae_tiny"),
    ("configs/z_image_turbopp.py", "z_image_tiny", "flux_vae_tiny")])
def test_plan_dino_frozen_states_are_sharded_like_the_real_run(config, model, vae):
    """No compile: the frozen argument is the base + DINO + VAE-decoder states (nets.FrozenArrays), each variable
    with the sharding `sharded.frozen_shardings` gives it in train.py; the heads are trainables."""
    from turbojax.distill import sharded
    from turbojax.distill.nets import FrozenArrays
    from turbojax.plan import build as build_lib
    from turbojax.plan.topology import build_mesh, parse_mesh, topology_devices
    from turbojax.training import config as config_lib
    cfg = config_lib.load_config(config)
    cfg.gan.features = "dino"
    mesh = build_mesh(topology_devices("v5e:2x2", 1), parse_mesh("data=1,fsdp=-1,tensor=1"), 1)
    setup = build_lib.build(cfg, model, mesh, resolution=64, batch_per_chip=1, text_len=16, attention="xla",
                            dino="dinov2_with_registers_tiny")
    assert setup.dino["dino"] == "dinov2-with-registers-tiny" and setup.dino["vae"] == vae
    state, frozen = setup.steps[0].args[:2]
    assert isinstance(frozen, FrozenArrays) and "disc" in state["params"]
    want = jax.tree.leaves(sharded.frozen_shardings(frozen, mesh))  # what train.py puts them with
    assert [x.sharding for x in jax.tree.leaves(frozen)] == want
    assert any("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(frozen.dino))  # DINO's matrices are split
    # the DINO in the config dtype, the VAE decoder in fp32 (dino_disc.load); the encoder is not kept
    assert {x.dtype for x in jax.tree.leaves(frozen.dino)} == {jnp.dtype(cfg.dtype)}
    assert {x.dtype for x in jax.tree.leaves(frozen.vae)} == {jnp.dtype(jnp.float32)}


def test_plan_dino_reads_an_existing_gan_dino_folder(tmp_path):
    """Without --dino the config of an existing gan.dino folder decides (config.json alone: no weights are read)."""
    from turbojax.plan import build as build_lib
    from turbojax.plan.topology import build_mesh, parse_mesh, topology_devices
    from turbojax.training import config as config_lib
    folder = tmp_path / "dinov2-with-registers-mini"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["Dinov2WithRegistersModel"], "model_type": "dinov2_with_registers", "hidden_size": 16,
        "num_hidden_layers": 4, "num_attention_heads": 2, "patch_size": 4, "image_size": 16,
        "num_register_tokens": 2}))
    cfg = config_lib.load_config("configs/qwen_image_dmd2_gan.py")
    cfg.gan.features, cfg.gan.dino, cfg.gan.dino_size, cfg.gan.dino_layers = "dino", str(folder), 16, (1, 3)
    mesh = build_mesh(topology_devices("v5e:2x2", 1), parse_mesh("data=1,fsdp=-1,tensor=1"), 1)
    setup = build_lib.build(cfg, "qwen_image_tiny", mesh, resolution=64, batch_per_chip=1, text_len=16,
                            attention="xla")
    assert setup.dino["dino"].startswith("dinov2-with-registers-mini (dinov2_with_registers")
    assert setup.dino["dino_layers"] == [1, 3]


def test_plan_dino_mistakes_are_one_error_line(capsys):
    cases = [(DINO[:2] + ["--dino", "dinov2-huge"], "error: --dino 'dinov2-huge': not a DINOv2 preset"),
             (["--dino", "dinov2-small"], "error: --dino dinov2-small: the config's GAN does not read DINO features"),
             (DINO[:2] + ["--config.gan.dino", "/no/such/dinov2"], "error: --config.gan.dino /no/such/dinov2: no such"),
             (DINO + ["--config.gan.dino_layers", "0,7"], "error: --config.gan.dino_layers: block 7 out of range"),
             (DINO + ["--config.gan.dino_size", "18"], "error: --config.gan.dino_size 18 must be a positive multiple")]
    for extra, want in cases:
        assert cli.run(TINY + extra) == 1, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(want), (extra, err)
