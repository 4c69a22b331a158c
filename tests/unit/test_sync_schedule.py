"""SyncSchedule: staggered fragment syncs (the last fragment where a round ends), merges at most
one exchange ahead, a short last round's syncs at the job's last step."""

from __future__ import annotations

import pytest

from gradhub.worker.sync_schedule import SyncSchedule


def test_one_fragment_syncs_where_rounds_end() -> None:
    s = SyncSchedule(10, 1, 0, 35)
    assert s.syncs == 4 and [s.boundary(i) for i in range(4)] == [10, 20, 30, 35]
    assert s.boundary(-1) == 0 and [s.merge_at(i) for i in range(4)] == [10, 20, 30, 35]


def test_fragments_sync_at_staggered_steps() -> None:
    s = SyncSchedule(10, 3, 2, 20)
    assert s.syncs == 6
    assert [s.boundary(i) for i in range(6)] == [3, 6, 10, 13, 16, 20]
    assert [s.fragment(i) for i in range(6)] == [0, 1, 2, 0, 1, 2]
    assert [s.merge_at(i) for i in range(6)] == [5, 8, 12, 15, 18, 20]


@pytest.mark.parametrize(("h", "f", "overlap", "total"), [(10, 3, 3, 47), (7, 7, 1, 30), (8, 2, 4, 8)])
def test_an_exchange_is_merged_before_the_next_push(h: int, f: int, overlap: int, total: int) -> None:
    s = SyncSchedule(h, f, overlap, total)
    for i in range(s.syncs - 1):
        assert s.boundary(i) <= s.merge_at(i) <= s.boundary(i + 1)


@pytest.mark.parametrize(("f", "overlap", "field"), [(0, 0, "fragments"), (11, 0, "fragments"),
                                                     (3, 4, "fragment_overlap")])
def test_bad_shapes_name_the_field(f: int, overlap: int, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SyncSchedule(10, f, overlap, 40)
