// The decode product of packed low-bit experts with AVX-512 VNNI (see native.py for the contract).
//
// y[s, n] = sum_k scale[e, n, g(k)] * (q[e, n, k] - zero[e, n, g(k)]) * x[s, k],  e = the pair's expert,
// with x[s] quantized per group to int8 (x ~= xs[s, g] * x8[s, k]), so that the codes (unsigned bytes
// after a shift and a mask) and x8 (signed bytes) meet in vpdpbusd: 64 products per instruction,
// summed in fours into 16 int32 lanes. Per 64-byte block of a plane the int32 lanes are scaled by their
// group's scale * xs * 2**offset (a lane's 4 bytes lie in one group) and added to 16 float lanes.
// The zero point enters once per group: - scale * zero * sum_k x[s, k] (exact float sums of x).
//
// Plane layout (packing.py): a plane of width w holds K * w / 8 bytes per row, c = 8 / w codes per byte;
// byte j holds the codes of c inputs at bits w * p; xq[s, p, j] is the int8 input that part p of byte j
// multiplies (rearranged by the caller), so part p of a block of 64 code bytes meets 64 contiguous xq.
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include <math.h>

typedef struct {
    int64_t S, N, K, G, gs;
    const uint8_t **pair_codes;     // [S] the pair's expert's codes (uint8 [N, K * b / 8])
    const int32_t *pair_bits;       // [S] its bit-width
    const int64_t *pair_expert;     // [S] its row in scale / zero
    const int32_t *planes;          // [9][2][2]: for bit-width b, up to two planes (offset, width); width 0: none
    const int8_t *xq[9];            // [w] -> [S, 8 / w, K * w / 8] int8 (null where no plane has width w)
    const int32_t *lane_group[9];   // [w] -> [K * w / 32 rounded up to 16] group of each int32 lane, minus its block's first group
    const float *xs;                // [S, G]
    const float *xsum;              // [S, G]
    const uint16_t *scale;          // [E, N, G] float16
    const uint8_t *zero;            // [E, N, G]
    float *y;                       // [S, N]
    int64_t begin, end;             // rows s * N + n of this thread
} job_t;

// R rows n0..n0+R-1 of one pair at once (R independent chains of vpdpbusd; x loaded once for all R):
// one plane of width W, bytes at codes[r], factors f[r] -> out[r] += sum over the plane.
// Code bytes are prefetched this many rows ahead (a row of the pair's expert is `ahead` bytes further on):
// the hardware prefetcher alone left one core at 5.5 GB/s from memory against 14 from cache.
#ifndef PREFETCH_ROWS
#define PREFETCH_ROWS 8
#endif

static inline __attribute__((always_inline)) void plane_rows(const job_t *j, const int W, const int R,
                                                             const uint8_t *const *codes, int64_t row_bytes,
                                                             const int8_t *xq, const float *const *f, float *out) {
    const int64_t nbytes = j->K * W / 8, bpg = j->gs * W / 8;
    const int c = 8 / W;
    const int32_t *lane_group = j->lane_group[W];
    const __m512i lo = _mm512_set1_epi8((char)((1 << W) - 1));
    __m512 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t B = 0; B < nbytes; B += 64) {
        const __mmask64 m = nbytes - B >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (nbytes - B)) - 1);
        __m512i v[4], ai[4];
        for (int r = 0; r < R; r++) {
            _mm_prefetch((const char *)codes[r] + B + PREFETCH_ROWS * row_bytes, _MM_HINT_T0);
            v[r] = _mm512_maskz_loadu_epi8(m, codes[r] + B);
            ai[r] = _mm512_setzero_si512();
        }
        for (int p = 0; p < c; p++) {
            const __m512i xv = _mm512_maskz_loadu_epi8(m, xq + p * nbytes + B);
            for (int r = 0; r < R; r++) {
                const __m512i part = W == 8 ? v[r] : _mm512_and_si512(_mm512_srli_epi16(v[r], W * p), lo);
                ai[r] = _mm512_dpbusd_epi32(ai[r], part, xv);
            }
        }
        // the float factor of each int32 lane: f[its group] (lane_group: minus the block's first group)
        const __m512i idx = _mm512_loadu_si512((const void *)(lane_group + B / 4));
        for (int r = 0; r < R; r++)
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ai[r]),
                                     _mm512_permutexvar_ps(idx, _mm512_loadu_ps(f[r] + B / bpg)), acc[r]);
    }
    for (int r = 0; r < R; r++) out[r] += _mm512_reduce_add_ps(acc[r]);
}

#define PLANE_CASES(R)                                                                                    \
    switch (w) {                                                                                          \
        case 8: plane_rows(j, 8, R, codes, row_bytes, xq, f, out); break;                                            \
        case 4: plane_rows(j, 4, R, codes, row_bytes, xq, f, out); break;                                            \
        case 2: plane_rows(j, 2, R, codes, row_bytes, xq, f, out); break;                                            \
        default: plane_rows(j, 1, R, codes, row_bytes, xq, f, out); break;                                           \
    }

// rows s * N + n0 .. + R - 1 (one pair, R <= 4) -> y
static void rows(const job_t *j, int64_t s, int64_t n0, int R, float *buf) {
    const int64_t G = j->G, G16 = (G + 15) / 16 * 16, e = j->pair_expert[s];
    const int b = j->pair_bits[s];
    const float *xs = j->xs + s * G, *xsum = j->xsum + s * G;
    const uint8_t *codes[4];
    const float *f[4];
    float *sf[4], out[4];
    for (int r = 0; r < R; r++) {
        const int64_t n = n0 + r;
        const uint16_t *sc = j->scale + (e * j->N + n) * G;
        const uint8_t *z = j->zero + (e * j->N + n) * G;
        sf[r] = buf + r * 2 * (G16 + 16);
        f[r] = sf[r] + G16 + 16;
        codes[r] = j->pair_codes[s] + n * (j->K * b / 8);
        __m512 zt = _mm512_setzero_ps();
        for (int64_t g = 0; g < G; g += 16) {                 // scales to float; the zero-point term
            __mmask16 m = G - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (G - g)) - 1);
            __m512 s16 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, sc + g));
            __m512 z16 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, z + g)));
            _mm512_store_ps(sf[r] + g, s16);
            zt = _mm512_fmadd_ps(_mm512_mul_ps(s16, z16), _mm512_maskz_loadu_ps(m, xsum + g), zt);
        }
        out[r] = -_mm512_reduce_add_ps(zt);
    }
    const int8_t *xq;
    const int64_t row_bytes = j->K * b / 8;
    for (int i = 0; i < 2; i++) {
        const int off = j->planes[(b * 2 + i) * 2], w = j->planes[(b * 2 + i) * 2 + 1];
        if (!w) break;
        const __m512 pow2 = _mm512_set1_ps((float)(1 << off));
        for (int r = 0; r < R; r++)
            for (int64_t g = 0; g < G; g += 16) {
                __mmask16 m = G - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (G - g)) - 1);
                _mm512_store_ps((float *)f[r] + g, _mm512_maskz_mul_ps(m, _mm512_mul_ps(_mm512_load_ps(sf[r] + g), pow2),
                                                                     _mm512_maskz_loadu_ps(m, xs + g)));
            }
        xq = j->xq[w] + s * j->K;                               // [8 / w, K * w / 8] = K bytes per pair
        if (R == 4) { PLANE_CASES(4) } else { PLANE_CASES(1) }
        for (int r = 0; r < R; r++) codes[r] += j->K * w / 8;
    }
    for (int r = 0; r < R; r++) j->y[s * j->N + n0 + r] = out[r];
}

static void *run(void *arg) {
    const job_t *j = (const job_t *)arg;
    const int64_t G16 = (j->G + 15) / 16 * 16;
    float *buf = (float *)aligned_alloc(64, sizeof(float) * (G16 + 16) * 2 * 4);
    memset(buf, 0, sizeof(float) * (G16 + 16) * 2 * 4);
    for (int64_t r = j->begin; r < j->end;) {
        const int64_t s = r / j->N, n = r % j->N;
        const int R = (n + 4 <= j->N && r + 4 <= j->end) ? 4 : 1;
        rows(j, s, n, R, buf);
        r += R;
    }
    free(buf);
    return NULL;
}

// x [S, K] (float32, or bfloat16 when x_bf16) -> per pair and group xs = max |x| / 127, x8 = round(x / xs),
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
            xs[s * G + g] = sc;
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
    job_t base = {S, N, K, G, gs, NULL, NULL, NULL, planes, {0}, {0}, NULL, NULL, scale, zero, y, 0, S * N};
    int used[9] = {0};
    for (int64_t e = 0; e < E; e++)
        for (int i = 0; i < 2; i++) used[planes[(expert_meta[2 * e] * 2 + i) * 2 + 1]] = 1;
    // one scratch block: pair tables, x8, xs, xsum, xq per plane width
    const size_t tables = (size_t)S * (sizeof(void *) + sizeof(int32_t) + sizeof(int64_t));
    size_t bytes = tables + (size_t)S * K + 2 * sizeof(float) * (size_t)S * G + 64 * 8;
    for (int w = 1; w <= 8; w *= 2) if (used[w]) bytes += (size_t)S * K + 64;
    char *scratch = (char *)malloc(bytes), *p = scratch;
    if (!scratch) return -1;
    const uint8_t **pair_codes = (const uint8_t **)p; p += S * sizeof(void *);
    int64_t *pair_expert = (int64_t *)p; p += S * sizeof(int64_t);
    int32_t *pair_bits = (int32_t *)p; p += S * sizeof(int32_t);
    float *xs = (float *)p; p += S * G * sizeof(float);
    float *xsum = (float *)p; p += S * G * sizeof(float);
    int8_t *x8 = (int8_t *)p; p += S * K;
    int8_t *xq[9] = {0};
    for (int w = 1; w <= 8; w *= 2) if (used[w]) { xq[w] = (int8_t *)p; p += S * K; }
    for (int64_t s = 0; s < S; s++) {
        int64_t e = ids[s] < 0 ? 0 : ids[s] >= E ? E - 1 : ids[s];
        const int b = expert_meta[2 * e];
        pair_expert[s] = e;
        pair_bits[s] = b;
        pair_codes[s] = (const uint8_t *)(intptr_t)width_base[b] + expert_meta[2 * e + 1] * width_stride[b];
    }
    base.pair_codes = pair_codes;
    base.pair_bits = pair_bits;
    base.pair_expert = pair_expert;
    base.xs = xs;
    base.xsum = xsum;
    quantize_x(&base, x, x_bf16, lanes, x8, xs, xsum, xq);
    for (int w = 0; w < 9; w++) {
        base.xq[w] = xq[w];
        base.lane_group[w] = (const int32_t *)(intptr_t)lane_group[w];
    }
    // OpenMP: the same runtime (libgomp) and thread pool as torch's own kernels, which it finds loaded
    const int64_t rows = S * N;
    if (threads < 1) threads = 1;
    if (rows < 64 * threads) threads = rows >= 64 ? (int)(rows / 64) : 1;
    #pragma omp parallel num_threads(threads)
    {
        job_t job = base;
        const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
        job.begin = rows * t / T;
        job.end = rows * (t + 1) / T;
        run(&job);
    }
    free(scratch);
    return 0;
}
