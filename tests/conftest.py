"""Test configuration: eight CPU devices, so every run exercises sharding.

XLA reads ``XLA_FLAGS`` once, when the backend starts, so this must run
before anything imports JAX.

Compiled programs go to a persistent compilation cache in a fresh temporary
directory, shared by the pytest-xdist workers of one run: many tests build the
same small models, and a program compiled once is then loaded instead of
recompiled. The cache holds XLA executables keyed by their HLO and options, so
it cannot change a result; it only removes repeated compile time.
"""

import atexit
import os
import shutil
import tempfile

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Made by the first process (the xdist controller), inherited by its workers, and
# removed when that process exits.
if "XTX_TEST_JAX_CACHE" not in os.environ:
    os.environ["XTX_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="xtx-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["XTX_TEST_JAX_CACHE"], ignore_errors=True)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", os.environ["XTX_TEST_JAX_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

try:  # the x-transformers oracle: tiny matmuls, one thread per xdist worker
    import torch
except ImportError:  # the oracle is only in the test extra
    torch = None
if torch is not None:
    torch.set_num_threads(1)
