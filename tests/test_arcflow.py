"""ArcFlow: the momentum policy's closed-form step against a fine numerical integration, its limits (K = 1 is Euler,
gamma -> 1 keeps finite gradients), the heads' initialisation from the teacher's output layer (Qwen-Image and
Z-Image, whose heads are negated and channel-last), a distilled student on the 2-D known-answer problem, a short
train.py run that lowers its loss and resumes exactly, a short Z-Image run that lowers its loss, and export ->
reload -> the same samples."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from turbojax import models
from turbojax.distill import arcflow as A
from turbojax.distill import arcflow_heads as H
from turbojax.distill import methods, toy
from turbojax.distill.engine import Engine
from turbojax.models.qwen_image import QWEN_IMAGE_TINY
from turbojax.models.z_image import Z_IMAGE_TINY

REPO = Path(__file__).resolve().parent.parent


def _policy(seed=0, shape=(3, 5), k=4, c=2, p=4, rate_scale=3.0):
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((*shape, k, c, p)).astype(np.float32)
    logits = rng.standard_normal((*shape, k, 1, p)).astype(np.float32)
    rates = rng.uniform(-rate_scale, rate_scale, (*shape, k, 1, p)).astype(np.float32)
    rates[..., 0, :, :] = 0.0  # component 0: gamma = 1
    if k > 2:
        rates[..., 1, :, :] = 1e-7  # gamma -> 1 through the series branch
    return means, logits, rates


def _velocity64(means, logits, rates, sigma_src, sigma):
    """v(sigma) from its definition, in float64 (independent of the code under test)."""
    w = np.exp(logits - logits.max(-3, keepdims=True))
    w = w / w.sum(-3, keepdims=True)
    tau = (np.asarray(sigma_src, np.float64) - sigma).reshape((-1,) + (1,) * (means.ndim - 1))
    y = (w * means * np.exp(rates.astype(np.float64) * tau)).sum(-3)
    return y.reshape(*y.shape[:-2], -1)


def test_closed_form_step_equals_a_fine_numerical_integration():
    means, logits, rates = _policy()
    pol = A.Policy(jnp.asarray(means), jnp.asarray(logits), jnp.asarray(rates))
    x = np.random.default_rng(1).standard_normal((3, 5, 8)).astype(np.float32)
    s_src, s_a, s_b = np.array([1.0, 0.9, 0.8]), np.array([0.9, 0.7, 0.8]), np.array([0.4, 0.3, 0.0])
    n = 2000  # composite Simpson, error ~1e-12
    h = (s_a - s_b) / n
    acc = sum((1 if i in (0, n) else 4 if i % 2 else 2) * _velocity64(means, logits, rates, s_src, s_b + i * h)
              for i in range(n + 1))
    ref = x - acc * (h / 3)[:, None, None]
    out = np.asarray(A.integrate(pol, s_src, x, s_a, s_b))
    assert np.abs(out - ref).max() < 1e-5
    assert np.abs(ref - x).max() > 0.1  # the step moves: the check above can fail
    # the instantaneous velocity and the average over a vanishing window agree with the definition
    v = np.asarray(A.velocity(pol, s_src, s_a))
    np.testing.assert_allclose(v, _velocity64(means, logits, rates, s_src, s_a), atol=1e-5)
    np.testing.assert_allclose(np.asarray(A.mean_velocity(pol, s_src, s_a, s_a)), v, atol=1e-6)
    # integrating forward then back returns the start (the closed form is the flow of one ODE)
    back = A.integrate(pol, s_src, A.integrate(pol, s_src, x, s_a, s_b), s_b, s_a)
    np.testing.assert_allclose(np.asarray(back), x, atol=1e-5)


def test_one_component_is_an_euler_step():
    means, logits, rates = _policy(k=1)
    pol = A.Policy(jnp.asarray(means), jnp.asarray(logits), jnp.asarray(rates))
    x = np.random.default_rng(2).standard_normal((3, 5, 8)).astype(np.float32)
    s_a, s_b = np.array([1.0, 0.75, 0.5]), np.array([0.75, 0.0, 0.1])
    out = np.asarray(A.integrate(pol, s_a, x, s_a, s_b))
    euler = x + (s_b - s_a)[:, None, None] * means.reshape(3, 5, 8)
    np.testing.assert_allclose(out, euler, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(A.sample(lambda xx, s: pol, x, [1.0, 0.0])),
                               x - means.reshape(3, 5, 8), atol=1e-6)


def test_phi_and_gradients_stay_finite_as_gamma_goes_to_one():
    z = np.array([0.0, 1e-12, -1e-7, 1e-4, -0.049, 0.049, 0.051, -0.3, 2.0, -20.0])
    np.testing.assert_allclose(np.asarray(A.phi(z)), np.where(z == 0, 1.0, np.expm1(z) / np.where(z == 0, 1, z)),
                               rtol=1e-6)
    d = np.asarray(jax.vmap(jax.grad(A.phi))(jnp.asarray(z, jnp.float32)))
    zz = np.where(z == 0, 1.0, z)
    exact = np.where(np.abs(z) < 1e-3, 0.5 + z / 3, (zz * np.exp(zz) - np.expm1(zz)) / zz ** 2)
    np.testing.assert_allclose(d, exact, rtol=2e-5)
    # d/da of the displacement at a = 0 (and next to it) is -h sum pi v (tau + h / 2): finite and right
    means, logits, _ = _policy(k=3)
    x = np.zeros((3, 5, 8), np.float32)
    s_src, s_a, s_b = np.full(3, 1.0), np.full(3, 0.9), np.full(3, 0.5)
    for a0 in (0.0, 1e-9, 1e-5):
        rates = jnp.full((3, 5, 3, 1, 4), a0, jnp.float32).at[..., 0, :, :].set(0.0)
        g = jax.grad(lambda a: jnp.sum(A.integrate(A.Policy(jnp.asarray(means), jnp.asarray(logits), a),
                                                   s_src, x, s_a, s_b)))(rates)
        g = np.asarray(g)
        assert np.isfinite(g).all()
        w = np.exp(logits) / np.exp(logits).sum(-3, keepdims=True)
        want = -0.4 * (0.1 + 0.2) * (w * means).sum(-2, keepdims=True)
        np.testing.assert_allclose(g[..., 1:, :, :], want[..., 1:, :, :], rtol=1e-3, atol=1e-6)


def test_component_dropout_keeps_one_component():
    means, logits, rates = _policy(shape=(64,), k=3)
    pol = A.dropout(A.Policy(jnp.asarray(means), jnp.asarray(logits), jnp.asarray(rates)), jax.random.key(0), 0.9)
    kept = np.asarray(pol.logits > -1e29)
    assert kept.any(axis=-3).all() and not kept.all()
    assert np.isfinite(np.asarray(A.velocity(pol, np.ones(64), np.full(64, 0.5)))).all()


def _tiny_qwen():
    return models.create(QWEN_IMAGE_TINY, seed=0, attention_impl="xla")


def test_heads_start_as_the_teachers_output_layer():
    """With the bias jitter off, every component is the teacher's velocity: the policy at its own sigma equals the
    teacher's output, whatever the rates (layout of the copied proj_out and of return_hidden)."""
    model = _tiny_qwen()
    trunk = H.trunk_for(model, (16, 16))
    assert (trunk.channels, trunk.pixels) == (4, 4)
    heads, gamma = H.init_heads(model, trunk, 5, jax.random.key(0), jitter=0.0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 16)).astype(np.float32)
    cond = {"ctx": jnp.asarray(rng.standard_normal((2, 3, 24)), jnp.float32), "mask": jnp.ones((2, 3))}
    sigma = jnp.array([1.0, 0.6])
    v_teacher = model.forward(x, cond["ctx"], cond["mask"], sigma, ((1, 4, 4),))
    pol = H.apply_heads(heads, gamma, trunk.hidden(model, x, sigma, cond), trunk)
    assert pol.means.shape == (2, 16, 5, 4, 4) and pol.log_rates.shape == (2, 16, 5, 1, 4)
    np.testing.assert_allclose(np.asarray(A.velocity(pol, sigma, sigma)), np.asarray(v_teacher), atol=1e-5)
    rates = np.exp(np.asarray(pol.log_rates[0, 0, :, 0, 0]))
    np.testing.assert_allclose(rates, [1.0, 0.2, 0.2 * 20 ** (1 / 3), 0.2 * 20 ** (2 / 3), 4.0], rtol=1e-5)
    jittered, _ = H.init_heads(model, trunk, 5, jax.random.key(0))
    b = jittered["means"]["bias"].reshape(5, 4, 4) - np.tile(heads["means"]["bias"], 1).reshape(5, 4, 4)
    assert np.allclose(b, b[..., :1]) and 0.01 < b.std() < 0.1  # one draw per (component, channel), std 0.05


def _tiny_z_image():
    return models.create(Z_IMAGE_TINY, seed=0, attention_impl="xla")


def _z_inputs(seed=0, b=2, cap=5):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((b, 4, 1, 8, 8)), jnp.float32)
    return x, {"ctx": jnp.asarray(rng.standard_normal((b, cap, 24)), jnp.float32)}


def test_z_image_return_hidden_is_what_final_linear_reads():
    from turbojax.models.z_image import unpatchify
    model = _tiny_z_image()
    x, cond = _z_inputs()
    xs, caps, t = [x[0, :, :], x[1]], [cond["ctx"][0], cond["ctx"][1, :3]], jnp.array([0.2, 0.7])  # ragged caps
    outs = model.forward(xs, t, caps)
    hidden = model.forward(xs, t, caps, return_hidden=True)
    assert hidden.shape == (2, 16, 64)
    for i in range(2):
        again = unpatchify(model.final_linear(hidden[i]), (1, 8, 8), 4, 2, 1)
        np.testing.assert_allclose(np.asarray(again), np.asarray(outs[i]), atol=1e-6)
    with pytest.raises(ValueError, match="one latent size"):
        model.forward([x[0], x[1, :, :, :4, :4]], t, caps, return_hidden=True)


def test_z_image_heads_start_as_the_teachers_velocity():
    """K = 1 from the teacher (no jitter): the policy's velocity is ZImageDenoiser's (the negated x0 - eps output,
    channel-last patches unpatchified); K = 5: every component is, whatever the rates."""
    from turbojax.distill.denoiser import denoiser_for
    model = _tiny_z_image()
    x, cond = _z_inputs(cap=5)
    trunk = H.trunk_for(model, (4, 1, 8, 8), 5)
    assert (trunk.channels, trunk.pixels, trunk.sign, trunk.order) == (4, 4, -1.0, "pc")
    sigma = jnp.array([1.0, 0.6])
    v_teacher = np.asarray(denoiser_for(model, (4, 1, 8, 8), 5)(model, x, sigma, cond))
    assert np.abs(v_teacher).max() > 0.5
    for k in (1, 5):
        heads, gamma = H.init_heads(model, trunk, k, jax.random.key(0), jitter=0.0)
        assert sorted(heads["full"]) == ["final_mod"]
        pol = H.policy_of(heads, gamma, model, trunk, x, sigma, cond)
        assert pol.means.shape == (2, 4, 1, 8, k, 8, 1) and pol.logits.shape == (2, 1, 1, 8, k, 8, 1)
        np.testing.assert_allclose(np.asarray(A.velocity(pol, sigma, sigma)), v_teacher, atol=1e-5)
        if k == 1:  # and its analytic step is the teacher's Euler step
            np.testing.assert_allclose(np.asarray(A.integrate(pol, sigma, x, sigma, sigma - 0.25)),
                                       np.asarray(x) - 0.25 * v_teacher, atol=1e-5)
    jittered, _ = H.init_heads(model, trunk, 5, jax.random.key(0))
    b = (jittered["means"]["bias"] - heads["means"]["bias"]).reshape(5, 4, 4)  # (component, pixel, channel)
    assert np.allclose(b, b[:, :1, :]) and 0.01 < b.std() < 0.1  # one draw per (component, channel)


def test_z_image_policy_layout_keeps_each_pixels_mixture():
    """Random heads: the policy arranged into Z-Image's latent layout has, at every pixel, the velocity of the
    token-layout policy at that token and pixel (means, logits and log-rates all move together)."""
    model = _tiny_z_image()
    x, cond = _z_inputs(seed=1)
    trunk = H.trunk_for(model, (4, 1, 8, 8), 5)
    heads, gamma = H.init_heads(model, trunk, 3, jax.random.key(0))
    rng = np.random.default_rng(2)
    heads["logits"]["kernel"] = rng.standard_normal(heads["logits"]["kernel"].shape).astype(np.float32)
    gamma["kernel"] = rng.standard_normal(gamma["kernel"].shape).astype(np.float32) * 0.3
    sigma, later = jnp.array([1.0, 0.8]), jnp.array([0.4, 0.5])
    hidden = trunk.hidden(model, x, sigma, cond)
    tok = H.apply_heads(heads, gamma, hidden, trunk)  # [B, N, K, C, P]; velocity index c * P + p
    v_tok = np.asarray(A.velocity(tok, sigma, later)).reshape(2, 4, 4, 4, 2, 2)  # b, hp, wp, c, ph, pw
    want = v_tok.transpose(0, 3, 1, 4, 2, 5).reshape(2, 4, 1, 8, 8)
    got = np.asarray(A.velocity(trunk.arrange(tok, x.shape), sigma, later))
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.abs(got - np.asarray(A.velocity(trunk.arrange(tok, x.shape), sigma, sigma))).max() > 1e-3


def _tiny_cfg(k=4):
    cfg = H.arcflow_config()
    cfg.lora.student.rank, cfg.lora.student.alpha = 2, 2.0
    cfg.student.sigmas, cfg.student.shift = (1.0, 0.75), 3.0
    cfg.arcflow.num_components, cfg.arcflow.num_states, cfg.arcflow.decay_iters = k, 2, 2
    cfg.opt.warmup_steps = 0
    cfg.opt.student.lr = cfg.opt.heads.lr = cfg.opt.gamma.lr = 3e-2  # the LoRA must leave zero in 2 iterations
    cfg.ema_decay = 0.5
    return cfg


def test_export_reload_samples_the_same(tmp_path):
    model = _tiny_qwen()
    cfg = _tiny_cfg()
    m = methods.build(cfg, model, (16, 16), jax.random.key(0))
    assert m.name == "arcflow" and sorted(m.params) == ["gamma", "heads", "student"]
    assert all("attn" not in p for p in m.params["student"])  # attention frozen
    eng = Engine(m.turns, m.txs, cfg.ema_decay)
    state = eng.init_state(m.params)
    _, frozen = nnx.split(model)
    rng = np.random.default_rng(0)
    batch = {"ctx": jnp.asarray(rng.standard_normal((2, 3, 24)), jnp.float32), "mask": jnp.ones((2, 3)),
             "neg_ctx": jnp.zeros((2, 3, 24)), "neg_mask": jnp.ones((2, 3)), "iteration": jnp.asarray(0)}
    noise = np.asarray(jax.random.normal(jax.random.key(3), (2, 16, 16)))
    cond = {k: batch[k] for k in ("ctx", "mask")}
    before = np.asarray(H.student_of(m, model, state).sample(noise, cond))  # (the steps donate the state)
    for it in range(2):
        state, metrics = eng.iteration(state, frozen, lambda turn: {**batch, "iteration": jnp.asarray(it)}, it)
        assert all(np.isfinite(float(v)) for v in metrics.values())
        assert float(metrics["policy/teacher_ratio"]) == 1.0 - it / 2  # decays over decay_iters = 2
    files = m.write_outputs(tmp_path, state, model, cfg, 2)
    assert sorted(f.name for f in files) == ["arcflow.json", "heads.safetensors", "lora.safetensors"]
    settings = json.loads((tmp_path / "arcflow.json").read_text())
    assert settings["num_components"] == 4 and settings["sigmas"] == [1.0, 0.75, 0.0] and settings["shift"] == 3.0
    from safetensors.numpy import load_file
    t = load_file(str(tmp_path / "heads.safetensors"))
    assert t["proj_out_means.weight"].shape == (4 * 16, 32) and t["proj_out_loggamma.weight"].shape == (3 * 4, 32)
    assert t["norm_out.linear.weight"].shape == (64, 32)

    loaded = H.load_student(tmp_path, model)
    trained = H.student_of(m, model, state)
    for sig in (None, [1.0, 0.9, 0.75, 0.5, 0.0]):  # 2 NFE (its list) and 4 NFE
        a, b = np.asarray(trained.sample(noise, cond, sig)), np.asarray(loaded.sample(noise, cond, sig))
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert np.abs(before - np.asarray(trained.sample(noise, cond))).max() > 1e-3  # training changed the samples

    (tmp_path / "heads.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(H.ArcFlowFormatError, match="heads.safetensors"):
        H.load_student(tmp_path, model)


@pytest.mark.slow
def test_z_image_arcflow_lowers_its_loss_and_exports(tmp_path):
    """A short run of the Z-Image recipe (its LoRA targets, shift 3, CFG 4 against an empty negative caption) on the
    tiny Z-Image: the imitation loss falls, the export names the Z-Image final layer, and the reloaded folder
    samples what the trained student samples (2 and 4 NFE)."""
    sys.path.insert(0, str(REPO))
    from configs.z_image_arcflow import TARGETS, get_config
    model = _tiny_z_image()
    cfg = get_config()
    assert cfg.student.sigmas == (1.0, 0.75) and cfg.lora.student.targets == TARGETS
    cfg.lora.student.rank, cfg.lora.student.alpha = 2, 2.0
    cfg.arcflow.num_components, cfg.arcflow.num_states, cfg.arcflow.decay_iters = 3, 2, 0
    cfg.opt.warmup_steps = 0
    cfg.opt.student.lr = cfg.opt.heads.lr = cfg.opt.gamma.lr = 3e-3
    cfg.ema_decay = 0.0
    m = methods.build(cfg, model, (4, 1, 8, 8), jax.random.key(0), cap_len=5)
    assert m.trunk.family == "z_image" and m.trunk.cap_len == 5
    assert all("attention" not in p for p in m.params["student"])  # attention frozen
    eng = Engine(m.turns, m.txs, cfg.ema_decay)
    _, frozen = nnx.split(model)
    x, cond = _z_inputs(cap=5)
    batch = {**cond, "neg_ctx": jnp.zeros_like(cond["ctx"]), "iteration": jnp.asarray(0)}
    loss_fn = jax.jit(m.turns[0].loss)

    def held_out(params):  # the loss on fixed noise and trajectories (the training batches draw new ones)
        return np.mean([float(loss_fn(params, {}, frozen, batch, jax.random.key(100 + i))[0]) for i in range(4)])

    before = held_out(jax.tree.map(np.array, m.params))
    state = eng.init_state(m.params)
    for it in range(12):
        state, metrics = eng.iteration(state, frozen, lambda turn: batch, it)
        assert np.isfinite(float(metrics["policy/loss"]))
    after = held_out(jax.tree.map(np.array, state["params"]))  # (the next steps donate the state)
    assert after < 0.85 * before, (before, after)

    files = m.write_outputs(tmp_path, state, model, cfg, 12)
    assert sorted(f.name for f in files) == ["arcflow.json", "heads.safetensors", "lora.safetensors"]
    settings = json.loads((tmp_path / "arcflow.json").read_text())
    assert settings["family"] == "z_image" and settings["shift"] == 3.0 and settings["sigmas"] == [1.0, 0.75, 0.0]
    assert settings["alt_sigmas"] == {"4": H.equal_raw_sigmas(4, 3.0)}
    assert settings["fully_trained"] == ["all_final_layer.2-1.adaLN_modulation.1"]
    loaded = H.load_student(tmp_path, model)
    trained = H.student_of(m, model, state)
    noise = np.asarray(jax.random.normal(jax.random.key(3), (2, 4, 1, 8, 8)))
    caps = {"caps": [cond["ctx"][0], cond["ctx"][1]]}  # the pipeline's per-sample captions
    for sig in (None, settings["alt_sigmas"]["4"]):
        a, b = np.asarray(trained.sample(noise, cond, sig)), np.asarray(loaded.sample(noise, caps, sig))
        np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(H.ArcFlowFormatError, match="heads for a z_image model"):
        H.load_student(tmp_path, _tiny_qwen())


@pytest.mark.slow
def test_arcflow_student_beats_the_naive_two_step_sampler():
    from test_distill_toy import GUIDANCE, LABELS, STUDENT, distance, toy_batch
    teacher = toy.train_teacher(seed=0, steps=2000)
    key = jax.random.key(1)
    naive_d = distance(toy.sample(teacher, LABELS, key, STUDENT, GUIDANCE))
    cfg = H.arcflow_config()
    cfg.lora.student.targets = [r"blocks\.\d+", "inp"]  # the heads replace `out`
    cfg.lora.student.rank, cfg.lora.student.alpha = 8, 8.0
    cfg.student.sigmas, cfg.student.shift = tuple(STUDENT[:-1]), 3.0
    cfg.arcflow.guidance, cfg.arcflow.cfg_rescale = GUIDANCE, False  # toy.sample's CFG
    cfg.arcflow.num_components, cfg.arcflow.decay_iters = 8, 100
    cfg.opt.warmup_steps = 0
    cfg.opt.student.lr = cfg.opt.heads.lr = 1e-3
    cfg.opt.gamma.lr = 1e-4
    cfg.opt.grad_clip = 10.0
    cfg.ema_decay = 0.95
    m = methods.build(cfg, teacher, (2,), jax.random.key(1))
    eng = Engine(m.turns, m.txs, cfg.ema_decay)
    state = eng.init_state(m.params)
    _, frozen = nnx.split(teacher)
    x = jax.random.normal(key, LABELS.shape + (2,))  # the noise toy.sample draws from `key`
    cond = {"ctx": toy.condition(LABELS)}
    init_d = distance(H.student_of(m, teacher, state).sample(x, cond))
    for it in range(300):
        state, _ = eng.iteration(state, frozen, lambda turn: {**toy_batch(turn, it), "iteration": jnp.asarray(it)},
                                 it)
    student = H.student_of(m, teacher, state)
    student_d = distance(student.sample(x, cond))
    assert init_d > 0.5 * naive_d  # at init the policy is the teacher's velocity: about the naive sampler
    assert student_d < 0.25 * naive_d, (student_d, naive_d)
    assert distance(student.sample(x, cond, [1.0, 0.9, 0.75, 0.5, 0.0])) < 0.5 * naive_d  # 4 NFE works too


def _env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["TURBOJAX_PROGRESS"] = "0"
    return env


def _train(teacher, workdir, total, cwd):
    args = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "digits_arcflow.py"),
            "--workdir", str(workdir), "--config.init_from", str(teacher), "--config.total_steps", str(total),
            "--config.checkpoint_every", "2", "--config.log_every", "1", "--config.sample_every", "0",
            "--config.batch_size", "8", "--config.arcflow.num_components", "4", "--config.arcflow.num_states", "2",
            # fully on-policy from step 0: the teacher share changes the loss's scale while it decays
            "--config.arcflow.decay_iters", "0", "--config.lora.student.rank", "4", "--config.opt.warmup_steps", "0",
            "--config.opt.heads.lr", "1e-2", "--config.opt.student.lr", "1e-2",
            # the run is cut short by a smaller total_steps, which moves a decaying schedule (the config's wsd)
            "--config.opt.schedule", "constant"]
    r = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=_env(), timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_train_py_arcflow_lowers_its_loss_and_resumes_exactly(tmp_path):
    from turbojax.digits import model as digits_model
    teacher = tmp_path / "teacher"
    digits_model.save_export(digits_model.new_teacher(3), teacher.absolute())
    total = 8
    _train(teacher, tmp_path / "a", total, tmp_path)
    a = tmp_path / "a"
    assert {"arcflow.json", "heads.safetensors", "lora.safetensors", "samples.png"} <= {f.name for f in a.iterdir()}
    sample, _ = H.digits_sampler(digits_model.load_teacher(teacher), a)  # the exported folder on the digits teacher
    images = sample(np.arange(12) % 10, 0)
    assert images.dtype == np.uint8 and images.shape == (12, 32, 32, 1)
    losses = [json.loads(line)["policy/loss"] for line in (a / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == total and np.mean(losses[-4:]) < 0.8 * losses[0], losses

    b = tmp_path / "b"
    _train(teacher, b, 3, tmp_path)  # stops at step 3 (checkpoint), then the same command to 8 resumes
    r = _train(teacher, b, total, tmp_path)
    assert "resumed from step 3" in r.stdout
    from safetensors.numpy import load_file
    for name in ("heads.safetensors", "lora.safetensors"):
        ta, tb = load_file(a / name), load_file(b / name)
        assert ta.keys() == tb.keys() and len(ta) > 0
        for k in ta:
            np.testing.assert_array_equal(ta[k], tb[k], err_msg=f"{name}: {k}")
