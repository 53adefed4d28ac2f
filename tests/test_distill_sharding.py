"""Distillation steps on a mesh (8 simulated CPU devices): the planned shardings of trainables, optimiser states, EMA
and the frozen base; DMD2 + GAN iterations on (data 2, fsdp 2, tensor 2) equal the same iterations on one device; a
checkpoint saved on that mesh resumes on (1, 8, 1) and on one device; a batch the mesh cannot split is one `error:`
line (engine and train.py)."""
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
from jax.sharding import PartitionSpec as P

from turbojax import models
from turbojax.distill import engine as E
from turbojax.distill import methods, sharded
from turbojax.distill.config import dmd2_config
from turbojax.sharding import make_mesh
from turbojax.training.checkpoints import Checkpoints

REPO = Path(__file__).resolve().parent.parent
LR = 1e-3
B = 8  # global batch: a multiple of data x fsdp on every mesh here ((2, 2, 2): 4, (1, 8, 1): 8)


def _cfg(method="dmd2"):
    if method == "pcm":
        from turbojax.distill.pcm import pcm_config
        cfg = pcm_config()
        cfg.pcm.grid_steps = 4
    else:
        cfg = dmd2_config()
        cfg.lora.fake.rank, cfg.lora.fake.alpha = 2, 4.0
        cfg.ttur_ratio, cfg.ema_decay = 2, 0.5
        cfg.gan.r1_weight = 0.1
    cfg.lora.student.rank, cfg.lora.student.alpha = 2, 4.0
    cfg.gan.hidden, cfg.gan.weight = 8, 0.1
    for g in ("student", "fake", "disc"):
        cfg.opt[g].lr = LR
    return cfg


def _setup(method="dmd2"):
    cfg = _cfg(method)
    base = models.create("qwen_image_tiny", seed=0)
    m = methods.build(cfg, base, (16, 16), jax.random.key(1))
    rng = np.random.default_rng(0)
    batch = {"ctx": rng.standard_normal((B, 5, 24)).astype(np.float32), "mask": np.ones((B, 5), np.float32),
             "neg_ctx": np.zeros((B, 5, 24), np.float32), "neg_mask": np.ones((B, 5), np.float32),
             "real": rng.standard_normal((B, 16, 16)).astype(np.float32)}
    _, frozen = nnx.split(base)
    return cfg, m, batch, frozen, jax.tree.map(np.asarray, m.params)


def _names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def _host(tree):
    return jax.tree.map(np.asarray, tree)


def _iterate(eng, state, frozen, batch, its):
    """States (host copies) and metrics after each iteration in `its`; the last device state."""
    out = []
    for it in its:
        state, metrics = eng.iteration(state, frozen, lambda n: batch, it)
        out.append((_host(state), {k: float(v) for k, v in metrics.items()}))
    return out, state


def _assert_same(ref, got, rtol=1e-5):
    """Equal up to fp32 summation order: each entry within `rtol` of itself and of its leaf's largest entry, plus
    1e-3 lr (the scale of one Adam update; small leaves such as the moments of a LoRA `a` whose `b` is still ~0 are
    all rounding). Adam divides by the gradient's magnitude, so an entry whose gradient is ~0 (cancellation) turns
    the last bits of that gradient into an update difference of a fraction of lr: such entries may be a few (at
    most 1% of a leaf, or one), each within lr. A wrong result (a mis-split batch, a missing reduction, a corrupted
    buffer) is off everywhere."""
    flat_ref = jax.tree_util.tree_flatten_with_path(ref)[0]
    flat_got = jax.tree.leaves(got)
    assert len(flat_ref) == len(flat_got)
    for (path, a), b in zip(flat_ref, flat_got):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        where = jax.tree_util.keystr(path)
        assert a.shape == b.shape, where
        diff = np.abs(a - b)
        off = diff > rtol * (np.abs(a) + np.abs(a).max(initial=0.0)) + 1e-3 * LR
        assert off.sum() <= max(1, a.size // 100), f"{where}: {off.sum()} of {a.size} entries differ"
        assert diff.max(initial=0.0) <= LR, f"{where}: max difference {diff.max()}"


@pytest.fixture(scope="module")
def dmd2():
    """The tiny DMD2 + GAN run: one-device reference over iterations 0..2 (generator at 0 and 2), and the same on
    the (2, 2, 2) mesh."""
    cfg, m, batch, frozen, params0 = _setup()
    ref_eng = E.Engine(m.turns, m.txs, cfg.ema_decay, seed=0)
    ref, _ = _iterate(ref_eng, ref_eng.init_state(jax.tree.map(jnp.asarray, params0)), frozen, batch, range(3))
    mesh = make_mesh(2, 2, 2)
    plan = sharded.plan(mesh, m.turns, m.txs, params0, frozen)
    eng = E.Engine(m.turns, m.txs, cfg.ema_decay, seed=0, shardings=plan)
    placed = plan.put_frozen(frozen)
    state0 = eng.init_state(params0)
    first_leaf = jax.tree.leaves(state0)[0]
    runs, last = _iterate(eng, state0, placed, batch, range(3))
    return dict(cfg=cfg, m=m, batch=batch, frozen=frozen, params0=params0, ref_eng=ref_eng, ref=ref, plan=plan,
                placed=placed, mesh_runs=runs, mesh_last=last, donated=first_leaf)


def test_plan_lays_trainables_out_like_their_base_weights():
    cfg, m, batch, frozen, params0 = _setup()
    mesh = make_mesh(2, 2, 2)
    plan = sharded.plan(mesh, m.turns, m.txs, params0, frozen)
    is_sh = lambda x: hasattr(x, "spec")  # noqa: E731
    base_specs = {".".join(_names(p)): s.spec
                  for p, s in jax.tree_util.tree_flatten_with_path(plan.frozen, is_leaf=is_sh)[0]}
    seen = set()
    for group in ("student", "fake"):
        for path, f in plan.params[group].items():
            kernel = base_specs[path + ".kernel"]
            a, b = f["a"].spec, f["b"].spec
            assert a[-2] == kernel[-2] and a[-1] is None, (path, a, kernel)  # in-dim like the kernel, rank whole
            assert b[-2] is None and b[-1] == kernel[-1], (path, b, kernel)  # out-dim like the kernel
            seen |= {a[-2], b[-1]}
    assert {"fsdp", "tensor"} <= seen  # the checks above can fail: the factors are really split
    # the frozen base is not replicated with fsdp > 1
    assert "fsdp" in base_specs["transformer_blocks.img_mlp.fc1.kernel"]
    # Adam mu / nu like their LoRA params; counts and the discriminator heads' moments (no axes) replicated
    n_moments = 0
    for turn in m.turns:
        for path, sh in jax.tree_util.tree_flatten_with_path(plan.state["opt"][turn.name], is_leaf=is_sh)[0]:
            names = _names(path)
            if ("mu" in names or "nu" in names) and names[-3] in ("student", "fake"):
                group, module, factor = names[-3:]
                assert sh == plan.params[group][module][factor], names
                n_moments += 1
            else:
                assert sh.spec == P(), names
    assert n_moments == 2 * 2 * (len(plan.params["student"]) + len(plan.params["fake"]))
    mu = plan.state["opt"]["generator"][1].inner_states["student"].inner_state[0].mu["student"]
    assert mu["transformer_blocks.img_mlp.fc1"]["a"] == plan.params["student"]["transformer_blocks.img_mlp.fc1"]["a"]
    assert all(s.spec == P() for s in jax.tree.leaves(plan.params["disc"]))
    assert jax.tree.structure(plan.state["ema"]) == jax.tree.structure({"student": plan.params["student"]})
    assert plan.state["ema"]["student"] == plan.params["student"]
    # with the DINO discriminator the frozen argument is FrozenArrays (base + DINO + VAE decoder states): each part
    # by its own axes, and the LoRA factors still follow the base
    from turbojax.distill.nets import FrozenArrays
    fa = FrozenArrays(base=frozen, dino=frozen, vae={"w": np.zeros((3, 4), np.float32)})
    plan_fa = sharded.plan(mesh, m.turns, m.txs, params0, fa)
    assert plan_fa.params == plan.params
    placed = plan_fa.put_frozen(fa)
    kernel = placed.dino["transformer_blocks"]["img_mlp"]["fc1"]["kernel"][...]
    assert kernel.sharding.spec == base_specs["transformer_blocks.img_mlp.fc1.kernel"]
    assert placed.vae["w"].sharding.is_fully_replicated


def test_a_batch_the_mesh_cannot_split_is_refused():
    mesh = make_mesh(2, 2, 2)
    with pytest.raises(ValueError, match=r"\['ctx'\] of shape \(6, 5, 24\).*multiple of the 4 data-parallel"):
        sharded.batch_shardings({"ctx": np.zeros((6, 5, 24)), "iteration": np.int32(0)}, mesh)
    sh = sharded.batch_shardings({"ctx": np.zeros((8, 5, 24)), "iteration": np.int32(0)}, mesh)
    assert sh["ctx"].spec == P(("data", "fsdp")) and sh["iteration"].spec == P()


def test_train_py_refuses_a_batch_the_mesh_cannot_split(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", TURBOJAX_PROGRESS="0")
    r = subprocess.run([sys.executable, str(REPO / "train.py"), "--workdir", str(tmp_path / "w"),
                        "--config.batch_size", "6", "--config.mesh.data", "2", "--config.mesh.fsdp", "2",
                        "--config.mesh.tensor", "2"], cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --config.batch_size 6 must be a multiple of the 4 "), lines
    assert not (tmp_path / "w" / "checkpoints").exists()  # refused before any work


@pytest.mark.slow
def test_dmd2_gan_on_a_mesh_equals_one_device(dmd2):
    plan = dmd2["plan"]
    for (ref_state, ref_m), (state, met) in zip(dmd2["ref"], dmd2["mesh_runs"]):
        assert met.keys() == ref_m.keys()
        for k in ref_m:
            np.testing.assert_allclose(met[k], ref_m[k], rtol=1e-5, atol=1e-7, err_msg=k)
        _assert_same(ref_state, state)
    assert set(dmd2["mesh_runs"][0][1]) >= {"generator/gan_g", "critic/gan_d", "critic/r1"}  # GAN and R1 ran
    # the steps keep the planned layout (explicit out_shardings) and donate the state
    last = dmd2["mesh_last"]
    for got, want in zip(jax.tree.leaves(last), jax.tree.leaves(plan.state)):
        assert got.sharding.is_equivalent_to(want, got.ndim), (got.sharding, want)
    a = last["params"]["student"]["transformer_blocks.img_mlp.fc1"]["a"]
    assert a.sharding.spec == P(None, "fsdp", None)
    assert last["opt"]["critic"][1].inner_states["fake"].inner_state[0].nu["fake"][
        "transformer_blocks.img_mlp.fc1"]["b"].sharding.spec == P(None, None, "tensor")
    assert dmd2["donated"].is_deleted()
    big = dmd2["placed"]["transformer_blocks"]["img_mlp"]["fc1"]["kernel"][...]
    assert "fsdp" in big.sharding.spec and not big.sharding.is_fully_replicated
    assert big.addressable_shards[0].data.size < big.size


@pytest.mark.slow
def test_a_checkpoint_from_the_mesh_resumes_on_another_mesh_and_on_one_device(dmd2, tmp_path):
    m, cfg, batch, frozen = dmd2["m"], dmd2["cfg"], dmd2["batch"], dmd2["frozen"]
    saved_host = dmd2["mesh_runs"][1][0]  # after iterations 0 and 1 on (2, 2, 2)
    with Checkpoints(tmp_path / "ckpt", every=1, keep=2) as ck:
        state = jax.device_put(saved_host, dmd2["plan"].state)
        assert ck.save(2, state)
    # (1, 8, 1): a fresh template sharded for that mesh; the stored values land on its layout, bit-exact
    mesh = make_mesh(1, 8, 1)
    plan = sharded.plan(mesh, m.turns, m.txs, dmd2["params0"], frozen)
    eng = E.Engine(m.turns, m.txs, cfg.ema_decay, seed=0, shardings=plan)
    with Checkpoints(tmp_path / "ckpt", every=1, keep=2) as ck:
        restored, step = ck.restore_latest(eng.init_state(dmd2["params0"]))
    assert step == 2
    for got, want, value in zip(jax.tree.leaves(restored), jax.tree.leaves(plan.state), jax.tree.leaves(saved_host)):
        assert got.sharding.is_equivalent_to(want, got.ndim)
        np.testing.assert_array_equal(np.asarray(got), value)
    a = restored["params"]["student"]["transformer_blocks.img_mlp.fc1"]["a"]
    assert a.sharding.mesh.shape["fsdp"] == 8 and a.sharding.spec == P(None, "fsdp", None)
    runs, _ = _iterate(eng, restored, plan.put_frozen(frozen), batch, [2])
    _assert_same(dmd2["ref"][2][0], runs[0][0])
    _assert_same(dmd2["mesh_runs"][2][0], runs[0][0])
    # one device, no mesh: the plain engine continues from it the same way
    ref_eng = dmd2["ref_eng"]
    template = ref_eng.init_state(jax.tree.map(jnp.asarray, dmd2["params0"]))
    with Checkpoints(tmp_path / "ckpt", every=1, keep=2) as ck:
        restored1, _ = ck.restore_latest(template)
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(restored1))
    runs1, _ = _iterate(ref_eng, restored1, frozen, batch, [2])
    _assert_same(dmd2["ref"][2][0], runs1[0][0])


@pytest.mark.slow
def test_pcm_turns_on_an_fsdp_mesh_equal_one_device():
    """PCM + GAN on (1, 4, 2), turn by turn from one common state: PCM's pseudo-Huber loss and Adam amplify last-bit
    differences where their input is ~0, so two runs drift apart by more than summation order. Its target (teacher
    Euler sub-steps with CFG) rounds more than DMD2's: the per-entry bound is 1e-4 of the leaf's largest."""
    cfg, m, batch, frozen, params0 = _setup("pcm")
    assert [t.name for t in m.turns] == ["generator", "critic"]
    # a warm-started student (b != 0): at b = 0 student and teacher cancel in the consistency target, whose fp32
    # rounding then dominates its gradient
    rng = np.random.default_rng(1)
    for f in params0["student"].values():
        f["b"] = (0.05 * rng.standard_normal(f["b"].shape)).astype(np.float32)
    ref_eng = E.Engine(m.turns, m.txs, cfg.ema_decay, seed=0)
    mesh = make_mesh(1, 4, 2)
    plan = sharded.plan(mesh, m.turns, m.txs, params0, frozen)
    eng = E.Engine(m.turns, m.txs, cfg.ema_decay, seed=0, shardings=plan)
    placed = plan.put_frozen(frozen)
    common = _host(eng.init_state(params0))
    for it in range(2):
        for i, turn in ref_eng.due(it):
            key = E.turn_key(0, it, i)
            ref, ref_m = ref_eng.steps[turn.name](jax.tree.map(jnp.asarray, common), frozen, batch, key)
            got, got_m = eng.steps[turn.name](jax.device_put(common, plan.state), placed, batch, key)
            for k in ref_m:
                np.testing.assert_allclose(float(got_m[k]), float(ref_m[k]), rtol=1e-5, atol=1e-7, err_msg=k)
            _assert_same(_host(ref), _host(got), rtol=1e-4)
            common = _host(ref)


@pytest.mark.slow
def test_train_py_distills_on_a_mesh_and_resumes_on_another(tmp_path):
    """train.py end to end on 8 devices: DMD2 + GAN on the digits teacher on (2, 2, 2), then the same workdir
    resumed on (1, 8, 1) (the checkpoint is read onto the new layout) up to the final export."""
    from turbojax.digits import model as digits_model
    teacher = digits_model.save_export(digits_model.new_teacher(3), tmp_path / "teacher")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", TURBOJAX_PROGRESS="0")

    def run(total, mesh):
        args = [sys.executable, str(REPO / "train.py"), "--workdir", str(tmp_path / "w"), "--config.init_from",
                str(teacher), "--config.total_steps", str(total), "--config.checkpoint_every", "2",
                "--config.log_every", "1", "--config.sample_every", "0", "--config.batch_size", "8",
                "--config.ttur_ratio", "2", "--config.data.teacher_samples_per_class", "2", "--config.gan.hidden",
                "8"] + [x for a, n in zip(("data", "fsdp", "tensor"), mesh) for x in (f"--config.mesh.{a}", str(n))]
        r = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        return r.stdout

    out = run(2, (2, 2, 2))
    assert "mesh data 2 x fsdp 2 x tensor 2" in out and (tmp_path / "w" / "checkpoints" / "2").is_dir()
    out = run(4, (1, 8, 1))
    assert "mesh data 1 x fsdp 8 x tensor 1" in out and "resumed from step 2" in out
    steps = [json.loads(line)["step"] for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert (tmp_path / "w" / "lora.safetensors").is_file()
