"""Near-duplicate leakage: a colour-aware perceptual fingerprint per image, and the similarity
that decides whether a training image is a copy of an eval image (prepare excludes those).

The measurement behind every constant here is benchmarks/near_duplicates.py (real colour photos
from Debian's wallpaper packages, scikit-learn's and scikit-image's sample images, the demo
digits and the colour demo's emoji); params.yaml's prepare.near_duplicate_similarity has the
numbers.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from pipelines.images import convert, decode

FINGERPRINT_SIDE = 16    # luma thumbnail, pixels per side
# Weight of the colour planes against the luma plane. 1.0 on real photos: a copy with red and
# blue swapped scores median 0.65 (0.87 at 0.5: colour barely counted), copies with 1.5x the
# saturation still >= 0.975, brightened copies score higher than at 0.5.
FINGERPRINT_CHROMA = 1.0
FINGERPRINT_DEFAULTS = {"side": FINGERPRINT_SIDE, "chroma": FINGERPRINT_CHROMA}
# ITU-R BT.601 colour differences (JPEG's Cb, Cr): a gray picture has Cb = Cr = 0
_CBCR = np.array([[-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
# Crops every fingerprint is also taken of, as (left, top, right, bottom) fractions cut: a copy
# cut by up to ~10 % matches one of them. With the whole picture alone, 5 % cut from one corner
# was caught for 41 % of real photos and 10 % for 7 % (a 16 px thumbnail shifts by 0.8-1.6 px);
# with these 19, 98-100 % for every crop kind (benchmarks/near_duplicates.py).
CROPS = ((0.0, 0.0, 0.0, 0.0),) + tuple(
    box for f in (0.06, 0.12) for box in (
        (f / 2, f / 2, f / 2, f / 2),                                   # centred
        (f, f, 0, 0), (0, f, f, 0), (f, 0, 0, f), (0, 0, f, f),         # one corner
        (f, 0, 0, 0), (0, f, 0, 0), (0, 0, f, 0), (0, 0, 0, f)))        # one side


def fingerprint(data: bytes, *, side: int = FINGERPRINT_SIDE, chroma: float = FINGERPRINT_CHROMA,
                crops: tuple[tuple[float, float, float, float], ...] = CROPS,
                background: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """A colour-aware perceptual fingerprint, `(len(crops), D)` float32 unit rows (row 0: the
    whole picture; D = side^2 + 2 * (side // 2)^2): per crop, the `side` x `side` luma
    thumbnail of the upright picture (transparency on `background`) with its mean removed
    (brightness-invariant), then the two colour differences Cb, Cr at half the resolution,
    weighted by `chroma`. A gray picture has zero colour planes, so gray images compare by
    luma alone. Compare with `nearest_similarity` (crops and mirroring both ways)."""
    csize = max(1, side // 2)
    img = convert(decode(data, draft=lambda w, h: (8 * side, 8 * side)), channels=3,
                  background=background)
    w, h = img.size
    gray = img.convert("L")
    rows = []
    for left, top, right, bottom in crops:
        box = (left * w, top * h, w - right * w, h - bottom * h)
        luma = np.asarray(gray.resize((side, side), Image.Resampling.BILINEAR,
                                                  box=box, reducing_gap=2.0), dtype=np.float64)
        small = np.asarray(img.resize((csize, csize), Image.Resampling.BILINEAR, box=box,
                                      reducing_gap=2.0), dtype=np.float64)
        v = np.concatenate([(luma - luma.mean()).ravel(),
                            chroma * np.tensordot(_CBCR, small, axes=([1], [2])).ravel()])
        norm = float(np.linalg.norm(v))
        rows.append(v / norm if norm else v)
    return np.stack(rows).astype(np.float32)


def no_fingerprints() -> np.ndarray:
    """`(0, K, D)`: the fingerprints of no image, shaped like `fingerprint`'s."""
    side, csize = FINGERPRINT_SIDE, FINGERPRINT_SIDE // 2
    return np.zeros((0, len(CROPS), side * side + 2 * csize * csize), dtype=np.float32)


def mirror(fps: np.ndarray) -> np.ndarray:
    """Fingerprints `(..., D)` of the left-right mirrored pictures (crops stay where they are
    in the array: crop k of the mirror is the mirror of crop k', which is in the set too)."""
    d = fps.shape[-1]
    side = int(round((4 * d / 6) ** 0.5))  # D = side^2 + 2 (side/2)^2 = 1.5 side^2
    csize = max(1, side // 2)
    lead = fps.shape[:-1]
    luma = fps[..., :side * side].reshape(*lead, side, side)[..., ::-1]
    colour = fps[..., side * side:].reshape(*lead, 2, csize, csize)[..., ::-1]
    return np.ascontiguousarray(np.concatenate(
        [luma.reshape(*lead, -1), colour.reshape(*lead, -1)], axis=-1))


def _similarities(fps: np.ndarray, against: np.ndarray, *, mirrored: bool):
    """Yield (row offset, (p, M) similarities) for consecutive chunks of `fps`. Mirroring is a
    symmetric permutation P of the values (a . P b = P a . b), so the queries are mirrored, never
    `against`: no copy of the (M, K, D) eval fingerprints (29 KB per image) is made."""
    m, k, d = against.shape
    whole = np.ascontiguousarray(against[:, 0])                        # (M, D)
    crops = against.reshape(m * k, d)                                  # (M K, D), a view
    step = max(1, 2**22 // (m * k * (2 if mirrored else 1)))  # ~16 M similarities (64 MB) a time
    for i in range(0, len(fps), step):
        part = fps[i:i + step]
        sim = _pair_max(part, whole, crops, k)
        if mirrored:
            sim = np.maximum(sim, _pair_max(mirror(part), whole, crops, k))
        yield i, sim


def _pair_max(part: np.ndarray, whole: np.ndarray, crops: np.ndarray, k: int) -> np.ndarray:
    """(p, M): best of part's whole picture vs against's crops, and part's crops vs against's
    whole picture."""
    p, m = len(part), len(whole)
    mine_whole = (part[:, 0] @ crops.T).reshape(p, m, k).max(2)
    mine_crops = (part.reshape(p * k, -1) @ whole.T).reshape(p, k, m).max(1)
    return np.maximum(mine_whole, mine_crops)


def nearest_similarity(fps: np.ndarray, against: np.ndarray, *,
                       mirrored: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """For each fingerprint in `fps` `(N, K, D)`: (highest similarity to a fingerprint in
    `against` `(M, K, D)`, index of that row). The similarity of two pictures is the best
    cosine of one's whole picture against the other's crops, either way round (a copy may
    be the cropped one or the uncropped one); with `mirrored`, a mirrored copy counts as a
    copy (training flips photos: a mirrored eval image in training is the eval image)."""
    n = len(fps)
    best, where = np.zeros(n, dtype=np.float32), np.full(n, -1, dtype=np.int64)
    if n == 0 or len(against) == 0:
        return best, where
    for i, sim in _similarities(fps, against, mirrored=mirrored):
        best[i:i + len(sim)], where[i:i + len(sim)] = sim.max(1), sim.argmax(1)
    return best, where


def self_similarity(fps: np.ndarray, *, mirrored: bool = True) -> np.ndarray:
    """(M,) each picture's highest similarity to another picture of the same set `(M, K, D)`
    (-1 when alone): how alike this project's distinct images are."""
    out = np.full(len(fps), -1.0, dtype=np.float32)
    if len(fps) < 2:
        return out
    for i, sim in _similarities(fps, fps, mirrored=mirrored):
        sim[np.arange(len(sim)), np.arange(i, i + len(sim))] = -1.0  # not itself
        out[i:i + len(sim)] = sim.max(1)
    return out


# The threshold when params leave it to the data (prepare.near_duplicate_similarity: null):
# just above what distinct eval images score against each other (their 99th percentile), but
# never below AUTO_FLOOR — at which 92.6-100 % of the copies of real photos are caught, per kind,
# and no distinct photo (highest 0.958) — nor above AUTO_CEILING, which re-encoded, halved and
# brightened copies of the demo digits all reach (benchmarks/near_duplicates.py prints these).
AUTO_FLOOR, AUTO_CEILING, AUTO_QUANTILE, AUTO_MARGIN = 0.97, 0.995, 99.0, 0.002


def auto_threshold(eval_fps: np.ndarray) -> float:
    """The near-duplicate threshold for an eval set `(M, K, D)` (see AUTO_*)."""
    nearest = self_similarity(eval_fps)
    if len(eval_fps) < 2:
        return AUTO_FLOOR
    q = float(np.percentile(nearest, AUTO_QUANTILE)) + AUTO_MARGIN
    return round(min(AUTO_CEILING, max(AUTO_FLOOR, q)), 4)
