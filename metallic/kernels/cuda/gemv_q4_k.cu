// One row of x times a Q4_K matrix (decode), compiled at run time by NVRTC (kernels/nvrtc.py).
//
// x comes rounded as kernels/rounding.py lays it out: int8 quants, an f32 scale per 32 elements
// (dx) and an f32 sum of each 16 quants (xs). A Q4_K super-block (144 bytes, in place: header
// words 0-3 = d|dmin, 12 scale bytes; quant words 4-35) holds 256 weights in four 64-element
// chunks: byte l of chunk j's 32 bytes is element 64j + l (low nibble, sub-block 2j) and
// 64j + 32 + l (high nibble, sub-block 2j + 1). With w = d*sc*q - dmin*m per sub-block,
//
//     sum_l w_l * dx*xq_l = dx * (d*sc * sum_l q_l*xq_l - dmin*m * sum_l xq_l).
//
// Four lanes share a super-block, a lane per chunk: its 32 quant bytes arrive in two 16-byte
// loads and its 64 x quants in four; the high nibbles are multiplied in place (dp4a of the
// masked word, 16 times their value) and the 16 leaves through the sub-block's scale. A warp
// covers eight consecutive super-blocks of a row (1,152 contiguous bytes); a block's WARPS warps
// split K between them and ROWS rows share every x load. The weights of a lane's first turn are
// loaded before the wait for the previous kernel (programmatic dependent launch): weights never
// change, so their memory latency overlaps that kernel's tail; x and the output wait.
//
// `chunk_dot` is the arithmetic of one lane and chunk. It compiles as plain C++ too
// (tests/kernels/test_cuda_gemv.py builds it with the host compiler and checks it against a
// float64 reference), so CI checks what the GPU runs, as the Triton kernels' interpreter does.

#ifdef __CUDACC__
#define METALLIC_HD __device__ __forceinline__
#else
#include <cstdint>
#define METALLIC_HD inline
struct uint4 { unsigned int x, y, z, w; };
struct int4 { int x, y, z, w; };
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
#endif

#ifndef ROWS
#define ROWS 2  // rows of W per block
#endif
#ifndef WARPS
#define WARPS 2  // warps per block, splitting K (eight super-blocks per warp and turn)
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

METALLIC_HD float half_to_float(unsigned int bits) {
#ifdef __CUDACC__
    float f;
    unsigned short h = static_cast<unsigned short>(bits);
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    // IEEE half to float for finite values and zero (the scales of a GGUF block).
    unsigned int sign = (bits >> 15) & 1, exp = (bits >> 10) & 31, man = bits & 1023;
    float v;
    if (exp == 0) {
        v = static_cast<float>(man) / 16777216.0f;  // man * 2^-24
    } else {
        v = (1.0f + static_cast<float>(man) / 1024.0f);
        int e = static_cast<int>(exp) - 15;
        for (; e > 0; --e) v *= 2.0f;
        for (; e < 0; ++e) v *= 0.5f;
    }
    return sign ? -v : v;
#endif
}

// One lane's share of a super-block: chunk j (0..3) of its 256 weights against x.
//   head: the block's words 0-3 (d|dmin, scale bytes 0-3, 4-7, 8-11)
//   qa, qb: quant words 4 + 8j .. 11 + 8j (bytes 0-15 and 16-31 of the chunk)
//   xl0, xl1: x quants of elements 64j + 0..31 (the low nibbles'), xh0, xh1: 64j + 32..63
//   dx: x's scales of sub-blocks 2j and 2j + 1; xs: the sums of their four 16-quant halves
METALLIC_HD float chunk_dot(uint4 head, uint4 qa, uint4 qb, int4 xl0, int4 xl1, int4 xh0,
                            int4 xh1, float2 dx, float4 xs, int j) {
    const unsigned int lo = 0x0F0F0F0Fu, hi = 0xF0F0F0F0u;
    int dot_lo = 0, dot_hi = 0;
    dot_lo = dot4_us(qa.x & lo, xl0.x, dot_lo);
    dot_lo = dot4_us(qa.y & lo, xl0.y, dot_lo);
    dot_lo = dot4_us(qa.z & lo, xl0.z, dot_lo);
    dot_lo = dot4_us(qa.w & lo, xl0.w, dot_lo);
    dot_lo = dot4_us(qb.x & lo, xl1.x, dot_lo);
    dot_lo = dot4_us(qb.y & lo, xl1.y, dot_lo);
    dot_lo = dot4_us(qb.z & lo, xl1.z, dot_lo);
    dot_lo = dot4_us(qb.w & lo, xl1.w, dot_lo);
    dot_hi = dot4_us(qa.x & hi, xh0.x, dot_hi);
    dot_hi = dot4_us(qa.y & hi, xh0.y, dot_hi);
    dot_hi = dot4_us(qa.z & hi, xh0.z, dot_hi);
    dot_hi = dot4_us(qa.w & hi, xh0.w, dot_hi);
    dot_hi = dot4_us(qb.x & hi, xh1.x, dot_hi);
    dot_hi = dot4_us(qb.y & hi, xh1.y, dot_hi);
    dot_hi = dot4_us(qb.z & hi, xh1.z, dot_hi);
    dot_hi = dot4_us(qb.w & hi, xh1.w, dot_hi);
    // Scales and mins of sub-blocks 2j, 2j + 1: bytes 2j, 2j + 1 of the 12 (6 bits each) for
    // j < 2; for j >= 2 the low 4 bits from bytes 8 + 2(j-2).. and the top two from the top
    // bits of bytes 2(j-2).. (scales) and 4 + 2(j-2).. (mins).
    const unsigned int shift = 16u * (j & 1);
    const unsigned int s_lo = head.y >> shift, m_lo = head.z >> shift, packed = head.w >> shift;
    unsigned int sc, mn;
    if (j < 2) {
        sc = s_lo & 0x3F3Fu;
        mn = m_lo & 0x3F3Fu;
    } else {
        sc = (packed & 0x0F0Fu) | ((s_lo >> 2) & 0x3030u);
        mn = ((packed >> 4) & 0x0F0Fu) | ((m_lo >> 2) & 0x3030u);
    }
    const float d = half_to_float(head.x & 0xFFFFu), dmin = half_to_float(head.x >> 16);
    const float scaled = dx.x * static_cast<float>(sc & 0xFF) * static_cast<float>(dot_lo) +
                         dx.y * static_cast<float>(sc >> 8) * 0.0625f * static_cast<float>(dot_hi);
    const float mins = dx.x * static_cast<float>(mn & 0xFF) * (xs.x + xs.y) +
                       dx.y * static_cast<float>(mn >> 8) * (xs.z + xs.w);
    return d * scaled - dmin * mins;
}

#ifdef __CUDACC__
// A streaming 16-byte load of weights: not kept in L1, which holds x for the whole block.
__device__ __forceinline__ uint4 load_weights(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

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

// out[n_first.. rows of the second matrix | rows before: the first] for one row of x.
//   w, w2: Q4_K matrices (rows of n_sb super-blocks); rows from n_first on read w2
//   xq, dx, xs: x rounded (rounding.py); out: N values; pdl: launched with PDL (nvrtc.py)
extern "C" __global__ void __launch_bounds__(32 * WARPS)
gemv_q4_k(const uint4* __restrict__ w, const uint4* __restrict__ w2, const int4* __restrict__ xq,
          const float2* __restrict__ dx, const float4* __restrict__ xs, void* __restrict__ out,
          int n, int n_first, int n_sb, int pdl) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int j = lane & 3;                  // chunk of the super-block
    const int sb_in_turn = lane >> 2;        // which of the warp's eight super-blocks
    int row0 = blockIdx.x * ROWS;            // n_first is a multiple of ROWS (the launcher's check)
    const uint4* base = w;
    if (row0 >= n_first) {
        base = w2;
        row0 -= n_first;
    }
    const int rows_here = min(ROWS, n - static_cast<int>(blockIdx.x) * ROWS);
    const long row_vecs = static_cast<long>(n_sb) * 9;  // 16-byte vectors a row

    float acc[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[r] = 0.0f;

    int sb = warp * 8 + sb_in_turn;
    // The first turn's weights, before waiting on the previous kernel.
    uint4 head[ROWS], qa[ROWS], qb[ROWS];
    const bool first_ok = sb < n_sb;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const uint4* blk = base + static_cast<long>(min(r, rows_here - 1) + row0) * row_vecs +
                           static_cast<long>(min(sb, n_sb - 1)) * 9;
        head[r] = load_weights(blk);
        qa[r] = load_weights(blk + 1 + 2 * j);
        qb[r] = load_weights(blk + 2 + 2 * j);
    }
#if __CUDA_ARCH__ >= 900
    // Under a branch on an argument: unconditional, ptxas hoists the wait above the loads.
    if (pdl) {
        asm volatile("griddepcontrol.wait;" ::: "memory");
        asm volatile("griddepcontrol.launch_dependents;" :::);
    }
#endif
    for (bool ok = first_ok; ok; ) {
        // x: elements 256 sb + 64 j .. + 63 as four 16-byte vectors (16 quants each)
        const int4* xv = xq + (static_cast<long>(sb) * 16 + 4 * j);
        const int4 xl0 = xv[0], xl1 = xv[1], xh0 = xv[2], xh1 = xv[3];
        const float2 dxs = dx[sb * 4 + j];
        const float4 sums = xs[sb * 4 + j];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            acc[r] += chunk_dot(head[r], qa[r], qb[r], xl0, xl1, xh0, xh1, dxs, sums, j);
        }
        sb += WARPS * 8;
        ok = sb < n_sb;
        if (ok) {
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                const uint4* blk = base + static_cast<long>(min(r, rows_here - 1) + row0) *
                                   row_vecs + static_cast<long>(sb) * 9;
                head[r] = load_weights(blk);
                qa[r] = load_weights(blk + 1 + 2 * j);
                qb[r] = load_weights(blk + 2 + 2 * j);
            }
        }
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
#endif
