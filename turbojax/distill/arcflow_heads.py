"""ArcFlow on a model: the policy heads on the final AdaLN output, the method on the engine, the sampler, the
exported folder and its loader (the math is `turbojax.distill.arcflow`; spec: shared docs `distillation.md` §3).

The heads replace the output layer (Qwen-Image `proj_out`, Z-Image `final_linear`) and read the final AdaLN output
(`forward(..., return_hidden=True)`); the per-family details (token layout, output sign, captions) are the trunks of
`turbojax.distill.arcflow_trunks`:

    means     D -> K * C * P   (K velocity means; init: the teacher's output layer copied K times (negated for
                                Z-Image, whose model predicts x0 - eps) + N(0, jitter) bias per (component, channel),
                                so every component starts as the teacher's velocity v = eps - x0; per component in
                                the replaced layer's order: Qwen-Image c * P + p, Z-Image p * C + c)
    logits    D -> K * P       (mixture logits per pixel; init 0: uniform weights)
    log-rates D -> (K - 1) * P (init: weight 0, bias = log of K-1 rates log-spaced in [0.2, 4]: decaying ...
                                accelerating; component 0 has rate 1)

Trainable groups of the engine: `student` (the trunk's LoRA: MLPs and the timestep embedder, attention frozen),
`heads` (means, logits and the final AdaLN: Qwen-Image `norm_out`, Z-Image `final_mod`, trained fully) and `gamma`
(the log-rate head, at its own lower LR).

Exported folder (`export_folder`, read back by `load_student`):

    lora.safetensors    the trunk LoRA, diffusers / PEFT layout (absent when the LoRA is still zero)
    heads.safetensors   torch layout (weight [out, in]) under the reference's names: proj_out_means.*,
                        proj_out_logweights.*, proj_out_loggamma.*, and the final AdaLN (trained fully):
                        norm_out.linear.* (Qwen-Image), all_final_layer.2-1.adaLN_modulation.1.* (Z-Image)
    arcflow.json        method "arcflow", family, num_components K, pixels P, channels C, shift, sigmas (the list
                        it was trained for, final 0), alt_sigmas {"steps": list} (equal raw steps under the shift),
                        pipeline_sigmas (the list unshifted, for pipelines that shift), ...

Pipelines sample a folder with `PipelineSampler` (`turbojax.pipelines.from_diffusers(..., arcflow=DIR)`,
`sample.py --arcflow DIR`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from turbojax.distill import arcflow as A
from turbojax.distill.arcflow_trunks import QwenTrunk, ToyTrunk, ZImageTrunk, trunk_for  # noqa: F401 (re-exported)

F32 = jnp.float32
CONFIG_FILE, HEADS_FILE, LORA_FILE = "arcflow.json", "heads.safetensors", "lora.safetensors"


class ArcFlowFormatError(ValueError):
    pass


# --------------------------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------------------------

def _module(model, path: str):
    node = model
    for p in path.split("."):
        node = getattr(node, p)
    return node


def init_heads(model, trunk, num_components: int, key, *, jitter: float = 0.05,
               gamma_range: tuple[float, float] = (0.2, 4.0)) -> tuple[dict, dict]:
    """(heads, gamma) initialised from the teacher's output layer as in the reference (module docstring)."""
    k, c, p = int(num_components), trunk.channels, trunk.pixels
    if k < 1:
        raise ValueError(f"arcflow.num_components must be >= 1, got {k}")
    proj = _module(model, trunk.proj)
    kernel = np.asarray(proj.kernel[...], np.float32)
    bias = np.asarray(proj.bias[...], np.float32)
    d = kernel.shape[0]
    if kernel.shape[1] != c * p:
        raise ValueError(f"{trunk.proj} has {kernel.shape[1]} outputs, the heads expect {c} x {p}")
    # the model's output times `sign` is the engine's velocity (Z-Image predicts x0 - eps)
    kernel, bias = kernel * trunk.sign, bias * trunk.sign
    noise = np.asarray(jax.random.normal(key, (k, c, 1)), np.float32) * jitter  # one draw per (component, channel)
    if trunk.order == "pc":  # channel-last token features (Z-Image): the same draws, broadcast over pixels
        noise = noise.reshape(k, 1, c)
    means_bias = (np.tile(bias, k).reshape(k, *((c, p) if trunk.order == "cp" else (p, c))) + noise).reshape(-1)
    lo, hi = gamma_range
    rates = np.log(np.logspace(np.log10(lo), np.log10(hi), k - 1)) if k > 1 else np.zeros(0)
    heads = {"means": {"kernel": np.tile(kernel, (1, k)), "bias": means_bias.astype(np.float32)},
             "logits": {"kernel": np.zeros((d, k * p), np.float32), "bias": np.zeros(k * p, np.float32)}}
    full = {}
    for path in trunk.full:
        m = _module(model, path)
        full[path] = {"kernel": np.asarray(m.kernel[...], np.float32), "bias": np.asarray(m.bias[...], np.float32)}
    if full:
        heads["full"] = full
    gamma = {"kernel": np.zeros((d, (k - 1) * p), np.float32),
             "bias": np.repeat(rates, p).astype(np.float32)}  # index g * P + p
    return heads, gamma


def apply_heads(heads, gamma, h, trunk) -> A.Policy:
    """The policy from hidden states `[B, *T, D]`, in token layout `[B, *T, K, C, P]` (see `policy_of`)."""
    c, p = trunk.channels, trunk.pixels
    lead = h.shape[:-1]

    def lin(w, x):
        return jnp.dot(x, w["kernel"].astype(F32)) + w["bias"].astype(F32)

    means = lin(heads["means"], h)
    k = means.shape[-1] // (c * p)
    logits = lin(heads["logits"], h).reshape(*lead, k, 1, p)
    rates = lin(gamma, h).reshape(*lead, k - 1, 1, p)
    rates = jnp.concatenate([jnp.zeros((*lead, 1, 1, p), F32), rates], axis=-3)
    if trunk.order == "pc":
        means = jnp.swapaxes(means.reshape(*lead, k, p, c), -1, -2)
    return A.Policy(means.reshape(*lead, k, c, p), logits, rates)


def policy_of(heads, gamma, model, trunk, x, sigma, cond) -> A.Policy:
    """The policy at `(x, sigma)` in `x`'s own layout (what `turbojax.distill.arcflow` integrates)."""
    return trunk.arrange(apply_heads(heads, gamma, trunk.hidden(model, x, sigma, cond), trunk), x.shape)


def with_full(state: nnx.State, full: Mapping) -> nnx.State:
    """`state` with the fully trained modules' arrays (`{path: {"kernel", "bias"}}`) in place (traceable)."""
    if not full:
        return state
    flat = []
    for path, var in nnx.to_flat_state(state):
        mod, leaf = ".".join(str(x) for x in path[:-1]), str(path[-1])
        if mod in full and leaf in full[mod]:
            var = var.replace(jnp.asarray(full[mod][leaf]).astype(var[...].dtype))
        flat.append((path, var))
    return nnx.from_flat_state(flat)


# --------------------------------------------------------------------------------------------------------------
# The method on the engine
# --------------------------------------------------------------------------------------------------------------

def arcflow_config() -> ml_collections.ConfigDict:
    """The distillation config with ArcFlow's fields (pnotp/ArcFlow configs/qwen/arcqwen_2nfe_k16.py values):

      arcflow.num_components   K (16)
      arcflow.guidance         teacher CFG (4.0); arcflow.cfg_rescale: Qwen pipeline's per-token norm rescale
                               (off: the reference's teacher takes plain CFG [U: not read in its code])
      arcflow.num_states       imitation states per student step (4)
      arcflow.window_substeps / total_substeps   averaging window 3/128 of raw time
      arcflow.decay_iters      teacher share of the trajectory 1 -> 0 over these iterations (1000)
      arcflow.dropout          component dropout of the rollout policy (0.1)
      arcflow.loss_scale       MSE scale (30); arcflow.segment_weights: per step ((): raw segment lengths)
      arcflow.mean_jitter      N(0, .) on the copied means' bias (0.05); arcflow.gamma_init: rate range [0.2, 4]
      opt.student / heads / gamma   LRs of the trunk LoRA, the heads + norm_out, the log-rate head (x0.1)
    """
    from turbojax.distill.config import dmd2_config
    c = dmd2_config()
    c.method = "arcflow"
    c.workdir = "out/arcflow"
    for k in ("fake", "dmd", "ttur_ratio"):
        del c[k]
    del c.lora["fake"]
    del c.opt["fake"], c.opt["disc"]
    c.gan = ml_collections.ConfigDict(dict(weight=0.0, real_mix=0.0))  # read by the data code: ArcFlow has no GAN
    c.lora.student.targets = [r"transformer_blocks\.(img|txt)_mlp\.fc[12]", r"time_linear_[12]"]
    c.lora.student.rank, c.lora.student.alpha = 256, 256.0
    c.student.shift = 3.2
    c.student.sigmas = (1.0, round(float(A.shift_sigma(0.5, 3.2)), 7))  # equal raw steps [1, 0.5] under shift 3.2
    c.arcflow = ml_collections.ConfigDict(dict(
        num_components=16, guidance=4.0, cfg_rescale=False, num_states=4, window_substeps=3, total_substeps=128,
        decay_iters=1000, dropout=0.1, loss_scale=30.0, segment_weights=(), mean_jitter=0.05, gamma_init=(0.2, 4.0)))
    c.opt = ml_collections.ConfigDict(dict(warmup_steps=100, weight_decay=0.0, b1=0.9, b2=0.95, grad_clip=50.0,
                                           schedule="constant", decay_steps=0))
    for g, lr in (("student", 1e-4), ("heads", 1e-4), ("gamma", 1e-5)):
        c.opt[g] = ml_collections.ConfigDict(dict(lr=lr))
    c.ema_decay = 0.999
    return c


def settings_of(cfg) -> A.ArcFlowSettings:
    a = cfg.arcflow
    return A.ArcFlowSettings(
        sigmas=tuple(float(s) for s in cfg.student.sigmas), shift=float(cfg.student.shift),
        guidance=float(a.guidance), cfg_rescale=bool(a.cfg_rescale), num_states=int(a.num_states),
        window_substeps=int(a.window_substeps), total_substeps=int(a.total_substeps),
        decay_iters=int(a.decay_iters), dropout=float(a.dropout), loss_scale=float(a.loss_scale),
        segment_weights=tuple(float(w) for w in a.segment_weights)).check()


def student_fn(nets, trunk):
    """`(trainable, frozen, x, sigma, cond) -> Policy`: trunk + LoRA (unmerged), fully trained modules, heads."""
    def fn(trainable, frozen, x, sigma, cond):
        model = nets.role("student", with_full(frozen, trainable["heads"].get("full", {})), trainable["student"])
        return policy_of(trainable["heads"], trainable["gamma"], model, trunk, x, sigma, cond)
    return fn


def build_method(cfg, base_model, latent_shape, rng, *, cap_len=None):
    """The `Method` for `cfg.method == "arcflow"` (called by `turbojax.distill.methods.build`)."""
    from turbojax.distill import methods as M
    from turbojax.distill.denoiser import denoiser_for
    from turbojax.distill.engine import Turn, make_tx
    from turbojax.distill.nets import Nets
    from turbojax.lora import unmerged

    trunk = trunk_for(base_model, latent_shape, cap_len)
    s = settings_of(cfg)
    graphdef, frozen = nnx.split(base_model)
    k_lora, k_heads = jax.random.split(rng)
    adapter = M._adapter(base_model, cfg.lora.student, k_lora, cfg.init_student_lora)
    roles = {"student": unmerged.make_role(graphdef, frozen, adapter)}
    nets = Nets(base=graphdef, roles=roles, denoiser=denoiser_for(base_model, latent_shape, cap_len),
                latent_shape=tuple(latent_shape))
    a = cfg.arcflow
    heads, gamma = init_heads(base_model, trunk, int(a.num_components), k_heads, jitter=float(a.mean_jitter),
                              gamma_range=tuple(float(g) for g in a.gamma_init))
    params = {"student": unmerged.factors_of(adapter), "heads": heads, "gamma": gamma}

    def teacher_fn(fz, x, sigma, cond):
        return nets.velocity(nets.teacher(fz), x, sigma, cond)

    loss = A.policy_loss(student_fn(nets, trunk), teacher_fn, latent_shape, s)
    groups = ("student", "heads", "gamma")
    turns = [Turn("policy", groups, loss, ema=groups if cfg.ema_decay > 0 else ())]
    txs = {"policy": make_tx({g: M._group_opt(cfg, g) for g in groups}, float(cfg.opt.grad_clip))}
    method = M.Method("arcflow", nets, turns, txs, params, s)
    method.trunk = trunk
    method.export = functools.partial(_export_hook, method)
    method.digits_images = functools.partial(_digits_hook, method)
    return method


def trained(method, state, use_ema: bool = True) -> dict:
    """`{"student", "heads", "gamma"}` of a run's state as host arrays (the EMA when kept)."""
    out = {}
    for g in ("student", "heads", "gamma"):
        src = state["ema"][g] if use_ema and g in state.get("ema", {}) else state["params"][g]
        out[g] = jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(src))
    return out


def student_of(method, base, state, use_ema: bool = True) -> "ArcFlowStudent":
    from turbojax.lora import unmerged
    p = trained(method, state, use_ema)
    adapter = unmerged.adapter_of(method.nets.roles["student"], p["student"])
    return ArcFlowStudent(base, adapter, p["heads"], p["gamma"], method.trunk,
                          sigmas=tuple(method.settings.sigmas) + (0.0,))


# --------------------------------------------------------------------------------------------------------------
# Inference: the student as an object, its sampler, export and loader
# --------------------------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _sample(graphdef, trunk, sigmas, state, heads, gamma, x, cond):
    model = nnx.merge(graphdef, state)
    return A.sample(lambda xx, s: policy_of(heads, gamma, model, trunk, xx, s, cond), x, sigmas)


class ArcFlowStudent:
    """The distilled student: base + merged trunk LoRA + fully trained modules, and the heads.

        student = load_student(folder, base)
        latents = student.sample(noise, {"ctx": emb, "mask": mask})          # the sigma list it was trained for
        latents = student.sample(noise, cond, sigmas=[1.0, 0.9, 0.76, 0.5, 0.0])  # 4 NFE
    """

    def __init__(self, base, adapter, heads, gamma, trunk, *, sigmas, settings: dict | None = None):
        from turbojax import lora
        model = lora.apply(base, [(adapter, 1.0)]) if adapter else base
        self.graphdef, state = nnx.split(model)
        self.state = with_full(state, heads.get("full", {}))
        self.heads, self.gamma, self.trunk = heads, gamma, trunk
        self.sigmas = tuple(float(s) for s in sigmas)
        self.settings = dict(settings or {})
        self.adapter = adapter

    @property
    def num_components(self) -> int:
        return self.heads["logits"]["bias"].shape[0] // self.trunk.pixels

    def policy(self, x, sigma, cond) -> A.Policy:
        model = nnx.merge(self.graphdef, self.state)
        sigma = jnp.broadcast_to(jnp.asarray(sigma, F32).reshape(-1), (x.shape[0],))
        return policy_of(self.heads, self.gamma, model, self.trunk, jnp.asarray(x, F32), sigma, cond)

    def sample(self, x_T, cond, sigmas=None, *, trunk=None):
        """`x_T` in the model's latent layout; `cond` `{"ctx", "mask"}` (Z-Image also `{"caps": [L_i, D] list}`);
        `trunk`: this student's trunk with another patch grid (Qwen-Image at another resolution)."""
        s = self.sigmas if sigmas is None else tuple(float(v) for v in sigmas)
        cond = {k: tuple(jnp.asarray(a) for a in v) if isinstance(v, (list, tuple)) else jnp.asarray(v)
                for k, v in cond.items() if v is not None}
        return _sample(self.graphdef, trunk or self.trunk, s, self.state, self.heads, self.gamma,
                       jnp.asarray(x_T, F32), cond)

    def model(self):
        """The trunk as a module: base + merged LoRA + the fully trained final AdaLN (shares this student's arrays)."""
        return nnx.merge(self.graphdef, self.state)

    def sigma_lists(self) -> dict[int, tuple[float, ...]]:
        """Step count -> sigma list (final 0) this student offers: its own, and `arcflow.json`'s `alt_sigmas`."""
        out = {len(self.sigmas) - 1: self.sigmas}
        for lst in dict(self.settings.get("alt_sigmas") or {}).values():
            lst = tuple(float(v) for v in lst)
            out.setdefault(len(lst) - 1, lst)
        return dict(sorted(out.items()))


def _heads_tensors(heads, gamma, trunk) -> dict:
    out = {}
    for name, w in (("proj_out_means", heads["means"]), ("proj_out_logweights", heads["logits"]),
                    ("proj_out_loggamma", gamma)):
        out[f"{name}.weight"] = np.ascontiguousarray(np.asarray(w["kernel"], np.float32).T)
        out[f"{name}.bias"] = np.asarray(w["bias"], np.float32)
    names = dict(trunk.torch_names)
    for path, w in heads.get("full", {}).items():
        out[f"{names[path]}.weight"] = np.ascontiguousarray(np.asarray(w["kernel"], np.float32).T)
        out[f"{names[path]}.bias"] = np.asarray(w["bias"], np.float32)
    return out


def equal_raw_sigmas(steps: int, shift: float) -> list[float]:
    """`steps` equal raw-time steps under the fixed `shift` (the reference's inference schedule), final 0."""
    return [round(float(A.shift_sigma(1.0 - i / steps, shift)), 7) for i in range(steps)] + [0.0]


def export_folder(folder, student: ArcFlowStudent, base, *, shift: float, extra: dict | None = None) -> list[Path]:
    """Write the student's folder (module docstring); every file atomically. Returns the files written."""
    from safetensors.numpy import save

    from turbojax import lora
    from turbojax.convert.atomic import commit_file
    from turbojax.distill.export import unshift

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    has_lora = bool(student.adapter) and any(np.abs(e["b"]).max() > 0 for e in student.adapter.values())
    if has_lora:
        lora.save(folder / LORA_FILE, student.adapter, base, layout="diffusers")
        files.append(folder / LORA_FILE)
    data = save(_heads_tensors(student.heads, student.gamma, student.trunk), metadata={"format": "arcflow"})
    files.append(commit_file(folder / HEADS_FILE, lambda fh: fh.write(data)))
    t = student.trunk
    n = len(student.sigmas) - 1
    alt = {str(m): equal_raw_sigmas(m, shift) for m in (2, 4) if m != n}
    settings = {"method": "arcflow", "family": t.family, "num_components": student.num_components,
                "pixels": t.pixels, "channels": t.channels, "shift": float(shift), "sigmas": list(student.sigmas),
                "steps": n, "alt_sigmas": alt,
                "pipeline_sigmas": [round(unshift(s, shift), 7) for s in student.sigmas[:-1]],
                "guidance": 1.0, "sampler": "ArcFlow analytic momentum step (one NFE per interval)",
                "lora": LORA_FILE if has_lora else None, "heads": HEADS_FILE,
                "fully_trained": [dict(t.torch_names)[p] for p in student.heads.get("full", {})],
                **(extra or {})}
    text = (json.dumps(settings, indent=2) + "\n").encode()
    files.append(commit_file(folder / CONFIG_FILE, lambda fh: fh.write(text)))
    return files


def load_student(folder, base, *, grid: tuple[int, int] | None = None) -> ArcFlowStudent:
    """An exported folder on its base model. Damaged or mismatched files raise `ArcFlowFormatError` naming them."""
    from safetensors.numpy import load_file

    from turbojax import lora
    folder = Path(folder)
    cfg_path, heads_path = folder / CONFIG_FILE, folder / HEADS_FILE
    for f in (cfg_path, heads_path):
        if not f.is_file():
            raise ArcFlowFormatError(f"{f} not found (an ArcFlow folder holds {CONFIG_FILE}, {HEADS_FILE} and "
                                     f"usually {LORA_FILE})")
    try:
        settings = json.loads(cfg_path.read_text())
        k, sigmas = int(settings["num_components"]), [float(s) for s in settings["sigmas"]]
        if settings.get("method", "arcflow") != "arcflow":
            raise ValueError(f"method is {settings.get('method')!r}")
        for lst in [sigmas] + [list(v) for v in dict(settings.get("alt_sigmas") or {}).values()]:
            A.ArcFlowSettings(sigmas=tuple(float(v) for v in lst if float(v) > 0)).check()
            if float(lst[-1]) != 0.0:
                raise ValueError(f"sigma list {lst} must end in 0")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ArcFlowFormatError(f"{cfg_path}: not an ArcFlow config ({e})") from None
    trunk = trunk_for(base)
    if settings.get("family", trunk.family) != trunk.family:  # folders exported before the key: channels decide
        raise ArcFlowFormatError(f"{cfg_path}: heads for a {settings['family']} model, the base model is "
                                 f"{trunk.family}")
    if grid is not None:
        trunk = dataclasses.replace(trunk, grid=tuple(grid))
    if (settings.get("pixels"), settings.get("channels")) != (trunk.pixels, trunk.channels):
        raise ArcFlowFormatError(f"{cfg_path}: heads for {settings.get('channels')} channels x "
                                 f"{settings.get('pixels')} pixels, the base model has {trunk.channels} x "
                                 f"{trunk.pixels}")
    try:
        t = load_file(str(heads_path))
    except Exception as e:  # noqa: BLE001 (safetensors raises several types for a damaged file)
        raise ArcFlowFormatError(f"{heads_path}: not a safetensors file ({e})") from None

    def lin(name, rows):
        try:
            w, b = np.asarray(t[f"{name}.weight"], np.float32), np.asarray(t[f"{name}.bias"], np.float32)
        except KeyError as e:
            raise ArcFlowFormatError(f"{heads_path}: tensor {e} missing") from None
        if w.shape[0] != rows or b.shape != (rows,):
            raise ArcFlowFormatError(f"{heads_path}: {name} has {w.shape[0]} outputs, K = {k} needs {rows}")
        return {"kernel": np.ascontiguousarray(w.T), "bias": b}

    p, c = trunk.pixels, trunk.channels
    heads = {"means": lin("proj_out_means", k * c * p), "logits": lin("proj_out_logweights", k * p)}
    gamma = lin("proj_out_loggamma", (k - 1) * p)
    names = dict(trunk.torch_names)
    full = {path: lin(names[path], _module(base, path).kernel.shape[1]) for path in trunk.full
            if f"{names[path]}.weight" in t}
    if full:
        heads["full"] = full
    adapter = None
    if settings.get("lora"):
        try:
            adapter = lora.load(folder / settings["lora"], base)
        except (lora.LoraFormatError, OSError) as e:
            raise ArcFlowFormatError(f"{folder / settings['lora']}: {e}") from None
    return ArcFlowStudent(base, adapter, heads, gamma, trunk, sigmas=sigmas, settings=settings)


class PipelineSampler:
    """The sampling loop of a text-to-image pipeline holding an ArcFlow student (`turbojax.pipelines`
    `from_diffusers(..., arcflow=DIR)`): one NFE per interval of a sigma list of the folder (or the caller's), the
    analytic step in between, no CFG (the student imitates the teacher's guided velocity)."""

    def __init__(self, student: ArcFlowStudent, folder=""):
        self.student, self.folder = student, str(folder)

    def schedule(self, steps: int | None, sigmas=None) -> np.ndarray:
        """fp32 sigmas ending in 0: the caller's `sigmas`, else the folder's list of `steps` steps (its own when
        None). Raises ValueError naming the lists the folder has."""
        from turbojax import schedules
        if sigmas is not None and len(sigmas):
            return schedules.explicit_sigmas(sigmas)
        lists = self.student.sigma_lists()
        n = len(self.student.sigmas) - 1 if steps is None else int(steps)
        if n not in lists:
            raise ValueError(f"ArcFlow folder {self.folder}: sigma lists for {sorted(lists)} steps, not {n}; pass "
                             "explicit sigmas for another step count")
        return np.asarray(lists[n], np.float32)

    def denoise(self, pipe, latents, cond, sigmas, *, height: int, width: int):
        """Latents in the pipeline's layout -> fp32 latents in that layout (Z-Image `[B, C, H/8, W/8]` gets a frame
        axis for the trunk)."""
        st = self.student
        sig = tuple(float(v) for v in np.asarray(sigmas, np.float32))
        dt = st.model().dtype
        if pipe.family == "qwen_image":
            embeds, mask = cond
            trunk = dataclasses.replace(st.trunk, grid=(height // 16, width // 16))
            return st.sample(latents, {"ctx": jnp.asarray(embeds, dt), "mask": mask}, sig, trunk=trunk)
        caps = [jnp.asarray(c, dt) for c in cond]
        return st.sample(jnp.asarray(latents, F32)[:, :, None], {"caps": caps}, sig)[:, :, 0]


def _export_hook(method, workdir, state, base, cfg, step):
    student = student_of(method, base, state)
    return export_folder(workdir, student, base, shift=float(cfg.student.shift),
                         extra={"base": str(cfg.init_from or cfg.get("model", "") or cfg.data.kind),
                                "train_steps": int(step)})


def digits_images(student: ArcFlowStudent, labels, seed: int, sigmas=None, *, batch_size: int = 500) -> np.ndarray:
    """uint8 digits `[N, 32, 32, 1]` of an ArcFlow student of the digits teacher (noise of `seed + i`)."""
    from turbojax.digits import data
    from turbojax.digits import model as digits_model
    labels = np.asarray(labels, np.int64).reshape(-1)
    x = digits_model.noise(len(labels), seed)
    emb, mask = digits_model.class_condition(labels)
    out = []
    for lo in range(0, len(labels), batch_size):
        hi = min(lo + batch_size, len(labels))
        out.append(np.asarray(student.sample(x[lo:hi], {"ctx": emb[lo:hi], "mask": mask[lo:hi]}, sigmas)))
    return data.tokens_to_images(np.concatenate(out))


def _digits_hook(method, teacher, state, labels, seed, cfg):
    return digits_images(student_of(method, teacher, state), labels, seed)


def digits_sampler(teacher, folder):
    """`(sample(labels, seed) -> uint8 digits, train_s_per_step or None)` of an exported ArcFlow digits student
    (a `train.py` workdir), for `bench/distill_quality.py` rows."""
    student = load_student(folder, teacher)
    return (lambda labels, seed: digits_images(student, labels, seed)), student.settings.get("train_s_per_step")
