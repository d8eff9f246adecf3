"""ntksap_jax: NTK-SAP pruning at initialization in JAX/Flax.

Prune your own model (linen, NNX, or any ``apply_fn`` with its params)::

    from ntksap_jax import prune_model
    result = prune_model(my_module, input_shape=(32, 32, 3), density=0.1, key=jax.random.key(0))
    result.masks, result.params, result.report

The lower-level pieces::

    from ntksap_jax import get_model, init_model, ntksap_scorer, prune

    model = get_model("resnet20", num_classes=10)
    variables, prune_key = init_model(model, (32, 32, 3), seed=0)
    score = ntksap_scorer(model, (32, 32, 3), samples=5, num_inputs=100)
    result = prune(score, variables["params"], batch_stats=variables["batch_stats"],
                   density=0.8 ** 18, iterations=20, key=prune_key)

The top level holds the names below (``__all__``); everything else lives in namespaces: ``masks``,
``ntk``, ``scores``, ``models``, ``model``, ``schedules``, ``distributions``, ``optim``, ``steps``,
``analysis``, ``validate``, ``collapse``, ``sanity``, ``parallel``, ``data``, ``presets``, ``runs``,
``preset_runs`` (the README's "Public API" table lists each). Other modules are internal.
"""

from ntksap_jax import (  # noqa: F401  the public namespaces
    analysis,
    collapse,
    data,
    distributions,
    masks,
    model,
    models,
    ntk,
    optim,
    parallel,
    preset_runs,
    presets,
    runs,
    sanity,
    schedules,
    scores,
    steps,
    validate,
)
from ntksap_jax.masks import apply_masks, count_kept, density_report, format_report, init_masks, load_masks, save_masks
from ntksap_jax.model import Model, as_model, from_apply_fn, from_linen, from_nnx, masked_apply_fn
from ntksap_jax.models import get_model
from ntksap_jax.ntk import empirical_ntk, ntk_eigenvalues, ntk_trace
from ntksap_jax.optim import masked
from ntksap_jax.prune import DegenerateMaskError, PruneResult, prune
from ntksap_jax.scores import get_method, get_scorer, list_scorers, ntksap_scorer, register_scorer
from ntksap_jax.steps import init_model
from ntksap_jax.train import train
from ntksap_jax.workflow import PrunedModel, prune_model

__version__ = "0.1.0"

__all__ = [
    # prune any model
    "prune_model",
    "PrunedModel",
    "DegenerateMaskError",
    # the model abstraction
    "Model",
    "as_model",
    "from_linen",
    "from_nnx",
    "from_apply_fn",
    "masked_apply_fn",
    # methods and the pruning loop
    "get_scorer",
    "get_method",
    "list_scorers",
    "register_scorer",
    "ntksap_scorer",
    "prune",
    "PruneResult",
    # masks
    "init_masks",
    "apply_masks",
    "count_kept",
    "density_report",
    "format_report",
    "save_masks",
    "load_masks",
    # the NTK
    "empirical_ntk",
    "ntk_trace",
    "ntk_eigenvalues",
    # the zoo and training
    "get_model",
    "init_model",
    "masked",
    "train",
]
