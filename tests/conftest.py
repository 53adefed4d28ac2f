"""Test setup: 8 simulated CPU devices, hermetic Hugging Face, persistent compilation cache in the work tree."""
import gc
import os
from pathlib import Path

# Must happen before JAX initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TURBOJAX_PROGRESS", "0")
# libtpu is installed for the AOT plan tests (TPU topologies are compile-only here); keep the run on CPU so libtpu
# does not probe for TPU workers (and print about it) whenever a test or a CLI subprocess starts JAX.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# a train.py subprocess holds libtpu's lock file; the AOT tests' compile-only TPU client must not be refused for it
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

_CACHE = Path(__file__).resolve().parent.parent / ".jax_cache"
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# The full suite crashed twice (abort, then segfault) inside the cache's executable write
# (compilation_cache.put_executable_and_time) late in the run, after the tests that load libtpu in-process for
# compile-only TPU topologies; each test passes alone. Until the cause is found, the test process itself does not
# write to the persistent cache (TURBOJAX_TEST_CACHE=1 turns it back on).
if os.environ.get("TURBOJAX_TEST_CACHE") != "1":
    jax.config.update("jax_enable_compilation_cache", False)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end checks (still run in CI)")


# Tests that load libtpu into this process (compile-only TPU topologies) run last. This was first meant to stop the
# late segfaults of the suite; they came back with this order and were traced to the memory-mapping limit below. The
# order stays because the full suite was verified with it: it keeps libtpu's compiler stack out of the process for
# every CPU test.
_LIBTPU_TESTS = ("test_plan.py", "test_splash.py::test_tpu_aot", "test_attention.py::test_auto_follows_the_mesh",
                 "test_sharding.py::test_make_mesh")


def pytest_collection_modifyitems(session, config, items):
    def uses_libtpu(item):
        nodeid = item.nodeid.split("/")[-1]
        return any(nodeid.startswith(t) for t in _LIBTPU_TESTS)
    items[:] = [i for i in items if not uses_libtpu(i)] + [i for i in items if uses_libtpu(i)]


# Every compiled XLA:CPU executable keeps its machine code in its own memory mappings (~100-200 per compiled model),
# and JAX's caches keep executables alive for the life of the process. Over the whole suite that passed the kernel's
# per-process limit (vm.max_map_count, 65530 by default): the next mapping failed inside an XLA:CPU compile and the
# run died with a segfault at ~95 %, in whichever test came next. Dropping the caches after each test file releases
# them; a file's own tests still share its compiles.
@pytest.fixture(autouse=True, scope="module")
def _release_compiled_executables():
    yield
    jax.clear_caches()
    gc.collect()
