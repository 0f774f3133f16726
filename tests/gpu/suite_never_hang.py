"""Never hang, never crash, with default settings, on real NCCL.

Each case is a way a serving fleet used to hang or die (never-hang issue): ranks that allocate
different sizes in one context, a rank that raises inside a context on a fresh communicator, a
pipeline stage whose exit registered another group while the next stage waited for it, a peer
that stalls before registering, a registration stuck inside NCCL (the watchdog's report), two
and four threads with contexts on their own communicators at once (the probe pool crash), a pool
destroyed on one rank only, sealed pools, NCCL's NULL window, and a buffer freed and its pool
destroyed while a collective runs on it (last: a GPU fault would end the run). Each must end in
exact results or an error on every rank within the timeout; the time to the error is recorded
per rank.

Runs with one GPU per rank and with several ranks on one GPU (``harness.py --shared-gpu``);
``SYMM_RS_TIMEOUT`` is 8 s here so that the timeouts the cases provoke stay short.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from typing import Any, Callable

import torch
import torch.distributed as dist

import symm_rs
from symm_rs import watchdog

from harness import Ctx, needs

TIMEOUT_S = 8.0
MIB = 1 << 20


def setup_rank(rank: int, world_size: int) -> None:
    os.environ["SYMM_RS_TIMEOUT"] = str(TIMEOUT_S)


class _Errors(logging.Handler):
    """Collects the ERROR lines of the symm_rs logger (the watchdog's reports)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _errors() -> _Errors:
    handler = _Errors()
    logging.getLogger("symm_rs").addHandler(handler)
    return handler


def _fresh_pools() -> None:
    """Every rank frees symm_rs's pools alike, so a case that left asymmetric segments behind
    does not reach the next one. torch's NCCL watchdog may hold a finished collective's tensors
    for a moment: retried for a few seconds."""
    torch.cuda.synchronize()
    for _ in range(50):
        try:
            symm_rs.destroy_pool()
            return
        except symm_rs.SymmetricMemoryError as e:
            if "still alive" not in str(e):
                raise
            time.sleep(0.1)
    symm_rs.destroy_pool()


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, str]:
    """``fn()``'s value, the seconds it took, and the error it raised ("" when none)."""
    start = time.monotonic()
    try:
        return fn(), time.monotonic() - start, ""
    except Exception as e:
        return None, time.monotonic() - start, f"{type(e).__name__}: {e}"


def _exact_all_reduce(ctx: Ctx, group: Any, n: int = 1 << 16) -> None:
    with symm_rs.use_symmetric_memory(group):
        x = torch.full((n,), float(ctx.rank + 1), device=ctx.device)
    dist.all_reduce(x, group=group)
    torch.cuda.synchronize()
    expected = ctx.world_size * (ctx.world_size + 1) / 2
    assert bool((x == expected).all()), "all-reduce on symmetric buffers is wrong"


def _wait_for(predicate: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def case_ranks_that_grow_differently_get_an_error_and_peers_are_told(ctx: Ctx) -> None:
    # Measured before: both ranks still waited after 79 s. Rank 0 allocates a new 64 MiB
    # segment inside a context, the others allocate nothing new; then every rank runs the
    # engine's own all-reduce on that group.
    _fresh_pools()
    group = ctx.new_group()
    _exact_all_reduce(ctx, group)  # first registration: every rank in step
    log = _errors()
    big = None

    def context() -> None:
        nonlocal big
        with symm_rs.use_symmetric_memory(group):
            if ctx.rank == 0:
                big = torch.empty(64 * MIB, dtype=torch.uint8, device=ctx.device)

    _, seconds, error = _timed(context)
    plain = ctx.nccl_refused(group)
    # The engine's own collective still runs on every rank (rank 0 after its error).
    result = torch.full((1024,), 1.0, device=ctx.device)
    dist.all_reduce(result, group=group)
    torch.cuda.synchronize()
    told = _wait_for(
        lambda: any("is broken" in line for line in log.lines), 3 * watchdog.INTERVAL_S + 2
    )
    logging.getLogger("symm_rs").removeHandler(log)
    ctx.details.update(
        seconds_to_error=round(seconds, 2), error=error[:300], told=told, plain_comm=plain
    )
    assert bool((result == ctx.world_size).all())
    if plain:
        # NCCL answered with NULL windows (2.29+ here): nothing is ever registered on this
        # group, so growth needs no agreement and cannot hang: no error, exact results.
        assert error == "", error
    elif ctx.rank == 0:
        assert "did not reach" in error and "allocated nothing new" in error, error
        assert seconds < TIMEOUT_S + 5, seconds
    else:
        assert error == "", "a rank with nothing to register took a round"
        assert told, "the rank blocked in the engine's collective was not told (ERROR log)"
    # The group stays broken: rank 0's next registration on it raises at once.
    _, again, error = _timed(lambda: symm_rs.register(group))
    if ctx.rank == 0 and not plain:
        assert "earlier failure" in error and again < 2, (error, again)
    del big
    dist.barrier(group=ctx.group)
    _fresh_pools()


def case_a_rank_that_raises_on_a_fresh_communicator_fails_its_peers_at_once(ctx: Ctx) -> None:
    # Finding 1 on real NCCL: the failed rank's part in the communicator's first round (where
    # the verdict exchange used to run first) ends its peers' wait at once, and the rounds that
    # follow stay in step.
    _fresh_pools()
    group = ctx.new_group()

    def context() -> None:
        with symm_rs.use_symmetric_memory(group):
            torch.empty(8 * MIB, dtype=torch.uint8, device=ctx.device)
            if ctx.rank == ctx.world_size - 1:
                raise ValueError("the last rank's model code failed")

    _, seconds, error = _timed(context)
    ctx.details.update(seconds_to_error=round(seconds, 2), error=error[:300])
    if ctx.rank == ctx.world_size - 1:
        assert error.startswith("ValueError"), error
    else:
        assert "the last rank's model code failed" in error, error
        assert seconds < TIMEOUT_S, f"found only by the timeout ({seconds:.1f} s)"
    # The next exit of every rank registers what all of them hold: in step, exact.
    _exact_all_reduce(ctx, group)
    _fresh_pools()


@needs(4)
def case_a_pipeline_stage_exit_never_registers_another_group(ctx: Ctx) -> None:
    # Finding 2: a registration a capture postponed used to run at whatever context exited
    # next; stage 0 then registered the world group while stage 1 waited in a receive from
    # it. Here every rank captures a world context (its registration postponed), then stage 0
    # ({0, 1}) registers its own group and sends to stage 1 ({2, 3}), which waits in recv.
    _fresh_pools()
    world = ctx.new_group()
    stages = [
        dist.new_group([0, 1], device_id=ctx.device),
        dist.new_group([2, 3], device_id=ctx.device),
    ]
    stage = stages[ctx.rank // 2]
    pool = torch.cuda.graph_pool_handle()
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream(device=ctx.device)
    side.wait_stream(torch.cuda.current_stream())
    with symm_rs.graph_capture(pool):
        with torch.cuda.stream(side), torch.cuda.graph(graph, pool=pool, stream=side):
            with symm_rs.use_symmetric_memory(world):
                captured = torch.zeros(32 * MIB // 4, device=ctx.device)
            captured.add_(1)
    torch.cuda.current_stream().wait_stream(side)
    payload = torch.full((4096,), float(ctx.rank), device=ctx.device)

    def run_stage() -> None:
        if ctx.rank < 2:
            with symm_rs.use_symmetric_memory(stage):
                buf = torch.full((1 << 20,), 1.0, device=ctx.device)
            dist.all_reduce(buf, group=stage)
            dist.send(payload, dst=ctx.rank + 2)
        else:
            dist.recv(payload, src=ctx.rank - 2)

    _, seconds, error = _timed(run_stage)
    torch.cuda.synchronize()
    ctx.details.update(seconds=round(seconds, 2), error=error[:300])
    assert error == "", error
    if ctx.rank >= 2:
        assert bool((payload == ctx.rank - 2).all())
    # The postponed world registration happens at the world's own next exit, on every rank.
    with symm_rs.use_symmetric_memory(world):
        pass
    comm = symm_rs.groups.resolve(world).comm
    assert symm_rs.is_registered(captured, world) or symm_rs._native.is_plain(comm)
    graph.replay()
    torch.cuda.synchronize()
    del graph, captured
    _fresh_pools()


def case_a_peer_that_stalls_past_the_timeout_is_named_on_every_rank(ctx: Ctx) -> None:
    _fresh_pools()
    group = ctx.new_group()
    _exact_all_reduce(ctx, group)
    staller = ctx.world_size - 1

    def context() -> None:
        with symm_rs.use_symmetric_memory(group):
            torch.empty(16 * MIB, dtype=torch.uint8, device=ctx.device)
            if ctx.rank == staller:
                time.sleep(TIMEOUT_S + 3)

    _, seconds, error = _timed(context)
    plain = ctx.nccl_refused(group)
    ctx.details.update(seconds_to_error=round(seconds, 2), error=error[:300], plain_comm=plain)
    if plain:
        assert error == "", error  # nothing to register on a plain communicator: no round
    elif ctx.rank == staller:
        assert "did not reach" in error, error
        assert seconds < 2 * TIMEOUT_S + 5, seconds
    else:
        assert f"rank(s) [{staller}] did not reach" in error, error
        assert TIMEOUT_S - 1 < seconds < TIMEOUT_S + 5, seconds
    dist.barrier(group=ctx.group)
    _fresh_pools()


def case_a_registration_stuck_inside_nccl_is_reported_by_the_watchdog(ctx: Ctx) -> None:
    # Agreement cannot reach inside ncclCommWindowRegister. With agreement off on one rank,
    # that rank registers at once and waits inside NCCL for a peer that comes after the
    # timeout: the watchdog logs it, and describe_registration_in_progress() shows it.
    _fresh_pools()
    group = ctx.new_group()
    _exact_all_reduce(ctx, group)  # the verdict round happens here, with agreement
    comm = symm_rs.groups.resolve(group).comm
    if symm_rs._native.is_plain(comm):
        _fresh_pools()
        ctx.skip("this NCCL registers nothing here (NULL windows): there is no NCCL wait to report")
    log = _errors()
    seen: list[str] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            text = symm_rs.describe_registration_in_progress()
            if text:
                seen.append(text)
            time.sleep(0.5)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    late = ctx.rank == ctx.world_size - 1

    def context() -> None:
        with symm_rs.use_symmetric_memory(group, verify=False):
            torch.empty(4 * MIB, dtype=torch.uint8, device=ctx.device)
            if late:
                time.sleep(TIMEOUT_S + 4)

    _, seconds, error = _timed(context)
    stop.set()
    poller.join(timeout=5)
    logging.getLogger("symm_rs").removeHandler(log)
    reported = [line for line in log.lines if "has not returned" in line]
    ctx.details.update(
        seconds=round(seconds, 2), reported=reported[:1], described=seen[-1:], error=error
    )
    assert error == "", error
    if not late:
        assert reported, "the watchdog did not report the stuck registration"
        assert any("registering" in text for text in seen), seen
    _exact_all_reduce(ctx, group)
    _fresh_pools()


def _threads_with_own_communicators(ctx: Ctx, threads: int) -> dict[str, Any]:
    """``threads`` threads, each with its own Communicator over the same ranks, enter their
    contexts at the same time (allocation, the first registration and its agreement all
    overlap). Their collectives take turns in thread order, the same on every rank: NCCL
    itself requires kernels of different communicators to be launched in one order on every
    rank (one GPU per rank or not), which is not what this case is about."""
    make = symm_rs.Communicator.from_process_group
    comms = [make(ctx.group, device=ctx.device) for _ in range(threads)]
    expected = ctx.world_size * (ctx.world_size + 1) / 2
    errors: list[str] = []
    wrong = [0] * threads
    start = threading.Barrier(threads)
    turn = threading.Condition()
    state = {"step": 0, "next": 0}

    def my_turn(index: int, step: int) -> bool:
        return state["step"] == step and state["next"] == index

    def work(index: int) -> None:
        try:
            torch.cuda.set_device(ctx.device)
            start.wait()
            for step in range(20):
                with symm_rs.use_symmetric_memory(comms[index]):
                    size = (index + 1) * 4096 + step
                    x = torch.full((size,), float(ctx.rank + 1), device=ctx.device)
                with turn:
                    if not turn.wait_for(lambda step=step: my_turn(index, step), timeout=60):
                        raise TimeoutError(f"thread {index} never got its turn at step {step}")
                    comms[index].all_reduce(x)
                    torch.cuda.current_stream().synchronize()
                    state["next"] += 1
                    if state["next"] == threads:
                        state["step"], state["next"] = step + 1, 0
                    turn.notify_all()
                wrong[index] += int(not bool((x == expected).all()))
        except Exception as e:
            errors.append(f"thread {index}: {type(e).__name__}: {e}")
            with turn:
                state["next"] = -1  # let the others fail instead of waiting
                turn.notify_all()

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    alive = sum(w.is_alive() for w in workers)
    for comm in comms:
        if not alive:
            comm.close()
    return {"errors": errors, "wrong": wrong, "hung": alive}


def case_two_threads_with_their_own_communicators_never_crash(ctx: Ctx) -> None:
    # Measured before: SIGABRT in torch's MemPool destructor (the route-order probe dropped
    # pools while the other thread's route was open). The first contexts of both threads
    # overlap here, with nothing run on the main thread first.
    report = _threads_with_own_communicators(ctx, 2)
    ctx.details.update(**report)
    assert report["hung"] == 0 and report["errors"] == [] and report["wrong"] == [0, 0], report


def case_four_threads_at_once_stay_exact(ctx: Ctx) -> None:
    report = _threads_with_own_communicators(ctx, 4)
    ctx.details.update(**report)
    assert report["hung"] == 0 and report["errors"] == [] and sum(report["wrong"]) == 0, report


def case_a_pool_destroyed_on_one_rank_is_an_error_on_every_rank(ctx: Ctx) -> None:
    # Finding 12: destroy_pool is local; a rank that destroyed alone no longer has the
    # windows its peers have. The next registration says so on every rank, then every rank
    # destroying too puts them back in step.
    _fresh_pools()
    group = ctx.new_group()
    _exact_all_reduce(ctx, group)
    if ctx.rank == 0:
        symm_rs.destroy_pool()

    def context() -> None:
        with symm_rs.use_symmetric_memory(group):
            torch.empty(8 * MIB, dtype=torch.uint8, device=ctx.device)

    _, seconds, error = _timed(context)
    plain = ctx.nccl_refused(group)
    ctx.details.update(seconds_to_error=round(seconds, 2), error=error[:300], plain_comm=plain)
    if plain:  # NULL windows from NCCL: this group registers nothing, so nothing disagrees
        assert error == "", error
    else:
        assert "freed symm_rs's pools" in error, error
    # Back in step: the other ranks free as often as rank 0 did, then every rank frees what
    # the failed step allocated (pools that differ again otherwise).
    if ctx.rank != 0:
        symm_rs.destroy_pool()
    _fresh_pools()
    _exact_all_reduce(ctx, ctx.new_group())
    _fresh_pools()


def case_a_sealed_pool_refuses_growth_at_once_on_the_growing_rank(ctx: Ctx) -> None:
    _fresh_pools()
    group = ctx.new_group()
    symm_rs.reserve(64 * MIB, group, seal=True)
    with symm_rs.use_symmetric_memory(group):
        fits = torch.empty(32 * MIB, dtype=torch.uint8, device=ctx.device)
    del fits

    def grow() -> None:
        with symm_rs.use_symmetric_memory(group):
            if ctx.rank == 0:
                torch.empty(256 * MIB, dtype=torch.uint8, device=ctx.device)

    _, seconds, error = _timed(grow)
    ctx.details.update(seconds_to_error=round(seconds, 2), error=error[-300:])
    if ctx.rank == 0:
        assert "OutOfMemoryError" in error and "sealed" in error and "reserve" in error, error
        assert seconds < TIMEOUT_S, seconds
    else:
        assert error == "", error
    _exact_all_reduce(ctx, group)
    _fresh_pools()


def case_a_null_window_makes_every_rank_use_plain_memory(ctx: Ctx) -> None:
    # NCCL >= 2.29 answers registration on a communicator without symmetric support with a
    # NULL window (several ranks on one GPU, each its own host to NCCL): every rank goes plain
    # alike, warns once, and the results stay exact. Where this NCCL hands back windows, the
    # case says so and checks the windows instead.
    _fresh_pools()
    group = ctx.new_group()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            _exact_all_reduce(ctx, group)
    resolved = symm_rs.groups.resolve(group)
    plain = bool(symm_rs._native.is_plain(resolved.comm))
    kinds = {w.category.__name__ for w in caught}
    ctx.details.update(plain=plain, warnings=sorted(kinds), nccl=symm_rs.library_info().version)
    if plain:
        assert sum(w.category is symm_rs.errors.NoSymmetricKernelsWarning for w in caught) == 1, (
            kinds
        )
        assert not symm_rs.symmetric_kernels(group)
    else:
        with symm_rs.use_symmetric_memory(group):
            x = torch.empty(MIB, device=ctx.device)
        assert symm_rs.is_registered(x, group)
        del x
    _fresh_pools()


def case_a_buffer_freed_and_its_pool_destroyed_under_a_running_collective(ctx: Ctx) -> None:
    # Last: must end exact or in a clear error, never a GPU fault. destroy_pool waits for the
    # device before any window is unmapped.
    _fresh_pools()
    group = ctx.new_group()
    n = 64 * MIB // 4
    with symm_rs.use_symmetric_memory(group):
        x = torch.full((n,), float(ctx.rank + 1), device=ctx.device)
    out = torch.empty(n, device=ctx.device)
    for _ in range(8):
        dist.all_reduce(x, group=group, async_op=False)
    out.copy_(x)
    del x  # freed while the all-reduces may still run
    _, seconds, error = _timed(symm_rs.destroy_pool)
    torch.cuda.synchronize()
    expected = (ctx.world_size * (ctx.world_size + 1) / 2) * ctx.world_size**7
    ctx.details.update(seconds=round(seconds, 3), error=error[:300])
    assert error == "" or "still alive" in error, error
    assert bool((out == expected).all()), "the result changed under a pool destruction"
    if error:
        _fresh_pools()
