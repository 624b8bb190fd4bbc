// One row of x times a Q4_K or Q6_K matrix (decode), compiled at run time by NVRTC
// (kernels/nvrtc.py, kernels/cuda_gemv.py).
//
// x comes rounded as kernels/rounding.py lays it out: int8 quants, an f32 scale per 32 elements
// (dx) and an f32 sum of each 16 quants (xs). Per sub-block of a super-block (256 weights) the
// weights are w = a*q - b with q unsigned, so
//
//     sum_l w_l * dx*xq_l = dx * (a * sum_l q_l*xq_l - b * sum_l xq_l):
//
// the quants stay integers and dp4a multiplies four of them by four x quants at a time.
//
// Four lanes share a super-block, each a quarter of its weights (64) and x's quants for them
// (four 16-byte loads); a warp covers eight consecutive super-blocks of a row, a block's WARPS
// warps split K between them (no second launch to add split sums) and its ROWS rows of W share
// every x load. The weights of a lane's first turn are loaded before the wait on the previous
// kernel (programmatic dependent launch): weights never change, so their memory latency
// overlaps that kernel's tail; x and the output wait. Weights bypass L1, which keeps x.
//
// Each format is a struct: `row` (where a row's blocks start), `load` (a lane's weights of a
// super-block), `load_x` (its x), `dot` (the arithmetic). All compile as plain C++ too:
// tests/kernels/test_cuda_gemv.py builds them with the host compiler and checks every lane's
// share against a float64 reference, as the Triton kernels' interpreter does for them.

#ifdef __CUDACC__
#define METALLIC_HD __device__ __forceinline__
#else
#define METALLIC_HD inline
struct uint4 { unsigned int x, y, z, w; };
struct int4 { int x, y, z, w; };
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
#endif

#ifndef ROWS
#define ROWS 2  // rows of W a block
#endif
#ifndef WARPS
#define WARPS 2  // warps a block, splitting K (eight super-blocks a warp and turn, turns in turn)
#endif
#ifndef OUT_KIND
#define OUT_KIND 0  // 0: bf16, 1: f16, 2: f32
#endif

// c + the dot product of a's four unsigned bytes and b's four signed bytes.
METALLIC_HD int dot4_us(unsigned int a, int b, int c) {
#ifdef __CUDACC__
    int d;
    asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
#else
    for (int k = 0; k < 4; ++k) {
        c += int((a >> (8 * k)) & 0xFF) * int(static_cast<signed char>((b >> (8 * k)) & 0xFF));
    }
    return c;
#endif
}

// The dot products of four words of quants with four of x, added to c.
METALLIC_HD int dot16(uint4 q, int4 x, int c) {
    c = dot4_us(q.x, x.x, c);
    c = dot4_us(q.y, x.y, c);
    c = dot4_us(q.z, x.z, c);
    return dot4_us(q.w, x.w, c);
}

METALLIC_HD uint4 mask(uint4 v, unsigned int m) { return {v.x & m, v.y & m, v.z & m, v.w & m}; }

METALLIC_HD float half_to_float(unsigned int bits) {
#ifdef __CUDACC__
    float f;
    unsigned short h = static_cast<unsigned short>(bits);
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    // IEEE half to float for finite values and zero (the scales of a GGUF block).
    unsigned int sign = (bits >> 15) & 1, exp = (bits >> 10) & 31, man = bits & 1023;
    float v = (exp ? 1.0f : 0.0f) + static_cast<float>(man) / 1024.0f;
    int e = exp ? static_cast<int>(exp) - 15 : -14;
    for (; e > 0; --e) v *= 2.0f;
    for (; e < 0; ++e) v *= 0.5f;
    return sign ? -v : v;
#endif
}

// A 16-byte load of weights: streaming, not kept in L1, which holds x for the whole block.
METALLIC_HD uint4 load_weights(const uint4* p) {
#ifdef __CUDACC__
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
#else
    return *p;
#endif
}

// x for a lane: its 64 quants (four vectors of 16), and the dx and xs it needs.
struct XQuarter {
    int4 q[4];
    float4 dx;
    float4 xs;
};

// Q4_K (144-byte blocks, in place: words 0-3 = d|dmin and 12 scale bytes, then 32 words of
// quants). Chunk j of 64 elements is lane j's: byte l of its 32 holds element 64j + l (low
// nibble, sub-block 2j) and 64j + 32 + l (high nibble, sub-block 2j + 1). The high nibbles
// are multiplied in place (16 times their value) and the 16 leaves through the scale.
struct Q4K {
    struct Matrix {
        const uint4* blocks;
    };
    struct Weights {
        uint4 head, qa, qb;
    };

    // A row as a matrix of its own (the rows' planes start where row r's blocks do).
    static METALLIC_HD Matrix row(Matrix m, long r, int n_sb) { return {m.blocks + r * n_sb * 9}; }
    static METALLIC_HD Weights load(Matrix row, int sb, int j) {
        const uint4* blk = row.blocks + static_cast<long>(sb) * 9;
        return {load_weights(blk), load_weights(blk + 1 + 2 * j), load_weights(blk + 2 + 2 * j)};
    }
    // x's elements 256 sb + 64 j ..: quants, the scales of sub-blocks 2j, 2j + 1 (dx.x, dx.y)
    // and their four half sums.
    static METALLIC_HD XQuarter load_x(const int4* xq, const float* dx, const float* xs, int sb,
                                       int j) {
        const int4* q = xq + static_cast<long>(sb) * 16 + 4 * j;
        const float2 d = reinterpret_cast<const float2*>(dx)[sb * 4 + j];
        return {{q[0], q[1], q[2], q[3]}, {d.x, d.y, 0.0f, 0.0f},
                reinterpret_cast<const float4*>(xs)[sb * 4 + j]};
    }
    static METALLIC_HD float dot(const Weights& w, const XQuarter& x, int j) {
        const int dot_lo = dot16(mask(w.qb, 0x0F0F0F0Fu), x.q[1], dot16(mask(w.qa, 0x0F0F0F0Fu),
                                                                         x.q[0], 0));
        const int dot_hi = dot16(mask(w.qb, 0xF0F0F0F0u), x.q[3], dot16(mask(w.qa, 0xF0F0F0F0u),
                                                                         x.q[2], 0));
        // Scales and mins of sub-blocks 2j, 2j + 1: bytes 2j, 2j + 1 of the 12 (6 bits each)
        // for j < 2; for j >= 2 the low 4 bits from bytes 8 + 2(j-2).. and the top two from the
        // top bits of bytes 2(j-2).. (scales) and 4 + 2(j-2).. (mins).
        const unsigned int shift = 16u * (j & 1);
        const unsigned int s = w.head.y >> shift, m = w.head.z >> shift, low = w.head.w >> shift;
        unsigned int sc, mn;
        if (j < 2) {
            sc = s & 0x3F3Fu;
            mn = m & 0x3F3Fu;
        } else {
            sc = (low & 0x0F0Fu) | ((s >> 2) & 0x3030u);
            mn = ((low >> 4) & 0x0F0Fu) | ((m >> 2) & 0x3030u);
        }
        const float d = half_to_float(w.head.x & 0xFFFFu), dmin = half_to_float(w.head.x >> 16);
        const float scaled = x.dx.x * static_cast<float>(sc & 0xFF) * static_cast<float>(dot_lo) +
                             x.dx.y * static_cast<float>(sc >> 8) * 0.0625f *
                                 static_cast<float>(dot_hi);
        const float mins = x.dx.x * static_cast<float>(mn & 0xFF) * (x.xs.x + x.xs.y) +
                           x.dx.y * static_cast<float>(mn >> 8) * (x.xs.z + x.xs.w);
        return d * scaled - dmin * mins;
    }
};

// Q6_K (kernels/packing.py's planes: ql 128 bytes a block, qh 64, 16 int8 scales, f16 d).
// Element 128h + 32g + l (half h, group g, l < 32) is the nibble g / 2 of ql byte
// 64h + 32(g % 2) + l with bits 2g, 2g + 1 of qh byte 32h + l on top; w = d*sc*(q - 32), the
// scale sc of its 16 elements being byte 8h + l / 16 + 2g. Lane j takes h = j / 2 and the l of
// one 16 (j % 2): 64 elements in four 16-element runs (g = 0..3), each under one scale.
struct Q6K {
    struct Matrix {
        const uint4* ql;
        const uint4* qh;
        const uint4* scales;
        const unsigned short* d;
    };
    struct Weights {
        uint4 a, b, h, scales;
        unsigned int d;
    };

    static METALLIC_HD Matrix row(Matrix m, long r, int n_sb) {
        return {m.ql + r * n_sb * 8, m.qh + r * n_sb * 4, m.scales + r * n_sb, m.d + r * n_sb};
    }
    static METALLIC_HD Weights load(Matrix row, int sb, int j) {
        const long at = static_cast<long>(sb);
        const int h = j >> 1, part = j & 1;
        return {load_weights(row.ql + at * 8 + 4 * h + part),
                load_weights(row.ql + at * 8 + 4 * h + 2 + part),
                load_weights(row.qh + at * 4 + 2 * h + part), load_weights(row.scales + at),
                row.d[at]};
    }
    // x's elements 256 sb + 128 h + 32 g + 16 (j % 2) .. + 15 for g = 0..3, the scales of
    // their 32-blocks and their sums.
    static METALLIC_HD XQuarter load_x(const int4* xq, const float* dx, const float* xs, int sb,
                                       int j) {
        const int h = j >> 1, part = j & 1;
        const int4* q = xq + static_cast<long>(sb) * 16 + 8 * h + part;
        const float* s = xs + static_cast<long>(sb) * 16 + 8 * h + part;
        return {{q[0], q[2], q[4], q[6]},
                reinterpret_cast<const float4*>(dx)[sb * 2 + h],
                {s[0], s[2], s[4], s[6]}};
    }
    static METALLIC_HD float dot(const Weights& w, const XQuarter& x, int j) {
        const unsigned int lo = 0x0F0F0F0Fu, top = 0x30303030u;
        const uint4 a = w.a, b = w.b, h = w.h;
        const uint4 q0 = {(a.x & lo) | ((h.x << 4) & top), (a.y & lo) | ((h.y << 4) & top),
                          (a.z & lo) | ((h.z << 4) & top), (a.w & lo) | ((h.w << 4) & top)};
        const uint4 q1 = {(b.x & lo) | ((h.x << 2) & top), (b.y & lo) | ((h.y << 2) & top),
                          (b.z & lo) | ((h.z << 2) & top), (b.w & lo) | ((h.w << 2) & top)};
        const uint4 q2 = {((a.x >> 4) & lo) | (h.x & top), ((a.y >> 4) & lo) | (h.y & top),
                          ((a.z >> 4) & lo) | (h.z & top), ((a.w >> 4) & lo) | (h.w & top)};
        const uint4 q3 = {((b.x >> 4) & lo) | ((h.x >> 2) & top),
                          ((b.y >> 4) & lo) | ((h.y >> 2) & top),
                          ((b.z >> 4) & lo) | ((h.z >> 2) & top),
                          ((b.w >> 4) & lo) | ((h.w >> 2) & top)};
        // Scales 8h + (j % 2) + 2g: bytes (j % 2), +2, +4, +6 of the plane's word pair 2h, 2h+1.
        const unsigned int first = (j >> 1) ? w.scales.z : w.scales.x;
        const unsigned int second = (j >> 1) ? w.scales.w : w.scales.y;
        const unsigned int at = 8u * (j & 1);
        const float s0 = static_cast<float>(static_cast<signed char>((first >> at) & 0xFF));
        const float s1 = static_cast<float>(static_cast<signed char>((first >> (at + 16)) & 0xFF));
        const float s2 = static_cast<float>(static_cast<signed char>((second >> at) & 0xFF));
        const float s3 = static_cast<float>(static_cast<signed char>((second >> (at + 16)) & 0xFF));
        const float sum = s0 * x.dx.x * static_cast<float>(dot16(q0, x.q[0], 0)) +
                          s1 * x.dx.y * static_cast<float>(dot16(q1, x.q[1], 0)) +
                          s2 * x.dx.z * static_cast<float>(dot16(q2, x.q[2], 0)) +
                          s3 * x.dx.w * static_cast<float>(dot16(q3, x.q[3], 0));
        const float offsets = s0 * x.dx.x * x.xs.x + s1 * x.dx.y * x.xs.y +
                              s2 * x.dx.z * x.xs.z + s3 * x.dx.w * x.xs.w;
        return half_to_float(w.d) * (sum - 32.0f * offsets);
    }
};

#ifdef __CUDACC__
__device__ __forceinline__ void store_out(void* out, long i, float v) {
#if OUT_KIND == 2
    static_cast<float*>(out)[i] = v;
#else
    unsigned short bits;
#if OUT_KIND == 0
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(bits) : "f"(v));
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(bits) : "f"(v));
#endif
    static_cast<unsigned short*>(out)[i] = bits;
#endif
}

// out[r] for this block's ROWS rows r; rows from n_first on are rows of `second`.
template <class F>
__device__ __forceinline__ void product(typename F::Matrix first, typename F::Matrix second,
                                        const int4* xq, const float* dx, const float* xs,
                                        void* out, int n, int n_first, int n_sb, int pdl) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int j = lane & 3;  // the lane's quarter of a super-block
    int row0 = blockIdx.x * ROWS;
    typename F::Matrix m = first;
    if (row0 >= n_first) {  // n_first is a multiple of ROWS (the launcher's check)
        m = second;
        row0 -= n_first;
    }
    const int rows_here = min(ROWS, n - static_cast<int>(blockIdx.x) * ROWS);
    typename F::Matrix rows[ROWS];
    float acc[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        rows[r] = F::row(m, row0 + min(r, rows_here - 1), n_sb);  // rows past N read the last
        acc[r] = 0.0f;
    }
    int sb = warp * 8 + (lane >> 2);
    const bool any = sb < n_sb;
    typename F::Weights w[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) w[r] = F::load(rows[r], min(sb, n_sb - 1), j);
#if __CUDA_ARCH__ >= 900
    // Under a branch on an argument: unconditional, ptxas hoists the wait above the loads.
    if (pdl) {
        asm volatile("griddepcontrol.wait;" ::: "memory");
        asm volatile("griddepcontrol.launch_dependents;" :::);
    }
#endif
    // Each turn loads the next turn's weights before its own arithmetic: two turns in flight.
    for (bool ok = any; ok;) {
        const int next = sb + WARPS * 8;
        const bool more = next < n_sb;
        typename F::Weights ahead[ROWS];
        if (more) {
#pragma unroll
            for (int r = 0; r < ROWS; ++r) ahead[r] = F::load(rows[r], next, j);
        }
        const XQuarter x = F::load_x(xq, dx, xs, sb, j);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            acc[r] += F::dot(w[r], x, j);
            // Unconditional (on the last turn `ahead` is never read again): under `if (more)`
            // nvcc copies registers instead of renaming them, 1.46 -> 1.79 instructions a
            // weight for Q4_K at two rows (sass.py --cuda).
            w[r] = ahead[r];
        }
        sb = next;
        ok = more;
    }
    __shared__ float partial[WARPS][ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        float v = acc[r];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
        if (lane == 0) partial[warp][r] = v;
    }
    __syncthreads();
    if (threadIdx.x < rows_here) {
        float v = 0.0f;
#pragma unroll
        for (int k = 0; k < WARPS; ++k) v += partial[k][threadIdx.x];
        store_out(out, static_cast<long>(blockIdx.x) * ROWS + threadIdx.x, v);
    }
}

// Arguments of both: the matrix (a second Q4_K one from row n_first on: gate and up in one
// launch), x rounded (rounding.py), the output (N values), N, n_first, super-blocks a row, and
// whether the launch is programmatic (nvrtc.py appends it).
extern "C" __global__ void __launch_bounds__(32 * WARPS)
gemv_q4_k(const uint4* w, const uint4* w2, const int4* __restrict__ xq,
          const float* __restrict__ dx, const float* __restrict__ xs, void* __restrict__ out,
          int n, int n_first, int n_sb, int pdl) {
    product<Q4K>({w}, {w2}, xq, dx, xs, out, n, n_first, n_sb, pdl);
}

extern "C" __global__ void __launch_bounds__(32 * WARPS)
gemv_q6_k(const uint4* ql, const uint4* qh, const uint4* scales, const unsigned short* d,
          const int4* __restrict__ xq, const float* __restrict__ dx, const float* __restrict__ xs,
          void* __restrict__ out, int n, int n_sb, int pdl) {
    const Q6K::Matrix m = {ql, qh, scales, d};
    product<Q6K>(m, m, xq, dx, xs, out, n, n, n_sb, pdl);
}
#endif
