"""The NCCL probe behind README's findings, run once per part under torchrun (rank 0 writes
$OUT/<part>_<world><tag>.json): ``align`` (16-bit odd counts on symmetric buffers, with and
without a full device sync before each collective, which rules out a launch race), ``transport``
(windows, results and NCCL's tuning log with the transport forced by NCCL_* variables) and
``store`` (a store round trip against an all-gather on the communicator). The race with
programmatic dependent launch is probed by suite_safety instead.

    torchrun --nproc-per-node 4 tests/gpu/explore/nccl_probe.py align
"""

import ctypes
import glob
import importlib.util
import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

_so = glob.glob(
    os.path.join(os.environ.get("PYTHONPATH", "/tmp/site").split(":")[0], "symm_rs", "_native*.so")
)[0]
_spec = importlib.util.spec_from_file_location("symm_rs._native", _so)
_native = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_native)

part = sys.argv[1]
tag = sys.argv[2] if len(sys.argv) > 2 else ""
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
torch.cuda.set_device(rank)
dev = torch.device("cuda", rank)
dist.init_process_group("nccl", device_id=dev, timeout=timedelta(seconds=120))
pg = dist.group.WORLD
comm = int(pg._get_backend(dev)._comm_ptr())
_native.load_nccl([])
alloc = torch.cuda.memory.CUDAPluggableAllocator(_native.__file__, "symm_rs_alloc", "symm_rs_free")
pool = torch.cuda.MemPool(alloc.allocator())
cudart = None
for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
    try:
        cudart = ctypes.CDLL(name)
        break
    except OSError:
        pass


def symm(*shape, dtype=torch.float32):
    with torch.cuda.use_mem_pool(pool):
        t = torch.empty(*shape, dtype=dtype, device=dev)
    return t


def register():
    return _native.register_pending(comm)


def fence():
    s = torch.cuda.current_stream().cuda_stream
    rc = cudart.cudaMemsetAsync(
        ctypes.c_void_p(fence_buf.data_ptr()), 0, ctypes.c_size_t(4), ctypes.c_void_p(s)
    )
    assert rc == 0, rc


fence_buf = torch.zeros(16, device=dev)
out = {
    "part": part,
    "world": world,
    "tag": tag,
    "torch": torch.__version__,
    "device": torch.cuda.get_device_name(0),
    "nccl": ".".join(map(str, torch.cuda.nccl.version())),
    "env": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")},
}


def count_wrong(results):
    t = torch.tensor([results], dtype=torch.int64, device=dev)
    dist.all_reduce(t)
    return int(t.item())


def run_case(name, make_step, check, iters, graph):
    """make_step() enqueues one step; check() -> bool (exact)."""
    wrong = 0
    if graph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                make_step()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            make_step()
        torch.cuda.synchronize()
        for _i in range(iters):
            g.replay()
            torch.cuda.synchronize()
            wrong += int(not check())
        del g
    else:
        for _i in range(iters):
            make_step()
            torch.cuda.synchronize()
            wrong += int(not check())
    return count_wrong(wrong)


if part == "align":
    rows = []

    def pattern(n, r, salt, dtype):
        base = torch.arange(n, device=dev, dtype=torch.int64)
        return ((base * 5 + r * 3 + salt) % 7).to(dtype)

    for dtype in (torch.bfloat16, torch.float32):
        for count in (4096, 4097, 4098, 4100, 1001, 1002, 1003, 65537, 65538):
            for sync in (False, True):
                ag_out = symm(count * world, dtype=dtype)
                ag_in = symm(count, dtype=dtype)
                rs_in = symm(count * world, dtype=dtype)
                rs_out = symm(count, dtype=dtype)
                ip = symm(count * world, dtype=dtype)
                register()
                mine = ip.narrow(0, rank * count, count)
                ag_in.copy_(pattern(count, rank, 0, dtype))
                rs_in.copy_(pattern(count * world, rank, 1, dtype))
                mine.copy_(pattern(count, rank, 3, dtype))
                if sync:
                    torch.cuda.synchronize()
                    dist.barrier()
                dist.all_gather_into_tensor(ag_out, ag_in)
                if sync:
                    torch.cuda.synchronize()
                dist.reduce_scatter_tensor(rs_out, rs_in)
                if sync:
                    torch.cuda.synchronize()
                dist.all_gather_into_tensor(ip, mine)
                torch.cuda.synchronize()
                ag = torch.cat([pattern(count, r, 0, dtype) for r in range(world)])
                rs = sum(pattern(count * world, r, 1, dtype).double() for r in range(world))[
                    rank * count : (rank + 1) * count
                ]
                ipx = torch.cat([pattern(count, r, 3, dtype) for r in range(world)])
                bad = [
                    int(not torch.equal(ag_out, ag)),
                    int(not torch.equal(rs_out.double(), rs)),
                    int(not torch.equal(ip, ipx)),
                ]
                t = torch.tensor(bad, device=dev)
                dist.all_reduce(t)
                rows.append(
                    {
                        "dtype": str(dtype),
                        "count": count,
                        "sync": sync,
                        "ag_wrong_ranks": int(t[0]),
                        "rs_wrong_ranks": int(t[1]),
                        "inplace_ag_wrong_ranks": int(t[2]),
                        "inplace_input_offset_mod16": (rank * count * ag_in.element_size()) % 16,
                    }
                )
                if rank == 0:
                    print(rows[-1], flush=True)
    out["rows"] = rows

if part == "transport":
    res = {}
    a = symm(1 << 15)
    b = symm((1 << 15) * world)
    big_in = symm(1 << 20)
    big_out = symm((1 << 20) * world)
    t0 = time.perf_counter()
    made = register()
    res["register_ms"] = (time.perf_counter() - t0) * 1e3
    res["windows_made"] = made
    res["registered"] = all(
        _native.is_registered(t.data_ptr(), t.numel() * 4, comm) for t in (a, b, big_in, big_out)
    )
    a.fill_(rank + 1)
    dist.all_gather_into_tensor(b, a)
    dist.all_reduce(a)
    big_in.fill_(rank)
    dist.all_gather_into_tensor(big_out, big_in)
    torch.cuda.synchronize()
    res["exact"] = bool((a == sum(range(1, world + 1))).all()) and bool(
        torch.equal(big_out, torch.arange(world, device=dev).float().repeat_interleave(1 << 20))
    )
    try:
        import pynvml

        pynvml.nvmlInit()
        h = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(torch.cuda.device_count())]
        caps = {}
        for name, idx in (("read", 0), ("write", 1), ("nvlink", 2), ("atomics", 3), ("prop", 4)):
            try:
                caps[name] = pynvml.nvmlDeviceGetP2PStatus(h[0], h[1], idx)
            except Exception as e:
                caps[name] = repr(e)
        res["nvml_p2p_0_1"] = caps
    except Exception as e:
        res["nvml"] = repr(e)
    res["can_access_peer_0_1"] = torch.cuda.can_device_access_peer(0, 1)
    dist.barrier()
    torch.cuda.synchronize()
    _native.release_comm(comm)
    dist.destroy_process_group()
    time.sleep(0.5)
    lines = []
    for f in glob.glob(
        os.environ.get("NCCL_DEBUG_FILE", "/nonexistent").replace("%h", "*").replace("%p", "*")
    ):
        lines += open(f, errors="replace").read().splitlines()
    res["symmetric_lines"] = sum("[Symmetric]" in line for line in lines)
    res["tuning_lines"] = sum("Bytes ->" in line for line in lines)
    res["samples"] = [
        line
        for line in lines
        if "[Symmetric]" in line or "Symmetric VA" in line or "Bytes ->" in line
    ][:8]
    out["results"] = res
    if rank == 0:
        json.dump(
            out, open(os.path.join(os.environ["OUT"], f"{part}_{world}{tag}.json"), "w"), indent=1
        )
    sys.exit(0)

if part == "store":
    store = (
        dist.distributed_c10d._get_process_group_store(pg)
        if hasattr(dist.distributed_c10d, "_get_process_group_store")
        else dist.distributed_c10d._world.pg_map[pg][1]
    )
    n = 300
    dist.barrier()
    t0 = time.perf_counter()
    for i in range(n):
        keys = [f"x/{i}/{r}" for r in range(world)]
        store.set(keys[rank], b"1,2,3,4,5,6,7,8")
        store.wait(keys, timedelta(seconds=30))
        store.multi_get(keys)
        if i >= 2:
            store.delete_key(f"x/{i - 2}/{rank}")
    res = {"store_exchange_us": (time.perf_counter() - t0) / n * 1e6}
    send = torch.zeros(16, dtype=torch.int64, device=dev)
    recv = torch.zeros(16 * world, dtype=torch.int64, device=dev)
    dist.barrier()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        _native.run_collective(
            comm, "all_gather", recv, send, (torch.cuda.current_stream().cuda_stream, rank)
        )
        recv.tolist()
    res["nccl_exchange_us"] = (time.perf_counter() - t0) / n * 1e6
    res["has_get_pg_store"] = hasattr(dist.distributed_c10d, "_get_process_group_store")
    out["results"] = res

dist.barrier()
if rank == 0:
    json.dump(
        out, open(os.path.join(os.environ["OUT"], f"{part}_{world}{tag}.json"), "w"), indent=1
    )
_native.release_comm(comm)
dist.destroy_process_group()
