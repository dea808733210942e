"""Retrieval refinement: an exact cosine kNN index of training-sample embeddings and what to do with it.

``EmbeddingIndex`` keeps the fused embeddings ``(N, D)`` of the training samples (L2-normalised, float32)
with their labels: contiguous class ``(N,)``, point ``(N, 2)`` degrees and optionally geocell id ``(N,)``.
``search`` is exact: one matrix product per chunk of queries on the index's device (GPU or CPU), chunked so
that a chunk's ``(q, N)`` similarity block stays under ``max_block_bytes``, then ``topk``. FAISS
(``faiss-cpu``, an optional extra) is used only when asked (``backend="faiss"``, or ``"auto"`` beyond
``FAISS_MIN_SIZE`` items on CPU); its flat inner-product index is exact as well.

The neighbours then refine the head's prediction: ``knn_state_probs`` is a similarity-softmax vote,
``blend`` mixes it with the head's probabilities, and ``knn_location`` is the weighted spherical median of
the neighbours' points (optionally only those whose state is among the head's top states).

Saved as ``index.safetensors`` (tensors) + ``index.json`` (sizes and version): nothing is unpickled, so
loading a hostile file cannot run code; a malformed file is an error naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from geoloc.errors import GeolocError
from geoloc.gps_decoding import spherical_median

INDEX_TENSORS, INDEX_JSON = "index.safetensors", "index.json"
FAISS_MIN_SIZE = 200_000
BACKENDS = ("torch", "faiss", "auto")


class IndexFileError(GeolocError, ValueError):
    """A saved index is missing, malformed or inconsistent; the message names the file."""


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


@dataclass(eq=False)
class EmbeddingIndex:
    """``embeddings`` (N, D) float32 unit rows; ``label`` (N,) int64; ``latlon`` (N, 2) float64;
    ``cell`` (N,) int64 or None. Build with ``EmbeddingIndex.build`` (it normalises)."""

    embeddings: torch.Tensor
    label: torch.Tensor
    latlon: torch.Tensor
    cell: torch.Tensor | None = None

    def __post_init__(self):
        n = self.embeddings.shape[0]
        if self.embeddings.dim() != 2 or self.label.shape != (n,) or self.latlon.shape != (n, 2):
            raise ValueError(
                f"index: embeddings {tuple(self.embeddings.shape)}, label {tuple(self.label.shape)}, "
                f"latlon {tuple(self.latlon.shape)} do not describe the same N items"
            )
        if self.cell is not None and self.cell.shape != (n,):
            raise ValueError(f"index: cell {tuple(self.cell.shape)} but {n} items")
        self._faiss_index = None

    @classmethod
    def build(cls, embeddings, label, latlon, cell=None, device=None) -> EmbeddingIndex:
        """From any (N, D) embeddings and labels; stored normalised on ``device`` (default: embeddings')."""
        emb = torch.as_tensor(embeddings)
        device = device or emb.device
        return cls(
            _normalise(emb).to(device),
            torch.as_tensor(label, dtype=torch.int64).to(device),
            torch.as_tensor(latlon, dtype=torch.float64).to(device),
            None if cell is None else torch.as_tensor(cell, dtype=torch.int64).to(device),
        )

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @property
    def device(self) -> torch.device:
        return self.embeddings.device

    def to(self, device) -> EmbeddingIndex:
        cell = None if self.cell is None else self.cell.to(device)
        return EmbeddingIndex(self.embeddings.to(device), self.label.to(device), self.latlon.to(device), cell)

    def search(self, queries, k: int = 5, max_block_bytes: int = 256 << 20, backend: str = "torch"):
        """Top-``k`` cosine neighbours of ``queries`` (Q, D): similarities (Q, k) and item indices (Q, k).

        Exact; similarities sorted high to low. Results live on the index's device.
        """
        if backend not in BACKENDS:
            raise ValueError(f"unknown search backend {backend!r}; choose one of {list(BACKENDS)}")
        q = _normalise(torch.as_tensor(queries)).to(self.device)
        if q.dim() != 2 or q.shape[1] != self.embeddings.shape[1]:
            raise ValueError(
                f"queries {tuple(q.shape)} do not match the index dimension {self.embeddings.shape[1]}"
            )
        k = min(k, len(self))
        if self._use_faiss(backend):
            return self._search_faiss(q, k)
        return search_chunked(q, self.embeddings, k, max_block_bytes)

    def _use_faiss(self, backend: str) -> bool:
        if backend == "torch":
            return False
        available = _faiss() is not None and self.device.type == "cpu"
        if backend == "faiss" and not available:
            raise RuntimeError("backend='faiss' needs the faiss-cpu package and an index on the CPU")
        return available and (backend == "faiss" or len(self) >= FAISS_MIN_SIZE)

    def _search_faiss(self, q: torch.Tensor, k: int):
        if self._faiss_index is None:
            faiss = _faiss()
            self._faiss_index = faiss.IndexFlatIP(self.embeddings.shape[1])
            self._faiss_index.add(self.embeddings.contiguous().numpy())
        sims, idx = self._faiss_index.search(q.contiguous().numpy(), k)
        return torch.from_numpy(sims), torch.from_numpy(idx).to(torch.int64)

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/index.safetensors`` + ``folder/index.json``; returns the folder."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"embeddings": self.embeddings, "label": self.label, "latlon": self.latlon}
        if self.cell is not None:
            tensors["cell"] = self.cell
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / INDEX_TENSORS))
        meta = {
            "version": 1,
            "num_items": len(self),
            "dim": int(self.embeddings.shape[1]),
            "has_cell": self.cell is not None,
        }
        (folder / INDEX_JSON).write_text(json.dumps(meta, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path, device="cpu") -> EmbeddingIndex:
        """Read what ``save`` wrote; every inconsistency is an ``IndexFileError`` naming the file."""
        meta = _read_meta(Path(folder) / INDEX_JSON)
        tensors = _read_tensors(Path(folder) / INDEX_TENSORS, meta)
        return cls(**tensors).to(device)


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise IndexFileError(f"{path}: cannot read the index description: {err}") from None
    if not isinstance(meta, dict) or meta.get("version") != 1:
        raise IndexFileError(f"{path}: not a version-1 index description")
    for key in ("num_items", "dim", "has_cell"):
        if key not in meta:
            raise IndexFileError(f"{path}: missing key {key!r}")
    return meta


def _read_tensors(path: Path, meta: dict) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        t = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise IndexFileError(f"{path}: not a readable safetensors file: {err}") from None
    n, d = int(meta["num_items"]), int(meta["dim"])
    want = {
        "embeddings": ((n, d), torch.float32),
        "label": ((n,), torch.int64),
        "latlon": ((n, 2), torch.float64),
    }
    if meta["has_cell"]:
        want["cell"] = ((n,), torch.int64)
    for key, (shape, dtype) in want.items():
        if key not in t or tuple(t[key].shape) != shape or t[key].dtype != dtype:
            got = (tuple(t[key].shape), t[key].dtype) if key in t else "absent"
            raise IndexFileError(f"{path}: tensor {key!r} should be {shape} {dtype}, got {got}")
    return {key: t[key] for key in want}


def search_chunked(queries: torch.Tensor, items: torch.Tensor, k: int, max_block_bytes: int = 256 << 20):
    """Exact top-k inner products: ``(Q, D), (N, D) -> (Q, k), (Q, k)``; at most ``max_block_bytes`` of
    similarities at a time (``(q, N)`` float32 per chunk of q queries)."""
    chunk = max(1, max_block_bytes // (4 * max(1, items.shape[0])))
    sims, idx = [], []
    for lo in range(0, queries.shape[0], chunk):
        block = queries[lo : lo + chunk] @ items.T  # (q, N)
        s, i = block.topk(k, dim=1)
        sims.append(s)
        idx.append(i)
    if not sims:
        return queries.new_zeros(0, k), torch.zeros(0, k, dtype=torch.int64, device=queries.device)
    return torch.cat(sims), torch.cat(idx)


def neighbour_weights(sims: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """Softmax of the similarities over the k neighbours: ``(Q, k) -> (Q, k)``, rows sum to 1."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.softmax(sims.float() / temperature, dim=1)


def knn_state_probs(sims, idx, labels, num_classes: int, temperature: float = 0.05) -> torch.Tensor:
    """Similarity-softmax-weighted vote of the neighbours' labels: ``(Q, k), (Q, k), (N,) -> (Q, C)``.

    ``labels`` may be contiguous classes or geocell ids (then C = number of cells). Rows sum to 1.
    """
    w = neighbour_weights(sims, temperature)  # (Q, k)
    votes = torch.as_tensor(labels, device=idx.device)[idx]  # (Q, k)
    return w.new_zeros(w.shape[0], num_classes).scatter_add_(1, votes, w)


def neighbours_in_top(idx, labels, probs: torch.Tensor, top: int = 1) -> torch.Tensor:
    """``(Q, k)`` bool: whether each neighbour's label is among the row's ``top`` most likely in ``probs`` (Q, C)."""
    votes = torch.as_tensor(labels, device=idx.device)[idx]  # (Q, k)
    best = probs.topk(min(top, probs.shape[1]), dim=1).indices.to(idx.device)  # (Q, top)
    return (votes[:, :, None] == best[:, None, :]).any(-1)


def knn_location(sims, idx, latlon, temperature: float = 0.05, allowed=None) -> torch.Tensor:
    """Weighted spherical median of the neighbours' points: ``(Q, k), (Q, k), (N, 2) -> (Q, 2)`` degrees.

    ``allowed`` (Q, k) bool keeps only some neighbours (e.g. ``neighbours_in_top``); a row with none
    allowed uses all its neighbours.
    """
    w = neighbour_weights(sims, temperature).double()  # (Q, k)
    if allowed is not None:
        allowed = allowed.to(w.device)
        w = w * (allowed | ~allowed.any(1, keepdim=True))  # a row with no allowed neighbour keeps all
    points = torch.as_tensor(latlon, dtype=torch.float64, device=idx.device)[idx]  # (Q, k, 2)
    return spherical_median(points, w)


def blend(head_probs: torch.Tensor, knn_probs: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 - alpha) * head + alpha * knn`` (both (Q, C), rows summing to 1); ``alpha`` in [0, 1]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"blend alpha must lie in [0, 1], got {alpha}")
    return (1 - alpha) * head_probs + alpha * knn_probs.to(head_probs)
