"""The networks of a distillation run, all on one frozen base.

`Nets` holds graphdefs only (static structure); the arrays come in as arguments of every jitted step: the frozen base
state, and the trainables `{group: pytree}` (LoRA factors per role, discriminator heads as a pure dict). So the base
exists once in memory whatever the number of roles: teacher = base, student = base + student LoRA, fake score =
base + fake LoRA (and per-step students for Turbo++).

With the DINOv2 discriminator (`gan.features = "dino"`) the frozen argument is a `FrozenArrays`: the base state plus
the frozen DINO and VAE-decoder states; `Nets.base_state` unwraps it, so code that only needs the base is unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
from flax import nnx

from turbojax.lora.unmerged import LoraRole


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FrozenArrays:
    """The frozen arguments of a run whose discriminator has frozen networks of its own (DINO + VAE decoder)."""
    base: Any
    dino: Any
    vae: Any


@dataclasses.dataclass(frozen=True, eq=False)
class Nets:
    base: nnx.GraphDef
    roles: Mapping[str, LoraRole]
    denoiser: Any  # turbojax.distill.denoiser adapter
    latent_shape: tuple[int, ...] = ()  # one sample's latent in the model layout (the noise the student starts from)
    disc: nnx.GraphDef | None = None
    disc_template: Any = None  # abstract nnx.State of the discriminator (to rebuild it from a pure dict)
    taps: tuple[int, ...] = ()
    dino: Any = None  # turbojax.distill.dino_disc.DinoGan when gan.features = "dino" (then taps is empty)

    @staticmethod
    def base_state(frozen):
        return frozen.base if isinstance(frozen, FrozenArrays) else frozen

    def teacher(self, frozen):
        return nnx.merge(self.base, self.base_state(frozen))

    def role(self, name: str, frozen, factors):
        return self.roles[name].model(self.base_state(frozen), factors)

    def discriminator(self, pure: Mapping):
        return nnx.merge(self.disc, jax_tree_replace(self.disc_template, pure))

    def velocity(self, model, x, sigma, cond, taps=()):
        return self.denoiser(model, x, sigma, cond, taps)


def jax_tree_replace(template: nnx.State, pure: Mapping) -> nnx.State:
    """`template` with its leaves replaced by the matching leaves of the pure dict `pure` (traceable)."""
    flat = []
    pure_flat = dict(_flatten(pure))
    for path, var in nnx.to_flat_state(template):
        key = tuple(str(p) for p in path)
        flat.append((path, var.replace(pure_flat[key])))
    return nnx.from_flat_state(flat)


def _flatten(tree, prefix=()):
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _flatten(v, prefix + (str(k),))
    else:
        yield prefix, tree


def disc_pure(state: nnx.State) -> dict:
    """Discriminator state as a pure nested dict with string keys (what optax, Orbax and checkpoints see)."""
    out: dict = {}
    for path, var in nnx.to_flat_state(state):
        node = out
        for p in path[:-1]:
            node = node.setdefault(str(p), {})
        node[str(path[-1])] = var[...]
    return out
