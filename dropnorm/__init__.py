"""dropnorm: dropout and batch normalisation as pure, transform-friendly JAX functions."""

from dropnorm._attention import dot_product_attention as dot_product_attention
from dropnorm._batch_norm import BatchNormParams as BatchNormParams
from dropnorm._batch_norm import BatchNormState as BatchNormState
from dropnorm._batch_norm import PopulationStats as PopulationStats
from dropnorm._batch_norm import batch_norm as batch_norm
from dropnorm._batch_norm import batch_norm_init as batch_norm_init
from dropnorm._batch_norm import batch_renorm as batch_renorm
from dropnorm._batch_norm import fold_batch_norm as fold_batch_norm
from dropnorm._dropout import alpha_dropout as alpha_dropout
from dropnorm._dropout import drop_block as drop_block
from dropnorm._dropout import drop_path as drop_path
from dropnorm._dropout import dropout as dropout
from dropnorm._dropout import gaussian_dropout as gaussian_dropout
from dropnorm._mc_dropout import MCDropoutPrediction as MCDropoutPrediction
from dropnorm._mc_dropout import mc_dropout as mc_dropout
from dropnorm._population import population_stats_finalize as population_stats_finalize
from dropnorm._population import population_stats_init as population_stats_init
from dropnorm._population import recompute_batch_norm as recompute_batch_norm

__version__ = "0.1.0"

__all__ = [
    "BatchNormParams",
    "BatchNormState",
    "MCDropoutPrediction",
    "PopulationStats",
    "alpha_dropout",
    "batch_norm",
    "batch_norm_init",
    "batch_renorm",
    "dot_product_attention",
    "drop_block",
    "drop_path",
    "dropout",
    "fold_batch_norm",
    "gaussian_dropout",
    "mc_dropout",
    "population_stats_finalize",
    "population_stats_init",
    "recompute_batch_norm",
]
