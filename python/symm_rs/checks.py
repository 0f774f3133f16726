"""Cross-rank checks users call: ``verify_pending`` (the segments every rank is about to register
are the same) and ``check_layout`` (tensors sit at the same place on every rank). Each is one
agreement round (``symm_rs.agreement``), bounded by the timeout."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from symm_rs import _native, agreement, registration
from symm_rs.errors import AgreementError
from symm_rs.groups import resolve


def extent(tensor: Any) -> tuple[int, int]:
    """``(first byte, byte length)`` a tensor's elements occupy."""
    if tensor.numel() == 0:
        return (tensor.data_ptr(), 0)
    # torch strides are never negative, so the first element is the lowest address.
    span = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return (tensor.data_ptr(), span * tensor.element_size())


def check_layout(tensors: Sequence[Any], group: object, timeout: Optional[float] = None) -> None:
    """Checks that each tensor sits at the same segment position and offset on every rank of
    ``group``, which symmetric kernels assume (they address a peer's copy at the local offset).
    Collective: one round. A debugging aid, not a per-call check.

    Raises:
        AgreementError: some tensor's placement differs between ranks; the message says which
            tensor and each rank's placement.
    """
    resolved = resolve(group)
    if resolved is None:
        return
    record: list[int] = []
    for tensor in tensors:
        ptr, nbytes = extent(tensor)
        index, offset = _native.segment_position(ptr, nbytes) or (-1, -1)
        record += [index, offset, nbytes]
    rows = agreement.exchange(resolved, "layout", record or [0], timeout)
    for i in range(len(tensors)):
        placements = [tuple(row[3 * i : 3 * i + 3]) for row in rows]
        if any(p != placements[0] for p in placements) or placements[0][0] < 0:
            shown = ", ".join(
                f"rank {r}: segment {p[0]} offset {p[1]} ({p[2]} bytes)"
                for r, p in enumerate(placements)
            )
            raise AgreementError(
                f"tensor {i} is not placed symmetrically ({shown}); symmetric kernels would "
                "read the wrong memory on peers. Allocate the same sizes in the same order on "
                "every rank, and do not free symmetric tensors that other streams still use"
            )


def verify_pending(group: object, timeout: Optional[float] = None) -> None:
    """Checks that every rank of ``group`` is about to register the same segment sizes, so a
    disagreement is an error on every rank instead of a hang inside NCCL. Collective: one
    round. (Every registering exit runs this check itself; call it to check earlier.)

    Raises:
        AgreementError: the ranks disagree (the message names each rank's segments), a rank
            failed, or not all arrived within the timeout.
    """
    resolved = resolve(group)
    if resolved is None:
        return
    sizes = [int(s) for s in _native.pending_sizes(resolved.comm, resolved.peer_set)]
    rows = agreement.exchange(
        resolved,
        "verify",
        registration.size_record(sizes),
        timeout,
        width=agreement.COMM_RECORD_WIDTH,
    )
    registration.require_same_segments(resolved, rows)
