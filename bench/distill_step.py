"""Distillation step benchmark: what a DMD2 + GAN generator turn and critic turn cost against their model passes.

On the medium Qwen-Image config (default 4 layers, 8 x 64 heads, 1024 image + 64 text tokens, batch 1, fp32), it
times each jitted turn of the engine (`turbojax.distill`) and each model pass the turn makes, timed alone with the
same shapes and LoRA roles:

  generator turn: student fwd+bwd (w.r.t. its LoRA), teacher cond fwd+bwd (w.r.t. the input: the GAN term's
                  features), teacher uncond fwd (CFG), fake-score fwd, discriminator fwd+bwd (tiny)
  critic turn:    student fwd (the detached sample), fake-score fwd+bwd (w.r.t. its LoRA), teacher fwd on 2B
                  (features of noised fakes and reals), discriminator fwd+bwd

and prints the ratio of each turn to the sum of its passes (target <= 1.15: the engine adds little beyond the model
work), the compile time of each turn with scan on, and the peak host memory of a step against the frozen base's size
(target: one copy of the base), read from XLA's buffer assignment of each compiled step (arguments, temporaries,
outputs: no buffer of the step holds a second copy of the base when temporaries stay well below the base's size
plus the activations). The student's sigma list is one step here (k = 0: no backward-simulation pass), so
the pass list is exact; a 2-step student adds on average half a student forward to each turn.

Run:  python bench/distill_step.py [--layers 4] [--tokens 1024] [--iters 5] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from turbojax import models  # noqa: E402
from turbojax.distill import methods  # noqa: E402
from turbojax.distill.config import dmd2_config  # noqa: E402
from turbojax.distill.engine import Engine  # noqa: E402
from turbojax.models.qwen_image import QwenImageConfig  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--tokens", type=int, default=1024, help="image tokens (a square grid)")
    p.add_argument("--text", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--json")
    return p.parse_args(argv)


def timed(fn, iters):
    jax.block_until_ready(fn())
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return min(ts), statistics.median(ts)


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def main(argv=None) -> int:
    a = parse_args(argv)
    side = int(round(a.tokens ** 0.5))
    mcfg = QwenImageConfig(num_layers=a.layers, attention_head_dim=a.head_dim, num_attention_heads=a.heads,
                           joint_attention_dim=512, in_channels=64, out_channels=16,
                           axes_dims_rope=(a.head_dim // 4, 3 * a.head_dim // 8, 3 * a.head_dim // 8))
    base = models.create(mcfg, seed=0)
    graphdef, frozen = nnx.split(base)
    base_gib = sum(x.nbytes for x in jax.tree.leaves(frozen)) / 2 ** 30
    rss0 = rss_gib()

    cfg = dmd2_config()
    cfg.student.sigmas = (1.0,)
    for role in ("student", "fake"):
        cfg.lora[role].rank, cfg.lora[role].alpha = a.rank, float(a.rank)
    cfg.ttur_ratio, cfg.gan.weight, cfg.gan.hidden = 1, 0.03, 64
    m = methods.build(cfg, base, (side * side, 64), jax.random.key(1))
    eng = Engine(m.turns, m.txs, 0.99)
    state = eng.init_state(m.params)
    rng = np.random.default_rng(0)
    B, L = a.batch, a.text
    batch = {"ctx": jnp.asarray(rng.standard_normal((B, L, 512)), jnp.float32), "mask": jnp.ones((B, L)),
             "neg_ctx": jnp.asarray(rng.standard_normal((B, L, 512)), jnp.float32), "neg_mask": jnp.ones((B, L)),
             "real": jnp.asarray(rng.standard_normal((B, side * side, 64)), jnp.float32)}

    # ---- the turns (compile time with scan on, then steady state) ----
    res = {"config": dict(layers=a.layers, heads=a.heads, head_dim=a.head_dim, tokens=a.tokens, text=a.text,
                          batch=B, rank=a.rank), "base_gib": base_gib, "turns": {}}
    key = jax.random.key(0)
    for turn in m.turns:
        step = eng.steps[turn.name]
        t0 = time.perf_counter()
        compiled = step.lower(state, frozen, batch, key).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        mem = {k: int(getattr(mem, k, 0) or 0) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                                         "alias_size_in_bytes", "temp_size_in_bytes")}
        holder = {"s": state}

        def run(compiled=compiled):
            holder["s"], met = compiled(holder["s"], frozen, batch, key)
            return met
        best, med = timed(run, a.iters)
        state = holder["s"]
        res["turns"][turn.name] = {"compile_s": compile_s, "best_s": best, "median_s": med, "memory": mem}

    # ---- the passes alone ----
    nets, grid = m.nets, m.nets.denoiser.grid
    x = jnp.asarray(rng.standard_normal((B, side * side, 64)), jnp.float32)
    sig = jnp.full((B,), 0.6)
    cond = {"ctx": batch["ctx"], "mask": batch["mask"]}
    p = state["params"]
    taps = nets.taps

    def fwd(role, factors, x, taps=()):
        mdl = nets.teacher(frozen) if role == "teacher" else nets.role(role, frozen, factors)
        return nets.velocity(mdl, x, jnp.full((x.shape[0],), 0.6), {"ctx": jnp.concatenate([cond["ctx"]] * (
            x.shape[0] // B)), "mask": jnp.concatenate([cond["mask"]] * (x.shape[0] // B))}, taps)

    passes = {
        "fwd": jax.jit(lambda f: fwd("student", f, x)),
        "fwd_bwd_lora": jax.jit(jax.grad(lambda f: jnp.sum(fwd("student", f, x) ** 2))),
        "fwd_bwd_input_taps": jax.jit(jax.grad(lambda xx: sum(jnp.sum(t ** 2) for t in fwd("teacher", None, xx,
                                                                                            taps)[1]))),
        "fwd_2b_taps": jax.jit(lambda f: fwd("teacher", None, jnp.concatenate([x, x]), taps)),
    }
    args = {"fwd": p["student"], "fwd_bwd_lora": p["student"], "fwd_bwd_input_taps": x, "fwd_2b_taps": None}
    t_pass = {}
    for name, fn in passes.items():
        t_pass[name] = timed(lambda fn=fn, name=name: fn(args[name]), a.iters)[0]
    disc = nets.discriminator(p["disc"])
    feats = [jnp.zeros((B, side * side, mcfg.inner_dim))] * len(taps)
    d_fn = jax.jit(jax.grad(lambda fs: jnp.sum(disc(fs, grid))))
    t_pass["disc_fwd_bwd"] = timed(lambda: d_fn(feats), a.iters)[0]
    gen_sum = (t_pass["fwd_bwd_lora"] + t_pass["fwd_bwd_input_taps"] + 2 * t_pass["fwd"] + t_pass["disc_fwd_bwd"])
    crit_sum = (t_pass["fwd"] + t_pass["fwd_bwd_lora"] + t_pass["fwd_2b_taps"] + 2 * t_pass["disc_fwd_bwd"])
    res["passes_s"] = t_pass
    for name, s in (("generator", gen_sum), ("critic", crit_sum)):
        r = res["turns"][name]
        r["sum_of_passes_s"] = s
        r["ratio"] = r["best_s"] / s
    res["peak_rss_gib"] = rss_gib()
    res["peak_rss_over_start_gib"] = res["peak_rss_gib"] - rss0
    flags = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in open("/proc/cpuinfo").read()]
    res["host"] = {"cpu_flags": flags, "platform": platform.machine(), "devices": str(jax.devices()[0])}

    print(f"medium Qwen-Image: {a.layers} layers, {a.heads}x{a.head_dim} heads, {a.tokens} image + {a.text} text "
          f"tokens, batch {B}, LoRA rank {a.rank}, fp32; host flags {flags}")
    print("| turn | compile (scan) | step (best) | sum of its passes | ratio (target <= 1.15) |")
    print("|---|---|---|---|---|")
    for name, r in res["turns"].items():
        print(f"| {name} | {r['compile_s']:.1f} s | {r['best_s'] * 1e3:.0f} ms | {r['sum_of_passes_s'] * 1e3:.0f} ms "
              f"| {r['ratio']:.2f} |")
    print("passes alone (ms): " + ", ".join(f"{k} {v * 1e3:.0f}" for k, v in t_pass.items()))
    for name, r in res["turns"].items():
        m = r["memory"]
        print(f"{name}: XLA buffers per step: arguments {m['argument_size_in_bytes'] / 2 ** 30:.3f} GiB (the base is "
              f"{base_gib:.3f} GiB of it), temporaries {m['temp_size_in_bytes'] / 2 ** 30:.3f} GiB "
              f"= {m['temp_size_in_bytes'] / 2 ** 30 / base_gib:.2f}x the base, outputs "
              f"{m['output_size_in_bytes'] / 2 ** 30:.3f} GiB")
    print(f"frozen base {base_gib:.3f} GiB; peak host RSS {res['peak_rss_gib']:.2f} GiB "
          f"({res['peak_rss_over_start_gib']:.2f} GiB over the RSS after building the base)")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
