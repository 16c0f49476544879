/* W8A16 matmul on x86 SIMD (AVX-512 or AVX2+FMA): y[M, N] = x[M, K] @ (int8 weight[N, K] * scale[N]).T + bias,
 * x and y float32 or bf16 (the same dtype), scale and bias float32.
 *
 * quantmint.native compiles this file at -march=native (quantmint.backends.torch.int8_weight_only calls
 * it); one source, one path per ISA chosen by the preprocessor:
 *   __AVX512F__            16-wide (zmm), panels of 32 output channels, row blocks of up to 12
 *   __AVX2__ && __FMA__    8-wide (ymm), panels of 16 output channels, row blocks of up to 6
 *   otherwise              nothing: qm_w8a16_isa() returns 0 and Python keeps its torch path.
 *   -DQM_WANT_BF16DOT      (AVX512-BF16 CPUs) bf16 x of 4 rows or more: vdpbf16ps (below); Python passes it
 *                          on AMD CPUs with AVX512-BF16 (`bf16dot_by_default`)
 * (CPUs with AMX-BF16 serving bf16 run csrc/woq.c instead, by Python's choice.)
 *
 * The int8 weight is repacked once (`pack_weight_for_simd` in Python) into panels of NB = 2 vectors of
 * output channels, each panel [K][NB] contiguous (the last panel zero-padded), so a kernel streams one
 * panel front to back:
 *
 *     packed[ceil(N/NB)][K][NB]: element (n, k) at [n / NB][k][n % NB]
 *
 * Each k step loads NB int8 weights, widens them (vpmovsxbd + vcvtdq2ps: exact) and multiplies them
 * with x[r, k] broadcast into 2 accumulators per row (int8 * float32 is exact in an FMA; float32
 * accumulation). Decode-sized calls (up to one row block) widen in registers as they go; larger ones
 * widen each panel once into a per-thread float32 buffer (K * NB * 4 bytes: L2-sized) and run every row
 * block over it. The scale is applied once per output, then the bias, then one rounding to bf16 where
 * y is bf16. OpenMP (torch's libgomp) splits the panels among threads; each output is one thread's.
 *
 * bf16 x is widened to float32 (exact) and takes the float32 path. Built with -DQM_WANT_BF16DOT on a CPU
 * with AVX512-BF16 (Cooper Lake, Sapphire Rapids and later, AMD Zen 4 and later), calls of 4 rows or more
 * (QM_PAIRS_MIN_ROWS) take another path instead: each panel is widened once to bf16 pairs along k (int8 -> bf16
 * is exact: the top half of the float32), [ceil(K/2)][NB] 32-bit lanes holding (w[k, j], w[k+1, j]),
 * and vdpbf16ps multiplies them with
 * the bf16 pair (x[r, k], x[r, k+1]) broadcast: products of two bf16 are exact in float32 and are added to
 * float32 sums, two k per instruction instead of one. (vdpbf16ps treats subnormal inputs, |x| < 2^-126,
 * as zero and flushes subnormal sums: far below the one bf16 rounding of the output.) On AMD Zen 4 it runs
 * 1.2-2x faster than the float32 path from 4 rows up (1 to 3 rows: no faster, so they keep the float32
 * path, whose weight widens in registers with no per-panel pass); on Sapphire Rapids one vdpbf16ps costs
 * more than two FMAs and the path took 1.5-1.9x the float32 path's time, so Python builds it on AMD only
 * (docs/benchmarks.md). `benchmarks/int8_matmul.py` measures both side by side on any AVX512-BF16 CPU.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__)))
#include <immintrin.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

/* float32 -> bf16, rounded to nearest even (NaN kept quiet), as torch rounds. */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#if defined(__x86_64__) && defined(__AVX512F__)
#define QM_ISA 512
#define VW 16
#define RMAX 12
typedef __m512 vf;
#define VZERO() _mm512_setzero_ps()
#define VSET1(p) _mm512_set1_ps(*(p))
#define VLOAD(p) _mm512_loadu_ps(p)
#define VSTORE(p, v) _mm512_storeu_ps(p, v)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VADD(a, b) _mm512_add_ps(a, b)
#define VWIDEN(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#if defined(QM_WANT_BF16DOT) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#define QM_BF16DOT 1
#endif
#elif defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
#define QM_ISA 256
#define VW 8
#define RMAX 6
typedef __m256 vf;
#define VZERO() _mm256_setzero_ps()
#define VSET1(p) _mm256_broadcast_ss(p)
#define VLOAD(p) _mm256_loadu_ps(p)
#define VSTORE(p, v) _mm256_storeu_ps(p, v)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VADD(a, b) _mm256_add_ps(a, b)
#define VWIDEN(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
#endif

#ifndef QM_BF16DOT
#define QM_BF16DOT 0
#endif

#ifdef QM_ISA

#define NB (2 * VW)

/* Row-block tile: acc[r][j] += x[r, k] * w[k][j] over all k, for R rows and the NB columns of one panel,
 * with the weight either int8 (widened here) or already float32. Small R splits k over U accumulator sets
 * so that enough FMAs are independent (FMA latency, not throughput, would set the pace). Always inlined
 * into callers with a constant R, so the arrays live in registers. */
#define DEFINE_TILE(NAME, WT, WLOAD)                                                                       \
    static inline __attribute__((always_inline)) void NAME(const float *x, int64_t ldx, const WT *w,      \
                                                           int64_t k, float *out, const int R) {         \
        enum { UMAX = 4 };                                                                                 \
        const int U = R == 1 ? 4 : R == 2 ? 2 : 1;                                                         \
        vf acc[UMAX][RMAX][2];                                                                             \
        _Pragma("GCC unroll 4") for (int u = 0; u < U; u++)                                                \
        _Pragma("GCC unroll 12") for (int r = 0; r < R; r++) acc[u][r][0] = acc[u][r][1] = VZERO();         \
        int64_t c = 0;                                                                                     \
        for (; c + U <= k; c += U) {                                                                       \
            _Pragma("GCC unroll 4") for (int u = 0; u < U; u++) {                                          \
                const vf w0 = WLOAD(w + (c + u) * NB), w1 = WLOAD(w + (c + u) * NB + VW);                  \
                _Pragma("GCC unroll 12") for (int r = 0; r < R; r++) {                                     \
                    const vf xb = VSET1(x + r * ldx + c + u);                                              \
                    acc[u][r][0] = VFMA(xb, w0, acc[u][r][0]);                                             \
                    acc[u][r][1] = VFMA(xb, w1, acc[u][r][1]);                                             \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
        for (; c < k; c++) {                                                                               \
            const vf w0 = WLOAD(w + c * NB), w1 = WLOAD(w + c * NB + VW);                                  \
            _Pragma("GCC unroll 12") for (int r = 0; r < R; r++) {                                         \
                const vf xb = VSET1(x + r * ldx + c);                                                      \
                acc[0][r][0] = VFMA(xb, w0, acc[0][r][0]);                                                 \
                acc[0][r][1] = VFMA(xb, w1, acc[0][r][1]);                                                 \
            }                                                                                              \
        }                                                                                                  \
        _Pragma("GCC unroll 12") for (int r = 0; r < R; r++) {                                             \
            _Pragma("GCC unroll 4") for (int u = 1; u < U; u++) {                                          \
                acc[0][r][0] = VADD(acc[0][r][0], acc[u][r][0]);                                           \
                acc[0][r][1] = VADD(acc[0][r][1], acc[u][r][1]);                                           \
            }                                                                                              \
            VSTORE(out + r * NB, acc[0][r][0]);                                                            \
            VSTORE(out + r * NB + VW, acc[0][r][1]);                                                       \
        }                                                                                                  \
    }

DEFINE_TILE(tile_i8, int8_t, VWIDEN)
DEFINE_TILE(tile_f32, float, VLOAD)

/* One row block over one panel: dispatch on R so each tile is compiled for its constant row count. */
#define TILE_CASE(n)                                                                                       \
    case n:                                                                                                \
        if (wide) tile_f32(x, ldx, wide, k, out, n);                                                       \
        else tile_i8(x, ldx, w, k, out, n);                                                                \
        break;

static void tile(const float *x, int64_t ldx, const int8_t *w, const float *wide, int64_t k, float *out, int rows) {
    switch (rows) {
        TILE_CASE(1)
        TILE_CASE(2)
        TILE_CASE(3)
        TILE_CASE(4)
        TILE_CASE(5)
        TILE_CASE(6)
#if RMAX > 6
        TILE_CASE(7)
        TILE_CASE(8)
        TILE_CASE(9)
        TILE_CASE(10)
        TILE_CASE(11)
        TILE_CASE(12)
#endif
    }
}

#if QM_BF16DOT
/* The bf16 pair tile: acc[r][j] += x[r, 2i] * w[2i, j] + x[r, 2i+1] * w[2i+1, j] over the pairs i of a
 * panel widened by `widen_pairs`; x is bf16 (uint16) rows. An odd k's last pair is (x[r, k-1], 0) against
 * (w[k-1, j], 0): the row is never read past its end. */
static inline __attribute__((always_inline)) void tile_pairs(const uint16_t *x, int64_t ldx, const uint32_t *wp,
                                                            int64_t k, float *out, const int R) {
    __m512 acc[RMAX][2];
    _Pragma("GCC unroll 12") for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    const int64_t pairs = k / 2;
    for (int64_t i = 0; i < pairs; i++) {
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wp + i * NB);
        const __m512bh w1 = (__m512bh)_mm512_loadu_si512(wp + i * NB + VW);
        _Pragma("GCC unroll 12") for (int r = 0; r < R; r++) {
            uint32_t xp;
            memcpy(&xp, x + r * ldx + 2 * i, 4);
            const __m512bh xb = (__m512bh)_mm512_set1_epi32((int)xp);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xb, w0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xb, w1);
        }
    }
    if (k & 1) {
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wp + pairs * NB);
        const __m512bh w1 = (__m512bh)_mm512_loadu_si512(wp + pairs * NB + VW);
        _Pragma("GCC unroll 12") for (int r = 0; r < R; r++) {
            const __m512bh xb = (__m512bh)_mm512_set1_epi32((int)x[r * ldx + k - 1]);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xb, w0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xb, w1);
        }
    }
    _Pragma("GCC unroll 12") for (int r = 0; r < R; r++) {
        _mm512_storeu_ps(out + r * NB, acc[r][0]);
        _mm512_storeu_ps(out + r * NB + VW, acc[r][1]);
    }
}

#define PAIR_CASE(n)                                                                                       \
    case n:                                                                                                \
        tile_pairs(x, ldx, wp, k, out, n);                                                                 \
        break;

static void tile_bf16(const uint16_t *x, int64_t ldx, const uint32_t *wp, int64_t k, float *out, int rows) {
    switch (rows) {
        PAIR_CASE(1)
        PAIR_CASE(2)
        PAIR_CASE(3)
        PAIR_CASE(4)
        PAIR_CASE(5)
        PAIR_CASE(6)
        PAIR_CASE(7)
        PAIR_CASE(8)
        PAIR_CASE(9)
        PAIR_CASE(10)
        PAIR_CASE(11)
        PAIR_CASE(12)
    }
}

/* One packed int8 panel [k][NB] -> bf16 pairs [ceil(k/2)][NB] (32-bit lanes: w[2i, j] in the low half,
 * w[2i+1, j] in the high half, 0 past k). An int8's bf16 is the top half of its float32, exactly. */
static void widen_pairs(const int8_t *w, int64_t k, uint32_t *wp) {
    const __mmask32 high = 0xAAAAAAAAu;
    const int64_t pairs = (k + 1) / 2;
    for (int64_t i = 0; i < pairs; i++)
        for (int h = 0; h < 2; h++) {
            const __m512i lo = _mm512_srli_epi32(_mm512_castps_si512(VWIDEN(w + 2 * i * NB + h * VW)), 16);
            const __m512i hi = 2 * i + 1 < k ? _mm512_castps_si512(VWIDEN(w + (2 * i + 1) * NB + h * VW))
                                             : _mm512_setzero_si512();
            _mm512_storeu_si512(wp + i * NB + h * VW, _mm512_mask_blend_epi16(high, lo, hi));
        }
}
#endif

/* The tile's float32 sums out: scale per column, bias, stored as float32 or rounded once to bf16. */
static void store_rows(const float *out, int rows, int cols, const float *scale, const float *bias, void *y,
                       int64_t ldy, int bf16) {
    for (int r = 0; r < rows; r++) {
        const float *o = out + r * NB;
        if (bf16) {
            uint16_t *yr = (uint16_t *)y + r * ldy;
            for (int j = 0; j < cols; j++) yr[j] = to_bf16(o[j] * scale[j] + (bias ? bias[j] : 0.0f));
        } else {
            float *yr = (float *)y + r * ldy;
            for (int j = 0; j < cols; j++) yr[j] = o[j] * scale[j] + (bias ? bias[j] : 0.0f);
        }
    }
}

static _Thread_local float *workspace;
static _Thread_local size_t workspace_elems;

static float *panel_workspace(size_t elems) {
    if (elems > workspace_elems) {
        free(workspace);
        workspace = aligned_alloc(64, (elems * sizeof(float) + 63) / 64 * 64);
        workspace_elems = workspace ? elems : 0;
    }
    return workspace;
}

/* Whether a call takes the bf16 pair path: bf16 x on an AVX512-BF16 CPU, QM_PAIRS_MIN_ROWS rows or more. */
#ifndef QM_PAIRS_MIN_ROWS
#define QM_PAIRS_MIN_ROWS 4 /* measured on Zen 4: 1-2 rows no faster than the float32 path, 4 rows 1.2-1.4x */
#endif
static int use_pairs(int bf16, int64_t m) { return QM_BF16DOT && bf16 && m >= QM_PAIRS_MIN_ROWS; }

/* One thread's share: the panels [p_lo, p_hi). x is float32, or bf16 rows where `use_pairs`. */
static int run_panels(const float *x, int64_t m, int64_t k, int64_t ldx, const int8_t *packed, int64_t n,
                      const float *scale, const float *bias, void *y, int64_t ldy, int bf16, int64_t p_lo,
                      int64_t p_hi) {
    float out[RMAX * NB] __attribute__((aligned(64)));
    float *wide = 0;
    const int pairs = use_pairs(bf16, m);
    if (m > RMAX || pairs) { /* float32 [k][NB], or (pairs) ceil(k/2) * NB 32-bit lanes: no more */
        wide = panel_workspace((size_t)k * NB);
        if (!wide) return 0;
    }
    const size_t ysize = bf16 ? 2 : 4;
    /* Rows split into equal blocks (16 rows: 8 + 8, not 12 + 4): a small last block would run its FMAs
     * with too few accumulators to hide the loads. */
    const int64_t blocks = (m + RMAX - 1) / RMAX;
    const int block = (int)((m + blocks - 1) / blocks);
    for (int64_t p = p_lo; p < p_hi; p++) {
        const int8_t *w = packed + p * k * NB;
        const int64_t n0 = p * NB;
        const int cols = n - n0 < NB ? (int)(n - n0) : NB;
#if QM_BF16DOT
        if (pairs) {
            widen_pairs(w, k, (uint32_t *)wide);
            for (int64_t m0 = 0; m0 < m; m0 += block) {
                const int rows = m - m0 < block ? (int)(m - m0) : block;
                tile_bf16((const uint16_t *)x + m0 * ldx, ldx, (const uint32_t *)wide, k, out, rows);
                store_rows(out, rows, cols, scale + n0, bias ? bias + n0 : 0,
                           (char *)y + (m0 * ldy + n0) * ysize, ldy, bf16);
            }
            continue;
        }
#else
        (void)pairs;
#endif
        if (wide)
            for (int64_t c = 0; c < k; c++) {
                VSTORE(wide + c * NB, VWIDEN(w + c * NB));
                VSTORE(wide + c * NB + VW, VWIDEN(w + c * NB + VW));
            }
        for (int64_t m0 = 0; m0 < m; m0 += block) {
            const int rows = m - m0 < block ? (int)(m - m0) : block;
            tile(x + m0 * ldx, ldx, w, wide, k, out, rows);
            store_rows(out, rows, cols, scale + n0, bias ? bias + n0 : 0,
                       (char *)y + (m0 * ldy + n0) * ysize, ldy, bf16);
        }
    }
    return 1;
}

int qm_w8a16_isa(void) { return QM_ISA; }
int qm_w8a16_panel(void) { return NB; }
int qm_w8a16_bf16dot(void) { return QM_BF16DOT; }

/* x: [m, k] with row stride ldx (elements; columns contiguous), float32 or (bf16 != 0) bf16; packed: see
 * the top; y: [m, n] with row stride ldy, in x's dtype. Returns 1, or 0 where memory ran out. */
int qm_w8a16_linear(const void *x, int bf16, int64_t m, int64_t k, int64_t ldx, const int8_t *packed, int64_t n,
                    const float *scale, const float *bias, void *y, int64_t ldy) {
    if (m <= 0 || n <= 0) return 1;
    const float *xf = (const float *)x;
    float *widened = 0;
    if (bf16 && !use_pairs(bf16, m)) { /* bf16 -> float32 is exact: the top 16 bits of the float32 */
        widened = malloc((size_t)m * (size_t)(k ? k : 1) * sizeof(float));
        if (!widened) return 0;
        for (int64_t r = 0; r < m; r++) {
            const uint16_t *src = (const uint16_t *)x + r * ldx;
            uint32_t *dst = (uint32_t *)(widened + r * k);
            for (int64_t c = 0; c < k; c++) dst[c] = (uint32_t)src[c] << 16;
        }
        xf = widened;
        ldx = k;
    }
    const int64_t panels = (n + NB - 1) / NB;
    int ok = 1;
#ifdef _OPENMP
    int64_t threads = omp_get_max_threads();
    if (threads > panels) threads = panels;
    if (threads > 1) {
#pragma omp parallel num_threads((int)threads) reduction(& : ok)
        {
            const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
            ok = run_panels(xf, m, k, ldx, packed, n, scale, bias, y, ldy, bf16, panels * t / nt,
                            panels * (t + 1) / nt);
        }
    } else
#endif
        ok = run_panels(xf, m, k, ldx, packed, n, scale, bias, y, ldy, bf16, 0, panels);
    free(widened);
    return ok;
}

#else /* no AVX-512 and no AVX2+FMA here (or not x86): the caller uses torch */

int qm_w8a16_isa(void) { return 0; }
int qm_w8a16_panel(void) { return 0; }
int qm_w8a16_bf16dot(void) { return 0; }

int qm_w8a16_linear(const void *x, int bf16, int64_t m, int64_t k, int64_t ldx, const int8_t *packed, int64_t n,
                    const float *scale, const float *bias, void *y, int64_t ldy) {
    (void)x, (void)bf16, (void)m, (void)k, (void)ldx, (void)packed, (void)n, (void)scale, (void)bias, (void)y,
        (void)ldy;
    return 0;
}

#endif

/* W8A8 activations for quantmint's exact int32 matmul on this kernel (int8_linear.py, CPUs without VNNI):
 * round each row of x [m, k] (row stride ldx; float32, or bf16 where bf16 != 0) onto the int8 grid
 * [-127, 127] and write the int8 values as float32 to q [m, k] (contiguous), what qm_w8a16_linear then
 * reads. With static_scale (one float32) every row uses it; otherwise row r's scale is
 * max(max |x[r]| / 127, min_scale), written to scale_out[r]. The same bits as quant_math.quantize_activation
 * in torch: an IEEE division by the scale, rounding half to even (rintf in the default mode), NaN
 * propagated (a row holding NaN gets a NaN scale and NaN values). One pass instead of about ten torch ops,
 * whose fixed cost per call dominated decode-sized rows. */
void qm_w8a8_quantize_rows(const void *x, int bf16, int64_t m, int64_t k, int64_t ldx, const float *static_scale,
                           float min_scale, float *q, float *scale_out) {
    float *row = bf16 ? malloc((size_t)(k ? k : 1) * sizeof(float)) : 0;
    for (int64_t r = 0; r < m; r++) {
        const float *xr = (const float *)x + r * ldx;
        if (bf16) { /* widened to float32 (exact); into q's own row where no memory was left for one */
            float *dst = row ? row : q + r * k;
            const uint16_t *src = (const uint16_t *)x + r * ldx;
            for (int64_t c = 0; c < k; c++) {
                uint32_t bits = (uint32_t)src[c] << 16;
                memcpy(dst + c, &bits, sizeof bits);
            }
            xr = dst;
        }
        float s;
        if (static_scale) {
            s = *static_scale;
        } else {
            float amax = 0.0f;
            int nan = 0;
            for (int64_t c = 0; c < k; c++) {
                const float a = xr[c] < 0.0f ? -xr[c] : xr[c];
                amax = a > amax ? a : amax;
                nan |= xr[c] != xr[c];
            }
            s = amax / 127.0f;
            if (nan) s = __builtin_nanf("");
            else if (s < min_scale) s = min_scale;
            scale_out[r] = s;
        }
        float *qr = q + r * k;
        for (int64_t c = 0; c < k; c++) {
            const float v = __builtin_rintf(xr[c] / s);
            qr[c] = v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v);
        }
    }
    free(row);
}

/* W8A8 output for quantmint's exact int32 matmul on this kernel: y[r, j] = (acc[r, j] * xscale) * wscale[j],
 * xscale row r's (per_row) or the one static scale, stored as float32 or rounded once to bf16. acc is the
 * [m, n] sum of int8 products, float32 (exact integers) or int32 (acc_int32, converted to float32 as
 * torch converts). Two multiplies in int8_linear.py's order and no addition (Python adds a bias), so no
 * contraction to an FMA can change a rounding: the same bits as its torch epilogue. */
void qm_w8a8_scale_rows(const void *acc, int acc_int32, int64_t m, int64_t n, const float *xscale, int per_row,
                        const float *wscale, void *y, int bf16) {
    for (int64_t r = 0; r < m; r++) {
        const float xs = xscale[per_row ? r : 0];
        const float *af = (const float *)acc + r * n;
        const int32_t *ai = (const int32_t *)acc + r * n;
        if (bf16) {
            uint16_t *yr = (uint16_t *)y + r * n;
            if (acc_int32)
                for (int64_t j = 0; j < n; j++) yr[j] = to_bf16(((float)ai[j] * xs) * wscale[j]);
            else
                for (int64_t j = 0; j < n; j++) yr[j] = to_bf16((af[j] * xs) * wscale[j]);
        } else {
            float *yr = (float *)y + r * n;
            if (acc_int32)
                for (int64_t j = 0; j < n; j++) yr[j] = ((float)ai[j] * xs) * wscale[j];
            else
                for (int64_t j = 0; j < n; j++) yr[j] = (af[j] * xs) * wscale[j];
        }
    }
}
