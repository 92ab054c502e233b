import pytest
import torch

from kvcompress.cache import BlockPool, OutOfBlocksError


def test_allocate_and_free_roundtrip():
    pool = BlockPool(10, torch.device("cpu"))
    a = pool.allocate(4)
    b = pool.allocate(6)
    assert pool.num_free == 0
    assert sorted(torch.cat([a, b]).tolist()) == list(range(10))
    pool.free(a)
    assert pool.num_free == 4
    assert sorted(pool.free_ids().tolist()) == sorted(a.tolist())


def test_out_of_blocks_is_typed_and_changes_nothing():
    pool = BlockPool(3, torch.device("cpu"))
    pool.allocate(2)
    with pytest.raises(OutOfBlocksError) as err:
        pool.allocate(2)
    assert (err.value.needed, err.value.free) == (2, 1)
    assert pool.num_free == 1


def test_double_free_detected():
    pool = BlockPool(2, torch.device("cpu"))
    blocks = pool.allocate(1)
    pool.free(blocks)
    with pytest.raises(RuntimeError, match="double free"):
        pool.free(torch.tensor([0, 1]))


def test_negative_requests_rejected():
    with pytest.raises(ValueError):
        BlockPool(0, torch.device("cpu"))
    with pytest.raises(ValueError):
        BlockPool(4, torch.device("cpu")).allocate(-1)


def test_shared_blocks_return_with_their_last_reference():
    pool = BlockPool(4, torch.device("cpu"))
    a = pool.allocate(2)
    pool.share(torch.cat([a, a[:1]]))  # a[0] three references, a[1] two
    assert pool.refcount[a].tolist() == [3, 2]
    assert pool.free(a) == 0 and pool.num_free == 2
    assert pool.free(torch.cat([a, a[:1]])) == 2  # repeats drop several references
    assert pool.num_free == 4 and int(pool.refcount.sum()) == 0
    with pytest.raises(RuntimeError, match="double free"):
        pool.free(a[:1])
