/* GPTQ's column loop over one block of columns (quantmint.algorithms.gptq.gptq_quantize), row by row.
 *
 * GPTQ rounds a weight's columns one after the other, each column's rounding error spread over the
 * columns to its right through the upper Cholesky factor of the inverse Hessian. Every output row runs
 * that loop on its own (the factor is shared), so this kernel takes a block of n columns and loops over
 * rows outside and columns inside: a row's n floats stay in L1 while its columns are rounded, where the
 * torch loop it replaces makes ten calls over all rows per column (Python overhead dominated it: about
 * 100 microseconds per column, 15 s of SmolLM2-135M's 210 linears).
 *
 * For row r, column i of the block (global column first + i), symmetric weights (zero == NULL):
 *     if group > 0 and (first + i) % group == 0:     the group's scale, taken when GPTQ reaches it:
 *         s = max(max |w[r, i : i + group]| / qmax, min_scale), written to scale[r, i : i + group]
 *     q      = clamp(rint(w[r, i] / scale[r, i]), -qmax, qmax)        (round half to even, as torch.round)
 *     e      = (w[r, i] - q * scale[r, i]) / hinv[i, i]
 *     w[r, k] -= e * hinv[i, k]                   for k > i
 * Asymmetric weights (a zero point per column, `zero`, like the scale; unsigned grid [0, qmax]):
 *     if group > 0 and (first + i) % group == 0:     lo = min(min w[r, group], 0), hi = max(max w[r, group], 0)
 *         s = max((hi - lo) / qmax, min_scale), z = clamp(rint(-lo / s), 0, qmax), written to the group
 *     q      = clamp(rint(w[r, i] / s) + z, 0, qmax)
 *     e      = (w[r, i] - (q - z) * s) / hinv[i, i]
 * (quant_math.qparams_asymmetric and the torch loop compute the same float32 operations.)
 * with q and e stored for the caller's lazy update of the columns right of the block. Built with
 * -ffp-contract=off, every operation rounds as the torch loop's does (a product, then a difference), so
 * the two give the same integers (tested against each other).
 *
 * Groups must lie inside the block (the caller checks): the torch loop handles the others.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

void qm_gptq_block(float *restrict w, int64_t ldw, const float *restrict hinv, int64_t ldh,
                   float *restrict scale, int64_t lds, float *restrict zero, int64_t ldz, float *restrict q,
                   int64_t ldq, float *restrict err, int64_t lde, int64_t rows, int64_t n, int64_t group,
                   int64_t first, float qmax, float min_scale) {
    for (int64_t r = 0; r < rows; r++) {
        float *wr = w + r * ldw;
        float *sr = scale + r * lds;
        float *zr = zero == NULL ? NULL : zero + r * ldz;
        float *qr = q + r * ldq;
        float *er = err + r * lde;
        for (int64_t i = 0; i < n; i++) {
            if (group > 0 && (first + i) % group == 0) {
                int64_t end = i + group < n ? i + group : n;
                if (zr == NULL) {
                    float m = 0.0f;
                    for (int64_t k = i; k < end; k++) {
                        float a = fabsf(wr[k]);
                        m = a > m ? a : m;
                    }
                    float s = m / qmax;
                    s = s < min_scale ? min_scale : s;
                    for (int64_t k = i; k < end; k++) sr[k] = s;
                } else {
                    float lo = 0.0f, hi = 0.0f;
                    for (int64_t k = i; k < end; k++) {
                        lo = wr[k] < lo ? wr[k] : lo;
                        hi = wr[k] > hi ? wr[k] : hi;
                    }
                    float s = (hi - lo) / qmax;
                    s = s < min_scale ? min_scale : s;
                    float z = rintf(-lo / s);
                    z = z < 0.0f ? 0.0f : (z > qmax ? qmax : z);
                    for (int64_t k = i; k < end; k++) {
                        sr[k] = s;
                        zr[k] = z;
                    }
                }
            }
            float s = sr[i];
            float v, d;
            if (zr == NULL) {
                v = rintf(wr[i] / s);
                v = v < -qmax ? -qmax : (v > qmax ? qmax : v);
                d = v * s;
            } else {
                float z = zr[i];
                v = rintf(wr[i] / s) + z;
                v = v < 0.0f ? 0.0f : (v > qmax ? qmax : v);
                d = (v - z) * s;
            }
            qr[i] = v;
            float e = (wr[i] - d) / hinv[i * ldh + i];
            er[i] = e;
            const float *h = hinv + i * ldh;
            for (int64_t k = i + 1; k < n; k++) wr[k] -= e * h[k];
        }
    }
}
