"""The registration one context exit makes: planned, agreed by every rank, then registered.

``register(group, lane)`` plans the registration in the native table (the segments it will
register are fixed and pinned from then on, so a thread that allocates meanwhile cannot change
what this rank registers), holds one agreement round in which every rank posts the sizes it is
about to register (plus, on a communicator's first registration, what the symmetric-kernel
verdict needs), and registers exactly the plan only when every rank posted the same. Otherwise
every rank raises ``AgreementError`` and nothing is registered anywhere.
"""

from __future__ import annotations

import logging
import warnings
import zlib
from collections.abc import Sequence
from typing import Optional

from symm_rs import _native, agreement, capability, watchdog
from symm_rs.errors import AgreementError, NcclVersionWarning
from symm_rs.groups import Group
from symm_rs.library import known_nccl_issues, library_info
from symm_rs.pool import frees

log = logging.getLogger("symm_rs")

# Positions in a registration record.
_FREES, _COUNT, _BYTES, _CRC, _HAS_TOPOLOGY = range(5)
_TOPOLOGY = slice(5, 5 + capability.TOPOLOGY_INTS)
_SIZES = 5 + capability.TOPOLOGY_INTS
_SIZES_SHOWN = 13


_warned_versions = False


def size_record(sizes: Sequence[int], topology: Optional[list[int]] = None) -> list[int]:
    """What a rank posts before registering ``sizes``: the pool frees it has seen, the count,
    total and a fingerprint of the sizes, the topology (or -1s), then the first sizes."""
    head = [frees(), len(sizes), sum(sizes), zlib.crc32(repr(list(sizes)).encode())]
    topo = topology if topology is not None else [-1] * capability.TOPOLOGY_INTS
    return [*head, int(topology is not None), *topo, *list(sizes)[:_SIZES_SHOWN]]


def _describe(row: list[int]) -> str:
    shown = [x for x in row[_SIZES : _SIZES + _SIZES_SHOWN] if x >= 0]
    more = "" if row[_COUNT] <= len(shown) else f" +{row[_COUNT] - len(shown)} more"
    return f"{row[_COUNT]} segment(s), {row[_BYTES]} bytes, sizes {shown}{more}"


def require_same_segments(group: Group, rows: list[list[int]]) -> None:
    """Raises ``AgreementError`` unless every rank posted the same segments and pool frees."""
    frees_seen = {row[_FREES] for row in rows}
    if len(frees_seen) > 1:
        by_count: dict[int, list[int]] = {}
        for rank, row in enumerate(rows):
            by_count.setdefault(row[_FREES], []).append(rank)
        detail = "; ".join(f"rank(s) {r}: {n} time(s)" for n, r in by_count.items())
        raise AgreementError(
            f"ranks of {group.name} freed symm_rs's pools (destroy_pool, release_graph_pool) a "
            f"different number of times ({detail}), so their windows no longer line up. Those "
            "calls free windows of every group: make them on every rank alike"
        )
    if all(row[_COUNT : _CRC + 1] == rows[0][_COUNT : _CRC + 1] for row in rows):
        return
    groups: dict[str, list[int]] = {}
    for rank, row in enumerate(rows):
        groups.setdefault(_describe(row), []).append(rank)
    detail = "; ".join(f"rank(s) {ranks}: {what}" for what, ranks in groups.items())
    raise AgreementError(
        f"ranks of {group.name} disagree on the segments to register, which would hang every "
        f"rank inside ncclCommWindowRegister: {detail}. Every rank must allocate the same "
        "sizes in the same order inside use_symmetric_memory (reserve() up front avoids growth "
        "at run time; SYMM_RS_SEAL=1 turns growth after it into an error at once)"
    )


def _warn_known_issues() -> None:
    global _warned_versions
    if _warned_versions:
        return
    _warned_versions = True
    for issue in known_nccl_issues(library_info().version):
        warnings.warn(issue, NcclVersionWarning, stacklevel=5)


def register(group: Group, lane: int, verify: bool = True, timeout: Optional[float] = None) -> int:
    """Registers what ``group``'s communicator has not registered of its pool lane ``lane``
    (every lane: ``_native.ALL_LANES``), after the ranks agreed on it. Collective: every rank
    whose exit has something to register calls it. Returns how many windows were made.

    Raises:
        AgreementError: ranks disagree, failed, or did not arrive within the timeout.
        RegistrationError / NcclError: NCCL failed to register.
    """
    plan = _native.plan_registration(group.comm, group.peer_set, lane)
    if plan is None:
        return 0
    try:
        first = capability.known_verdict(group) is None
        if verify or first:
            topology = capability.topology_record(group) if first else None
            rows = agreement.exchange(
                group,
                "registration",
                size_record(plan.sizes, topology),
                timeout,
                width=agreement.COMM_RECORD_WIDTH,
            )
            if first:
                capability.settle(group, [row[_TOPOLOGY] for row in rows])
            if verify:
                require_same_segments(group, rows)
        if not capability.should_register(group):
            # Every rank reached the same verdict in the same round: all go plain alike.
            _native.make_plain(group.comm)
            return 0
        _warn_known_issues()
        watchdog.watch(group)
        made, null_window = plan.register()
    finally:
        plan.cancel()  # a no-op once registered
    if null_window:
        capability.nccl_refused(group)
    if made:
        log.debug("registered %d new segment(s) with %s", made, group.name)
    return int(made)
