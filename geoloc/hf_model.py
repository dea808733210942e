"""An exported model directory as a transformers model: ``GeolocModel.from_pretrained(dir)``.

:class:`GeolocConfig` (``model_type = "geoloc"``) is what ``config.json`` holds (written at export by
``geoloc.hub_config.hub_config_dict``); :class:`GeolocModel` is a ``PreTrainedModel`` whose modules ARE a
``GeoModel``'s (``backbone``, ``fusion``, ``norm``, ``heads``), so its state-dict keys are exactly those of
``model.safetensors`` and one weights file serves both loaders. Importing this module registers both
classes with ``AutoConfig`` / ``AutoModel``, so ``AutoModel.from_pretrained(dir)`` works too.

Loading goes through :func:`geoloc.export.load_model_dir`: the weights' (and index's) sha256 is verified,
every malformed file is an error naming it, and nothing from the directory is ever executed (a
``config.json`` that asks for code, ``auto_map``, is refused). The model therefore predicts exactly what
``load_model_dir(dir).model`` predicts. The directory's metadata (label encoder, cells, retrieval index,
default decoder, preprocessing, prior) comes along as ``model.loaded`` (a ``LoadedModel`` whose
``model`` is this model), with :meth:`GeolocModel.decoder` as the shortcut to decode outputs.

A hub id instead of a directory is downloaded with ``huggingface_hub.snapshot_download`` first (same
checks). Weights are written by ``train.py`` only (``save_pretrained`` refuses); an exported directory is
pushed with ``python -m geoloc.hub push DIR REPO``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from geoloc.errors import GeolocError
from geoloc.export import FORMAT_VERSION, META, MODEL_TYPE, LoadedModel, load_model_dir
from geoloc.hub_config import check_hub_config
from geoloc.model import GeoModel

# what AutoModel and transformers' hub plumbing pass on to ``from_pretrained``; none of it changes what a
# geoloc directory loads as, so it is accepted and not used (``revision`` etc. reach snapshot_download)
HUB_KWARGS = ("revision", "cache_dir", "force_download", "local_files_only", "token", "proxies")
IGNORED_KWARGS = ("_from_auto", "_from_pipeline", "trust_remote_code", "adapter_kwargs", "code_revision",
                  "subfolder")  # fmt: skip


class HubLoadError(GeolocError, ValueError):
    """``from_pretrained`` was asked for something a geoloc model directory cannot give; names it."""


class GeolocConfig(PretrainedConfig):
    """``config.json`` of an exported model: the shapes (the backbone's vision config of any family, pooling, the run's ``model``
    config section, classes, cells) and the label mapping; ``geoloc.json`` stays the source of truth."""

    model_type = MODEL_TYPE
    geoloc_format: int = FORMAT_VERSION
    geoloc_meta: str = META  # the file that holds everything else (encoder, cells, decoder, prior, ...)
    clip_vision: dict | None = (
        None  # backbone_config.json's content (CLIP, DINOv2 or SigLIP; name kept for format 2)
    )
    pooling: str = "projection"
    geoloc_model: dict | None = (
        None  # the resolved config's `model` section (fusion, heads, head_hidden, ...)
    )
    embed_dim: int = 0
    num_classes: int = 0
    num_cells: int = 0
    num_views: int = 4
    state_indices: list | None = None  # contiguous class -> original state index


def model_from_config(config: GeolocConfig) -> GeoModel:
    """A GeoModel shaped as ``config`` says, with fresh weights (no file read)."""
    from geoloc.backbone import backbone_from_config
    from geoloc.config import ModelConfig
    from geoloc.heads import HeadSizes

    if not config.clip_vision or not config.geoloc_model:
        raise HubLoadError("GeolocConfig needs clip_vision and geoloc_model (write it with geoloc.export)")
    backbone, dim = backbone_from_config(config.clip_vision, config.pooling)
    sizes = HeadSizes(config.num_classes, config.num_cells)
    return GeoModel(backbone, dim, ModelConfig(**config.geoloc_model), sizes, config.num_views)


class GeolocModel(PreTrainedModel):
    """``model(pixel_values (B, V, 3, H, W), view_mask (B, V)) -> {"embedding": (B, D'), <head>: ...}``,
    exactly ``GeoModel``'s forward; ``model.decoder()`` turns the outputs into state probabilities and a
    point (the directory's default decoding)."""

    config_class = GeolocConfig
    base_model_prefix = ""
    main_input_name = "pixel_values"
    # GeoModel's own code, run on this model's identical attributes (backbone, fusion, norm, heads)
    forward_features = GeoModel.forward_features
    forward_head = GeoModel.forward_head

    def __init__(
        self, config: GeolocConfig, geo_model: GeoModel | None = None, loaded: LoadedModel | None = None
    ):
        super().__init__(config)
        geo = geo_model if geo_model is not None else model_from_config(config)
        self.backbone, self.fusion, self.norm, self.heads = geo.backbone, geo.fusion, geo.norm, geo.heads
        self.embed_dim, self.num_classes, self.num_cells = geo.embed_dim, geo.num_classes, geo.num_cells
        self.loaded = None if loaded is None else _rebind(loaded, self)
        self.post_init()

    def init_weights(self):
        """Nothing: GeoModel's constructors initialise, and loading replaces every weight. (transformers'
        own initialisation would overwrite adopted, already trained modules.)"""

    def forward(self, pixel_values: torch.Tensor, view_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_head(self.forward_features(pixel_values, view_mask), view_mask)

    def decoder(self, spec=None, device=None, passthrough: tuple[str, ...] = ()):
        """The directory's :class:`geoloc.decoders.Decoder` (``spec`` default: its recorded decoding)."""
        if self.loaded is None:
            raise HubLoadError("a GeolocModel built from a config alone has no decoder: use from_pretrained")
        return self.loaded.decoder(spec, device or self.device, passthrough)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, device="cpu", **kwargs):
        """Load an exported model directory (or a hub id holding one) through ``load_model_dir``."""
        unknown = sorted(set(kwargs) - set(HUB_KWARGS) - set(IGNORED_KWARGS))
        if model_args or unknown:
            raise HubLoadError(
                f"GeolocModel.from_pretrained takes no {unknown or 'positional model arguments'}"
            )
        path = resolve_model_dir(
            pretrained_model_name_or_path, **{k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
        )
        loaded = load_model_dir(path, device)
        saved = GeolocConfig.from_dict(check_hub_config(path, loaded))
        saved.name_or_path = str(pretrained_model_name_or_path)
        if config is not None and _fields(config) != _fields(saved):  # AutoModel passes config.json's
            raise HubLoadError(f"{path}: the config passed differs from its config.json")
        return cls(saved, geo_model=loaded.model, loaded=loaded).eval()

    def save_pretrained(self, *args, **kwargs):
        raise HubLoadError(
            "GeolocModel does not write weights: train.py exports the model directory "
            "(geoloc.export.save_model_dir); push one with `python -m geoloc.hub push DIR REPO`"
        )


def _fields(config: PretrainedConfig) -> dict:
    return {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}


def _rebind(loaded: LoadedModel, model: GeolocModel) -> LoadedModel:
    from dataclasses import replace

    return replace(loaded, model=model)


def resolve_model_dir(name_or_path, **hub_kwargs) -> Path:
    """A local directory as is; else a hub id, downloaded (or found in the cache) with snapshot_download."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(str(name_or_path))
    except HFValidationError:
        raise FileNotFoundError(f"{name_or_path}: model directory not found (nor a valid hub id)") from None
    try:
        return Path(huggingface_hub.snapshot_download(str(name_or_path), **hub_kwargs))
    except Exception as err:  # offline, not in the cache, no such repo, no access: one clear message
        raise FileNotFoundError(
            f"{name_or_path}: no such model directory, and the hub did not give it ({type(err).__name__}: {err})"
        ) from err


AutoConfig.register(MODEL_TYPE, GeolocConfig, exist_ok=True)
AutoModel.register(GeolocConfig, GeolocModel, exist_ok=True)
