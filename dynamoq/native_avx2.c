// The product of packed low-bit experts with token-expert pairs, with AVX2 and FMA (see native.py): the same
// operator, arguments and result (up to the order of float additions) as native_decode.c, for x86-64 CPUs
// without AVX-512 VNNI (AMD Zen 2 and 3, Intel client cores before Ice Lake).
//
// y[s, n] = sum_k scale[e, n, g(k)] * (q[e, n, k] - zero[e, n, g(k)]) * x[s, k], x quantized per group to int8
// as native_decode.c does (x ~= xs[s, g] * x8[s, k]). vpmaddubsw multiplies 32 unsigned code bytes by 32
// signed x8 and adds neighbours into 16 int16; the parts of one 32-byte block of a plane add up in int16 without
// overflow (8 parts of 1-bit codes: 8 * 2 * 1 * 127; 4 of 2-bit: 4 * 2 * 3 * 127; 2 of 4-bit: 2 * 2 * 15 * 127),
// then vpmaddwd with ones makes 8 int32 lanes. 8-bit codes are split into two 4-bit halves (255 * 2 * 127 would
// overflow int16), the high one summed with weight 16. A plane's int32 lanes meet scale * 2**offset (* xs) in
// float once per group where groups are whole 32-byte blocks, else once per block with each lane's group's.
// The zero point enters once per group: - scale * zero * sum_k x8 * xs. No AMX path (no AMX on these CPUs).
//
// Plane layout (packing.py): byte j of a plane of width w holds the codes of 8 / w inputs at bits w * p; xq[s, p, j]
// is the int8 input that part p of byte j multiplies, so part p of 32 code bytes meets 32 contiguous xq bytes.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PREFETCH_BYTES 16384     // code bytes prefetched ahead, into L2 (native_decode.c: 8 KB; this build, bound by
                                 // its vector work, was not measured with less)
#define ROW_BLOCK 32             // rows whose factors are made at once
#define MAX_P 4                  // pairs of one expert per tile
#define AI __attribute__((always_inline))

int dynamoq_amx_min_pairs = 4;   // the AVX-512 build's knobs, here without an AMX path
int dynamoq_cache_after = 0;
int dynamoq_amx_ready(void) { return 0; }
int dynamoq_amx_init(void) { return 0; }

typedef struct {
    int64_t N, K, G, gs, per;      // per: pairs per row of x (pair s reads row s / per)
    const int32_t *planes;         // [9][2][2]: bit-width b -> up to two planes (offset, width); width 0: none
    const int8_t *xq[9];           // [w] -> [X, 8 / w, K * w / 8] int8 (8 bits: [X, 1, K])
    const int32_t *lane_group[9];  // [w] -> group of each int32 lane of a plane minus its 32-byte block's first
    const float *xs, *xsum;        // [X, G + 8] (zero padded for whole-vector loads)
    const uint16_t *scale;         // [E, N, G] float16
    const uint8_t *zero;           // [E, N, G]
    float *y;                      // [S, N]
    // the switching cache, as in native_decode.c (none: cache_delta NULL); xg [S, rpad], rpad = r rounded up to 8
    const void *cache_delta;
    int64_t r, rpad;
    int delta_type;
    const uint8_t *cache_on;        // [E] whether expert e's correction is not all zero (the others are skipped)
    const float *xg;
} job_t;

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t xrow(const job_t *j, int64_t s) { return s / j->per; }
static inline int64_t padded(int64_t g) { return (g + 7) / 8 * 8 + 8; }   // G rounded up to 8, plus 8

// The first n of 8 int32 lanes set (a tail of code bytes: whole int32 lanes, as native.supports() asks).
static inline __m256i first8(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n > 8 ? 8 : n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// The switching cache (see native_decode.c): columns [8 c, 8 c + 8) of row n of expert e's cache_delta as float,
// zero past r.
static inline __m256 delta8(const job_t *j, int64_t e, int64_t n, int64_t c) {
    const int64_t at = (e * j->N + n) * j->r + 8 * c, left = j->r - 8 * c;
    if (j->delta_type == 2) return _mm256_maskload_ps((const float *)j->cache_delta + at, first8(left));
    uint16_t h[8] = {0};
    memcpy(h, (const uint16_t *)j->cache_delta + at, sizeof(uint16_t) * (size_t)(left < 8 ? left : 8));
    const __m128i v = _mm_loadu_si128((const __m128i *)h);
    return j->delta_type == 0 ? _mm256_cvtph_ps(v) : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

// acc[r][p] += the cache's correction of row n + r for pair pairs[p], in 8 lanes.
static inline void cache_lanes(const job_t *j, int64_t e, int64_t n, int R, int P, const int64_t *pairs,
                               __m256 acc[4][MAX_P]) {
    if (!j->cache_delta || !j->cache_on[e]) return;
    for (int64_t c = 0; c < j->rpad / 8; c++)
        for (int r = 0; r < R; r++) {
            const __m256 d = delta8(j, e, n + r, c);
            for (int p = 0; p < P; p++)
                acc[r][p] = _mm256_fmadd_ps(d, _mm256_loadu_ps(j->xg + pairs[p] * j->rpad + 8 * c), acc[r][p]);
        }
}

// One plane of width W for a tile of R rows (code bytes codes[r], factors f[r][g]: scale * 2**offset, times the
// pair's xs when folded) and P pairs (x bytes xq[p], scales xs[p]): acc[r][p] += the plane's share, in 8 lanes.
static inline AI void tile(const job_t *j, const int W, const int R, const int P, const int whole, const int folded,
                           const uint8_t *const *codes, int64_t ahead, const int8_t *const *xq,
                           const float *const *xs, const float *const *f, __m256 acc[4][MAX_P]) {
    const int64_t nbytes = j->K * W / 8, bpg = j->gs * W / 8, per = whole ? bpg / 32 : 1;
    const int c = W == 8 ? 2 : 8 / W;                    // parts of a byte (8 bits: two halves of one input)
    const __m256i lo = _mm256_set1_epi8((char)(W == 8 ? 15 : (1 << W) - 1)), ones = _mm256_set1_epi16(1);
    const int32_t *lane_group = j->lane_group[W];
    // Local copies, as in native_decode.c: stores to acc may alias the pointers, which were then reloaded per block.
    const uint8_t *cr[4];
    const float *fr_[4], *xs_[MAX_P];
    const int8_t *xq_[MAX_P];
    __m256i ai[4][MAX_P];
    __m256 a[4][MAX_P];
    for (int r = 0; r < R; r++) {
        cr[r] = codes[r];
        fr_[r] = f[r];
        for (int p = 0; p < P; p++) ai[r][p] = _mm256_setzero_si256(), a[r][p] = acc[r][p];
    }
    for (int p = 0; p < P; p++) xq_[p] = xq[p], xs_[p] = folded ? NULL : xs[p];
    // Not whole: the block's first group g0 = B / bpg without a division per block; where bpg divides 32 every
    // block has the same lanes' groups.
    const int64_t step = 32 % bpg == 0 ? 32 / bpg : 0;
    const __m256i idx0 = whole ? _mm256_setzero_si256() : _mm256_loadu_si256((const __m256i *)lane_group);
    int64_t left = per, g = 0, g0 = 0, rem = 0;
    for (int64_t B = 0; B < nbytes; B += 32) {
        const int64_t rest = nbytes - B;
        __m256i v[4];
        for (int r = 0; r < R; r++) {
            if (B % 64 == 0) _mm_prefetch((const char *)cr[r] + B + ahead, _MM_HINT_T1);
            v[r] = rest >= 32 ? _mm256_loadu_si256((const __m256i *)(cr[r] + B))
                              : _mm256_maskload_epi32((const int *)(cr[r] + B), first8(rest / 4));
        }
        __m256i s[4][MAX_P];
        for (int q = 0; q < c; q++) {
            __m256i xv[MAX_P];
            for (int p = 0; p < P; p++) xv[p] = _mm256_loadu_si256((const __m256i *)(xq_[p] + (W == 8 ? 0 : q * nbytes) + B));
            for (int r = 0; r < R; r++) {
                const int sh = W == 8 ? 4 * q : W * q;
                const __m256i part = _mm256_and_si256(sh ? _mm256_srli_epi16(v[r], sh) : v[r], lo);
                for (int p = 0; p < P; p++) {
                    const __m256i prod = _mm256_maddubs_epi16(part, xv[p]);
                    if (W == 8)         // the high half weighs 16
                        ai[r][p] = _mm256_add_epi32(ai[r][p], _mm256_madd_epi16(prod, _mm256_set1_epi16(q ? 16 : 1)));
                    else
                        s[r][p] = q ? _mm256_add_epi16(s[r][p], prod) : prod;
                }
            }
        }
        if (W != 8)
            for (int r = 0; r < R; r++)
                for (int p = 0; p < P; p++) ai[r][p] = _mm256_add_epi32(ai[r][p], _mm256_madd_epi16(s[r][p], ones));
        __m256 fx[MAX_P], fr[4];
        if (whole) {
            if (--left) continue;
            left = per;
            for (int p = 0; p < P && !folded; p++) fx[p] = _mm256_set1_ps(xs_[p][g]);
            for (int r = 0; r < R; r++) fr[r] = _mm256_set1_ps(fr_[r][g]);
            g++;
        } else {            // each lane's group, relative to the block's first
            const __m256i idx = step ? idx0 : _mm256_loadu_si256((const __m256i *)(lane_group + B / 4));
            for (int p = 0; p < P && !folded; p++) fx[p] = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xs_[p] + g0), idx);
            for (int r = 0; r < R; r++) fr[r] = _mm256_permutevar8x32_ps(_mm256_loadu_ps(fr_[r] + g0), idx);
            if (step) {
                g0 += step;
            } else {
                for (rem += 32; rem >= bpg; rem -= bpg) g0++;
            }
        }
        for (int r = 0; r < R; r++)
            for (int p = 0; p < P; p++) {
                a[r][p] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ai[r][p]), folded ? fr[r] : _mm256_mul_ps(fr[r], fx[p]),
                                          a[r][p]);
                ai[r][p] = _mm256_setzero_si256();
            }
    }
    for (int r = 0; r < R; r++)
        for (int p = 0; p < P; p++) acc[r][p] = a[r][p];
}

#define TILE_W(Rv, Pv, folded)                                                                               \
    switch (w * 2 + whole) {                                                                                 \
        case 16: tile(j, 8, Rv, Pv, 0, folded, codes, ahead, xq, xs, f, acc); break;                       \
        case 17: tile(j, 8, Rv, Pv, 1, folded, codes, ahead, xq, xs, f, acc); break;                       \
        case 8: tile(j, 4, Rv, Pv, 0, folded, codes, ahead, xq, xs, f, acc); break;                        \
        case 9: tile(j, 4, Rv, Pv, 1, folded, codes, ahead, xq, xs, f, acc); break;                        \
        case 4: tile(j, 2, Rv, Pv, 0, folded, codes, ahead, xq, xs, f, acc); break;                        \
        case 5: tile(j, 2, Rv, Pv, 1, folded, codes, ahead, xq, xs, f, acc); break;                        \
        case 2: tile(j, 1, Rv, Pv, 0, folded, codes, ahead, xq, xs, f, acc); break;                        \
        default: tile(j, 1, Rv, Pv, 1, folded, codes, ahead, xq, xs, f, acc); break;                       \
    }

// Per row n of [nb, ne) of expert e (bit-width b), in buf [ROW_BLOCK][3][padded(G)]: per plane i scale * 2**offset
// (times fold[g], the one pair's xs, where fold is given), and scale * zero.
static void block_factors(const job_t *j, int64_t e, int b, int64_t nb, int64_t ne, const float *fold, float *buf) {
    const int64_t G = j->G, Gp = padded(G);
    for (int64_t n = nb; n < ne; n++) {
        float *fb = buf + (n - nb) * 3 * Gp;
        const uint16_t *sc = j->scale + (e * j->N + n) * G;
        const uint8_t *zp = j->zero + (e * j->N + n) * G;
        for (int64_t g = G; g < Gp; g++) fb[g] = fb[Gp + g] = fb[2 * Gp + g] = 0.0f;   // read, never used
        for (int64_t g = 0; g < G; g++) {
            const float s = _cvtsh_ss(sc[g]);
            fb[2 * Gp + g] = s * (float)zp[g];
            for (int i = 0; i < 2; i++)
                fb[i * Gp + g] = s * (float)(1 << j->planes[(b * 2 + i) * 2]) * (fold ? fold[g] : 1.0f);
        }
    }
}

// Rows [n0, n1) of expert e (codes_e: its q{b} rows) times its pairs [np].
static void expert_rows(const job_t *j, int64_t e, int b, const uint8_t *codes_e, const int64_t *pairs, int64_t np,
                        int64_t n0, int64_t n1, float *buf) {
    const int64_t G = j->G, Gp = padded(G), K = j->K, row_bytes = K * b / 8;
    const int64_t ahead = (PREFETCH_BYTES + row_bytes - 1) / row_bytes * row_bytes;
    const int folded = np == 1;
    for (int64_t nb = n0; nb < n1; nb += ROW_BLOCK) {
        const int64_t ne = min64(nb + ROW_BLOCK, n1);
        block_factors(j, e, b, nb, ne, folded ? j->xs + xrow(j, pairs[0]) * Gp : NULL, buf);
        for (int64_t p0 = 0; p0 < np; p0 += MAX_P) {
            const int P = (int)min64(MAX_P, np - p0), RMAX = folded ? 4 : P <= 2 ? 2 : 1;
            const float *xs[MAX_P];
            for (int p = 0; p < P; p++) xs[p] = j->xs + xrow(j, pairs[p0 + p]) * Gp;
            for (int64_t n = nb; n < ne;) {
                const int R = n + RMAX <= ne ? RMAX : 1;
                __m256 acc[4][MAX_P];
                const uint8_t *codes[4];
                const float *f[4];
                const int8_t *xq[MAX_P];
                for (int r = 0; r < R; r++) {          // the zero-point term: - sum_g scale * zero * xsum
                    codes[r] = codes_e + (n + r) * row_bytes;
                    const float *sz = buf + (n + r - nb) * 3 * Gp + 2 * Gp;
                    for (int p = 0; p < P; p++) {
                        const float *xsum = j->xsum + xrow(j, pairs[p0 + p]) * Gp;
                        __m256 zt = _mm256_setzero_ps();
                        for (int64_t g = 0; g < G; g += 8)
                            zt = _mm256_fnmadd_ps(_mm256_loadu_ps(sz + g), _mm256_loadu_ps(xsum + g), zt);
                        acc[r][p] = zt;
                    }
                }
                cache_lanes(j, e, n, R, P, pairs + p0, acc);
                for (int i = 0; i < 2; i++) {
                    const int w = j->planes[(b * 2 + i) * 2 + 1];
                    if (!w) break;
                    const int whole = j->gs * w / 8 % 32 == 0;
                    for (int r = 0; r < R; r++) f[r] = buf + (n + r - nb) * 3 * Gp + i * Gp;
                    for (int p = 0; p < P; p++) xq[p] = j->xq[w] + xrow(j, pairs[p0 + p]) * K;   // K bytes a row
                    if (folded) {
                        if (R == 4) { TILE_W(4, 1, 1) } else { TILE_W(1, 1, 1) }
                    } else if (R == 2) {
                        if (P == 2) { TILE_W(2, 2, 0) } else { TILE_W(2, 1, 0) }
                    } else if (P == 2) { TILE_W(1, 2, 0) }
                    else if (P == 1) { TILE_W(1, 1, 0) }
                    else if (P == 3) { TILE_W(1, 3, 0) }
                    else { TILE_W(1, 4, 0) }
                    for (int r = 0; r < R; r++) codes[r] += K * w / 8;
                }
                for (int r = 0; r < R; r++)
                    for (int p = 0; p < P; p++) j->y[pairs[p0 + p] * j->N + n + r] = hsum8(acc[r][p]);
                n += R;
            }
        }
    }
}

// x [X, K] (float32, or bfloat16 when x_bf16) -> per row and group xs = max |x| / 127, x8 = round(x / xs) (ties to
// even), xsum = sum of x8 * xs; x8 rearranged per plane width w into xq[w] (see the top; 8 bits: x8 itself).
static void quantize_x(const job_t *j, int64_t X, const void *x, int x_bf16, int lanes, int8_t *x8, float *xs,
                       float *xsum, int8_t *const *xq) {
    const int64_t K = j->K, G = j->G, gs = j->gs, Gp = padded(G);
    for (int64_t s = 0; s < X; s++)
        for (int64_t g = 0; g < G; g++) {
            const int64_t at = s * K + g * gs;
            __m256 v[128], amax = _mm256_setzero_ps(), sum = _mm256_setzero_ps();   // gs <= 1024, a multiple of 8
            const __m256 sign = _mm256_set1_ps(-0.0f);
            for (int64_t i = 0; i < gs / 8; i++) {
                v[i] = x_bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(
                                    _mm_loadu_si128((const __m128i *)((const uint16_t *)x + at + 8 * i))), 16))
                              : _mm256_loadu_ps((const float *)x + at + 8 * i);
                amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
            }
            __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
            m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            float sc = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m))) / 127.0f;
            if (!(sc >= 1e-30f)) sc = 1e-30f;
            const __m256 scv = _mm256_set1_ps(sc);
            for (int64_t i = 0; i < gs / 8; i++) {
                const __m256 q = _mm256_round_ps(_mm256_div_ps(v[i], scv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                const __m256i q32 = _mm256_cvtps_epi32(q);
                const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q32), _mm256_extracti128_si256(q32, 1));
                _mm_storel_epi64((__m128i *)(x8 + at + 8 * i), _mm_packs_epi16(q16, q16));
                sum = _mm256_fmadd_ps(q, scv, sum);
            }
            xs[s * Gp + g] = sc;
            xsum[s * Gp + g] = hsum8(sum);
        }
    for (int w = 1; w < 8; w *= 2) {
        if (!xq[w]) continue;
        const int c = 8 / w;
        const int64_t nbytes = K * w / 8, chunks = gs / (c * lanes);
        for (int64_t s = 0; s < X; s++)
            for (int p = 0; p < c; p++) {
                int8_t *out = xq[w] + (s * c + p) * nbytes;
                for (int64_t g = 0; g < G; g++)
                    for (int64_t h = 0; h < chunks; h++, out += lanes)
                        memcpy(out, x8 + s * K + g * gs + (h * c + p) * lanes, lanes);
            }
    }
}

// Scratch memory kept from call to call, per thread (see native_decode.c). Never shrinks; zero when new.
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
static _Thread_local keep_t kept_sort, kept_main, kept_rows;

static inline int64_t expert_of(const int64_t *ids, int64_t s, int64_t E) {
    return ids[s] < 0 ? 0 : ids[s] >= E ? E - 1 : ids[s];
}

// The same contract as native_decode.c's dynamoq_decode (lane_group, its 64-byte tables, is not used: this
// kernel makes its own for 32-byte blocks). Returns 0; -1 when its scratch memory could not be had.
int dynamoq_decode(int64_t S, int64_t X, int64_t N, int64_t K, int64_t gs, int64_t E, const void *x, int x_bf16,
                   const int64_t *ids, const int32_t *expert_meta, const int64_t *width_base,
                   const int64_t *width_stride, const int32_t *planes, const int64_t *lane_group, int lanes,
                   const uint16_t *scale, const uint8_t *zero, float *y, int threads,
                   const int64_t *cache_idx, const void *cache_delta, int64_t r, int delta_type,
                   const uint8_t *cache_on) {
    (void)lane_group;
    const int64_t G = K / gs, Gp = padded(G);
    job_t j = {N, K, G, gs, X ? S / X : 1, planes, {0}, {0}, NULL, NULL, scale, zero, y};
    if (cache_delta && r > 0) {
        j.cache_delta = cache_delta;
        j.r = r;
        j.rpad = (r + 7) / 8 * 8;
        j.delta_type = delta_type;
        j.cache_on = cache_on;
    }
    // pairs by expert (counting sort: start [E + 1], fill [E], order [S])
    int64_t *start = (int64_t *)kept(&kept_sort, sizeof(int64_t) * (size_t)(2 * E + 1 + S));
    if (!start) return -1;
    int64_t *fill = start + E + 1, *order = fill + E;
    memset(start, 0, sizeof(int64_t) * (size_t)(2 * E + 1));
    for (int64_t s = 0; s < S; s++) start[expert_of(ids, s, E) + 1]++;
    int used[9] = {0};
    for (int64_t e = 0; e < E; e++) {
        for (int i = 0; i < 2 && start[e + 1]; i++) used[planes[(expert_meta[2 * e] * 2 + i) * 2 + 1]] = 1;
        start[e + 1] += start[e];
    }
    for (int64_t s = 0; s < S; s++) {
        const int64_t e = expert_of(ids, s, E);
        order[start[e] + fill[e]++] = s;
    }
    // scratch: xs, xsum (padded), x8, xq per plane width (+ 32 bytes: whole-block loads), lane tables, the cache's xg
    size_t bytes = sizeof(float) * (size_t)X * 2 * Gp + (size_t)X * K + 64 + sizeof(float) * (size_t)(S * j.rpad);
    for (int w = 1; w <= 8; w *= 2) if (used[w]) bytes += (size_t)X * K + 64 + sizeof(int32_t) * (size_t)(K * w / 32 + 8);
    char *p = (char *)kept(&kept_main, bytes);
    if (!p) return -1;
    memset(p, 0, sizeof(float) * (size_t)X * 2 * Gp);
    float *xs = (float *)p; p += sizeof(float) * X * Gp;
    float *xsum = (float *)p; p += sizeof(float) * X * Gp;
    int8_t *x8 = (int8_t *)p; p += X * K + 64;
    int8_t *xq[9] = {0};
    for (int w = 1; w <= 8; w *= 2) {
        if (!used[w]) continue;
        xq[w] = w == 8 ? x8 : (int8_t *)p;
        p += X * K + 64;
        int32_t *t = (int32_t *)p;                      // lane l of a plane: its group minus its block's first
        const int64_t lanes_w = K * w / 32, bpg = gs * w / 8;
        for (int64_t l = 0; l < lanes_w + 8; l++) t[l] = l < lanes_w ? (int32_t)(4 * l / bpg - 32 * (l / 8) / bpg) : 0;
        j.lane_group[w] = t;
        p += sizeof(int32_t) * (K * w / 32 + 8);
    }
    quantize_x(&j, X, x, x_bf16, lanes, x8, xs, xsum, xq);
    if (j.cache_delta) {                                // each pair's x8 * xs at its expert's cached channels
        float *xg = (float *)p;
        for (int64_t s = 0; s < S; s++) {
            const int64_t e = expert_of(ids, s, E), row = xrow(&j, s);
            for (int64_t i = 0; i < j.rpad; i++) {
                const int64_t k = i < r ? cache_idx[e * r + i] : -1;
                xg[s * j.rpad + i] = k < 0 ? 0.0f : (float)x8[row * K + k] * xs[row * Gp + k / gs];
            }
        }
        j.xg = xg;
    }
    j.xs = xs;
    j.xsum = xsum;
    for (int w = 0; w < 9; w++) j.xq[w] = xq[w];
    if (threads < 1) threads = 1;
    if (N < 64 * threads) threads = N >= 64 ? (int)(N / 64) : 1;
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
        const int64_t n0 = N * t / T, n1 = N * (t + 1) / T;
        float *buf = (float *)kept(&kept_rows, sizeof(float) * ROW_BLOCK * 3 * Gp);
        if (!buf) {
            #pragma omp atomic write
            failed = 1;
        } else {
            for (int64_t e = 0; e < E; e++) {
                const int64_t np = start[e + 1] - start[e];
                if (!np) continue;
                const int b = expert_meta[2 * e];
                const uint8_t *codes_e = (const uint8_t *)(intptr_t)width_base[b] + expert_meta[2 * e + 1] * width_stride[b];
                expert_rows(&j, e, b, codes_e, order + start[e], np, n0, n1, buf);
            }
        }
    }
    return failed ? -1 : 0;
}
