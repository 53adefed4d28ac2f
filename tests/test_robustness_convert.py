"""Conversion and loading under user mistakes and interruptions: one `error:` line and nothing half-written or
lost; signals clean up; stale temp folders of dead runs go away; outputs follow the umask; stray weight files are
ignored as diffusers ignores them; `import turbojax` gives lazy access to every submodule."""
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from turbojax import models
from turbojax.convert.__main__ import main as cli
from turbojax.convert.atomic import WRITER_FILE, remove_stale_temps
from turbojax.convert.folders import convert_pipeline, to_jax, to_torch
from turbojax.convert.params import flat_params, model_leaves
from turbojax.convert.safetensors_io import SafetensorsError, choose_weights
from turbojax.models.qwen_image import QwenImageConfig
from turbojax.models.registry import ConfigError, config_to_dict, get_family, read_component_config

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = "diffusion_pytorch_model.safetensors"
TINY = QwenImageConfig(num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                       in_channels=16, out_channels=4, axes_dims_rope=(4, 6, 6))
# ~37 MB in ~140 tensors: with 1 MB parts a conversion takes seconds, long enough to be interrupted half way
MEDIUM = QwenImageConfig(num_layers=4, attention_head_dim=64, num_attention_heads=4, joint_attention_dim=64,
                         in_channels=16, out_channels=4, axes_dims_rope=(16, 24, 24))


def make_component(folder: Path, cfg=TINY, seed: int = 0) -> dict[str, np.ndarray]:
    """A diffusers-layout Qwen-Image transformer folder with random weights (no torch needed)."""
    fam = get_family("qwen_image")
    m = models.abstract_model(fam, cfg, scan_layers=False)
    params = flat_params(m)
    rng = np.random.default_rng(seed)
    tensors = {k: rng.standard_normal(leaf.torch_shape(params[leaf.jax_path].shape), np.float32) * np.float32(0.05)
               for leaf in model_leaves(m, fam) for k in leaf.torch_keys}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config_to_dict(fam, cfg)))
    return tensors


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(err: str) -> str:
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def run_cli(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "turbojax.convert", *map(str, args), "--no-progress"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={"PATH": os.environ.get("PATH", ""), "JAX_PLATFORMS": "cpu",
                                 "PYTHONPATH": str(REPO)})


# ---------------------------------------------------------------------------------------------------------------
# Interruptions
# ---------------------------------------------------------------------------------------------------------------

def _wait_for(cond, proc, what, timeout=120):
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"the conversion ended (rc {proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _medium_source(tmp_path, direction):
    make_component(tmp_path / "src", MEDIUM)
    if direction == "to-torch":
        to_jax(tmp_path / "src", tmp_path / "jax", scan_layers=False, max_part_bytes=1 << 20, progress=False)
        return tmp_path / "jax", tmp_path / "back", lambda tmp: any((tmp / ".scratch").glob("*"))
    return tmp_path / "src", tmp_path / "jax", lambda tmp: (tmp / "params" / "part-00002").exists()


@pytest.mark.parametrize("direction", ["to-jax", pytest.param("to-torch", marks=pytest.mark.slow)])
def test_sigterm_mid_conversion_removes_temp_folder(tmp_path, direction):
    src, dst, started = _medium_source(tmp_path, direction)
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [direction, src, dst] + (["--part-size-mb", "1", "--no-scan"] if direction == "to-jax" else [])
    proc = run_cli(*args)
    temps = lambda: list(tmp_path.glob(f".{dst.name}.tmp-*"))  # noqa: E731
    _wait_for(lambda: temps() and started(temps()[0]), proc, "it was half way")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "interrupted by SIGTERM" in one_error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "temp folder or DST left behind"


@pytest.mark.slow
def test_temp_folder_of_killed_run_is_removed_by_next_run(tmp_path):
    """SIGKILL cannot be caught: its temp folder stays, and the next run into the same DST removes it."""
    src, dst, started = _medium_source(tmp_path, "to-jax")
    proc = run_cli("to-jax", src, dst, "--part-size-mb", "1", "--no-scan")
    _wait_for(lambda: list(tmp_path.glob(".jax.tmp-*")) and started(next(tmp_path.glob(".jax.tmp-*"))), proc,
              "it was half way")
    proc.kill()
    proc.communicate()
    left = list(tmp_path.glob(".jax.tmp-*"))
    assert len(left) == 1 and (left[0] / WRITER_FILE).is_file()
    assert cli(["to-jax", str(src), str(dst), "--no-progress"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jax", "src"]


def test_signal_during_a_critical_step_is_held_back_then_raised():
    from turbojax.convert.atomic import Interrupted, held_interrupts, raise_interrupted
    done = []
    with pytest.raises(Interrupted) as e:
        with held_interrupts():
            raise_interrupted(signal.SIGTERM)  # what the CLI's handler calls
            done.append("the step finished")
    assert done == ["the step finished"] and e.value.signum == signal.SIGTERM
    with pytest.raises(Interrupted):
        raise_interrupted(signal.SIGTERM)  # outside a critical step: at once


def _fake_temp(path: Path, pid: int, lock: bool = False):
    path.mkdir()
    (path / "params").mkdir()
    (path / "params" / "junk").write_bytes(b"x" * 100)
    (path / WRITER_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    if lock:  # as a live writer holds it
        import fcntl
        f = open(path / WRITER_FILE)
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return f


def test_stale_temp_folders_of_our_naming_only_are_removed(tmp_path, capsys):
    make_component(tmp_path / "src")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _fake_temp(tmp_path / ".jax.tmp-deadbeef", dead.pid)
    live = _fake_temp(tmp_path / ".jax.tmp-0123abcd", os.getpid(), lock=True)  # a concurrent run
    keep = [".jax.tmp-0123abcd", ".jax.tmp-cafe", ".jax.tmp-deadbeef0", ".jaxx.tmp-deadbeef", ".jax.tmp-DEADBEEF",
            ".jax.bak-deadbeef", ".config", ".jax.tmp-feedf00d"]
    for name in keep[1:-1]:
        _fake_temp(tmp_path / name, dead.pid)
    (tmp_path / ".jax.tmp-feedf00d").mkdir()  # ours by name, but no writer file: not provably abandoned
    (tmp_path / ".jax.tmp-feedf00d" / "mine.txt").write_text("user data")
    try:
        assert cli(["to-jax", str(tmp_path / "src"), str(tmp_path / "jax"), "--no-progress"]) == 0
    finally:
        live.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(keep + ["jax", "src"])
    assert not (tmp_path / "jax" / WRITER_FILE).exists()
    assert (tmp_path / ".jax.tmp-feedf00d" / "mine.txt").read_text() == "user data"


def test_stale_old_copy_is_removed_or_restored(tmp_path):
    dst = tmp_path / "out"
    # the dead run had swapped the new folder in and was deleting the old one: finish the job
    dst.mkdir()
    (dst / "new").write_text("n")
    (tmp_path / ".out.old-12345678").mkdir()
    (tmp_path / ".out.old-12345678" / "old").write_text("o")
    remove_stale_temps(dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (dst / "new").is_file()
    # the dead run had moved DST aside and died before moving the new one in: DST comes back
    os.replace(dst, tmp_path / ".out.old-87654321")
    with pytest.warns(UserWarning, match="restored"):
        remove_stale_temps(dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (dst / "new").read_text() == "n"


# ---------------------------------------------------------------------------------------------------------------
# User mistakes on the command line: one `error:` line, exit 2, SRC untouched, nothing written
# ---------------------------------------------------------------------------------------------------------------

def test_existing_destination_hint_names_the_flag(tmp_path, capsys):
    make_component(tmp_path / "src")
    (tmp_path / "jax").mkdir()
    (tmp_path / "jax" / "mine.txt").write_text("mine")
    assert cli(["to-jax", str(tmp_path / "src"), str(tmp_path / "jax"), "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--overwrite" in line and "overwrite=True" not in line
    assert (tmp_path / "jax" / "mine.txt").read_text() == "mine"


@pytest.mark.parametrize("case,match", [
    ("src_missing", "no such folder"),
    ("src_is_file", "is a file"),
    ("dst_is_src", "DST .* is SRC"),
    ("dst_inside_src", "inside SRC"),
    ("dst_contains_src", "contains SRC"),
    ("dst_is_file", "not a folder"),
    ("dst_parent_is_file", "notes.txt"),
    ("part_size_zero", "--part-size-mb must be >= 1, got 0"),
    ("part_size_negative", "--part-size-mb must be >= 1, got -5"),
    ("export_to_jax", "turbojax export already; convert it back with to-torch"),
    ("diffusers_to_torch", "not a turbojax export; convert it with to-jax"),
    ("export_meta_damaged", r"turbojax.json: corrupt metadata \(no 'parts'\)"),
    ("config_is_folder", "config.json"),
    ("config_not_utf8", "config.json: not UTF-8"),
    ("weights_folder_only", "no .safetensors file"),
    ("pipeline_without_models", "no component folder holds a model"),
])
def test_cli_mistakes_give_one_error_line(tmp_path, capsys, case, match):
    src = tmp_path / "work" / "src"
    make_component(src)
    cmd, dst, extra = "to-jax", tmp_path / "work" / "jax", []
    if case == "src_missing":
        src = tmp_path / "absent"
    elif case == "src_is_file":
        src = src / WEIGHTS
    elif case == "dst_is_src":
        dst, extra = src, ["--overwrite"]
    elif case == "dst_inside_src":
        dst = src / "jax"
    elif case == "dst_contains_src":
        dst, extra = tmp_path / "work", ["--overwrite"]
    elif case == "dst_is_file":
        dst = tmp_path / "work" / "notes.txt"
        dst.write_text("notes")
    elif case == "dst_parent_is_file":
        (tmp_path / "work" / "notes.txt").write_text("notes")
        dst = tmp_path / "work" / "notes.txt" / "jax"
    elif case.startswith("part_size"):
        extra = ["--part-size-mb", "0" if case == "part_size_zero" else "-5"]
    elif case == "export_to_jax":
        to_jax(src, tmp_path / "work" / "exp", progress=False)
        src = tmp_path / "work" / "exp"
    elif case == "diffusers_to_torch":
        cmd = "to-torch"
    elif case == "export_meta_damaged":
        to_jax(src, tmp_path / "work" / "exp", progress=False)
        meta = json.loads((tmp_path / "work" / "exp" / "turbojax.json").read_text())
        del meta["parts"]
        (tmp_path / "work" / "exp" / "turbojax.json").write_text(json.dumps(meta))
        cmd, src, dst = "to-torch", tmp_path / "work" / "exp", tmp_path / "work" / "back"
    elif case == "config_is_folder":
        (src / "config.json").unlink()
        (src / "config.json").mkdir()
    elif case == "config_not_utf8":
        (src / "config.json").write_bytes(b'{"_class_name": "\xff"}')
    elif case == "weights_folder_only":
        (src / WEIGHTS).unlink()
        (src / WEIGHTS).mkdir()
    elif case == "pipeline_without_models":
        (src / WEIGHTS).unlink()
        (src / "model_index.json").write_text('{"_class_name": "QwenImagePipeline"}')
    before = tree(tmp_path)
    assert cli([cmd, str(src), str(dst), "--no-progress", *extra]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert re.search(match, line), line
    assert tree(tmp_path) == before, "a mistake must change nothing on disk"
    assert not [p for p in tmp_path.rglob(".*tmp-*")]


# ---------------------------------------------------------------------------------------------------------------
# Config values of the wrong type
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key,value,expected", [
    ("num_layers", "two", "a positive integer"),
    ("num_layers", [2], "a positive integer"),
    ("num_layers", 0, "a positive integer"),
    ("num_attention_heads", -2, "a positive integer"),
    ("num_layers", 2.5, "a positive integer"),
    ("num_layers", True, "a positive integer"),
    ("axes_dims_rope", [4, 12], "a list of 3 positive integers"),
    ("axes_dims_rope", "4,6,6", "a list of 3 positive integers"),
    ("guidance_embeds", "no", "true/false"),
    ("out_channels", "4", "a positive integer or null"),
])
def test_config_value_of_wrong_type_is_named(tmp_path, capsys, key, value, expected):
    src = tmp_path / "src"
    make_component(src)
    cfg = json.loads((src / "config.json").read_text())
    cfg[key] = value
    (src / "config.json").write_text(json.dumps(cfg))
    pattern = f"{re.escape(str(src / 'config.json'))}: key '{key}' is {re.escape(json.dumps(value))} .*expected " \
              f"{re.escape(expected)}"
    with pytest.raises(ConfigError, match=pattern):
        models.from_diffusers(src, progress=False)
    assert cli(["to-jax", str(src), str(tmp_path / "jax"), "--no-progress"]) == 2
    assert re.search(pattern, one_error_line(capsys.readouterr().err))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_inconsistent_config_names_the_file(tmp_path):
    src = tmp_path / "src"
    make_component(src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["axes_dims_rope"] = [4, 6, 8]  # does not sum to attention_head_dim
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=re.escape(str(src / "config.json")) + ".*axes_dims_rope"):
        read_component_config(src)


@pytest.mark.parametrize("key,value", [("num_hidden_layers", "two"), ("hidden_size", 0), ("rms_norm_eps", "small"),
                                       ("attention_bias", "yes")])
def test_text_encoder_config_value_of_wrong_type_is_named(tmp_path, key, value):
    (tmp_path / "te").mkdir()
    raw = {"architectures": ["Qwen3Model"], "model_type": "qwen3", "hidden_size": 32, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": None, "intermediate_size": 64, "num_hidden_layers": 2,
           "vocab_size": 320, key: value}
    (tmp_path / "te" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=f"config.json: key '{key}' is {re.escape(json.dumps(value))}"):
        read_component_config(tmp_path / "te")
    raw[key] = {"num_hidden_layers": 3, "hidden_size": 64, "rms_norm_eps": 1e-5, "attention_bias": True}[key]
    (tmp_path / "te" / "config.json").write_text(json.dumps(raw))
    assert read_component_config(tmp_path / "te")[1].head_dim == raw["hidden_size"] // 4  # null: the default


# ---------------------------------------------------------------------------------------------------------------
# Which weight file a folder means
# ---------------------------------------------------------------------------------------------------------------

def _strays(src: Path, tensors):
    """A LoRA and an fp16 variant (with different values) beside the canonical weights."""
    save_file({"transformer.img_in.lora_A.weight": np.ones((4, 16), np.float32)}, src / "my_lora.safetensors")
    save_file({k: (v * 3).astype(np.float16) for k, v in tensors.items()},
              src / "diffusion_pytorch_model.fp16.safetensors", metadata={"format": "pt"})


def test_stray_safetensors_beside_canonical_weights_are_ignored(tmp_path):
    src = tmp_path / "src"
    tensors = make_component(src)
    canonical = tree(src)
    _strays(src, tensors)
    model = models.from_diffusers(src, progress=False)
    np.testing.assert_array_equal(np.asarray(model.img_in.kernel[...]), tensors["img_in.weight"].T)
    to_jax(src, tmp_path / "jax", progress=False)
    to_torch(tmp_path / "jax", tmp_path / "back", progress=False)
    assert tree(tmp_path / "back") == canonical  # the strays are not part of the model and do not travel along


def test_canonical_index_wins_and_ambiguous_folders_are_refused(tmp_path, capsys):
    src = tmp_path / "src"
    tensors = make_component(src)
    keys = sorted(tensors)
    half = len(keys) // 2
    (src / WEIGHTS).unlink()
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[:half],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_file({k: tensors[k] for k in ks}, src / name, metadata={"format": "pt"})
    (src / (WEIGHTS + ".index.json")).write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    _strays(src, tensors)
    assert choose_weights(src) == (src / (WEIGHTS + ".index.json"), True)
    model = models.from_diffusers(src, progress=False)
    np.testing.assert_array_equal(np.asarray(model.img_in.kernel[...]), tensors["img_in.weight"].T)
    to_jax(src, tmp_path / "jax", progress=False)
    assert not (tmp_path / "jax" / "files").exists()

    # a non-canonical (variant) index does not beat the canonical single file
    one = tmp_path / "one"
    make_component(one)
    (one / "diffusion_pytorch_model.fp16.safetensors.index.json").write_text('{"weight_map": {}}')
    assert choose_weights(one) == (one / WEIGHTS, False)
    # a transformers folder: its own name wins; the diffusers name is just another file there
    assert choose_weights(one, ["model.safetensors"]) == (one / WEIGHTS, False)
    save_file({"a": np.ones(1, np.float32)}, one / "model.safetensors")
    assert choose_weights(one, ["model.safetensors"]) == (one / "model.safetensors", False)
    with pytest.raises(SafetensorsError, match="both"):
        choose_weights(one)

    # nothing canonical and two candidates: refused, naming them
    amb = tmp_path / "amb"
    tensors = make_component(amb)
    os.replace(amb / WEIGHTS, amb / "transformer.safetensors")
    save_file({"x": np.ones(1, np.float32)}, amb / "my_lora.safetensors")
    with pytest.raises(SafetensorsError, match=r"my_lora.safetensors.*transformer.safetensors"):
        models.from_diffusers(amb, progress=False)
    assert cli(["to-jax", str(amb), str(tmp_path / "amb_jax"), "--no-progress"]) == 2
    assert "unclear which is the model" in one_error_line(capsys.readouterr().err)
    # nothing canonical, one candidate: it is the model (e.g. an original single-file checkpoint)
    (amb / "my_lora.safetensors").unlink()
    models.from_diffusers(amb, progress=False)


# ---------------------------------------------------------------------------------------------------------------
# Permissions: what we write follows the umask
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_follow_the_umask(tmp_path, umask):
    pipe = tmp_path / "pipe"
    make_component(pipe / "transformer")
    (pipe / "transformer" / "notes.md").write_text("side file")
    (pipe / "tokenizer").mkdir()
    (pipe / "tokenizer" / "vocab.json").write_text("{}")
    (pipe / "model_index.json").write_text('{"_class_name": "QwenImagePipeline"}')
    for p in [pipe, *pipe.rglob("*")]:  # sources written by tools that use 0o600 / 0o700 (safetensors, mkstemp)
        os.chmod(p, 0o700 if p.is_dir() else 0o600)
    old = os.umask(umask)
    try:
        convert_pipeline(pipe, tmp_path / "jax", "to-jax", progress=False, max_part_bytes=20_000)
        convert_pipeline(tmp_path / "jax", tmp_path / "back", "to-torch", progress=False)
    finally:
        os.umask(old)
    for out in ("jax", "back"):
        root = tmp_path / out
        modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}
        want = {k: (0o777 if (tmp_path / k).is_dir() else 0o666) & ~umask for k in modes}
        assert {k: oct(v) for k, v in modes.items()} == {k: oct(v) for k, v in want.items()}
    assert (tmp_path / "back" / "transformer" / "notes.md").read_text() == "side file"
    assert load_file(tmp_path / "back" / "transformer" / WEIGHTS).keys() == \
        load_file(pipe / "transformer" / WEIGHTS).keys()


# ---------------------------------------------------------------------------------------------------------------
# `import turbojax` then attribute access, as the README does
# ---------------------------------------------------------------------------------------------------------------

LAZY_SCRIPT = r"""
import re, sys
import turbojax
assert "jax" not in sys.modules, "import turbojax must stay cheap"
paths = sys.argv[1:]
for path in paths:
    obj = turbojax
    for part in path.split(".")[1:]:
        obj = getattr(obj, part)
from turbojax import lora, models, pipelines
try:
    turbojax.no_such_module
except AttributeError:
    pass
else:
    raise AssertionError("unknown attributes must raise AttributeError")
print("ok", len(paths))
"""


def test_import_turbojax_gives_lazy_submodules_and_readme_paths_resolve():
    readme = (REPO / "README.md").read_text()
    code = "\n".join(re.findall(r"```python\n(.*?)```", readme, re.S)) + "\n" + \
        " ".join(re.findall(r"`([^`\n]+)`", readme))
    paths = sorted({m.rstrip(".") for m in re.findall(r"\bturbojax(?:\.[A-Za-z_]\w*)+", code)})
    assert "turbojax.models.from_diffusers" in paths and "turbojax.pipelines.from_diffusers" in paths
    modules = ["turbojax.models", "turbojax.pipelines", "turbojax.lora", "turbojax.sampling", "turbojax.schedules",
               "turbojax.text", "turbojax.sharding", "turbojax.convert", "turbojax.convert.to_jax",
               "turbojax.convert.folders", "turbojax.checkpoint"]
    r = subprocess.run([sys.executable, "-c", LAZY_SCRIPT, *modules, *paths], cwd=REPO, capture_output=True,
                       text=True, timeout=300, env={"PATH": "", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["ok", str(len(modules) + len(paths))]
