// The fused distillation loss on the GPU: the twin of kernels/src/fused.rs, whose module
// documentation defines the loss, the per-row weights and the "rest" bucket of a vocabulary
// mismatch. This file only says how the GPU computes it.
//
// Work split. Row r of the logits is handled by one cluster of CLUSTER thread blocks (or, in the
// `_row` kernels, by one block). Block c of the cluster owns the ids [c*cs, (c+1)*cs) on both
// sides (cs a multiple of 8), so a shared id's student and teacher logits meet in one block.
//
// Passes. (1) Stats: each thread streams its packs of 8 logits (16-byte loads where aligned),
// keeps an online max and sum-of-exponentials per stream (student and teacher, each split into
// the shared ids and the rest). Block and cluster reductions (the latter through distributed
// shared memory) give every block the row's normalisers. (2) Gradient: each thread reads its
// packs again, writes the gradient of the student logits and accumulates the shared-range KL,
// which is reduced the same way; block 0 writes the row's (kl, ce) contributions. A second
// kernel sums the rows in a fixed order, so the loss is deterministic.
//
// Three kernel shapes differ only in where the second read comes from:
// - `_row`: one block per row; the second read goes to global memory again (with ~130 rows in
//   flight, 600 KB each in bf16, it mostly misses L2).
// - `_cluster`: CLUSTER blocks per row; pass 1 parks the slice in shared memory by bulk copies
//   (TMA), pass 2 reads it from there.
// - `_split_cC_tN`: C blocks per row of N threads, no staging: each thread keeps several 16-byte
//   loads in flight, pass 1 asks L2 to keep the lines (evict_last) and pass 2 re-reads them with
//   evict_first. C blocks per row cut the rows in flight by C, so their slices fit in L2 between
//   the two reads. The `_nohint` kernels use plain loads and stores, as a control.
//
// Exponentials are the cost next to memory, so each stream keeps its sum relative to its own
// running maximum m as z = sum exp((x - m) / T), and the temperature-1 sum of the cross-entropy
// rides on the same exponential as e^T (T in {1, 2, 4}; other temperatures pay one more exp).
// The gradient pass needs one exp per shared id and side, and one per student rest id.

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <stdint.h>

namespace cg = cooperative_groups;

// Everything besides the buffers; mirrors `Params` in kernels/src/cuda.rs (same field order).
struct Params {
    int n;        // rows
    int vs;       // student vocabulary
    int vt;       // teacher vocabulary
    int shared;   // shared id range [0, shared)
    int cs;       // ids per block (a multiple of 8)
    int tpow;     // T when it is 1, 2 or 4 (e^T by multiplication), else 0
    int do_kl;    // alpha > 0
    int do_ce;    // alpha < 1
    float inv_t;  // 1 / T
    float alpha;
    float temperature;
    float inv_n;  // 1 / N
};

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void put(float* p, float x) { *p = x; }
__device__ __forceinline__ void put(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }

// Eight consecutive logits as they lie in memory: one 16-byte word in bf16, two in f32.
template <typename E>
struct Raw {
    uint4 q[sizeof(E) / 2];
};

// bf16 -> f32 is exact (a bf16 is the top half of an f32), so a 32-bit word of two bf16 unpacks
// by one shift and one mask, without the byte permutes of element-wise conversion.
__device__ __forceinline__ void unpack(const Raw<__nv_bfloat16>& r, float v[8]) {
    const uint32_t w[4] = {r.q[0].x, r.q[0].y, r.q[0].z, r.q[0].w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        v[2 * k] = __uint_as_float(w[k] << 16);
        v[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
}

__device__ __forceinline__ void unpack(const Raw<float>& r, float v[8]) {
    const uint4 a = r.q[0], b = r.q[1];
    v[0] = __uint_as_float(a.x); v[1] = __uint_as_float(a.y);
    v[2] = __uint_as_float(a.z); v[3] = __uint_as_float(a.w);
    v[4] = __uint_as_float(b.x); v[5] = __uint_as_float(b.y);
    v[6] = __uint_as_float(b.z); v[7] = __uint_as_float(b.w);
}

// The inverse, rounding to nearest even (two bf16 per conversion instruction).
template <typename E>
__device__ __forceinline__ Raw<E> pack(const float v[8]) {
    Raw<E> r;
    if constexpr (sizeof(E) == 2) {
        uint32_t w[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * k], v[2 * k + 1]);
            w[k] = *reinterpret_cast<const uint32_t*>(&h);
        }
        r.q[0] = make_uint4(w[0], w[1], w[2], w[3]);
    } else {
        r.q[0] = make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]),
                            __float_as_uint(v[3]));
        r.q[1] = make_uint4(__float_as_uint(v[4]), __float_as_uint(v[5]), __float_as_uint(v[6]),
                            __float_as_uint(v[7]));
    }
    return r;
}

__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// Eight consecutive logits from p (global or shared memory), of which `valid` exist; the others
// read as -inf.
template <typename E>
__device__ __forceinline__ void load8(const E* p, int valid, float v[8]) {
    if (valid == 8 && aligned16(p)) {
        unpack(*reinterpret_cast<const Raw<E>*>(p), v);
    } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] = k < valid ? to_f(p[k]) : -INFINITY;
    }
}

// Stores the first `valid` of eight values to p (16-byte stores where aligned).
template <typename E>
__device__ __forceinline__ void store8(E* p, int valid, const float v[8]) {
    if (valid == 8 && aligned16(p)) {
        *reinterpret_cast<Raw<E>*>(p) = pack<E>(v);
    } else {
        for (int k = 0; k < valid; ++k) put(p + k, v[k]);
    }
}

// L2 eviction policies (createpolicy) for the split kernels: `keep` on the first read of a slice
// that is read again soon, `drop` on its last read.
__device__ __forceinline__ uint64_t l2_keep() {
    uint64_t p;
    asm("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(p));
    return p;
}

__device__ __forceinline__ uint64_t l2_drop() {
    uint64_t p;
    asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
    return p;
}

// One 16-byte read-only global load, past L1 (nothing is reused from it) with an L2 policy.
__device__ __forceinline__ uint4 ld16_hint(const uint4* p, uint64_t policy) {
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p), "l"(policy));
    return r;
}

// A whole pack from global memory (16-byte aligned), with the L2 policy when HINT.
template <bool HINT, typename E>
__device__ __forceinline__ Raw<E> fetch(const E* p, uint64_t policy) {
    Raw<E> r;
    const uint4* q = reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int i = 0; i < (int)(sizeof(E) / 2); ++i)
        r.q[i] = HINT ? ld16_hint(q + i, policy) : __ldg(q + i);
    return r;
}

// A whole pack to global memory (16-byte aligned); with HINT as streaming stores (evict first:
// the gradient is not read again by this kernel).
template <bool HINT, typename E>
__device__ __forceinline__ void emit(E* p, const Raw<E>& r) {
    uint4* q = reinterpret_cast<uint4*>(p);
#pragma unroll
    for (int i = 0; i < (int)(sizeof(E) / 2); ++i) {
        if constexpr (HINT) {
            __stcs(q + i, r.q[i]);
        } else {
            q[i] = r.q[i];
        }
    }
}

constexpr float LOG2E = 1.4426950408889634f;

// 2^x on the special-function unit (relative error ~2^-22; flushes results below 2^-126 to 0).
// Every per-logit exponential goes through it, as 2^((x - m) * log2(e) / T).
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// An online log-sum-exp: z = sum exp((x - m) * inv_t), z1 = sum exp(x - m) (the temperature-1
// sum, kept only for the student when the cross-entropy needs its own softmax).
struct Stream {
    float m, z, z1;
};

__device__ __forceinline__ Stream empty_stream() { return Stream{-INFINITY, 0.f, 0.f}; }

// exp(d)^T for the temperature-1 sum, from e = exp(d / T).
__device__ __forceinline__ float pow_t(float e, float d, int tpow) {
    if (tpow == 1) return e;
    if (tpow == 2) return e * e;
    if (tpow == 4) { float e2 = e * e; return e2 * e2; }
    return ex2(d * LOG2E);
}

// Folds eight values into the stream (missing ones are -inf and add nothing). The sums are
// taken as trees, not chains, so the eight exponentials overlap. `c2` is log2(e) / T throughout.
__device__ __forceinline__ void push(Stream& s, const float v[8], float c2, int tpow,
                                     bool want_z1) {
    const float pm = fmaxf(fmaxf(fmaxf(v[0], v[1]), fmaxf(v[2], v[3])),
                           fmaxf(fmaxf(v[4], v[5]), fmaxf(v[6], v[7])));
    if (pm == -INFINITY) return;
    if (pm > s.m) {
        if (s.z != 0.f) {
            const float d = s.m - pm;
            const float r = ex2(d * c2);
            s.z *= r;
            if (want_z1) s.z1 *= pow_t(r, d, tpow);
        }
        s.m = pm;
    }
    float e[8], e1[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        const float d = v[k] - s.m;
        e[k] = ex2(d * c2);
        e1[k] = want_z1 ? pow_t(e[k], d, tpow) : 0.f;
    }
    s.z += ((e[0] + e[1]) + (e[2] + e[3])) + ((e[4] + e[5]) + (e[6] + e[7]));
    if (want_z1) s.z1 += ((e1[0] + e1[1]) + (e1[2] + e1[3])) + ((e1[4] + e1[5]) + (e1[6] + e1[7]));
}

__device__ __forceinline__ Stream merge(Stream a, Stream b, float c2, int tpow) {
    if (b.z == 0.f && b.m == -INFINITY) return a;
    if (a.z == 0.f && a.m == -INFINITY) return b;
    float m = fmaxf(a.m, b.m);
    float da = a.m - m, db = b.m - m;
    float ra = ex2(da * c2), rb = ex2(db * c2);
    return Stream{m, a.z * ra + b.z * rb, a.z1 * pow_t(ra, da, tpow) + b.z1 * pow_t(rb, db, tpow)};
}

// Hopper bulk copies (the TMA engine) from global into this block's shared memory, completing
// on an mbarrier: one thread starts the whole chunk's transfer, all threads wait piece by piece.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint64_t* bar) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(bar)) : "memory");
}

__device__ __forceinline__ void mbar_expect(uint64_t* bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)),
                 "r"(bytes)
                 : "memory");
}

// Waits for phase 0 of the mbarrier to complete; CLUSTER_SCOPE when arrivals come from other
// blocks of the cluster (their writes become visible here).
template <bool CLUSTER_SCOPE = false>
__device__ __forceinline__ void mbar_wait(uint64_t* bar) {
    uint32_t done = 0;
    while (!done) {
        if constexpr (CLUSTER_SCOPE) {
            asm volatile(
                "{\n .reg .pred p;\n"
                " mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], 0;\n"
                " selp.u32 %0, 1, 0, p;\n}"
                : "=r"(done)
                : "r"(smem_addr(bar))
                : "memory");
        } else {
            asm volatile(
                "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], 0;\n"
                " selp.u32 %0, 1, 0, p;\n}"
                : "=r"(done)
                : "r"(smem_addr(bar))
                : "memory");
        }
    }
}

__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes,
                                          uint64_t* bar) {
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
        ::"r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(smem_addr(bar))
        : "memory");
}

// Folds one pack (ids lo + i.., `n` of them, the missing ones -inf) into the shared-id stream
// `a` and the rest stream `b`.
__device__ __forceinline__ void fold(const float v[8], int n, int i, int lo, int sh, Stream& a,
                                     Stream& b, float c2, int tpow, bool want_z1) {
    const int cut = min(n, max(0, sh - (lo + i)));  // the first `cut` are shared ids
    if (cut == 8) {
        push(a, v, c2, tpow, want_z1);
    } else if (cut == 0) {
        push(b, v, c2, tpow, want_z1);
    } else {
        float x[8], y[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            x[j] = j < cut ? v[j] : -INFINITY;
            y[j] = j >= cut ? v[j] : -INFINITY;
        }
        push(a, x, c2, tpow, want_z1);
        push(b, y, c2, tpow, want_z1);
    }
}

// Statistics of the packs [begin, end) (element offsets, begin a multiple of 8) of both sides:
// the student's `es` ids of src_s and the teacher's `et` of src_t (each clipped to its own end),
// both loads issued before either is used.
template <typename S, typename T>
__device__ __forceinline__ void stats_range(const S* src_s, const T* src_t, int begin, int end,
                                            int es, int et, int lo, int sh,
                                            Stream (&st)[4], float c2, int tpow, bool want_z1) {
    for (int i = begin + threadIdx.x * 8; i < end; i += blockDim.x * 8) {
        float a[8], b[8];
        const int ns = min(8, es - i), nt = min(8, et - i);
        if (ns > 0) load8(src_s + i, ns, a);
        if (nt > 0) load8(src_t + i, nt, b);
        if (ns > 0) fold(a, ns, i, lo, sh, st[0], st[1], c2, tpow, want_z1);
        if (nt > 0) fold(b, nt, i, lo, sh, st[2], st[3], c2, tpow, false);
    }
}

constexpr int PIECES = 4;  // bulk-copy pieces per chunk: statistics start on the first

constexpr int MAX_WARPS = 32;
constexpr int NSTREAMS = 4;  // student shared, student rest, teacher shared, teacher rest

// Cluster barriers. Besides the one in reduce_streams (every block needs the row's statistics),
// a block only has to know, before it exits, that no other block still reads its shared memory:
// that phase is begun with a relaxed arrive as soon as the block has read the others' partial
// statistics, and completed by leave_cluster() at the very end, so no block waits for another
// after pass 2 (and no thread waits there for its gradient stores to land, as a release would).
__device__ __forceinline__ void cluster_arrive_relaxed() {
    asm volatile("barrier.cluster.arrive.relaxed;" ::: "memory");
}

template <int CLUSTER>
__device__ __forceinline__ void leave_cluster() {
    if constexpr (CLUSTER > 1) asm volatile("barrier.cluster.wait;" ::: "memory");
}

// The address of `p` (this block's shared memory) in block `rank` of the cluster.
__device__ __forceinline__ uint32_t dsmem_addr(const void* p, uint32_t rank) {
    uint32_t a;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(a) : "r"(smem_addr(p)), "r"(rank));
    return a;
}

// The mbarrier on which block 0 of a cluster waits for the other blocks' KL sums (reduce_sum).
// Initialised before the cluster barrier of reduce_streams, which orders it before any arrival.
template <int CLUSTER>
__device__ __forceinline__ void init_kl_barrier(uint64_t* bar) {
    if constexpr (CLUSTER > 1) {
        if (threadIdx.x == 0) {
            asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)),
                         "r"(CLUSTER)
                         : "memory");
            asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        }
    }
}

// Reduces each thread's streams over the block and then over the cluster (CLUSTER > 1), in a
// fixed order, leaving the row's streams in every thread's `st` and in the shared memory it
// returns (unchanged until the kernel ends: the row's last step reads them there rather than
// keeping them in registers through pass 2). One cluster barrier; then each block reads the
// others' `part` through distributed shared memory and begins the exit phase (see above).
template <int CLUSTER>
__device__ const Stream* reduce_streams(Stream (&st)[NSTREAMS], float c2, int tpow) {
    __shared__ Stream scratch[MAX_WARPS][NSTREAMS];
    __shared__ Stream part[NSTREAMS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
    for (int i = 0; i < NSTREAMS; ++i) {
        for (int o = 16; o > 0; o >>= 1) {
            Stream other{__shfl_down_sync(0xffffffffu, st[i].m, o),
                         __shfl_down_sync(0xffffffffu, st[i].z, o),
                         __shfl_down_sync(0xffffffffu, st[i].z1, o)};
            st[i] = merge(st[i], other, c2, tpow);
        }
        if (lane == 0) scratch[warp][i] = st[i];
    }
    __syncthreads();
    if (threadIdx.x < NSTREAMS) {
        const int i = threadIdx.x;
        Stream acc = scratch[0][i];
        for (int w = 1; w < nwarps; ++w) acc = merge(acc, scratch[w][i], c2, tpow);
        part[i] = acc;
    }
    if constexpr (CLUSTER > 1) {
        cg::cluster_group cluster = cg::this_cluster();
        cluster.sync();  // every block's `part` is written (and every block has started)
        if (threadIdx.x < NSTREAMS) {
            const int i = threadIdx.x;
            Stream acc = cluster.map_shared_rank(part, 0)[i];
#pragma unroll
            for (int r = 1; r < CLUSTER; ++r)
                acc = merge(acc, cluster.map_shared_rank(part, r)[i], c2, tpow);
            scratch[0][i] = acc;
        }
    } else {
        __syncthreads();
        if (threadIdx.x < NSTREAMS) scratch[0][threadIdx.x] = part[threadIdx.x];
    }
    __syncthreads();
    // The remote values are in scratch (the loads completed): this block is done reading.
    if constexpr (CLUSTER > 1) cluster_arrive_relaxed();
#pragma unroll
    for (int i = 0; i < NSTREAMS; ++i) st[i] = scratch[0][i];
    return scratch[0];
}

// Sum of one float over the block and the cluster, fixed order (warps, then blocks by rank).
// The result is valid in thread 0 of the cluster's block 0 only. Each block's thread 0 stores
// its block's sum into block 0's `slots` and arrives (release) on block 0's `bar` (see
// init_kl_barrier); only block 0's thread 0 waits. Block 0 stays alive while the others write
// into it, since it waits for exactly those writes.
template <int CLUSTER>
__device__ float reduce_sum(float x, uint64_t* bar) {
    __shared__ float scratch[MAX_WARPS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    float acc = 0.f;
    if (threadIdx.x == 0)
        for (int w = 0; w < nwarps; ++w) acc += scratch[w];
    if constexpr (CLUSTER > 1) {
        __shared__ float slots[CLUSTER];
        if (threadIdx.x == 0) {
            const uint32_t rank = cg::this_cluster().block_rank();
            asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(dsmem_addr(&slots[rank], 0)),
                         "f"(acc)
                         : "memory");
            asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];" ::"r"(
                             dsmem_addr(bar, 0))
                         : "memory");
            if (rank == 0) {
                mbar_wait<true>(bar);
                acc = 0.f;
#pragma unroll
                for (int r = 0; r < CLUSTER; ++r) acc += slots[r];
            }
        }
    }
    return acc;
}

// A log-normaliser `m * inv_t + lz` of a stream (lz = -inf when it is empty).
struct Norm {
    float m, lz;
};

__device__ __forceinline__ Norm norm_of(float m_scaled, float z) {
    return z > 0.f ? Norm{m_scaled, logf(z)} : Norm{0.f, -INFINITY};
}

// `a - b` as a log-ratio, in double like the CPU twin.
__device__ __forceinline__ double minus(Norm a, Norm b) {
    return ((double)a.m - (double)b.m) + ((double)a.lz - (double)b.lz);
}

// This block's part of its row: block `rank` of the row's cluster owns the ids [lo, lo + cs),
// of which the student has `hs` and the teacher `ht`.
struct Slice {
    int row, rank, lo, hs, ht;
    float wr;  // the row's weight (0: masked)
};

template <int CLUSTER>
__device__ __forceinline__ Slice slice_of(const float* w, const Params& p) {
    Slice sl;
    sl.rank = 0;
    if constexpr (CLUSTER > 1) sl.rank = (int)cg::this_cluster().block_rank();
    sl.row = blockIdx.x / CLUSTER;
    sl.wr = w ? w[sl.row] : 1.f;
    sl.lo = sl.rank * p.cs;
    sl.hs = max(0, min(sl.lo + p.cs, p.vs) - sl.lo);
    sl.ht = max(0, min(sl.lo + p.cs, p.vt) - sl.lo);
    return sl;
}

// A masked row: never read, gradient exactly 0, row contributions 0 (the whole cluster takes
// this path, so no block waits at a cluster barrier for it).
template <typename S>
__device__ void masked_slice(S* gg, const Slice& sl, float* rows) {
    const float zero8[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (gg)
        for (int k = threadIdx.x; k * 8 < sl.hs; k += blockDim.x)
            store8(gg + k * 8, min(8, sl.hs - k * 8), zero8);
    if (sl.rank == 0 && threadIdx.x == 0) rows[2 * sl.row] = rows[2 * sl.row + 1] = 0.f;
}

// Whether the cross-entropy needs its own (temperature-1) softmax sum: not when the KL's softmax
// is already at temperature 1.
__device__ __forceinline__ bool ce_own_of(const Params& p) {
    return p.do_ce != 0 && !(p.do_kl != 0 && p.tpow == 1);
}

// The row's constants once its streams are reduced: normalisers for the row's loss, and the
// per-id factors of the gradient, each id's exponential taken against its own stream's maximum:
// q = e * aq (student softmax at T), p1 = e^T * a1 (at temperature 1), pt = f * at.
struct RowK {
    bool do_kl, do_ce, ce_own;
    int tpow, target;
    float c2, inv_t, wr;
    float ss_m, sr_m, ts_m, s_all_m;  // stream maxima
    float lz1;                        // log of the temperature-1 sum (relative to s_all_m)
    Norm n_s, n_t, n_sr, n_tr;
    float aq_ss, aq_sr, at_ts, a1_ss, a1_sr, ar_sr, pt_rest;
    float ck, cc, klc;  // gradient scales of KL and CE; log pt - log q = (dt - d) / T + klc
};

__device__ __forceinline__ RowK row_consts(const Stream* st, const Params& p, float wr,
                                           int target) {
    RowK k;
    k.do_kl = p.do_kl != 0;
    k.do_ce = p.do_ce != 0;
    k.ce_own = ce_own_of(p);
    k.tpow = p.tpow;
    k.target = target;
    k.c2 = p.inv_t * LOG2E;
    k.inv_t = p.inv_t;
    k.wr = wr;
    // Student: ss (shared), sr (rest); s = ss + sr; teacher likewise.
    const Stream ss = st[0], sr = st[1], ts = st[2], tr = st[3];
    const Stream s_all = merge(ss, sr, k.c2, p.tpow);
    const Stream t_all = merge(ts, tr, k.c2, p.tpow);
    k.ss_m = ss.m;
    k.sr_m = sr.m;
    k.ts_m = ts.m;
    k.s_all_m = s_all.m;
    k.n_s = norm_of(s_all.m * p.inv_t, s_all.z);
    k.n_t = norm_of(t_all.m * p.inv_t, t_all.z);
    k.n_sr = norm_of(sr.m * p.inv_t, sr.z);
    k.n_tr = norm_of(tr.m * p.inv_t, tr.z);
    k.lz1 = k.ce_own ? logf(s_all.z1) : 0.f;
    k.ck = k.do_kl ? p.alpha * p.temperature * wr * p.inv_n : 0.f;
    k.cc = k.do_ce ? (1.f - p.alpha) * wr * p.inv_n : 0.f;
    // (Differences of maxima first: exact, so logits of size 1e4 keep their precision.)
    const float lq_ss = (ss.m - s_all.m) * p.inv_t - k.n_s.lz;  // log aq for shared ids
    const float lq_sr = (sr.m - s_all.m) * p.inv_t - k.n_s.lz;  // log aq for rest ids
    const float lt_ts = (ts.m - t_all.m) * p.inv_t - k.n_t.lz;  // log at
    k.aq_ss = expf(lq_ss);
    k.aq_sr = expf(lq_sr);
    k.at_ts = expf(lt_ts);
    k.a1_ss = k.ce_own ? expf((ss.m - s_all.m) - k.lz1) : 0.f;
    k.a1_sr = k.ce_own ? expf((sr.m - s_all.m) - k.lz1) : 0.f;
    k.ar_sr = sr.z > 0.f ? 1.f / sr.z : 0.f;  // student softmax within the rest bucket
    k.pt_rest = k.n_tr.lz == -INFINITY ? 0.f : (float)exp(minus(k.n_tr, k.n_t));
    k.klc = lt_ts - lq_ss;
    return k;
}

// The gradient of a whole pack of shared ids when the KL is on (the hot path, two exponentials
// per id): x holds the student's logits and gets the gradient, y the teacher's. Adds the pack's
// KL terms to kl.
__device__ __forceinline__ void grad8_shared(const RowK& k, float x[8], const float y[8],
                                             float& kl) {
    float kj[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const float d = x[j] - k.ss_m, dt = y[j] - k.ts_m;
        const float e = ex2(d * k.c2), f = ex2(dt * k.c2);
        const float q = e * k.aq_ss, pt = f * k.at_ts;
        kj[j] = pt * fmaf(dt - d, k.inv_t, k.klc);
        const float p1 = k.ce_own ? pow_t(e, d, k.tpow) * k.a1_ss : q;
        x[j] = fmaf(k.ck, q - pt, k.cc * p1);
    }
    kl += ((kj[0] + kj[1]) + (kj[2] + kj[3])) + ((kj[4] + kj[5]) + (kj[6] + kj[7]));
}

// The cross-entropy's -1 at the target id, if it is in the pack of ids base..base + 7.
__device__ __forceinline__ void grad8_target(const RowK& k, float x[8], int base) {
    if ((unsigned)(k.target - base) < 8u) {
#pragma unroll
        for (int j = 0; j < 8; ++j)
            if (base + j == k.target) x[j] -= k.cc;
    }
}

// The gradient of any pack of student ids: x holds the logits and gets the gradient; `n` are
// valid, the first `cut` are shared ids, y holds the teacher's logits of those (read only when
// do_kl). Adds the pack's shared-id KL terms to kl.
__device__ __forceinline__ void grad8(const RowK& k, float x[8], const float y[8], int n,
                                      int cut, int base, float& kl) {
    if (k.do_kl && cut == 8) {
        grad8_shared(k, x, y, kl);
    } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            if (j >= n) {
                x[j] = 0.f;
                continue;
            }
            const bool in_shared = j < cut;
            const float d = x[j] - (in_shared ? k.ss_m : k.sr_m);
            const float e = ex2(d * k.c2);
            float gj = 0.f, q = 0.f;
            if (k.do_kl) {
                q = e * (in_shared ? k.aq_ss : k.aq_sr);
                if (in_shared) {
                    const float dt = y[j] - k.ts_m;
                    const float pt = ex2(dt * k.c2) * k.at_ts;
                    kl = fmaf(pt, fmaf(dt - d, k.inv_t, k.klc), kl);
                    gj = k.ck * (q - pt);
                } else {
                    gj = k.ck * (q - k.pt_rest * e * k.ar_sr);
                }
            }
            if (k.do_ce)
                gj += k.cc *
                      (k.ce_own ? pow_t(e, d, k.tpow) * (in_shared ? k.a1_ss : k.a1_sr) : q);
            x[j] = gj;
        }
    }
    grad8_target(k, x, base);
}

// Pass 2 over the packs k0, k0 + 1, .. of a slice of `hs` student ids starting at id `lo`, one
// pack per thread at a time (any alignment): writes the gradient, returns this thread's KL.
template <typename S, typename T>
__device__ __forceinline__ float grad_range(const S* src_s, const T* src_t, int k0, int hs,
                                            int lo, int sh, const RowK& rk, S* gg) {
    float kl = 0.f;
    for (int k = k0 + threadIdx.x; k * 8 < hs; k += blockDim.x) {
        const int n = min(8, hs - k * 8);
        const int base = lo + k * 8;
        float x[8], y[8];
        load8(src_s + k * 8, n, x);
        const int cut = min(n, max(0, sh - base));
        if (rk.do_kl && cut > 0) load8(src_t + k * 8, cut, y);
        grad8(rk, x, y, n, cut, base, kl);
        if (gg) store8(gg + k * 8, n, x);
    }
    return kl;
}

// Block 0's last step: the row's (kl, ce) contributions from its reduced streams (as
// reduce_streams left them in shared memory) and the reduced shared-range KL.
template <typename S>
__device__ void finish_row(const Stream* streams, float wr, int target, float kl, const S* s,
                           int row, const Params& p, float* rows) {
    const RowK k = row_consts(streams, p, wr, target);
    double kl_row = kl;
    if (k.do_kl && k.n_tr.lz != -INFINITY) {  // the rest buckets
        const double lpt = minus(k.n_tr, k.n_t), lps = minus(k.n_sr, k.n_s);
        kl_row += exp(lpt) * (lpt - lps);
    }
    double ce = 0.0;
    if (k.target >= 0) {
        const double x = to_f(s[(size_t)row * p.vs + k.target]);
        ce = ((double)k.s_all_m - x) + (double)k.lz1;
        if (!k.ce_own) ce = ((double)k.n_s.m - x) + (double)k.n_s.lz;
    }
    const double t2 = (double)p.temperature * p.temperature;
    rows[2 * row] = k.do_kl ? (float)(p.alpha * t2 * k.wr * kl_row * p.inv_n) : 0.f;
    rows[2 * row + 1] = (float)((1.0 - p.alpha) * k.wr * ce * p.inv_n);
}

// The `_row` (CLUSTER = 1) and `_cluster` kernels.
template <typename S, typename T, int CLUSTER>
__device__ void distill_body(const S* __restrict__ s, const T* __restrict__ t,
                             const float* __restrict__ w, const int* __restrict__ targets,
                             S* __restrict__ grad, float* __restrict__ rows, const Params p) {
    extern __shared__ __align__(16) unsigned char cache[];
    const Slice sl = slice_of<CLUSTER>(w, p);
    const int lo = sl.lo, hs = sl.hs, ht = sl.ht;
    const S* gs = s + (size_t)sl.row * p.vs + lo;
    const T* gt = t + (size_t)sl.row * p.vt + lo;
    S* gg = grad ? grad + (size_t)sl.row * p.vs + lo : nullptr;
    if (sl.wr == 0.f) {
        masked_slice(gg, sl, rows);
        return;
    }
    __shared__ uint64_t kl_bar;
    init_kl_barrier<CLUSTER>(&kl_bar);
    const bool do_kl = p.do_kl != 0, ce_own = ce_own_of(p);
    const int target = p.do_ce != 0 && targets ? targets[sl.row] : -1;
    const int sh = p.shared;
    const float c2 = p.inv_t * LOG2E;
    S* cs_s = reinterpret_cast<S*>(cache);
    T* cs_t = reinterpret_cast<T*>(cache + (size_t)p.cs * sizeof(S));

    // Pass 1: statistics. The cluster kernels first start bulk copies of their chunk into shared
    // memory (the one read of global memory) and work on each piece as it lands.
    Stream st[NSTREAMS] = {empty_stream(), empty_stream(), empty_stream(), empty_stream()};
    const int ht_used = do_kl ? ht : 0;
    const int hmax = max(hs, ht_used);
    if constexpr (CLUSTER > 1) {
        __shared__ uint64_t bars[PIECES];
        const int ps = (((hmax + 7) / 8 + PIECES - 1) / PIECES) * 8;  // ids per piece
        if (threadIdx.x == 0) {
            for (int i = 0; i < PIECES; ++i) mbar_init(&bars[i]);
            asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            for (int i = 0; i < PIECES; ++i) {
                const int s0 = min(hs, i * ps), s1 = min(hs, (i + 1) * ps);
                const int t0 = min(ht_used, i * ps), t1 = min(ht_used, (i + 1) * ps);
                const uint32_t bs = (uint32_t)((s1 - s0) * sizeof(S));
                const uint32_t bt = (uint32_t)((t1 - t0) * sizeof(T));
                mbar_expect(&bars[i], bs + bt);  // also this piece's one arrival
                if (bs) bulk_copy(cs_s + s0, gs + s0, bs, &bars[i]);
                if (bt) bulk_copy(cs_t + t0, gt + t0, bt, &bars[i]);
            }
        }
        for (int i = 0; i < PIECES; ++i) {
            mbar_wait(&bars[i]);
            stats_range(cs_s, cs_t, min(hmax, i * ps), min(hmax, (i + 1) * ps), hs, ht_used, lo,
                        sh, st, c2, p.tpow, ce_own);
        }
    } else {
        stats_range(gs, gt, 0, hmax, hs, ht_used, lo, sh, st, c2, p.tpow, ce_own);
    }
    const Stream* streams = reduce_streams<CLUSTER>(st, c2, p.tpow);
    const RowK rk = row_consts(st, p, sl.wr, target);

    // Pass 2: gradient over the student ids, KL over the shared ids.
    const S* src_s = gs;
    const T* src_t = gt;
    if constexpr (CLUSTER > 1) {
        src_s = cs_s;
        src_t = cs_t;
    }
    const float kl =
        reduce_sum<CLUSTER>(grad_range(src_s, src_t, 0, hs, lo, sh, rk, gg), &kl_bar);
    if (sl.rank == 0 && threadIdx.x == 0)
        finish_row(streams, sl.wr, target, kl, s, sl.row, p, rows);
    leave_cluster<CLUSTER>();
}

// Packs of 8 ids per side that one thread of a split kernel has in flight at once: 64 bytes of
// loads (two 16-byte words a side in bf16/bf16, one 32-byte pack a side with f32). More does
// not fit in the 64 registers that two blocks of 512 threads per SM leave.
template <typename S, typename T>
struct InFlight {
    static constexpr int ID_BYTES = (int)(sizeof(S) + sizeof(T));  // one id, both sides
    static constexpr int PACKS = 64 / (8 * ID_BYTES) > 1 ? 64 / (8 * ID_BYTES) : 1;
};

// The `_split` kernels: CLUSTER blocks of THREADS per row, rows 16-byte aligned (the host checks).
// The packs of shared ids, whole on both sides (all of them without a vocabulary mismatch), go
// through unrolled loops that issue InFlight::PACKS loads per side before using any; the rest
// (ids past the shared range, a partial last pack, ids that only one side has, every pack of a
// row without KL in pass 2) goes through the one-pack-at-a-time code of the other kernels.
template <typename S, typename T, int CLUSTER, int THREADS, bool HINTS>
__device__ void split_body(const S* __restrict__ s, const T* __restrict__ t,
                           const float* __restrict__ w, const int* __restrict__ targets,
                           S* __restrict__ grad, float* __restrict__ rows, const Params p) {
    constexpr int U = InFlight<S, T>::PACKS;
    const Slice sl = slice_of<CLUSTER>(w, p);
    const int lo = sl.lo, hs = sl.hs, ht = sl.ht;
    const S* gs = s + (size_t)sl.row * p.vs + lo;
    const T* gt = t + (size_t)sl.row * p.vt + lo;
    S* gg = grad ? grad + (size_t)sl.row * p.vs + lo : nullptr;
    if (sl.wr == 0.f) {
        masked_slice(gg, sl, rows);
        return;
    }
    __shared__ uint64_t kl_bar;
    init_kl_barrier<CLUSTER>(&kl_bar);
    const bool do_kl = p.do_kl != 0, ce_own = ce_own_of(p);
    const int target = p.do_ce != 0 && targets ? targets[sl.row] : -1;
    const int sh = p.shared, tpow = p.tpow;
    const float c2 = p.inv_t * LOG2E;
    const int ht_used = do_kl ? ht : 0;
    // Packs [0, hot): whole on every side that is read, and all shared ids.
    const int hot = min((do_kl ? min(hs, ht) : hs) / 8, max(0, sh - lo) / 8);

    // Pass 1: statistics, asking L2 to keep the lines for pass 2.
    const uint64_t keep = HINTS ? l2_keep() : 0;
    Stream st[NSTREAMS] = {empty_stream(), empty_stream(), empty_stream(), empty_stream()};
    for (int k0 = threadIdx.x; k0 < hot; k0 += U * THREADS) {
        Raw<S> rs[U];
        Raw<T> rt[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int k = min(k0 + u * THREADS, hot - 1);  // a repeated pack is read, not used
            rs[u] = fetch<HINTS>(gs + 8 * k, keep);
            if (do_kl) rt[u] = fetch<HINTS>(gt + 8 * k, keep);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (k0 + u * THREADS < hot) {
                float v[8];
                unpack(rs[u], v);
                push(st[0], v, c2, tpow, ce_own);
                if (do_kl) {
                    unpack(rt[u], v);
                    push(st[2], v, c2, tpow, false);
                }
            }
        }
    }
    stats_range(gs, gt, 8 * hot, max(hs, ht_used), hs, ht_used, lo, sh, st, c2, tpow, ce_own);
    const Stream* streams = reduce_streams<CLUSTER>(st, c2, tpow);
    const RowK rk = row_consts(st, p, sl.wr, target);

    // Pass 2: the same packs again (from L2 when it kept them), letting L2 drop them.
    const uint64_t drop = HINTS ? l2_drop() : 0;
    const int hot2 = do_kl ? hot : 0;
    float kl = 0.f;
    for (int k0 = threadIdx.x; k0 < hot2; k0 += U * THREADS) {
        Raw<S> rs[U];
        Raw<T> rt[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int k = min(k0 + u * THREADS, hot2 - 1);
            rs[u] = fetch<HINTS>(gs + 8 * k, drop);
            rt[u] = fetch<HINTS>(gt + 8 * k, drop);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int k = k0 + u * THREADS;
            if (k < hot2) {
                float x[8], y[8];
                unpack(rs[u], x);
                unpack(rt[u], y);
                grad8_shared(rk, x, y, kl);
                grad8_target(rk, x, lo + 8 * k);
                if (gg) emit<HINTS>(gg + 8 * k, pack<S>(x));
            }
        }
    }
    kl += grad_range(gs, gt, hot2, hs, lo, sh, rk, gg);
    kl = reduce_sum<CLUSTER>(kl, &kl_bar);
    if (sl.rank == 0 && threadIdx.x == 0)
        finish_row(streams, sl.wr, target, kl, s, sl.row, p, rows);
    leave_cluster<CLUSTER>();
}

// Sums the rows' (kl, ce) in a fixed order: loss = kl + ce, parts = (kl, ce). One block of 1024.
extern "C" __global__ void __launch_bounds__(1024)
    xkd_distill_sum(const float* __restrict__ rows, int n, float* __restrict__ loss,
                    float* __restrict__ parts) {
    __shared__ double scratch[2][1024];
    double kl = 0.0, ce = 0.0;
    for (int r = threadIdx.x; r < n; r += blockDim.x) {
        kl += rows[2 * r];
        ce += rows[2 * r + 1];
    }
    scratch[0][threadIdx.x] = kl;
    scratch[1][threadIdx.x] = ce;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) {
            scratch[0][threadIdx.x] += scratch[0][threadIdx.x + o];
            scratch[1][threadIdx.x] += scratch[1][threadIdx.x + o];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        loss[0] = (float)(scratch[0][0] + scratch[1][0]);
        parts[0] = (float)scratch[0][0];
        parts[1] = (float)scratch[1][0];
    }
}

constexpr int CLUSTER = 8;

#define XKD_ARGS(S, T) \
    const S *s, const T *t, const float *w, const int *tg, S *grad, float *rows, const Params p

// One split kernel: NAME its symbol's middle, ATTRS its launch attributes; C and TH must match
// the cluster dims and block size there, and the entry of `SPLITS` in kernels/src/cuda.rs.
#define XKD_SPLIT(NAME, ATTRS, C, TH, HINTS, SN, S, TN, T)                              \
    extern "C" __global__ void ATTRS xkd_distill_##NAME##_##SN##_##TN(XKD_ARGS(S, T)) { \
        split_body<S, T, C, TH, HINTS>(s, t, w, tg, grad, rows, p);                     \
    }

// Every kernel of one dtype pair. The split list is the one `SPLITS` in cuda.rs names.
#define XKD_DISTILL(SN, S, TN, T)                                                              \
    extern "C" __global__ void __launch_bounds__(1024)                                        \
        xkd_distill_row_##SN##_##TN(XKD_ARGS(S, T)) {                                          \
        distill_body<S, T, 1>(s, t, w, tg, grad, rows, p);                                     \
    }                                                                                          \
    extern "C" __global__ void __cluster_dims__(CLUSTER, 1, 1) __launch_bounds__(512, 2)      \
        xkd_distill_cluster_##SN##_##TN(XKD_ARGS(S, T)) {                                      \
        distill_body<S, T, CLUSTER>(s, t, w, tg, grad, rows, p);                               \
    }                                                                                          \
    XKD_SPLIT(split_c1_t512_nohint, __launch_bounds__(512, 2), 1, 512, false, SN, S, TN, T)    \
    XKD_SPLIT(split_c4_t512, __cluster_dims__(4, 1, 1) __launch_bounds__(512, 2), 4, 512,      \
              true, SN, S, TN, T)                                                              \
    XKD_SPLIT(split_c8_t512, __cluster_dims__(8, 1, 1) __launch_bounds__(512, 2), 8, 512,      \
              true, SN, S, TN, T)                                                              \
    XKD_SPLIT(split_c8_t512_nohint, __cluster_dims__(8, 1, 1) __launch_bounds__(512, 2), 8,    \
              512, false, SN, S, TN, T)                                                        \
    XKD_SPLIT(split_c8_t1024, __cluster_dims__(8, 1, 1) __launch_bounds__(1024, 1), 8, 1024,   \
              true, SN, S, TN, T)

XKD_DISTILL(f32, float, f32, float)
XKD_DISTILL(f32, float, bf16, __nv_bfloat16)
XKD_DISTILL(bf16, __nv_bfloat16, f32, float)
XKD_DISTILL(bf16, __nv_bfloat16, bf16, __nv_bfloat16)
