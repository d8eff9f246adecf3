"""The NTK of pruned networks: spectra of masked networks and their plots.

* :mod:`ntksap_jax.analysis.spectrum`: :func:`ntk_spectrum` (one mask, :class:`SpectrumResult`)
  and :func:`spectrum_study` (several masks and the dense network, a JSON-ready dict);
* :mod:`ntksap_jax.analysis.plots`: :func:`plot_spectrum` and :func:`plot_densities` of a study.

The masked network itself (``f(θ⊙m, x)`` and its BatchNorm statistics) is
:func:`ntksap_jax.model.masked_apply_fn` and :func:`ntksap_jax.model.calibrated_batch_stats`.

Example::

    from ntksap_jax.analysis import plot_spectrum, spectrum_study

    study = spectrum_study(model, variables, {"ntksap": m1, "random": m2}, x, key=jax.random.key(0))
    plot_spectrum(study, "out/spectrum.png")
"""

from ntksap_jax.analysis.plots import plot_densities, plot_spectrum
from ntksap_jax.analysis.spectrum import SpectrumResult, ntk_spectrum, spectrum_study

__all__ = ["SpectrumResult", "ntk_spectrum", "spectrum_study", "plot_spectrum", "plot_densities"]
