"""The model's heads, by name. Each reads the fused, normalised sample embedding ``h (B, D')`` and owns
three things: its output, its loss term, and how that output becomes per-sample predictions.

``model.heads`` lists the heads a model has (``HEADS`` resolves the names); the model's forward returns
``{"embedding": (B, D'), <head name>: <its output>}``, :class:`geoloc.losses.Criterion` sums the weighted
``loss_<name>`` terms, and :mod:`geoloc.decoders` turns the heads' predictions into the top-5 states and
the point. Adding a head: a class here registered in ``HEADS``, and its weight in ``loss.weights``
(ARCHITECTURE.md, "How to add a head").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from geoloc.contract import US_BOX, VIEWS

METRIC_DIM = 128  # width of the metric head's unit embedding
VAE_LATENT = 32  # the VAE head's latent size
THUMB_SIZE = 16  # side of the low-resolution view the VAE head reconstructs (pixels)


@dataclass(frozen=True)
class HeadSizes:
    """Output sizes a head may need: contiguous state classes, geocells (0 without cells)."""

    num_classes: int
    num_cells: int = 0


@dataclass(frozen=True)
class Targets:
    """What the loss terms need beyond the batch, on the training device; built once per run."""

    centroids: torch.Tensor  # (C, 2) mean lat/lon of each class's training points
    dist: torch.Tensor  # (C, C) km between class centroids
    cell_centroids: torch.Tensor | None  # (K, 2) geocell centroids, or None without cells
    soft_labels: str  # "state" | "sample" (loss.soft_labels)
    tau_km: float  # haversine smoothing temperature (loss.tau_km)
    gps_loss: str  # loss.gps_loss
    metric: object = None  # geoloc.metric.MetricMiner when the model has a metric head (mutable: its bandit)
    vae_kl_weight: float = 1e-3  # loss.vae_kl_weight: the KL term's weight inside the vae head's term


class Fp32Linear(nn.Linear):
    """A head's last Linear, computed and returned in fp32 under autocast and with bf16 weights.

    bf16 has 8 mantissa bits: a bf16 longitude moves in 0.5 degree steps (~40 km), and logits that
    differ by less than a step tie in the top-5. The layer is tiny, so fp32 costs nothing. Same
    parameter names as ``nn.Linear``, and a module call, so ZeRO-3 still gathers its weights.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in) -> (B, out) fp32
        bias = None if self.bias is None else self.bias.float()
        with torch.autocast(device_type=x.device.type, enabled=False):
            return nn.functional.linear(x.float(), self.weight.float(), bias)


def mlp(dim: int, hidden: int, out: int, dropout: float | None, depth: int = 1) -> nn.Sequential:
    """``depth`` hidden GELU layers (halving after the first), dropout (None: no layer), then a small
    fp32 output layer."""
    layers, width = [], dim
    for i in range(depth):
        size = hidden if i == 0 else hidden // 2
        layers += [nn.Linear(width, size), nn.GELU()]
        width = size
    layers += ([] if dropout is None else [nn.Dropout(dropout)]) + [Fp32Linear(width, out)]
    net = nn.Sequential(*layers)
    nn.init.normal_(net[-1].weight, std=1e-3)  # small last layer: near-uniform logits / the box centre
    nn.init.zeros_(net[-1].bias)
    return net


def bound_latlon(z: torch.Tensor) -> torch.Tensor:
    """Unbounded (B, 2) -> (lat, lon) degrees inside the US box via tanh, at least in fp32."""
    z = z.to(torch.promote_types(z.dtype, torch.float32))  # bf16 degrees come in 0.25-1 degree steps
    lo = z.new_tensor([US_BOX["lat"][0], US_BOX["lon"][0]])
    hi = z.new_tensor([US_BOX["lat"][1], US_BOX["lon"][1]])
    return (lo + hi) / 2 + (hi - lo) / 2 * torch.tanh(z)


class Head(nn.Module):
    """One output of the model. Subclasses set ``name`` and implement the three methods.

    ``loss`` returns the head's term, or a dict with the term under ``"loss"`` and further named values
    to log beside it (e.g. the parts of the term); only the term enters the weighted sum. A head with
    ``needs_thumbnails`` reads ``batch["thumb"]`` (B, V, 3, THUMB_SIZE, THUMB_SIZE) uint8 and
    ``batch["view_mask"]`` in its loss (``geoloc.losses.Criterion.loss_batch`` provides them).
    """

    name: ClassVar[str]
    needs_thumbnails: ClassVar[bool] = False

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def loss(out: torch.Tensor, batch: dict, targets: Targets) -> torch.Tensor | dict[str, torch.Tensor]:
        """The head's loss term (fp32 scalar) for a labelled batch on the device, or ``{"loss": term, ...}``."""
        raise NotImplementedError

    @staticmethod
    def predict(out: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample prediction arrays (fp32), e.g. ``{"state_probs": (B, C)}``."""
        raise NotImplementedError


class StateHead(Head):
    """Logits over the contiguous state classes, trained on haversine-smoothed targets (PIGEON)."""

    name = "state"

    def __init__(self, dim: int, hidden: int, dropout: float, sizes: HeadSizes):
        super().__init__()
        self.net = mlp(dim, hidden, sizes.num_classes, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, D') -> (B, C) fp32 logits
        return self.net(h)

    @staticmethod
    def loss(out, batch, targets):
        from geoloc.geo import make_soft_labels
        from geoloc.losses import soft_cross_entropy

        soft = make_soft_labels(targets.soft_labels, batch["label"], batch["latlon"], targets.centroids,
                                targets.dist, targets.tau_km)  # (B, C)  # fmt: skip
        return soft_cross_entropy(out, soft)

    @staticmethod
    def predict(out):
        return {"state_probs": torch.softmax(out.float(), dim=-1)}


class GpsHead(Head):
    """A point (lat, lon) in degrees, inside the US box, regressed directly."""

    name = "gps"

    def __init__(self, dim: int, hidden: int, dropout: float, sizes: HeadSizes):
        super().__init__()
        self.net = mlp(dim, hidden, 2, None, depth=2)  # no dropout on a regression

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, D') -> (B, 2) fp32 degrees
        return bound_latlon(self.net(h))

    @staticmethod
    def loss(out, batch, targets):
        from geoloc.losses import gps_loss

        return gps_loss(out, batch["latlon"], targets.gps_loss)

    @staticmethod
    def predict(out):
        return {"gps": out.float()}


class CellHead(Head):
    """Logits over geocells nested in states; targets smoothed over cells by haversine distance from the
    sample's own point (PIGEON): ``p_i ∝ exp(-d(cell_i, x) / tau)``."""

    name = "cell"

    def __init__(self, dim: int, hidden: int, dropout: float, sizes: HeadSizes):
        super().__init__()
        if sizes.num_cells < 1:
            raise ValueError("model.heads has 'cell' but no geocells were built for this run")
        self.net = mlp(dim, hidden, sizes.num_cells, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, D') -> (B, K) fp32 logits
        return self.net(h)

    @staticmethod
    def loss(out, batch, targets):
        from geoloc.geo import haversine_km
        from geoloc.losses import soft_cross_entropy

        x, cells = batch["latlon"].float(), targets.cell_centroids  # (B, 2), (K, 2)
        d = haversine_km(x[:, None, 0], x[:, None, 1], cells[None, :, 0], cells[None, :, 1])  # (B, K)
        return soft_cross_entropy(out, torch.softmax(-d / targets.tau_km, dim=-1))

    @staticmethod
    def predict(out):
        return {"cell_probs": torch.softmax(out.float(), dim=-1)}


class MetricHead(Head):
    """A unit embedding ``z`` for metric learning on location (:mod:`geoloc.metric`): places within
    ``loss.metric_d_pos_km`` pulled together, negatives of a difficulty band (chosen per batch by a UCB
    bandit) pushed apart. An auxiliary head: it trains the shared embedding and predicts nothing."""

    name = "metric"

    def __init__(self, dim: int, hidden: int, dropout: float, sizes: HeadSizes):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), Fp32Linear(hidden, METRIC_DIM))

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, D') -> (B, E) fp32, unit length
        return F.normalize(self.net(h), dim=-1)

    @staticmethod
    def loss(out, batch, targets):
        if targets.metric is None:
            raise ValueError("the metric head's loss needs Targets.metric (a geoloc.metric.MetricMiner)")
        return targets.metric(out, batch)

    @staticmethod
    def predict(out):
        return {}


def thumbnails(images: torch.Tensor, size: int = THUMB_SIZE) -> torch.Tensor:
    """uint8 views ``(B, V, 3, S, S)`` -> ``(B, V, 3, size, size)`` uint8 area means (exact for S a multiple
    of ``size``: sums of at most 65536 bytes are exact in fp32), on the views' device."""
    b, v = images.shape[:2]
    small = F.adaptive_avg_pool2d(images.flatten(0, 1).float(), size)  # (B*V, 3, size, size)
    return small.round().clamp(0, 255).to(torch.uint8).view(b, v, 3, size, size)


def split_vae(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The vae head's packed output (B, 2L + V*3*T*T) -> mu (B, L), logvar (B, L), logits (B, V, 3, T, T)."""
    mu, logvar, recon = out.split([VAE_LATENT, VAE_LATENT, out.shape[1] - 2 * VAE_LATENT], dim=1)
    return mu, logvar, recon.reshape(out.shape[0], len(VIEWS), 3, THUMB_SIZE, THUMB_SIZE)


class VaeHead(Head):
    """A small VAE on the fused embedding: ``h -> (mu, logvar) -> z -> 16x16 thumbnails of the views``.

    An auxiliary, multi-task term (reconstruction MSE over the present views + ``loss.vae_kl_weight`` x
    KL) that keeps the shared embedding describing what the views look like; predicts nothing. Samples
    ``z`` in training (the reparameterisation), takes ``mu`` in eval. Its output is one fp32 tensor
    (``split_vae`` unpacks it) so predictions, gathers and logs treat it like any head output.
    """

    name = "vae"
    needs_thumbnails = True

    def __init__(self, dim: int, hidden: int, dropout: float, sizes: HeadSizes):
        super().__init__()
        pixels = len(VIEWS) * 3 * THUMB_SIZE * THUMB_SIZE
        self.encoder = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), Fp32Linear(hidden, 2 * VAE_LATENT))
        self.decoder = nn.Sequential(nn.Linear(VAE_LATENT, hidden), nn.GELU(), Fp32Linear(hidden, pixels))

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, D') -> (B, 2L + V*3*T*T) fp32
        mu, logvar = self.encoder(h).chunk(2, dim=-1)  # (B, L) each
        logvar = logvar.clamp(-10.0, 10.0)  # exp() stays finite whatever the encoder does early on
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if self.training else mu
        recon = self.decoder(z.to(h.dtype))  # h's dtype: bf16 weights under DeepSpeed bf16
        return torch.cat([mu, logvar, recon], dim=1)

    @staticmethod
    def loss(out, batch, targets):
        if "thumb" not in batch:
            raise ValueError("the vae head's loss needs batch['thumb'] (geoloc.losses.Criterion.loss_batch)")
        mu, logvar, recon = split_vae(out.float())
        target = batch["thumb"].float() / 255.0  # (B, V, 3, T, T) in [0, 1]
        mask = batch["view_mask"].float()  # (B, V): a missing view is not reconstructed
        err = (torch.sigmoid(recon) - target).pow(2).mean(dim=(2, 3, 4))  # (B, V)
        rec = (err * mask).sum() / mask.sum().clamp_min(1)
        kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).sum(-1).mean()  # KL(q(z|h) || N(0, I))
        return {"loss": rec + targets.vae_kl_weight * kl, "loss_vae_rec": rec, "loss_vae_kl": kl}

    @staticmethod
    def predict(out):
        return {}


HEADS: dict[str, type[Head]] = {cls.name: cls for cls in (StateHead, GpsHead, CellHead, MetricHead, VaeHead)}


def build_heads(names, dim: int, hidden: int, dropout: float, sizes: HeadSizes) -> nn.ModuleDict:
    """The heads ``names`` (``model.heads``) by name, reading ``dim``-wide embeddings."""
    unknown = [n for n in names if n not in HEADS]
    if unknown:
        raise ValueError(f"model.heads: unknown head(s) {unknown}; choose from {sorted(HEADS)}")
    return nn.ModuleDict({n: HEADS[n](dim, hidden, dropout, sizes) for n in names})
