// The product of packed low-bit experts with token-expert pairs, with AVX-512 VNNI (see native.py).
//
// y[s, n] = sum_k scale[e, n, g(k)] * (q[e, n, k] - zero[e, n, g(k)]) * x[s, k],  e = the pair's expert,
// with x[s] quantized per group to int8 (x ~= xs[s, g] * x8[s, k]), so that the codes (unsigned bytes
// after a shift and a mask) and x8 (signed bytes) meet in vpdpbusd: 64 products per instruction,
// summed in fours into 16 int32 lanes. Per 64-byte block of a plane the int32 lanes are scaled by their
// group's scale * 2**offset * xs (a lane's 4 bytes lie in one group) and added to 16 float lanes.
// The zero point enters once per group: - scale * zero * sum_k x8 * xs.
//
// Plane layout (packing.py): a plane of width w holds K * w / 8 bytes per row, c = 8 / w codes per byte;
// byte j holds the codes of c inputs at bits w * p; xq[s, p, j] is the int8 input that part p of byte j
// multiplies (rearranged here), so part p of a block of 64 code bytes meets 64 contiguous xq.
//
// Work: the pairs are grouped by expert; a tile is R rows of one expert times P of its pairs (R * P
// accumulators; each code byte is loaded once for the P pairs, each x byte once for the R rows). Each
// thread owns a range of rows of every expert, walked in blocks of ROW_BLOCK rows that stay in cache
// while every pair tile of the expert passes over them. Experts with dynamoq_amx_min_pairs pairs or more
// take the AMX path instead where the CPU has AMX-INT8 (prefill; see "the AMX path" below): same int32
// products per group, same float factors, so the same result up to the order of float additions.
#define _GNU_SOURCE             // syscall()
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

// Code bytes are prefetched this far ahead: with the hardware prefetcher alone one core read 5.5 GB/s from memory,
// against 14 from cache (a tile reads R rows side by side, which the hardware's stream detection does not follow).
// Into L2 (T1) rather than L1 (T0): far more lines can be in flight, and a decode of 8 experts from memory (cold
// caches) ran 1.5-1.8x faster (T0 on Zen 4: 2x slower). 8 KB ahead beat 4 and 16-64 KB by 1-4% (Zen 4: both
// projections of 8 mixed-width experts, 1 token, Qwen3 shape 0.86 -> 0.84 ms). A tile prefetches its R rows'
// bytes in address order, a few lines per step (prefetch_lines), rather than each row 8 KB ahead of itself: one
// process, cold caches, the two alternated per call, Zen 4, 1 thread, 1 token, Qwen3-shaped gate_up of 8 experts:
// mixed widths 0.450 -> 0.428 ms, 4-bit 0.584 -> 0.505, 8-bit 1.254 -> 1.127, 2-bit 0.375 -> 0.370; 4 and 16
// tokens even to 7% faster. (Prefetching each expert's first rows, or each row's scales and zero points, as well
// gained nothing measurable.)
// What bounds a 1-token call now is the vector work more than memory (Zen 4, 1 thread, 8 Qwen3-shaped 2-bit
// gate_up experts, this file driven from C: 0.35 ms with the codes in cache, 0.48 from memory). In cache, without
// the float stage per block 16% less, without taking the parts out of the bytes ~8% less (GFNI or shift and mask
// alike), with every extraction and product replaced by one plain integer op 32% less: the count of 512-bit
// instructions sets the time more than which ones they are. A packed layout whose tile rows are interleaved per
// 64-byte block, so that a tile reads memory in address order, was emulated (same loop, interleaved addresses):
// 2- and 4-bit 4-6% faster, mixed widths unchanged (0.484 against 0.484 ms); the layout stays as packing.py has it.
#define PREFETCH_BYTES 8192
#define ROW_BLOCK 32
#define MAX_P 4

typedef struct {
    int64_t S, N, K, G, gs;
    int64_t per;                    // pairs per row of x: pair s reads x row s / per (a token's k pairs share one)
    const int32_t *planes;          // [9][2][2]: for bit-width b, up to two planes (offset, width); width 0: none
    const int8_t *xq[9];            // [w] -> [X, 8 / w, K * w / 8] int8 (null where no plane has width w)
    const int32_t *lane_group[9];   // [w] -> [K * w / 32 rounded up to 16] group of each int32 lane, minus its block's first group
    const float *xs;                // [X, G + 16] (padded for whole-vector loads)
    const float *xsum;              // [X, G]
    const uint16_t *scale;          // [E, N, G] float16
    const uint8_t *zero;            // [E, N, G]
    float *y;                       // [S, N]
    // the AMX path (experts with many pairs): per plane width w, 64 bytes of the plane hold 8 / w runs of 64
    // inputs; run i is the int32 w_perm[w][i] of those bytes, shifted right by w_shift[w][i] and masked
    const int32_t *w_perm[9];       // [w] -> [8 / w][16]
    const int32_t *w_shift[9];      // [w] -> [8 / w][16]
    const int8_t *x8;               // [X, K] x in int8
    // merging a second plane into the first (second_plane; where lanes >= 4): which int32 of 32 bytes of the
    // second plane each int32 of 64 bytes of the first meets (chunk c of the first <- chunk c / 2 of the
    // second), and the lanes of odd chunks, shifted by 4 bits (the second half of the parts)
    int32_t pair_idx[16];
    __mmask32 odd;                  // the 16-bit lanes of odd chunks
    int merge;
    // the switching cache (none: cache_delta NULL): r input channels per expert whose columns are corrected by
    // cache_delta [E, N, r] (delta_type: 0 float16, 1 bfloat16, 2 float32); xg [S, rpad]: each pair's x as
    // rounded here, at its expert's cached channels (zero past r); see cache_lanes
    const void *cache_delta;
    int64_t r, rpad;
    int delta_type;
    const uint8_t *cache_on;        // [E] whether expert e's correction is not all zero (the others are skipped)
    const float *xg;
} job_t;

// The row of x (and of its int8 form, scales, sums) that pair s reads.
static inline int64_t xrow(const job_t *j, int64_t s) { return s / j->per; }

// Part q of the code bytes v of a plane of width W (the codes at bits W q .. W q + W - 1, as bytes). With GFNI
// one instruction: GF2P8AFFINEQB sets bit i of each byte to the parity of (byte 7 - i of the matrix) AND the
// byte, so a matrix whose byte 7 - i is bit W q + i copies those bits down and clears the rest.
static inline __attribute__((always_inline)) __m512i code_part(__m512i v, const int W, const int q, __m512i lo) {
    if (W == 8) return v;
    if (q == 0) return _mm512_and_si512(v, lo);
#ifdef DYNAMOQ_GFNI
    uint64_t a = 0;
    for (int i = 0; i < W; i++) a |= (uint64_t)1 << (W * q + i) << (8 * (7 - i));
    (void)lo;
    return _mm512_gf2p8affine_epi64_epi8(v, _mm512_set1_epi64((long long)a), 0);
#else
    return _mm512_and_si512(_mm512_srli_epi16(v, W * q), lo);
#endif
}

// 64 bytes at p, those outside mask m read as zero: a plain load for a whole block (masked loads, even with every
// bit set, cost more: one thread, warm caches, 2-bit rows 5% slower; a 1-token OLMoE-shaped layer 4-6%).
static inline __attribute__((always_inline)) __m512i load64(__mmask64 m, const void *p) {
    return m == ~(__mmask64)0 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(m, p);
}

// Merging a row's second plane (width W2 = W / 2, at bit W of the code, right after the first: 3 = 2 + 1,
// 6 = 4 + 2) into each part of the first before the product, so that a 3- or 6-bit code costs one vpdpbusd,
// not two: the first plane's chunk c of L bytes holds the inputs of chunk c / 2 of the second, at its parts
// p + (c odd) 8 / W. So 32 bytes of the second plane (at second + B / 2 for the first's block B), chunk-doubled
// and shifted by 4 bits in odd chunks, hold part p's high bits at bits W2 p of each byte.
static inline __attribute__((always_inline)) __m512i second_plane(const job_t *j, const uint8_t *second, int64_t B,
                                                                  int64_t nbytes) {
    const int64_t rest = (nbytes - B) / 2;
    const __m256i h = _mm256_maskz_loadu_epi8(rest >= 32 ? ~(__mmask32)0 : (((__mmask32)1 << rest) - 1), second + B / 2);
    const __m512i d = _mm512_permutexvar_epi32(_mm512_loadu_si512((const void *)j->pair_idx), _mm512_castsi256_si512(h));
    return _mm512_mask_srli_epi16(d, j->odd, d, 4);
}

// part | the high bits of part q from u (second_plane), moved to bit W (ternary logic A | (B & C) = 0xF8).
static inline __attribute__((always_inline)) __m512i with_second(__m512i part, __m512i u, const int W, const int W2,
                                                                 const int q) {
    const int net = W - W2 * q;
    const __m512i hi = net >= 0 ? _mm512_slli_epi16(u, net) : _mm512_srli_epi16(u, -net);
    return _mm512_ternarylogic_epi32(part, hi, _mm512_set1_epi8((char)(((1 << W2) - 1) << W)), 0xF8);
}

// Block B (64 bytes, mask m) of the first plane of R rows into v; with a second plane (W2 > 0), its bytes for
// that block into u (second_plane).
static inline __attribute__((always_inline)) void load_block(const job_t *j, const int W2, const int R,
                                                             const uint8_t *const *codes, int64_t B, __mmask64 m,
                                                             int64_t nbytes, __m512i *v, __m512i *u) {
    for (int r = 0; r < R; r++) {
        v[r] = load64(m, codes[r] + B);
        if (W2) u[r] = second_plane(j, codes[r] + nbytes, B, nbytes);
    }
}

// One plane of width W for a tile of R rows (code bytes at codes[r], per-group factors f[r]: scale *
// 2**offset) and P pairs (x bytes xq[p], x scales xs[p]): acc[r][p] += the plane's share (16 float lanes);
// `lines` lines prefetched at *pf per 64-byte step (prefetch_lines), *pf moved past them.
// whole: the plane's groups are whole 64-byte blocks (gs * W / 8 a multiple of 64), so the int32 lanes of a
// group meet its one factor (broadcast) once per group; else once per block, each lane its group's.
// folded (P = 1): the factors f already include the pair's x scales (one_factors); xs is not read.
static inline __attribute__((always_inline)) void tile(const job_t *j, const int W, const int W2, const int R,
                                                       const int P, const int whole, const int folded,
                                                       const uint8_t *const *codes,
                                                       const char **pf, const int lines,
                                                       const int8_t *const *xq, const float *const *xs,
                                                       const float *const *f, __m512 acc[4][MAX_P]) {
    const int64_t nbytes = j->K * W / 8, bpg = j->gs * W / 8, per = whole ? bpg / 64 : 1;
    const int c = 8 / W;
    const int32_t *lane_group = j->lane_group[W];
    const __m512i lo = _mm512_set1_epi8((char)((1 << W) - 1));
    // Local copies: the stores to acc (__m512 may alias anything) made the compiler write the accumulators
    // back and reload every pointer once per block.
    const uint8_t *cr[4];
    const float *fr_[4], *xs_[MAX_P];
    const int8_t *xq_[MAX_P];
    __m512i ai[4][MAX_P];
    __m512 a[4][MAX_P];
    for (int r = 0; r < R; r++) {
        cr[r] = codes[r];
        fr_[r] = f[r];
        for (int p = 0; p < P; p++) ai[r][p] = _mm512_setzero_si512(), a[r][p] = acc[r][p];
    }
    for (int p = 0; p < P; p++) xq_[p] = xq[p], xs_[p] = folded ? NULL : xs[p];
    // Not whole: the block's first group g0 = B / bpg, kept without a division per block (an idiv was in the
    // loop); where bpg divides 64 every block has the same lanes' groups (one table load).
    const int64_t step = 64 % bpg == 0 ? 64 / bpg : 0;
    const __m512i idx0 = whole ? _mm512_setzero_si512() : _mm512_loadu_si512((const void *)lane_group);
    int64_t left = per, g = 0, g0 = 0, rem = 0;
    const char *pc = *pf;
    for (int64_t B = 0; B < nbytes; B += 64) {
        const __mmask64 m = nbytes - B >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (nbytes - B)) - 1);
        for (int l = 0; l < lines; l++, pc += 64) _mm_prefetch(pc, _MM_HINT_T1);
        __m512i v[4], u[4];
        load_block(j, W2, R, cr, B, m, nbytes, v, u);
        for (int q = 0; q < c; q++) {
            __m512i xv[MAX_P];
            for (int p = 0; p < P; p++) xv[p] = load64(m, xq_[p] + q * nbytes + B);
            for (int r = 0; r < R; r++) {
                const __m512i part = W2 ? with_second(code_part(v[r], W, q, lo), u[r], W, W2, q) : code_part(v[r], W, q, lo);
                for (int p = 0; p < P; p++) ai[r][p] = _mm512_dpbusd_epi32(ai[r][p], part, xv[p]);
            }
        }
        __m512 fx[MAX_P], fr[4];
        if (whole) {
            if (--left) continue;
            left = per;
            for (int p = 0; p < P && !folded; p++) fx[p] = _mm512_set1_ps(xs_[p][g]);
            for (int r = 0; r < R; r++) fr[r] = _mm512_set1_ps(fr_[r][g]);
            g++;
        } else {        // lane_group: the group of each int32 lane minus the block's first group
            const __m512i idx = step ? idx0 : _mm512_loadu_si512((const void *)(lane_group + B / 4));
            for (int p = 0; p < P && !folded; p++) fx[p] = _mm512_permutexvar_ps(idx, _mm512_loadu_ps(xs_[p] + g0));
            for (int r = 0; r < R; r++) fr[r] = _mm512_permutexvar_ps(idx, _mm512_loadu_ps(fr_[r] + g0));
            if (step) {
                g0 += step;
            } else {
                for (rem += 64; rem >= bpg; rem -= bpg) g0++;
            }
        }
        for (int r = 0; r < R; r++)
            for (int p = 0; p < P; p++) {
                a[r][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ai[r][p]), folded ? fr[r] : _mm512_mul_ps(fr[r], fx[p]),
                                          a[r][p]);
                ai[r][p] = _mm512_setzero_si512();
            }
    }
    for (int r = 0; r < R; r++)
        for (int p = 0; p < P; p++) acc[r][p] = a[r][p];
    *pf = pc;
}

#define TILE_WW(Rv, Pv, whole, folded)                                                                    \
    switch (w * 10 + w2) {                                                                                \
        case 80: tile(j, 8, 0, Rv, Pv, whole, folded, codes, &pf, lines, xq, xs, f, acc); break;         \
        case 40: tile(j, 4, 0, Rv, Pv, whole, folded, codes, &pf, lines, xq, xs, f, acc); break;         \
        case 42: tile(j, 4, 2, Rv, Pv, whole, folded, codes, &pf, lines, xq, xs, f, acc); break;         \
        case 20: tile(j, 2, 0, Rv, Pv, whole, folded, codes, &pf, lines, xq, xs, f, acc); break;         \
        case 21: tile(j, 2, 1, Rv, Pv, whole, folded, codes, &pf, lines, xq, xs, f, acc); break;         \
        default: tile(j, 1, 0, Rv, Pv, whole, folded, codes, &pf, lines, xq, xs, f, acc); break;         \
    }
#define TILE_F(Rv, Pv, folded) if (whole) { TILE_WW(Rv, Pv, 1, folded) } else { TILE_WW(Rv, Pv, 0, folded) }
#define TILE_W(Rv, Pv) TILE_F(Rv, Pv, 0)

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Code rows are prefetched PREFETCH_BYTES ahead, rounded up to whole rows (the AMX path's row by row).
static inline int64_t prefetch_ahead(int64_t row_bytes) { return (PREFETCH_BYTES + row_bytes - 1) / row_bytes * row_bytes; }

// The 64-byte steps of tile() over one row of bit-width b: its first plane's blocks, and the second's unless merged.
static inline int64_t row_steps(const job_t *j, int b) {
    int64_t steps = 0;
    for (int i = 0; i < 2 && j->planes[(b * 2 + i) * 2 + 1]; i++) {
        if (i == 1 && j->merge) break;
        steps += (j->K * j->planes[(b * 2 + i) * 2 + 1] / 8 + 63) / 64;
    }
    return steps;
}

// Lines to prefetch per step of tile() so that a tile of R rows prefetches its R rows' bytes, PREFETCH_BYTES
// ahead, in address order.
static inline int prefetch_lines(const job_t *j, int b, int R) {
    const int64_t steps = row_steps(j, b);
    return (int)((R * (j->K * b / 8) + 64 * steps - 1) / (64 * steps));
}

// The first min(left, 16) of 16 lanes.
static inline __mmask16 first16(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }

// ---- the switching cache -------------------------------------------------------------------------------
// A switched expert's output gains, per row n, sum_i cache_delta[e, n, i] * x[cache_idx[e, i]], x as rounded here
// (x8 * xs, the same as in the product, so a delta that undoes a column's codes undoes them exactly). Each row's
// r deltas meet the pair's gathered x (xg) in the 16 lanes of the tile's accumulator, before its lanes are
// summed: r / 16 (rounded up) FMAs per row and pair, with their loads and the deltas' conversion ~8 vector
// instructions at r = 21 (1% of 2048 channels) against ~100 for the row's 2-bit codes. Measured (Zen 4, 1 thread,
// OLMoE-shaped, every expert switched, 16 and 128 tokens, the operator alone): 9-11% over the same call without
// a cache (10-14% before R and P were constants here; of that, 8% the FMAs and x loads, 5% the deltas' loads).
// Before, Inductor's loops added the corrections after the kernel: one compiled projection, the two ways
// alternated in one process, this one 10-20% faster (1, 16 and 128 tokens; OLMoE and Qwen3 shapes).
// Experts whose correction is all zero (unswitched) are skipped (cache_on, from native_op.cpp): nothing switched,
// the same call costs -0.1% to +3% over no cache; half the experts switched, +4% to +12%.

// Columns [16 c, 16 c + 16) of row n of expert e's cache_delta as float; zero past r.
static inline __m512 delta16(const job_t *j, int64_t e, int64_t n, int64_t c) {
    const int64_t at = (e * j->N + n) * j->r + 16 * c;
    const __mmask16 m = first16(j->r - 16 * c);
    if (j->delta_type == 2) return _mm512_maskz_loadu_ps(m, (const float *)j->cache_delta + at);
    const __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)j->cache_delta + at);
    return j->delta_type == 0 ? _mm512_cvtph_ps(h) : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Set by tests (native.cache_after): the packed path corrects through cache_after as the AMX path does.
int dynamoq_cache_after = 0;

// acc[r][p] += the cache's correction of row n + r for pair pairs[p], in 16 lanes.
static inline __attribute__((always_inline)) void cache_lanes(const job_t *j, int64_t e, int64_t n, const int R,
                                                              const int P, const int64_t *pairs, __m512 acc[4][MAX_P]) {
    if (!j->cache_delta || !j->cache_on[e] || dynamoq_cache_after) return;
    for (int64_t c = 0; c < j->rpad / 16; c++)
        for (int r = 0; r < R; r++) {
            const __m512 d = delta16(j, e, n + r, c);
            for (int p = 0; p < P; p++)
                acc[r][p] = _mm512_fmadd_ps(d, _mm512_loadu_ps(j->xg + pairs[p] * j->rpad + 16 * c), acc[r][p]);
        }
}

// y[s, n] += the cache's correction, for rows [n0, n1) of expert e and its pairs [np], after they are stored (the
// AMX path, whose accumulators hold 16 pairs of a row; the packed path too under dynamoq_cache_after).
static void cache_after(const job_t *j, int64_t e, const int64_t *pairs, int64_t np, int64_t n0, int64_t n1) {
    if (!j->cache_delta || !j->cache_on[e]) return;
    for (int64_t n = n0; n < n1; n++)
        for (int64_t p = 0; p < np; p++) {
            __m512 a = _mm512_setzero_ps();
            for (int64_t c = 0; c < j->rpad / 16; c++)
                a = _mm512_fmadd_ps(delta16(j, e, n, c), _mm512_loadu_ps(j->xg + pairs[p] * j->rpad + 16 * c), a);
            j->y[pairs[p] * j->N + n] += _mm512_reduce_add_ps(a);
        }
}

// Groups [g, g + 16) of row n of expert e (lanes m): their scales and zero points as float.
static inline void group_scales(const job_t *j, int64_t e, int64_t n, int64_t g, __mmask16 m, __m512 *s16, __m512 *z16) {
    const int64_t at = (e * j->N + n) * j->G + g;
    *s16 = _mm512_maskz_cvtph_ps(m, _mm256_maskz_loadu_epi16(m, j->scale + at));
    *z16 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, j->zero + at)));
}

// 2**offset of each plane of bit-width b (packing.PLANES); returns how many planes it has (1 or 2).
static inline int plane_pow2(const job_t *j, int b, float pow2[2]) {
    int i = 0;
    for (; i < 2 && j->planes[(b * 2 + i) * 2 + 1]; i++) pow2[i] = (float)(1 << j->planes[(b * 2 + i) * 2]);
    return i;
}

// Per row n of [nb, ne) of expert e, in buf [ROW_BLOCK][4][G16 + 16]: its scales as float, scale * zero,
// and per plane scale * 2**offset.
static void block_factors(const job_t *j, int64_t e, int b, int64_t nb, int64_t ne, float *buf) {
    const int64_t G = j->G, G16 = (G + 15) / 16 * 16;
    float pow2[2];
    const int planes = plane_pow2(j, b, pow2);
    for (int64_t n = nb; n < ne; n++) {
        float *sf = buf + (n - nb) * 4 * (G16 + 16), *sz = sf + (G16 + 16);
        for (int64_t g = 0; g < G; g += 16) {
            __m512 s16, z16;
            group_scales(j, e, n, g, first16(G - g), &s16, &z16);
            _mm512_store_ps(sf + g, s16);
            _mm512_store_ps(sz + g, _mm512_mul_ps(s16, z16));
        }
        for (int i = 0; i < planes; i++) {
            float *fp = sz + (1 + i) * (G16 + 16);
            const __m512 p2 = _mm512_set1_ps(pow2[i]);
            for (int64_t g = 0; g < G16; g += 16) _mm512_store_ps(fp + g, _mm512_mul_ps(_mm512_load_ps(sf + g), p2));
        }
    }
}

// The zero-point term of one row (sz: its scale * zero per group) for one pair, - sum_g sz * xsum, in 16
// lanes (summed with the rest of the row's accumulator).
static inline __m512 zero_lanes(const job_t *j, const float *sz, int64_t pair) {
    const int64_t G = j->G;
    const float *xsum = j->xsum + xrow(j, pair) * G;
    __m512 zt = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g += 16)
        zt = _mm512_fnmadd_ps(_mm512_load_ps(sz + g), _mm512_maskz_loadu_ps(first16(G - g), xsum + g), zt);
    return zt;
}

// The sums of the 16 lanes of a, b, c, d.
static inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
    const __m256 a8 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
    const __m256 b8 = _mm256_add_ps(_mm512_castps512_ps256(b), _mm512_extractf32x8_ps(b, 1));
    const __m256 c8 = _mm256_add_ps(_mm512_castps512_ps256(c), _mm512_extractf32x8_ps(c, 1));
    const __m256 d8 = _mm256_add_ps(_mm512_castps512_ps256(d), _mm512_extractf32x8_ps(d, 1));
    const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a8, b8), _mm256_hadd_ps(c8, d8));   // [a b c d] per 128 bits
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// y[pair, n + r] = the sum of acc[r][p]'s lanes, for R rows and P pairs (pairs[p]).
static inline void store_rows(const job_t *j, const int R, const int P, const int64_t *pairs, int64_t n,
                              __m512 acc[4][MAX_P]) {
    for (int p = 0; p < P; p++) {
        float *y = j->y + pairs[p] * j->N + n;
        if (R == 4) {
            _mm_storeu_ps(y, reduce4(acc[0][p], acc[1][p], acc[2][p], acc[3][p]));
        } else if (R == 2 && p + 1 < P) {
            const __m128 t = reduce4(acc[0][p], acc[1][p], acc[0][p + 1], acc[1][p + 1]);
            _mm_storel_pi((__m64 *)y, t);
            _mm_storeh_pi((__m64 *)(j->y + pairs[p + 1] * j->N + n), t);
            p++;
        } else {
            for (int r = 0; r < R; r++) y[r] = _mm512_reduce_add_ps(acc[r][p]);
        }
    }
}

// Rows [n0, n1) of expert e (codes: its q{b} rows) times its pairs `pairs` [np], reading the packed planes.
static void expert_rows(const job_t *j, int64_t e, int b, const uint8_t *codes_e, const int64_t *pairs,
                        int64_t np, int64_t n0, int64_t n1, float *buf) {
    const int64_t G = j->G, G16 = (G + 15) / 16 * 16, K = j->K, row_bytes = K * b / 8;
    const int lines_of[5] = {0, prefetch_lines(j, b, 1), prefetch_lines(j, b, 2), 0, prefetch_lines(j, b, 4)};   // [R]
    for (int64_t nb = n0; nb < n1; nb += ROW_BLOCK) {
        const int64_t ne = min64(nb + ROW_BLOCK, n1);
        block_factors(j, e, b, nb, ne, buf);
        for (int64_t p0 = 0; p0 < np; p0 += MAX_P) {
            const int P = (int)min64(MAX_P, np - p0), RMAX = P <= 2 ? 4 : 2;
            for (int64_t n = nb; n < ne;) {
                const int R = n + RMAX <= ne ? RMAX : 1, lines = lines_of[R];
                const char *pf = (const char *)(codes_e + n * row_bytes) + PREFETCH_BYTES;
                __m512 acc[4][MAX_P];
                const uint8_t *codes[4];
                const float *f[4], *xs[MAX_P];
                const int8_t *xq[MAX_P];
                for (int r = 0; r < R; r++) {
                    codes[r] = codes_e + (n + r) * row_bytes;
                    for (int p = 0; p < P; p++)
                        acc[r][p] = zero_lanes(j, buf + (n + r - nb) * 4 * (G16 + 16) + (G16 + 16), pairs[p0 + p]);
                }
                if (R == 4 && P == 1) cache_lanes(j, e, n, 4, 1, pairs + p0, acc);     // R, P constants: unrolled
                else if (R == 4) cache_lanes(j, e, n, 4, 2, pairs + p0, acc);
                else if (R == 2 && P == 3) cache_lanes(j, e, n, 2, 3, pairs + p0, acc);
                else if (R == 2) cache_lanes(j, e, n, 2, 4, pairs + p0, acc);
                else if (P == 1) cache_lanes(j, e, n, 1, 1, pairs + p0, acc);
                else if (P == 2) cache_lanes(j, e, n, 1, 2, pairs + p0, acc);
                else if (P == 3) cache_lanes(j, e, n, 1, 3, pairs + p0, acc);
                else cache_lanes(j, e, n, 1, 4, pairs + p0, acc);
                for (int p = 0; p < P; p++) xs[p] = j->xs + xrow(j, pairs[p0 + p]) * (G + 16);
                for (int i = 0; i < 2; i++) {
                    const int w = j->planes[(b * 2 + i) * 2 + 1];
                    if (!w) break;
                    const int w2 = i == 0 && j->merge ? j->planes[(b * 2 + 1) * 2 + 1] : 0;   // second_plane
                    for (int r = 0; r < R; r++) f[r] = buf + (n + r - nb) * 4 * (G16 + 16) + (2 + i) * (G16 + 16);
                    for (int p = 0; p < P; p++) xq[p] = j->xq[w] + xrow(j, pairs[p0 + p]) * K;   // K bytes a row
                    const int whole = j->gs * w / 8 % 64 == 0;
                    if (R == 4 && P == 1) { TILE_W(4, 1) }
                    else if (R == 4) { TILE_W(4, 2) }
                    else if (R == 2 && P == 3) { TILE_W(2, 3) }
                    else if (R == 2) { TILE_W(2, 4) }
                    else if (P == 1) { TILE_W(1, 1) }
                    else if (P == 2) { TILE_W(1, 2) }
                    else if (P == 3) { TILE_W(1, 3) }
                    else { TILE_W(1, 4) }
                    if (w2) break;
                    for (int r = 0; r < R; r++) codes[r] += K * w / 8;
                }
                store_rows(j, R, P, pairs + p0, n, acc);
                n += R;
            }
        }
    }
}

// ---- one pair (decode) ---------------------------------------------------------------------------------
// An expert with a single pair: its x scales are folded into the rows' factors (one_factors), so tile() runs
// without multiplying them in (folded), and each row's accumulator starts at its zero-point term. The factors
// are made per tile, just before it, into a small buffer that stays in L1 (made per block of rows beforehand,
// as before, rows cost 1-3 ns more: one thread, warm caches, 2-bit rows of 576 inputs (g64) 14.8 -> 12.1 ns,
// of 1024 (g128) 17.6 -> 14.4, 4-bit of 576 16.0 -> 13.5, 3-bit of 1024 33.6 -> 28.9; 2048 about even).

// Rows n .. n + R - 1 of expert e for its one pair (x scales xs, sums xsum; xs0, xsum0: their groups 0-15, m0:
// which of those exist; pow2: 2**offset of each of its planes): in fb [2][4][G16 + 16], per plane i and row r,
// the factors scale * 2**offset * xs; acc[r][0] = the zero-point term's 16 lanes, - sum over g = lane mod 16
// of scale * zero * xsum.
static inline __attribute__((always_inline)) void one_factors(const job_t *j, int64_t e, int64_t n, int R,
                                                              const int64_t G16, const float *xs,
                                                              const float *xsum, __mmask16 m0, __m512 xs0,
                                                              __m512 xsum0, int planes, const float pow2[2],
                                                              float *restrict fb, __m512 acc[4][MAX_P]) {
    for (int r = 0; r < R; r++) {
        __m512 zt = _mm512_setzero_ps();
        for (int64_t g = 0; g < G16; g += 16) {
            const __mmask16 m = g ? first16(j->G - g) : m0;
            __m512 s16, z16;
            group_scales(j, e, n + r, g, m, &s16, &z16);
            zt = _mm512_fnmadd_ps(_mm512_mul_ps(s16, z16), g ? _mm512_maskz_loadu_ps(m, xsum + g) : xsum0, zt);
            const __m512 sx = _mm512_mul_ps(s16, g ? _mm512_maskz_loadu_ps(m, xs + g) : xs0);
            for (int i = 0; i < planes; i++)
                _mm512_store_ps(fb + (i * 4 + r) * (G16 + 16) + g, _mm512_mul_ps(sx, _mm512_set1_ps(pow2[i])));
        }
        acc[r][0] = zt;
    }
}

// Rows [n0, n1) of expert e (codes_e: its q{b} rows) times its one pair; G16: the groups rounded up to 16.
static inline __attribute__((always_inline)) void rows_one(const job_t *j, int64_t e, int b,
                                                           const uint8_t *codes_e, int64_t pair, int64_t n0,
                                                           int64_t n1, const int64_t G16, float *restrict fb) {
    const int64_t K = j->K, G = j->G, row_bytes = K * b / 8;
    const int lines4 = prefetch_lines(j, b, 4), lines1 = prefetch_lines(j, b, 1);
    const float *xs[MAX_P] = {NULL};                    // folded into the factors
    const int64_t row = xrow(j, pair);
    const float *pxs = j->xs + row * (G + 16), *pxsum = j->xsum + row * G;
    const __mmask16 m0 = first16(G);
    const __m512 xs0 = _mm512_maskz_loadu_ps(m0, pxs), xsum0 = _mm512_maskz_loadu_ps(m0, pxsum);
    float pow2[2];
    const int planes = plane_pow2(j, b, pow2);
    for (int64_t n = n0; n < n1;) {
        const int R = n + 4 <= n1 ? 4 : 1, lines = R == 4 ? lines4 : lines1;
        const char *pf = (const char *)(codes_e + n * row_bytes) + PREFETCH_BYTES;
        const uint8_t *codes[4];
        const float *f[4];
        __m512 acc[4][MAX_P];
        one_factors(j, e, n, R, G16, pxs, pxsum, m0, xs0, xsum0, planes, pow2, fb, acc);
        if (R == 4) cache_lanes(j, e, n, 4, 1, &pair, acc);
        else cache_lanes(j, e, n, 1, 1, &pair, acc);
        for (int r = 0; r < R; r++) codes[r] = codes_e + (n + r) * row_bytes;
        for (int i = 0; i < 2; i++) {
            const int w = j->planes[(b * 2 + i) * 2 + 1];
            if (!w) break;
            const int w2 = i == 0 && j->merge ? j->planes[(b * 2 + 1) * 2 + 1] : 0;   // second_plane
            const int8_t *xq[MAX_P] = {j->xq[w] + row * K};
            const int whole = j->gs * w / 8 % 64 == 0;
            for (int r = 0; r < R; r++) f[r] = fb + (i * 4 + r) * (G16 + 16);
            if (R == 4) { TILE_F(4, 1, 1) }
            else { TILE_F(1, 1, 1) }
            if (w2) break;
            for (int r = 0; r < R; r++) codes[r] += K * w / 8;
        }
        store_rows(j, R, 1, &pair, n, acc);
        n += R;
    }
}

// The same, with the common case of at most 16 groups per row compiled on its own (a fixed-size buffer). The
// buffers' padding is read, never used: zero, not NaN.
static void expert_rows_one(const job_t *j, int64_t e, int b, const uint8_t *codes_e, int64_t pair,
                            int64_t n0, int64_t n1) {
    if (j->G <= 16) {
        float fb[2 * 4 * 32] __attribute__((aligned(64))) = {0};
        rows_one(j, e, b, codes_e, pair, n0, n1, 16, fb);
    } else {
        const int64_t G16 = (j->G + 15) / 16 * 16;
        float fb[2 * 4 * (G16 + 16)] __attribute__((aligned(64)));
        memset(fb, 0, sizeof(fb));
        rows_one(j, e, b, codes_e, pair, n0, n1, G16, fb);
    }
}

// ---- the AMX path: experts with many pairs (prefill) ----------------------------------------------------
// Their rows are unpacked once per block into one byte per code (all planes of a code in it), in input
// order: per plane, each 64 inputs are one window of the plane (at most 64 bytes) permuted by int32, shifted
// to their part and masked. AMX's tdpbusd then multiplies 16 rows x 64 codes by 64 inputs x 16 pairs (x8 in
// its 4-byte interleaved layout) into 16 x 16 int32, once per 64 inputs; at the end of each group the
// int32 meet the group's scales, zero points and x scales in float (AVX-512). Groups of a multiple of 64.
#define AMX_ROWS 16
#define AMX_PAIRS 16
int dynamoq_amx_min_pairs = 4;      // experts with at least this many pairs take the AMX path (with 2-3 the
                                    // packed path is faster: it costs by the pair, AMX by the 16 pairs)
static int amx_ready = 0;           // dynamoq_amx_init() succeeded
int dynamoq_amx_ready(void) { return amx_ready; }

#ifdef DYNAMOQ_AMX
#include <sys/syscall.h>
#include <unistd.h>

// Asks Linux for the AMX tile state (once per process); 1 when granted.
int dynamoq_amx_init(void) {
    if (!amx_ready) amx_ready = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return amx_ready;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config_t;

// Run i of the 64 plane bytes v (see job_t).
static inline __attribute__((always_inline)) __m512i plane_run(const job_t *j, const int w, const int i, __m512i v) {
    const __m512i c = _mm512_permutexvar_epi32(_mm512_loadu_si512((const void *)(j->w_perm[w] + 16 * i)), v);
    return _mm512_and_si512(_mm512_srlv_epi32(c, _mm512_loadu_si512((const void *)(j->w_shift[w] + 16 * i))),
                            _mm512_set1_epi8((char)((1 << w) - 1)));
}

// One row of bit-width planes (w0 at bit 0; w1, if any, at bit off1) -> out [K / 64] codes in input order.
static inline __attribute__((always_inline)) void unpack_row(const job_t *j, const int w0, const int w1, const int off1,
                                                             const uint8_t *row, __m512i *out) {
    const int64_t K = j->K, blocks = K / 64, bytes0 = K * w0 / 8, bytes1 = K * w1 / 8;
    const int r0 = 8 / w0, r1 = w1 ? 8 / w1 : 1, R = r0 > r1 ? r0 : r1;
    __m512i v0 = _mm512_setzero_si512(), v1 = _mm512_setzero_si512();
    for (int64_t blk = 0; blk < blocks; blk += R)
        for (int i = 0; i < R && blk + i < blocks; i++) {      // unrolled: each run's table is a constant
            if (i % r0 == 0) {
                const int64_t q = (blk + i) / r0 * 64;
                v0 = _mm512_maskz_loadu_epi8(bytes0 - q >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (bytes0 - q)) - 1), row + q);
            }
            __m512i c = plane_run(j, w0, i % r0, v0);
            if (w1) {
                if (i % r1 == 0) {
                    const int64_t q = (blk + i) / r1 * 64;
                    v1 = _mm512_maskz_loadu_epi8(bytes1 - q >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (bytes1 - q)) - 1),
                                                 row + bytes0 + q);
                }
                c = _mm512_or_si512(c, _mm512_slli_epi32(plane_run(j, w1, i % r1, v1), off1));
            }
            _mm512_storeu_si512(out + blk + i, c);
        }
}

// Rows [nb, ne) of q{b} (codes_e: the expert's) -> ub [rows][K] codes in input order.
static void unpack_rows(const job_t *j, int b, const uint8_t *codes_e, int64_t nb, int64_t ne, uint8_t *ub) {
    const int64_t K = j->K, row_bytes = K * b / 8, ahead = prefetch_ahead(row_bytes);
    for (int64_t n = nb; n < ne; n++) {
        const uint8_t *row = codes_e + n * row_bytes;
        for (int64_t o = 0; o < row_bytes; o += 64) _mm_prefetch((const char *)row + ahead + o, _MM_HINT_T1);
        __m512i *out = (__m512i *)(ub + (n - nb) * K);
        switch (b) {                                    // packing.PLANES
            case 8: unpack_row(j, 8, 0, 0, row, out); break;
            case 6: unpack_row(j, 4, 2, 4, row, out); break;
            case 4: unpack_row(j, 4, 0, 0, row, out); break;
            case 3: unpack_row(j, 2, 1, 2, row, out); break;
            default: unpack_row(j, 2, 0, 0, row, out); break;
        }
    }
}

// Rows [n0, n1) of expert e times its pairs, with AMX. buf: block_factors'; ub [ROW_BLOCK][K] unpacked codes;
// xb [tiles][K / 4][AMX_PAIRS] int32: x8 of the tiles of pairs (4 inputs per int32, tdpbusd's second operand),
// xf [tiles][2][G][AMX_PAIRS] their xs and sums of x; c [AMX_ROWS][AMX_PAIRS] int32.
__attribute__((target("amx-tile,amx-int8")))
static void amx_rows(const job_t *j, int64_t e, int b, const uint8_t *codes_e, const int64_t *pairs, int64_t np,
                     int64_t n0, int64_t n1, float *buf, uint8_t *ub, int32_t *xb, float *xf, int32_t *c) {
    const int64_t G = j->G, G16 = (G + 15) / 16 * 16, K = j->K, steps = j->gs / 64, tiles = (np + AMX_PAIRS - 1) / AMX_PAIRS;
    for (int64_t tl = 0; tl < tiles; tl++) {
        const int64_t p0 = tl * AMX_PAIRS;
        const int P = (int)min64(AMX_PAIRS, np - p0);
        int32_t at[AMX_PAIRS] = {0};
        int64_t row[AMX_PAIRS] = {0};                   // the tile's rows of x
        for (int p = 0; p < P; p++) {
            row[p] = xrow(j, pairs[p0 + p]);
            at[p] = (int32_t)(row[p] * K / 4);
        }
        const __m512i idx = _mm512_loadu_si512((const void *)at);
        const __mmask16 live = (__mmask16)((1u << P) - 1);
        int32_t *dst = xb + tl * (K / 4) * AMX_PAIRS;
        for (int64_t k4 = 0; k4 < K / 4; k4++)          // missing pairs are zeros
            _mm512_storeu_si512((void *)(dst + k4 * AMX_PAIRS), _mm512_mask_i32gather_epi32(
                _mm512_setzero_si512(), live, _mm512_add_epi32(idx, _mm512_set1_epi32((int)k4)), j->x8, 4));
        float *f = xf + tl * 2 * G * AMX_PAIRS;
        for (int64_t g = 0; g < G; g++)
            for (int p = 0; p < AMX_PAIRS; p++) {
                f[g * AMX_PAIRS + p] = p < P ? j->xs[row[p] * (G + 16) + g] : 0.0f;
                f[(G + g) * AMX_PAIRS + p] = p < P ? j->xsum[row[p] * G + g] : 0.0f;
            }
    }
    for (int64_t nb = n0; nb < n1; nb += ROW_BLOCK) {
        const int64_t ne = min64(nb + ROW_BLOCK, n1);
        block_factors(j, e, b, nb, ne, buf);
        unpack_rows(j, b, codes_e, nb, ne, ub);
        for (int64_t tl = 0; tl < tiles; tl++) {
            const int64_t p0 = tl * AMX_PAIRS;
            const int P = (int)min64(AMX_PAIRS, np - p0);
            const int8_t *x = (const int8_t *)(xb + tl * (K / 4) * AMX_PAIRS);
            const float *f = xf + tl * 2 * G * AMX_PAIRS;
            for (int64_t n = nb; n < ne; n += AMX_ROWS) {
                const int R = (int)min64(AMX_ROWS, ne - n);     // rows past ne: stale codes, not stored
                __m512 acc[AMX_ROWS];
                for (int r = 0; r < AMX_ROWS; r++) acc[r] = _mm512_setzero_ps();
                for (int64_t g = 0; g < G; g++) {
                    _tile_zero(0);
                    for (int64_t t = 0; t < steps; t++) {
                        _tile_loadd(1, ub + (n - nb) * K + (g * steps + t) * 64, K);
                        _tile_loadd(2, x + (g * steps + t) * 64 * AMX_PAIRS, 4 * AMX_PAIRS);
                        _tile_dpbusd(0, 1, 2);
                    }
                    _tile_stored(0, c, 4 * AMX_PAIRS);
                    const __m512 xs = _mm512_loadu_ps(f + g * AMX_PAIRS), xsum = _mm512_loadu_ps(f + (G + g) * AMX_PAIRS);
                    for (int r = 0; r < AMX_ROWS; r++) {
                        const float *sf = buf + (r < R ? n + r - nb : 0) * 4 * (G16 + 16);
                        const __m512 v = _mm512_cvtepi32_ps(_mm512_loadu_si512((const void *)(c + r * AMX_PAIRS)));
                        acc[r] = _mm512_fmadd_ps(v, _mm512_mul_ps(_mm512_set1_ps(sf[g]), xs), acc[r]);
                        acc[r] = _mm512_fnmadd_ps(_mm512_set1_ps(sf[G16 + 16 + g]), xsum, acc[r]);
                    }
                }
                for (int r = 0; r < R; r++) {
                    float out[AMX_PAIRS];
                    _mm512_storeu_ps(out, acc[r]);
                    for (int p = 0; p < P; p++) j->y[pairs[p0 + p] * j->N + n + r] = out[p];
                }
            }
        }
    }
}

// One thread's AMX state: the tile shapes (C 16 x 16 int32, codes 16 x 64, x 16 x 64), then amx_rows.
__attribute__((target("amx-tile,amx-int8")))
static void amx_begin(void) {
    tile_config_t cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 3; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

__attribute__((target("amx-tile,amx-int8")))
static void amx_end(void) { _tile_release(); }
#else
int dynamoq_amx_init(void) { return 0; }
#endif

// The AMX path's tables (job_t) into mem [AMX_TABLES]: run r (64 inputs) of 64 plane bytes starts at input
// 64 r of the 64 * 8 / w inputs they hold (chunks of `lanes` bytes, packing.py's layout).
#define AMX_TABLES (2 * 16 * (8 + 4 + 2 + 1))
static void amx_tables(job_t *j, int lanes, int32_t *mem) {
    for (int w = 1; w <= 8; w *= 2) {
        int32_t *perm = mem, *shift = mem + 16 * (8 / w);
        mem = shift + 16 * (8 / w);
        j->w_perm[w] = perm;
        j->w_shift[w] = shift;
        const int64_t cl = 8 / w * lanes;               // inputs per chunk of the plane
        for (int64_t i = 0; i < 16 * (8 / w); i++) {
            const int64_t a = 4 * i;                     // the first of the 4 inputs of int32 i
            perm[i] = (int32_t)((a / cl * lanes + a % lanes) / 4);
            shift[i] = (int32_t)(w * (a % cl / lanes));
        }
    }
}

// x [X, K] (float32, or bfloat16 when x_bf16) -> per row and group xs = max |x| / 127 ([X, G + 16]), x8 = round(x / xs),
// xsum = sum of x8 * xs; x8 rearranged per plane width w into xq[w] [X, 8 / w, K * w / 8] (byte j of part p:
// the input of code p of plane byte j, packing.py's layout with L = lanes bytes per chunk).
static void quantize_x(const job_t *j, const void *x, int x_bf16, int lanes, int8_t *x8, float *xs, float *xsum,
                       int8_t *const *xq) {
    const int64_t X = j->S / j->per, K = j->K, G = j->G, gs = j->gs;
    for (int64_t s = 0; s < X; s++)
        for (int64_t g = 0; g < G; g++) {
            const int64_t at = s * K + g * gs;
            __m512 v[64], amax = _mm512_setzero_ps(), sum = _mm512_setzero_ps();   // gs <= 1024 (supports())
            const int chunks = (int)((gs + 15) / 16);
            for (int i = 0; i < chunks; i++) {
                const __mmask16 m = gs - 16 * i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (gs - 16 * i)) - 1);
                v[i] = x_bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                                    _mm256_maskz_loadu_epi16(m, (const uint16_t *)x + at + 16 * i)), 16))
                              : _mm512_maskz_loadu_ps(m, (const float *)x + at + 16 * i);
                amax = _mm512_max_ps(amax, _mm512_abs_ps(v[i]));
            }
            float sc = _mm512_reduce_max_ps(amax) / 127.0f;
            if (!(sc >= 1e-30f)) sc = 1e-30f;
            const __m512 scv = _mm512_set1_ps(sc);
            for (int i = 0; i < chunks; i++) {
                const __mmask16 m = gs - 16 * i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (gs - 16 * i)) - 1);
                const __m512 q = _mm512_roundscale_ps(_mm512_div_ps(v[i], scv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                _mm_mask_storeu_epi8(x8 + at + 16 * i, m, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(q)));
                sum = _mm512_add_ps(sum, _mm512_maskz_mul_ps(m, q, scv));
            }
            xs[s * (G + 16) + g] = sc;
            xsum[s * G + g] = _mm512_reduce_add_ps(sum);
        }
    for (int w = 1; w <= 8; w *= 2) {
        if (!xq[w]) continue;
        const int c = 8 / w;
        const int64_t nbytes = K * w / 8, chunks = gs / (c * lanes);
        for (int64_t s = 0; s < X; s++)
            for (int p = 0; p < c; p++) {
                int8_t *out = xq[w] + (s * c + p) * nbytes;                  // byte (g, h, l) of the plane
                for (int64_t g = 0; g < G; g++)
                    for (int64_t h = 0; h < chunks; h++, out += lanes)
                        memcpy(out, x8 + s * K + g * gs + (h * c + p) * lanes, lanes);
            }
    }
}

// Scratch memory kept from call to call, per thread (the caller's and each OpenMP worker's): memory fresh
// from the OS costs a page fault per 4 KB, which took a fifth of a 128-token layer. Never shrinks. Zero when
// new: the padding of the row factors (block_factors) is read but never written, and must not be NaN; what
// a call leaves there is finite and only ever meets int32 sums of masked-out (zero) code bytes.
typedef struct { void *p; size_t size; } keep_t;
static void *kept(keep_t *k, size_t need) {
    if (k->size < need) {
        free(k->p);
        need = (need + 4095) / 4096 * 4096;
        k->p = aligned_alloc(64, need);
        k->size = k->p ? need : 0;
        if (k->p) memset(k->p, 0, need);
    }
    return k->p;
}
static _Thread_local keep_t kept_sort, kept_main, kept_rows, kept_amx;

// The expert of pair s, clamped to [0, E) (as the exact paths clamp it): no stray read.
static inline int64_t expert_of(const int64_t *ids, int64_t s, int64_t E) {
    return ids[s] < 0 ? 0 : ids[s] >= E ? E - 1 : ids[s];
}

// xg [S, rpad] (see job_t) from x8 and xs, for the S pairs (ids) and each expert's r cached channels.
static void gather_cached_x(const job_t *j, const int64_t *ids, int64_t E, const int64_t *cache_idx, const int8_t *x8,
                            float *xg) {
    for (int64_t s = 0; s < j->S; s++) {
        const int64_t e = expert_of(ids, s, E), row = xrow(j, s);
        float *out = xg + s * j->rpad;
        for (int64_t i = 0; i < j->rpad; i++) {
            const int64_t k = i < j->r ? cache_idx[e * j->r + i] : -1;
            out[i] = k < 0 ? 0.0f : (float)x8[row * j->K + k] * j->xs[row * (j->G + 16) + k / j->gs];
        }
    }
}

// y [S, N] = the pairs' experts times x [X, K], pair s reading row s / (S / X) (X = S: a row per pair; S = k X:
// the k pairs of a token in a row, its x quantized once). expert_meta [E][2]: (bit-width, position among the experts of that
// width); width_base[b], width_stride[b]: address of q{b} and bytes per expert in it; lane_group[w]: see job_t.
// With a switching cache (cache_delta not NULL): cache_idx [E, r] its channels (in [0, K)), cache_delta [E, N, r]
// of delta_type (see job_t). Returns 0; -1 when its scratch memory could not be had (y is then undefined).
int dynamoq_decode(int64_t S, int64_t X, int64_t N, int64_t K, int64_t gs, int64_t E, const void *x, int x_bf16,
                   const int64_t *ids, const int32_t *expert_meta, const int64_t *width_base,
                   const int64_t *width_stride, const int32_t *planes, const int64_t *lane_group, int lanes,
                   const uint16_t *scale, const uint8_t *zero, float *y, int threads,
                   const int64_t *cache_idx, const void *cache_delta, int64_t r, int delta_type,
                   const uint8_t *cache_on) {
    const int64_t G = K / gs, G16 = (G + 15) / 16 * 16;
    job_t j = {S, N, K, G, gs, X ? S / X : 1, planes, {0}, {0}, NULL, NULL, scale, zero, y};
    if (cache_delta && r > 0) {
        j.cache_delta = cache_delta;
        j.r = r;
        j.rpad = (r + 15) / 16 * 16;
        j.delta_type = delta_type;
        j.cache_on = cache_on;
    }
    // pairs by expert (counting sort: start [E + 1], fill [E], order [S]); the AMX path for experts with
    // enough pairs, where it runs; xq only for the plane widths of the experts on the packed path
    int64_t *start = (int64_t *)kept(&kept_sort, sizeof(int64_t) * (size_t)(2 * E + 1 + S));
    if (!start) return -1;
    int64_t *fill = start + E + 1, *order = fill + E;
    memset(start, 0, sizeof(int64_t) * (size_t)(2 * E + 1));
    for (int64_t s = 0; s < S; s++) start[expert_of(ids, s, E) + 1]++;
    const int64_t amx_min = amx_ready && gs % 64 == 0 ? dynamoq_amx_min_pairs : INT64_MAX;
    int amx = 0, packed[9] = {0};
    int64_t most = 0;                                   // pairs of the busiest expert
    for (int64_t e = 0; e < E; e++) {
        const int64_t np = start[e + 1];
        amx |= np >= amx_min;
        most = np > most ? np : most;
        for (int i = 0; i < 2 && np && np < amx_min; i++) packed[planes[(expert_meta[2 * e] * 2 + i) * 2 + 1]] = 1;
        start[e + 1] += start[e];
    }
    for (int64_t s = 0; s < S; s++) {
        const int64_t e = expert_of(ids, s, E);
        order[start[e] + fill[e]++] = s;
    }
    // scratch: xs (padded), xsum, x8, xq per plane width, the AMX path's tables, the cache's xg
    size_t bytes = sizeof(float) * (size_t)X * (2 * G + 16) + (size_t)X * K + 64 + sizeof(int32_t) * AMX_TABLES
                   + sizeof(float) * (size_t)(S * j.rpad);
    for (int w = 1; w <= 8; w *= 2) if (packed[w]) bytes += (size_t)X * K + 64;
    char *p = (char *)kept(&kept_main, bytes);
    if (!p) return -1;
    memset(p, 0, X * (G + 16) * sizeof(float));
    float *xs = (float *)p; p += X * (G + 16) * sizeof(float);
    float *xsum = (float *)p; p += X * G * sizeof(float);
    int8_t *x8 = (int8_t *)p; p += X * K;
    int8_t *xq[9] = {0};
    for (int w = 1; w <= 8; w *= 2) if (packed[w]) { xq[w] = (int8_t *)p; p += X * K; }
    if (amx) amx_tables(&j, lanes, (int32_t *)p);
    p += sizeof(int32_t) * AMX_TABLES;
    float *xg = (float *)p;
    j.xs = xs;
    j.xsum = xsum;
    j.x8 = x8;
    j.merge = lanes >= 4;
    for (int i = 0; j.merge && i < 16; i++) {
        const int c = 4 * i / lanes;                     // the chunk of the first plane's int32 i
        j.pair_idx[i] = (c / 2 * lanes + 4 * i % lanes) / 4;
    }
    for (int i = 0; j.merge && i < 32; i++) j.odd |= (__mmask32)((2 * i / lanes) % 2) << i;
    quantize_x(&j, x, x_bf16, lanes, x8, xs, xsum, xq);
    if (j.cache_delta) {
        gather_cached_x(&j, ids, E, cache_idx, x8, xg);
        j.xg = xg;
    }
    for (int w = 0; w < 9; w++) {
        j.xq[w] = xq[w];
        j.lane_group[w] = (const int32_t *)(intptr_t)lane_group[w];
    }
    // OpenMP: the same runtime (libgomp) and thread pool as torch's own kernels, which it finds loaded
    if (threads < 1) threads = 1;
    if (N < 64 * threads) threads = N >= 64 ? (int)(N / 64) : 1;
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
        const int64_t n0 = N * t / T, n1 = N * (t + 1) / T;
        float *buf = (float *)kept(&kept_rows, sizeof(float) * ROW_BLOCK * 4 * (G16 + 16));
        // the AMX path's: unpacked codes, x8 of an expert's tiles of pairs, their xs and sums, one tile of int32
        const int64_t tiles = (most + AMX_PAIRS - 1) / AMX_PAIRS;
        char *amx_buf = amx ? (char *)kept(&kept_amx, (size_t)(ROW_BLOCK * K + tiles * AMX_PAIRS * (K + 8 * G) + 4096)) : NULL;
        if (!buf || (amx && !amx_buf)) {
            #pragma omp atomic write
            failed = 1;
        } else {
#ifdef DYNAMOQ_AMX
            if (amx) amx_begin();
#endif
            for (int64_t e = 0; e < E; e++) {
                const int64_t np = start[e + 1] - start[e];
                if (!np) continue;
                const int b = expert_meta[2 * e];
                const uint8_t *codes_e = (const uint8_t *)(intptr_t)width_base[b] + expert_meta[2 * e + 1] * width_stride[b];
#ifdef DYNAMOQ_AMX
                if (np >= amx_min) {
                    uint8_t *ub = (uint8_t *)amx_buf;
                    int32_t *xb = (int32_t *)(ub + ROW_BLOCK * K);
                    float *xf = (float *)(xb + tiles * AMX_PAIRS * K / 4);
                    amx_rows(&j, e, b, codes_e, order + start[e], np, n0, n1, buf, ub, xb, xf,
                             (int32_t *)(xf + tiles * 2 * G * AMX_PAIRS));
                    cache_after(&j, e, order + start[e], np, n0, n1);
                    continue;
                }
#endif
                if (np == 1) expert_rows_one(&j, e, b, codes_e, order[start[e]], n0, n1);
                else expert_rows(&j, e, b, codes_e, order + start[e], np, n0, n1, buf);
                if (dynamoq_cache_after) cache_after(&j, e, order + start[e], np, n0, n1);
            }
#ifdef DYNAMOQ_AMX
            if (amx) amx_end();
#endif
        }
    }
    return failed ? -1 : 0;
}
