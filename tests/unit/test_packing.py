"""Ids packed to ceil(log2 V) bits round-trip for any vocabulary size and shape."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asymkd.packing import id_bits, pack_ids, packed_nbytes, unpack_ids


@pytest.mark.parametrize(("vocab", "bits"), [(1, 1), (2, 1), (3, 2), (512, 9), (49_152, 16), (151_936, 18)])
def test_bits_per_id(vocab, bits):
    assert id_bits(vocab) == bits and 2**bits >= vocab and (bits == 1 or 2 ** (bits - 1) < vocab)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(vocab=st.integers(1, 2**40), rows=st.integers(0, 5), k=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_any_vocab_round_trips(vocab, rows, k, seed):
    bits = id_bits(vocab)
    ids = torch.randint(0, vocab, (rows, k), generator=torch.Generator().manual_seed(seed), dtype=torch.int64)
    blob = pack_ids(ids, bits)
    assert len(blob) == packed_nbytes(rows * k, bits) == math.ceil(rows * k * bits / 8)
    assert torch.equal(unpack_ids(blob, bits, ids.shape), ids)


def test_top64_of_a_49k_vocab_is_half_of_int32():
    ids = torch.randint(0, 49_152, (4, 64))
    assert len(pack_ids(ids, id_bits(49_152))) == 4 * 64 * 2  # vs 4 * 64 * 4 as int32


def test_ids_that_do_not_fit_and_wrong_sizes_are_refused():
    with pytest.raises(ValueError, match="does not fit in 9 bits"):
        pack_ids(torch.tensor([512]), 9)
    with pytest.raises(ValueError, match=r"1 bytes for 2 ids of 9 bits \(expected 3\)"):
        unpack_ids(b"\x00", 9, (1, 2))
