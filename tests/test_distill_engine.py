"""Distillation engine: pure losses against their definitions, the rollout against the sampler, and the DMD2 + GAN
turns on the tiny Qwen-Image (only trainables in the state, TTUR schedule, EMA, deterministic keys)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from turbojax import models
from turbojax.distill import engine as E
from turbojax.distill import losses as L
from turbojax.distill import methods
from turbojax.distill.config import dmd2_config
from turbojax.distill.denoiser import taps_at_depths
from turbojax.distill.rollout import sample, simulate


def test_dmd_loss_gradient_is_the_normalised_score_difference():
    rng = np.random.default_rng(0)
    x, xr, xf = (jnp.asarray(rng.standard_normal((3, 4, 5)), jnp.float32) for _ in range(3))
    grad = jax.grad(lambda x: L.dmd_loss(x, xr, xf)[0])(x)
    norm = np.mean(np.abs(np.asarray(x - xr)), axis=(1, 2), keepdims=True)
    expected = np.asarray(xf - xr) / norm / x.size
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-8)
    # a sample whose teacher estimate equals it exactly (zero normaliser) contributes nothing, no NaN
    xr0 = xr.at[0].set(x[0])
    loss, _ = L.dmd_loss(x, xr0, xf)
    g0 = jax.grad(lambda x: L.dmd_loss(x, xr0, xf)[0])(x)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(g0)))
    assert float(jnp.abs(g0[0]).max()) == 0.0


def test_true_cfg_and_shift():
    cond = jnp.array([[[3.0, 4.0]]])
    unc = jnp.array([[[1.0, 0.0]]])
    comb = L.true_cfg(cond, unc, 2.0, rescale=False)
    np.testing.assert_allclose(np.asarray(comb), [[[5.0, 8.0]]])
    resc = L.true_cfg(cond, unc, 2.0, rescale=True)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(resc)), 5.0, rtol=1e-6)
    # two equal raw steps under shift 3 put the boundary at sigma 0.75
    np.testing.assert_allclose(float(L.shift_sigma(0.5, 3.0)), 0.75)
    assert taps_at_depths((0.5, 0.75, 0.99), 60) == (29, 44, 58)


def test_gan_losses():
    lr, lf = jnp.array([10.0, 10.0]), jnp.array([-10.0, -10.0])
    assert float(L.gan_discriminator_loss(lr, lf)) < 1e-3   # a perfect discriminator
    assert float(L.gan_generator_loss(lf)) > 9.0             # the generator is far from fooling it
    assert float(L.r1_penalty([jnp.ones((2, 3))])) == 3.0


def test_simulate_matches_the_euler_sampler():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((4, 4)) * 0.3, jnp.float32)

    def velocity(x, s):
        return jnp.tanh(x @ w) * (1 + s[:, None])

    x_T = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4)), jnp.float32)
    sig = jnp.asarray([1.0, 0.75, 0.4, 0.0])
    x2, s2 = simulate(velocity, x_T, sig, jnp.int32(2), jax.random.key(0))
    x0, s0 = simulate(velocity, x_T, sig, jnp.int32(0), jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(x0), np.asarray(x_T))
    np.testing.assert_allclose(np.asarray(s2), [0.4, 0.4])
    ref = x_T
    for a, b in ((1.0, 0.75), (0.75, 0.4)):
        ref = ref + (b - a) * velocity(ref, jnp.full((2,), a))
    np.testing.assert_allclose(np.asarray(x2), np.asarray(ref), rtol=1e-6)
    full = sample(velocity, x_T, [1.0, 0.75, 0.4])
    final = ref - 0.4 * velocity(ref, jnp.full((2,), 0.4))
    np.testing.assert_allclose(np.asarray(full), np.asarray(final), rtol=1e-6)


def _tiny_method(gan=True, ratio=2, ema=0.5):
    cfg = dmd2_config()
    cfg.lora.student.rank = cfg.lora.fake.rank = 2
    cfg.lora.student.alpha = cfg.lora.fake.alpha = 4.0
    cfg.gan.hidden, cfg.ttur_ratio, cfg.ema_decay = 8, ratio, ema
    cfg.gan.weight = 0.1 if gan else 0.0
    cfg.gan.r1_weight = 0.1
    for g in ("student", "fake", "disc"):
        cfg.opt[g].lr = 1e-3
    base = models.create("qwen_image_tiny", seed=0)
    m = methods.build(cfg, base, (16, 16), jax.random.key(1))
    rng = np.random.default_rng(0)
    batch = {"ctx": jnp.asarray(rng.standard_normal((2, 5, 24)), jnp.float32), "mask": jnp.ones((2, 5)),
             "neg_ctx": jnp.zeros((2, 5, 24)), "neg_mask": jnp.ones((2, 5)),
             "real": jnp.asarray(rng.standard_normal((2, 16, 16)), jnp.float32)}
    return cfg, base, m, batch


@pytest.mark.slow
def test_dmd2_gan_turns_update_only_their_groups_and_are_deterministic():
    cfg, base, m, batch = _tiny_method()
    _, frozen = nnx.split(base)
    frozen_before = jax.tree.map(np.asarray, frozen)
    eng = E.Engine(m.turns, m.txs, cfg.ema_decay, seed=0)
    assert [(i, t.name) for i, t in eng.due(0)] == [(0, "generator"), (1, "critic")]
    assert [t.name for _, t in eng.due(1)] == ["critic"]
    state = eng.init_state(m.params)
    assert set(state["params"]) == {"student", "fake", "disc"} and set(state["ema"]) == {"student"}
    # the state holds only trainables: no base weight, no LoRA scale
    assert not any("scale" in jax.tree_util.keystr(p) and "lora" in jax.tree_util.keystr(p)
                   for p, _ in jax.tree_util.tree_flatten_with_path(state["params"]["student"])[0])
    init = jax.tree.map(np.asarray, state)
    s1, met = eng.iteration(state, frozen, lambda n: batch, 1)  # critic only
    assert set(k.split("/")[0] for k in met) == {"critic"}
    np.testing.assert_array_equal(jax.tree.leaves(s1["params"]["student"])[0], jax.tree.leaves(init["params"]["student"])[0])
    assert not np.array_equal(jax.tree.leaves(s1["params"]["fake"])[1], jax.tree.leaves(init["params"]["fake"])[1])
    s2, met = eng.iteration(s1, frozen, lambda n: batch, 2)  # generator + critic
    assert all(np.isfinite(float(v)) for v in met.values())
    b_new = jax.tree.leaves(s2["params"]["student"])[1]
    b_ema = jax.tree.leaves(s2["ema"]["student"])[1]
    np.testing.assert_allclose(b_ema, 0.5 * np.asarray(b_new), rtol=1e-5, atol=1e-9)  # EMA from b = 0
    # the frozen base never changes
    for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(a, np.asarray(b))
    # same seed, same iterations -> bit-identical trainables (keys depend only on seed, iteration, turn)
    eng2 = E.Engine(m.turns, m.txs, cfg.ema_decay, seed=0)
    t = eng2.init_state(jax.tree.map(jnp.asarray, init["params"]))
    for it in (1, 2):
        t, _ = eng2.iteration(t, frozen, lambda n: batch, it)
    for a, b in zip(jax.tree.leaves(t), jax.tree.leaves(s2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_init_student_lora_warm_starts_the_student(tmp_path):
    """`init_student_lora` (a PCM LoRA in the Wuli recipe) is the student's starting point; the fake score still
    starts from zero (= the teacher)."""
    from turbojax import lora
    cfg, base, _, _ = _tiny_method(gan=False)
    targets = [r"transformer_blocks\.attn\.to_q", "proj_out"]
    warm = lora.init_adapter(base, targets, rank=3, alpha=6.0, rng=jax.random.key(7))
    warm = {p: dict(e, b=jnp.full(e["b"].shape, 0.01, jnp.float32)) for p, e in warm.items()}
    lora.save(tmp_path / "pcm.safetensors", warm, base)
    cfg.init_student_lora = str(tmp_path / "pcm.safetensors")
    m = methods.build(cfg, base, (16, 16), jax.random.key(1))
    assert set(m.params["student"]) == set(warm)  # the file's modules, not the config's student targets
    assert m.nets.roles["student"].scales == {p: 2.0 for p in warm}
    for p in warm:
        np.testing.assert_allclose(np.asarray(m.params["student"][p]["a"]), np.asarray(warm[p]["a"]), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(m.params["student"][p]["b"]), 0.01, rtol=1e-6)
    assert all(float(jnp.abs(e["b"]).max()) == 0 for e in m.params["fake"].values())


def test_lr_schedules_count_each_groups_updates():
    """`opt.schedule`: constant after the warm-up (the default), or cosine / linear decay to 0 over the group's own
    updates (a generator turning every `ttur_ratio` steps decays over total_steps / ttur_ratio)."""
    cfg = dmd2_config()
    cfg.total_steps, cfg.ttur_ratio, cfg.opt.warmup_steps = 100, 4, 5
    cfg.opt.student.lr = 1e-3
    const = methods._group_opt(cfg, "student", 4)
    assert const.updates == 25 and const.schedule == "constant"
    lr = const.learning_rate()
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(1e-3) and float(lr(25)) == pytest.approx(1e-3)
    for kind, mid in (("cosine", 0.5e-3), ("linear", 0.5e-3)):
        cfg.opt.schedule = kind
        g = methods._group_opt(cfg, "student", 4)
        lr = g.learning_rate()
        assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(1e-3)
        assert float(lr(15)) == pytest.approx(mid, rel=1e-5)  # half way through the 20 decay updates
        assert float(lr(25)) == pytest.approx(0.0, abs=1e-12)
        assert float(methods._group_opt(cfg, "fake").learning_rate()(100)) == pytest.approx(0.0, abs=1e-12)
    # the optimiser follows it: an update at the end of a cosine run moves nothing
    tx = E.make_tx({"student": g}, clip=0.0)
    p = {"student": {"w": jnp.ones(3)}}
    st = tx.init(p)
    for _ in range(26):  # the 26th update runs at count 25, the end of the schedule
        up, st = tx.update({"student": {"w": jnp.ones(3)}}, st, p)
    np.testing.assert_allclose(up["student"]["w"], 0.0, atol=1e-12)
    # wsd: constant until the last opt.decay_steps run steps (here 40 steps = 10 generator updates), then linear to 0
    cfg.opt.schedule, cfg.opt.decay_steps = "wsd", 40
    g = methods._group_opt(cfg, "student", 4)
    assert g.decay_updates == 10
    lr = g.learning_rate()
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(1e-3) and float(lr(15)) == pytest.approx(1e-3)
    assert float(lr(20)) == pytest.approx(0.5e-3, rel=1e-5) and float(lr(25)) == pytest.approx(0.0, abs=1e-12)
    fake = methods._group_opt(cfg, "fake").learning_rate()  # every step: decays over steps 60..100
    assert float(fake(60)) == pytest.approx(1e-5) and float(fake(80)) == pytest.approx(0.5e-5, rel=1e-5)
    cfg.opt.decay_steps = 400  # longer than the run (a shortened demo run): decays over all 20 post-warm-up updates
    lr = methods._group_opt(cfg, "student", 4).learning_rate()
    assert float(lr(5)) == pytest.approx(1e-3) and float(lr(15)) == pytest.approx(0.5e-3, rel=1e-5)
    cfg.opt.decay_steps = 0
    with pytest.raises(ValueError, match="opt.schedule wsd needs opt.decay_steps > 0"):
        methods._group_opt(cfg, "student", 4).learning_rate()
    cfg.opt.schedule = "step"
    with pytest.raises(ValueError, match="opt.schedule must be one of"):
        methods._group_opt(cfg, "student").learning_rate()
