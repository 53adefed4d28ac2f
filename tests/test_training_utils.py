"""turbojax.training (config checks, checkpoints, NaN/SIGTERM guards, metrics log) and the LoRA trainable split,
in process and fast; train.py end to end is in test_train.py."""
import json
import math
import os
import signal
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from turbojax import lora, models
from turbojax.training import UserError, run_cli
from turbojax.training import config as C
from turbojax.training.checkpoints import CheckpointMismatchError, Checkpoints
from turbojax.training.guards import MetricsBuffer, NonFiniteError, StopSignal, check_finite
from turbojax.training.metrics_log import MetricsLog

REPO = Path(__file__).resolve().parent.parent
DEFAULT = REPO / "configs" / "qwen_image_lora.py"


def parse(*argv, **kw):
    return C.parse_args(list(argv), default_config=DEFAULT, flags={"workdir": None}, **kw)


# --------------------------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------------------------
def test_overrides_are_typed_by_the_field_and_lists_can_be_set():
    cfg, flags = parse("--config.total_steps", "1e3", "--config.lr=2e-4", "--config.scan_layers", "false",
                       "--config.lora.targets", '["a.*", "b\\\\.c"]', "--config.latent_hw=16,12", "--workdir", "w")
    assert cfg.total_steps == 1000 and isinstance(cfg.total_steps, int)
    assert cfg.lr == 2e-4 and cfg.scan_layers is False and flags == {"workdir": "w"}
    assert cfg.lora.targets == ["a.*", "b\\.c"]
    assert cfg.latent_hw == (16, 12)  # the default's container and item type
    cfg, _ = parse("--config.lora.targets", r"x\.y,[ab]z")  # comma list; an item may start with "["
    assert cfg.lora.targets == [r"x\.y", "[ab]z"]
    cfg, _ = parse("--config.lora.targets", r"[qk]\.w")  # not a list literal: one regex
    assert cfg.lora.targets == [r"[qk]\.w"]
    with pytest.raises(AttributeError):  # locked: a typo in code cannot add a field
        cfg.lr_rate = 1.0


@pytest.mark.parametrize("argv, message", [
    (["--config.lora.rnak", "3"], "unknown config key --config.lora.rnak; did you mean --config.lora.rank?"),
    (["--config.total_step=3"], "did you mean --config.total_steps?"),
    (["--config.total_steps", "1.5"], "--config.total_steps expects an integer, got '1.5'"),
    (["--config.lr", "fast"], "--config.lr expects a number, got 'fast'"),
    (["--config.lora", "3"], "--config.lora is a group"),
    (["--config.latent_hw", "8,x"], "--config.latent_hw[1] expects an integer"),
    (["--wrokdir", "x"], "unknown flag --wrokdir; did you mean --workdir?"),
    (["--config.batch_size"], "--config.batch_size needs a value"),
    (["stray"], "unexpected argument 'stray'"),
    (["--config", "no/such/config.py"], "--config file no/such/config.py not found"),
])
def test_command_line_mistakes_are_one_clear_error(argv, message):
    with pytest.raises(C.ConfigError) as e:
        parse(*argv)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_config_file_problems(tmp_path):
    (tmp_path / "bad.py").write_text("def get_config(:\n")
    (tmp_path / "none.py").write_text("x = 1\n")
    (tmp_path / "variant.py").write_text("import ml_collections\n"
                                         "def get_config(v='a'):\n    return ml_collections.ConfigDict({'v': v})\n")
    with pytest.raises(C.ConfigError, match="invalid Python at line 1"):
        C.load_config(str(tmp_path / "bad.py"))
    with pytest.raises(C.ConfigError, match="defines no get_config"):
        C.load_config(str(tmp_path / "none.py"))
    assert C.load_config(f"{tmp_path / 'variant.py'}:real").v == "real"
    # a relative path that is not in the current folder is looked up next to the script (search_dirs)
    assert C.load_config("variant.py", search_dirs=[tmp_path]).v == "a"


@pytest.mark.parametrize("override, message", [
    (("batch_size", "0"), "--config.batch_size must be >= 1, got 0"),
    (("total_steps", "-5"), "--config.total_steps must be >= 1, got -5"),
    (("lr", "nan"), "--config.lr must be a finite number, got nan"),
    (("lr", "-1e-3"), "--config.lr must be >= 0, got -0.001"),
    (("grad_clip", "inf"), "--config.grad_clip must be a finite number, got inf"),
    (("checkpoint_every", "0"), "--config.checkpoint_every must be >= 1, got 0"),
    (("log_every", "0"), "--config.log_every must be >= 1"),
    (("lora.rank", "0"), "--config.lora.rank must be >= 1, got 0"),
    (("lora.alpha", "0"), "--config.lora.alpha must be > 0"),
    (("latent_hw", "8,0"), "--config.latent_hw[1] must be >= 1, got 0"),
    (("mesh.fsdp", "0"), "--config.mesh.fsdp must be >= -1 and != 0, got 0"),
    (("seed", "-1"), "--config.seed must be >= 0"),
    (("param_dtype", "int8"), "--config.param_dtype must be one of float32, bfloat16"),
])
def test_validate_rejects_bad_numbers(override, message):
    cfg, _ = parse()
    C.validate(cfg)  # the shipped default is valid
    cfg, _ = parse(f"--config.{override[0]}", override[1])
    with pytest.raises(C.ConfigError) as e:
        C.validate(cfg)
    assert str(e.value).startswith(message)


def test_validate_first_matching_rule_decides():
    import ml_collections
    cfg = ml_collections.ConfigDict({"sample_every": 0, "log_every": 0})
    with pytest.raises(C.ConfigError, match=r"--config.log_every must be >= 1, got 0"):
        C.validate(cfg)  # sample_every 0 (off) passes: its own rule comes before "*_every"
    C.validate(cfg, rules={"student.rank": ">=2", **C.DEFAULT_RULES, "*_every": ">=0"})
    with pytest.raises(C.ConfigError, match=r"--config.student.rank must be >= 2, got 1"):
        C.validate(ml_collections.ConfigDict({"student": {"rank": 1}}), rules={"student.rank": ">=2", **C.DEFAULT_RULES})


def test_check_workdir(tmp_path):
    (tmp_path / "f").write_text("keep")
    assert C.check_workdir(str(tmp_path / "new" / "run")) == tmp_path / "new" / "run"
    assert not (tmp_path / "new").exists()  # creates nothing
    with pytest.raises(C.ConfigError, match="exists and is not a folder"):
        C.check_workdir(str(tmp_path / "f"))
    with pytest.raises(C.ConfigError, match="is a file, not a folder"):
        C.check_workdir(str(tmp_path / "f" / "run"))
    assert (tmp_path / "f").read_text() == "keep"


def test_train_main_reports_config_mistakes_before_creating_anything(tmp_path, capsys, monkeypatch):
    """train.py's main through run_cli, in process (the subprocess form is in test_train.py)."""
    monkeypatch.chdir(tmp_path)
    sys.path.insert(0, str(REPO))
    try:
        import train
    finally:
        sys.path.remove(str(REPO))
    (tmp_path / "file").write_text("x")
    lora_config = ["--config", "configs/qwen_image_lora.py"]  # relative to train.py's folder (cwd is elsewhere)
    cases = [(["--config", "missing.py", "--workdir", "w1"], "error: --config file missing.py not found"),
             (["--config.batch_size", "0", "--workdir", "w2"], "error: --config.batch_size must be >= 1, got 0"),
             (["--config.total_steps", "0", "--workdir", "w3"], "error: --config.total_steps must be >= 1, got 0"),
             (["--workdir", "file"], "error: --workdir file exists and is not a folder")]
    for argv, message in cases:
        assert run_cli(train.main, lora_config + argv) == 1
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# --------------------------------------------------------------------------------------------------------------
# guards
# --------------------------------------------------------------------------------------------------------------
def test_check_finite_names_step_and_metric():
    check_finite({"loss": 1.0, "grad_norm": 0.5}, 3)
    with pytest.raises(NonFiniteError) as e:
        check_finite({"loss": 1.0, "grad_norm": float("inf")}, 7)
    assert (e.value.step, e.value.metric) == (7, "grad_norm") and str(e.value).startswith("step 7: grad_norm is inf")
    assert isinstance(e.value, UserError)


def test_metrics_buffer_finds_the_first_bad_step_in_one_flush():
    buf = MetricsBuffer()
    for step, loss in [(1, 1.0), (2, 0.5), (3, np.nan), (4, np.inf)]:
        buf.push(step, {"loss": jnp.float32(loss), "grad_norm": jnp.float32(0.1)})
    assert buf.pending == 4
    with pytest.raises(NonFiniteError) as e:
        buf.flush()
    assert (e.value.step, e.value.metric) == (3, "loss") and math.isnan(e.value.value)
    assert buf.pending == 0
    buf.push(5, {"loss": jnp.float32(2.0)})
    assert buf.flush() == [(5, {"loss": 2.0})]


def test_stop_signal_turns_sigterm_into_a_flag():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signame == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before


# --------------------------------------------------------------------------------------------------------------
# metrics log
# --------------------------------------------------------------------------------------------------------------
def test_metrics_log_drops_lines_past_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path, resume_step=0) as log:
        for s in (5, 10, 15, 20):
            log.write(s, {"loss": s / 10})
    with open(path, "a") as f:
        f.write('{"note": "mine"}\n{"loss": 0.1, "st')  # a foreign line, then a line torn by a kill
    with MetricsLog(path, resume_step=10) as log:  # resumed from the checkpoint of step 10
        assert log.steps() == [5, 10]
        log.write(15, {"loss": 1.5})
    lines = path.read_text().splitlines()
    assert [json.loads(x).get("step") for x in lines] == [5, 10, None, 15]
    stat = path.stat()
    MetricsLog(path, resume_step=15).close()  # nothing to drop: the file is not rewritten
    assert path.stat().st_ino == stat.st_ino and path.read_text().splitlines() == lines


# --------------------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------------------
def _state(rank, value=1.0):
    trainable = {"blocks.to_q": {"a": jnp.full((2, 8, rank), value), "b": jnp.zeros((2, rank, 8))}}
    tx = optax.adam(1e-3)
    return {"trainable": trainable, "opt": tx.init(trainable), "step": jnp.zeros((), jnp.int32)}


def test_checkpoints_interval_final_save_keep_and_restore(tmp_path):
    with Checkpoints(tmp_path / "ck", every=3, keep=2) as ck:
        assert ck.restore_latest(_state(4))[1] == 0
        saved = [s for s in range(1, 8) if ck.save(s, _state(4, float(s)), force=(s == 7))]
        assert saved == [3, 6, 7]
        assert not ck.save(7, _state(4, 9.0), force=True)  # a step is never saved twice
        ck.wait()
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["6", "7"]
    with Checkpoints(tmp_path / "ck", every=3, keep=2) as ck:
        assert ck.latest_step() == 7 and not ck.should_save(7)
        state, step = ck.restore_latest(_state(4))
    assert step == 7
    np.testing.assert_array_equal(state["trainable"]["blocks.to_q"]["a"], np.full((2, 8, 4), 7.0))


def test_checkpoint_with_other_shapes_is_one_clear_error(tmp_path):
    with Checkpoints(tmp_path / "ck", every=1, keep=1) as ck:
        ck.save(1, _state(4))
    with Checkpoints(tmp_path / "ck", every=1, keep=1, hint="use the old rank or a new --workdir") as ck:
        with pytest.raises(CheckpointMismatchError) as e:
            ck.restore_latest(_state(8))
        msg = str(e.value)
        assert "trainable/blocks.to_q/a has shape (2, 8, 4) but this config expects (2, 8, 8)" in msg
        assert msg.endswith("use the old rank or a new --workdir") and "\n" not in msg
        other = _state(4)
        other["trainable"]["blocks.to_k"] = other["trainable"].pop("blocks.to_q")
        with pytest.raises(CheckpointMismatchError, match="holds trainable/blocks.to_q/a"):
            ck.restore_latest(other)


# --------------------------------------------------------------------------------------------------------------
# LoRA init checks and the trainable split
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return models.create("qwen_image_tiny", seed=0)


@pytest.mark.parametrize("kw, message", [
    (dict(rank=0), "LoRA rank must be an integer >= 1, got 0"),
    (dict(rank=-2), "LoRA rank must be an integer >= 1, got -2"),
    (dict(rank=2.5), "LoRA rank must be an integer >= 1, got 2.5"),
    (dict(rank=4, dtype=jnp.int32), "LoRA dtype must be floating point (float32, bfloat16, ...), got int32"),
    (dict(rank=4, dtype="nonsense"), "LoRA dtype 'nonsense' is not a dtype"),
    (dict(rank=4, alpha=float("nan")), "LoRA alpha must be a finite number > 0, got nan"),
    (dict(rank=4, targets=["(unclosed"]), "LoRA target '(unclosed' is not a valid regex"),
    (dict(rank=4, targets=[]), "LoRA targets are empty"),
])
def test_init_adapter_rejects_bad_arguments(tiny, kw, message):
    kw = {"targets": [r"transformer_blocks\.attn\.to_q"], **kw}
    with pytest.raises(ValueError) as e:
        lora.init_adapter(tiny, rng=jax.random.key(0), **kw)
    assert str(e.value).startswith(message)


def test_only_a_and_b_are_trainable(tiny):
    adapter = lora.init_adapter(tiny, [r"transformer_blocks\.attn\.to_(q|v)"], 4, 3.0, rng=jax.random.key(0))
    trainable, fixed = lora.split_trainable(adapter)
    assert all(set(e) == {"a", "b"} for e in trainable.values())
    assert all(set(e) == {"scale"} for e in fixed.values())
    joined = lora.join_trainable(trainable, fixed)
    assert jax.tree.structure(joined) == jax.tree.structure(adapter)
    graphdef, frozen = nnx.split(tiny)

    def loss(tr):
        model = nnx.merge(graphdef, lora.merge_params(frozen, lora.join_trainable(tr, fixed)))
        return jnp.sum(jnp.square(model.forward(jnp.ones((1, 4, 16)), jnp.ones((1, 3, 24)), None,
                                                jnp.full((1,), 0.5), ((1, 2, 2),))))
    grads = jax.grad(loss)(trainable)  # join_trainable works under grad; the gradient covers a and b only
    assert jax.tree.structure(grads) == jax.tree.structure(trainable) and float(optax.global_norm(grads)) > 0
    # a trained (non-zero b) adapter saves the configured alpha, exactly
    assert {m.alpha for m in lora.to_lora_weights(
        lora.join_trainable(jax.tree.map(lambda x: x + 1.0, trainable), fixed), tiny).values()} == {3.0}
