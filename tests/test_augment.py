"""pipelines.augment: whole-pixel shifts with reflect padding, flips, colour jitter; every draw
from the caller's generator."""
from __future__ import annotations

import torch

from pipelines import augment
from pipelines.augment import Augment


def _dot_images(n: int, h: int = 9, w: int = 11, c: int = 1, at=(4, 5)) -> torch.Tensor:
    x = torch.zeros(n, h, w, c, dtype=torch.uint8)
    x[:, at[0], at[1], :] = 200
    return x


def test_no_augmentation_is_the_nchw_view_as_float():
    x = torch.randint(0, 256, (4, 5, 6, 3), dtype=torch.uint8)
    out = augment.batch(x, Augment(), torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 5, 6) and out.dtype == torch.float32
    assert torch.equal(out, x.permute(0, 3, 1, 2).float())
    assert out.is_contiguous(memory_format=torch.channels_last)   # NHWC storage, no copy to NCHW


def test_shift_moves_whole_pixels_per_image_within_the_limit():
    x = _dot_images(64)
    out = augment.batch(x, Augment(shift_px=2), torch.Generator().manual_seed(0))[:, 0]
    seen = set()
    for img in out:
        ys, xs = torch.nonzero(img, as_tuple=True)
        assert len(ys) == 1 and img[ys[0], xs[0]] == 200.0      # moved, not blurred or lost
        dy, dx = 4 - int(ys[0]), 5 - int(xs[0])
        assert abs(dy) <= 2 and abs(dx) <= 2
        seen.add((dy, dx))
    assert len(seen) > 10                                       # per image, not per batch


def test_shift_pads_by_reflection_not_zeros():
    """A white image stays white however it is shifted (zero padding would bring in a black
    border: a photo's edge is not black; a digit's border is black either way)."""
    x = torch.full((32, 6, 6, 3), 255, dtype=torch.uint8)
    x[:, 2, 3] = 17                                             # and one marked pixel moves
    out = augment.batch(x, Augment(shift_px=2), torch.Generator().manual_seed(1))
    assert int((out == 255).sum()) >= 32 * 3 * (36 - 4)         # at most 4 copies of the mark
    assert int((out == 17).sum()) >= 32 * 3                     # never lost
    assert set(out.unique().tolist()) == {17.0, 255.0}


def test_hflip_mirrors_about_half_and_never_without_the_flag():
    x = _dot_images(200, at=(4, 1))
    out = augment.batch(x, Augment(hflip=True), torch.Generator().manual_seed(0))[:, 0]
    flipped = int((out[:, 4, 11 - 1 - 1] == 200).sum())
    kept = int((out[:, 4, 1] == 200).sum())
    assert flipped + kept == 200 and 70 < flipped < 130
    same = augment.batch(x, Augment(shift_px=0, color_jitter=0.0), torch.Generator())[:, 0]
    assert int((same[:, 4, 1] == 200).sum()) == 200


def test_colour_jitter_stays_in_range_and_changes_images():
    x = torch.randint(0, 256, (16, 8, 8, 3), dtype=torch.uint8)
    out = augment.batch(x, Augment(color_jitter=0.4), torch.Generator().manual_seed(0))
    assert out.min() >= 0 and out.max() <= 255
    assert not torch.equal(out, x.permute(0, 3, 1, 2).float())
    grey = torch.full((4, 8, 8, 1), 100, dtype=torch.uint8)     # a flat grey image: contrast and
    flat = augment.batch(grey, Augment(color_jitter=0.4), torch.Generator().manual_seed(0))
    assert all(torch.unique(img).numel() == 1 for img in flat)  # saturation keep it flat


def test_same_seed_same_draws_other_seed_other_draws():
    x = torch.randint(0, 256, (32, 10, 10, 3), dtype=torch.uint8)
    aug = Augment(shift_px=3, hflip=True, color_jitter=0.2)
    a = augment.batch(x, aug, torch.Generator().manual_seed(7))
    b = augment.batch(x, aug, torch.Generator().manual_seed(7))
    c = augment.batch(x, aug, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_a_rank_slice_gets_the_rows_of_the_global_batch():
    """DDP: each rank draws for the whole global batch and keeps its own rows, so two ranks
    together augment exactly like one process."""
    x = torch.randint(0, 256, (10, 7, 7, 3), dtype=torch.uint8)
    aug = Augment(shift_px=2, hflip=True, color_jitter=0.3)
    whole = augment.batch(x, aug, torch.Generator().manual_seed(3))
    for rank in (0, 1):
        part = augment.batch(x[rank::2], aug, torch.Generator().manual_seed(3), draws_for=10,
                             pick=slice(rank, None, 2))
        assert torch.equal(part, whole[rank::2])


def test_from_train_reads_the_settings():
    from tests import factories
    t = factories.params({"train.shift_px": 4, "train.hflip": True,
                          "train.color_jitter": 0.25}).train
    assert Augment.from_train(t) == Augment(4, True, 0.25)
    assert not Augment().active and Augment(hflip=True).active
