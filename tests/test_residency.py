"""pipelines.residency: the same batches from the device-resident copy and from the memory map."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines import residency

CPU = torch.device("cpu")


@pytest.fixture
def split(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (103, 5, 4, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    y = rng.integers(0, 7, 103).astype(np.int64)
    return np.load(tmp_path / "x.npy", mmap_mode="r"), y


def test_an_epoch_is_a_permutation_cut_into_sorted_batches():
    gen = torch.Generator().manual_seed(0)
    batches = residency.epoch_batches(103, 16, gen)
    assert [len(b) for b in batches] == [16] * 6 + [7]
    assert sorted(torch.cat(batches).tolist()) == list(range(103))
    assert all(torch.equal(b, b.sort().values) for b in batches)
    again = residency.epoch_batches(103, 16, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    other = residency.epoch_batches(103, 16, gen)                 # the next epoch: reshuffled
    assert not all(torch.equal(a, b) for a, b in zip(batches, other))


def test_streamed_batches_equal_resident_batches(split):
    x, y = split
    index = residency.epoch_batches(len(y), 10, torch.Generator().manual_seed(1))
    res = list(residency.source(x, y, device=CPU, resident=True).batches(index))
    stream = list(residency.source(x, y, device=CPU, resident=False).batches(index))
    assert len(res) == len(stream) == len(index)
    for (xa, ya), (xb, yb), idx in zip(res, stream, index):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(xa, torch.from_numpy(np.asarray(x)[idx.numpy()]))
        assert xb.dtype == torch.uint8 and yb.dtype == torch.int64


def test_streaming_reads_from_the_map_and_resident_copies_it(split):
    x, y = split
    assert isinstance(x, np.memmap)
    streamed = residency.source(x, y, device=CPU, resident=False)
    assert streamed.x is x                                      # never loaded whole
    resident = residency.source(x, y, device=CPU, resident=True)
    assert resident.x.shape == x.shape and not isinstance(resident.x.numpy(), np.memmap)


def test_a_consumer_that_stops_early_stops_the_reader(split):
    x, y = split
    import threading
    before = threading.active_count()
    src = residency.source(x, y, device=CPU, resident=False)
    for i, _ in enumerate(src.batches(residency.in_order(len(y), 1))):
        if i == 3:
            break
    assert threading.active_count() == before


def test_a_read_error_reaches_the_consumer(split):
    x, y = split
    src = residency.source(x, y, device=CPU, resident=False)
    bad = [torch.tensor([0, 1]), torch.tensor([5000])]          # row 5000 does not exist
    it = src.batches(bad)
    next(it)
    with pytest.raises(IndexError):
        next(it)


def test_placement_by_budget():
    mb = 2**20
    assert residency.place(100 * mb, 4096).resident
    p = residency.place(5000 * mb, 4096)
    assert not p.resident and "streamed" in p.note and "4096" in p.note
    assert not residency.place(1, 0).resident                    # 0 = always stream


def test_labels_and_images_must_align(split):
    x, y = split
    with pytest.raises(ValueError, match="labels"):
        residency.source(x, y[:-1], device=CPU, resident=False)
