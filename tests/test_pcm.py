"""PCM (2-phase consistency in flow-matching form): the phase edges and the consistency pair against their
definition, the known-answer 2-D mixture, and `train.py` on the digits demo (loss down, export -> reload -> same
images, exact resume)."""
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from turbojax import lora
from turbojax.distill import losses as L
from turbojax.distill import methods, pcm, toy
from turbojax.distill.engine import Engine

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_distill_toy as T  # noqa: E402


def test_grid_holds_the_edges_and_edges_bound_each_phase():
    grid = pcm.sigma_grid((1.0, 0.75), 10, 3.0)
    assert grid[0] == 0.0 and grid[-1] == 1.0 and 0.75 in grid and np.all(np.diff(grid) > 0)
    ref = np.unique(np.round(np.concatenate([L.shift_sigma(np.linspace(0, 1, 11), 3.0), [0.75]]), 7))
    np.testing.assert_allclose(grid, ref, atol=1e-7)
    sig = jnp.asarray([1.0, 0.9, 0.7501, 0.75, 0.3, 0.01])
    np.testing.assert_array_equal(pcm.lower_edge(sig, (1.0, 0.75)), [0.75, 0.75, 0.75, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(pcm.upper_edge(sig, (1.0, 0.75)), [1.0, 1.0, 1.0, 0.75, 0.75, 0.75])
    # 3 phases
    np.testing.assert_allclose(pcm.lower_edge(jnp.asarray([0.95, 0.6, 0.2]), (1.0, 0.9, 0.5)), [0.9, 0.5, 0.0])


def test_renoise_keeps_the_rectified_flow_marginal():
    x0 = jax.random.normal(jax.random.key(0), (20000, 2)) * 0.1 + 2.0
    e1, e2 = jax.random.normal(jax.random.key(1), x0.shape), jax.random.normal(jax.random.key(2), x0.shape)
    s_e, s_adv = jnp.full((20000,), 0.3), jnp.full((20000,), 0.8)
    y = pcm.renoise(L.add_noise(x0, e1, s_e), s_e, s_adv, e2)
    direct = L.add_noise(x0, e2, s_adv)
    np.testing.assert_allclose(jnp.mean(y, 0), jnp.mean(direct, 0), atol=0.02)
    np.testing.assert_allclose(jnp.std(y, 0), jnp.std(direct, 0), rtol=0.03)


def _toy_method(gan=0.0, grid_steps=8):
    model = toy.ToyFlow(rngs=nnx.Rngs(0))
    cfg = _toy_cfg(gan)
    cfg.pcm.grid_steps = grid_steps
    m = methods.build(cfg, model, (2,), jax.random.key(1))
    # a student different from the teacher: random LoRA `b`
    student = jax.tree.map(lambda x: x, m.params["student"])
    for i, (k, e) in enumerate(sorted(student.items())):
        e["b"] = 0.3 * jax.random.normal(jax.random.key(10 + i), e["b"].shape)
    return model, m, student


def _toy_cfg(gan=0.0):
    cfg = pcm.pcm_config()
    cfg.lora = T.toy_config().lora
    cfg.gan.hidden, cfg.gan.depths, cfg.gan.weight = 32, (0.67, 1.0), gan
    cfg.pcm.teacher_cfg, cfg.pcm.cfg_rescale = T.GUIDANCE, False
    cfg.opt.weight_decay, cfg.ema_decay = 0.0, 0.95
    for g in ("student", "disc"):
        cfg.opt[g].lr = 1e-3
    return cfg


def test_consistency_pair_matches_its_definition():
    model, m, student = _toy_method()
    batch = T.toy_batch("generator", 0, batch=64)
    _, frozen = nnx.split(model)
    key = jax.random.key(3)
    k_pair = jax.random.split(key)[0]  # what the loss hands the pair
    pred, target, aux = jax.jit(lambda f, k: pcm.consistency_pair(m.nets, frozen, f, batch, k, m.settings))(
        student, k_pair)
    s_n, s_e, x_n = (np.asarray(aux[k], np.float64) for k in ("sigma", "sigma_edge", "x_n"))
    grid = np.asarray(pcm.sigma_grid((1.0, 0.75), 8, 3.0), np.float64)
    # the definition, by hand: previous grid point, teacher CFG Euler step, student jumps to the phase's lower edge
    s_prev = np.array([grid[np.flatnonzero(np.isclose(grid, s))[0] - 1] for s in s_n])
    np.testing.assert_array_equal(s_e, np.where(s_n > 0.75, 0.75, 0.0))
    assert (s_n > 0.75).any() and (s_n <= 0.75).any() and np.isclose(s_prev, 0.75).any()
    lab = np.argmax(np.asarray(batch["ctx"][:, 0]), -1)
    studentm = lora.apply(model, [(methods.export_adapter(m, {"params": {"student": student}}, use_ema=False), 1.0)])

    def v(mdl, x, s, labels):
        return np.asarray(mdl.forward(jnp.asarray(x, jnp.float32), toy.condition(labels), None,
                                      jnp.asarray(s, jnp.float32)), np.float64)
    v_t = v(model, x_n, s_n, np.full(64, toy.NULL)) + T.GUIDANCE * (v(model, x_n, s_n, lab)
                                                                   - v(model, x_n, s_n, np.full(64, toy.NULL)))
    x_prev = x_n + (s_prev - s_n)[:, None] * v_t
    want_target = x_prev + (s_e - s_prev)[:, None] * v(studentm, x_prev, s_prev, lab)
    want_pred = x_n + (s_e - s_n)[:, None] * v(studentm, x_n, s_n, lab)
    np.testing.assert_allclose(pred, want_pred, atol=2e-5)
    np.testing.assert_allclose(target, want_target, atol=2e-5)
    on_edge = np.isclose(s_prev, s_e)
    np.testing.assert_allclose(np.asarray(target)[on_edge], x_prev[on_edge], atol=2e-5)  # boundary condition
    # the loss is the pseudo-Huber distance, and only the prediction carries gradient
    loss, metrics = m.turns[0].loss({"student": student}, {}, frozen, batch, key)
    np.testing.assert_allclose(metrics["cm"], L.pseudo_huber(pred, target, m.settings.huber_c), rtol=1e-5)


def test_adv_reals_data_judges_the_data_at_the_same_time():
    """`pcm.adv_reals`: "target" re-noises the consistency target (PCM); "data" noises the batch's data to the same
    `s_adv` with the same noise; the fakes are the same in both."""
    pred, target, x0 = (jax.random.normal(jax.random.key(i), (6, 2)) for i in range(3))
    aux = {"sigma": jnp.asarray([0.9, 0.8, 0.5, 0.3, 0.95, 0.1]),
           "sigma_edge": jnp.asarray([0.75, 0.75, 0.0, 0.0, 0.75, 0.0])}
    key = jax.random.key(5)
    s_t = pcm.PCMSettings(edges=(1.0, 0.75), adv_reals="target")
    s_d = pcm.PCMSettings(edges=(1.0, 0.75), adv_reals="data")
    f_t, r_t, s_adv = pcm._adv_inputs(pred, target, aux, key, s_t, x0)
    f_d, r_d, s_adv_d = pcm._adv_inputs(pred, target, aux, key, s_d, x0)
    np.testing.assert_array_equal(f_t, f_d)
    np.testing.assert_array_equal(s_adv, s_adv_d)
    assert np.all((s_adv >= aux["sigma_edge"]) & (s_adv <= pcm.upper_edge(aux["sigma"], (1.0, 0.75))))
    eps = jax.random.normal(jax.random.split(key)[1], pred.shape, jnp.float32)
    np.testing.assert_allclose(r_d, L.add_noise(x0, eps, s_adv), rtol=1e-6)
    np.testing.assert_allclose(r_t, pcm.renoise(target, aux["sigma_edge"], s_adv, eps), rtol=1e-6)
    # both turns run with data reals (the generator draws the same fakes)
    cfg = _toy_cfg(0.1)
    cfg.pcm.adv_reals = "data"
    model = toy.ToyFlow(rngs=nnx.Rngs(0))
    m = methods.build(cfg, model, (2,), jax.random.key(1))
    _, frozen = nnx.split(model)
    batch = {k: jnp.asarray(v) for k, v in T.toy_batch("critic", 3).items()}
    for turn in m.turns:
        trainable = {g: m.params[g] for g in turn.groups}
        others = {g: v for g, v in m.params.items() if g not in turn.groups}
        loss, _ = turn.loss(trainable, others, frozen, batch, key)
        assert np.isfinite(float(loss))
    cfg.pcm.adv_reals = "images"
    with pytest.raises(ValueError, match="pcm.adv_reals must be 'target' or 'data'"):
        methods.build(cfg, toy.ToyFlow(rngs=nnx.Rngs(0)), (2,), jax.random.key(1))


@pytest.mark.slow
@pytest.mark.parametrize("gan", [0.0, 0.1])
def test_pcm_student_beats_the_naive_two_step_sampler(gan):
    teacher = toy.train_teacher(seed=0, steps=2000)
    key = jax.random.key(1)
    naive_d = T.distance(toy.sample(teacher, T.LABELS, key, T.STUDENT, T.GUIDANCE))
    m = methods.build(_toy_cfg(gan), teacher, (2,), jax.random.key(1))
    eng = Engine(m.turns, m.txs, 0.95)
    state = eng.init_state(m.params)
    _, frozen = nnx.split(teacher)
    for it in range(500):
        state, _ = eng.iteration(state, frozen, lambda turn: T.toy_batch(turn, it), it)
    student = lora.apply(teacher, [(methods.export_adapter(m, state), 1.0)])
    student_d = T.distance(toy.sample(student, T.LABELS, key, T.STUDENT, 1.0))  # plain Euler = the phase sampler
    assert student_d < 0.25 * naive_d, (student_d, naive_d)


# --------------------------------------------------------------------------------------------------------------
# train.py on the digits demo with a tiny random teacher
# --------------------------------------------------------------------------------------------------------------

def digits_teacher(tmp_path) -> Path:
    from turbojax.digits import model as digits_model
    folder = Path(tmp_path).resolve() / "teacher"
    digits_model.save_export(digits_model.new_teacher(3), folder)
    return folder


def train(config, teacher, workdir, total, *extra):
    env = {k: v for k, v in __import__("os").environ.items() if k != "XLA_FLAGS"}
    env["TURBOJAX_PROGRESS"] = "0"
    args = [sys.executable, str(REPO / "train.py"), "--config", config, "--workdir", str(workdir),
            "--config.init_from", str(teacher), "--config.total_steps", str(total), "--config.checkpoint_every", "3",
            "--config.log_every", "1", "--config.sample_every", "0", "--config.batch_size", "4",
            "--config.opt.warmup_steps", "0", "--config.ema_decay", "0", "--config.gan.hidden", "8", *extra]
    r = subprocess.run(args, cwd=workdir.parent, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def digits_cfg(config_file: str, teacher, *overrides):
    """The config train.py builds from `config_file` with the test's overrides (in-process)."""
    from turbojax.training import config as config_lib
    cfg, _ = config_lib.parse_args(["--config", config_file, "--config.init_from", str(teacher),
                                    "--config.batch_size", "4", *overrides], default_config=config_file,
                                   flags={"workdir": None}, search_dirs=[REPO])
    return cfg


def mean_metric(cfg, base, init_lora: str, metric: str, n: int = 4) -> float:
    """`metric` of the generator turn on fixed batches and keys, the student started from `init_lora`."""
    from turbojax.digits import training as digits_training
    cfg = cfg.copy_and_resolve_references()
    cfg.init_student_lora = init_lora
    from turbojax.digits import data
    m = methods.build(cfg, base, (data.NUM_TOKENS, data.TOKEN_DIM), jax.random.key(cfg.seed + 1))
    batches = digits_training.batches(cfg, base, progress=lambda _: None)
    _, frozen = nnx.split(base)
    gen = m.turns[0]
    params = m.params
    vals = []
    for i in range(n):
        batch = {k: jnp.asarray(v) for k, v in batches.batch("generator", 1000 + i).items() if k != "prompt"}
        trainable = {g: params[g] for g in gen.groups}
        others = {g: v for g, v in params.items() if g not in gen.groups}
        vals.append(float(jax.jit(gen.loss)(trainable, others, frozen, batch, jax.random.key(77 + i))[1][metric]))
    return float(np.mean(vals))


@pytest.mark.slow
def test_train_py_pcm_lowers_its_loss_exports_and_resumes_exactly(tmp_path):
    from safetensors.numpy import load_file

    from turbojax.digits import model as digits_model
    from turbojax.digits import training as digits_training
    teacher = digits_teacher(tmp_path)
    extra = ["--config.gan.weight", "0", "--config.opt.student.lr", "3e-3"]  # reals are drawn without the GAN too
    wa, wb = tmp_path / "a", tmp_path / "b"
    train("configs/digits_pcm.py", teacher, wa, 6, *extra)
    train("configs/digits_pcm.py", teacher, wb, 3, *extra)
    r = train("configs/digits_pcm.py", teacher, wb, 6, *extra)
    assert "resumed from step 3" in r.stdout
    for name in ("lora.safetensors", "lora_comfy.safetensors"):
        ta, tb = load_file(wa / name), load_file(wb / name)
        assert ta.keys() == tb.keys() and len(ta) > 0
        for k in ta:
            np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)
    settings = json.loads((wa / "sampler.json").read_text())
    assert settings["method"] == "pcm" and settings["sigmas"] == [1.0, 0.75, 0.0]

    # export -> reload -> the same images as the grid train.py drew from its in-memory student
    base = digits_model.load_teacher(str(teacher))
    from PIL import Image
    grid = np.asarray(Image.open(wa / "samples.png"))
    for name in ("lora.safetensors", "lora_comfy.safetensors"):
        imgs = digits_model.generate(base, np.tile(np.arange(10), 4), seed=0, sigmas=settings["sigmas"],
                                     guidance=settings["guidance"], adapters=lora.load(wa / name, base))
        np.testing.assert_array_equal(digits_training.tile(imgs, 10)[..., 0], grid)

    cfg = digits_cfg("configs/digits_pcm.py", teacher, *extra)
    before = mean_metric(cfg, base, "", "cm")
    after = mean_metric(cfg, base, str(wa / "lora.safetensors"), "cm")
    assert after < before, (before, after)
