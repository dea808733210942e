"""From head outputs to the competition's answer: state probabilities (the top 5) and one point per sample.

A :class:`Decoder` runs batch-wise on the device, so infer.py decodes as it predicts, on every rank (the
retrieval index is read-only and lives there too). :class:`~geoloc.config.DecodeConfig` chooses:

- ``state``: ``head`` (the state head's softmax) or ``cells`` (each state's summed cell probabilities,
  so the top 5 states come from the cells); ``auto`` = cells when the model has a cell head;
- ``gps``: ``regression`` (the GPS head), ``cell`` (the most likely cell's centroid), ``bayes`` (the point
  of least expected distance: the spherical median of the top cells' centroids weighted by probability),
  ``knn`` (the spherical median of the nearest training samples' points); ``auto`` = bayes with cells,
  else regression;
- ``knn_alpha`` > 0 blends the nearest training samples' state vote into the state probabilities.

The retrieval index (``geoloc.retrieval.EmbeddingIndex`` of fused training embeddings) is needed for
``knn`` and ``knn_alpha``; it is built at the end of training and travels with the exported model.
"""

from __future__ import annotations

import torch

from geoloc.errors import GeolocError
from geoloc.heads import HEADS


class DecoderError(GeolocError, ValueError):
    """A decoding choice the model cannot serve (no cell head, no index, ...); names the option."""


def resolve(spec, heads: list[str], has_index: bool) -> tuple[str, str]:
    """``(state, gps)`` decoders for a model with ``heads``, ``auto`` resolved; errors name the option."""
    state = spec.state if spec.state != "auto" else ("cells" if "cell" in heads else "head")
    gps = spec.gps if spec.gps != "auto" else ("bayes" if "cell" in heads else "regression")
    needs = {"head": "state", "cells": "cell", "regression": "gps", "cell": "cell", "bayes": "cell"}
    for option, value in (("decode.state", state), ("decode.gps", gps)):
        if value in needs and needs[value] not in heads:
            raise DecoderError(f"{option}={value} needs a {needs[value]!r} head; the model has {heads}")
    if (gps == "knn" or spec.knn_alpha > 0) and not has_index:
        raise DecoderError("decode.gps=knn and decode.knn_alpha > 0 need the model's retrieval index")
    return state, gps


class Decoder:
    """``decoder(outputs) -> {"state_probs": (B, C), "gps": (B, 2)}`` fp32, from a model's raw outputs.

    ``cells`` (``geoloc.geocells.GeoCells``) and ``index`` (``geoloc.retrieval.EmbeddingIndex``) are those
    of the model (None when it has none); ``encoder`` maps cells and neighbours to contiguous classes.
    ``passthrough`` names raw outputs handed on unchanged (as fp32) beside the decoded values, e.g.
    ``("embedding",)`` for the fused embeddings that ``infer.py --eval`` pictures.
    """

    def __init__(self, spec, heads: list[str], encoder, cells=None, index=None, device="cpu", passthrough=()):
        self.spec, self.heads = spec, list(heads)
        self.passthrough = tuple(passthrough)
        self.state, self.gps = resolve(spec, self.heads, index is not None)
        self.num_classes = encoder.num_classes
        self.index = None if index is None else index.to(device)
        if cells is not None:
            self.cell_class = torch.as_tensor(cells.cell_to_class(encoder), device=device)  # (K,)
            self.cell_centroids = torch.as_tensor(
                cells.centroid, dtype=torch.float64, device=device
            )  # (K, 2)

    def name(self) -> str:
        """A short label, e.g. ``cells+bayes+knn0.5``."""
        knn = f"+knn{self.spec.knn_alpha:g}" if self.spec.knn_alpha > 0 else ""
        return f"{self.state}+{self.gps}{knn}"

    def __call__(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        preds = {}
        for name in self.heads:  # e.g. state_probs (B, C), gps (B, 2), cell_probs (B, K)
            preds |= HEADS[name].predict(outputs[name])
        neighbours = self._neighbours(outputs["embedding"]) if self.index is not None else None
        probs = preds["state_probs"] if self.state == "head" else self._cell_states(preds["cell_probs"])
        if self.spec.knn_alpha > 0:
            probs = (1 - self.spec.knn_alpha) * probs + self.spec.knn_alpha * self._knn_states(*neighbours)
        passed = {name: outputs[name].float() for name in self.passthrough}  # e.g. embedding (B, D')
        return {"state_probs": probs.float(), "gps": self._point(preds, neighbours).float(), **passed}

    def _cell_states(self, cell_probs: torch.Tensor) -> torch.Tensor:
        """(B, K) -> (B, C): each state's cells summed."""
        out = cell_probs.new_zeros(cell_probs.shape[0], self.num_classes)
        return out.index_add_(1, self.cell_class.to(cell_probs.device), cell_probs)

    def _point(self, preds: dict, neighbours) -> torch.Tensor:
        from geoloc.gps_decoding import argmax_centroid, bayes_point
        from geoloc.retrieval import knn_location

        if self.gps == "regression":
            return preds["gps"]
        if self.gps == "knn":
            sims, idx = neighbours
            return knn_location(sims, idx, self.index.latlon, self.spec.knn_temperature)
        cells = preds["cell_probs"].double()
        if self.gps == "cell":
            return argmax_centroid(cells, self.cell_centroids.to(cells.device))
        return bayes_point(cells, self.cell_centroids.to(cells.device), self.spec.bayes_top_k)

    def _neighbours(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosine similarities and indices of the ``knn_k`` nearest training samples: (B, k), (B, k)."""
        sims, idx = self.index.search(
            embedding.float().to(self.index.device), k=self.spec.knn_k, backend="auto"
        )
        return sims.to(embedding.device), idx.to(embedding.device)

    def _knn_states(self, sims: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        from geoloc.retrieval import knn_state_probs

        return knn_state_probs(sims, idx, self.index.label, self.num_classes, self.spec.knn_temperature)
