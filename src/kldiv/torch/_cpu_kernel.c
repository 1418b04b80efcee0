/* The compiled CPU kernel of DistillationLoss: KL(T||S) or KL(S||T) per row of float32
 * logits, and the gradient with respect to the student's logits, in one call.
 *
 * Layer 1 of three (kernel -> launcher `_cpu_native.py` -> autograd `_cpu.py`). Compiled on
 * first use by the system C compiler, with GNU vector extensions so that the same source is
 * vectorised for whatever the machine has (AVX2 here) without intrinsics.
 *
 * Per row, three passes over data that stays in L2 (a 32k-vocabulary row is 128 KiB a side):
 *   1. the row maxima m_s, m_t, and whether the row holds +inf or NaN;
 *   2. e_s = exp(a), e_t = exp(b) with a = s/T - m_s, b = t/T - m_t (each logit shifted by
 *      its own row maximum before the two are differenced, so a constant offset between
 *      teacher and student costs no precision), their sums z_s, z_t and the sum of the
 *      divergence's terms; e_s goes to the gradient row, the second stream to scratch;
 *   3. the gradient from the two stored streams.
 * Two exps per element in all; the [N, V] inputs are read from memory once.
 *
 *   KL(T||S) = sum_j p_j (b_j - a_j) - log z_t + log z_s,       d/ds_j = (q_j - p_j) / T
 *   KL(S||T) = R = sum_j q_j (a_j - b_j) - log z_s + log z_t,    d/ds_j = q_j (d_j - c - R) / T
 * with p = e_t / z_t, q = e_s / z_s, d = a - b, c = log z_s - log z_t; the gradient row is
 * also multiplied by the caller's scale.
 *
 * Zero support as in the core: a -inf logit is a zero probability, terms with a zero first
 * argument are 0, and a positive first argument against a zero second one makes the row +inf
 * (tested by d == +inf, so it holds even where the positive side underflows). Rows the kernel
 * does not decide exactly come back flagged for the caller's tensor code: rows holding +inf or
 * NaN, rows that are all -inf on a side, rows with |logit/T| above 2^22 at T != 1 (see the
 * row maximum below), and reverse-KL rows that are +inf (the core leaves the infinite terms
 * out of that gradient, which needs its masks). Rows with keep[i] == 0 are
 * never read: value 0 and a zero gradient row.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define W 8
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(float))));

static inline vf splat(float x) { return (vf){0} + x; }
static inline vf select(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }

/* W floats from p[j], padded with `pad` past v: the row's last partial vector goes through
 * the same vector code, with a pad (-inf) that contributes nothing to any sum. */
static inline vf load(const float *p, int64_t j, int64_t v, float pad) {
    vf x;
    if (j + W <= v) {
        memcpy(&x, p + j, sizeof x);
        return x;
    }
    float buf[W];
    for (int k = 0; k < W; k++) buf[k] = j + k < v ? p[j + k] : pad;
    memcpy(&x, buf, sizeof x);
    return x;
}

static inline void store(float *p, int64_t j, int64_t v, vf x) {
    if (j + W <= v) {
        memcpy(p + j, &x, sizeof x);
        return;
    }
    float buf[W];
    memcpy(buf, &x, sizeof x);
    for (int64_t k = j; k < v; k++) p[k] = buf[k - j];
}

static inline double hsum(vf x) {
    float b[W];
    memcpy(b, &x, sizeof x);
    double s = 0;
    for (int k = 0; k < W; k++) s += b[k];
    return s;
}

static inline float hmax(vf x) {
    float b[W];
    memcpy(b, &x, sizeof x);
    float m = b[0];
    for (int k = 1; k < W; k++) m = b[k] > m ? b[k] : m;
    return m;
}

static inline int any(vi m) {
    int32_t b[W];
    memcpy(b, &m, sizeof m);
    int32_t r = 0;
    for (int k = 0; k < W; k++) r |= b[k];
    return r != 0;
}

/* e^x for x <= 0 or -inf, within 2 ulp: x = k*ln2 + r with |r| <= ln2/2 (ln2 split in two
 * so that k*ln2 is exact), Cephes' minimax polynomial for e^r, and 2^k written into the
 * exponent bits (k found by the 1.5*2^23 rounding trick). 2^k is applied in two halves so that
 * results down to the smallest subnormal (x > -103.97) survive: a subnormal probability still
 * matters when it multiplies a log-ratio near 1e38. Below that, 0, as in float32 exp. */
static inline vf vexp(vf x) {
    const vi under = x < -103.972f;
    x = select(under, splat(0.f), x);
    vf t = x * 1.44269504088896341f + 12582912.f;
    vf k = t - 12582912.f;
    vi ki = (vi)t - 0x4B400000;
    vf r = x - k * 0.693359375f;
    r = r - k * -2.12194440e-4f;
    vf p = splat(1.9875691500E-4f);
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * (r * r) + r + 1.0f;
    const vi k1 = ki >> 1, k2 = ki - k1; /* each >= -75: both halves are normal numbers */
    p = p * (vf)((k1 + 127) << 23);
    return select(under, splat(0.f), p * (vf)((k2 + 127) << 23));
}

/* Sums are kept per vector lane over blocks of this many elements and then added in double:
 * float32 lanes alone would lose about log2(V/W) bits. */
#define BLOCK 512

enum { KL = 0, REVERSE_KL = 1 };

/* Rows [0, n) of s and t (row strides ss, ts; unit stride along the row). grad (row stride
 * gs) may be NULL for evaluation only. row_scale (NULL: `scale` for every row) multiplies the
 * gradient. scratch: 2 * (v + W) floats. values[i] and flags[i] are written for every row;
 * flags[i] = 1 means the caller must compute row i (its value and gradient row here are
 * unspecified). */
void kldiv_cpu_rows(int kind, int64_t n, int64_t v, const float *s, int64_t ss, const float *t,
                    int64_t ts, const uint8_t *keep, float inv_t, float *grad, int64_t gs,
                    const float *row_scale, float scale, float *scratch, double *values,
                    uint8_t *flags) {
    const float NEG = -INFINITY;
    float *second = scratch;                  /* e_t (KL) or d = a - b (reverse KL) */
    float *own = scratch + v + W;             /* e_s when there is no gradient row */
    for (int64_t i = 0; i < n; i++) {
        const float *si = s + i * ss, *ti = t + i * ts;
        float *gi = grad ? grad + i * gs : own;
        values[i] = 0;
        flags[i] = 0;
        if (keep && !keep[i]) {
            if (grad) memset(gi, 0, (size_t)v * sizeof(float));
            continue;
        }
        vf ms = splat(NEG), mt = splat(NEG);
        vi bad = (vi){0};
        for (int64_t j = 0; j < v; j += W) {
            vf a = load(si, j, v, NEG), b = load(ti, j, v, NEG);
            bad |= (a != a) | (a == INFINITY) | (b != b) | (b == INFINITY);
            ms = select(a > ms, a, ms);
            mt = select(b > mt, b, mt);
        }
        const float m_s = hmax(ms) * inv_t, m_t = hmax(mt) * inv_t;
        /* With fused multiply-adds, a = s*inv_t - m_s is exact before its one rounding, so
         * at the row maximum it is the rounding error of m_s, up to |m_s|*2^-24, not 0. That
         * is harmless (and more accurate) while it stays small; beyond |s/T| = 2^22 it could
         * reach e^(tens) and overflow, so such rows go to tensor code. (At T = 1 the product
         * is exact.) */
        const int huge = inv_t != 1.0f && (fabsf(m_s) > 0x1p22f || fabsf(m_t) > 0x1p22f);
        if (any(bad) || huge || !isfinite(m_s) || !isfinite(m_t)) {
            flags[i] = 1;
            continue;
        }
        double zs = 0, zt = 0, acc = 0;
        vi inf_terms = (vi){0};
        for (int64_t j0 = 0; j0 < v; j0 += BLOCK) {
            const int64_t j1 = j0 + BLOCK < v ? j0 + BLOCK : v;
            vf vzs = splat(0), vzt = splat(0), vacc = splat(0);
            for (int64_t j = j0; j < j1; j += W) {
                const vf a = load(si, j, v, NEG) * inv_t - m_s;
                const vf b = load(ti, j, v, NEG) * inv_t - m_t;
                const vf es = vexp(a), et = vexp(b);
                vzs += es;
                vzt += et;
                store(gi, j, v, es);
                if (kind == KL) {
                    const vf d = b - a; /* +inf: p > 0 = q; NaN (both -inf): p = 0, dropped */
                    inf_terms |= d == INFINITY;
                    vacc += select(et > 0, et * d, splat(0));
                    store(second, j, v, et);
                } else {
                    const vf d = a - b;
                    inf_terms |= d == INFINITY;
                    vacc += select(es > 0, es * d, splat(0));
                    store(second, j, v, d);
                }
            }
            zs += hsum(vzs);
            zt += hsum(vzt);
            acc += hsum(vacc);
        }
        const double lzs = log(zs), lzt = log(zt);
        const double sc = (double)inv_t * (row_scale ? row_scale[i] : scale);
        if (kind == KL) {
            values[i] = any(inf_terms) ? INFINITY : acc / zt - lzt + lzs;
            if (!grad) continue;
            const vf cq = splat((float)(sc / zs)), cp = splat((float)(sc / zt));
            for (int64_t j = 0; j < v; j += W)
                store(gi, j, v, load(gi, j, v, 0) * cq - load(second, j, v, 0) * cp);
        } else {
            if (any(inf_terms)) {
                flags[i] = 1;
                continue;
            }
            const double r = acc / zs - lzs + lzt;
            values[i] = r;
            if (!grad) continue;
            const vf cq = splat((float)(sc / zs)), c = splat((float)(lzs - lzt + r));
            for (int64_t j = 0; j < v; j += W) {
                const vf es = load(gi, j, v, 0);
                /* q = 0 terms: d may be -inf or NaN there, and their gradient is 0 */
                store(gi, j, v, select(es > 0, es * cq * (load(second, j, v, 0) - c), splat(0)));
            }
        }
    }
}
