"""`python -m turbojax.plan`: flags, the run over the steps, the printed table and the JSON.

    python -m turbojax.plan --config configs/qwen_image_dmd2_gan.py --topology v5e:4x4 [--num-slices K]
        [--mesh data=1,fsdp=-1,tensor=1] [--remat POLICY] [--resolution 1024] [--batch-per-chip 1]
        [--text-len 256] [--attention xla] [--model PRESET] [--dino PRESET] [--flops layers|raw] [--json OUT]
        [--config.x=y ...]

--mesh      mesh sizes over the topology's chips (one -1 fills; default: all chips on fsdp)
--remat     the block remat policy (none, full, dots, dots_no_batch, nothing_saveable; default: the config's)
--batch-per-chip  samples per data-parallel shard (data x fsdp); the global batch is this x data x fsdp
--text-len  prompt tokens per sample (Qwen-Image: padded text; Z-Image: caption length)
--attention attention_impl of the base (and of the DINO GAN's DINOv2 and VAE decoder): splash (Pallas TPU kernel,
            the default), xla, chunked
--model     base preset (default: the config's `model`, else from the config's file name: qwen_image, z_image_turbo)
--dino      with gan.features dino: the DINOv2 to plan, dinov2-small|base|large|giant or dinov2-with-registers-*
            (default: the config of an existing gan.dino folder, else dinov2-small; see turbojax/plan/dino.py)
--flops     layers: FLOPs corrected for the scan by compiling 1- and 2-layer unrolled copies (2 small extra compiles
            per step); raw: cost_analysis as is (the scanned stack counted once)
--steps     only these steps (comma list of the method's turn names; default: all)
--json      write {"topology", "mesh", "steps": {STEP: {...}}} atomically
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from turbojax.training import UserError
from turbojax.training import config as config_lib

ROOT = Path(__file__).resolve().parents[2]
FLAGS = {"topology": None, "num-slices": "1", "mesh": "data=1,fsdp=-1,tensor=1", "remat": "", "resolution": "1024",
         "batch-per-chip": "1", "text-len": "256", "attention": "splash", "model": "", "dino": "", "flops": "layers",
         "steps": "", "json": ""}


def _int(flags, name: str, minimum: int = 1) -> int:
    try:
        v = int(flags[name])
    except ValueError:
        raise UserError(f"--{name} {flags[name]!r}: not an integer") from None
    if v < minimum:
        raise UserError(f"--{name} {v}: must be >= {minimum}")
    return v


def main(argv: list[str]) -> int:
    import jax
    # compile-only TPU executables cannot be read back from the persistent cache (no client): keep them out of it
    cache = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        return _main(argv)
    finally:
        jax.config.update("jax_enable_compilation_cache", cache)


def _main(argv: list[str]) -> int:
    cfg, flags = config_lib.parse_args(argv, default_config=ROOT / "configs" / "qwen_image_dmd2_gan.py", flags=FLAGS,
                                       search_dirs=[ROOT], prog="python -m turbojax.plan")
    config_lib.validate(cfg)
    if not flags["topology"]:
        raise UserError("--topology: give a TPU topology such as v5e:4x4 or v5p:4x4x4")
    num_slices, resolution = _int(flags, "num-slices"), _int(flags, "resolution")
    batch_per_chip, text_len = _int(flags, "batch-per-chip"), _int(flags, "text-len")
    if flags["flops"] not in ("layers", "raw"):
        raise UserError(f"--flops {flags['flops']!r}: choose layers or raw")
    from turbojax.nn.attention import IMPLEMENTATIONS
    from turbojax.nn.remat import remat_policy
    if flags["attention"] not in IMPLEMENTATIONS or flags["attention"] == "auto":
        raise UserError(f"--attention {flags['attention']!r}: choose one of "
                        f"{', '.join(i for i in IMPLEMENTATIONS if i != 'auto')} (auto would pick the host's)")
    if flags["remat"]:
        try:
            remat_policy(flags["remat"])
        except ValueError as e:
            raise UserError(f"--remat: {e}") from None
        cfg.remat = flags["remat"]
    out = Path(flags["json"]).resolve() if flags["json"] else None
    if out is not None and (out.is_dir() or not out.parent.is_dir()):
        raise UserError(f"--json {flags['json']}: " + ("is a folder" if out.is_dir() else "its folder does not exist"))

    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # compile-only: no metadata server to ask
    # compile-only devices use no chip: another process's libtpu (holding its lock file) must not stop the plan
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import jax
    from turbojax.plan import build as build_lib
    from turbojax.plan import measure
    from turbojax.plan.topology import PlanError, build_mesh, chip_of, parse_mesh, topology_devices
    try:
        sizes = parse_mesh(flags["mesh"])
        devices = topology_devices(flags["topology"], num_slices)
        chip = chip_of(devices)
        mesh = build_mesh(devices, sizes, num_slices)
        preset = build_lib.model_preset(cfg, _config_path(argv), flags["model"])
        kw = dict(resolution=resolution, batch_per_chip=batch_per_chip, text_len=text_len,
                  attention=flags["attention"], dino=flags["dino"])
        setup = build_lib.build(cfg, preset, mesh, **kw)  # eager host work: not under the TPU mesh
    except PlanError as e:
        raise UserError(str(e)) from None
    mesh_desc = {a: int(n) for a, n in mesh.shape.items()}
    nl = getattr(setup.model_config, "num_layers", None) or setup.model_config.n_layers
    print(f"plan: {preset} ({setup.num_params / 1e6:.1f}M frozen, {setup.num_trainable / 1e6:.1f}M trainable), "
          f"method {cfg.method}, {resolution}px, global batch {setup.global_batch}, text {text_len}, remat "
          f"{cfg.remat}, attention {flags['attention']}; {flags['topology']} x{num_slices} ({len(devices)} chips "
          f"{chip.name}, HBM {chip.hbm_bytes / 2**30:.2f} GiB), mesh {mesh_desc}", flush=True)
    d = setup.dino
    if d:
        print(f"DINO GAN on: {d['dino']} ({d['dino_params'] / 1e6:.1f}M frozen, {d['dino_dtype']}, blocks "
              f"{d['dino_layers']} at {d['dino_size'][0]}x{d['dino_size'][1]} px) on images decoded by {d['vae']} "
              f"({d['vae_decoder_params'] / 1e6:.1f}M decoder params, {d['vae_dtype']}, "
              f"{d['image_hw'][0]}x{d['image_hw'][1]} px)", flush=True)

    wanted = [n for n in flags["steps"].split(",") if n]
    unknown = sorted(set(wanted) - {s.name for s in setup.steps})
    if unknown:
        raise UserError(f"--steps {flags['steps']}: no step {unknown[0]!r}; the method has "
                        f"{', '.join(s.name for s in setup.steps)}")
    small = {}
    if flags["flops"] == "layers":  # per-layer FLOPs from unrolled 1- and 2-layer copies (see measure.py)
        from turbojax.nn.blocks import unrolled_scans
        for n in (1, 2):
            # Pallas kernels are invisible to the cost model: FLOPs come from copies with the XLA attention (the
            # same matmuls, counted by the compiler), bytes from copies with the configured attention
            impls = {"flops": "xla", "bytes": kw["attention"]}
            got = {}
            for what, impl in sorted(set(impls.items()), key=lambda x: x[0]):
                if impl in got:
                    continue
                s = build_lib.build(cfg, preset, mesh, num_layers=n, **{**kw, "attention": impl})
                # traced under the mesh (the models' activation constraints see it), block scans unrolled
                with jax.set_mesh(mesh), unrolled_scans():
                    got[impl] = {st.name: measure.cost_only(st) for st in s.steps
                                 if not wanted or st.name in wanted}
            small[n] = {name: (got[impls["flops"]][name][0], got[impls["bytes"]][name][1])
                        for name in got[impls["flops"]]}
    steps = {}
    for step in setup.steps:
        if wanted and step.name not in wanted:
            continue
        print(f"compiling {step.name} ...", flush=True)
        with jax.set_mesh(mesh):
            r = measure.compile_step(step)
        if small:
            (f1, b1), (f2, b2) = small[1][step.name], small[2][step.name]
            r["flops_per_device"] = measure.corrected(f1, f2, nl)
            r["bytes_per_device"] = measure.corrected(b1, b2, nl)
            r["flops_method"] = (f"unrolled 1- and 2-layer compiles, x{nl} layers"
                                 + ("; attention FLOPs from XLA-attention copies" if kw["attention"] != "xla"
                                    else ""))
        elif "flops_raw" in r:
            r["flops_per_device"], r["bytes_per_device"] = r["flops_raw"], r["bytes_accessed_raw"]
            r["flops_method"] = "cost_analysis (scan body counted once)"
        steps[step.name] = measure.summarise(r, chip)
        _print_step(step.name, steps[step.name])
    result = {"topology": flags["topology"], "num_slices": num_slices, "mesh": mesh_desc, "chip": chip.name,
              "model": preset, "method": cfg.method, "resolution": resolution, "global_batch": setup.global_batch,
              "batch_per_chip": batch_per_chip, "text_len": text_len, "remat": cfg.remat,
              "attention": flags["attention"], "num_params": setup.num_params,
              "num_trainable": setup.num_trainable, "gan_features": (cfg.get("gan") or {}).get("features"),
              "dino_gan": setup.dino, "steps": steps,
              "note": "est_step_seconds is a roofline ESTIMATE: max(flops / (0.5 x bf16 peak), bytes / HBM BW)"}
    if out is not None:
        from turbojax.convert.atomic import commit_file
        data = (json.dumps(result, indent=1) + "\n").encode()
        commit_file(out, lambda f: f.write(data))
        print(f"wrote {out}")
    return 0  # not fitting is a result, not a failure: see "fits"


def _config_path(argv: list[str]) -> str:
    path = ""
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
    return path or "qwen_image_dmd2_gan.py"


def _gib(b) -> str:
    return "?" if b is None else f"{b / 2**30:.2f}"


def _print_step(name: str, s: dict) -> None:
    fl = s["flops_per_device"]
    est = s["est_step_seconds"]
    print(f"  {name}: args {_gib(s['argument_bytes'])} + out {_gib(s['output_bytes'])} + temp "
          f"{_gib(s['temp_bytes'])} - alias {_gib(s['alias_bytes'])} = {_gib(s['total_bytes'])} GiB of "
          f"{_gib(s['hbm_bytes'])}: fits {'yes' if s['fits'] else 'NO'}; "
          + (f"{fl:.3e} FLOPs/device, est. {est:.3f} s/step (roofline estimate)" if fl is not None else "FLOPs n/a")
          + (f"\n    compiler: {s['compiler_error']}" if s.get("compiler_error") else ""), flush=True)


def run(argv: list[str] | None = None) -> int:
    from turbojax.training import run_cli
    return run_cli(main, argv if argv is not None else sys.argv[1:])
