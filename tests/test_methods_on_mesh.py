"""ArcFlow's policy turn and Turbo++'s generator and critic turns on a mesh (8 simulated CPU devices) equal the same
turns on one device (DMD2 + GAN and PCM: tests/test_distill_sharding.py). Turn by turn from one common state, on the
tiny Qwen-Image: the sharded step must give the single-device step's metrics and new state up to fp32 summation
order; a mis-split batch, a missing reduction or a wrongly laid out trainable is off everywhere."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from turbojax import models
from turbojax.distill import engine as E
from turbojax.distill import methods, sharded
from turbojax.sharding import make_mesh

from test_distill_sharding import _assert_same, _host

B = 8  # global batch: data x fsdp divides it on both meshes below
LR = 1e-3  # _assert_same's unit: its per-entry slack is a fraction of one Adam step of this size


def _batch(rng, iteration: int):
    ctx = rng.standard_normal((B, 5, 24)).astype(np.float32)
    return {"ctx": ctx, "mask": np.ones((B, 5), np.float32), "neg_ctx": np.zeros_like(ctx),
            "neg_mask": np.ones((B, 5), np.float32), "real": rng.standard_normal((B, 16, 16)).astype(np.float32),
            "iteration": np.asarray(iteration, np.int32)}


def _arcflow_cfg():
    from turbojax.distill.arcflow_heads import arcflow_config
    cfg = arcflow_config()
    cfg.lora.student.rank, cfg.lora.student.alpha = 2, 2.0
    cfg.student.sigmas, cfg.student.shift = (1.0, 0.75), 3.0
    cfg.arcflow.num_components, cfg.arcflow.num_states, cfg.arcflow.decay_iters = 4, 2, 4
    cfg.arcflow.dropout = 0.0  # the dropout mask is drawn per sample; keep the test about sharding, not about keys
    cfg.opt.warmup_steps = 0
    cfg.opt.student.lr = cfg.opt.heads.lr = cfg.opt.gamma.lr = LR
    cfg.ema_decay = 0.5
    return cfg


def _turbopp_cfg():
    from turbojax.distill.turbopp import turbopp_config
    cfg = turbopp_config()
    cfg.lora.student.rank, cfg.lora.student.alpha = 2, 4.0
    cfg.lora.fake.rank, cfg.lora.fake.alpha = 2, 4.0
    cfg.turbopp.teacher_steps = 3
    cfg.dmd.weight, cfg.gan.weight, cfg.gan.hidden = 0.5, 0.1, 8  # every term on: DMD (fake score) + GAN + step-1
    cfg.student.sigmas = (1.0, 0.75)
    cfg.opt.warmup_steps, cfg.ema_decay = 0, 0.5
    for g in ("student", "fake", "disc"):
        cfg.opt[g].lr = LR
    return cfg


def _random_b(params, groups, seed=1):
    """LoRA `b` factors off zero (a warm-started student): at b = 0 student and teacher coincide and the losses'
    gradients are cancellations whose last bits Adam would amplify."""
    rng = np.random.default_rng(seed)
    for g in groups:
        for f in params[g].values():
            if isinstance(f, dict) and "b" in f:
                f["b"] = (0.05 * rng.standard_normal(f["b"].shape)).astype(np.float32)
    return params


@pytest.mark.parametrize("method, mesh_shape", [pytest.param("arcflow", (2, 2, 2), marks=pytest.mark.slow),
                                                pytest.param("turbopp", (1, 4, 2), marks=pytest.mark.slow)])
def test_turns_on_a_mesh_equal_one_device(method, mesh_shape):
    base = models.create("qwen_image_tiny", seed=0)
    cfg = _arcflow_cfg() if method == "arcflow" else _turbopp_cfg()
    m = methods.build(cfg, base, (16, 16), jax.random.key(1), cap_len=5)
    params0 = jax.tree.map(np.asarray, m.params)
    params0 = _random_b(params0, [g for g in params0 if g.startswith("student") or g == "fake"])
    _, frozen = nnx.split(base)
    expected = {"arcflow": ["policy"], "turbopp": ["generator", "critic"]}[method]
    assert [t.name for t in m.turns] == expected

    ref_eng = E.Engine(m.turns, m.txs, cfg.ema_decay, seed=0)
    mesh = make_mesh(*mesh_shape)
    plan = sharded.plan(mesh, m.turns, m.txs, params0, frozen)
    eng = E.Engine(m.turns, m.txs, cfg.ema_decay, seed=0, shardings=plan)
    placed = plan.put_frozen(frozen)
    # the trainables really are split over the mesh (not all replicated)
    state_sh = jax.tree.leaves(plan.state, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
    assert any(not s.is_fully_replicated for s in state_sh)
    common = _host(eng.init_state(params0))
    rng = np.random.default_rng(0)
    ran = set()
    for it in range(2):
        batch = _batch(rng, it)
        for i, turn in ref_eng.due(it):
            key = E.turn_key(0, it, i)
            ref, ref_m = ref_eng.steps[turn.name](jax.tree.map(jnp.asarray, common), frozen, batch, key)
            got, got_m = eng.steps[turn.name](jax.device_put(common, plan.state), placed, batch, key)
            assert ref_m.keys() == got_m.keys()
            for k in ref_m:
                assert np.isfinite(float(ref_m[k])), k
                np.testing.assert_allclose(float(got_m[k]), float(ref_m[k]), rtol=1e-4, atol=1e-6, err_msg=k)
            ref_h = _host(ref)
            _assert_same(ref_h, _host(got), rtol=1e-4)
            # the turn moved its trainables (a step that changes nothing would pass trivially)
            assert any(not np.array_equal(a, b) for a, b in zip(
                jax.tree.leaves({g: ref_h["params"][g] for g in turn.groups}),
                jax.tree.leaves({g: common["params"][g] for g in turn.groups})))
            common = ref_h
            ran.add(turn.name)
    assert ran == set(expected)
