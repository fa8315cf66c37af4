"""Real Flax usage patterns, run against Flax's own classes and dropnorm's, with the same result.

Each test writes a pattern from Flax's documentation or examples (model surgery by class,
``nnx.view``, transforms over stacked layers, ``nn.tabulate``, ...) once, runs it with
``flax.linen`` / ``flax.nnx`` and with ``dropnorm.linen`` / ``dropnorm.nnx``, and checks that
both behave the same: the same output to the stated tolerance, the same error type where Flax
raises. Where Flax's behaviour is itself a defect (NaN statistics for a fully masked feature,
a running mean that loses the imaginary part of a complex mean) the test says so, checks
Flax's defect as it is, and checks ours against a float64 NumPy oracle instead.

Tolerances. dropnorm's variance is the shifted one and Flax's default is
``E[x^2] - E[x]^2``; for inputs with |mean| ~ std ~ 1 both are accurate to a few float32 ulps
and outputs of size <~ 5 agree to ~1e-6, so float32 comparisons use rtol = atol = 1e-5 (the
parity tests' value: a wrong epsilon or momentum moves results by > 1e-4). Dropout masks
differ from Flax's for the same key (documented), so dropout is compared by the keys drawn and
by the zero pattern's rate, or switched off where BatchNorm numbers are compared.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import subprocess
import sys
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dropnorm import linen as dnn
from dropnorm import nnx as dnx

F32_TOL = {"rtol": 1e-5, "atol": 1e-5}
LINEN = {"flax": nn, "dropnorm": dnn}
NNX = {"flax": nnx, "dropnorm": dnx}


def _close(a, b, tol=F32_TOL):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), **tol)


def _data(shape=(8, 4), seed=0, offset=0.5):
    return 1.5 * jax.random.normal(jax.random.key(seed), shape) + offset


class _Block(nnx.Module):
    """Linear -> BatchNorm -> relu -> Dropout, built from ``lib`` (flax.nnx or dropnorm.nnx)."""

    def __init__(self, lib, d=4, *, rngs):
        self.linear = nnx.Linear(d, d, rngs=rngs)
        self.bn = lib.BatchNorm(d, momentum=0.9, rngs=rngs)
        self.dropout = lib.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.dropout(nnx.relu(self.bn(self.linear(x))))


class _LinenBlock(nn.Module):
    """Dense -> BatchNorm -> relu -> Dropout, built from ``lib`` (flax.linen or dropnorm.linen)."""

    lib: object
    train: bool = True
    dropout: bool = True  # dropout on while training

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(4)(x)
        x = self.lib.BatchNorm(use_running_average=not self.train, momentum=0.9)(x)
        return self.lib.Dropout(0.5, deterministic=not (self.train and self.dropout))(nn.relu(x))


def _nnx_pair(d=4, seed=0):
    """The same _Block built with Flax's layers and ours, holding the same state."""
    theirs = _Block(nnx, d, rngs=nnx.Rngs(seed))
    ours = _Block(dnx, d, rngs=nnx.Rngs(seed))
    nnx.update(ours, nnx.state(theirs))
    return theirs, ours


@contextlib.contextmanager
def _flax_complex_warnings():
    """Flax's nnx BatchNorm writes a complex mean into its float32 variable: JAX warns
    (ComplexWarning, FutureWarning), and this project turns warnings into errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --- 1. Complex inputs --------------------------------------------------------------------

def _complex_x(shape=(8, 3)):
    re, im = jax.random.normal(jax.random.key(0), (2, *shape))
    return (re + 0.5 + 1j * (0.7 * im - 1.0)).astype(jnp.complex64)


def _complex_oracle(x, mean_run, var_run, momentum, eps=1e-5):
    """float64: complex batch mean, real variance E|x - mean|^2, and the running averages."""
    xn = np.asarray(x, np.complex128)
    mu = xn.mean(0)
    var = (np.abs(xn - mu) ** 2).mean(0)
    y = (xn - mu) / np.sqrt(var + eps)
    return y, momentum * mean_run + (1 - momentum) * mu, momentum * var_run + (1 - momentum) * var


def test_complex_linen_matches_flax_and_loads_a_float32_checkpoint():
    x, m = _complex_x(), 0.5
    theirs, ours = nn.BatchNorm(momentum=m), dnn.BatchNorm(momentum=m)
    v_flax = theirs.init(jax.random.key(1), x, use_running_average=False)
    v_ours = ours.init(jax.random.key(1), x, use_running_average=False)
    # Flax creates a float32 mean and makes it complex at the first update; ours is complex
    # from the start (one dtype for the life of the variable), the variance real in both.
    assert v_flax["batch_stats"]["mean"].dtype == jnp.float32
    assert v_ours["batch_stats"]["mean"].dtype == jnp.complex64
    assert v_ours["batch_stats"]["var"].dtype == jnp.float32
    y_ref, mean_ref, var_ref = _complex_oracle(x, 0.0, 1.0, m)
    for variables in (v_flax, v_ours):  # Flax's float32 checkpoint loads into ours and runs
        y_t, upd_t = theirs.apply(v_flax, x, use_running_average=False, mutable=["batch_stats"])
        y_o, upd_o = ours.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
        assert y_o.dtype == y_t.dtype == jnp.complex64
        _close(y_o, y_t)
        _close(y_o, y_ref)
        for name in ("mean", "var"):
            assert upd_o["batch_stats"][name].dtype == upd_t["batch_stats"][name].dtype
            _close(upd_o["batch_stats"][name], upd_t["batch_stats"][name])
        _close(upd_o["batch_stats"]["mean"], mean_ref)
        _close(upd_o["batch_stats"]["var"], var_ref)
        # Evaluation with the updated (complex) running mean: the same output as Flax's.
        new = {**v_flax, **upd_t}
        _close(ours.apply(new, x, use_running_average=True),
               theirs.apply(new, x, use_running_average=True))


def test_complex_nnx_keeps_the_whole_mean():
    x, m = _complex_x(), 0.5
    theirs = nnx.BatchNorm(3, momentum=m, rngs=nnx.Rngs(0))
    ours = dnx.BatchNorm(3, momentum=m, rngs=nnx.Rngs(0))
    with _flax_complex_warnings():
        y_t = theirs(x)
    y_o = ours(x)  # no warning (warnings are errors here)
    y_ref, mean_ref, var_ref = _complex_oracle(x, 0.0, 1.0, m)
    # Training output and variance: Flax's.
    assert y_o.dtype == y_t.dtype == jnp.complex64
    _close(y_o, y_t)
    _close(ours.var[...], theirs.var[...])
    _close(ours.var[...], var_ref)
    # Flax's defect: its float32 `mean` keeps only the real part of the complex batch mean.
    assert theirs.mean[...].dtype == jnp.float32
    _close(theirs.mean[...], mean_ref.real)
    # Ours keeps the whole mean, so evaluation subtracts it all.
    assert ours.mean[...].dtype == jnp.complex64
    _close(ours.mean[...], mean_ref)
    ours.eval()
    y_eval = (np.asarray(x, np.complex128) - mean_ref) / np.sqrt(var_ref + 1e-5)
    _close(ours(x), y_eval)
    # The same under nnx.jit, from a fresh (float32) state: the mean turns complex there too.
    jitted = dnx.BatchNorm(3, momentum=m, rngs=nnx.Rngs(0))
    y_j = nnx.jit(lambda mod, x: mod(x))(jitted, x)
    _close(y_j, y_o)
    assert jitted.mean[...].dtype == jnp.complex64
    _close(jitted.mean[...], mean_ref)


# --- 2. nnx.view_info ---------------------------------------------------------------------

@pytest.mark.parametrize("lib", ["flax", "dropnorm"])
def test_view_info_describes_the_layers(lib):
    model = _Block(NNX[lib], rngs=nnx.Rngs(0))
    info = nnx.view_info(model)  # raised KeyError: 'use_running_average' before
    reference = nnx.view_info(_Block(nnx, rngs=nnx.Rngs(0)))
    assert info == reference
    assert "use_running_average: bool | None = None" in info
    assert "deterministic: bool | None = None" in info


# --- 3. Selecting layers by class ---------------------------------------------------------

@pytest.mark.parametrize("lib", ["flax", "dropnorm"])
def test_nnx_layers_selected_by_class(lib):
    model = _Block(NNX[lib], rngs=nnx.Rngs(0))
    assert isinstance(model.bn, nnx.BatchNorm) and isinstance(model.dropout, nnx.Dropout)
    # Flax's own docstring examples: set_attributes and view with a class filter.
    model.set_attributes(nnx.Dropout, deterministic=True)
    assert model.dropout.deterministic is True and model.bn.use_running_average is False
    view = nnx.view(model, only=nnx.BatchNorm, use_running_average=True)
    assert view.bn.use_running_average is True and model.bn.use_running_average is False
    view = nnx.view(model, only=nnx.Dropout, deterministic=False)
    assert view.dropout.deterministic is False
    # Freezing by class (an optax mask built from the module types): the BatchNorm params.
    frozen = {path for path, mod in nnx.iter_modules(model) if isinstance(mod, nnx.BatchNorm)}
    assert frozen == {("bn",)}
    params = nnx.state(model, nnx.Param)
    labels = jax.tree.map_with_path(
        lambda path, _: "frozen" if path[0].key == "bn" else "trained", params)
    assert sorted(set(jax.tree.leaves(labels))) == ["frozen", "trained"]


@pytest.mark.parametrize("lib", ["flax", "dropnorm"])
def test_linen_interceptor_selects_dropout_by_class(lib):
    """``nn.intercept_methods``: switch off every ``nn.Dropout`` by class, a Flax pattern."""
    x = _data()
    model = _LinenBlock(LINEN[lib], train=True)
    variables = model.init(jax.random.key(0), x)
    assert isinstance(dnn.BatchNorm(), nn.BatchNorm) and isinstance(dnn.Dropout(0.1), nn.Dropout)

    def no_dropout(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dropout) and context.method_name == "__call__":
            return args[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(no_dropout):
        y, _ = model.apply(variables, x, rngs={"dropout": jax.random.key(1)},
                           mutable=["batch_stats"])
    # ...equals the same model whose dropout is the identity (a rate of 0).
    class NoDrop(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(4)(x)
            return nn.relu(LINEN[lib].BatchNorm(use_running_average=False, momentum=0.9)(x))

    y_ref, _ = NoDrop().apply(variables, x, mutable=["batch_stats"])
    _close(y, y_ref)


# --- 4. One value per feature in training ---------------------------------------------------

def test_linen_one_example_is_normalised_to_the_bias_like_flax():
    x = _data((1, 3))
    v = nn.BatchNorm().init(jax.random.key(0), x, use_running_average=False)
    v = {**v, "params": {"scale": jnp.full(3, 2.0), "bias": jnp.array([0.5, -1.0, 3.0])}}
    outs = {}
    for name, lib in LINEN.items():
        bn = lib.BatchNorm(use_running_average=False, momentum=0.9)
        v_init = bn.init(jax.random.key(0), x)  # a one-example dummy batch at init
        np.testing.assert_array_equal(v_init["batch_stats"]["mean"], np.zeros(3))
        outs[name] = bn.apply(v, x, mutable=["batch_stats"])
    (y_t, upd_t), (y_o, upd_o) = outs["flax"], outs["dropnorm"]
    _close(y_o, y_t)
    _close(y_o, np.broadcast_to(v["params"]["bias"], (1, 3)))  # mean = the value, var 0
    # Running statistics move towards (value, 0), as Flax's do.
    _close(upd_o["batch_stats"]["mean"], upd_t["batch_stats"]["mean"])
    _close(upd_o["batch_stats"]["var"], upd_t["batch_stats"]["var"])
    _close(upd_o["batch_stats"]["var"], np.full(3, 0.9))


def test_linen_bind_with_a_1d_input_like_flax():
    x = jnp.array([1.0, -2.0, 4.0])  # no batch axis: one value per feature
    outs = []
    for lib in (nn, dnn):
        bn = lib.BatchNorm(use_running_average=False)
        v = bn.init(jax.random.key(0), x)
        bound = bn.bind(v, mutable=["batch_stats"])
        outs.append((bound(x), bound.variables["batch_stats"]["mean"]))
    _close(outs[1][0], outs[0][0])
    _close(outs[1][0], np.zeros(3))  # the bias
    _close(outs[1][1], outs[0][1])


# nnx.tabulate on one example in train mode: test_nnx_display_and_tabulate below.


# --- 5. Legacy raw keys under the rbg generators ---------------------------------------------

@pytest.fixture(params=["rbg", "unsafe_rbg"])
def rbg_impl(request):
    old = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", request.param)
    try:
        yield request.param
    finally:
        jax.config.update("jax_default_prng_impl", old)


def _dropped(y, x):
    y, x = np.asarray(y), np.asarray(x)
    assert np.all((y == 0) | np.isclose(y, 2 * x, rtol=1e-6)), "not inverted dropout at 0.5"
    return float(np.mean(y == 0))


def test_raw_rbg_keys_linen(rbg_impl):
    key = jax.random.PRNGKey(0)  # lm1b's train_step: a raw (4,) key under (unsafe_)rbg
    assert key.shape == (4,) and key.dtype == jnp.uint32
    x = _data((64, 32), offset=3.0)
    for lib in (nn, dnn):
        for kwargs in ({"rngs": {"dropout": key}}, {}):
            args = (x, False) if kwargs else (x, False, jax.random.fold_in(key, 1))
            frac = _dropped(lib.Dropout(0.5).apply({}, *args, **kwargs), x)
            assert 0.4 < frac < 0.6, frac  # 2048 draws: 0.5 +- 4.5 sigma


def test_raw_rbg_keys_nnx(rbg_impl):
    key = jax.random.PRNGKey(0)
    x = _data((64, 32), offset=3.0)
    for lib in (nnx, dnx):
        drop = lib.Dropout(0.5, rngs=nnx.Rngs(dropout=key))
        for y in (drop(x), drop(x, rngs=jax.random.fold_in(key, 1))):
            assert 0.4 < _dropped(y, x) < 0.6


# --- 6. Output dtype with a custom promote_dtype ------------------------------------------------

def _identity_promote(args, /, *, dtype=None, inexact=True):
    return args


@pytest.mark.parametrize("x_dtype,param_dtype,dtype", [
    (jnp.float32, jnp.float16, jnp.float16),  # dtype given: the output has it
    (jnp.float16, jnp.float32, None),  # inferred: result type of x, scale, bias (float32)
])
def test_nnx_output_dtype_with_custom_promote_dtype(x_dtype, param_dtype, dtype):
    x = _data((8, 3)).astype(x_dtype)  # an identity promote_dtype leaves the dtypes mixed
    outs = []
    for lib in (nnx, dnx):
        bn = lib.BatchNorm(3, dtype=dtype, param_dtype=param_dtype,
                           promote_dtype=_identity_promote, rngs=nnx.Rngs(0))
        outs.append(bn(x))
    assert outs[1].dtype == outs[0].dtype == (dtype or jnp.float32)
    # At most one float16 rounding apart (2**-11 relative) for |y| <~ 4: 2e-3.
    _close(outs[1].astype(np.float32), outs[0].astype(np.float32), {"rtol": 2e-3, "atol": 2e-3})


def test_integer_input_like_flax():
    """uint8 pixels straight into a BatchNorm: Flax computes in float32 (linen casts, NNX's
    promote_dtype promotes); so do ours."""
    x = jax.random.randint(jax.random.key(0), (8, 3), 0, 256).astype(jnp.uint8)
    v = nn.BatchNorm().init(jax.random.key(1), x, use_running_average=False)
    outs = [lib.BatchNorm(use_running_average=False).apply(v, x, mutable=["batch_stats"])
            for lib in (nn, dnn)]
    assert outs[1][0].dtype == outs[0][0].dtype == jnp.float32
    jax.tree.map(_close, outs[1], outs[0])
    y_t, y_o = (lib.BatchNorm(3, rngs=nnx.Rngs(0))(x) for lib in (nnx, dnx))
    assert y_o.dtype == y_t.dtype == jnp.float32
    _close(y_o, y_t)


# --- 7. Signatures ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["BatchNorm", "Dropout"])
def test_nnx_signatures_are_written_out(name):
    ours, theirs = getattr(dnx, name), getattr(nnx, name)
    params = inspect.signature(ours).parameters  # was (num_features, *, ..., **kwargs)
    assert not any(p.kind == p.VAR_KEYWORD for p in params.values())
    flax_params = list(inspect.signature(theirs.__init__).parameters)[1:]
    assert list(params)[:len(flax_params)] == flax_params
    first = {"BatchNorm": (3,), "Dropout": (0.5,)}[name]
    for lib in (theirs, ours):  # a typo: the same error, naming the public class
        with pytest.raises(TypeError, match=rf"^{name}\.__init__\(\) got an unexpected keyword"):
            lib(*first, momentun=0.9, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", ["BatchNorm", "Dropout"])
def test_linen_fields_are_flax_fields(name):
    ours, theirs = getattr(dnn, name), getattr(nn, name)
    assert issubclass(ours, theirs)
    flax_params = list(inspect.signature(theirs).parameters)
    assert set(flax_params) <= set(inspect.signature(ours).parameters)
    first = {"BatchNorm": (), "Dropout": (0.5,)}[name]
    for lib in (theirs, ours):
        with pytest.raises(TypeError, match="unexpected keyword argument 'momentun'"):
            lib(*first, momentun=0.9)


# --- 8. Errors in the modules' own terms --------------------------------------------------------

def _linen_bn(**kw):
    def run(x=None, mask=None, flag=False):
        x = _data((8, 3)) if x is None else x
        bn = dnn.BatchNorm(**kw)
        return bn.init_with_output(jax.random.key(0), x, use_running_average=flag, mask=mask)
    return run


def _nnx_bn(**kw):
    def run(x=None, mask=None, flag=False):
        x = _data((8, 3)) if x is None else x
        return dnx.BatchNorm(3, **kw, rngs=nnx.Rngs(0))(x, use_running_average=flag, mask=mask)
    return run


_BAD_CALLS = [
    # (id, call, error type, module, words the message must contain)
    ("linen momentum", lambda: _linen_bn(momentum=1.5)(), ValueError, "linen.BatchNorm",
     ["`momentum`"]),
    ("linen epsilon", lambda: _linen_bn(epsilon=-1.0)(), ValueError, "linen.BatchNorm",
     ["`epsilon`"]),
    ("linen flag", lambda: _linen_bn()(flag="yes"), TypeError, "linen.BatchNorm",
     ["`use_running_average`", "use_running_average=True for evaluation"]),
    ("linen mask", lambda: _linen_bn()(mask=jnp.ones((2, 3), bool)), ValueError,
     "linen.BatchNorm", ["`mask`"]),
    ("linen ghost", lambda: dnn.BatchNorm(use_running_average=False, virtual_batch_size=3).apply(
        dnn.BatchNorm().init(jax.random.key(0), _data((8, 3)), use_running_average=True),
        _data((8, 3)), mutable=["batch_stats"]), ValueError, "linen.BatchNorm",
     ["`virtual_batch_size`"]),
    ("linen renorm", lambda: dnn.BatchRenorm(r_max=0.5).init(
        jax.random.key(0), _data(), use_running_average=False), ValueError,
     "linen.BatchRenorm", ["`r_max`"]),
    ("linen key as x", lambda: _linen_bn()(x=jax.random.split(jax.random.key(0), (8, 3))),
     TypeError, "linen.BatchNorm", ["`x` is a PRNG key"]),
    ("nnx key as x", lambda: _nnx_bn()(x=jax.random.split(jax.random.key(0), (8, 3))),
     TypeError, "nnx.BatchNorm", ["`x` is a PRNG key"]),
    ("nnx momentum", lambda: _nnx_bn(momentum=-0.1)(), ValueError, "nnx.BatchNorm",
     ["`momentum`"]),
    ("nnx features", lambda: _nnx_bn()(x=_data((8, 4))), ValueError, "nnx.BatchNorm",
     ["num_features=3", "num_features=4"]),
    ("nnx flag", lambda: _nnx_bn()(flag=1), TypeError, "nnx.BatchNorm",
     ["`use_running_average`", "use_running_average=True for evaluation"]),
    ("linen rate", lambda: dnn.Dropout(1.5).apply({}, _data(), False, jax.random.key(0)),
     ValueError, "linen.Dropout", ["`rate`"]),
    ("linen inputs", lambda: dnn.Dropout(0.5).apply({}, jnp.arange(4), False, jax.random.key(0)),
     TypeError, "linen.Dropout", ["`inputs`"]),
    ("linen rng", lambda: dnn.Dropout(0.5).apply({}, _data(), False, jnp.ones(3, jnp.int32)),
     TypeError, "linen.Dropout", ["`rng`"]),
    ("linen mask_bits", lambda: dnn.Dropout(0.5, mask_bits=3).apply(
        {}, _data(), False, jax.random.key(0)), ValueError, "linen.Dropout", ["`mask_bits`"]),
    ("linen drop_path", lambda: dnn.DropPath(0.5).apply(
        {}, jnp.float32(1.0), False, jax.random.key(0)), ValueError, "linen.DropPath",
     ["`inputs`"]),
    ("nnx rate", lambda: dnx.Dropout(-0.1, rngs=nnx.Rngs(0))(_data()), ValueError,
     "nnx.Dropout", ["`rate`"]),
    ("nnx rngs", lambda: dnx.Dropout(0.5)(_data(), rngs=jnp.ones(3, jnp.int32)), TypeError,
     "nnx.Dropout", ["`rngs`"]),
    ("nnx deterministic", lambda: dnx.Dropout(0.5, deterministic="no")(_data()), TypeError,
     "nnx.Dropout", ["`deterministic`", "deterministic=True for evaluation"]),
    ("nnx alpha inputs", lambda: dnx.AlphaDropout(0.5, rngs=nnx.Rngs(0))(jnp.arange(3)),
     TypeError, "nnx.AlphaDropout", ["`inputs`"]),
]


@pytest.mark.parametrize("case", _BAD_CALLS, ids=[c[0] for c in _BAD_CALLS])
def test_errors_name_the_module_and_its_arguments(case):
    _, call, error, module, words = case
    with pytest.raises(error) as info:
        call()
    msg = str(info.value)
    assert msg.startswith(f"dropnorm.{module}: "), msg
    for word in words:
        assert word in msg, (word, msg)
    # Nothing in the pure API's terms: the modules have no `train`, `key` or (dropout) `x`.
    assert "train=" not in msg and "`train`" not in msg and "`key`" not in msg, msg
    if "Dropout" in module or "DropPath" in module:
        assert "`x`" not in msg, msg


# --- 9. Swapped arguments -----------------------------------------------------------------------

def test_swapped_inputs_and_key_linen():
    x, key = _data(), jax.random.key(0)
    for lib in (nn, dnn):
        with pytest.raises(TypeError) as info:  # Flax raises TypeError too (invalid key data)
            lib.Dropout(0.5).apply({}, key, False, x)
    assert "swapped" in str(info.value) and "`rng`" in str(info.value)


def test_swapped_inputs_and_key_nnx():
    x, key = _data(), jax.random.key(0)
    for lib in (nnx, dnx):
        with pytest.raises(TypeError) as info:
            lib.Dropout(0.5)(key, rngs=x)
    assert "swapped" in str(info.value) and "`rngs`" in str(info.value)


# --- 10. Importing the shells without Flax ----------------------------------------------------

@pytest.fixture(scope="module")
def imports_without_flax() -> dict:
    """One fresh interpreter: is Flax imported by the core, and what importing each shell says
    when Flax is missing (``sys.modules['flax'] = None``, as if it were not installed)."""
    code = (
        "import importlib, json, sys\n"
        "import dropnorm  # the core needs no Flax\n"
        "out = {'flax imported by the core': 'flax' in sys.modules}\n"
        "sys.modules['flax'] = None  # as if Flax were not installed\n"
        "for name in ('dropnorm.linen', 'dropnorm.nnx'):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "        out[name] = 'imported'\n"
        "    except ImportError as err:\n"
        "        out[name] = f'{type(err).__name__} | {err}'\n"
        "print(json.dumps(out))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_core_does_not_import_flax(imports_without_flax):
    assert imports_without_flax["flax imported by the core"] is False


@pytest.mark.parametrize("module", ["dropnorm.linen", "dropnorm.nnx"])
def test_import_without_flax_says_how_to_install_it(imports_without_flax, module):
    said = imports_without_flax[module]
    assert said.startswith("ImportError |"), said
    assert 'pip install "dropnorm[flax]"' in said, said


# --- A fully masked feature ------------------------------------------------------------------

def _masked_feature_case():
    x = _data((8, 3))
    mask = jnp.ones((8, 3), bool).at[:, 0].set(False)  # feature 0: no valid element
    return x, mask


def test_fully_masked_feature_linen():
    x, mask = _masked_feature_case()
    v = nn.BatchNorm().init(jax.random.key(0), x, use_running_average=True)
    v = {**v, "batch_stats": {"mean": jnp.array([0.3, -0.2, 0.1]),
                              "var": jnp.array([2.0, 0.5, 1.5])}}
    y_t, upd_t = nn.BatchNorm(use_running_average=False).apply(v, x, mask=mask,
                                                               mutable=["batch_stats"])
    y_o, upd_o = dnn.BatchNorm(use_running_average=False).apply(v, x, mask=mask,
                                                                mutable=["batch_stats"])
    # Flax's defect: the masked feature's output and running statistics become NaN.
    assert np.all(np.isnan(y_t[:, 0])) and np.isnan(upd_t["batch_stats"]["mean"][0])
    # Ours: the feature is normalised by the running statistics (as in evaluation), which
    # it leaves unchanged; the other features are Flax's.
    y_eval = dnn.BatchNorm(use_running_average=True).apply(v, x)
    _close(y_o[:, 0], y_eval[:, 0])
    for name in ("mean", "var"):
        assert upd_o["batch_stats"][name][0] == v["batch_stats"][name][0]
        _close(upd_o["batch_stats"][name][1:], upd_t["batch_stats"][name][1:])
    _close(y_o[:, 1:], y_t[:, 1:])


def test_fully_masked_feature_nnx():
    x, mask = _masked_feature_case()
    theirs = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    ours = dnx.BatchNorm(3, rngs=nnx.Rngs(0))
    y_t, y_o = theirs(x, mask=mask), ours(x, mask=mask)
    assert np.all(np.isnan(y_t[:, 0])) and np.isnan(theirs.mean[...][0])  # Flax's defect
    _close(y_o[:, 0], x[:, 0] / np.sqrt(1.0 + 1e-5))  # the initial running mean 0, var 1
    assert float(ours.mean[...][0]) == 0.0 and float(ours.var[...][0]) == 1.0
    _close(y_o[:, 1:], y_t[:, 1:])
    _close(ours.var[...][1:], theirs.var[...][1:])


# --- Transforms over stacked layers -----------------------------------------------------------

def _stacked(lib, n=3, seed=0):
    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return _Block(lib, rngs=rngs)

    return create(nnx.Rngs(seed))


@pytest.mark.parametrize("batch", [8, 1])
def test_nnx_scan_over_stacked_layers(batch):
    """The NNX scan guide's pattern: layers created under nnx.vmap, applied with nnx.scan
    (also to a batch of one, as Flax's transform tests do)."""
    x = _data((batch, 4))
    stacks = {name: _stacked(lib) for name, lib in NNX.items()}
    nnx.update(stacks["dropnorm"], nnx.state(stacks["flax"]))
    outs = {}
    for name, stack in stacks.items():
        stack.set_attributes(nnx.Dropout, deterministic=True)

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def forward(x, block):
            return block(x)

        outs[name] = forward(x, stack)
    _close(outs["dropnorm"], outs["flax"])
    _close(stacks["dropnorm"].bn.mean[...], stacks["flax"].bn.mean[...])
    _close(stacks["dropnorm"].bn.var[...], stacks["flax"].bn.var[...])
    # With dropout on, both draw one key per layer and call from the same streams.
    for stack in stacks.values():
        stack.set_attributes(nnx.Dropout, deterministic=False)
        nnx.scan(lambda x, block: block(x), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, stack)
    np.testing.assert_array_equal(stacks["dropnorm"].dropout.rngs.count[...],
                                  stacks["flax"].dropout.rngs.count[...])


def test_nnx_vmap_members_with_a_batch_of_one():
    """nnx.vmap over members, each seeing one example (Flax's transform tests do this)."""
    x = _data((3, 1, 4))  # 3 members, a batch of 1 each
    stacks = {name: _stacked(lib) for name, lib in NNX.items()}
    nnx.update(stacks["dropnorm"], nnx.state(stacks["flax"]))
    outs = {}
    for name, stack in stacks.items():
        stack.set_attributes(nnx.Dropout, deterministic=True)
        outs[name] = nnx.vmap(lambda block, x: block(x), in_axes=(0, 0))(stack, x)
    _close(outs["dropnorm"], outs["flax"])
    _close(stacks["dropnorm"].bn.mean[...], stacks["flax"].bn.mean[...])
    _close(stacks["dropnorm"].bn.var[...], stacks["flax"].bn.var[...])


def _linen_variables(module, x):
    return module.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)


def test_linen_scan_and_vmap():
    x = _data((8, 4))

    def scanned(lib):
        class Cell(nn.Module):
            @nn.compact
            def __call__(self, c, _):
                c = nn.Dense(4)(c)
                c = lib.BatchNorm(use_running_average=False, momentum=0.9)(c)
                return lib.Dropout(0.5, deterministic=True)(nn.relu(c)), None

        return nn.scan(Cell, variable_axes={"params": 0, "batch_stats": 0},
                       split_rngs={"params": True, "dropout": True}, length=3)()

    def vmapped(lib):
        return nn.vmap(lib.BatchNorm, in_axes=0, out_axes=0,
                       variable_axes={"params": 0, "batch_stats": 0},
                       split_rngs={"params": True})(use_running_average=False)

    def per_example(lib):  # each lane holds one example; statistics over the mapped axis
        return nn.vmap(lib.BatchNorm, in_axes=0, out_axes=0, axis_name="batch",
                       variable_axes={"params": None, "batch_stats": None},
                       split_rngs={"params": False})(use_running_average=False,
                                                     axis_name="batch")

    # nn.vmap members with 8 examples each, and with one each (Flax's transform tests).
    for build, args in ((scanned, (x, None)), (vmapped, (_data((3, 8, 4)),)),
                        (vmapped, (_data((3, 1, 4)),)), (per_example, (x,))):
        theirs, ours = build(nn), build(dnn)
        v = theirs.init(jax.random.key(0), *args)
        assert jax.tree.structure(ours.init(jax.random.key(0), *args)) == jax.tree.structure(v)
        out_t, upd_t = theirs.apply(v, *args, mutable=["batch_stats"])
        out_o, upd_o = ours.apply(v, *args, mutable=["batch_stats"])
        jax.tree.map(_close, (out_o, upd_o), (out_t, upd_t))


def test_remat_gives_flax_gradients():
    x = _data((8, 4))
    v = nn.remat(_LinenBlock)(nn, dropout=False).init(jax.random.key(0), x)
    grads = []
    for lib in (nn, dnn):
        model = nn.remat(_LinenBlock)(lib, dropout=False)

        def loss(params, model=model):
            y, _ = model.apply({**v, "params": params}, x, mutable=["batch_stats"])
            return jnp.sin(y).sum()

        grads.append(jax.grad(loss)(v["params"]))
    jax.tree.map(_close, grads[1], grads[0])
    theirs, ours = _nnx_pair()
    for model in (theirs, ours):
        model.set_attributes(nnx.Dropout, deterministic=True)
    g = [nnx.grad(nnx.remat(lambda m, x: jnp.sin(m(x)).sum()))(m, x) for m in (theirs, ours)]
    jax.tree.map(_close, nnx.to_pure_dict(g[1]), nnx.to_pure_dict(g[0]))
    _close(ours.bn.mean[...], theirs.bn.mean[...])  # and the statistics moved the same way


# --- nnx.clone, nnx.reseed ---------------------------------------------------------------------

def test_nnx_clone_and_reseed():
    x = _data((64, 4), offset=3.0)
    counts = {}
    for name, lib in NNX.items():
        model = _Block(lib, rngs=nnx.Rngs(0, dropout=1))
        copy = nnx.clone(model)
        assert type(copy.bn) is type(model.bn) and type(copy.dropout) is type(model.dropout)
        assert isinstance(copy.bn, nnx.BatchNorm) and isinstance(copy.dropout, nnx.Dropout)
        # The clone holds the same state, stream included: the same mask on the next call...
        np.testing.assert_array_equal(copy(x), model(x))
        # ...and its own state afterwards: calling the clone moves only the clone.
        copy(x)
        assert int(copy.dropout.rngs.count[...]) == 2 and int(model.dropout.rngs.count[...]) == 1
        assert np.all(np.asarray(copy.bn.mean[...] != model.bn.mean[...]))
        # nnx.reseed restarts the dropout stream: the same masks as after any reseed to 5.
        nnx.reseed(model, dropout=5)
        y5 = model.dropout(x)
        nnx.reseed(copy, dropout=5)
        np.testing.assert_array_equal(copy.dropout(x), y5)
        assert 0.4 < _dropped(y5, x) < 0.6
        counts[name] = jax.random.key_data(model.dropout.rngs.key[...])
    # Both libraries reseed the same stream (the same key data).
    np.testing.assert_array_equal(counts["dropnorm"], counts["flax"])


# --- Tooling: nn.tabulate, nnx.display, nnx.tabulate ----------------------------------------------

def test_nn_tabulate_gives_flax_table():
    x = _data((8, 4))
    tables = [nn.tabulate(_LinenBlock(lib), {"params": jax.random.key(0),
                                             "dropout": jax.random.key(1)})(x)
              for lib in (nn, dnn)]
    assert "BatchNorm" in tables[0] and "Dropout" in tables[0]
    assert tables[1] == tables[0]


@pytest.mark.parametrize("lib", ["flax", "dropnorm"])
def test_nnx_display_and_tabulate(lib, capsys):
    model = _Block(NNX[lib], rngs=nnx.Rngs(0))
    nnx.display(model)
    shown = capsys.readouterr().out
    assert "BatchNorm(" in shown and "Dropout(" in shown and "mean" in shown
    # In train mode on one example, as a quick look at a model often is.
    table = nnx.tabulate(model, jnp.ones((1, 4)))
    reference = nnx.tabulate(_Block(nnx, rngs=nnx.Rngs(0)), jnp.ones((1, 4)))
    assert "BatchNorm" in table and "Dropout" in table
    assert table == reference  # the same table as Flax's layers give
