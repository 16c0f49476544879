/* W8A16 matmul on Intel AMX: y[M, N] (bf16) = x[M, K] (bf16) @ (int8 weight[N, K] * scale[N]).T + bias.
 *
 * quantmint.native compiles this file (quantmint.backends.torch.int8_weight_only calls it). The int8
 * weight w, in [-127, 127], is repacked once (`pack_weight_for_amx` in Python) as u = w + 128 (uint8,
 * 1..255) in AMX's VNNI tile order:
 *
 *     packed[N/16][K/32][16][16][2]: element (n, k) at nb = n/16, kb = k/32, [(k%32)/2][n%16][k%2]
 *
 * so that each 16 (n) x 32 (k) block is 512 contiguous bytes. Per call, blocks are widened to bf16 u
 * (exact: u has at most 8 significant bits) and multiplied with 16-row blocks of x by the AMX tile unit
 * (tdpbf16ps: exact products, float32 accumulation); 128 * sum_k x[r, k] is taken off each output of
 * row r (x @ w = x @ u - 128 * sum x), then the float32 result is scaled per output channel, the bias
 * added, and rounded once to bf16. Decode-sized calls widen each block just before its use; larger ones
 * widen a panel of up to four column blocks once for every block of rows. Panels are shared among the
 * OpenMP threads of the process (the same runtime torch uses).
 *
 * Why u and not w: widening u (positive, never 0) is a conversion, a shift and an add; widening w also
 * needs its sign and zero handled, twice the vector work, and at decode sizes the widening, not the
 * tile unit, sets the pace (weights in cache: 16 rows 15-22% faster, 1 row 28-35%; benchmarks/int8_matmul.py).
 *
 * Built everywhere; where the compiler or CPU has no AMX-BF16, or Linux refuses the tile-data
 * permission, qm_woq_available() returns 0 and Python uses its torch path.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#define QM_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef QM_AMX

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

static void configure_tiles(int rows) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 4; t++) { /* C: rows x 16 float32 */
        cfg.rows[t] = (uint8_t)rows;
        cfg.colsb[t] = 64;
    }
    cfg.rows[4] = (uint8_t)rows; /* A: rows x 32 bf16 */
    cfg.colsb[4] = 64;
    for (int t = 5; t < 7; t++) { /* B: 16 pairs of k x 16 n x 2 bf16 */
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

static _Thread_local uint16_t *workspace;
static _Thread_local size_t workspace_elems;

static uint16_t *panel_workspace(size_t elems) {
    if (elems > workspace_elems) {
        free(workspace);
        workspace = aligned_alloc(64, elems * sizeof(uint16_t));
        workspace_elems = workspace ? elems : 0;
    }
    return workspace;
}

/* Stored u = w + 128 (uint8, 1..255 for w in [-127, 127]) -> bf16 u, 32 at a time (n is a multiple of
 * 512). Every such u is a bf16 (8 significant bits), so this is exact. */
static void widen(const uint8_t *restrict src, uint16_t *restrict dst, size_t n) {
#ifdef __AVX512FP16__
    /* uint16 -> fp16 is one exact instruction; fp16 -> bf16 for a positive integer of at most 8
     * significant bits is a shift and an add: the mantissa's low 3 (zero) bits dropped and the exponent
     * rebased (+112). u is never 0, so no zero case. */
    const __m512i rebase = _mm512_set1_epi16(112 << 7);
    for (size_t i = 0; i < n; i += 32) {
        __m512i h = _mm512_castph_si512(
            _mm512_cvtepu16_ph(_mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(src + i)))));
        _mm512_storeu_si512((void *)(dst + i), _mm512_add_epi16(_mm512_srli_epi16(h, 3), rebase));
    }
    return;
#endif
    for (size_t i = 0; i < n; i += 32) {
        __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(src + i))));
        __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(src + i + 16))));
        _mm512_storeu_si512((void *)(dst + i), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
}

/* 128 * sum_k x[r, k] for each row r: the tiles multiply x by w + 128, so this comes off every output
 * of the row. float32 sums, 32 bf16 at a time (k is a multiple of 32). */
static void row_offsets(const uint16_t *x, int64_t m, int64_t k, int64_t ldx, float *out) {
    for (int64_t r = 0; r < m; r++) {
        const uint16_t *row = x + r * ldx;
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        for (int64_t c = 0; c < k; c += 32) {
            __m512i v = _mm512_loadu_si512((const void *)(row + c));
            acc0 = _mm512_add_ps(acc0, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
            acc1 = _mm512_add_ps(acc1, _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000))));
        }
        out[r] = 128.0f * _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    }
}

/* Decode streams the weight from memory once per call: each column block's stream is prefetched this
 * many 512-byte blocks ahead (2 KiB), into the thread's next panel at a panel's end. 30 SmolLM2 layers
 * of 16 rows, weights out of cache: 4.0 ms without, 3.45 ms with 2-4 blocks within a panel (3.9 ms with
 * 16), 3.2 ms across panels. */
#ifndef PREFETCH_BLOCKS
#define PREFETCH_BLOCKS 4
#endif

static int amx_ready = -1;

int qm_woq_available(void) {
    if (amx_ready < 0)
        amx_ready = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return amx_ready;
}

/* The C tiles of one block of rows out: the row's offset taken off, scaled per column, bias added,
 * rounded once to bf16. */
static void store_rows(float *cbuf, int np, int rows, const float *offset, uint16_t *y, int64_t ldy,
                       const float *scale, const float *bias) {
    _tile_stored(0, cbuf, 256);
    if (np > 1) _tile_stored(1, cbuf + 16, 256);
    if (np > 2) _tile_stored(2, cbuf + 32, 256);
    if (np > 3) _tile_stored(3, cbuf + 48, 256);
    for (int r = 0; r < rows; r++) {
        const __m512 off = _mm512_set1_ps(offset[r]);
        for (int j = 0; j < np; j++) {
            __m512 v = _mm512_sub_ps(_mm512_load_ps(cbuf + r * 64 + j * 16), off);
            v = _mm512_mul_ps(v, _mm512_loadu_ps(scale + j * 16));
            if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + j * 16));
            _mm256_storeu_si256((__m256i *)(y + r * ldy + j * 16), (__m256i)_mm512_cvtneps_pbh(v));
        }
    }
}

/* One thread's share: the panels [p_lo, p_hi) (a panel is 4 column blocks of 16). */
static int run_panels(const uint16_t *x, int64_t m, int64_t k, int64_t ldx, const uint8_t *packed, int64_t n,
                      const float *scale, const float *bias, uint16_t *y, int64_t ldy, int64_t p_lo, int64_t p_hi) {
    const int64_t kb_count = k / 32, nb_count = n / 16;
    /* The workspace holds a panel of widened blocks, then the row offsets. */
    const size_t panel_elems = (size_t)4 * kb_count * 512;
    uint16_t *ws = panel_workspace(panel_elems + 2 * (size_t)(m + 16));
    if (!ws) return 0;
    float *offsets = (float *)(ws + panel_elems);
    row_offsets(x, m, k, ldx, offsets);
    float cbuf[16 * 64] __attribute__((aligned(64)));
    int configured = 0;
    uint16_t ring[4 * 512] __attribute__((aligned(64)));
    for (int64_t p = p_lo; p < p_hi; p++) {
        const int64_t nb0 = p * 4;
        const int np = nb_count - nb0 < 4 ? (int)(nb_count - nb0) : 4;
        const uint8_t *panel = packed + nb0 * kb_count * 512;
        if (m <= 16) {
            /* One block of rows (decode): widen each 16 x 32 block just before its use, in L1. */
            if (m != configured) {
                configure_tiles((int)m);
                configured = (int)m;
            }
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t kb = 0; kb < kb_count; kb++) {
                for (int j = 0; j < np; j++) {
                    /* Past this panel's end, the same stream of the thread's next panel. */
                    const int64_t ahead_kb = kb + PREFETCH_BLOCKS;
                    const uint8_t *ahead = 0;
                    if (ahead_kb < kb_count)
                        ahead = panel + (j * kb_count + ahead_kb) * 512;
                    else if (p + 1 < p_hi && nb0 + 4 + j < nb_count)
                        ahead = panel + ((4 + j) * kb_count + ahead_kb - kb_count) * 512;
                    if (ahead)
                        for (int line = 0; line < 512; line += 64) _mm_prefetch((const char *)ahead + line, _MM_HINT_T0);
                    widen(panel + (j * kb_count + kb) * 512, ring + j * 512, 512);
                }
                _tile_loadd(4, x + kb * 32, ldx * 2);
                _tile_loadd(5, ring, 64);
                _tile_dpbf16ps(0, 4, 5);
                if (np > 1) {
                    _tile_loadd(6, ring + 512, 64);
                    _tile_dpbf16ps(1, 4, 6);
                }
                if (np > 2) {
                    _tile_loadd(5, ring + 1024, 64);
                    _tile_dpbf16ps(2, 4, 5);
                }
                if (np > 3) {
                    _tile_loadd(6, ring + 1536, 64);
                    _tile_dpbf16ps(3, 4, 6);
                }
            }
            store_rows(cbuf, np, (int)m, offsets, y + nb0 * 16, ldy, scale + nb0 * 16, bias ? bias + nb0 * 16 : 0);
            continue;
        }
        widen(panel, ws, (size_t)np * kb_count * 512);
        for (int64_t m0 = 0; m0 < m; m0 += 16) {
            const int rows = m - m0 < 16 ? (int)(m - m0) : 16;
            if (rows != configured) {
                configure_tiles(rows);
                configured = rows;
            }
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            const uint16_t *a = x + m0 * ldx;
            for (int64_t kb = 0; kb < kb_count; kb++) {
                _tile_loadd(4, a + kb * 32, ldx * 2);
                _tile_loadd(5, ws + (0 * kb_count + kb) * 512, 64);
                _tile_dpbf16ps(0, 4, 5);
                if (np > 1) {
                    _tile_loadd(6, ws + (1 * kb_count + kb) * 512, 64);
                    _tile_dpbf16ps(1, 4, 6);
                }
                if (np > 2) {
                    _tile_loadd(5, ws + (2 * kb_count + kb) * 512, 64);
                    _tile_dpbf16ps(2, 4, 5);
                }
                if (np > 3) {
                    _tile_loadd(6, ws + (3 * kb_count + kb) * 512, 64);
                    _tile_dpbf16ps(3, 4, 6);
                }
            }
            store_rows(cbuf, np, rows, offsets + m0, y + m0 * ldy + nb0 * 16, ldy, scale + nb0 * 16,
                       bias ? bias + nb0 * 16 : 0);
        }
    }
    if (configured) _tile_release();
    return 1;
}

int qm_woq_linear_bf16(const uint16_t *x, int64_t m, int64_t k, int64_t ldx, const uint8_t *packed, int64_t n,
                       const float *scale, const float *bias, uint16_t *y, int64_t ldy) {
    if (!qm_woq_available() || k % 32 || n % 16) return 0;
    const int64_t panels = (n / 16 + 3) / 4;
    int ok = 1;
#ifdef _OPENMP
    int threads = omp_get_max_threads();
    if (threads > panels) threads = (int)panels;
#pragma omp parallel num_threads(threads) reduction(& : ok)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        ok = run_panels(x, m, k, ldx, packed, n, scale, bias, y, ldy, panels * t / nt, panels * (t + 1) / nt);
    }
#else
    ok = run_panels(x, m, k, ldx, packed, n, scale, bias, y, ldy, 0, panels);
#endif
    return ok;
}

#else /* no AMX-BF16 here: the caller uses torch */

int qm_woq_available(void) { return 0; }

int qm_woq_linear_bf16(const uint16_t *x, int64_t m, int64_t k, int64_t ldx, const uint8_t *packed, int64_t n,
                       const float *scale, const float *bias, uint16_t *y, int64_t ldy) {
    (void)x, (void)m, (void)k, (void)ldx, (void)packed, (void)n, (void)scale, (void)bias, (void)y, (void)ldy;
    return 0;
}

#endif
