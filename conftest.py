"""Strict test configuration, shared by tests/ and the doctests in bnjax/.

8 forced CPU devices (set before jax is imported) so cross-device tests run anywhere, and rank
promotion raises, so a (C,) vs NCHW broadcast bug cannot pass silently.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
