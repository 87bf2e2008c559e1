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
// the shared ids and the rest), and in the cluster kernels also parks the logits in shared
// memory. Block and cluster reductions (the latter through distributed shared memory) give every
// block the row's normalisers. (2) Gradient: each thread reads its packs again (from shared
// memory in the cluster kernels, so global memory is read once; from global memory in the `_row`
// kernels), writes the gradient of the student logits and accumulates the shared-range KL, which
// is reduced the same way; block 0 writes the row's (kl, ce) contributions. A second kernel sums
// the rows in a fixed order, so the loss is deterministic.
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

// Eight consecutive logits from p, of which `valid` exist; the others read as -inf.
template <typename E>
__device__ __forceinline__ void load8(const E* p, int valid, float v[8]) {
    if (valid == 8 && (reinterpret_cast<uintptr_t>(p) & 15) == 0) {
        if constexpr (sizeof(E) == 2) {
            uint4 raw = *reinterpret_cast<const uint4*>(p);
            const __nv_bfloat16* b = reinterpret_cast<const __nv_bfloat16*>(&raw);
#pragma unroll
            for (int k = 0; k < 8; ++k) v[k] = to_f(b[k]);
        } else {
            float4 a = reinterpret_cast<const float4*>(p)[0];
            float4 b = reinterpret_cast<const float4*>(p)[1];
            v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
            v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
        }
    } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] = k < valid ? to_f(p[k]) : -INFINITY;
    }
}

// Stores the first `valid` of eight values to p (16-byte stores where aligned).
template <typename E>
__device__ __forceinline__ void store8(E* p, int valid, const float v[8]) {
    if (valid == 8 && (reinterpret_cast<uintptr_t>(p) & 15) == 0) {
        if constexpr (sizeof(E) == 2) {
            uint4 raw;
            __nv_bfloat16* b = reinterpret_cast<__nv_bfloat16*>(&raw);
#pragma unroll
            for (int k = 0; k < 8; ++k) b[k] = __float2bfloat16_rn(v[k]);
            *reinterpret_cast<uint4*>(p) = raw;
        } else {
            reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
            reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
        }
    } else {
        for (int k = 0; k < valid; ++k) put(p + k, v[k]);
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

__device__ __forceinline__ void mbar_wait(uint64_t* bar) {
    uint32_t done = 0;
    while (!done) {
        asm volatile(
            "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], 0;\n"
            " selp.u32 %0, 1, 0, p;\n}"
            : "=r"(done)
            : "r"(smem_addr(bar))
            : "memory");
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

// Reduces each thread's streams over the block and then over the cluster (CLUSTER > 1), in a
// fixed order, leaving the row's streams in every thread's `st`.
template <int CLUSTER>
__device__ void reduce_streams(Stream (&st)[NSTREAMS], float c2, int tpow) {
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
        cluster.sync();
        if (threadIdx.x < NSTREAMS) {
            const int i = threadIdx.x;
            Stream acc = cluster.map_shared_rank(part, 0)[i];
            for (int r = 1; r < CLUSTER; ++r)
                acc = merge(acc, cluster.map_shared_rank(part, r)[i], c2, tpow);
            scratch[0][i] = acc;
        }
        // No block may overwrite `part` (or leave) while another still reads it.
        cluster.sync();
    } else {
        __syncthreads();
        if (threadIdx.x < NSTREAMS) scratch[0][threadIdx.x] = part[threadIdx.x];
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < NSTREAMS; ++i) st[i] = scratch[0][i];
    __syncthreads();
}

// Sum of one float over the block and the cluster, fixed order; the result in every thread.
template <int CLUSTER>
__device__ float reduce_sum(float x) {
    __shared__ float scratch[MAX_WARPS];
    __shared__ float part;
    __shared__ float result;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    if (threadIdx.x == 0) {
        float acc = 0.f;
        for (int w = 0; w < nwarps; ++w) acc += scratch[w];
        part = acc;
    }
    if constexpr (CLUSTER > 1) {
        cg::cluster_group cluster = cg::this_cluster();
        cluster.sync();
        if (threadIdx.x == 0) {
            float acc = 0.f;
            for (int r = 0; r < CLUSTER; ++r) acc += *cluster.map_shared_rank(&part, r);
            result = acc;
        }
        cluster.sync();
    } else {
        __syncthreads();
        if (threadIdx.x == 0) result = part;
        __syncthreads();
    }
    return result;
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

template <typename S, typename T, int CLUSTER>
__device__ void distill_body(const S* __restrict__ s, const T* __restrict__ t,
                             const float* __restrict__ w, const int* __restrict__ targets,
                             S* __restrict__ grad, float* __restrict__ rows, const Params p) {
    extern __shared__ __align__(16) unsigned char cache[];
    int rank = 0;
    if constexpr (CLUSTER > 1) rank = (int)cg::this_cluster().block_rank();
    const int row = blockIdx.x / CLUSTER;
    const float wr = w ? w[row] : 1.f;
    const int lo = rank * p.cs;
    const int hs = max(0, min(lo + p.cs, p.vs) - lo);  // student ids of this block
    const int ht = max(0, min(lo + p.cs, p.vt) - lo);  // teacher ids of this block
    const S* gs = s + (size_t)row * p.vs + lo;
    const T* gt = t + (size_t)row * p.vt + lo;
    S* gg = grad ? grad + (size_t)row * p.vs + lo : nullptr;
    const float zero8[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};

    if (wr == 0.f) {  // masked: never read, gradient exactly 0 (the whole cluster takes this path)
        if (gg)
            for (int k = threadIdx.x; k * 8 < hs; k += blockDim.x)
                store8(gg + k * 8, min(8, hs - k * 8), zero8);
        if (rank == 0 && threadIdx.x == 0) rows[2 * row] = rows[2 * row + 1] = 0.f;
        return;
    }
    const bool do_kl = p.do_kl != 0, do_ce = p.do_ce != 0;
    const bool ce_own = do_ce && !(do_kl && p.tpow == 1);
    const int target = do_ce && targets ? targets[row] : -1;
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
    reduce_streams<CLUSTER>(st, c2, p.tpow);

    // Row constants. Student: ss (shared), sr (rest); s = ss + sr; teacher likewise.
    const Stream ss = st[0], sr = st[1], ts = st[2], tr = st[3];
    const Stream s_all = merge(ss, sr, c2, p.tpow);
    const Stream t_all = merge(ts, tr, c2, p.tpow);
    const Norm n_s = norm_of(s_all.m * p.inv_t, s_all.z);
    const Norm n_t = norm_of(t_all.m * p.inv_t, t_all.z);
    const Norm n_sr = norm_of(sr.m * p.inv_t, sr.z);
    const Norm n_tr = norm_of(tr.m * p.inv_t, tr.z);
    // log of the temperature-1 normaliser (relative to the student's max).
    const float lz1 = ce_own ? logf(s_all.z1) : 0.f;
    const float ck = do_kl ? p.alpha * p.temperature * wr * p.inv_n : 0.f;
    const float cc = do_ce ? (1.f - p.alpha) * wr * p.inv_n : 0.f;
    // Per-id factors, each id's exponential taken against its own stream's maximum:
    // q = e * aq (student softmax at T), p1 = e^T * a1 (at temperature 1), pt = f * at.
    // (Differences of maxima first: exact, so logits of size 1e4 keep their precision.)
    const float lq_ss = (ss.m - s_all.m) * p.inv_t - n_s.lz;  // log aq for shared ids
    const float lq_sr = (sr.m - s_all.m) * p.inv_t - n_s.lz;  // log aq for rest ids
    const float lt_ts = (ts.m - t_all.m) * p.inv_t - n_t.lz;  // log at
    const float aq_ss = expf(lq_ss), aq_sr = expf(lq_sr), at_ts = expf(lt_ts);
    const float a1_ss = ce_own ? expf((ss.m - s_all.m) - lz1) : 0.f;
    const float a1_sr = ce_own ? expf((sr.m - s_all.m) - lz1) : 0.f;
    const float ar_sr = sr.z > 0.f ? 1.f / sr.z : 0.f;  // student softmax within the rest bucket
    const float pt_rest = n_tr.lz == -INFINITY ? 0.f : (float)exp(minus(n_tr, n_t));

    // Pass 2: gradient over the student ids, KL over the shared ids.
    const S* src_s = gs;
    const T* src_t = gt;
    if constexpr (CLUSTER > 1) {
        src_s = cs_s;
        src_t = cs_t;
    }
    float kl = 0.f;
    const float klc = lt_ts - lq_ss;  // log pt - log q = (dt - d) / T + klc for shared ids
    const int tpow = p.tpow;
    for (int k = threadIdx.x; k * 8 < hs; k += blockDim.x) {
        const int n = min(8, hs - k * 8);
        const int base = lo + k * 8;
        float x[8], y[8];  // x is overwritten by the gradient, id by id
        load8(src_s + k * 8, n, x);
        const int cut = min(n, max(0, sh - base));
        if (do_kl && cut == 8) {
            // The hot path: a whole pack of shared ids, two exponentials per id.
            load8(src_t + k * 8, 8, y);
            float kj[8];
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const float d = x[j] - ss.m, dt = y[j] - ts.m;
                const float e = ex2(d * c2), f = ex2(dt * c2);
                const float q = e * aq_ss, pt = f * at_ts;
                kj[j] = pt * fmaf(dt - d, p.inv_t, klc);
                const float p1 = ce_own ? pow_t(e, d, tpow) * a1_ss : q;
                x[j] = fmaf(ck, q - pt, cc * p1);
            }
            kl += ((kj[0] + kj[1]) + (kj[2] + kj[3])) + ((kj[4] + kj[5]) + (kj[6] + kj[7]));
        } else {
            if (do_kl && cut > 0) load8(src_t + k * 8, cut, y);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                if (j >= n) {
                    x[j] = 0.f;
                    continue;
                }
                const bool in_shared = j < cut;
                const float d = x[j] - (in_shared ? ss.m : sr.m);
                const float e = ex2(d * c2);
                float gj = 0.f, q = 0.f;
                if (do_kl) {
                    q = e * (in_shared ? aq_ss : aq_sr);
                    if (in_shared) {
                        const float dt = y[j] - ts.m;
                        const float pt = ex2(dt * c2) * at_ts;
                        kl = fmaf(pt, fmaf(dt - d, p.inv_t, klc), kl);
                        gj = ck * (q - pt);
                    } else {
                        gj = ck * (q - pt_rest * e * ar_sr);
                    }
                }
                if (do_ce) gj += cc * (ce_own ? pow_t(e, d, tpow) * (in_shared ? a1_ss : a1_sr) : q);
                x[j] = gj;
            }
        }
        if ((unsigned)(target - base) < 8u) {  // the cross-entropy target is in this pack
#pragma unroll
            for (int j = 0; j < 8; ++j)
                if (base + j == target) x[j] -= cc;
        }
        if (gg) store8(gg + k * 8, n, x);
    }
    kl = reduce_sum<CLUSTER>(kl);

    if (rank == 0 && threadIdx.x == 0) {
        double kl_row = kl;
        if (do_kl && n_tr.lz != -INFINITY) {  // the rest buckets
            const double lpt = minus(n_tr, n_t), lps = minus(n_sr, n_s);
            kl_row += exp(lpt) * (lpt - lps);
        }
        double ce = 0.0;
        if (target >= 0) {
            const double x = to_f(s[(size_t)row * p.vs + target]);
            ce = ((double)s_all.m - x) + (double)lz1;
            if (!ce_own) ce = ((double)n_s.m - x) + (double)n_s.lz;
        }
        const double t2 = (double)p.temperature * p.temperature;
        rows[2 * row] = do_kl ? (float)(p.alpha * t2 * wr * kl_row * p.inv_n) : 0.f;
        rows[2 * row + 1] = (float)((1.0 - p.alpha) * wr * ce * p.inv_n);
    }
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

#define XKD_DISTILL(SN, S, TN, T)                                                              \
    extern "C" __global__ void __launch_bounds__(1024)                                        \
        xkd_distill_row_##SN##_##TN(const S* s, const T* t, const float* w, const int* tg,     \
                                    S* grad, float* rows, const Params p) {                    \
        distill_body<S, T, 1>(s, t, w, tg, grad, rows, p);                                     \
    }                                                                                          \
    extern "C" __global__ void __cluster_dims__(CLUSTER, 1, 1) __launch_bounds__(512, 2)      \
        xkd_distill_cluster_##SN##_##TN(const S* s, const T* t, const float* w, const int* tg, \
                                        S* grad, float* rows, const Params p) {                \
        distill_body<S, T, CLUSTER>(s, t, w, tg, grad, rows, p);                               \
    }

XKD_DISTILL(f32, float, f32, float)
XKD_DISTILL(f32, float, bf16, __nv_bfloat16)
XKD_DISTILL(bf16, __nv_bfloat16, f32, float)
XKD_DISTILL(bf16, __nv_bfloat16, bf16, __nv_bfloat16)
