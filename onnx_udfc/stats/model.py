"""The statistics model: means and channel covariances wherever compression needs them.

One replaceable component (`StatisticsModel`); `AnalyticStatistics` is the data-free default:

- per-channel moments of every tensor from `MomentPropagator` (BN priors where the model has BN,
  moment propagation from `N(0, 1)` inputs elsewhere);
- channel covariance at a chain's compensation point (the consumer's input), analytic:
  1. pre-activation correlation of the producer, `corr(z) ~ W D W^T` with D the input channel
     variances and a spatial AR(1) correlation within the kernel window;
  2. pre-activation variances and means from the moments (the BN prior when there is one);
  3. MaxPool (after a monotone activation) moment-matched on the pre-activation;
  4. through the activation with the Mehler (Hermite) series;
  5. through a depthwise conv by summing the lagged activation covariances against the kernels'
     cross-correlations (not the expansion filters' cosine, which says little there), renormalised to
     the depthwise BN prior, and through its activation again.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple

import numpy as np

from ..ir.graph import Graph, attr
from ..ir.layers import read_layer
from ..numerics.covariance import (conv_preactivation_covariance, cov_to_corr,
                                   depthwise_output_covariance, nearest_psd)
from ..numerics.moments import activation_covariance, gaussian_activation_moments, hermite_coefficients
from ..patterns.activations import activation_of
from ..patterns.chains import Chain, Stage
from .propagate import SPATIAL_RHO, MomentPropagator, max_of_gaussians, mean_spatial_correlation

log = logging.getLogger(__name__)

#: widest tensor whose channel covariance `tensor_covariance` models ((C, C) float64 each, cached)
MAX_COVARIANCE_CHANNELS = 1280

Moments = Tuple[np.ndarray, np.ndarray]


class StatisticsModel:
    """Interface: where means and covariances come from."""

    source = "abstract"

    def tensor_moments(self, tensor: str) -> Optional[Moments]:
        raise NotImplementedError

    def input_moments(self, node) -> Optional[Moments]:
        """(mean, var) per input channel/feature of a linear layer."""
        return self.tensor_moments(node.input[0])

    def chain_statistics(self, chain: Chain) -> Optional[Moments]:
        """(mean (N,), cov (N, N)) of the channels the consumer reads, or None if unknown."""
        raise NotImplementedError

    def selection_statistics(self, chain: Chain) -> Optional[Moments]:
        """(mean, cov) that price the removal of the chain's channels (expected-error selection and the global
        allocation); `chain_statistics` unless a model measures something closer to what the consumer reads."""
        return self.chain_statistics(chain)

    def selection_moments(self, tensor: str) -> Optional[Moments]:
        """(mean, var) per channel of `tensor` from the same source as `selection_statistics`: what the
        allocation weighs a chain's error against (the residual share, a ratio of two tensors' variances,
        so both must come from one model); `tensor_moments` unless a model answers some tensors from
        another source."""
        return self.tensor_moments(tensor)

    def input_covariance(self, node) -> Optional[np.ndarray]:
        """(C, C) covariance of a linear layer's input channels, or None if unknown."""
        return None


class AnalyticStatistics(StatisticsModel):
    def __init__(self, graph: Graph, shapes: Dict[str, tuple], priors: Dict[str, tuple],
                 spatial_rho: float = SPATIAL_RHO):
        self.graph = graph
        self.shapes = shapes
        self.spatial_rho = spatial_rho
        self.input_correlation = True
        self._by_output: Dict[str, Chain] = {}
        self._cache: Dict[str, Moments] = {}
        self._tensor_cov: Dict[str, Optional[np.ndarray]] = {}
        propagator = MomentPropagator(graph, shapes, priors)
        self.moments = propagator.run()
        self.unknown_ops = propagator.unknown_ops
        self.n_priors = len(priors) + sum(1 for n in graph.topological_nodes() if n.op_type == "BatchNormalization")
        if self.n_priors:
            self.source = ("BatchNormalization priors (running statistics) for %d tensors, moment propagation "
                           "from N(0,1) inputs elsewhere; no data used" % self.n_priors)
        else:
            self.source = "moment propagation from N(0,1) inputs through the weights (no BN statistics, no data)"

    def tensor_moments(self, tensor: str) -> Optional[Moments]:
        return self.moments.get(tensor)

    def register_chains(self, chains) -> None:
        """Remember the chains so a producer's input correlation can come from the chain that feeds it."""
        self._by_output = {c.last_stage.output: c for c in chains}

    def chain_statistics(self, chain: Chain) -> Optional[Moments]:
        key = chain.last_stage.output
        if key not in self._cache:
            self._cache[key] = self._chain_statistics(chain)
        return self._cache[key]

    def _chain_statistics(self, chain: Chain) -> Optional[Moments]:
        producer = read_layer(self.graph, chain.producer)
        pre = self.tensor_moments(chain.producer.output[0])
        if producer is None or pre is None:
            return None
        inp = self.tensor_moments(chain.producer.input[0])
        c_in = producer.rows.shape[1]
        var_in = inp[1] if inp is not None and inp[1].shape[0] == c_in else np.ones(c_in)
        input_corr = None
        upstream = self._by_output.get(chain.producer.input[0]) if self.input_correlation else None
        if upstream is not None and upstream is not chain:
            up = self.chain_statistics(upstream)
            if up is not None and up[0].shape[0] == c_in:
                input_corr, _ = cov_to_corr(up[1])
        corr = self._output_correlation(producer.rows, var_in, input_corr, chain.producer)
        mu, var = pre
        mean, cov = self._stage(mu, var, corr, chain.first)
        if chain.depthwise is None:
            return mean, nearest_psd(cov)
        kernel = self.graph.constant(chain.depthwise.input[1])
        dw_pre = self.tensor_moments(chain.depthwise.output[0])
        if kernel is None or dw_pre is None:
            return None
        mu1, sigma1 = self._pooled_preactivation(mu, var, chain.first)
        cov_u = depthwise_output_covariance(mu1, sigma1, corr, chain.first.activation,
                                            np.asarray(kernel, np.float64), spatial_rho=self.spatial_rho)
        corr_u, _ = cov_to_corr(nearest_psd(cov_u))
        mean2, cov2 = self._stage(dw_pre[0], dw_pre[1], corr_u, chain.second)
        return mean2, nearest_psd(cov2)

    def input_covariance(self, node) -> Optional[np.ndarray]:
        return self.tensor_covariance(node.input[0])

    def tensor_covariance(self, tensor: str) -> Optional[np.ndarray]:
        """(C, C) channel covariance of `tensor` (None where the model does not say), computed lazily:

        - a chain's output (a consumer's input): `chain_statistics`;
        - a conv / Gemm output: the pre-activation correlation `corr(z) ~ W D W^T` (input channel
          variances D, the input's own correlation when known, AR(1) taps) scaled to the output's
          moments (the BN prior where there is one);
        - `Add`: the sum of the branches' covariances (branches taken as uncorrelated);
        - a pointwise activation: the Mehler series on the input's Gaussian moments;
        - pools and Identity/Dropout pass the covariance on (only its shape across channels matters
          to the rounding that uses it).
        Tensors wider than `MAX_COVARIANCE_CHANNELS` are not modelled.
        """
        if tensor not in self._tensor_cov:
            self._tensor_cov[tensor] = None  # a cycle or a failure leaves it unknown
            cov = self._tensor_covariance(tensor)
            channels = self.moments.get(tensor, (np.zeros(0),))[0].shape[0]
            if cov is not None and cov.shape != (channels, channels):
                cov = None
            self._tensor_cov[tensor] = cov
        return self._tensor_cov[tensor]

    def _tensor_covariance(self, tensor: str) -> Optional[np.ndarray]:
        moments = self.tensor_moments(tensor)
        if moments is None or moments[0].shape[0] > MAX_COVARIANCE_CHANNELS:
            return None
        chain = self._by_output.get(tensor)
        if chain is not None:
            stats = self.chain_statistics(chain)
            return None if stats is None else stats[1]
        node = self.graph.producer_of(tensor)
        if node is None:
            return None
        op = node.op_type
        if op in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            return self._linear_output_covariance(node, moments)
        if op == "Add" and len(node.input) == 2:
            parts = [self.tensor_covariance(name) for name in node.input]
            if any(p is None for p in parts) or parts[0].shape != parts[1].shape:
                return None
            return parts[0] + parts[1]
        if op in ("Identity", "Dropout", "MaxPool", "AveragePool", "GlobalAveragePool"):
            return self.tensor_covariance(node.input[0])
        act, _ = activation_of(self.graph, node, self.shapes)
        source = self.tensor_moments(node.input[0])
        if act is None or source is None:
            return None
        cov_in = self.tensor_covariance(node.input[0])
        if cov_in is None:
            return None
        corr, _ = cov_to_corr(cov_in)
        return nearest_psd(activation_covariance(source[0], np.sqrt(np.maximum(source[1], 0.0)), corr, act))

    def _linear_output_covariance(self, node, moments: Moments) -> Optional[np.ndarray]:
        layer = read_layer(self.graph, node)
        source = self.tensor_moments(node.input[0])
        if layer is None or layer.group != 1 or source is None or source[1].shape[0] != layer.rows.shape[1]:
            return None
        input_corr = None
        cov_in = self.tensor_covariance(node.input[0])
        if cov_in is not None:
            input_corr, _ = cov_to_corr(cov_in)
        corr = self._output_correlation(layer.rows, source[1], input_corr, node)
        std = np.sqrt(np.maximum(moments[1], 0.0))
        if std.shape[0] != corr.shape[0]:
            return None
        return corr * std[:, None] * std[None, :]

    def _output_correlation(self, rows: np.ndarray, var_in: np.ndarray, input_corr, node=None) -> np.ndarray:
        return linear_output_correlation(rows, var_in, input_corr, self.spatial_rho, node)

    def _pooled_preactivation(self, mu, var, stage: Stage):
        for pool in stage.pools:
            if pool.op_type == "MaxPool":
                mu, var = max_of_gaussians(mu, var, int(np.prod(attr(pool, "kernel_shape", [1]))))
        return mu, np.sqrt(np.maximum(var, 0.0))

    def _stage(self, mu, var, corr, stage: Stage) -> Moments:
        """Mean and covariance after the stage's activation and pools, from pre-activation moments."""
        mu, sigma = self._pooled_preactivation(mu, var, stage)
        mean, _ = gaussian_activation_moments(mu, sigma, stage.activation)
        cov = activation_covariance(mu, sigma, corr, stage.activation)
        for pool in stage.pools:
            if pool.op_type == "AveragePool":
                k = list(attr(pool, "kernel_shape", [1, 1])) + [1]
                cov = cov * mean_spatial_correlation(k[0], k[1], self.spatial_rho)
        return np.asarray(mean, np.float64), np.asarray(cov, np.float64)

    def activation_slope(self, mu: np.ndarray, var: np.ndarray, stage: Stage) -> np.ndarray:
        """E[f'(z)] per channel (first Hermite coefficient over sigma): how pre-activation noise passes."""
        mu, sigma = self._pooled_preactivation(mu, var, stage)
        c = hermite_coefficients(mu, sigma, stage.activation, 1)
        return np.where(sigma > 0, c[:, 1] / np.maximum(sigma, 1e-12), 1.0)

    def restrict(self, path, kept: np.ndarray) -> None:
        """After pruning: keep only channels `kept` in the moments of every tensor on a chain's path.

        path: [(tensor, columns per channel)]; a flattened tensor keeps whole column blocks.
        """
        for tensor, block in path:
            self._tensor_cov.pop(tensor, None)
            cached = self._cache.get(tensor)
            if cached is not None and cached[0].shape[0] > kept.max(initial=0):
                self._cache[tensor] = (cached[0][kept], cached[1][np.ix_(kept, kept)])
            moments = self.moments.get(tensor)
            if moments is None:
                continue
            index = kept if block == 1 else (kept[:, None] * block + np.arange(block)[None, :]).ravel()
            if moments[0].shape[0] >= index.max(initial=0) + 1:
                self.moments[tensor] = (moments[0][index], moments[1][index])


def linear_output_correlation(rows: np.ndarray, var_in: np.ndarray, input_corr, spatial_rho: float,
                              node=None) -> np.ndarray:
    """(N, N) correlation of a linear layer's outputs: `W (Rin kron R_taps) W^T` with the input variances
    (`conv_preactivation_covariance`; rows (N, C, *taps), var_in (C,), input_corr (C, C) or None).

    A ConvTranspose (stride s, dilation 1) output pixel of phase (p_y, p_x) sums only the taps
    `rows[..., p_y::s_y, p_x::s_x]`, and neighbouring taps of one phase read neighbouring input pixels:
    its covariance is the average over the s_y s_x phases of each sub-kernel's conv covariance.
    """
    def covariance(taps):
        return conv_preactivation_covariance(taps, var_in, spatial_rho=spatial_rho, input_corr=input_corr)

    strides = list(attr(node, "strides", None) or []) if node is not None else []
    dilations = list(attr(node, "dilations", None) or []) if node is not None else []
    phased = (node is not None and node.op_type == "ConvTranspose" and rows.ndim == 4 and len(strides) == 2
              and max(strides) > 1 and all(d == 1 for d in dilations))
    if not phased:
        corr, _ = cov_to_corr(covariance(rows))
        return corr
    sy, sx = int(strides[0]), int(strides[1])
    phases = [rows[:, :, py::sy, px::sx] for py in range(sy) for px in range(sx)]
    corr, _ = cov_to_corr(sum(covariance(taps) for taps in phases if taps.size) / (sy * sx))
    return corr
