"""Hub format: push an exported model directory to the Hugging Face hub, and load one with ``from_pretrained``.

    python -m geoloc.hub push RUN/model OWNER/NAME [--private] [--message TEXT]
    python train.py ... --push-to-hub OWNER/NAME     # the same, once training has ended

An exported directory (``geoloc.export``) already is a hub repository: ``model.safetensors``,
``config.json`` (``model_type: geoloc``), the model card ``README.md`` and geoloc's own files. Pushing
checks the target first (:func:`check_push_target`: not offline, a valid repo id, a token), before any
heavy work, so ``train.py --push-to-hub`` fails at start-up and not after hours of training; then the
directory is verified (weights and index checksums) and uploaded whole with ``upload_folder``.

``GeolocModel`` and ``GeolocConfig`` (``geoloc.hf_model``) are reachable from here too; they are imported
on first use because transformers takes seconds to import (``from geoloc.hub import GeolocModel``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from geoloc.errors import GeolocError

OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
TRUE = ("1", "on", "yes", "true")


class HubError(GeolocError, ValueError):
    """A push that cannot work (offline, bad repo id, no token, a broken model directory); says why."""


def __getattr__(name: str):
    if name in ("GeolocModel", "GeolocConfig"):  # transformers is imported only when they are asked for
        from geoloc import hf_model

        return getattr(hf_model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_push_target(repo_id: str, token: str | None = None) -> str:
    """``repo_id`` if a push to it can start: not offline, a valid id, a token; else :class:`HubError`.

    Returns the token to use. Nothing is sent over the network."""
    offline = [v for v in OFFLINE_VARS if os.environ.get(v, "").strip().lower() in TRUE]
    if offline:
        raise HubError(f"cannot push to {repo_id!r}: {offline[0]} is set (offline mode); unset it to push")
    from huggingface_hub import get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise HubError(f"--push-to-hub {repo_id!r}: not a valid repo id ({err})") from None
    if "/" not in repo_id:
        raise HubError(f"--push-to-hub {repo_id!r}: give OWNER/NAME")
    token = token or get_token()
    if not token:
        raise HubError(
            f"cannot push to {repo_id!r}: no Hugging Face token (set HF_TOKEN or run `hf auth login`)"
        )
    return token


def verify_model_dir(model_dir: Path) -> None:
    """The directory loads as exported (every file, the weights' and index's checksums) and has its hub
    files; a broken one is never uploaded."""
    from geoloc.export import HUB_CONFIG, ModelDirError, load_model_dir
    from geoloc.hub_config import check_hub_config
    from geoloc.model_card import CARD

    missing = [name for name in (HUB_CONFIG, CARD) if not (model_dir / name).is_file()]
    if missing:
        raise HubError(f"{model_dir}: no {', '.join(missing)} (exported before hub support: export it again)")
    try:
        check_hub_config(model_dir, load_model_dir(model_dir))
    except (FileNotFoundError, ModelDirError) as err:
        raise HubError(f"not pushed: {err}") from None


def push_model_dir(
    model_dir: str | Path, repo_id: str, *, private: bool = False, message: str | None = None,
    token: str | None = None,
) -> str:  # fmt: skip
    """Upload the exported ``model_dir`` to the model repository ``repo_id`` (created if needed); returns
    the commit URL. Hidden files (temporary names) are left out."""
    import huggingface_hub

    token = check_push_target(repo_id, token)
    model_dir = Path(model_dir)
    verify_model_dir(model_dir)
    try:
        huggingface_hub.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
        commit = huggingface_hub.upload_folder(
            repo_id=repo_id, folder_path=str(model_dir), repo_type="model", token=token,
            commit_message=message or f"geoloc model from {model_dir}", ignore_patterns=[".*", "*/.*"],
        )  # fmt: skip
    except Exception as err:  # network, auth, quota: whatever the hub client raises, said in one line
        raise HubError(f"push of {model_dir} to {repo_id!r} failed: {type(err).__name__}: {err}") from err
    return str(getattr(commit, "commit_url", commit))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m geoloc.hub", description="Hub format of exported models.")
    sub = p.add_subparsers(dest="command", required=True)
    push = sub.add_parser("push", help="upload an exported model directory (RUN/model) to a hub repository")
    push.add_argument("model_dir", type=Path, help="the exported model directory, e.g. RUN/model")
    push.add_argument("repo_id", help="OWNER/NAME of the model repository (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--message", help="commit message")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        url = push_model_dir(args.model_dir, args.repo_id, private=args.private, message=args.message)
    except HubError as err:
        print(f"geoloc.hub: error: {err}", file=sys.stderr)
        return 1
    print(f"pushed {args.model_dir} to {args.repo_id}: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
