import re

import pytest

from deepspeed_cdadam.comm import ShardLayout


def test_shards_are_balanced_and_cover_the_buffer():
    lay = ShardLayout(10, 4)
    assert lay.shard_sizes == (3, 3, 2, 2) and lay.shard_offsets == (0, 3, 6, 8)
    assert lay.capacity == 3


def test_blocks_stay_inside_shards():
    lay = ShardLayout(23, 2, block_size=5)
    assert lay.shard_blocks(0) == (5, 5, 2) and lay.shard_blocks(1) == (5, 5, 1)
    assert lay.max_blocks == 3 and sum(lay.block_sizes()) == 23


def test_more_ranks_than_coordinates():
    lay = ShardLayout(2, 3)
    assert lay.shard_sizes == (1, 1, 0) and lay.shard_blocks(2) == (0,)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_block_size_validated(bad):
    msg = f"Invalid block_size={bad!r}. Must be None (one block per shard) or an int >= 1."
    with pytest.raises(ValueError, match=re.escape(msg)):
        ShardLayout(10, 2, bad)
