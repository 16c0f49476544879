/* Per-channel symmetric round-to-nearest of a weight [rows, cols], one fused pass per row.
 *
 * quantmint.native compiles this file with the machine's C compiler (-O3 -march=native) and calls it
 * through ctypes; quantmint.quant_math.quantize_weight uses it for large per-channel weights and falls
 * back to torch when it cannot be built. It gives exactly the integers and scales of the torch passes:
 *
 *     amax  = max |w| per row                      (exact in the weight's own dtype)
 *     scale = max(float(amax) / qmax, min_scale)   (IEEE single division, as torch)
 *     q     = clamp(rint(float(w) / scale), -qmax, qmax)   (round half to even, as torch.round)
 *
 * |w| is taken on the bit pattern (sign bit cleared): for finite values the unsigned order of those bits
 * is the order of the values, so the maximum is an integer max that vectorizes. A row holding an inf or a
 * NaN makes the call return its index + 1 without writing it: the caller then uses torch, whose result
 * for such rows it keeps as the reference.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float bf16_to_float(uint16_t h) { return from_bits((uint32_t)h << 16); }

static inline float clamp_round(float v, float qmax) {
    v = rintf(v);
    return v < -qmax ? -qmax : (v > qmax ? qmax : v);
}

#define ROW_LOOP(TYPE, ABS_MASK, INF_BITS, TO_FLOAT)                                    \
    for (int64_t r = 0; r < rows; r++) {                                                \
        const TYPE *x = w + r * row_stride;                                             \
        TYPE m = 0;                                                                     \
        for (int64_t c = 0; c < cols; c++) {                                            \
            TYPE a = x[c] & ABS_MASK;                                                   \
            m = a > m ? a : m;                                                          \
        }                                                                               \
        if (m >= INF_BITS) return r + 1;                                                \
        float s = TO_FLOAT(m) / qmax;                                                   \
        s = s < min_scale ? min_scale : s;                                              \
        scale[r] = s;                                                                   \
        int8_t *o = q + r * cols;                                                       \
        for (int64_t c = 0; c < cols; c++) o[c] = (int8_t)clamp_round(TO_FLOAT(x[c]) / s, qmax); \
    }                                                                                   \
    return 0;

int64_t qm_rtn_channel_bf16(const uint16_t *restrict w, int64_t rows, int64_t cols, int64_t row_stride, float qmax,
                            float min_scale, int8_t *restrict q, float *restrict scale) {
    ROW_LOOP(uint16_t, 0x7fffu, 0x7f80u, bf16_to_float)
}

static inline float f16_to_float(uint16_t h) {
    _Float16 f;
    memcpy(&f, &h, sizeof f);
    return (float)f;
}

/* fp16 rows are widened to float32 a block at a time (F16C where the CPU has it; the compiler does not
 * vectorize _Float16 conversions itself), then rounded as float32 rows are. */
#ifdef __F16C__
#include <immintrin.h>
#endif
#define F16_BLOCK 1024

int64_t qm_rtn_channel_f16(const uint16_t *restrict w, int64_t rows, int64_t cols, int64_t row_stride,
                           float qmax, float min_scale, int8_t *restrict q, float *restrict scale) {
    float buf[F16_BLOCK];
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *x = w + r * row_stride;
        uint16_t m = 0;
        for (int64_t c = 0; c < cols; c++) {
            uint16_t a = x[c] & 0x7fffu;
            m = a > m ? a : m;
        }
        if (m >= 0x7c00u) return r + 1;
        float s = f16_to_float(m) / qmax;
        s = s < min_scale ? min_scale : s;
        scale[r] = s;
        int8_t *o = q + r * cols;
        for (int64_t c0 = 0; c0 < cols; c0 += F16_BLOCK) {
            int64_t n = cols - c0 < F16_BLOCK ? cols - c0 : F16_BLOCK, c = 0;
#ifdef __F16C__
            for (; c + 8 <= n; c += 8)
                _mm256_storeu_ps(buf + c, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + c0 + c))));
#endif
            for (; c < n; c++) buf[c] = f16_to_float(x[c0 + c]);
            for (c = 0; c < n; c++) o[c0 + c] = (int8_t)clamp_round(buf[c] / s, qmax);
        }
    }
    return 0;
}

static inline float f32_bits_to_float(uint32_t u) { return from_bits(u); }

int64_t qm_rtn_channel_f32(const uint32_t *restrict w, int64_t rows, int64_t cols, int64_t row_stride, float qmax,
                           float min_scale, int8_t *restrict q, float *restrict scale) {
    ROW_LOOP(uint32_t, 0x7fffffffu, 0x7f800000u, f32_bits_to_float)
}

/* The same rounding, reading the weight from a file: rows [0, rows) stored contiguously at `offset` of
 * `fd`, read `buf_bytes` at a time (whole rows, at least one) into `buf` and rounded while the chunk is
 * still in cache. A weight read into memory first and rounded afterwards crosses memory twice more (the
 * copy out of the page cache is written, then read back cold); this crosses it once. Returns 0, the index
 * + 1 of a row holding an inf or NaN (rows before it are written), or -1 when the file cannot be read to
 * the end of the weight (the caller then reads it the ordinary way, which says what is wrong). */
#include <errno.h>
#include <unistd.h>

static int read_fully(int fd, char *dst, int64_t n, int64_t offset) {
    while (n > 0) {
        ssize_t got = pread(fd, dst, (size_t)n, (off_t)offset);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) return -1;
        dst += got, n -= got, offset += got;
    }
    return 0;
}

#define FILE_LOOP(TYPE, KERNEL)                                                                   \
    int64_t row_bytes = cols * (int64_t)sizeof(TYPE);                                             \
    int64_t chunk = buf_bytes / row_bytes;                                                        \
    if (chunk < 1) return -1;                                                                     \
    for (int64_t r = 0; r < rows; r += chunk) {                                                   \
        int64_t n = rows - r < chunk ? rows - r : chunk;                                          \
        if (read_fully(fd, (char *)buf, n * row_bytes, offset + r * row_bytes)) return -1;        \
        int64_t bad = KERNEL((const TYPE *)buf, n, cols, cols, qmax, min_scale, q + r * cols, scale + r); \
        if (bad) return r + bad;                                                                  \
    }                                                                                             \
    return 0;

int64_t qm_rtn_channel_file_bf16(int fd, int64_t offset, int64_t rows, int64_t cols, float qmax, float min_scale,
                                 int8_t *q, float *scale, void *buf, int64_t buf_bytes) {
    FILE_LOOP(uint16_t, qm_rtn_channel_bf16)
}

int64_t qm_rtn_channel_file_f16(int fd, int64_t offset, int64_t rows, int64_t cols, float qmax, float min_scale,
                                int8_t *q, float *scale, void *buf, int64_t buf_bytes) {
    FILE_LOOP(uint16_t, qm_rtn_channel_f16)
}

int64_t qm_rtn_channel_file_f32(int fd, int64_t offset, int64_t rows, int64_t cols, float qmax, float min_scale,
                                int8_t *q, float *scale, void *buf, int64_t buf_bytes) {
    FILE_LOOP(uint32_t, qm_rtn_channel_f32)
}
