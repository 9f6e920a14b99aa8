"""Pure numpy/scipy numerics of onnx-udfc: arrays in, arrays out, no onnx import.

Modules: :mod:`.activations` (activation functions), :mod:`.moments` (Gaussian moments, Hermite and
Mehler series), :mod:`.bn` (BN folding, BN prior), :mod:`.quantize` (fake-quantization, bias
correction), :mod:`.covariance` (feature-map covariance models), :mod:`.compensation` (affine
compensation solvers), :mod:`.selection` (which channels to prune).
"""

from .activations import Activation
from .bn import bn_prior, fold_batchnorm
from .compensation import (apply_compensation, compensation_error, mean_compensation, neuron_merging,
                           solve_affine_compensation)
from .covariance import conv_preactivation_covariance, cov_to_corr, depthwise_output_covariance, nearest_psd
from .moments import (activation_covariance, gaussian_activation_moments, hermite_coefficients,
                      lagged_activation_covariance)
from .quantize import QuantSpec, bias_correction, fake_quantize, quantization_grid
from .selection import select_by_expected_error, select_by_norm

__all__ = [
    "Activation",
    "gaussian_activation_moments",
    "hermite_coefficients",
    "activation_covariance",
    "lagged_activation_covariance",
    "fold_batchnorm",
    "bn_prior",
    "QuantSpec",
    "quantization_grid",
    "fake_quantize",
    "bias_correction",
    "conv_preactivation_covariance",
    "depthwise_output_covariance",
    "nearest_psd",
    "cov_to_corr",
    "solve_affine_compensation",
    "mean_compensation",
    "neuron_merging",
    "apply_compensation",
    "compensation_error",
    "select_by_norm",
    "select_by_expected_error",
]
