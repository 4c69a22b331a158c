"""When a local-sgd worker exchanges which part of its model (Streaming DiLoCo, arXiv 2501.18512).

A job of ``total`` inner steps runs rounds of ``local_steps`` (H); with ``fragments`` (F) the
model is split into F runs of whole tensors, and fragment p syncs once a round, at the round's
step ``(p + 1) * H // F`` (so the last fragment syncs where a round ends, as in plain DiLoCo).
Sync s (the parameter server's step s) is fragment ``s % F`` of round ``s // F``. Its new global
values are merged ``overlap`` inner steps after its push, while training goes on; a shorter last
round has its syncs at the job's last step.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SyncSchedule:
    local_steps: int
    fragments: int
    overlap: int
    total: int

    def __post_init__(self) -> None:
        if not 1 <= self.fragments <= self.local_steps:
            raise ValueError(f"fragments: {self.fragments} must be between 1 and local_steps ({self.local_steps})")
        if not 0 <= self.overlap <= self.local_steps // self.fragments:
            raise ValueError(f"fragment_overlap: {self.overlap} must be between 0 and "
                             f"local_steps // fragments ({self.local_steps // self.fragments})")

    @property
    def syncs(self) -> int:
        """The parameter server's steps: one per fragment per round."""
        return -(-self.total // self.local_steps) * self.fragments

    def fragment(self, sync: int) -> int:
        return sync % self.fragments

    def boundary(self, sync: int) -> int:
        """The inner steps done when ``sync`` pushes (0 before the first sync)."""
        if sync < 0:
            return 0
        round_, p = divmod(sync, self.fragments)
        return min(round_ * self.local_steps + (p + 1) * self.local_steps // self.fragments, self.total)

    def merge_at(self, sync: int) -> int:
        """The inner steps done when ``sync``'s global values are merged: at most the next
        sync's boundary, so one exchange at a time is in flight."""
        return min(self.boundary(sync) + self.overlap, self.total)
