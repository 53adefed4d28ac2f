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


@pytest.mark.slow
def test_train_py_full_blocks_only_resumes_exactly_and_samples_from_the_export(tmp_path):
    """train.py on the digits demo with per-step full copies of block 0 and no LoRA: exact resume, only
    `step{k}_blocks.safetensors` exported, and sample.py's loader draws the grid train.py drew in memory."""
    from PIL import Image
    from safetensors.numpy import load_file

    from turbojax.digits import cli as digits_cli
    from turbojax.digits import model as digits_model
    from turbojax.digits import training as digits_training
    teacher = digits_teacher(tmp_path)
    extra = ["--config.turbopp.teacher_steps", "4", "--config.ttur_ratio", "1", "--config.lora.student.targets", "",
             "--config.turbopp.full_blocks", r"transformer_blocks\.0\..*", "--config.opt.blocks.lr", "1e-3",
             "--config.data.teacher_samples_per_class", "2"]
    wa, wb = tmp_path / "a", tmp_path / "b"
    r = train("configs/digits_turbopp.py", teacher, wa, 6, *extra)
    assert "student_1_blocks" in r.stdout and "'student_1'" not in r.stdout  # the groups train.py reports
    train("configs/digits_turbopp.py", teacher, wb, 3, *extra)
    assert "resumed from step 3" in train("configs/digits_turbopp.py", teacher, wb, 6, *extra).stdout
    settings = json.loads((wa / "sampler.json").read_text())
    assert [sorted(e) for e in settings["step_adapters"]] == [["blocks", "sigma", "step"]] * 2
    assert not list(wa.glob("lora*.safetensors"))
    t1, t2 = (load_file(wa / f"step{k}_blocks.safetensors") for k in (1, 2))
    assert t1.keys() == t2.keys() and all(k.startswith("transformer_blocks.0.") for k in t1)
    assert "transformer_blocks.0.attn.to_q.weight" in t1 and any(not np.array_equal(t1[k], t2[k]) for k in t1)
    for k, v in t1.items():
        np.testing.assert_array_equal(v, load_file(wb / "step1_blocks.safetensors")[k], err_msg=k)

    base = digits_model.load_teacher(str(teacher))
    sample, steps, _ = digits_cli.load_student(base, wa)
    assert steps == 2
    grid = np.asarray(Image.open(wa / "samples.png"))
    np.testing.assert_array_equal(digits_training.tile(sample(np.tile(np.arange(10), 4), 0), 10)[..., 0], grid)


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


# --------------------------------------------------------------------------------------------------------------
# Per-step full copies of selected blocks (`turbopp.full_blocks`) on tiny Qwen-Image / Z-Image
# --------------------------------------------------------------------------------------------------------------

# per family: (tiny config, latent shape, a LoRA target, the full copies: one block's attention + one more module;
# Qwen-Image's block 0: the last block's text stream is discarded, so its text-side weights get no gradient)
FAMILIES = {
    "qwen_image": ("QWEN_IMAGE_TINY", (16, 16), r"transformer_blocks\.(img|txt)_mlp\.fc[12]",
                   [r"transformer_blocks\.0\.attn\..*", "proj_out"]),
    "z_image": ("Z_IMAGE_TINY", (4, 1, 8, 8), r"layers\.feed_forward\.(gate|up|down)",
                [r"layers\.1\.attention\..*", "final_linear"]),
}


def _tiny(family, scan_layers=True):
    from turbojax import models
    from turbojax.models import qwen_image, z_image
    config = getattr(qwen_image if family == "qwen_image" else z_image, FAMILIES[family][0])
    return models.create(config, seed=0, attention_impl="xla", scan_layers=scan_layers)


def _blocks_cfg(family, **kw):
    cfg = turbopp.turbopp_config()
    _, _, lora_target, full = FAMILIES[family]
    cfg.lora.student.targets, cfg.lora.student.rank, cfg.lora.student.alpha = [lora_target], 2, 2.0
    cfg.turbopp.full_blocks = list(full)
    cfg.turbopp.teacher_steps, cfg.turbopp.teacher_cfg = 6, 1.0  # 6 sub-steps: targets the 2 steps miss
    cfg.turbopp.final_weight, cfg.gan.weight, cfg.dmd.weight = 1.0, 0.0, 0.0  # deterministic teacher targets
    cfg.student.sigmas = (1.0, 0.75)
    cfg.opt.warmup_steps, cfg.opt.weight_decay, cfg.ema_decay = 0, 0.0, 0.5
    cfg.opt.student.lr, cfg.opt.blocks.lr = 1e-2, 3e-3
    for k, v in kw.items():
        sec, field = k.split("__")
        cfg[sec][field] = v
    return cfg


def _blocks_batch(family):
    rng = np.random.default_rng(0)
    ctx = jnp.asarray(rng.standard_normal((2, 3, 24)), jnp.float32)
    return {"ctx": ctx, "mask": jnp.ones((2, 3)), "neg_ctx": jnp.zeros_like(ctx), "neg_mask": jnp.ones((2, 3)),
            "iteration": jnp.asarray(0)}


def _sample_steps(m, step_models, noise, batch):
    """Euler over the student's sigmas, step i with `step_models[i]` (what the per-step samplers do)."""
    sig = list(m.settings.student_sigmas) + [0.0]
    cond = {"ctx": batch["ctx"], "mask": batch["mask"]}
    x = jnp.asarray(noise)
    for i, mdl in enumerate(step_models):
        x = x + (sig[i + 1] - sig[i]) * m.nets.velocity(mdl, x, jnp.full((x.shape[0],), sig[i]), cond)
    return np.asarray(x)


@pytest.mark.parametrize("family", ["qwen_image", "z_image"])
def test_full_blocks_select_per_layer_and_files_use_diffusers_names(family, tmp_path):
    from turbojax.distill import turbopp_blocks as TB
    from turbojax.convert.safetensors_io import open_safetensors
    from turbojax.convert.params import export_tensors, load_into
    from turbojax.models.registry import get_family
    scanned = _tiny(family)
    weights = dict(export_tensors(scanned, get_family(family)))  # the same weights, unscanned
    plain = load_into(_tiny(family, scan_layers=False), get_family(family), weights.__getitem__,
                      {k: v.shape for k, v in weights.items()}, "test", progress=False)
    stack, attn = ("transformer_blocks", "attn") if family == "qwen_image" else ("layers", "attention")
    full = [rf"{stack}\.1\.{attn}\..*", FAMILIES[family][3][1]]  # block 1's attention + a top-level module
    lay = TB.select(scanned, full)
    # scanned: only layer 1 of each stacked attention leaf; the top-level module whole
    assert all(layers == (1,) for key, layers in lay if key.startswith(stack + "."))
    assert {key.split(".")[0] for key, layers in lay if layers is None} == {full[1]}
    lay_plain = TB.select(plain, full)
    assert all(k.startswith((f"{stack}.1.", full[1] + ".")) for k, _ in lay_plain) and len(lay_plain) == len(lay)
    # a stack-wide spelling (as LoRA targets are written) selects every layer, scanned or not
    wide = TB.select(scanned, rf"{stack}\.{attn}\.to_q")
    assert [layers for _, layers in wide] == [(0, 1)] * len(wide)
    wide_re = rf"{stack}(\.\d+)?\.\w+\.to_q"
    assert {k for k, _ in TB.select(plain, wide_re)} == \
        {f"{stack}.{i}.{k.split('.', 1)[1]}" for k, _ in TB.select(scanned, wide_re) for i in (0, 1)}

    # copies moved away from the base: overlay writes exactly the selected layers
    frozen = nnx.split(scanned)[1]
    copies = {k: v + 1.0 for k, v in TB.init_copies(frozen, lay).items()}
    new = TB.overlay(frozen, lay, copies)
    before = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(frozen)}
    after = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(new)}
    picked = dict(lay)
    for k, a in after.items():
        if k not in picked:
            np.testing.assert_array_equal(a, before[k], err_msg=k)
        elif picked[k] is None:
            np.testing.assert_array_equal(a, before[k] + 1.0, err_msg=k)
        else:
            np.testing.assert_array_equal(a[1], before[k][1] + 1.0, err_msg=k)
            np.testing.assert_array_equal(a[0], before[k][0], err_msg=k)

    # the file: diffusers state-dict names (layer 1 only), torch layout; it loads into the unscanned model too
    TB.save(tmp_path / "b.safetensors", scanned, lay, copies)
    f = open_safetensors(tmp_path / "b.safetensors")
    assert len(f.keys()) == len(lay)  # one layer per stacked leaf + the top-level module's weight and bias
    assert all(k.startswith(f"{stack}.1.") for k in f.keys() if k.startswith(stack + "."))
    q = f"{stack}.1.{attn}.to_q.weight"
    np.testing.assert_array_equal(f.get(q), np.asarray(copies[q.replace(".1.", ".").replace("weight", "kernel")])[0].T)
    lay_back, copies_back = TB.load(tmp_path / "b.safetensors", plain)
    assert lay_back == lay_plain
    plain_model = TB.with_blocks(plain, lay_back, copies_back)
    scanned_model = TB.with_blocks(scanned, lay, copies)
    noise, batch = np.asarray(jax.random.normal(jax.random.key(0), (2, *FAMILIES[family][1]))), _blocks_batch(family)
    m = methods.build(_blocks_cfg(family), scanned, FAMILIES[family][1], jax.random.key(0), cap_len=3)
    np.testing.assert_allclose(_sample_steps(m, [plain_model], noise, batch),
                               _sample_steps(m, [scanned_model], noise, batch), atol=1e-5)
    with pytest.raises(TB.BlocksFileError, match="is not a parameter of this"):
        TB.load(tmp_path / "b.safetensors", _tiny("qwen_image" if family == "z_image" else "z_image"))


def test_full_blocks_config_errors():
    model = _tiny("qwen_image")
    cfg = _blocks_cfg("qwen_image")
    cfg.lora.student.targets = [r"transformer_blocks\.attn\.to_q"]  # LoRA on every layer's to_q, block 0 copied
    with pytest.raises(ValueError, match=r"transformer_blocks\.attn\.to_q \(layers \[0\]\) is selected by "
                                         r"turbopp\.full_blocks and LoRA-targeted by lora\.student\.targets"):
        methods.build(cfg, model, (16, 16), jax.random.key(0))
    for bad, msg in (([r"transformer_blocks\.9\..*"], "select no parameter"), (["proj_out", "("], "not a valid regex")):
        with pytest.raises(ValueError, match=msg):
            methods.build(_blocks_cfg("qwen_image", turbopp__full_blocks=bad), model, (16, 16), jax.random.key(0))


def _params_np(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen_image", "z_image"])
def test_full_blocks_train_resume_export_reload(family, tmp_path):
    from safetensors import safe_open

    from turbojax.training.checkpoints import Checkpoints
    model = _tiny(family)
    latent = FAMILIES[family][1]
    cfg = _blocks_cfg(family)
    m = methods.build(cfg, model, latent, jax.random.key(0), cap_len=3)
    groups = ["student_1", "student_1_blocks", "student_2", "student_2_blocks"]
    assert m.turns[0].groups == tuple(groups) and sorted(m.params) == groups
    init = _params_np(m.params)
    _, frozen = nnx.split(model)
    base_before = _params_np(frozen)
    batch = _blocks_batch(family)
    gen = m.turns[0]

    def loss(params):  # the generator loss on one fixed batch and key
        return float(jax.jit(gen.loss)({g: params[g] for g in groups}, {}, frozen, batch, jax.random.key(5))[0])

    def run(state, its, eng):
        for it in its:
            state, metrics = eng.iteration(state, frozen, lambda turn: {**batch, "iteration": jnp.asarray(it)}, it)
            assert all(np.isfinite(float(v)) for v in metrics.values())
        return state

    eng = Engine(m.turns, m.txs, cfg.ema_decay, seed=0)
    loss0 = loss(m.params)
    straight = run(eng.init_state(jax.tree.map(jnp.array, m.params)), range(6), eng)
    # resumed: 3 iterations, checkpoint, a fresh state restored from it, 3 more
    half = run(eng.init_state(jax.tree.map(jnp.array, m.params)), range(3), eng)
    with Checkpoints(tmp_path / "ck", every=3, keep=2) as ck:
        ck.save(3, half, force=True)
    with Checkpoints(tmp_path / "ck", every=3, keep=2) as ck:
        restored, step = ck.restore_latest(eng.init_state(jax.tree.map(jnp.array, m.params)))
    assert step == 3
    resumed = run(restored, range(3, 6), eng)
    jax.tree.map(np.testing.assert_array_equal, _params_np(straight), _params_np(resumed))

    # it trained: loss down, the copies moved and differ between the steps, the frozen base did not change
    state = straight
    assert loss(state["params"]) < 0.9 * loss0, (loss0, loss(state["params"]))
    b1, b2 = (_params_np(state["params"][f"student_{k}_blocks"]) for k in (1, 2))
    assert b1.keys() == init["student_1_blocks"].keys() == dict(m.settings.full_blocks).keys()
    for k in b1:
        assert not np.array_equal(b1[k], init["student_1_blocks"][k]), k
        assert not np.array_equal(b1[k], b2[k]), k
    jax.tree.map(np.testing.assert_array_equal, base_before, _params_np(frozen))

    # export -> reload -> the same samples as the in-memory (EMA) student
    (tmp_path / "out").mkdir()
    files = m.write_outputs(tmp_path / "out", state, model, cfg, 6)
    assert sorted(f.name for f in files) == sorted(
        [f"lora_step{k}{s}.safetensors" for k in (1, 2) for s in ("", "_comfy")]
        + ["step1_blocks.safetensors", "step2_blocks.safetensors", "sampler.json"])
    settings = json.loads((tmp_path / "out" / "sampler.json").read_text())
    assert [(e["step"], e["blocks"]) for e in settings["step_adapters"]] == \
        [(1, "step1_blocks.safetensors"), (2, "step2_blocks.safetensors")]
    with safe_open(str(tmp_path / "out" / "step2_blocks.safetensors"), framework="numpy") as fh:
        assert fh.metadata()["turbojax_step"] == "2"
    adapters, st = turbopp.load_steps(tmp_path / "out", model)
    blocks = turbopp.load_step_blocks(tmp_path / "out", model, st)
    noise = np.asarray(jax.random.normal(jax.random.key(9), (2, *latent)))
    mem = _sample_steps(m, turbopp.step_models(model, turbopp.step_adapters(m, state), turbopp.step_blocks(m, state)),
                        noise, batch)
    np.testing.assert_array_equal(_sample_steps(m, turbopp.step_models(model, adapters, blocks), noise, batch), mem)
    # ... and the training rollout (LoRA unmerged, copies overlaid) draws the same images
    x0, _ = turbopp.rollout(m.nets, frozen, state["ema"], jnp.asarray(noise),
                            {"ctx": batch["ctx"], "mask": batch["mask"]}, m.settings)
    np.testing.assert_allclose(np.asarray(x0), mem, atol=2e-5)
    # the copies matter: without them (LoRA only) the samples differ
    assert not np.allclose(_sample_steps(m, turbopp.step_models(model, adapters), noise, batch), mem, atol=1e-4)


def test_blocks_step_flag_errors(tmp_path):
    from test_sample_cli import base, run_error, stub_pipeline
    stub = stub_pipeline(tmp_path)
    a = tmp_path / "a.safetensors"
    a.write_bytes(b"")
    for extra, fragment in [
            (["--blocks-step", f"1:{a}"], "no blocks file for step(s) [2]"),
            (["--blocks-step", f"3:{a}", "--blocks-step", f"1:{a}"], "STEP in 1..2"),
            (["--blocks-step", str(a)], "STEP:FILE"),
            (["--blocks-step", f"1:{a}", "--blocks-step", f"1:{a}"], "step 1 has a blocks file already"),
            (["--blocks-step", f"1:{tmp_path / 'missing.safetensors'}", "--blocks-step", f"2:{a}"], "not found"),
            (["--blocks-step", f"1:{a}", "--blocks-step", f"2:{a}"], "not a readable safetensors file")]:
        msg = run_error(*base(stub, tmp_path, "--sigmas", "1,0.75", *extra))
        assert msg.startswith("error: --blocks-step") and fragment in msg, (extra, msg)
    assert "--blocks-step needs --model" in run_error("--blocks-step", f"1:{a}")


@pytest.mark.slow
def test_blocks_step_samples_each_step_with_its_weights(tmp_path):
    from test_pipeline_e2e import qwen_pipeline_torch
    from test_sample_cli import generate

    from turbojax import pipelines
    from turbojax.distill import turbopp_blocks as TB
    folder = tmp_path / "Qwen-Image-tiny"
    qwen_pipeline_torch().save_pretrained(folder)
    transformer = pipelines.from_diffusers(folder, progress=False).transformer
    lay = TB.select(transformer, r"transformer_blocks\.0\..*")
    same = TB.init_copies(nnx.split(transformer)[1], lay)  # the base's own weights
    moved = {k: v + 0.05 * jax.random.normal(jax.random.key(i), v.shape) for i, (k, v) in enumerate(same.items())}
    f0, f1 = tmp_path / "same.safetensors", tmp_path / "moved.safetensors"
    TB.save(f0, transformer, lay, same)
    TB.save(f1, transformer, lay, moved)

    def images(name, *extra):
        assert generate(folder, tmp_path / f"{name}.npz", "--sigmas", "1,0.75", *extra) == 0
        return np.load(tmp_path / f"{name}.npz")["images"]
    plain = images("plain")
    # the base's own weights written back in place: exactly the base (names, layout and layers all line up)
    np.testing.assert_array_equal(images("same", "--blocks-step", f"1:{f0}", "--blocks-step", f"2:{f0}"), plain)
    first = images("first", "--blocks-step", f"1:{f1}", "--blocks-step", f"2:{f0}")
    second = images("second", "--blocks-step", f"2:{f1}", "--blocks-step", f"1:{f0}")
    assert not np.array_equal(first, plain) and not np.array_equal(second, plain)
    assert not np.array_equal(first, second)
    # a blocks file of another family: one error line naming it
    wrong = tmp_path / "wrong.safetensors"
    from safetensors.numpy import save_file
    save_file({"layers.0.attention.to_q.weight": np.zeros((4, 4), np.float32)}, str(wrong))
    from test_sample_cli import run_error
    msg = run_error("--model", folder, "--prompt", "a", "--width", 32, "--height", 32, "--sigmas", "1,0.75",
                    "--out", tmp_path / "w.png", "--blocks-step", f"1:{wrong}", "--blocks-step", f"2:{f0}")
    assert str(wrong) in msg and "is not a parameter of this qwen_image transformer" in msg, msg
