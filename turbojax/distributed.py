"""Multi-host runs (jax.distributed): joining the processes, each host's rows of a global batch, host copies.

    settings(cfg_or_mapping) -> Settings                 the `distributed` config group (defaults: one process)
    initialize(settings, *, where="--config.distributed") -> bool
        joins the processes once, before any JAX computation: explicit coordinator / count / id (GPU hosts, the
        loopback test) or `auto` (Cloud TPU / GKE / SLURM / Open MPI detection by jax); also automatic when the
        environment names more than one process (TPU_WORKER_HOSTNAMES, MEGASCALE_*, SLURM_STEP_NUM_TASKS,
        OMPI_COMM_WORLD_SIZE). A second call, or one after jax.distributed.initialize elsewhere, does nothing.
        Bad values raise UserError (one `error:` line naming the setting).
    is_primary() -> bool                                  process 0: the one that logs and writes files
    host_rows(sharding, batch_size) -> (index, count)     this host's rows of a global batch laid out by `sharding`
                                                          are [index * B/count, (index + 1) * B/count)
    global_batch(local, shardings, batch_size) -> dict    global jax.Arrays from this host's rows
    put(tree, shardings) -> tree                          jax.device_put that also places arrays committed to one
                                                          local device (a model loaded on each host) on a mesh
                                                          spanning hosts, from each host's own copy
    host_copy(tree) -> numpy tree                         every process calls it; gathers arrays spread over hosts
    gather_batches(images, batches, batch_size) -> list   sample.py: the batches dealt round-robin over the
                                                          processes, back in batch order on every process

Why the pre-checks in `initialize`: a coordinator that cannot be reached (or a port already taken) makes XLA's
coordination client abort the whole process with a C++ stack trace, which Python cannot catch. So the address is
parsed, resolved and probed first (process 0: the port is free; the others: the coordinator answers a TCP connect
within `timeout_s`), and only then is `jax.distributed.initialize` called.

The CPU backend needs gloo for cross-process collectives (the loopback test); the option only affects CPU clients,
so it is set for every multi-process run before the backend starts.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import time
from typing import Any, Mapping

from turbojax.training.errors import UserError

DEFAULT_PORT = 8482  # jax's default coordinator port (jax/_src/clusters)
# Environment variables that say a multi-process job was launched, and how to read its process count from them.
_AUTO_ENV = (
    ("TPU_WORKER_HOSTNAMES", lambda v: len([h for h in v.split(",") if h.strip()])),  # GKE TPU slices
    ("TPU_PROCESS_ADDRESSES", lambda v: len([h for h in v.split(",") if h.strip()])),
    ("MEGASCALE_NUM_SLICES", int),  # multi-slice TPU: several slices are several processes
    ("SLURM_STEP_NUM_TASKS", int),  # set by srun for its tasks (a bare salloc shell has SLURM_NTASKS only)
    ("OMPI_COMM_WORLD_SIZE", int),
)


@dataclasses.dataclass(frozen=True)
class Settings:
    coordinator_address: str = ""
    num_processes: int = 1
    process_id: int = 0
    local_device_ids: tuple = ()
    auto: bool = False
    timeout_s: float = 300.0

    @property
    def explicit(self) -> bool:
        """Set up by hand: a coordinator address (one process may join alone), or a count of processes."""
        return bool(self.coordinator_address) or self.num_processes > 1


def settings(group: Mapping[str, Any] | None) -> Settings:
    """Settings from a config's `distributed` group (any mapping; missing keys take the defaults)."""
    group = group.to_dict() if hasattr(group, "to_dict") else dict(group or {})
    ids = group.get("local_device_ids", ())
    return Settings(coordinator_address=str(group.get("coordinator_address", "") or ""),
                    num_processes=group.get("num_processes", 1), process_id=group.get("process_id", 0),
                    local_device_ids=tuple(ids) if isinstance(ids, (list, tuple)) else ids,
                    auto=bool(group.get("auto", False)), timeout_s=group.get("timeout_s", 300.0))


def auto_detected(environ: Mapping[str, str] | None = None) -> str | None:
    """The environment variable saying this is one of several processes, or None."""
    env = os.environ if environ is None else environ
    for name, count in _AUTO_ENV:
        try:
            if name in env and count(env[name]) > 1:
                return name
        except ValueError:
            continue
    return None


def _int(value, where: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UserError(f"{where} must be an integer >= {lo}, got {value!r}")
    try:
        v = int(value)
    except ValueError:
        raise UserError(f"{where} must be an integer >= {lo}, got {value!r}") from None
    if v < lo:
        raise UserError(f"{where} must be an integer >= {lo}, got {value!r}")
    return v


def _host_port(address: str, where: str) -> tuple[str, int]:
    host, sep, port = address.strip().rpartition(":")
    host = host.strip("[]")  # [::1]:1234
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"{where}.coordinator_address {address!r} must be HOST:PORT (port 1-65535), e.g. "
                        f"10.0.0.2:{DEFAULT_PORT}")
    return host, int(port)


def check(s: Settings, where: str = "--config.distributed") -> Settings:
    """The settings with their values checked (no JAX, no network)."""
    n = _int(s.num_processes, f"{where}.num_processes", 1)
    pid = _int(s.process_id, f"{where}.process_id", 0)
    if isinstance(s.timeout_s, bool) or not isinstance(s.timeout_s, (int, float)) or not s.timeout_s > 0:
        raise UserError(f"{where}.timeout_s must be a number of seconds > 0, got {s.timeout_s!r}")
    ids = s.local_device_ids
    if isinstance(ids, str):  # `--config.distributed.local_device_ids 0,1` on an empty default
        ids = tuple(x for x in ids.split(",") if x.strip())
    ids = tuple(_int(x, f"{where}.local_device_ids", 0) for x in ids)
    if len(set(ids)) != len(ids):
        raise UserError(f"{where}.local_device_ids {list(ids)} names a device twice")
    out = dataclasses.replace(s, num_processes=n, process_id=pid, local_device_ids=ids,
                              timeout_s=float(s.timeout_s))
    if out.explicit:
        if not out.coordinator_address:
            raise UserError(f"{where}.coordinator_address: {n} processes need the coordinator's HOST:PORT "
                            f"(process 0's address), or set {where}.auto for Cloud TPU / SLURM detection")
        _host_port(out.coordinator_address, where)
        if pid >= n:
            raise UserError(f"{where}.process_id {pid} must be < num_processes {n}")
    elif pid != 0 or ids:
        raise UserError(f"{where}.process_id / local_device_ids need {where}.num_processes > 1 and "
                        f"{where}.coordinator_address")
    return out


def _probe(s: Settings, where: str) -> None:
    """Fail with one line before XLA's client would abort the process (see the module docstring)."""
    host, port = _host_port(s.coordinator_address, where)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"{where}.coordinator_address {s.coordinator_address}: cannot resolve {host} "
                        f"({e.strerror or e})") from None
    if s.process_id == 0:  # this process serves the coordinator: its port must be free here
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("", port))
            except OSError as e:
                raise UserError(f"{where}.coordinator_address {s.coordinator_address}: process 0 serves the "
                                f"coordinator but cannot listen on port {port} ({e.strerror or e})") from None
        return
    deadline = time.monotonic() + s.timeout_s
    family, kind, proto, _, addr = infos[0]
    while True:
        with socket.socket(family, kind, proto) as sock:
            sock.settimeout(min(2.0, s.timeout_s))
            try:
                sock.connect(addr)
                return
            except OSError:
                pass
        if time.monotonic() >= deadline:
            raise UserError(f"{where}.coordinator_address {s.coordinator_address}: no coordinator answered within "
                            f"{s.timeout_s:g} s (is process 0 running with the same address? raise "
                            f"{where}.timeout_s if it starts later)")
        time.sleep(0.2)


def initialize(s: Settings, *, where: str = "--config.distributed") -> bool:
    """Join the processes of a multi-host run (see the module docstring); True when this call joined them."""
    s = check(s, where)  # before importing jax: a bad value is reported at once
    import jax

    detected = auto_detected()
    if not (s.explicit or s.auto or detected):
        return False  # one process: nothing to join
    if jax.distributed.is_initialized():
        return False  # a second call (or the caller joined already) is harmless
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {"initialization_timeout": max(1, int(round(s.timeout_s)))}
    if s.explicit:
        _probe(s, where)
        kwargs.update(coordinator_address=s.coordinator_address, num_processes=s.num_processes,
                      process_id=s.process_id)
        if s.local_device_ids:
            kwargs["local_device_ids"] = list(s.local_device_ids)
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:  # e.g. called after a JAX computation, or no cluster detected
        how = "explicit settings" if s.explicit else (f"auto-detection ({detected})" if detected else
                                                     f"{where}.auto")
        raise UserError(f"{where}: jax.distributed.initialize failed with the {how}: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return True


# sample.py's flags for the Settings fields (its errors name the flags, not config keys)
SAMPLE_FLAGS = {"coordinator_address": "--coordinator-address", "num_processes": "--num-processes",
                "process_id": "--process-id", "local_device_ids": "--local-device-ids",
                "timeout_s": "--distributed-timeout", "auto": "--distributed-auto"}


def initialize_from_flags(s: Settings, flags: Mapping[str, str] = SAMPLE_FLAGS) -> bool:
    """`initialize` for a command line whose flags are `flags[field]`: a UserError names the flag; True when
    several processes run."""
    try:
        initialize(s, where="--distributed")
    except UserError as e:
        msg = str(e)
        for key, flag in flags.items():
            msg = msg.replace(f"--distributed.{key}", flag)
        raise UserError(msg.replace("--distributed:", f"{flags['auto']}:")) from None
    import jax
    return jax.process_count() > 1


def is_primary() -> bool:
    import jax
    return jax.process_index() == 0


# ---------------------------------------------------------------------------------------------------------------
# Batches: each host holds (and reads) only its rows of the global batch
# ---------------------------------------------------------------------------------------------------------------
def host_rows(sharding, batch_size: int) -> tuple[int, int]:
    """(index, count): the rows of a global batch of `batch_size` (leading dim laid out by `sharding`) held by this
    process's devices are [index * B/count, (index + 1) * B/count). One process, or a batch replicated over the
    hosts: (0, 1). Raises ValueError when the hosts' rows are not such equal contiguous blocks."""
    rows = set()
    for idx in sharding.addressable_devices_indices_map((int(batch_size),)).values():
        rows.update(range(int(batch_size))[idx[0]] if idx else range(int(batch_size)))
    lo, hi = min(rows), max(rows) + 1
    n_rows = hi - lo
    if len(rows) != n_rows or batch_size % n_rows or lo % n_rows:
        raise ValueError(f"this host's devices hold rows {sorted(rows)} of the global batch of {batch_size}, not one "
                         f"contiguous block; order the mesh devices host by host along data x fsdp")
    return lo // n_rows, batch_size // n_rows


def global_batch(local: Mapping[str, Any], shardings: Mapping[str, Any], batch_size: int) -> dict:
    """Global arrays from this host's rows: entries with a leading (batch) dim become
    `jax.make_array_from_process_local_data(sharding, rows, (batch_size, ...))`; scalars stay host values (the
    step's replicated in_sharding places them)."""
    import jax
    import numpy as np

    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        if v.ndim == 0:
            out[k] = v
        else:
            out[k] = jax.make_array_from_process_local_data(shardings[k], v, (int(batch_size),) + v.shape[1:])
    return out


def put(tree, shardings):
    """`jax.device_put(tree, shardings)` (`shardings` a prefix tree of `tree`). On several processes, jax refuses to
    move an array committed to one local device onto devices of other hosts; such arrays (every host holds the same
    value, e.g. a model each host loaded) are assembled from each host's copy of its own shards."""
    import jax
    import numpy as np

    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, sharding):
        if isinstance(x, jax.Array) and x.is_fully_addressable and not sharding.is_fully_addressable:
            host = np.asarray(x)
            return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
        return jax.device_put(x, sharding)
    return jax.tree.map(lambda sh, sub: jax.tree.map(lambda x: one(x, sh), sub), shardings, tree)


def host_copy(tree):
    """A numpy copy of every array in `tree` on every process (collective: all processes must call it in the same
    order). Arrays spread over several hosts are gathered; the others are copied locally."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)
    return jax.tree.map(one, tree)


def gather_batches(images: list, batches: list, batch_size: int) -> list:
    """`images[k]` (uint8 [len(batch), H, W, C]) is this process's k-th batch, batch j being sampled by process
    j % process_count; returns every batch's images in batch order, on every process (a collective: all call it).
    Each process pads its images to the same count of full batches for `process_allgather`."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    nproc = jax.process_count()
    per = -(-len(batches) // nproc)
    shape = images[0].shape[1:] if images else (0, 0, 0)
    # a process without a batch (fewer batches than processes) learns the image shape from the others
    shape = tuple(int(x) for x in np.asarray(multihost_utils.process_allgather(np.asarray(shape, np.int32))).max(0))
    local = np.zeros((per * batch_size, *shape), np.uint8)
    for k, im in enumerate(images):
        local[k * batch_size:k * batch_size + len(im)] = im
    everyone = np.asarray(multihost_utils.process_allgather(local))  # [nproc, per * batch_size, H, W, C]
    return [everyone[j % nproc, (j // nproc) * batch_size:(j // nproc) * batch_size + len(idx)]
            for j, idx in enumerate(batches)]
