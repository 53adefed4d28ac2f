"""Multi-host runs (`turbojax.distributed`): two train.py processes on the loopback address (4 simulated CPU devices
each, gloo collectives) distil the tiny digits teacher with DMD2 + GAN on the global 8-device mesh, save, resume, and
end with the trainables of one process with 8 devices on the same mesh and seed; process 0 alone writes files.
Also: each host's rows of a global batch, the settings' checks, a second initialize is harmless, and a bad or
unreachable coordinator is one `error:` line (not XLA's abort)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from turbojax import distributed as D
from turbojax.training.errors import UserError

REPO = Path(__file__).resolve().parent.parent
RUN_TIMEOUT = 600  # seconds per train.py run (two processes together): a hang fails the test instead of CI


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, processes: int = 1) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               TURBOJAX_PROGRESS="0")
    if processes > 1:
        # gloo gives the processes 30 s (fixed) to meet at a new collective; on a loaded machine two processes that
        # compile the same step independently can drift further apart. Process 0 compiles and shares each binary
        # instead (the others wait for it, so they start every new step together); without the persistent cache,
        # so no process skips the sharing on a cache hit while another waits for it.
        env.update(JAX_SHARE_BINARY_BETWEEN_HOSTS="true", JAX_ENABLE_COMPILATION_CACHE="false")
    return env


def _dist_flags(port: int, pid: int, n: int = 2, timeout: float = 120) -> list[str]:
    return ["--config.distributed.coordinator_address", f"127.0.0.1:{port}", "--config.distributed.num_processes",
            str(n), "--config.distributed.process_id", str(pid), "--config.distributed.timeout_s", str(timeout)]


# ---------------------------------------------------------------------------------------------------------------
# Cheap checks (no processes joined)
# ---------------------------------------------------------------------------------------------------------------
def test_each_host_reads_its_rows_of_the_single_process_batch():
    from turbojax.data.batches import PromptBatches
    rng = np.random.default_rng(0)
    ctx, mask = rng.standard_normal((7, 3, 2)), np.ones((7, 3))
    reals = {"teacher": (rng.standard_normal((20, 4)), rng.integers(0, 7, 20)),
             "real": (rng.standard_normal((10, 4)), rng.integers(0, 7, 10))}

    def make():
        return PromptBatches(ctx, mask, batch_size=8, seed=3, reals=reals, real_mix=0.5, neg_ctx=ctx[:1])
    whole = make().batch("critic", 5)
    for hosts in (2, 4):
        parts = [make().set_host(h, hosts).batch("critic", 5) for h in range(hosts)]
        for k, v in whole.items():
            assert all(len(p[k]) == 8 // hosts for p in parts)
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), v, err_msg=k)
    assert not np.array_equal(make().set_host(1, 2).batch("critic", 5)["real"], whole["real"][:4])  # can fail
    with pytest.raises(ValueError, match="multiple of the 3 hosts"):
        make().set_host(0, 3)
    # one process: every row is this host's
    from turbojax.sharding import batch_sharding, make_mesh
    assert D.host_rows(batch_sharding(make_mesh(2, 2, 2)), 8) == (0, 1)


def test_settings_are_checked_before_anything_starts():
    from turbojax.training.config import distributed_config
    s = D.settings(distributed_config())
    assert s == D.Settings() and not s.explicit and D.check(s) == s
    ok = D.check(D.settings({"coordinator_address": "10.0.0.2:1234", "num_processes": 4, "process_id": 3,
                             "local_device_ids": "0,1"}))
    assert ok.explicit and ok.local_device_ids == (0, 1)
    bad = {
        (("coordinator_address", "10.0.0.2"),): r"coordinator_address '10.0.0.2' must be HOST:PORT",
        (("coordinator_address", "h:99999"),): "must be HOST:PORT",
        (("coordinator_address", "h:1"), ("num_processes", 2), ("process_id", 2)): r"process_id 2 must be < num_pro",
        (("num_processes", 2),): r"coordinator_address: 2 processes need the coordinator",
        (("num_processes", 0),): r"num_processes must be an integer >= 1, got 0",
        (("process_id", 1),): "need --config.distributed.num_processes > 1",
        (("coordinator_address", "h:1"), ("local_device_ids", (0, 0))): "names a device twice",
        (("timeout_s", 0),): "timeout_s must be a number of seconds > 0",
    }
    for items, pattern in bad.items():
        with pytest.raises(UserError, match=pattern):
            D.check(D.settings(dict(items)))
    assert D.auto_detected({"SLURM_STEP_NUM_TASKS": "4"}) == "SLURM_STEP_NUM_TASKS"
    assert D.auto_detected({"TPU_WORKER_HOSTNAMES": "a,b"}) == "TPU_WORKER_HOSTNAMES"
    assert D.auto_detected({"SLURM_STEP_NUM_TASKS": "1", "TPU_WORKER_HOSTNAMES": "a"}) is None
    assert D.auto_detected({"SLURM_NTASKS": "4"}) is None  # a salloc shell, not an srun task: one process
    assert D.auto_detected({}) is None


def test_a_second_initialize_is_harmless():
    """A single process joins its own coordinator: the first call joins, the second does nothing."""
    port = _free_port()
    code = (f"from turbojax import distributed as D\n"
            f"s = D.Settings(coordinator_address='127.0.0.1:{port}', num_processes=1, timeout_s=30)\n"
            "first, second = D.initialize(s), D.initialize(s)\n"
            "import jax\n"
            "print(first, second, D.initialize(D.Settings()), jax.distributed.is_initialized(), jax.process_count(),"
            " float(jax.numpy.ones(3).sum()))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=_env(2),
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["True", "False", "False", "True", "1", "3.0"], r.stdout


def test_a_bad_or_unreachable_coordinator_is_one_error_line(tmp_path):
    def run(extra, timeout=120):
        r = subprocess.run([sys.executable, str(REPO / "train.py"), "--workdir", str(tmp_path / "w"), *extra],
                           cwd=tmp_path, capture_output=True, text=True, env=_env(4), timeout=timeout)
        assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-3000:]
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: --config.distributed"), lines
        assert not (tmp_path / "w").exists()
        return lines[0]

    assert "must be HOST:PORT" in run(["--config.distributed.coordinator_address", "127.0.0.1",
                                       "--config.distributed.num_processes", "2"])
    # nobody serves the port: process 1 gives up after timeout_s instead of XLA aborting the process
    line = run(_dist_flags(_free_port(), 1, timeout=2))
    assert "no coordinator answered within 2 s" in line, line
    # process 0 serves the coordinator, but the port is taken
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("", 0))
        held.listen()
        line = run(_dist_flags(held.getsockname()[1], 0, timeout=5))
    assert "cannot listen on port" in line, line


# ---------------------------------------------------------------------------------------------------------------
# Two processes = one process on the same global mesh
# ---------------------------------------------------------------------------------------------------------------
def _train_args(teacher, workdir, total):
    return [str(REPO / "train.py"), "--workdir", str(workdir), "--config.init_from", str(teacher),
            "--config.total_steps", str(total), "--config.checkpoint_every", "2", "--config.log_every", "1",
            "--config.sample_every", "0", "--config.batch_size", "8", "--config.ttur_ratio", "2",
            "--config.data.teacher_samples_per_class", "2", "--config.gan.hidden", "8",
            "--config.mesh.data", "2", "--config.mesh.fsdp", "2", "--config.mesh.tensor", "2"]


def _run_two(teacher, workdir, total, tmp_path) -> list[str]:
    """Both processes of a 2-host run (4 devices each); their stdout + stderr."""
    port = _free_port()
    procs = []
    for pid in range(2):
        log = open(tmp_path / f"p{pid}_{total}.log", "w")
        procs.append((subprocess.Popen([sys.executable, *_train_args(teacher, workdir, total),
                                        *_dist_flags(port, pid)], cwd=tmp_path, stdout=log,
                                       stderr=subprocess.STDOUT, env=_env(4, 2)), log))
    try:
        for p, _ in procs:
            p.wait(timeout=RUN_TIMEOUT)
    finally:
        for p, log in procs:
            if p.poll() is None:  # a hang: end both (they are ours) so the test fails instead of blocking
                p.kill()
                p.wait()
            log.close()
    outs = [(tmp_path / f"p{pid}_{total}.log").read_text() for pid in range(2)]
    for (p, _), out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


def _checkpoint(path: Path) -> dict:
    """The stored trainables, optimiser states and EMA of a step folder, as host arrays."""
    import jax
    import orbax.checkpoint as ocp
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as c:
        meta = c.metadata(path / "default")
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), tree)
        restored = c.restore(path / "default", target)
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(restored)[0]}


@pytest.mark.slow
def test_two_processes_train_save_resume_and_equal_one_process(tmp_path):
    from turbojax.digits import model as digits_model
    teacher = digits_model.save_export(digits_model.new_teacher(3), tmp_path / "teacher")
    multi, single = tmp_path / "multi", tmp_path / "single"

    outs = _run_two(teacher, multi, 2, tmp_path)
    assert "mesh data 2 x fsdp 2 x tensor 2; 2 processes" in outs[0]
    assert "teacher:" not in outs[1] and "exported" not in outs[1]  # process 1 prints nothing of its own
    assert (multi / "checkpoints" / "2").is_dir()
    outs = _run_two(teacher, multi, 4, tmp_path)
    assert "resumed from step 2" in outs[0]

    r = subprocess.run([sys.executable, *_train_args(teacher, single, 4)], cwd=tmp_path, capture_output=True,
                       text=True, env=_env(8), timeout=RUN_TIMEOUT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]

    # the same files (written once, by process 0) and the same checkpoints
    def files(root):
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "checkpoints" not in
                      p.parts and "tb" not in p.parts)
    assert files(multi) == files(single) and "lora.safetensors" in files(multi)
    assert sorted(os.listdir(multi / "checkpoints")) == sorted(os.listdir(single / "checkpoints")) == ["2", "4"]
    got, want = _checkpoint(multi / "checkpoints" / "4"), _checkpoint(single / "checkpoints" / "4")
    assert got.keys() == want.keys() and any("['disc']" in k for k in got)  # the GAN heads trained too
    moved = 0
    for k, w in want.items():
        g = got[k]
        assert g.shape == w.shape, k
        # fp32 round-off: gloo's cross-process reductions sum in another order than one process's (each entry
        # within 1e-5 of itself plus its leaf's largest: Adam turns last-bit gradient differences into ~1e-5
        # relative differences of LoRA `b` factors that moved by a few lr-sized steps)
        diff, bound = np.abs(g - w), 1e-5 * (np.abs(w) + np.abs(w).max(initial=0.0)) + 1e-7
        assert (diff <= bound).all(), f"{k}: {(diff > bound).sum()} of {w.size} entries differ, max {diff.max()}"
        moved += int("['params']" in k and not np.array_equal(w, _initial(k, w)))
    assert moved > 0
    # the metrics of every step agree
    m_multi = [json.loads(line) for line in (multi / "metrics.jsonl").read_text().splitlines()]
    m_single = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in m_multi] == [m["step"] for m in m_single] == [1, 2, 3, 4]
    for a, b in zip(m_multi, m_single):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], float) and k not in ("time", "wall"):
                np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=k)
    # the exported student (EMA) is the same LoRA
    from safetensors.numpy import load_file
    la, lb = load_file(str(multi / "lora.safetensors")), load_file(str(single / "lora.safetensors"))
    assert la.keys() == lb.keys()
    for k in la:
        np.testing.assert_allclose(la[k], lb[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_sigterm_on_one_host_stops_both_at_the_same_step(tmp_path):
    """A preemption notice may reach one host only: all processes agree every step, save the same checkpoint
    together and exit 0."""
    import signal
    import time
    from turbojax.digits import model as digits_model
    teacher = digits_model.save_export(digits_model.new_teacher(3), tmp_path / "teacher")
    work, port = tmp_path / "w", _free_port()
    args = _train_args(teacher, work, 10_000) + ["--config.checkpoint_every", "1000"]
    logs = [open(tmp_path / f"p{pid}.log", "w") for pid in range(2)]
    procs = [subprocess.Popen([sys.executable, *args, *_dist_flags(port, pid)], cwd=tmp_path, stdout=logs[pid],
                              stderr=subprocess.STDOUT, env=_env(4, 2)) for pid in range(2)]
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not ((work / "metrics.jsonl").is_file() and (work / "metrics.jsonl").read_text().count("\n") >= 2):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "training did not start"
            time.sleep(1)
        procs[1].send_signal(signal.SIGTERM)  # process 1 only
        for p in procs:
            p.wait(timeout=RUN_TIMEOUT)
    finally:
        for p, log in zip(procs, logs):
            if p.poll() is None:  # a hang: end both (ours) so the test fails instead of blocking
                p.kill()
                p.wait()
            log.close()
    outs = [(tmp_path / f"p{pid}.log").read_text() for pid in range(2)]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "stopped by SIGTERM on another host at step" in outs[0], outs[0][-2000:]
    step = int(outs[0].split("stopped by SIGTERM on another host at step ")[1].split(";")[0])
    assert os.listdir(work / "checkpoints") == [str(step)] and step >= 2
    steps = [json.loads(line)["step"] for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, step + 1))


def _initial(key: str, value: np.ndarray) -> np.ndarray:
    """LoRA `b` factors start at zero: a trained one differs from zeros (the run really moved the trainables)."""
    return np.zeros_like(value) if key.endswith("['b']") else value


# ---------------------------------------------------------------------------------------------------------------
# sample.py
# ---------------------------------------------------------------------------------------------------------------
def test_sample_py_multi_host_flags_are_checked(tmp_path):
    sys.path.insert(0, str(REPO))
    import sample
    from test_sample_cli import stub_pipeline
    stub = stub_pipeline(tmp_path)

    def err(*argv):
        with pytest.raises(SystemExit) as e:
            sample.main([*map(str, argv)])
        msg = str(e.value.code)
        assert msg.startswith("error: ") and "\n" not in msg, msg
        return msg
    common = ("--model", stub, "--prompt", "a cat", "--width", 32, "--height", 32, "--out", tmp_path / "o.png")
    assert "--coordinator-address '127.0.0.1' must be HOST:PORT" in err(*common, "--coordinator-address", "127.0.0.1",
                                                                          "--num-processes", "2")
    assert "--process-id 3 must be < num_processes 2" in err(*common, "--coordinator-address", "h:1",
                                                               "--num-processes", 2, "--process-id", 3)
    assert "--num-processes / --coordinator-address / --distributed-auto need --model" in err("--num-processes", 2)
    assert not (tmp_path / "o.png").exists()


@pytest.mark.slow
def test_sample_py_on_two_processes_writes_the_one_process_images(tmp_path):
    """3 images, batch 1: process 0 samples images 0 and 2, process 1 image 1; process 0 writes them all."""
    from test_pipeline_e2e import qwen_pipeline_torch
    folder = tmp_path / "Qwen-Image-tiny"
    qwen_pipeline_torch().save_pretrained(folder)
    args = [str(REPO / "sample.py"), "--model", str(folder), "--config", "configs/sample_qwen_image_turbo_2step.py",
            "--prompt", "a red cat sitting on a blue chair", "--num-images", "3", "--width", "32", "--height", "32",
            "--dtype", "float32"]
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one.npz")], cwd=REPO, capture_output=True,
                         text=True, env=_env(1), timeout=RUN_TIMEOUT)
    assert one.returncode == 0, one.stderr[-3000:]
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, *args, "--out", str(tmp_path / "two.npz"), "--coordinator-address",
                               f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(pid),
                               "--distributed-timeout", "120"], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=_env(2, 2)) for pid in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=RUN_TIMEOUT)[0])
    finally:
        for p in procs:
            if p.poll() is None:  # a hang: end both (ours) so the test fails instead of blocking
                p.kill()
                p.wait()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "wrote" in outs[0] and "wrote" not in outs[1]
    assert sorted(f.name for f in tmp_path.glob("*.npz")) == ["one.npz", "two.npz"]
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert a["images"].shape == (3, 32, 32, 3) and len(np.unique(a["images"].reshape(3, -1), axis=0)) == 3
    np.testing.assert_array_equal(b["images"], a["images"])
    assert list(b["seeds"]) == list(a["seeds"]) == [0, 1, 2] and list(b["prompts"]) == list(a["prompts"])
