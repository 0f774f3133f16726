// Up to SYMM_RS_MAX_COPIES device-to-device copies (or zero fills) in one kernel launch: the
// copies of symm_rs's CP all-gather (rust/src/cp.rs), so that a CUDA graph holds one kernel node
// per batch instead of one memcpy or memset node per copy.
//
// scripts/compile_ptx.py compiles this file to batched_copy.ptx beside it, which the crate
// embeds; rust/src/cuda/batched_copy.rs mirrors the two structs below and fills them. Any change
// here needs `make ptx` (the tests check that the PTX was made from this very source).
//
// The host splits every copy (rust/src/cuda/batched_copy.rs, `CopyDesc::new`): `head` bytes one
// at a time, so that dst + head and src + head are multiples of `width`; then the body in units of
// `width` bytes (16 when dst and src agree modulo 16: vector loads and stores); then the tail,
// fewer than `width` bytes, one at a time. Every thread of the grid walks every copy in turn,
// striding over its units, so large copies use the whole grid and copies need no ordering. No
// destination of a launch may overlap any source of that launch.

#define SYMM_RS_MAX_COPIES 16

typedef unsigned long long u64;

struct CopyDesc {
    u64 dst;             // where to write
    u64 src;             // where to read; 0: write zeros
    u64 bytes;           // bytes to write at dst
    unsigned int head;   // bytes written one at a time first (fewer than width, at most bytes)
    unsigned int width;  // then units of this many bytes: 1, 2, 4, 8 or 16
};

struct Params {
    CopyDesc copies[SYMM_RS_MAX_COPIES];
    unsigned int count;  // copies[0..count) are used
};

struct alignas(16) Vec16 {
    unsigned int x, y, z, w;
};

// The body of one copy: `units` units of T, each thread taking every `stride`-th from `first`,
// four in flight at a time.
template <typename T, bool ZERO>
__device__ __forceinline__ void body(char* __restrict__ dst, const char* __restrict__ src,
                                     u64 units, u64 first, u64 stride) {
    T* d = reinterpret_cast<T*>(dst);
    const T* s = reinterpret_cast<const T*>(src);
    u64 i = first;
    for (; i + 3 * stride < units; i += 4 * stride) {
        T a = ZERO ? T{} : s[i];
        T b = ZERO ? T{} : s[i + stride];
        T c = ZERO ? T{} : s[i + 2 * stride];
        T e = ZERO ? T{} : s[i + 3 * stride];
        d[i] = a;
        d[i + stride] = b;
        d[i + 2 * stride] = c;
        d[i + 3 * stride] = e;
    }
    for (; i < units; i += stride) {
        d[i] = ZERO ? T{} : s[i];
    }
}

template <bool ZERO>
__device__ __forceinline__ void body_of_width(unsigned int width, char* dst, const char* src,
                                              u64 units, u64 first, u64 stride) {
    switch (width) {
        case 16: body<Vec16, ZERO>(dst, src, units, first, stride); break;
        case 8: body<u64, ZERO>(dst, src, units, first, stride); break;
        case 4: body<unsigned int, ZERO>(dst, src, units, first, stride); break;
        case 2: body<unsigned short, ZERO>(dst, src, units, first, stride); break;
        default: body<unsigned char, ZERO>(dst, src, units, first, stride); break;
    }
}

extern "C" __global__ void __launch_bounds__(256)
    symm_rs_batched_copy(const __grid_constant__ Params params) {
    const u64 first = u64(blockIdx.x) * blockDim.x + threadIdx.x;
    const u64 stride = u64(gridDim.x) * blockDim.x;
    const unsigned int count =
        params.count < SYMM_RS_MAX_COPIES ? params.count : SYMM_RS_MAX_COPIES;
    for (unsigned int c = 0; c < count; ++c) {
        const CopyDesc& copy = params.copies[c];
        char* dst = reinterpret_cast<char*>(copy.dst);
        const char* src = reinterpret_cast<const char*>(copy.src);
        const bool zero = copy.src == 0;
        const unsigned int width = copy.width;
        const u64 rest = copy.bytes - copy.head;
        const u64 units = rest / width;
        const u64 body_end = copy.head + units * width;
        // The head and the tail: fewer than 16 bytes each, one thread per byte.
        if (first < copy.head) {
            dst[first] = zero ? 0 : src[first];
        }
        if (first < copy.bytes - body_end) {
            const u64 at = body_end + first;
            dst[at] = zero ? 0 : src[at];
        }
        char* d = dst + copy.head;
        if (zero) {
            body_of_width<true>(width, d, nullptr, units, first, stride);
        } else {
            body_of_width<false>(width, d, src + copy.head, units, first, stride);
        }
    }
    // NCCL 2.28.0-2.30.6 launch symmetric kernels with programmatic dependent launch and no
    // grid-dependency wait (NVIDIA/nccl#1924): the all-gather after this kernel may start once
    // every block has exited, before the kernel as a whole completes. The fence makes each
    // thread's writes visible device-wide before its block can exit.
    __threadfence();
}
