"""Test-time augmentation: centre crops at a few scales, each resized back by the preprocessor.

No horizontal flip: a mirror image swaps the driving side and the sun's side, which are real cues for a
US state, so a flip would feed the model views it never sees in the wild.
"""

from __future__ import annotations

from geoloc.preprocess import crop_views  # noqa: F401 - the TTA crop, re-exported

DEFAULT_SCALES = (1.0, 0.9, 0.8)  # what ``--tta scales`` means: the full view and two centre crops


def parse_scales(text: str | None) -> tuple[float, ...]:
    """``"1.0,0.9"`` (comma or space separated) -> ``(1.0, 0.9)``; ``None``/``"none"`` -> ``(1.0,)``;
    ``"scales"`` -> :data:`DEFAULT_SCALES`."""
    if text is None or text.strip().lower() in ("", "none"):
        return (1.0,)
    if text.strip().lower() == "scales":
        return DEFAULT_SCALES
    try:
        scales = tuple(float(t) for t in text.replace(",", " ").split())
    except ValueError:
        raise ValueError(f"--tta {text!r}: expected numbers like '1.0,0.9'") from None
    for s in scales:
        if not 0.0 < s <= 1.0:
            raise ValueError(f"--tta {text!r}: scale {s} is not in (0, 1]")
    return scales
