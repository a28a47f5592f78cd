"""Bad input raises at trace time with a message that names the argument and the fix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax

X = jnp.ones((4, 3, 3, 8))
P8, S8 = bnjax.init_params(8), bnjax.init_stats(8)


def bn(**kw):
    args = dict(x=X, params=P8, stats=S8, training=True)
    args.update(kw)
    x, p, s = args.pop("x"), args.pop("params"), args.pop("stats")
    return jax.jit(lambda x: bnjax.batch_norm(x, p, s, **args))(x)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (
            lambda: bn(axis=4),
            ValueError,
            r"axis=4 is out of range for x with 4 dimensions .* axis=1 for channels-first",
        ),
        (lambda: bn(axis=-5), ValueError, r"axis=-5 is out of range"),
        (lambda: bnjax.layer_norm(X, P8, axis=(1, 7)), ValueError, r"axis=\(1, 7\) is out of range"),
        (lambda: bnjax.moments(X, 9), ValueError, r"axis=9 is out of range"),
        (lambda: bn(axis=1), ValueError, r"params.scale has shape \(8,\) but x needs shape \(3,\).*init_params\(3\)"),
        (
            lambda: bn(params=bnjax.init_params(5)),
            ValueError,
            r"params.scale has shape \(5,\) but x needs shape \(8,\)",
        ),
        (lambda: bn(params=bnjax.NormParams(None, jnp.zeros(4))), ValueError, r"params.bias has shape \(4,\)"),
        (
            lambda: bn(stats=bnjax.init_stats(3)),
            ValueError,
            r"stats.mean has shape \(3,\) but x's features have shape \(8,\).*init_stats\(8\)",
        ),
        (
            lambda: bn(stats=bnjax.BatchStats(jnp.zeros(8), jnp.ones(7), jnp.array(0))),
            ValueError,
            r"stats.var has shape \(7,\)",
        ),
        (
            lambda: bn(stats=S8._replace(mean=jnp.zeros(8, jnp.bfloat16))),
            TypeError,
            r"stats.mean has dtype bfloat16: running statistics must be float32",
        ),
        (lambda: bn(stats={"mean": 0}), TypeError, r"stats must be a bnjax.BatchStats"),
        (lambda: bn(params=(1, 2, 3)), TypeError, r"params must be a bnjax.NormParams"),
        (
            lambda: bn(x=jnp.ones((4, 8), jnp.int32)),
            TypeError,
            r"x must be a floating-point array, got dtype int32.*astype",
        ),
        (
            lambda: bnjax.layer_norm(jnp.ones((4, 8), bool), P8),
            TypeError,
            r"x must be a floating-point array, got dtype bool",
        ),
        (lambda: bnjax.moments(np.arange(6), 0), TypeError, r"x must be a floating-point array"),
        (lambda: bn(eps=0.0), ValueError, r"eps must be a finite number > 0, got 0.0"),
        (lambda: bn(eps=-1e-5), ValueError, r"eps must be a finite number > 0"),
        (lambda: bnjax.rms_norm(X, P8, eps=float("nan")), ValueError, r"eps must be a finite number > 0"),
        (lambda: bnjax.normalize(X, 0.0, 1.0, eps=0), ValueError, r"eps must be"),
        (lambda: bn(momentum=1.0), ValueError, r"momentum must be in \[0, 1\), got 1.0.*weight of the OLD"),
        (lambda: bn(momentum=-0.1), ValueError, r"momentum must be in \[0, 1\)"),
        (lambda: bn(momentum=1.5), ValueError, r"momentum must be in \[0, 1\), got 1.5"),
        (
            lambda: bnjax.group_norm(X, P8, num_groups=3),
            ValueError,
            r"num_groups=3 does not divide the 8 channels.*\[1, 2, 4, 8\]",
        ),
        (lambda: bnjax.group_norm(X, P8, num_groups=0), ValueError, r"num_groups must be an int >= 1, got 0"),
        (lambda: bnjax.group_norm(X, P8, num_groups=True), TypeError, r"num_groups must be a Python int .* got True"),
        (lambda: bnjax.group_norm(X, P8, num_groups=2.0), TypeError, r"num_groups must be a Python int"),
        (lambda: bn(eps=None), TypeError, r"eps must be a real number, got None"),
        (lambda: bn(eps="1e-5"), TypeError, r"eps must be a real number, got '1e-5' \(str\)"),
        (lambda: bn(eps=jnp.ones(3)), ValueError, r"eps must be a scalar, got an array of shape \(3,\)"),
        (lambda: bn(eps=1e-40), ValueError, r"eps=1e-40 is below the smallest normal float32 number"),
        (lambda: bn(eps=1e-46), ValueError, r"eps=1e-46 is below the smallest normal float32"),
        (lambda: bnjax.layer_norm(X.astype(jnp.bfloat16), P8, eps=1e-40), ValueError, r"smallest normal float32"),
        (lambda: bn(momentum=np.full(8, 0.9)), ValueError, r"momentum must be a scalar, got an array of shape \(8,\)"),
        (lambda: bn(momentum="0.9"), TypeError, r"momentum must be a real number"),
        (
            lambda: bnjax.layer_norm(X, P8, axis=1.0),
            TypeError,
            r"axis must be an int, a tuple of ints or a slice.*got 1.0",
        ),
        (lambda: bnjax.layer_norm(X, P8, axis=(1.0, 2)), TypeError, r"axis must be an int.*entry 1.0 is not an int"),
        (lambda: bnjax.layer_norm(X, P8, axis=jnp.array([1, 2])), TypeError, r"axis must be an int"),
        (
            lambda: bnjax.layer_norm(X, P8, axis=slice(4, None)),
            ValueError,
            r"axis=slice\(4, None, None\) selects no axis",
        ),
        (lambda: jax.jit(lambda a: bnjax.layer_norm(X, P8, axis=a))(1), TypeError, r"axis must be an int"),
        (
            lambda: bn(stats=bnjax.BatchStats([0.0] * 8, [1.0] * 8, 0)),
            TypeError,
            r"stats.mean must be an array .* got list",
        ),
        (
            lambda: bnjax.cosine_norm_conv(X, jnp.ones((3, 3, 8, 2)), padding="FOO"),
            ValueError,
            r"padding must be 'SAME', 'VALID' or 2 \(low, high\) pairs.*'FOO'",
        ),
        (
            lambda: bnjax.cosine_norm_conv(X, jnp.ones((3, 3, 8, 2)), padding=[(1, 1)]),
            ValueError,
            r"padding must be .* got 1 pair",
        ),
        (
            lambda: bn(mask=jnp.full((4, 1, 1, 1), 0.5)),
            ValueError,
            r"mask must be boolean or hold only 0 and 1, got the values \[0.5\].*no sample weights",
        ),
        (
            lambda: bn(mask=np.array([2, 0, 1, 1])[:, None, None, None]),
            ValueError,
            r"hold only 0 and 1, got the values \[0, 1, 2\]",
        ),
        (
            lambda: jax.jit(lambda m: bnjax.batch_norm(X, P8, S8, training=True, mask=m))(jnp.ones((4, 1, 1, 1))),
            TypeError,
            r"mask has dtype float32 and is traced.*mask > 0",
        ),
        (
            lambda: bnjax.layer_norm(X, P8, mask=jnp.full((4, 1, 1, 1), 0.5)),
            ValueError,
            r"mask must be boolean or hold only 0 and 1",
        ),
        (
            lambda: bnjax.rms_norm(X, P8, mask=jnp.ones((4,), bool)),
            ValueError,
            r"mask has shape \(4,\), which does not broadcast",
        ),
        (
            lambda: bnjax.group_norm(X, P8, num_groups=2, mask=jnp.ones((4, 3, 3, 2), bool)),
            ValueError,
            r"mask has shape \(4, 3, 3, 2\)",
        ),
        (lambda: bnjax.instance_norm(X, P8, mask=jnp.ones((3, 3), bool)), ValueError, r"mask has shape \(3, 3\)"),
        (lambda: bn(x=jnp.ones((1, 8)), mask=jnp.ones((1, 1), bool)), ValueError, r"single element"),
        (
            lambda: bn(mask=jnp.ones((4,), bool)),
            ValueError,
            r"mask has shape \(4,\), which does not broadcast to x's shape .*mask\[:, None\]",
        ),
        (lambda: bn(mask=jnp.ones((4, 3, 2, 1), bool)), ValueError, r"mask has shape \(4, 3, 2, 1\)"),
        (lambda: bnjax.moments(X, 0, mask=jnp.ones((3, 1, 1, 1))), ValueError, r"mask has shape \(3, 1, 1, 1\)"),
        (lambda: bn(x=jnp.ones((1, 8))), ValueError, r"single element"),
        (
            lambda: bnjax.mean_only_batch_norm(jnp.ones((1, 8)), P8, S8, training=True),
            ValueError,
            r"mean_only_batch_norm\(training=True\): each statistic would be taken over a single element",
        ),
        (lambda: bnjax.mean_only_batch_norm(X, P8, S8, training=True, momentum=1.0), ValueError, r"momentum"),
        (
            lambda: bnjax.mean_only_batch_norm(X, bnjax.init_params(3), S8, training=True),
            ValueError,
            r"params.scale has shape \(3,\)",
        ),
        (
            lambda: bn(x=jnp.ones((1, 1, 1, 8))),
            ValueError,
            r"batch_norm\(training=True\): each statistic would be taken over a single element",
        ),
        (
            lambda: bnjax.instance_norm(jnp.ones((4, 8)), P8),
            ValueError,
            r"instance_norm: each statistic would be taken over a single element \(the spatial axes of x \(4, 8\)",
        ),
        (
            lambda: bnjax.layer_norm(jnp.ones((4, 1)), bnjax.init_params(1)),
            ValueError,
            r"layer_norm: each statistic .* single element",
        ),
        (lambda: bnjax.group_norm(jnp.ones((4, 8)), P8, num_groups=8), ValueError, r"single element"),
        (lambda: bnjax.group_norm(X, P8, num_groups=2, axis=0), ValueError, r"axis 0, which is the batch axis"),
        (lambda: bnjax.batch_norm(X, P8, S8, training=jnp.array(True)), TypeError, r"training must be a Python bool"),
        (
            lambda: bnjax.normalize(X, jnp.zeros(3), 1.0),
            ValueError,
            r"mean has shape \(3,\), which does not broadcast against x's shape \(4, 3, 3, 8\)",
        ),
        (lambda: bnjax.normalize(X, 0.0, 1.0, scale=jnp.ones((2, 8))), ValueError, r"scale has shape \(2, 8\)"),
        (
            lambda: bnjax.init_stats(3, dtype=jnp.bfloat16),
            TypeError,
            r"init_stats\(dtype=bfloat16\): running statistics must be float32",
        ),
        (lambda: bnjax.layer_norm(X, P8, axis=(1, 1)), ValueError, r"names the same axis twice"),
        (
            lambda: bn(axis_name="devices"),
            ValueError,
            r"axis_name='devices': the axis 'devices' is not bound here.*jax.pmap.*shard_map.*vmap",
        ),
        (lambda: bnjax.moments(X, 0, axis_name="i"), ValueError, r"axis 'i' is not bound"),
    ],
)
def test_bad_input_message(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_single_element_allowed_in_eval_and_across_devices():
    x = jnp.ones((1, 8))
    y, _ = bnjax.batch_norm(x, P8, S8, training=False)
    assert y.shape == (1, 8)
    # one example per vmapped participant, but eight of them: the global batch is fine
    y, _ = jax.vmap(
        lambda x: bnjax.batch_norm(x, P8, S8, training=True, axis_name="b"), axis_name="b", out_axes=(0, None)
    )(jnp.arange(16.0).reshape(2, 8).repeat(4, 0))
    assert np.isfinite(np.asarray(y)).all()
