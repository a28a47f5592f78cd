"""Flax's own normalization tests, run against Flax and against bnjax by substitution.

The test files come from Flax's source distribution on the package index, at the version
installed here (``tests/linen/linen_test.py``, class ``NormalizationTest``, and
``tests/nnx/nn/normalization_test.py``, class ``TestLinenConsistency``). The bnjax column is the
same source with only the module names replaced: ``nn.X`` → ``bnjax.linen.X`` in the linen file,
``linen.X`` → ``bnjax.linen.X`` and ``nnx.X`` → ``bnjax.nnx.X`` in the nnx file, for the seven
normalization layers. So one run shows, case by case, where bnjax still differs from Flax.

Where bnjax differs on purpose, the case is listed in ``DELIBERATE`` with the reason (the README
says the same): the bnjax column then asserts that the case fails *with that reason's error*,
and fails if it starts to pass (the entry is stale) or fails for another reason.

The source distribution is downloaded once per machine (``pip download``, the package index only)
into ``~/.cache/bnjax``; set ``BNJAX_FLAX_TESTS`` to a directory holding ``linen_test.py`` and
``normalization_test.py`` to use local copies instead.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import types
import unittest
from pathlib import Path

import jax
import pytest

FLAX_VERSION = importlib.metadata.version("flax")
SUITES = {  # suite: (file in the source distribution, test class)
    "linen": ("tests/linen/linen_test.py", "NormalizationTest"),
    "nnx": ("tests/nnx/nn/normalization_test.py", "TestLinenConsistency"),
}
LAYERS = "BatchNorm|LayerNorm|RMSNorm|GroupNorm|InstanceNorm|WeightNorm|SpectralNorm"

# (suite, case-name regex) -> (reason, regex the bnjax failure must match)
DELIBERATE: dict[tuple[str, str], tuple[str, str]] = {
    ("linen", r"test_batch_norm_complex\d"): (
        "complex input is refused (the statistics of complex data are not defined the same way by "
        "every library; bnjax asks for an explicit choice)",
        r"must be a floating-point array, got dtype complex",
    ),
    ("linen", r"test_instance_norm2"): (
        "a single element per statistic (channel axes (1, 2, 3) leave no spatial axis) is an error: "
        "the output would be the bias alone, with zero gradient",
        r"single element",
    ),
    ("nnx", r"test_nnx_linen_instancenorm_equivalence\d+"): (
        "a single element per statistic (instance norm of (N, C) data) is an error",
        r"single element",
    ),
    ("linen", r"test_instance_norm3|test_layer_norm4"): (
        "Flax's reference there is a float32 one-liner that is itself off float64 by more than the "
        "tolerance (mean 1e6 for layer norm, 1e4 for instance norm); bnjax is float64-accurate there "
        "(tests/test_flax.py checks both claims)",
        r"Not equal to tolerance",
    ),
    ("nnx", r"test_nnx_linen_(batchnorm|layernorm|rmsnorm|groupnorm)_equivalence\d*[13579]"): (
        "a mask of lower rank than x ((C,) against (N, C)) is refused: the mask needs x's rank, so a "
        "per-example mask cannot be silently broadcast over the features",
        r"mask has shape \(\d+,\), which does not broadcast",
    ),
}


# (suite, case-name regex) -> what is still missing: not deliberate, work not yet done. Such a
# case must still fail (else the entry is stale and this test says so); it is reported as xfail.
PENDING: dict[tuple[str, str], str] = {}


def _test_files() -> Path:
    """The directory holding Flax's two test files, downloading Flax's sdist if needed."""
    local = os.environ.get("BNJAX_FLAX_TESTS")
    if local:
        return Path(local)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bnjax" / f"flax-{FLAX_VERSION}-tests"
    if all((cache / Path(f).name).exists() for f, _ in SUITES.values()):
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*cmd, f"flax=={FLAX_VERSION}", "-d", tmp], check=True, timeout=600)
        (sdist,) = Path(tmp).glob("flax-*.tar.gz")
        out = Path(tmp) / "out"
        out.mkdir()
        with tarfile.open(sdist) as tar:
            for f, _ in SUITES.values():
                member = tar.extractfile(f"flax-{FLAX_VERSION}/{f}")
                assert member is not None, f"flax {FLAX_VERSION}'s sdist has no {f}"
                (out / Path(f).name).write_bytes(member.read())
        try:
            out.rename(cache)  # atomic: a concurrent worker may have won the race
        except OSError:
            pass
    return cache


def _substitute(src: str, suite: str) -> str:
    if suite == "linen":
        src = re.sub(rf"\bnn\.({LAYERS})\b", r"bnjax.linen.\1", src)
    else:
        src = re.sub(rf"\blinen\.({LAYERS})\b", r"bnjax.linen.\1", src)
        src = re.sub(rf"\bnnx\.({LAYERS})\b", r"bnjax.nnx.\1", src)
    return "import bnjax.linen, bnjax.nnx  # substituted\n" + src


def _load(suite: str, impl: str) -> type[unittest.TestCase]:
    path = _test_files() / Path(SUITES[suite][0]).name
    src = path.read_text()
    if impl == "bnjax":
        src = _substitute(src, suite)
    module = types.ModuleType(f"flax_{suite}_suite_{impl}")
    module.__file__ = str(path)
    sys.modules[module.__name__] = module  # dataclasses (linen modules) look their module up there
    exec(compile(src, str(path), "exec"), module.__dict__)
    return getattr(module, SUITES[suite][1])


def _try_load(suite: str, impl: str) -> type[unittest.TestCase] | str:
    # the module-level code of a test file builds layers (parameterized arguments): when that
    # fails, every case of the column fails with the error rather than collection as a whole
    try:
        return _load(suite, impl)
    except Exception as e:  # reported as each case's failure
        return f"loading Flax's {suite} test file failed: {type(e).__name__}: {e}"


_CLASSES = {(suite, impl): _try_load(suite, impl) for suite in SUITES for impl in ("flax", "bnjax")}


def _flax_class(suite: str) -> type[unittest.TestCase]:
    cls = _CLASSES[suite, "flax"]
    assert not isinstance(cls, str), cls  # Flax's own file must load
    return cls


CASES = [(suite, name) for suite in SUITES for name in unittest.TestLoader().getTestCaseNames(_flax_class(suite))]


def _deliberate(suite: str, name: str) -> tuple[str, str] | None:
    hits = [v for (s, pattern), v in DELIBERATE.items() if s == suite and re.fullmatch(pattern, name)]
    assert len(hits) <= 1, f"{suite}:{name} matches several DELIBERATE entries"
    return hits[0] if hits else None


def _run(suite: str, impl: str, name: str) -> str | None:
    """Runs one case; returns None on success, else the traceback text."""
    cls = _CLASSES[suite, impl]
    if isinstance(cls, str):
        return cls
    result = unittest.TestResult()
    with jax.numpy_rank_promotion("allow"):  # Flax's tests assume JAX's default
        cls(name).run(result)
    problems = result.errors + result.failures
    if result.skipped:
        return f"skipped: {result.skipped[0][1]}"
    return "\n".join(text for _, text in problems) if problems else None


@pytest.mark.parametrize("impl", ["flax", "bnjax"])
@pytest.mark.parametrize(("suite", "name"), CASES, ids=[f"{s}:{n}" for s, n in CASES])
def test_flax_normalization_suite(suite, name, impl):
    failure = _run(suite, impl, name)
    pending = [v for (s, p), v in PENDING.items() if s == suite and re.fullmatch(p, name)] if impl == "bnjax" else []
    if pending:
        assert failure is not None, f"{suite}:{name} now passes with bnjax: remove it from PENDING"
        pytest.xfail(f"not yet done: {pending[0]}")
    deliberate = _deliberate(suite, name) if impl == "bnjax" else None
    if deliberate is None:
        assert failure is None, f"{impl} fails Flax's {suite} test {name}:\n{failure}"
        return
    reason, pattern = deliberate
    assert failure is not None, f"{suite}:{name} now passes with bnjax: remove it from DELIBERATE ({reason})"
    assert re.search(pattern, failure), f"{suite}:{name} should fail for '{reason}', but failed with:\n{failure}"


def test_the_suites_were_found():
    # guards the collection: a renamed class or an empty file would otherwise pass vacuously
    counts = {suite: sum(s == suite for s, _ in CASES) for suite in SUITES}
    assert counts["linen"] >= 50 and counts["nnx"] >= 100, counts
    stale = [k for k in (*DELIBERATE, *PENDING) if not any(s == k[0] and re.fullmatch(k[1], n) for s, n in CASES)]
    assert not stale, f"DELIBERATE entries that match no case: {stale}"
