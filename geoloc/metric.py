"""Metric learning on location: in-batch mining by distance bands, the losses, and a UCB bandit over bands.

The ``metric`` head (:mod:`geoloc.heads`) maps the fused embedding to a unit vector ``z``; this module
trains ``z`` so that places close on the map are close in the embedding. For an anchor ``a`` and another
sample ``j`` of the batch, ``d`` is their haversine distance:

- positive: ``d <= d_pos`` (``loss.metric_d_pos_km``);
- negatives (``d > d_pos``) fall into difficulty bands:
  ``hard``: the same state (but farther than ``d_pos``), ``medium``: a neighbouring state, ``easy``: any
  other state (far away); ``all`` is every negative.

Neighbouring states are read off the training points with a haversine ``BallTree`` (scikit-learn), once
per run: two states are neighbours when some training point of one lies within
``loss.metric_neighbour_km`` of a training point of the other (:func:`location_tables`). That follows the
data (Alaska and Hawaii have no neighbours; states that only touch where nobody lives are not neighbours)
and needs no state names.

Mining happens inside each batch, so it needs no random access to the data set and works with the
streaming loader: on several ranks the batch's ``z``, points and classes are gathered (ONE collective per
batch, reached once per batch on every rank like the loop's other per-batch gathers), each rank's own
anchors are scored against the whole gathered batch, and only the local slice carries gradients (the
gathered copy of it is replaced by the local tensor).

A :class:`UCBBandit` picks the band of each batch. Its reward for a band is the relative fall of the
metric loss over all negatives (no gradient, the whole gathered batch) from the batch that trained on the
band to the next one: the band whose updates improved the objective most is picked most. Its inputs come
from the gathered batch, which is bit-identical on every rank, so every rank holds the same bandit; its
state is JSON and goes into every checkpoint (:meth:`MetricMiner.state_dict`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from geoloc.geo import EARTH_RADIUS_KM, haversine_km

BANDS = ("hard", "medium", "easy", "all")
METRIC_LOSSES = ("triplet", "multi_similarity", "infonce")
BIG = 1e4  # a finite stand-in for infinity in masked reductions: no inf - inf, no NaN gradients
MS_ALPHA, MS_BETA, MS_LAMBDA = 2.0, 50.0, 0.5  # multi-similarity loss (Wang et al. 2019) defaults
BANDIT_WINDOW = 50  # a band's value averages about its last 50 rewards (the objective drifts as it trains)
POSITIVE_SAMPLE = 4000  # training points the expected-positives estimate looks at


# ----------------------------------------------------------------------------- once per run


@dataclass(frozen=True)
class LocationTables:
    """What mining needs from the training labels, computed once per run."""

    neighbours: np.ndarray  # (C, C) bool: training points of the two classes come within neighbour_km
    positive_rate: float  # share of other training points within d_pos of a training point (mean)

    def expected_positives(self, global_batch: int) -> float:
        """Positives an anchor finds on average among ``global_batch - 1`` other samples."""
        return self.positive_rate * (global_batch - 1)


def _radians(latlon: np.ndarray) -> np.ndarray:
    return np.deg2rad(np.asarray(latlon, dtype=np.float64))  # BallTree(haversine) wants (lat, lon) radians


def _near_box(latlon: np.ndarray, mine: np.ndarray, radius_km: float) -> np.ndarray:
    """(N,) bool: points outside ``mine`` inside the bounding box of ``mine``'s points widened by
    ``radius_km`` (every point within ``radius_km`` of one of them is inside it; a class whose longitudes
    wrap, e.g. Alaska's Aleutians, spans every longitude, so nothing is missed)."""
    lat, lon = latlon[mine, 0], latlon[mine, 1]
    pad_lat = np.rad2deg(radius_km / EARTH_RADIUS_KM)
    widest = min(np.abs(lat).max() + pad_lat, 89.0)  # degrees of longitude are shortest pole-wards
    pad_lon = pad_lat / np.cos(np.deg2rad(widest))
    inside = (latlon[:, 0] >= lat.min() - pad_lat) & (latlon[:, 0] <= lat.max() + pad_lat)
    inside &= (latlon[:, 1] >= lon.min() - pad_lon) & (latlon[:, 1] <= lon.max() + pad_lon)
    return inside & ~mine


def neighbouring_classes(latlon: np.ndarray, classes: np.ndarray, num_classes: int, radius_km: float):
    """(C, C) bool: some training point of one class lies within ``radius_km`` of one of the other.

    Exact: a haversine BallTree per class, queried (nearest neighbour) only with the other classes' points
    near that class's bounding box, so the cost stays near one query per point and class nearby.
    """
    from sklearn.neighbors import BallTree

    latlon, classes = np.asarray(latlon, dtype=np.float64), np.asarray(classes, dtype=np.int64)
    rad, out = _radians(latlon), np.zeros((num_classes, num_classes), dtype=bool)
    for b in range(num_classes):
        mine = classes == b
        if not mine.any():
            continue
        box = _near_box(latlon, mine, radius_km)
        if not box.any():
            continue
        dist, _ = BallTree(rad[mine], metric="haversine").query(rad[box], k=1)  # (M, 1) radians
        out[b, np.unique(classes[box][dist[:, 0] * EARTH_RADIUS_KM <= radius_km])] = True
    return out | out.T


def positive_rate(latlon: np.ndarray, d_pos_km: float, seed: int = 0) -> float:
    """Mean share of the other training points within ``d_pos_km`` of a training point (BallTree counts
    over at most :data:`POSITIVE_SAMPLE` anchors)."""
    from sklearn.neighbors import BallTree

    rad = _radians(latlon)
    if len(rad) < 2:
        return 0.0
    anchors = rad
    if len(rad) > POSITIVE_SAMPLE:
        anchors = rad[np.random.default_rng(seed).choice(len(rad), POSITIVE_SAMPLE, replace=False)]
    radius = d_pos_km / EARTH_RADIUS_KM
    counts = BallTree(rad, metric="haversine").query_radius(anchors, radius, count_only=True)
    return float((counts - 1).mean() / (len(rad) - 1))  # minus the anchor itself


def location_tables(
    latlon: np.ndarray, classes: np.ndarray, num_classes: int, neighbour_km: float, d_pos_km: float
) -> LocationTables:
    """Neighbouring classes and the positive rate from the TRAIN points ``(N, 2)`` and classes ``(N,)``."""
    neighbours = neighbouring_classes(latlon, classes, num_classes, neighbour_km)
    return LocationTables(neighbours, positive_rate(latlon, d_pos_km))


# ----------------------------------------------------------------------------- mining


def pair_masks(
    latlon: torch.Tensor, label: torch.Tensor, anchors: slice, neighbours: torch.Tensor, d_pos_km: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Positives and band negatives of the ``anchors`` rows against every sample of the (gathered) batch.

    ``latlon`` (G, 2) degrees, ``label`` (G,) classes, ``neighbours`` (C, C) bool -> ``pos`` (A, G) and
    ``{band: (A, G)}`` bool; a sample is never its own positive or negative.
    """
    a_ll, a_lab = latlon[anchors], label[anchors]  # (A, 2), (A,)
    d = haversine_km(a_ll[:, None, 0], a_ll[:, None, 1], latlon[None, :, 0], latlon[None, :, 1])  # (A, G)
    rows = torch.arange(latlon.shape[0], device=latlon.device)[anchors]
    self_pair = rows[:, None] == torch.arange(latlon.shape[0], device=latlon.device)[None, :]
    pos = (d <= d_pos_km) & ~self_pair
    neg = (d > d_pos_km) & ~self_pair
    same = a_lab[:, None] == label[None, :]
    near = neighbours[a_lab][:, label]  # (A, G)
    bands = {"hard": neg & same, "medium": neg & near & ~same, "easy": neg & ~near & ~same, "all": neg}
    return pos, bands


def _masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` (A,) over ``valid`` rows; 0 (still attached to the graph) when none is."""
    return (values * valid).sum() / valid.sum().clamp_min(1)


def triplet_loss(sim, pos, neg, margin: float):
    """Batch-hard triplet: ``relu(max_n s_an - min_p s_ap + margin)`` per anchor. -> (A,) and valid (A,)."""
    hardest_pos = sim.masked_fill(~pos, BIG).min(1).values  # (A,)
    hardest_neg = sim.masked_fill(~neg, -BIG).max(1).values
    valid = pos.any(1) & neg.any(1)
    return torch.relu(hardest_neg - hardest_pos + margin).masked_fill(~valid, 0.0), valid


def multi_similarity_loss(sim, pos, neg, margin: float):
    """Multi-similarity (Wang et al. 2019), without its pair mining: soft weights over every positive and
    every band negative. -> (A,) and valid (A,)."""
    zero = sim.new_zeros(sim.shape[0], 1)
    p = torch.logsumexp(torch.cat([zero, (-MS_ALPHA * (sim - MS_LAMBDA)).masked_fill(~pos, -BIG)], 1), 1)
    n = torch.logsumexp(torch.cat([zero, (MS_BETA * (sim - MS_LAMBDA)).masked_fill(~neg, -BIG)], 1), 1)
    valid = pos.any(1) & neg.any(1)
    return (p / MS_ALPHA + n / MS_BETA).masked_fill(~valid, 0.0), valid


def infonce_loss(sim, pos, neg, temperature: float):
    """Supervised InfoNCE: each positive against the band negatives,
    ``-log(e^{s_ap/T} / (e^{s_ap/T} + sum_n e^{s_an/T}))``, averaged over the positives. -> (A,), (A,)."""
    logits = sim / temperature
    neg_lse = torch.logsumexp(logits.masked_fill(~neg, -BIG), 1, keepdim=True)  # (A, 1)
    per_pair = torch.logaddexp(logits, neg_lse) - logits  # (A, G)
    valid = pos.any(1) & neg.any(1)
    per_anchor = (per_pair * pos).sum(1) / pos.sum(1).clamp_min(1)
    return per_anchor.masked_fill(~valid, 0.0), valid


def metric_loss(kind: str, sim, pos, neg, margin: float, temperature: float):
    """The chosen loss per anchor ``(A,)`` and which anchors had a positive and a negative ``(A,)``."""
    if kind == "triplet":
        return triplet_loss(sim, pos, neg, margin)
    if kind == "multi_similarity":
        return multi_similarity_loss(sim, pos, neg, margin)
    if kind == "infonce":
        return infonce_loss(sim, pos, neg, temperature)
    raise ValueError(f"loss.metric_loss={kind!r}: choose one of {list(METRIC_LOSSES)}")


# ----------------------------------------------------------------------------- the bandit


@dataclass
class UCBBandit:
    """UCB1 over ``arms`` with a windowed mean per arm and an exploration bonus in reward units.

    ``score(a) = value(a) + c * scale * sqrt(ln t / n(a))``; an arm never pulled goes first (lowest index).
    ``scale`` is the mean absolute reward so far, so ``c`` needs no retuning when losses change scale.
    Deterministic: equal inputs give equal choices (ties go to the lowest index).
    """

    arms: tuple[str, ...]
    c: float = 1.0
    counts: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    scale: float = 0.0  # mean |reward| over every update
    updates: int = 0

    def __post_init__(self):
        self.arms = tuple(self.arms)
        self.counts = self.counts or [0] * len(self.arms)
        self.values = self.values or [0.0] * len(self.arms)

    def choose(self) -> int:
        t = sum(self.counts)
        if 0 in self.counts:
            return self.counts.index(0)
        bonus = [self.c * self.scale * math.sqrt(math.log(t) / n) for n in self.counts]
        scores = [v + b for v, b in zip(self.values, bonus)]
        return scores.index(max(scores))

    def pulled(self, arm: int) -> None:
        self.counts[arm] += 1

    def update(self, arm: int, reward: float) -> None:
        """Fold ``reward`` into ``arm``'s value: the plain mean for its first pulls, then a moving one."""
        self.updates += 1
        self.scale += (abs(reward) - self.scale) / self.updates
        step = max(1.0 / self.counts[arm], 1.0 / BANDIT_WINDOW)
        self.values[arm] += step * (reward - self.values[arm])

    def state_dict(self) -> dict:
        return {"arms": list(self.arms), "c": self.c, "counts": list(self.counts), "values": list(self.values),
                "scale": self.scale, "updates": self.updates}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> UCBBandit:
        return cls(tuple(d["arms"]), float(d["c"]), [int(n) for n in d["counts"]],
                   [float(v) for v in d["values"]], float(d["scale"]), int(d["updates"]))  # fmt: skip


# ----------------------------------------------------------------------------- per batch


@dataclass(frozen=True)
class MetricSettings:
    """The metric term's knobs (``loss.metric_*``)."""

    kind: str = "infonce"
    d_pos_km: float = 250.0
    margin: float = 0.2
    temperature: float = 0.1
    bands: tuple[str, ...] = ("hard", "medium", "easy")
    ucb_c: float = 1.0


class MetricMiner:
    """The metric term of one run: masks, loss, bandit, and (several ranks) the batch gather.

    ``gather``: ``accelerator.gather`` on several ranks (None alone); ``rank``: this process's index.
    """

    def __init__(self, settings: MetricSettings, neighbours: torch.Tensor, gather=None, rank: int = 0):
        unknown = [b for b in settings.bands if b not in BANDS]
        if unknown or not settings.bands:
            raise ValueError(f"loss.metric_bands={list(settings.bands)}: choose from {list(BANDS)}")
        self.settings, self.neighbours = settings, neighbours
        self.gather, self.rank = gather, rank
        self.bandit = UCBBandit(settings.bands, settings.ucb_c)
        self.pending: dict | None = None  # the last batch's band, all-band loss and global batch size

    def gathered(
        self, z: torch.Tensor, batch: dict
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, slice]:
        """``z`` (B, E), points and classes of every rank's batch -> (G, E), (G, 2), (G,), this rank's rows.

        One gather of ``[z | lat | lon | class]`` rows; the local rows of the result are ``z`` itself, so
        gradients reach this rank's embeddings (the other ranks' come back as constants)."""
        b = z.shape[0]
        latlon, label = batch["latlon"].float(), batch["label"]
        if self.gather is None:
            return z, latlon, label, slice(0, b)
        rows = torch.cat([z.detach().float(), latlon, label[:, None].float()], 1)  # (B, E + 3)
        everyone = self.gather(rows)  # (G, E + 3), ranks in order, the same on every rank
        mine = slice(self.rank * b, (self.rank + 1) * b)
        zg = torch.cat([everyone[: mine.start, :-3], z.float(), everyone[mine.stop :, :-3]])
        return zg, everyone[:, -3:-1], everyone[:, -1].long(), mine

    def __call__(self, z: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """The term for one batch and what is logged with it: ``{"loss", "band_<name>", "metric_anchors"}``."""
        s = self.settings
        zg, latlon, label, mine = self.gathered(z.float(), batch)
        progress = self.progress(zg.detach(), latlon, label)
        self.reward(progress, zg.shape[0])
        arm = self.bandit.choose()
        self.bandit.pulled(arm)
        self.pending = None if progress is None else {"arm": arm, "loss": progress, "size": zg.shape[0]}
        pos, bands = pair_masks(latlon, label, mine, self.neighbours.to(z.device), s.d_pos_km)
        sim = zg[mine] @ zg.T  # (B, G) cosine: z is unit length
        per_anchor, valid = metric_loss(s.kind, sim, pos, bands[s.bands[arm]], s.margin, s.temperature)
        one = torch.ones((), dtype=torch.float32, device=z.device)
        band = {f"band_{name}": one * (i == arm) for i, name in enumerate(s.bands)}
        return {
            "loss": _masked_mean(per_anchor, valid),
            **band,
            "metric_anchors": valid.float().mean().detach(),
        }

    @torch.no_grad()
    def progress(self, zg: torch.Tensor, latlon: torch.Tensor, label: torch.Tensor) -> float | None:
        """The loss over every negative and every anchor of the gathered batch (None: no anchor has a
        positive and a negative); the same number on every rank."""
        s, rows = self.settings, slice(0, zg.shape[0])
        pos, bands = pair_masks(latlon, label, rows, self.neighbours.to(zg.device), s.d_pos_km)
        per_anchor, valid = metric_loss(s.kind, zg @ zg.T, pos, bands["all"], s.margin, s.temperature)
        return float(_masked_mean(per_anchor, valid)) if valid.any() else None

    def reward(self, progress: float | None, size: int) -> None:
        """Reward the last batch's band with the relative fall of the all-negatives loss since then (only
        between batches of one size: a phase change alters it, and with it the loss's level)."""
        last = self.pending
        if last is not None and progress is not None and last["size"] == size:
            self.bandit.update(last["arm"], (last["loss"] - progress) / max(abs(last["loss"]), 1e-8))

    def state_dict(self) -> dict:
        """JSON: the bandit and the pending reward; a resumed run continues bit for bit."""
        return {"bandit": self.bandit.state_dict(), "pending": self.pending}

    def load_state_dict(self, d: dict) -> None:
        bandit = UCBBandit.from_dict(d["bandit"])
        if bandit.arms != self.bandit.arms:
            raise ValueError(f"saved bandit arms {list(bandit.arms)} differ from loss.metric_bands")
        self.bandit, self.pending = bandit, d["pending"]


# ----------------------------------------------------------------------------- building


def settings_of(loss_cfg) -> MetricSettings:
    """The metric knobs of a :class:`geoloc.config.LossConfig`."""
    return MetricSettings(
        kind=loss_cfg.metric_loss, d_pos_km=loss_cfg.metric_d_pos_km, margin=loss_cfg.metric_margin,
        temperature=loss_cfg.metric_temperature, bands=tuple(loss_cfg.metric_bands), ucb_c=loss_cfg.metric_ucb_c,
    )  # fmt: skip


def build_miner(cfg, tables: LocationTables, device, accelerator=None) -> MetricMiner:
    """The run's :class:`MetricMiner`; on several ranks it mines over the gathered batch (which also keeps
    every rank's bandit the same: its inputs are that batch)."""
    several = accelerator is not None and accelerator.num_processes > 1
    gather, rank = (accelerator.gather, accelerator.process_index) if several else (None, 0)
    neighbours = torch.as_tensor(tables.neighbours, dtype=torch.bool, device=device)
    return MetricMiner(settings_of(cfg.loss), neighbours, gather, rank)


def positives_note(cfg, tables: LocationTables, world_size: int) -> str:
    """How many positives an anchor can expect per batch, per phase (in-batch mining needs some)."""
    t, ranks = cfg.train, world_size
    frozen = (t.frozen_batch_size if t.cache_embeddings else t.batch_size) * ranks
    finetune = t.finetune_batch_size * ranks
    per = {name: tables.expected_positives(b) for name, b in (("frozen", frozen), ("finetune", finetune))}
    note = (
        f"metric head: an anchor finds ~{per['frozen']:.1f} positives within {cfg.loss.metric_d_pos_km:g} km in "
        f"a phase-1 batch of {frozen} and ~{per['finetune']:.1f} in a phase-2 batch of {finetune}; "
        f"{int(tables.neighbours.sum()) // 2} pairs of neighbouring states"
    )
    if min(per.values()) < 1:
        note += " (below 1: few anchors have a triplet; raise loss.metric_d_pos_km or the batch)"
    return note
