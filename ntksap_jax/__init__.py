"""ntksap_jax: NTK-SAP pruning at initialization in JAX/Flax.

Prune your own model (linen, NNX, or any ``apply_fn`` with its params)::

    from ntksap_jax import prune_model
    result = prune_model(my_module, input_shape=(32, 32, 3), density=0.1, key=jax.random.key(0))
    result.masks, result.params, result.report

The lower-level pieces::

    from ntksap_jax import get_model, init_masks, ntksap_scorer, prune

    model = get_model("resnet20", num_classes=10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    score = ntksap_scorer(model, (32, 32, 3), samples=5, num_inputs=100)
    result = prune(score, variables["params"], batch_stats=variables["batch_stats"],
                   density=0.8 ** 18, iterations=20, key=jax.random.key(1))
"""

from ntksap_jax.analysis import (
    SpectrumResult,
    calibrated_batch_stats,
    masked_apply_fn,
    ntk_spectrum,
    plot_densities,
    plot_spectrum,
    spectrum_study,
)
from ntksap_jax.validate import ValidationResult, format_validation, validate_ntk
from ntksap_jax.presets import PRESETS, Preset, get_preset, list_presets
from ntksap_jax.train import (
    TrainResult,
    TrainState,
    create_train_state,
    evaluate,
    init_model,
    make_schedule,
    masked,
    pruned_weights_are_zero,
    shard_state,
    train,
)
from ntksap_jax.parallel import (
    batch_sharding,
    initialize_distributed,
    is_primary_process,
    make_mesh,
    mesh_summary,
    param_shardings,
    place,
    replicated,
    shard_batch,
    shard_examples,
    sync_processes,
)
from ntksap_jax.collapse import max_critical_compression, path_report, unit_report
from ntksap_jax.distributions import erk_densities, uniform_densities
from ntksap_jax.sanity import reinit_params, shuffle_masks
from ntksap_jax.masks import (
    apply_masks,
    check_structure,
    collapsed_layers,
    count_kept,
    count_total,
    default_filter,
    density_report,
    format_report,
    global_topk,
    global_topk_count,
    init_masks,
    layerwise_topk,
    load_masks,
    masked_density,
    save_masks,
)
from ntksap_jax.models import get_model, list_models, module_order
from ntksap_jax.ntk import (
    NtkImplementation,
    empirical_ntk,
    ntk_eigenvalues,
    ntk_trace,
    ntk_trace_finite_difference,
    ntk_trace_hutchinson,
)
from ntksap_jax.conv import conv_general_dilated
from ntksap_jax.prune import DegenerateMaskError, PruneResult, prune
from ntksap_jax.model import Model, WeightLayout, as_model, forward_order, from_apply_fn, from_linen, from_nnx
from ntksap_jax.workflow import PrunedModel, prune_model, unit_norm_scales
from ntksap_jax._compat import NeuralTangentsUnavailable, import_neural_tangents
from ntksap_jax.schedules import exponential_schedule, linear_schedule, paper_density_grid
from ntksap_jax.scores import (
    Estimator,
    SampleLoop,
    apply_with_batch_statistics,
    get_scorer,
    grasp_scorer,
    iterative_snip_scorer,
    list_scorers,
    magnitude_scorer,
    ntksap_objective,
    ntksap_scorer,
    random_scorer,
    register_scorer,
    snip_scorer,
    synflow_scorer,
)

__version__ = "0.1.0"

__all__ = [
    "prune_model",
    "PrunedModel",
    "unit_norm_scales",
    "Model",
    "WeightLayout",
    "as_model",
    "from_linen",
    "from_nnx",
    "from_apply_fn",
    "forward_order",
    "DegenerateMaskError",
    "import_neural_tangents",
    "NeuralTangentsUnavailable",
    "make_mesh",
    "initialize_distributed",
    "batch_sharding",
    "replicated",
    "param_shardings",
    "place",
    "shard_batch",
    "shard_examples",
    "shard_state",
    "is_primary_process",
    "sync_processes",
    "mesh_summary",
    "conv_general_dilated",
    "apply_with_batch_statistics",
    "PRESETS",
    "Preset",
    "get_preset",
    "list_presets",
    "TrainResult",
    "TrainState",
    "create_train_state",
    "evaluate",
    "init_model",
    "make_schedule",
    "masked",
    "pruned_weights_are_zero",
    "train",
    "SpectrumResult",
    "calibrated_batch_stats",
    "masked_apply_fn",
    "ntk_spectrum",
    "plot_densities",
    "plot_spectrum",
    "spectrum_study",
    "ValidationResult",
    "format_validation",
    "validate_ntk",
    "max_critical_compression",
    "path_report",
    "unit_report",
    "erk_densities",
    "uniform_densities",
    "reinit_params",
    "shuffle_masks",
    "apply_masks",
    "check_structure",
    "collapsed_layers",
    "count_kept",
    "count_total",
    "default_filter",
    "density_report",
    "format_report",
    "global_topk",
    "global_topk_count",
    "init_masks",
    "layerwise_topk",
    "load_masks",
    "masked_density",
    "save_masks",
    "get_model",
    "list_models",
    "module_order",
    "NtkImplementation",
    "empirical_ntk",
    "ntk_eigenvalues",
    "ntk_trace",
    "ntk_trace_finite_difference",
    "ntk_trace_hutchinson",
    "PruneResult",
    "prune",
    "exponential_schedule",
    "linear_schedule",
    "paper_density_grid",
    "Estimator",
    "SampleLoop",
    "get_scorer",
    "list_scorers",
    "magnitude_scorer",
    "ntksap_objective",
    "ntksap_scorer",
    "random_scorer",
    "register_scorer",
    "snip_scorer",
    "iterative_snip_scorer",
    "grasp_scorer",
    "synflow_scorer",
]
