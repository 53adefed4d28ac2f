"""Trainables-only Orbax checkpoints of one run (async saves every K steps, keep the last N, forced final save).

    class CheckpointMismatchError(UserError)   the stored tree differs from the config's (one line: leaf, shapes)
    class Checkpoints(directory, *, every, keep, hint="")
        latest_step() -> int | None
        should_save(step) -> bool                  step % every == 0 and not saved yet
        save(step, state, *, force=False) -> bool  async save when should_save(step) or force (final step,
                                                   SIGTERM); a step already on disk is never saved twice
        restore_latest(template, shardings=None) -> (state, step)
                                                   (template, 0) when there is no checkpoint; otherwise the stored
                                                   state placed like `template` (arrays or ShapeDtypeStructs with
                                                   shardings) or on `shardings` (a tree matching it), after checking
                                                   every leaf path and shape against it. The mesh may differ from
                                                   the one that saved it: Orbax reads each target shard's slice
        path(step) -> Path                         the folder of a step
        wait()                                     block until async saves are committed
        close()                                    wait, then release Orbax's threads (also a context manager)

`state` is any pytree of arrays (dicts, optax states, scalars). Only what the caller passes is saved: pass the
trainables and their optimizer state, never the frozen base. A save is committed atomically by Orbax (temp folder
renamed into place), so a kill mid-save leaves the previous checkpoint as the latest; stale temp folders are removed
when the manager opens. The caller must check a state is finite before saving it (guards.MetricsBuffer.flush).
"""
from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from turbojax.training.errors import UserError


class CheckpointMismatchError(UserError):
    """The checkpoint in the workdir was written by a run with a different config (shapes or structure)."""


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _leaf_shapes(tree) -> dict[str, tuple]:
    """'a/b/0' -> shape for every array-like leaf. Dict keys, attribute names (namedtuples such as optax states) and
    sequence indices all become plain path parts, so a template and Orbax's metadata of it compare equal."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(_key_name(k) for k in path): tuple(getattr(leaf, "shape", ()) or ()) for path, leaf in leaves}


def _abstract(tree, shardings=None):
    def one(x, sharding=None):
        sharding = sharding if sharding is not None else getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    if shardings is None:
        return jax.tree.map(one, tree)
    return jax.tree.map(one, tree, shardings)


class Checkpoints:
    def __init__(self, directory: str | Path, *, every: int, keep: int, hint: str = ""):
        """`hint` ends the mismatch error (e.g. which config fields shape the trainables)."""
        if int(every) < 1 or int(keep) < 1:
            raise ValueError(f"every ({every}) and keep ({keep}) must be >= 1")
        self.directory = Path(directory).absolute()
        self.every, self.hint = int(every), hint
        if self.directory.exists() and not self.directory.is_dir():
            raise UserError(f"{self.directory} exists and is not a folder; it cannot hold checkpoints")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the checkpoint folder {self.directory}: {e.strerror or e}") from None
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=int(keep), create=True, cleanup_tmp_directories=True,
                                                 enable_async_checkpointing=True),
            item_handlers=ocp.StandardCheckpointHandler())  # lets item_metadata read a checkpoint before any save
        self._latest = self._manager.latest_step()  # cached: should_save runs every step

    def latest_step(self) -> int | None:
        """The newest step on disk or being saved (None: no checkpoint yet)."""
        return self._latest

    def path(self, step: int) -> Path:
        return self.directory / str(int(step))

    def should_save(self, step: int) -> bool:
        return step % self.every == 0 and step != self.latest_step()

    def save(self, step: int, state, *, force: bool = False) -> bool:
        step = int(step)
        if step == self.latest_step() or not (force or self.should_save(step)):
            return False
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self._latest = step
        return True

    def restore_latest(self, template, shardings=None):
        step = self.latest_step()
        if step is None:
            return template, 0
        try:
            stored = _leaf_shapes(self._manager.item_metadata(step).tree)
        except Exception as e:  # unreadable metadata: a damaged or foreign folder
            raise UserError(f"cannot read checkpoint {self.path(step)}: {type(e).__name__}: {e}") from None
        expected = _leaf_shapes(template)
        where = f"checkpoint {self.path(step)}"
        tail = f"; {self.hint}" if self.hint else ""
        by_depth = lambda keys: sorted(keys, key=lambda k: (k.count("/"), k))  # noqa: E731 (trainables before opt)
        missing, extra = by_depth(expected.keys() - stored.keys()), by_depth(stored.keys() - expected.keys())
        if missing or extra:
            parts = []
            if extra:
                parts.append(f"holds {extra[0]}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
            if missing:
                parts.append(f"lacks {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
            raise CheckpointMismatchError(f"{where} {' and '.join(parts)}, which this config does not match; "
                                          f"it was written with a different config{tail}")
        for key in by_depth(expected):
            if tuple(stored[key]) != tuple(expected[key]):
                raise CheckpointMismatchError(
                    f"{where}: {key} has shape {tuple(stored[key])} but this config expects {tuple(expected[key])}; "
                    f"it was written with a different config{tail}")
        try:
            state = self._manager.restore(step, args=ocp.args.StandardRestore(_abstract(template, shardings)))
        except Exception as e:
            raise UserError(f"cannot restore {where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                            ) from None
        return state, step

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()  # waits for pending saves first

    def __enter__(self) -> "Checkpoints":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
