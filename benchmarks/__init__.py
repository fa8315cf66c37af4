"""dropnorm against flax.linen and flax.nnx: time, fraction of the memory floor, residual bytes.

Run from the repository root (``python -m benchmarks`` takes the same options)::

    python benchmarks/bench.py            # everything (30-60 minutes on 2 cores; see below)
    python benchmarks/bench.py --quick    # small shapes, few repeats, tiny steps table (minutes)
    python benchmarks/bench.py --scale    # only the scale tables: axis_name and sharded jit
    python benchmarks/bench.py --sharded  # only the sharded-jit table (--quick: 8 devices)
    python benchmarks/bench.py --steps    # only the steps table (about 5 minutes)
    python benchmarks/bench.py --attention  # only the attention table
    python benchmarks/bench.py --why      # only the why tables (the price of exactness)
    python benchmarks/bench.py --json out.json
    python benchmarks/bench.py --markdown out.json   # the tables of BENCHMARKS.md

The package, a module per table:

* ``timing``: interleaved rounds, the spread statistic, the memory floor, trace+compile
  timing, what a run records about the machine and the code;
* ``models``: the models the tables share (12-layer MLP, ResNet, Transformer), built from
  flax.linen modules with either library's layers;
* ``grid``: the layer grid (each layer alone; residual bytes; the 12-layer temp memory);
* ``masks``: dropout's other memory policies, the mask resolution, the raw random words;
* ``steps``: whole training steps on one device;
* ``scale``: collectives from the compiled HLO, with ``axis_name`` and under a sharded
  ``jit``, each device count in a subprocess;
* ``attention``: a Transformer block's training step with attention dropout;
* ``why``: where a batch-norm cell misses its target, what exact statistics cost there
  (the statistics alone; the forward and the ResNet step with the statistics three ways);
* ``report``: the tables of BENCHMARKS.md from a ``--json`` result; ``cli``: the options.

``benchmarks/bench.py`` is the entry point and re-exports the names the tests use
(``bench.hlo_collectives``, ``bench.scale_layers``, ...).

The full run's length is mostly the layer grid's extra rounds (``--target-spread``): at load
average 5 the largest shapes' cells ran to the cap; ``--target-spread 0`` gives the fixed
7-round grid (about 10 minutes of the total).

What is timed (one jitted function per cell, inputs already on the device):

* ``fwd``: the layer's forward pass in training mode (dropout at rate 0.1; batch norm
  with batch statistics), output ``y``.
* ``vjp``: forward and backward through ``jax.vjp`` with an explicit cotangent; returns
  ``y`` and every input gradient (``dx``, and ``dscale``, ``dbias`` for batch norm).
  This is the per-layer cost inside a training step.
* ``loss``: ``jax.value_and_grad`` of ``sum(y**2)`` (in float32), the measure the issue
  used; it adds a reduction of ``y`` to a scalar.
* ``eval`` (batch norm only: dropout's eval mode returns ``x``): the forward pass with the
  running statistics (``batch_norm(..., train=False)``, ``use_running_average=True``),
  which are arguments of the jitted function (mean about 0.5, variance 0.25 to 4, so
  nothing folds to the identity). Its floor is 2 passes (read x, write y).

Contenders run interleaved (one call of each per round) and every time is the median
over rounds; the ratio to Flax (``linen/this``, ``nnx/this``, and the ratio columns of the
tables) is the median of the per-round ratios, not the quotient of the two median times:
it cancels drift that hits both contenders of a round. Its ``spread`` is the width of a
distribution-free 95% interval for that median over the median: the rounds' ratios, sorted,
from the k-th smallest to the k-th largest, with k the largest for which the pair brackets
the true median with probability ``1 - 2 P(Binomial(n, 1/2) < k) >= 95%`` (with 7 rounds:
min to max, 98.4%; 21 rounds: the 6th to the 16th, 97.3%; under 6 rounds no pair reaches
95% and min to max is used). It is about how far two runs with this run's round-to-round
noise can read apart; it does not cover a change of load between runs (``uptime``, recorded,
does). A spread below 10%: the 95% interval of the cell's ratio is narrower than a tenth
of the ratio. Full runs give a cell whose spread to flax.linen (the issue's reference) is
above ``--target-spread`` (10%) ``--repeats`` more rounds at a time, up to ``--max-repeats``
(3 x ``--repeats`` in the layer grid: 21, where the interval is the 6th to the 16th ratio;
5 x in the steps table, whose calls are short); ``rounds`` says how many it got. The
quotient of the medians is printed beside it ("of medians", and a column of the batch-norm
and dropout tables);
with few rounds (``--quick``: 3) on a busy CPU the two can differ widely, and a cell
where they disagree is not reliable. The run prints this at its top.
``copy`` is ``x * 2``: its bandwidth (2 passes over ``x``) sets the memory floor,
``passes * x.nbytes / bandwidth``, with passes = 2 (dropout fwd), 4 (dropout vjp: read x,
write y, read dy, write dx), 3 (batch norm fwd: statistics, read x, write y) and 8 (batch
norm vjp). ``floor%`` is floor time over the median measured time (100% = at the floor).

The scale table (full runs and ``--scale``; ``--quick`` leaves it out) compiles one
BatchNorm layer with ``axis_name`` (256 features) under ``shard_map``, ``pmap`` and ``vmap``
on 8 and 64 simulated CPU devices, each device count in its own subprocess with its own
``XLA_FLAGS``, and reads the collectives from the optimised HLO: how many, and their operand
bytes per device (exact, whatever the load), dropnorm against ``flax.linen.BatchNorm``.
It also times trace+compile (medians of fresh compiles, caches cleared) of that layer, of a
small ResNet ``pmap`` train step in the layout of Flax's ImageNet example (15 BatchNorm
layers with ``axis_name``, 8 devices), and of the 12-layer step below.

The sharded-``jit`` table (full runs, ``--scale``, ``--sharded``; ``--quick``: 8 devices
and a tiny ResNet, one compile each) does the same for the way most JAX programs scale
today: the batch split by a ``NamedSharding`` over a mesh ``("data",)``, parameters and
statistics replicated, a plain ``jax.jit`` without ``axis_name``, XLA's SPMD partitioner
inserting the collectives. On 8 and 64 devices, per BatchNorm layer (512 features, batch
256): the pure ``batch_norm`` forward, its gradients and its evaluation, a ``Dense ->
BatchNorm -> relu -> Dropout -> Dense`` model's forward, train step (``jax.grad``) and
evaluation, ``batch_norm`` on a 2-D mesh ``("data", "model")`` and the NNX shells, each
against Flax; and a ResNet train step on 8 devices: collectives per step and trace+compile
time (issue 19's target: at most 1.15x Flax's).

The steps table (full runs, ``--steps`` alone, and a tiny one in ``--quick``): one jitted
training step with the optax update, on one device, of three models built from flax.linen
modules, once with Flax's BatchNorm / Dropout and once with dropnorm's (same variables, same
arguments): the 12-layer bf16 MLP below (SGD with momentum), a small ResNet (3 stages of 2
blocks, 15 BatchNorm, batch 16 of 32x32x3, width 8, SGD with momentum) and 2 pre-LN
Transformer blocks in the layout of Flax's WMT example (residual dropout, dropout in the MLP
and attention dropout with ``broadcast_dropout=False``; Flax's
``MultiHeadDotProductAttention`` with ``dropout_rate`` against the same module with
``attention_fn=dropnorm.dot_product_attention``; AdamW). Step time: ratio Flax / dropnorm,
21 rounds or more, with its spread; trace+compile time (:func:`time_trace_compile`):
dropnorm / Flax, trace+lower and compile reported apart. The issue's targets are printed
beside them (MLP >= 1.1x, ResNet >= 1.0x, Transformer >= 1.15x; trace+compile <= 1.15x).

The attention table (full runs and ``--attention`` alone; ``--attention --quick``: lengths
64 and 128, 3 rounds): one pre-LN Transformer block (4 heads of 16, batch 2, attention
dropout 0.1 with ``broadcast_dropout=False``, Adam) at lengths 512 and 2048, its jitted train
step's compiled temp memory (exact) and time per step, Flax's ``dot_product_attention``
against ``attention_fn=dropnorm.dot_product_attention`` (issue 15: temp memory <= 0.5x Flax's
at 2048, time no slower), beside dropnorm's in one pass, in other chunk sizes, and the
obvious version (Flax's weights, ``dropnorm.dropout``, the value einsum).

Full runs also time dropnorm's dropout with the two other backward-pass memory policies
(keeping a bit-packed or a bool mask instead of regenerating it from the key) and with
32-bit masks instead of the default 16 (8-bit masks were removed after run 9 measured them
1.3-1.7x slower than 16 bits in the forward pass); ``--quick`` leaves these out.

Residual bytes per element are the arrays the ``jax.vjp`` closure holds (what reverse mode
keeps for the backward pass). The 12-layer figure is the compiled temp memory
(``jit(...).lower(...).compile().memory_analysis()``) of a bf16 training step of
Dense -> BatchNorm -> relu -> Dropout, 12 times, built from flax.linen modules, with
dropnorm's linen shells swapped in for BatchNorm and Dropout.
"""
