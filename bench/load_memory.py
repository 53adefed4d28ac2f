"""Per-host memory when loading a converted model onto a mesh with N processes (shard-by-shard loading).

Writes a synthetic Qwen-Image of the real width (3072 inner, 24 heads x 128, text width 3584, 64 latent channels)
with `--layers` blocks and random bf16 weights as a diffusers safetensors folder, converts it with
`turbojax.convert.folders.to_jax` into a turbojax Orbax export (storage chunks of `turbojax.checkpoint.CHUNK_BYTES`)
and, for comparison, into an export in Orbax's default layout (one compressed chunk per leaf, how exports were
written before), then loads each onto one global 8-device mesh (default data=1, fsdp=8, tensor=1) as N loopback
processes (`jax.distributed` on 127.0.0.1, gloo collectives, 8/N simulated CPU devices each). Each process reports
its peak RSS (`resource.getrusage().ru_maxrss`) minus its RSS just before the load (JAX's backend up, Orbax
imported), the peak of its anonymous memory (RssAnon, sampled every 2 ms: the mapped safetensors pages are page
cache, not the process's own) and the bytes of the device buffers it holds. On CPU the "device" buffers are
host memory, so model/N is the floor; the target is model/N plus about one part.

Run:  python bench/load_memory.py [--layers 3] [--procs 1,2,4] [--mesh data=1,fsdp=8,tensor=1] [--dir DIR]
      [--formats safetensors,orbax,orbax_one_chunk] [--mmap-threshold BYTES] [--json OUT]

Measured (2-core AMD EPYC, 23 GiB, beside other jobs): --layers 3 = 1,060,017,216 params, 2,022 MiB bf16; largest
safetensors tensor 108 MiB (one layer's img_mod), largest stacked leaf 324 MiB; Orbax parts of 256 MiB; mesh
(data 1, fsdp 8, tensor 1). Peak RSS minus RSS before the load, MiB, the largest of the N processes (ru_maxrss and
VmHWM agreed within 1 MiB; every process held model/N + 1-3 MiB of replicated leaves in its device buffers):

    glibc's default malloc (as train.py / sample.py run)   N=1 (model 2022)  N=2 (1011)  N=4 (505)
      safetensors folder                                    2146 (+124)       1137 (+126)  611 (+106)
      Orbax export, 16 MiB chunks                           2485 (+463)       1266 (+255)  860 (+355)
      Orbax export, one chunk a leaf (older exports)        2383 (+361)       1408 (+397)  928 (+423)
    MALLOC_MMAP_THRESHOLD_=1 MiB (as the convert CLI sets)
      safetensors folder                                    2082 (+60)        1069 (+58)   563 (+58)
      Orbax export, 16 MiB chunks                           2167 (+145)       1132 (+121)  588 (+83)
      Orbax export, one chunk a leaf                        2303 (+281)       1326 (+315)  847 (+342)

With the default malloc the Orbax figures move by +-100-200 MiB between runs (freed decode buffers stay in the
reader threads' malloc arenas; chunked N=1 gave +651 MiB before `iter_parts` trimmed the heap after each part,
then +583 and +463); the 1 MiB threshold gives steady figures. Against the target (model/N plus one part): the
safetensors path is model/N + about half the largest tensor at every N; chunked Orbax exports stay within one part
(256 MiB) with the threshold; an export with one chunk per leaf costs about one whole stacked leaf (324 MiB here)
on every host whatever N, which for the 20B model's 60-layer leaves would be 4.5 GB: exports are now written in
chunks (`turbojax.checkpoint.CHUNK_BYTES`).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

DEVICES = 8


def model_config(layers: int):
    from turbojax.models.qwen_image import QwenImageConfig
    return QwenImageConfig(num_layers=layers)  # every other field is the published 20B's


def write_folder(folder: Path, layers: int) -> dict:
    """The diffusers folder, one tensor in memory at a time (the streaming writer asks for each in file order)."""
    import ml_dtypes
    import numpy as np

    from turbojax.convert.params import flat_params, model_leaves
    from turbojax.convert.safetensors_io import write_safetensors
    from turbojax.models import abstract_model
    from turbojax.models.registry import config_to_dict, get_family

    fam, cfg = get_family("qwen_image"), model_config(layers)
    model = abstract_model(fam, cfg, scan_layers=False)
    params = flat_params(model)
    specs = []
    for n, leaf in enumerate(model_leaves(model, fam)):
        shape = leaf.torch_shape(tuple(params[leaf.jax_path].shape))
        for key in leaf.torch_keys:
            def produce(shape=shape, seed=n):
                rng = np.random.default_rng(seed)
                return (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
            specs.append((key, shape, "BF16", produce))
    folder.mkdir(parents=True)
    write_safetensors(folder / "diffusion_pytorch_model.safetensors", sorted(specs), {"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config_to_dict(fam, cfg)))
    sizes = [int(np.prod(s)) * 2 for _, s, _, _ in specs]
    stacked = abstract_model(fam, cfg, scan_layers=True)
    return {"model_bytes": sum(sizes), "largest_tensor": max(sizes),
            "largest_leaf": max(int(np.prod(v.shape)) * 2 for v in flat_params(stacked).values())}


def convert(src: Path, dst: Path, part_bytes: int, chunked: bool) -> None:
    from turbojax.convert import folders
    if chunked:
        folders.to_jax(src, dst, progress=False, max_part_bytes=part_bytes)
        return
    real = folders.write_params  # the layout of exports written before chunking: Orbax's default, one chunk a leaf
    folders.write_params = functools.partial(real, chunk_bytes=None)
    try:
        folders.to_jax(src, dst, progress=False, max_part_bytes=part_bytes)
    finally:
        folders.write_params = real


def worker(path: str, pid: int, nproc: int, port: int, mesh_sizes: dict) -> None:
    import resource
    import threading

    import jax
    import jax.numpy as jnp

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if nproc > 1:
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
    import orbax.checkpoint  # noqa: F401  (imported before the baseline: its import is not loading)

    from turbojax.models import from_diffusers
    from turbojax.sharding import make_mesh

    def status(field):
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field)) * 1024

    mesh = make_mesh(**mesh_sizes)
    assert len(mesh.devices.flat) == DEVICES and len(jax.local_devices()) == DEVICES // nproc
    jnp.zeros(1).block_until_ready()  # backend up before the baseline
    # Linux carries ru_maxrss over fork and exec (the launcher stays small: the model is written in another
    # subprocess); VmHWM is the same high-water mark for this address space alone, reset here to the current RSS
    # (clear_refs 5) so that it covers the load only.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss0, anon0 = status("VmRSS"), status("RssAnon")
    peak_anon = [anon0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], status("RssAnon"))
            time.sleep(0.002)

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    model = from_diffusers(path, dtype=jnp.bfloat16, mesh=mesh, progress=False)
    from turbojax.convert.params import flat_params
    arrays = [v[...] for v in flat_params(model).values()]
    jax.block_until_ready(arrays)
    seconds = time.perf_counter() - t0
    done.set()
    peak_anon[0] = max(peak_anon[0], status("RssAnon"))
    held = sum(s.data.nbytes for a in arrays for s in a.addressable_shards)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"pid": pid, "peak_rss_extra": status("VmHWM") - rss0,
                      "ru_maxrss_extra": maxrss - rss0,
                      "peak_anon_extra": peak_anon[0] - anon0, "held": held, "seconds": seconds}), flush=True)
    if nproc > 1:
        jax.distributed.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(path: Path, nproc: int, mesh: str, mmap_threshold: int) -> list[dict]:
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TURBOJAX_PROGRESS": "0",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES // nproc}"}
    if mmap_threshold:  # buffers above it are mapped and go back to the OS when freed (what the convert CLI sets)
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    procs = [subprocess.Popen([sys.executable, __file__, "_worker", str(path), str(i), str(nproc), str(port), mesh],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(nproc)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=1800)
        if p.returncode:
            raise SystemExit(f"error: worker failed ({p.returncode}):\n{stderr[-3000:]}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def parse_mesh(text: str) -> dict:
    try:
        sizes = {k: int(v) for k, v in (kv.split("=") for kv in text.split(","))}
    except ValueError:
        raise SystemExit(f"error: --mesh {text!r}: expected data=D,fsdp=F,tensor=T") from None
    if set(sizes) != {"data", "fsdp", "tensor"}:
        raise SystemExit(f"error: --mesh {text!r}: name data, fsdp and tensor")
    return sizes


def main(argv=None) -> None:
    if argv is None and sys.argv[1:2] == ["_worker"]:
        path, pid, nproc, port, mesh = sys.argv[2:7]
        return worker(path, int(pid), int(nproc), int(port), parse_mesh(mesh))
    if argv is None and sys.argv[1:2] == ["_make"]:
        root, layers, part_bytes = Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
        info = write_folder(root / "safetensors", layers)
        convert(root / "safetensors", root / "orbax", part_bytes, chunked=True)
        convert(root / "safetensors", root / "orbax_one_chunk", part_bytes, chunked=False)
        (root / "made.json").write_text(json.dumps({**info, "layers": layers, "part_bytes": part_bytes}))
        return None
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--procs", default="1,2,4", help="process counts, each dividing 8")
    ap.add_argument("--mesh", default="data=1,fsdp=8,tensor=1")
    ap.add_argument("--formats", default="safetensors,orbax,orbax_one_chunk")
    ap.add_argument("--part-mib", type=int, default=256, help="Orbax export part size")
    ap.add_argument("--dir", type=Path, help="work folder, kept (a folder of an earlier run is loaded again); "
                    "default: a temp folder, removed")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--mmap-threshold", type=int, default=0,
                    help="MALLOC_MMAP_THRESHOLD_ for the loading processes (0: glibc's default, as train.py runs)")
    args = ap.parse_args(argv)
    procs = [int(n) for n in args.procs.split(",")]
    if any(n < 1 or DEVICES % n for n in procs):
        raise SystemExit(f"error: --procs {args.procs}: each count must divide {DEVICES}")
    parse_mesh(args.mesh)
    if not set(args.formats.split(",")) <= {"safetensors", "orbax", "orbax_one_chunk"}:
        raise SystemExit(f"error: --formats {args.formats}: choose from safetensors, orbax, orbax_one_chunk")
    tmp = None if args.dir else tempfile.TemporaryDirectory(prefix="load_memory_")
    root = args.dir or Path(tmp.name)
    t0 = time.perf_counter()
    if (root / "made.json").is_file():  # a --dir of an earlier run: its model is loaded again
        info = json.loads((root / "made.json").read_text())
        if (info["layers"], info["part_bytes"]) != (args.layers, args.part_mib << 20):
            raise SystemExit(f"error: --dir {root} holds a model of {info['layers']} layers and "
                             f"{info['part_bytes'] >> 20} MiB parts; pass those or another folder")
    elif args.dir and args.dir.exists() and any(args.dir.iterdir()):
        raise SystemExit(f"error: --dir {args.dir} is not empty and holds no made.json of this benchmark")
    else:
        # written in a subprocess: the workers inherit this process's ru_maxrss, which must stay below their own
        made = subprocess.run([sys.executable, __file__, "_make", str(root), str(args.layers),
                               str(args.part_mib << 20)], capture_output=True, text=True)
        if made.returncode:
            raise SystemExit(f"error: writing the synthetic model failed:\n{made.stderr[-3000:]}")
        info = json.loads((root / "made.json").read_text())
    print(f"model {info['model_bytes'] / 2**20:.0f} MiB ({args.layers} layers), largest tensor "
          f"{info['largest_tensor'] / 2**20:.0f} MiB, largest stacked leaf {info['largest_leaf'] / 2**20:.0f} MiB; "
          f"written in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    mib = 2 ** 20
    print("| format | N | model/N | held | ru_maxrss - RSS before | VmHWM - RSS before | peak anon extra | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for fmt in args.formats.split(","):
        for n in procs:
            res = load(root / fmt, n, args.mesh, args.mmap_threshold)
            worst = {k: max(r[k] for r in res)
                     for k in ("ru_maxrss_extra", "peak_rss_extra", "peak_anon_extra", "held", "seconds")}
            rows.append({"format": fmt, "procs": n, **worst, "per_process": res})
            print(f"| {fmt} | {n} | {info['model_bytes'] / n / mib:.0f} | {worst['held'] / mib:.0f} | "
                  f"{worst['ru_maxrss_extra'] / mib:.0f} | {worst['peak_rss_extra'] / mib:.0f} | "
                  f"{worst['peak_anon_extra'] / mib:.0f} | "
                  f"{worst['seconds']:.1f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({**info, "mesh": args.mesh, "mmap_threshold": args.mmap_threshold,
                                         "rows": rows}, indent=1))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
