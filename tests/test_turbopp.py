"""Turbo++ (per-step LoRAs trained end to end): the final-image loss reaches the step-1 adapter through step 2, the
step-1 target is the teacher's trajectory state, the known-answer 2-D mixture, and `train.py` on the digits demo
(loss down, export -> reload -> same images, exact resume)."""
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from turbojax import lora
from turbojax.distill import methods, toy, turbopp
from turbojax.distill.engine import Engine

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_distill_toy as T  # noqa: E402
from test_pcm import digits_cfg, digits_teacher, mean_metric, train  # noqa: E402


def _toy_cfg(**kw):
    cfg = turbopp.turbopp_config()
    cfg.lora = T.toy_config().lora
    cfg.gan.hidden, cfg.gan.depths, cfg.gan.weight = 32, (0.67, 1.0), 0.1
    cfg.dmd.real_cfg, cfg.dmd.cfg_rescale, cfg.dmd.weight = T.GUIDANCE, False, 0.0
    cfg.turbopp.teacher_cfg = T.GUIDANCE
    cfg.ttur_ratio, cfg.ema_decay = 3, 0.95
    cfg.opt.weight_decay = 0.0
    for g in ("student", "fake", "disc"):
        cfg.opt[g].lr = 1e-3
    for k, v in kw.items():
        sec, field = k.split("__")
        cfg[sec][field] = v
    return cfg


def toy_steps(teacher, adapters, key, sigmas=T.STUDENT):
    """The per-step sampler on the toy: step i merges adapter i and takes one Euler step."""
    x = jax.random.normal(key, T.LABELS.shape + (2,))
    cond = toy.condition(T.LABELS)
    for i, a in enumerate(adapters):
        m = lora.apply(teacher, [(a, 1.0)])
        x = x + (sigmas[i + 1] - sigmas[i]) * m.forward(x, cond, None, jnp.full(T.LABELS.shape, sigmas[i]))
    return x


def _random_students(m):
    params = jax.tree.map(lambda x: x, m.params)
    for g in ("student_1", "student_2"):
        for i, (k, e) in enumerate(sorted(params[g].items())):
            e["b"] = 0.2 * jax.random.normal(jax.random.key(100 * int(g[-1]) + i), e["b"].shape)
    return params


@pytest.mark.parametrize("end_to_end", [True, False])
def test_final_image_loss_reaches_the_step1_adapter_through_step2(end_to_end):
    model = toy.ToyFlow(rngs=nnx.Rngs(0))
    # only final-image terms: no step-1 loss, so step 1 learns only through step 2
    cfg = _toy_cfg(turbopp__boundary_weight=0.0, turbopp__final_weight=1.0, turbopp__end_to_end=end_to_end,
                   dmd__weight=1.0)
    m = methods.build(cfg, model, (2,), jax.random.key(1))
    params = _random_students(m)
    gen = m.turns[0]
    assert gen.groups == ("student_1", "student_2") and set(m.nets.roles) == {"student_1", "student_2", "fake"}
    _, frozen = nnx.split(model)
    trainable = {g: params[g] for g in gen.groups}
    others = {g: v for g, v in params.items() if g not in gen.groups}
    grads = jax.grad(lambda t: gen.loss(t, others, frozen, T.toy_batch("generator", 0, 32), jax.random.key(2))[0])(
        trainable)
    assert float(optax.global_norm(grads["student_2"])) > 0
    g1 = float(optax.global_norm(grads["student_1"]))
    assert (g1 > 1e-4 * float(optax.global_norm(grads["student_2"]))) if end_to_end else g1 == 0.0


def test_rollout_uses_one_adapter_per_step_and_step1_target_is_the_teacher_state():
    model = toy.ToyFlow(rngs=nnx.Rngs(0))
    cfg = _toy_cfg(turbopp__teacher_steps=6)
    m = methods.build(cfg, model, (2,), jax.random.key(1))
    params = _random_students(m)
    _, frozen = nnx.split(model)
    key = jax.random.key(4)
    labels = T.LABELS[:16]
    batch = {"ctx": toy.condition(labels), "neg_ctx": toy.condition(jnp.full((16,), toy.NULL))}
    x_T = jax.random.normal(key, (16, 2))
    x0, states = turbopp.rollout(m.nets, frozen, params, x_T, {"ctx": batch["ctx"], "mask": None}, m.settings)
    adapters = [methods.export_adapter(m, {"params": params}, use_ema=False)]  # student_1 (the export group)
    adapters.append(turbopp.step_adapters(m, {"params": params}, use_ema=False)[1])
    s1, s2 = (lora.apply(model, [(a, 1.0)]) for a in adapters)
    x1 = x_T + (0.75 - 1.0) * s1.forward(x_T, batch["ctx"], None, jnp.full((16,), 1.0))
    want = x1 - 0.75 * s2.forward(x1, batch["ctx"], None, jnp.full((16,), 0.75))
    np.testing.assert_allclose(states[0], x1, atol=1e-5)
    np.testing.assert_allclose(x0, want, atol=1e-5)
    # the step-1 target: the teacher's CFG Euler trajectory on the 6-step shift-3 grid (+ 0.75), stopped at 0.75
    (target,) = turbopp.teacher_states(m.nets, frozen, x_T, batch, m.settings)
    grid = [1.0] + [float(s) for s in toy.teacher_sigmas(6) if 0.75 < s < 1.0] + [0.75]
    x = x_T
    for a, b in zip(grid, grid[1:]):
        s = jnp.full((16,), a)
        v_c = model.forward(x, batch["ctx"], None, s)
        v_u = model.forward(x, batch["neg_ctx"], None, s)
        x = x + (b - a) * (v_u + T.GUIDANCE * (v_c - v_u))
    np.testing.assert_allclose(target, x, atol=1e-5)


def test_build_rejects_a_run_without_final_loss_and_single_step():
    model = toy.ToyFlow(rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="final-image loss"):
        methods.build(_toy_cfg(gan__weight=0.0), model, (2,), jax.random.key(1))
    cfg = _toy_cfg()
    cfg.student.sigmas = (1.0,)
    with pytest.raises(ValueError, match="at least 2 steps"):
        methods.build(cfg, model, (2,), jax.random.key(1))


@pytest.mark.slow
def test_turbopp_student_beats_the_naive_two_step_sampler():
    teacher = toy.train_teacher(seed=0, steps=2000)
    key = jax.random.key(1)
    naive_d = T.distance(toy.sample(teacher, T.LABELS, key, T.STUDENT, T.GUIDANCE))
    m = methods.build(_toy_cfg(), teacher, (2,), jax.random.key(1))  # the paper's default: GAN + step-1 loss
    eng = Engine(m.turns, m.txs, 0.95)
    state = eng.init_state(m.params)
    _, frozen = nnx.split(teacher)
    for it in range(450):
        state, _ = eng.iteration(state, frozen, lambda turn: T.toy_batch(turn, it), it)
    student_d = T.distance(toy_steps(teacher, turbopp.step_adapters(m, state), key))
    assert student_d < 0.25 * naive_d, (student_d, naive_d)


@pytest.mark.slow
def test_train_py_turbopp_lowers_its_loss_exports_and_resumes_exactly(tmp_path):
    from PIL import Image
    from safetensors import safe_open
    from safetensors.numpy import load_file

    from turbojax.digits import model as digits_model
    from turbojax.digits import training as digits_training
    teacher = digits_teacher(tmp_path)
    extra = ["--config.turbopp.teacher_steps", "4", "--config.ttur_ratio", "1", "--config.opt.student.lr", "3e-3",
             "--config.data.teacher_samples_per_class", "2"]
    wa, wb = tmp_path / "a", tmp_path / "b"
    train("configs/digits_turbopp.py", teacher, wa, 6, *extra)
    train("configs/digits_turbopp.py", teacher, wb, 3, *extra)
    r = train("configs/digits_turbopp.py", teacher, wb, 6, *extra)
    assert "resumed from step 3" in r.stdout
    settings = json.loads((wa / "sampler.json").read_text())
    assert settings["method"] == "turbopp" and settings["sigmas"] == [1.0, 0.75, 0.0]
    assert [(e["step"], e["sigma"]) for e in settings["step_adapters"]] == [(1, 1.0), (2, 0.75)]
    names = [e[layout] for e in settings["step_adapters"] for layout in ("diffusers", "comfy")]
    for name in names:
        ta, tb = load_file(wa / name), load_file(wb / name)
        assert ta.keys() == tb.keys() and len(ta) > 0
        for k in ta:
            np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)
        with safe_open(str(wa / name), framework="numpy") as fh:
            assert fh.metadata()["turbojax_step"] == name[len("lora_step")]
    s1, s2 = (load_file(wa / e["diffusers"]) for e in settings["step_adapters"])
    assert any(not np.array_equal(s1[k], s2[k]) for k in s1)  # two different adapters

    # export -> reload (both layouts) -> the same images as the grid train.py drew from its in-memory students
    base = digits_model.load_teacher(str(teacher))
    grid = np.asarray(Image.open(wa / "samples.png"))
    for layout in ("diffusers", "comfy"):
        adapters, st = turbopp.load_steps(wa, base, layout)
        tokens = turbopp.digits_tokens(base, adapters, np.tile(np.arange(10), 4), 0, st["sigmas"][:-1],
                                       st["guidance"])
        from turbojax.digits import data
        np.testing.assert_array_equal(digits_training.tile(data.tokens_to_images(tokens), 10)[..., 0], grid)

    # the step-1 loss on fixed batches and noise: lower with the trained step-1 adapter than at the start
    cfg = digits_cfg("configs/digits_turbopp.py", teacher, *extra)
    before = mean_metric(cfg, base, "", "boundary")
    after = mean_metric(cfg, base, str(wa / "lora_step1.safetensors"), "boundary")
    assert after < before, (before, after)


# --------------------------------------------------------------------------------------------------------------
# sample.py --lora-step (the per-step sampler for pipelines)
# --------------------------------------------------------------------------------------------------------------

def test_lora_step_flag_errors(tmp_path):
    from test_sample_cli import base, run_error, stub_pipeline
    stub = stub_pipeline(tmp_path)
    (tmp_path / "a.safetensors").write_bytes(b"")
    a = tmp_path / "a.safetensors"
    for extra, fragment in [
            (["--lora-step", f"1:{a}"], "no LoRA for step(s) [2]"),
            (["--lora-step", f"3:{a}", "--lora-step", f"1:{a}"], "STEP in 1..2"),
            (["--lora-step", str(a)], "STEP:FILE"),
            (["--lora-step", f"1:{a}", "--lora-step", f"1:{a}"], "step 1 has a LoRA already"),
            (["--lora-step", f"1:{tmp_path / 'missing.safetensors'}", "--lora-step", f"2:{a}"], "not found"),
            (["--lora-step", f"1:{a}", "--lora-step", f"2:{a}"], "not a readable safetensors file")]:
        msg = run_error(*base(stub, tmp_path, "--sigmas", "1,0.75", *extra))
        assert msg.startswith("error: --lora-step") and fragment in msg, (extra, msg)
    msg = run_error("--lora-step", f"1:{a}")
    assert "--lora-step needs --model" in msg


@pytest.mark.slow
def test_lora_step_samples_each_step_with_its_adapter(tmp_path):
    from test_sample_cli import generate
    from test_pipeline_e2e import qwen_pipeline_torch

    from turbojax import pipelines
    folder = tmp_path / "Qwen-Image-tiny"
    qwen_pipeline_torch().save_pretrained(folder)
    transformer = pipelines.from_diffusers(folder, progress=False).transformer
    files = []
    for i in range(2):
        ad = lora.init_adapter(transformer, [r"transformer_blocks(\.\d+)?\.attn\.to_q", "proj_out"], 2, 2.0,
                               rng=jax.random.key(i))
        ad = {p: {**e, "b": 0.5 * np.asarray(jax.random.normal(jax.random.key(10 + i), np.shape(e["b"])))}
              for p, e in ad.items()}
        files.append(tmp_path / f"l{i}.safetensors")
        lora.save(files[-1], ad, transformer, layout="diffusers")
    a, b = files

    def images(name, *extra):
        assert generate(folder, tmp_path / f"{name}.npz", "--sigmas", "1,0.75", *extra) == 0
        return np.load(tmp_path / f"{name}.npz")["images"]
    same = images("aa", "--lora-step", f"1:{a}", "--lora-step", f"2:{a}")
    np.testing.assert_array_equal(same, images("a", "--lora", a))  # one LoRA on every step = merging it
    mixed = images("ab", "--lora-step", f"2:{b}", "--lora-step", f"1:{a}")
    assert not np.array_equal(mixed, same) and not np.array_equal(mixed, images("b", "--lora", b))
