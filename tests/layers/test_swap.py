"""The nested ``swap`` group translated to the flat plan, and keys out of their group refused by name."""

import pytest

from dmt.errors import ConfigError
from dmt.layers.swap import swap_settings


def test_the_nested_swap_group_translates_to_the_flat_plan():
    nested = {
        "blocks": "-2:",
        "type": "associative",
        "per_block": {3: {"read": {"topk": 4}, "index": {"backend": "exact"}}},
        "read": {"topk": 8, "heads": 2},
        "store": {"capacity": 64},
        "write": {"inserted_values": "next_token"},
        "output": {"keep_mlp": True},
        "index": {"backend": "hnsw", "M": 8},
    }
    assert swap_settings(nested) == {
        "blocks": "-2:",
        "type": "associative",
        "per_block": {3: {"topk": 4, "index": {"backend": "exact"}}},
        "topk": 8,
        "heads": 2,
        "capacity": 64,
        "inserted_values": "next_token",
        "keep_mlp": True,
        "index": {"backend": "hnsw", "M": 8},
    }


@pytest.mark.parametrize(
    ("nested", "message"),
    [
        ({"topk": 16}, "swap.topk: moved to swap.read.topk"),
        (
            {"per_block": {5: {"capacity": 8}}},
            "swap.per_block.5.capacity: moved to swap.per_block.5.store.",
        ),
        ({"read": {"capacity": 8}}, "swap.read.capacity: not a read setting; it is swap.store.capacity"),
        (
            {"read": {"capcity": 8}},
            "swap.read.capcity: unknown read setting (did you mean swap.store.capacity",
        ),
        ({"reads": {"topk": 8}}, "swap.reads: unknown; swap has blocks, type, per_block, read, store, write"),
        ({"read": 8}, "swap.read: expected a mapping of read settings, got 8"),
    ],
)
def test_keys_out_of_their_group_are_refused_naming_where_they_belong(nested, message):
    with pytest.raises(ConfigError) as error:
        swap_settings(nested)
    assert str(error.value).startswith(message)
