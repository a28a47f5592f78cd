"""Shared test utilities: data, parameters and tolerances."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import jax.numpy as jnp
import numpy as np

import bnjax

# Output tolerance by input dtype: the output is rounded to that dtype.
TOL = {
    jnp.float32: dict(rtol=2e-5, atol=2e-5),
    jnp.bfloat16: dict(rtol=1.6e-2, atol=3e-2),
    jnp.float16: dict(rtol=2e-3, atol=4e-3),
}


def data(shape, dtype=jnp.float32, seed=0, loc=1.5, scale=3.0):
    """Random data rounded to ``dtype``; returns (jax array, the same values as float64 NumPy)."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(shape) * scale + loc, dtype)
    return x, np.asarray(x.astype(jnp.float32), np.float64)


def params(features, seed=1, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    shape = (features,) if isinstance(features, int) else tuple(features)
    return bnjax.NormParams(
        jnp.asarray(rng.uniform(0.5, 1.5, shape), dtype), jnp.asarray(rng.standard_normal(shape), dtype)
    )


def close(actual, expected, dtype=jnp.float32, **kw):
    tol = dict(TOL[dtype])
    tol.update(kw)
    np.testing.assert_allclose(np.asarray(jnp.asarray(actual).astype(jnp.float32), np.float64), expected, **tol)


ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_script(folder: str, name: str):
    """Imports ``<repo>/<folder>/<name>.py`` as module ``name`` (scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses (Flax modules) look their module up while being defined
    spec.loader.exec_module(module)
    return module
