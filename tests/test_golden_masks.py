"""Golden masks: the exact bits each mask-using function draws from a given key.

Masks are a contract (docs/guides/conventions.md): the same key gives the same mask on
every release, platform and sharding, so a checkpointed run resumes with the masks it
would have drawn, and a paper's numbers reproduce bit for bit. The statistical tests
(``tests/test_masks.py``) cannot see a change of the formula that keeps the masks random
(a mixing round removed, a constant changed, another word layout); these values can. They
were computed once from the implementation (dropnorm 0.1.0, jax 0.10.2, CPU) and are
written here as literals: the packed mask bits (``np.packbits`` of the row-major mask,
as hex), and for the raw words their values. Any change of the masks fails here and is a
breaking release (say so in CHANGELOG.md, then recompute these).

Keys: typed threefry keys (``jax.random.key``), a raw ``jax.random.PRNGKey`` (the same
implementation's ``uint32[2]``) and a typed ``rbg`` key. The hash is integer arithmetic,
the same on every platform; with rbg keys the 64-bit seed comes from XLA's
``RngBitGenerator``, whose algorithm is the platform's default, so those values hold on
CPU (where the suite runs). Shapes are small: one compile per function and key type.
"""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dropnorm
from dropnorm import _masks
from dropnorm import linen as dnn
from dropnorm import nnx as dnx

KEYS = {
    "key(0)": lambda: jax.random.key(0),
    "key(2026)": lambda: jax.random.key(2026),
    "PRNGKey(7)": lambda: jax.random.PRNGKey(7),  # raw uint32[2], threefry
    "key(0, rbg)": lambda: jax.random.key(0, impl="rbg"),
}


def packed(mask) -> str:
    """The row-major boolean mask as hex: 8 elements per byte, the first in the top bit."""
    return np.packbits(np.asarray(mask, bool).ravel()).tobytes().hex()


def _ones(shape):
    return jnp.ones(shape, jnp.float32)


def _attention_mask(key, shape, broadcast, mask_bits):
    """The weights' dropout mask (batch, heads, q, k) read off the output: with q = k = 0
    the weights are uniform and a one-hot v puts weight j in output column j, 0 exactly
    where the mask dropped."""
    b, n, h = shape
    z = jnp.zeros((b, n, h, 4))
    v = jnp.broadcast_to(jnp.eye(n)[None, :, None, :], (b, n, h, n))
    out = dropnorm.dot_product_attention(z, z, v, dropout_rng=key, dropout_rate=0.5,
                                         broadcast_dropout=broadcast, mask_bits=mask_bits)
    return np.asarray(out != 0).transpose(0, 2, 1, 3)


# name -> the mask as booleans, from a key
MASKS = {
    "dropout 16": lambda key: dropnorm.dropout(key, _ones((8, 32)), 0.5, True) != 0,
    "dropout 16 rate 0.1": lambda key: dropnorm.dropout(key, _ones((8, 32)), 0.1, True) != 0,
    "dropout 32": lambda key: dropnorm.dropout(key, _ones((8, 32)), 0.3, True,
                                               mask_bits=32) != 0,
    "dropout odd size": lambda key: dropnorm.dropout(key, _ones((5, 7)), 0.5, True) != 0,
    "spatial dropout": lambda key: dropnorm.dropout(key, _ones((4, 3, 3, 8)), 0.5, True,
                                                    broadcast_dims=(1, 2)) != 0,
    # x = 0: kept elements are b > 0, dropped ones a * alpha' + b < 0
    "alpha_dropout": lambda key: dropnorm.alpha_dropout(key, jnp.zeros((8, 32)), 0.5,
                                                        True) > 0,
    "drop_path": lambda key: dropnorm.drop_path(key, _ones((64, 3)), 0.5, True)[:, 0] != 0,
    "drop_block": lambda key: dropnorm.drop_block(key, _ones((2, 8, 8, 2)), 0.2, True,
                                                  block_size=3) != 0,
    "drop_block shared": lambda key: dropnorm.drop_block(
        key, _ones((2, 8, 8, 2)), 0.2, True, block_size=(3, 2), share_channels=True) != 0,
    "attention": lambda key: _attention_mask(key, (2, 6, 2), False, 16),
    "attention broadcast 32": lambda key: _attention_mask(key, (2, 6, 2), True, 32),
    "linen Dropout": lambda key: dnn.Dropout(0.5).apply(
        {}, _ones((8, 32)), deterministic=False, rng=key) != 0,
    "nnx Dropout": lambda key: dnx.Dropout(0.5)(_ones((8, 32)), deterministic=False,
                                                rngs=key) != 0,
    "linen DropBlock": lambda key: dnn.DropBlock(0.2, block_size=3).apply(
        {}, _ones((2, 8, 8, 2)), deterministic=False, rng=key) != 0,
    "nnx DropPath": lambda key: dnx.DropPath(0.5)(_ones((64, 3)), deterministic=False,
                                                  rngs=key)[:, 0] != 0,
}

# (mask, key) -> packed bits. The modules' masks equal the pure functions' for the same
# key (the modules draw nothing else): "linen Dropout" is "dropout 16", and so on.
GOLDEN = {
    ("dropout 16", "key(0)"): "ebbab25044de92517209356ec3e82737c5dac797e2d3110e479068cb63118fe5",
    ("dropout 16", "key(2026)"): "bec439cc5d2456f953a73c8c41a644dda60ce70755c7d2452f6d418c420154c0",
    ("dropout 16", "PRNGKey(7)"):
        "b02136682d095f25e38eb1f1633be2478e0e99bce4a69c13a705126c12c80be1",
    ("dropout 16", "key(0, rbg)"):
        "1a855004a9393f42465f66b7626983c6f48835a8ebc2b49efef35be4af19c448",
    ("dropout 16 rate 0.1", "key(0)"):
        "fffffffdfffedfdffebf3ffed7edbfffefffffbffbffbb4f77ffefffffbfffef",
    ("dropout 32", "key(0)"): "f6cfbedfe17abb7fbdf78d5bbdbbd53b99f97ffeffb3a676f9ffe315ef7fe3ef",
    ("dropout 32", "key(2026)"): "6a5afffdd366b7bf62fbffcbbfd68fefafb6def74f951efafdbf87b37fb5cfd6",
    ("dropout 32", "PRNGKey(7)"):
        "61eb35ff965d978fe377b367377bca59edad2bdbbf4dffffbff6adf6d8fd7b4f",
    ("dropout 32", "key(0, rbg)"):
        "53dad579bfafdd1ae9739f66edfff7f9fff9ff373b3f2c1c4e8bbf6aebfc6ee9",
    ("dropout odd size", "key(0)"): "ebbab25040",
    ("spatial dropout", "key(0)"):
        "ebebebebebebebebebbababababababababab2b2b2b2b2b2b2b2b2505050505050505050",
    ("spatial dropout", "key(2026)"):
        "bebebebebebebebebec4c4c4c4c4c4c4c4c4393939393939393939cccccccccccccccccc",
    ("alpha_dropout", "key(0)"): "ebbab25044de92517209356ec3e82737c5dac797e2d3110e479068cb63118fe5",
    ("alpha_dropout", "key(2026)"):
        "bec439cc5d2456f953a73c8c41a644dda60ce70755c7d2452f6d418c420154c0",
    ("drop_path", "key(0)"): "ebbab25044de9251",
    ("drop_block", "key(0)"): "fff5fff5ff55ff57ff57ffffffffffffffffeaffea57ea57ea57feaffeaffeaf",
    ("drop_block", "key(2026)"): "ffff57ff57ff57ffffffffffffffffffffffffffffffabff81ff81ffd5ffffff",
    ("drop_block shared", "key(0)"):
        "ffffffffffc3ffc3ffc3ffffc3ffc3ff0ff00ff00ffffffff0fff0fff0ffffff",
    ("attention", "key(0)"): "ebbab25044de92517209356ec3e82737c5da",
    ("attention", "key(2026)"): "bec439cc5d2456f953a73c8c41a644dda60c",
    ("attention broadcast 32", "key(0)"): "944cae4dc944cae4dc944cae4dc944cae4dc",
    ("linen Dropout", "key(0)"): "ebbab25044de92517209356ec3e82737c5dac797e2d3110e479068cb63118fe5",
    ("linen Dropout", "PRNGKey(7)"):
        "b02136682d095f25e38eb1f1633be2478e0e99bce4a69c13a705126c12c80be1",
    ("nnx Dropout", "key(0)"): "ebbab25044de92517209356ec3e82737c5dac797e2d3110e479068cb63118fe5",
    ("nnx Dropout", "PRNGKey(7)"):
        "b02136682d095f25e38eb1f1633be2478e0e99bce4a69c13a705126c12c80be1",
    ("linen DropBlock", "key(0)"):
        "fff5fff5ff55ff57ff57ffffffffffffffffeaffea57ea57ea57feaffeaffeaf",
    ("nnx DropPath", "key(0)"): "ebbab25044de9251",
}


@pytest.mark.parametrize(("name", "key"), list(GOLDEN), ids=[f"{n}, {k}" for n, k in GOLDEN])
def test_mask_bits_are_the_golden_values(name, key):
    got = packed(MASKS[name](KEYS[key]()))
    assert got == GOLDEN[name, key], (name, key, got)


def test_the_modules_draw_the_pure_functions_masks():
    # Pinned above too; this says why the values coincide.
    for module, pure in (("linen Dropout", "dropout 16"), ("nnx Dropout", "dropout 16"),
                         ("linen DropBlock", "drop_block"), ("nnx DropPath", "drop_path")):
        assert GOLDEN[module, "key(0)"] == GOLDEN[pure, "key(0)"], module


def test_a_sharded_mask_is_the_golden_mask():
    # The hash is counter-based: each device computes its shard's words from their indices,
    # and the mask of a batch sharded over the 8 devices (tests/conftest.py) is the same.
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    x = jax.device_put(_ones((8, 32)), sharding)
    y = jax.jit(lambda x: dropnorm.dropout(jax.random.key(0), x, 0.5, True))(x)
    assert len(y.sharding.device_set) == 8
    assert packed(y != 0) == GOLDEN["dropout 16", "key(0)"]


LARGE_HEAD = "7c15d3abfbcffbd72e65e9b9158b3fe9"
LARGE_SHA256 = "a81f0e7b23690ad1ea9eaadda32c796134997add2ed8fe6c23552a408d03e1b4"


def test_a_large_mask_is_the_golden_hash():
    # 2**20 elements of a 16-bit mask at rate 0.3: its SHA-256, and its first bytes as a
    # literal so that a failure is readable.
    mask = np.asarray(dropnorm.dropout(jax.random.key(5), _ones((1024, 1024)), 0.3, True) != 0)
    bits = packed(mask)
    assert bits[:32] == LARGE_HEAD, bits[:32]
    assert hashlib.sha256(bytes.fromhex(bits)).hexdigest() == LARGE_SHA256


SEED = [4070199207, 4202968722]  # threefry: jax.random.bits(key(0), (2,), uint32)
FIRST_WORDS = [993985252, 2434236003, 2422685900, 1941454613]
HIGH_WORDS = {  # (hi, lo): the word at index hi * 2**32 + lo
    (1, 0): 4023090578,
    (1, 1): 4134435843,
    (2, 12345): 4202843909,
    (1048576, 4095): 3237206107,
    (4294967295, 4294967295): 676548270,
}


def test_raw_words_and_the_64_bit_counter_are_the_golden_values():
    # The seed threefry derives, the first words, and words whose 64-bit index has a high
    # half (hi, lo): the constants of A and B, which no mask below 2**32 words reaches.
    seed = _masks.seed_words(jax.random.key(0))
    assert [int(w) for w in seed] == SEED
    assert [int(w) for w in _masks.random_words(jax.random.key(0), 4)] == FIRST_WORDS
    hi = jnp.asarray([h for h, _ in HIGH_WORDS], jnp.uint32)
    lo = jnp.asarray([low for _, low in HIGH_WORDS], jnp.uint32)
    got = [int(w) for w in jax.jit(_masks.words_at)(seed, lo, hi)]
    assert got == list(HIGH_WORDS.values())
