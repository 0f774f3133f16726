"""``symm_rs.ops`` without a GPU: the custom ops' schemas, fake shapes and argument errors, and
``torch.compile(fullgraph=True)`` tracing them.

The real implementations need a live communicator; here it is a stand-in that runs on CPU
tensors (``Loopback``: one rank, every collective the identity; ``Mirror``: rank 0 of two ranks
that hold the same data). They are shaped like ``symm_rs.Communicator`` (``comm`` and ``size``
properties over slots) so that dynamo traces the same attribute reads it does on the real one.
The GPU suite ``tests/gpu/suite_compile.py`` runs the ops on real communicators.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any, Callable, Optional

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import symm_rs
from symm_rs import ops


class Loopback:
    """One rank: all-reduce, all-gather and reduce-scatter all return the input."""

    __slots__ = ("__weakref__", "_address", "closed")
    ranks = 1

    def __init__(self) -> None:
        self._address = id(self)
        self.closed = False
        ops.remember(self)

    @property
    def comm(self) -> int:
        return self._address

    @property
    def size(self) -> int:
        return self.ranks

    def all_reduce(
        self, tensor: torch.Tensor, op: str = "sum", out: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        target = tensor if out is None else out
        target.copy_(self._reduce(tensor, op))
        return target

    def all_gather_into_tensor(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        out.copy_(torch.cat([inp] * self.ranks).reshape(out.shape))

    def reduce_scatter_tensor(self, out: torch.Tensor, inp: torch.Tensor, op: str = "sum") -> None:
        out.copy_(self._reduce(inp, op).reshape(self.ranks, *out.shape)[0])

    def _reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        return tensor * self.ranks if op == "sum" else tensor.clone()


class Mirror(Loopback):
    """Rank 0 of two ranks that hold the same data: sums double, gathers repeat."""

    __slots__ = ()
    ranks = 2


@pytest.fixture
def loopback() -> Iterator[Loopback]:
    yield Loopback()


@pytest.fixture
def plain_outputs() -> Iterator[None]:
    """A stand-in has no windows to allocate in: more than one rank needs plain outputs."""
    previous = ops.set_output_memory("plain")
    yield
    ops.set_output_memory(previous)


# -- registration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "schema"),
    [
        ("all_reduce", "symm_rs::all_reduce(Tensor x, int comm, str op) -> Tensor"),
        ("all_gather", "symm_rs::all_gather(Tensor x, int comm, int world_size) -> Tensor"),
        (
            "reduce_scatter",
            "symm_rs::reduce_scatter(Tensor x, int comm, int world_size, str op) -> Tensor",
        ),
    ],
)
def test_ops_are_registered_with_their_schemas(name: str, schema: str) -> None:
    overload = getattr(torch.ops.symm_rs, name).default
    assert str(overload._schema) == schema
    assert not overload._schema.is_mutable  # out of place: nothing a graph must order around


def test_ops_module_is_reachable_from_the_package() -> None:
    assert symm_rs.ops is ops
    assert "ops" in dir(symm_rs)


# -- fake implementations -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32])
def test_fake_shapes_and_dtypes(dtype: torch.dtype) -> None:
    with FakeTensorMode():
        x = torch.empty(8, 3, 5, dtype=dtype)
        reduced = torch.ops.symm_rs.all_reduce(x, 0x1000, "max")
        gathered = torch.ops.symm_rs.all_gather(x, 0x1000, 4)
        scattered = torch.ops.symm_rs.reduce_scatter(x, 0x1000, 4, "sum")
    assert reduced.shape == (8, 3, 5)
    assert gathered.shape == (32, 3, 5)
    assert scattered.shape == (2, 3, 5)
    assert {reduced.dtype, gathered.dtype, scattered.dtype} == {dtype}
    assert all(t.is_contiguous() for t in (reduced, gathered, scattered))


def test_fake_outputs_are_contiguous_for_a_strided_input() -> None:
    with FakeTensorMode():
        x = torch.empty(6, 4).t()
        assert torch.ops.symm_rs.all_reduce(x, 0x1000, "sum").is_contiguous()


def test_meta_tensors_use_the_fake_implementation() -> None:
    x = torch.empty(4, 2, device="meta")
    assert torch.ops.symm_rs.all_gather(x, 0x1000, 3).shape == (12, 2)


# -- argument errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "text"),
    [
        (lambda x: torch.ops.symm_rs.reduce_scatter(x, 1, 3, "sum"), "not divisible by"),
        (lambda x: torch.ops.symm_rs.reduce_scatter(x, 1, 2, "xor"), "op must be one of"),
        (lambda x: torch.ops.symm_rs.all_reduce(x, 1, "mean"), "op must be one of"),
        (lambda x: torch.ops.symm_rs.all_gather(x, 1, 0), "world_size must be >= 1"),
        (lambda x: torch.ops.symm_rs.all_gather(x[0, 0], 1, 2), "at least one dimension"),
    ],
)
def test_bad_arguments_are_value_errors_when_faked(call: Callable[..., Any], text: str) -> None:
    with FakeTensorMode():
        x = torch.empty(4, 2)
        with pytest.raises(ValueError, match=text):
            call(x)


def test_unknown_address_names_what_to_do() -> None:
    with pytest.raises(ValueError, match=r"no live symm_rs.Communicator has address 0x2a") as e:
        torch.ops.symm_rs.all_reduce(torch.ones(2), 42, "sum")
    assert "create it with symm_rs.Communicator" in str(e.value)


def test_world_size_must_match_the_communicator(loopback: Loopback) -> None:
    with pytest.raises(ValueError, match=r"world_size=2, but .* has 1 ranks; pass its \.size"):
        torch.ops.symm_rs.all_gather(torch.ones(2), loopback.comm, 2)


def test_closed_communicator_is_refused(loopback: Loopback) -> None:
    loopback.closed = True
    with pytest.raises(ValueError, match="is closed"):
        ops.all_reduce(torch.ones(2), loopback)


def test_the_registry_does_not_keep_communicators_alive() -> None:
    address = Loopback().comm
    gc.collect()
    with pytest.raises(ValueError, match="no live"):
        ops.lookup(address, "test")


def test_unknown_output_memory_is_refused() -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        ops.set_output_memory("pinned")


# -- real implementations on the stand-ins --------------------------------------------------


def test_one_rank_collectives_are_the_identity_in_new_tensors(loopback: Loopback) -> None:
    x = torch.arange(12.0).reshape(4, 3)
    for out in (
        ops.all_reduce(x, loopback),
        ops.all_gather(x, loopback),
        ops.reduce_scatter(x, loopback),
    ):
        assert torch.equal(out, x)
        assert out.data_ptr() != x.data_ptr()


def test_two_rank_shapes_and_values(plain_outputs: None) -> None:
    mirror = Mirror()
    x = torch.arange(8.0).reshape(4, 2)
    assert torch.equal(ops.all_reduce(x, mirror), 2 * x)
    assert torch.equal(ops.all_reduce(x, mirror, op="max"), x)
    assert torch.equal(ops.all_gather(x, mirror), torch.cat([x, x]))
    assert torch.equal(ops.reduce_scatter(x, mirror), 2 * x[:2])


def test_non_contiguous_inputs_are_made_contiguous(loopback: Loopback) -> None:
    x = torch.arange(6.0).reshape(2, 3).t()
    assert torch.equal(ops.all_gather(x, loopback), x)


@pytest.mark.parametrize("name", ["all_reduce", "all_gather", "reduce_scatter"])
def test_opcheck(loopback: Loopback, name: str) -> None:
    args: dict[str, tuple[Any, ...]] = {
        "all_reduce": (torch.randn(4, 3), loopback.comm, "sum"),
        "all_gather": (torch.randn(4, 3), loopback.comm, 1),
        "reduce_scatter": (torch.randn(4, 3), loopback.comm, 1, "sum"),
    }
    torch.library.opcheck(getattr(torch.ops.symm_rs, name).default, args[name])


# -- torch.compile --------------------------------------------------------------------------


def _block(x: torch.Tensor, w: torch.Tensor, comm: Any) -> torch.Tensor:
    """matmul -> all-reduce -> all-gather -> reduce-scatter, as a TP layer would."""
    h = ops.all_reduce(x @ w, comm)
    g = ops.all_gather(torch.relu(h), comm)
    return ops.reduce_scatter(g * 2, comm) + 1


def _recording(graphs: list[torch.fx.GraphModule]) -> Callable[..., Any]:
    def backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
        graphs.append(gm)
        return gm.forward

    return backend


@pytest.mark.parametrize("comm_kind", [Loopback, Mirror])
def test_fullgraph_traces_the_ops_as_ops(comm_kind: type, plain_outputs: None) -> None:
    torch._dynamo.reset()
    comm = comm_kind()
    graphs: list[torch.fx.GraphModule] = []
    compiled = torch.compile(
        lambda x, w: _block(x, w, comm), fullgraph=True, backend=_recording(graphs)
    )
    x, w = torch.randn(4, 6), torch.randn(6, 6)
    assert torch.equal(compiled(x, w), _block(x, w, comm))
    assert len(graphs) == 1  # one graph: no break
    # Dynamo records the op packet (``symm_rs.all_reduce``), AOTAutograd the overload.
    called = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    for name in ("all_reduce", "all_gather", "reduce_scatter"):
        assert any(c.split(".")[:2] == ["symm_rs", name] for c in called), called


@pytest.mark.parametrize("dynamic", [False, True])
def test_aot_eager_runs_fake_then_real_implementations(loopback: Loopback, dynamic: bool) -> None:
    torch._dynamo.reset()
    compiled = torch.compile(_block, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for rows in (4, 6):
        x, w = torch.randn(rows, 5), torch.randn(5, 5)
        assert torch.equal(compiled(x, w, loopback), _block(x, w, loopback))


def test_an_nn_module_holding_the_communicator_compiles(loopback: Loopback) -> None:
    torch._dynamo.reset()

    class Layer(torch.nn.Module):
        def __init__(self, comm: Any) -> None:
            super().__init__()
            self.comm = comm
            self.register_buffer("w", torch.randn(5, 5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return _block(x, self.w, self.comm)

    layer = Layer(loopback)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 5)
    assert torch.equal(compiled(x), layer(x))
