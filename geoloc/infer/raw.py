"""The raw test folder (``ROOT/test_images`` + the submission template) as batches in the loader contract.

For ``infer.py --data-root``: no shards needed. Rows of the template are split over ranks round-robin
(every row on exactly one rank), each view is decoded exactly as the shard loader decodes it
(``geoloc.data.decode_image``), and an unreadable or missing view is masked out, logged and counted,
never a reason to drop the sample. So is a view whose cell is an absolute path or holds ``..``
(``contract.image_path_problem``): it is never opened, so a template cannot make infer.py read outside
``ROOT/test_images`` (counted with the bad views; the warning says ``bad_path``). Batches are the dicts of
``geoloc.data.collate``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from geoloc.contract import IMAGE_COLUMNS, TEST_IMAGES, image_path_problem
from geoloc.data import IMAGE_SIZE, ImageDecodeError, LoadStats, collate, decode_image

log = logging.getLogger(__name__)


def refused(name: str, column: str, sample_id: str, stats: LoadStats) -> bool:
    """Whether the cell points outside the images folder (then logged and counted as a bad view)."""
    problem = image_path_problem(name)
    if problem:
        log.warning("sample %s: %s: bad_path: %s; view masked out", sample_id, column, problem)
        stats.add("bad_views")
    return problem is not None


def read_view(path: Path, sample_id: str, stats: LoadStats) -> torch.Tensor | None:
    """uint8 ``(3, 256, 256)``, or None (logged, counted) when the file is missing or undecodable."""
    try:
        return decode_image(path.read_bytes())
    except FileNotFoundError:
        log.warning("sample %s: view %s is missing; masked out", sample_id, path)
        stats.add("missing_views")
    except (ImageDecodeError, OSError) as err:
        log.warning("sample %s: view %s is unreadable (%s); masked out", sample_id, path, err)
        stats.add("bad_views")
    return None


class RawTestDataset(Dataset):
    """This rank's rows of the template (``rank::world_size``), each a sample dict for ``collate``."""

    def __init__(self, root: str | Path, template: pd.DataFrame, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.folder = Path(root) / TEST_IMAGES
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder}: test image folder not found")
        rows = template.iloc[rank::world_size]
        self.ids = rows["sample_id"].astype(str).tolist()
        self.names = rows[list(IMAGE_COLUMNS)].astype(str).to_numpy()  # (N, 4) file names
        self.stats = LoadStats()  # shared memory: DataLoader workers count into it too

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        sid = self.ids[i]
        views = [
            None if refused(name, col, sid, self.stats) else read_view(self.folder / name, sid, self.stats)
            for name, col in zip(self.names[i], IMAGE_COLUMNS)
        ]
        blank = torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
        self.stats.add("samples")
        return {
            "images": torch.stack([blank if v is None else v for v in views]),  # (4, 3, 256, 256)
            "view_mask": torch.tensor([v is not None for v in views]),  # (4,)
            "label": -1,
            "latlon": torch.full((2,), float("nan")),
            "sample_id": sid,
        }


def make_raw_loader(
    root: str | Path,
    template: pd.DataFrame,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
) -> DataLoader:
    """Batches of this rank's template rows, in template order; ``loader.dataset.stats`` counts bad views."""
    dataset = RawTestDataset(root, template, rank, world_size)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate,
        persistent_workers=False,
    )  # fmt: skip
