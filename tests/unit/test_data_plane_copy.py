"""The data plane's copy of a parameter version into a shared region: every byte lands, below
the size from which it takes torch's threads (one ``memcpy``) and from it on."""

from __future__ import annotations

import random

import pytest

from gradhub.server.data_plane import _PARALLEL_COPY_BYTES, _copy


@pytest.mark.parametrize("nbytes", [0, 1, 4099, _PARALLEL_COPY_BYTES - 1, _PARALLEL_COPY_BYTES,
                                    2 * _PARALLEL_COPY_BYTES + 5])
def test_a_copy_lands_every_byte(nbytes: int) -> None:
    data = bytearray(random.Random(nbytes).randbytes(nbytes))  # writable, as a snapshot tensor's bytes are
    target = bytearray(nbytes + 8)  # a view of the front of a larger region, as a reply's place is
    _copy(memoryview(target)[:nbytes], memoryview(data))
    assert bytes(target[:nbytes]) == data
    assert target[nbytes:] == bytearray(8)  # nothing past it
