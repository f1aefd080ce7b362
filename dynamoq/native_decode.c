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
// while every pair tile of the expert passes over them.
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

// Code bytes are prefetched about this far ahead, in whole rows: with the hardware prefetcher alone one
// core read 5.5 GB/s from memory, against 14 from cache (OLMoE experts of 512-1024 bytes a row, 8 pairs:
// 8 rows ahead beat 4 and 16).
#define PREFETCH_BYTES 6144
#define ROW_BLOCK 32
#define MAX_P 4

typedef struct {
    int64_t S, N, K, G, gs;
    const int32_t *planes;          // [9][2][2]: for bit-width b, up to two planes (offset, width); width 0: none
    const int8_t *xq[9];            // [w] -> [S, 8 / w, K * w / 8] int8 (null where no plane has width w)
    const int32_t *lane_group[9];   // [w] -> [K * w / 32 rounded up to 16] group of each int32 lane, minus its block's first group
    const float *xs;                // [S, G + 16] (padded for whole-vector loads)
    const float *xsum;              // [S, G]
    const uint16_t *scale;          // [E, N, G] float16
    const uint8_t *zero;            // [E, N, G]
    float *y;                       // [S, N]
} job_t;

// One plane of width W for a tile of R rows (code bytes at codes[r], per-group factors f[r]: scale *
// 2**offset) and P pairs (x bytes xq[p], x scales xs[p]): out[r][p] += the plane's share.
static inline __attribute__((always_inline)) void tile(const job_t *j, const int W, const int R, const int P,
                                                       const uint8_t *const *codes, int64_t row_bytes,
                                                       const int8_t *const *xq, const float *const *xs,
                                                       const float *const *f, float out[4][MAX_P]) {
    const int64_t nbytes = j->K * W / 8, bpg = j->gs * W / 8;
    const int64_t ahead = (PREFETCH_BYTES + row_bytes - 1) / row_bytes * row_bytes;
    const int c = 8 / W;
    const int32_t *lane_group = j->lane_group[W];
    const __m512i lo = _mm512_set1_epi8((char)((1 << W) - 1));
    __m512 acc[4][MAX_P];
    for (int r = 0; r < R; r++)
        for (int p = 0; p < P; p++) acc[r][p] = _mm512_setzero_ps();
    for (int64_t B = 0; B < nbytes; B += 64) {
        const __mmask64 m = nbytes - B >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (nbytes - B)) - 1);
        __m512i v[4], ai[4][MAX_P];
        for (int r = 0; r < R; r++) {
            _mm_prefetch((const char *)codes[r] + B + ahead, _MM_HINT_T0);
            v[r] = _mm512_maskz_loadu_epi8(m, codes[r] + B);
            for (int p = 0; p < P; p++) ai[r][p] = _mm512_setzero_si512();
        }
        for (int q = 0; q < c; q++) {
            __m512i xv[MAX_P];
            for (int p = 0; p < P; p++) xv[p] = _mm512_maskz_loadu_epi8(m, xq[p] + q * nbytes + B);
            for (int r = 0; r < R; r++) {
                const __m512i part = W == 8 ? v[r] : _mm512_and_si512(_mm512_srli_epi16(v[r], W * q), lo);
                for (int p = 0; p < P; p++) ai[r][p] = _mm512_dpbusd_epi32(ai[r][p], part, xv[p]);
            }
        }
        // the float factor of each int32 lane: its group's (lane_group: minus the block's first group)
        const __m512i idx = _mm512_loadu_si512((const void *)(lane_group + B / 4));
        const int64_t g0 = B / bpg;
        __m512 fx[MAX_P];
        for (int p = 0; p < P; p++) fx[p] = _mm512_permutexvar_ps(idx, _mm512_loadu_ps(xs[p] + g0));
        for (int r = 0; r < R; r++) {
            const __m512 fr = _mm512_permutexvar_ps(idx, _mm512_loadu_ps(f[r] + g0));
            for (int p = 0; p < P; p++)
                acc[r][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ai[r][p]), _mm512_mul_ps(fr, fx[p]), acc[r][p]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int p = 0; p < P; p++) out[r][p] += _mm512_reduce_add_ps(acc[r][p]);
}

#define TILE_W(Rv, Pv)                                                                                    \
    switch (w) {                                                                                          \
        case 8: tile(j, 8, Rv, Pv, codes, row_bytes, xq, xs, f, out); break;                              \
        case 4: tile(j, 4, Rv, Pv, codes, row_bytes, xq, xs, f, out); break;                              \
        case 2: tile(j, 2, Rv, Pv, codes, row_bytes, xq, xs, f, out); break;                              \
        default: tile(j, 1, Rv, Pv, codes, row_bytes, xq, xs, f, out); break;                             \
    }

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Rows [n0, n1) of expert e (codes: its q{b} rows) times its pairs `pairs` [np].
static void expert_rows(const job_t *j, int64_t e, int b, const uint8_t *codes_e, const int64_t *pairs,
                        int64_t np, int64_t n0, int64_t n1, float *buf) {
    const int64_t G = j->G, G16 = (G + 15) / 16 * 16, K = j->K, row_bytes = K * b / 8;
    // buf: per row of the block, scale as float and scale * zero [G16 + 16 each], and per plane
    // scale * 2**offset [2][G16 + 16]
    for (int64_t nb = n0; nb < n1; nb += ROW_BLOCK) {
        const int64_t ne = min64(nb + ROW_BLOCK, n1);
        for (int64_t n = nb; n < ne; n++) {
            float *sf = buf + (n - nb) * 4 * (G16 + 16), *sz = sf + (G16 + 16);
            const uint16_t *sc = j->scale + (e * j->N + n) * G;
            const uint8_t *z = j->zero + (e * j->N + n) * G;
            for (int64_t g = 0; g < G; g += 16) {
                const __mmask16 m = G - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (G - g)) - 1);
                const __m512 s16 = _mm512_maskz_cvtph_ps(m, _mm256_maskz_loadu_epi16(m, sc + g));
                const __m512 z16 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, z + g)));
                _mm512_store_ps(sf + g, s16);
                _mm512_store_ps(sz + g, _mm512_mul_ps(s16, z16));
            }
            for (int i = 0; i < 2; i++) {
                const int off = j->planes[(b * 2 + i) * 2], w = j->planes[(b * 2 + i) * 2 + 1];
                if (!w) break;
                float *fp = sz + (1 + i) * (G16 + 16);
                const __m512 pow2 = _mm512_set1_ps((float)(1 << off));
                for (int64_t g = 0; g < G16; g += 16) _mm512_store_ps(fp + g, _mm512_mul_ps(_mm512_load_ps(sf + g), pow2));
            }
        }
        for (int64_t p0 = 0; p0 < np; p0 += MAX_P) {
            const int P = (int)min64(MAX_P, np - p0), RMAX = P <= 2 ? 4 : 2;
            for (int64_t n = nb; n < ne;) {
                const int R = n + RMAX <= ne ? RMAX : 1;
                float out[4][MAX_P];
                const uint8_t *codes[4];
                const float *f[4], *xs[MAX_P];
                const int8_t *xq[MAX_P];
                for (int r = 0; r < R; r++) {
                    const float *sz = buf + (n + r - nb) * 4 * (G16 + 16) + (G16 + 16);
                    codes[r] = codes_e + (n + r) * row_bytes;
                    for (int p = 0; p < P; p++) {           // the zero-point term
                        const float *xsum = j->xsum + pairs[p0 + p] * G;
                        __m512 zt = _mm512_setzero_ps();
                        for (int64_t g = 0; g < G; g += 16) {
                            const __mmask16 m = G - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (G - g)) - 1);
                            zt = _mm512_fmadd_ps(_mm512_load_ps(sz + g), _mm512_maskz_loadu_ps(m, xsum + g), zt);
                        }
                        out[r][p] = -_mm512_reduce_add_ps(zt);
                    }
                }
                for (int p = 0; p < P; p++) xs[p] = j->xs + pairs[p0 + p] * (G + 16);
                for (int i = 0; i < 2; i++) {
                    const int w = j->planes[(b * 2 + i) * 2 + 1];
                    if (!w) break;
                    for (int r = 0; r < R; r++) f[r] = buf + (n + r - nb) * 4 * (G16 + 16) + (2 + i) * (G16 + 16);
                    for (int p = 0; p < P; p++) xq[p] = j->xq[w] + pairs[p0 + p] * K;   // K bytes per pair
                    if (R == 4 && P == 1) { TILE_W(4, 1) }
                    else if (R == 4) { TILE_W(4, 2) }
                    else if (R == 2 && P == 3) { TILE_W(2, 3) }
                    else if (R == 2) { TILE_W(2, 4) }
                    else if (P == 1) { TILE_W(1, 1) }
                    else if (P == 2) { TILE_W(1, 2) }
                    else if (P == 3) { TILE_W(1, 3) }
                    else { TILE_W(1, 4) }
                    for (int r = 0; r < R; r++) codes[r] += K * w / 8;
                }
                for (int r = 0; r < R; r++)
                    for (int p = 0; p < P; p++) j->y[pairs[p0 + p] * j->N + n + r] = out[r][p];
                n += R;
            }
        }
    }
}

// x [S, K] (float32, or bfloat16 when x_bf16) -> per pair and group xs = max |x| / 127 ([S, G + 16]), x8 = round(x / xs),
// xsum = sum of x8 * xs; x8 rearranged per plane width w into xq[w] [S, 8 / w, K * w / 8] (byte j of part p:
// the input of code p of plane byte j, packing.py's layout with L = lanes bytes per chunk).
static void quantize_x(const job_t *j, const void *x, int x_bf16, int lanes, int8_t *x8, float *xs, float *xsum,
                       int8_t *const *xq) {
    const int64_t S = j->S, K = j->K, G = j->G, gs = j->gs;
    for (int64_t s = 0; s < S; s++)
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
        for (int64_t s = 0; s < S; s++)
            for (int p = 0; p < c; p++) {
                int8_t *out = xq[w] + (s * c + p) * nbytes;                  // byte (g, h, l) of the plane
                for (int64_t g = 0; g < G; g++)
                    for (int64_t h = 0; h < chunks; h++, out += lanes)
                        memcpy(out, x8 + s * K + g * gs + (h * c + p) * lanes, lanes);
            }
    }
}

// y [S, N] = the pairs' experts times x. expert_meta [E][2]: (bit-width, position among the experts of that
// width); width_base[b], width_stride[b]: address of q{b} and bytes per expert in it; lane_group[w]: see job_t.
// Returns 0; -1 when its scratch memory could not be had (y is then undefined).
int dynamoq_decode(int64_t S, int64_t N, int64_t K, int64_t gs, int64_t E, const void *x, int x_bf16,
                   const int64_t *ids, const int32_t *expert_meta, const int64_t *width_base,
                   const int64_t *width_stride, const int32_t *planes, const int64_t *lane_group, int lanes,
                   const uint16_t *scale, const uint8_t *zero, float *y, int threads) {
    const int64_t G = K / gs;
    job_t j = {S, N, K, G, gs, planes, {0}, {0}, NULL, NULL, scale, zero, y};
    int used[9] = {0};
    for (int64_t e = 0; e < E; e++)
        for (int i = 0; i < 2; i++) used[planes[(expert_meta[2 * e] * 2 + i) * 2 + 1]] = 1;
    // scratch: pairs by expert (counting sort), xs (padded), xsum, x8, xq per plane width
    size_t bytes = sizeof(int64_t) * (size_t)(S + E + 1) + sizeof(float) * (size_t)S * (2 * G + 16) + (size_t)S * K + 64;
    for (int w = 1; w <= 8; w *= 2) if (used[w]) bytes += (size_t)S * K + 64;
    char *scratch = (char *)calloc(bytes, 1), *p = scratch;
    if (!scratch) return -1;
    int64_t *order = (int64_t *)p; p += S * sizeof(int64_t);
    int64_t *start = (int64_t *)p; p += (E + 1) * sizeof(int64_t);
    float *xs = (float *)p; p += S * (G + 16) * sizeof(float);
    float *xsum = (float *)p; p += S * G * sizeof(float);
    int8_t *x8 = (int8_t *)p; p += S * K;
    int8_t *xq[9] = {0};
    for (int w = 1; w <= 8; w *= 2) if (used[w]) { xq[w] = (int8_t *)p; p += S * K; }
    for (int64_t s = 0; s < S; s++) {
        const int64_t e = ids[s] < 0 ? 0 : ids[s] >= E ? E - 1 : ids[s];
        start[e + 1]++;
    }
    for (int64_t e = 0; e < E; e++) start[e + 1] += start[e];
    {
        int64_t *fill = (int64_t *)calloc(E, sizeof(int64_t));
        if (!fill) { free(scratch); return -1; }
        for (int64_t s = 0; s < S; s++) {
            const int64_t e = ids[s] < 0 ? 0 : ids[s] >= E ? E - 1 : ids[s];
            order[start[e] + fill[e]++] = s;
        }
        free(fill);
    }
    j.xs = xs;
    j.xsum = xsum;
    quantize_x(&j, x, x_bf16, lanes, x8, xs, xsum, xq);
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
        const int64_t n0 = N * t / T, n1 = N * (t + 1) / T, G16 = (G + 15) / 16 * 16;
        float *buf = (float *)aligned_alloc(64, sizeof(float) * ROW_BLOCK * 4 * (G16 + 16));
        if (!buf) {
            #pragma omp atomic write
            failed = 1;
        } else {
            memset(buf, 0, sizeof(float) * ROW_BLOCK * 4 * (G16 + 16));
            for (int64_t e = 0; e < E; e++) {
                if (start[e + 1] == start[e]) continue;
                const int b = expert_meta[2 * e];
                const uint8_t *codes_e = (const uint8_t *)(intptr_t)width_base[b] + expert_meta[2 * e + 1] * width_stride[b];
                expert_rows(&j, e, b, codes_e, order + start[e], start[e + 1] - start[e], n0, n1, buf);
            }
            free(buf);
        }
    }
    free(scratch);
    return failed ? -1 : 0;
}
