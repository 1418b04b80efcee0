/* The compiled CPU kernel of DistillationLoss: per row of float32 logits, one of six
 * divergences D(T||S) between the teacher's distribution P and the student's Q, and its
 * gradient with respect to the student's logits, in one call.
 *
 * Layer 1 of three (kernel -> launcher `native.py` -> autograd `tensor.py`). Compiled on
 * first use by the system C compiler, with GNU vector extensions so that the same source is
 * vectorised for whatever the machine has (AVX-512 or AVX2) without intrinsics.
 *
 * Per row, passes over data that stays in L2 (a 32k-vocabulary row is 128 KiB a side; the
 * next row's logits are prefetched during pass 2, so that pass 1 too reads from cache):
 *   1. the row maxima m_s, m_t (and so whether the row holds +inf);
 *   2. e_s = exp(a), e_t = exp(b) with a = s/T - m_s, b = t/T - m_t (each logit shifted by
 *      its own row maximum before the two are differenced, so a constant offset between
 *      teacher and student costs no precision) and their sums z_s, z_t; e_s goes to the
 *      gradient row, the second stream to scratch. KL and reverse KL also sum their terms
 *      here;
 *   3. (the other kinds) the terms, which need p = e_t / z_t and q = e_s / z_s, so the sums
 *      first; each element's h_j / q_j (below), up to a constant factor, replaces e_t in
 *      scratch;
 *   4. the gradient from the two stored streams.
 * Two exps per element, and one log for the kinds with a mixture; the [N, V] inputs are read
 * from memory once.
 *
 * Each side's logits may first go through its logit map (the heads' logit_scale and
 * soft-capping, x -> c tanh(s x / c); `lmap` below), wherever a pass reads them, and the
 * gradient row is then multiplied by the student map's derivative: one tanh more per
 * element read, and nothing stored.
 *
 * With d = a - b, c = log z_s - log z_t, and for the gradient through the softmax
 * h_j = q_j * df/dq_j of the summand f (then d/ds_j = (h_j - q_j * sum_k h_k) / T):
 *   0 KL(T||S) = sum_j p_j (b_j - a_j) - log z_t + log z_s,     d/ds_j = (q_j - p_j) / T
 *   1 KL(S||T) = R = sum_j q_j (a_j - b_j) - log z_s + log z_t,  d/ds_j = q_j (d_j - c - R) / T
 *   2 JS  = w KL(P||M) + (1-w) KL(Q||M), M = w P + (1-w) Q;   h = (1-w) q log(q/m)
 *   3 skew KL = KL(P||M), M = w P + (1-w) Q;                  h = -(1-w) q p/m
 *   4 skew reverse KL = KL(Q||M'), M' = w Q + (1-w) P;        h = q (log(q/m') - w q/m')
 *   5 TV  = 1/2 sum_j |p_j - q_j|;                             h = 1/2 q sign(q - p)
 * (4 leaves out h's term q, which cancels against sum_k q_k = 1; sign(0) = 0.) The gradient
 * row is also multiplied by the caller's scale. The weight w is JS's beta or the skew kinds'
 * alpha, 0 < w < 1 (the endpoints, where the divergence is 0 or a plain KL, are the caller's).
 *
 * The mixture is formed from the stored exps, rescaled by z_t (JS, skew KL) or z_s (skew
 * reverse KL) so that one multiply-add makes it: z_t m = w e_t + (1-w)(z_t/z_s) e_s. JS takes
 * log(p/m) = b - log(z_t m) and log(q/m) = a - log(z_t m) + log z_t - log z_s, one log for
 * both; the skew kinds need the ratio x = p/m (resp. q/m') for the gradient anyway, so they
 * divide and take log x. A mixture is at least w times its own side, so these logs are at
 * most -log w (resp. -log(1-w)); the kernel clamps them there, which also gives the exact
 * limit where an underflowing product makes the computed mixture 0.
 *
 * Zero support as in the core: a -inf logit is a zero probability, terms with a zero first
 * argument are 0 (and so is h_j where q_j = 0), and for KL and reverse KL a positive first
 * argument against a zero second one makes the row +inf (tested by d == +inf, so it holds even
 * where the positive side underflows). The mixture kinds and TV are always finite. Rows the
 * kernel does not decide exactly come back flagged for the caller's tensor code: rows holding
 * +inf or NaN, rows that are all -inf on a side, rows with |logit/T| above 2^22 at T != 1
 * (see the row maximum below), reverse-KL rows that are +inf (the core leaves the infinite
 * terms out of that gradient, which needs its masks), and every row of a call whose weight is
 * outside (0, 1), or below 2^-64 for the skew kinds (whose ratios reach 1/w). Rows with
 * keep[i] == 0 are never read: value 0 and a zero gradient row.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* 16 lanes where AVX-512 makes them one register (a third faster there), else 8 (AVX2 fits
 * them in one). The launcher's scratch allows for either. */
#if defined(__AVX512F__)
#define W 16
#else
#define W 8
#endif
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

/* log x for x >= 0 (finite), within 1 ulp (0.76 measured over every float): x = 2^k (1 + f)
 * with 1 + f in [sqrt(1/2), sqrt(2)) (found by offsetting the bits, no comparison), then
 * FreeBSD's logf: s = f / (2 + f), log(1 + f) = f - (f^2/2 - s (f^2/2 + R(s^2))) with a
 * minimax R, and k ln2 added in two parts (ln2_hi has trailing zero bits, so k ln2_hi is
 * exact). Subnormal inputs are scaled by 2^23 first (a ratio of two exps can be subnormal,
 * and its log still weighs in), and 0 gives -inf. Negative, infinite or NaN inputs give
 * unspecified values: callers mask those lanes. */
static inline vf vlog(vf x) {
    const vi sub = x < 0x1p-126f;
    const vi ix = (vi)select(sub, x * 0x1p23f, x) - 0x3f3504f3;
    const vi k = (ix >> 23) - (sub & 23);
    const vf f = (vf)((ix & 0x007fffff) + 0x3f3504f3) - 1.0f;
    const vf s = f / (2.0f + f), z = s * s, w = z * z;
    const vf r =
        z * (0.66666662693f + w * 0.28498786688f) + w * (0.40000972152f + w * 0.24279078841f);
    const vf hfsq = 0.5f * f * f, dk = __builtin_convertvector(k, vf);
    const vf y = dk * 6.9313812256e-01f - ((hfsq - (s * (hfsq + r) + dk * 9.0580006145e-06f)) - f);
    return select(x == 0, splat(-INFINITY), y);
}

static inline vf vmin(vf x, vf c) { return select(x < c, x, c); } /* NaN gives c */

/* tanh y within 1.51 ulp (every float checked): Cephes' odd minimax polynomial below |y| = 0.625 (where
 * 1 - e^(-2|y|) would cancel), (1 - e)/(1 + e) with e = e^(-2|y|) above, the sign restored. */
static inline vf vtanh(vf y) {
    const vf ay = (vf)((vi)y & 0x7fffffff), z = y * y;
    const vf p = ((((-5.70498872745E-3f * z + 2.06390887954E-2f) * z - 5.37397155531E-2f) * z +
                   1.33314422036E-1f) * z - 3.33332819422E-1f) * z * y + y;
    const vf e = vexp(-2.0f * ay);
    const vf big = (vf)(((vi)((1.0f - e) / (1.0f + e))) | ((vi)y & INT32_MIN)); /* sign of y */
    return select(ay < 0.625f, p, big);
}

/* A side's logit map (the heads' logit_scale and soft-capping; kldiv/_spec.py LogitMap):
 * x -> cap * tanh(mul * x) with cap > 0 (mul = scale / cap), else mul * x. +-inf stay +-inf
 * (a ruled-out token stays ruled out); the temperature applies after. */
typedef struct {
    float mul, cap;
} lmap;

static inline vf map_of(lmap m, vf x) {
    if (m.cap > 0) {
        const vi inf = (x == INFINITY) | (x == -INFINITY);
        return select(inf, x, m.cap * vtanh(x * m.mul));
    }
    return m.mul == 1.0f ? x : x * m.mul;
}

/* d map / dx: cap * mul * (1 - tanh^2(mul * x)), 0 at +-inf; mul without a cap. */
static inline vf map_grad(lmap m, vf x) {
    if (m.cap > 0) {
        const vi inf = (x == INFINITY) | (x == -INFINITY);
        const vf th = vtanh(select(inf, splat(0), x) * m.mul);
        return select(inf, splat(0), (m.cap * m.mul) * (1.0f - th * th));
    }
    return splat(m.mul);
}

/* The map of one value, by the same vector code as every element (a libm tanhf could differ
 * by an ulp, which times a large cap would leave the row maximum's exp far from 1). */
static inline float map1(lmap m, float x) { return hmax(map_of(m, splat(x))); }

/* Sums are kept per vector lane over blocks of this many elements and then added in double:
 * float32 lanes alone would lose about log2(V/W) bits. */
#define BLOCK 512

enum { KL = 0, REVERSE_KL = 1, JS = 2, SKEW_KL = 3, SKEW_REVERSE_KL = 4, TV = 5 };

/* Pass 3 of the kinds that need p and q: reads e_s from es and e_t from hq, writes h_j / q_j
 * over e_t (0 where q_j = 0, so finite everywhere) and returns the two sums that pass 4 and
 * the value need: `value` (the divergence) and `h` (sum_j h_j, in units of 1/z_s). */
typedef struct {
    double value, h;
} terms;

static terms js_terms(const float *si, const float *ti, const float *es_row, float *hq,
                      int64_t v, float inv_t, float m_s, float m_t, double w, double zs,
                      double zt, lmap ms_, lmap mt_) {
    const float NEG = -INFINITY;
    const vf beta = splat((float)w), c = splat((float)((1 - w) * zt / zs));
    const vf dl = splat((float)(log(zt) - log(zs)));
    const vf cap_p = splat((float)-log(w)), cap_q = splat((float)-log1p(-w));
    double ap = 0, aq = 0;
    for (int64_t j0 = 0; j0 < v; j0 += BLOCK) {
        const int64_t j1 = j0 + BLOCK < v ? j0 + BLOCK : v;
        vf vp = splat(0), vq = splat(0);
        for (int64_t j = j0; j < j1; j += W) {
            const vf a = map_of(ms_, load(si, j, v, NEG)) * inv_t - m_s;
            const vf b = map_of(mt_, load(ti, j, v, NEG)) * inv_t - m_t;
            const vf es = load(es_row, j, v, 0), et = load(hq, j, v, 0);
            const vf lm = vlog(beta * et + c * es); /* log(z_t m) */
            /* a p = 0 term is 0, where b = -inf makes lp -inf (or NaN with lm = -inf) */
            vp += select(et > 0, et * vmin(b - lm, cap_p), splat(0));
            const vf lq = select(es > 0, vmin(a + dl - lm, cap_q), splat(0));
            vq += es * lq;
            store(hq, j, v, lq);
        }
        ap += hsum(vp);
        aq += hsum(vq);
    }
    return (terms){w * ap / zt + (1 - w) * aq / zs, aq / zs};
}

/* Skew KL (x = p/m, m = w p + (1-w) q) and skew reverse KL (x = q/m', m' = w q + (1-w) p):
 * one loop with the sides swapped, `own` being the divergence's first argument. */
static terms skew_terms(int reverse, const float *es_row, float *hq, int64_t v, double w,
                        double zs, double zt) {
    const vf alpha = splat((float)w), cap = splat((float)(1 / w));
    const vf c = splat((float)(reverse ? (1 - w) * zs / zt : (1 - w) * zt / zs));
    double av = 0, ah = 0;
    for (int64_t j0 = 0; j0 < v; j0 += BLOCK) {
        const int64_t j1 = j0 + BLOCK < v ? j0 + BLOCK : v;
        vf vv = splat(0), vh = splat(0);
        for (int64_t j = j0; j < j1; j += W) {
            const vf es = load(es_row, j, v, 0), et = load(hq, j, v, 0);
            const vf own = reverse ? es : et, other = reverse ? et : es;
            vf x = own / (alpha * own + c * other);
            /* 0 or NaN (0/0): the first argument is 0 here, or so small that x underflows
             * and its term is below float32's range */
            const vi live = x > 0;
            x = vmin(x, cap); /* +inf where the mixture underflowed to 0 */
            const vf lx = vlog(x);
            vv += select(live, own * lx, splat(0));
            const vf hx = select(live, reverse ? lx - alpha * x : x, splat(0));
            vh += es * hx;
            store(hq, j, v, hx);
        }
        av += hsum(vv);
        ah += hsum(vh);
    }
    return (terms){av / (reverse ? zs : zt), ah / zs};
}

static terms tv_terms(const float *es_row, float *hq, int64_t v, double zs, double zt) {
    const vf rho = splat((float)(zs / zt)), half = splat(0.5f), zero = splat(0);
    double av = 0, ah = 0;
    for (int64_t j0 = 0; j0 < v; j0 += BLOCK) {
        const int64_t j1 = j0 + BLOCK < v ? j0 + BLOCK : v;
        vf vv = splat(0), vh = splat(0);
        for (int64_t j = j0; j < j1; j += W) {
            const vf es = load(es_row, j, v, 0), et = load(hq, j, v, 0);
            const vf d = et * rho - es; /* z_s (p - q) */
            vv += (vf)((vi)d & 0x7fffffff);
            const vf sg = select(d < 0, half, select(d > 0, -half, zero));
            vh += es * sg;
            store(hq, j, v, sg);
        }
        av += hsum(vv);
        ah += hsum(vh);
    }
    return (terms){0.5 * av / zs, ah / zs};
}

/* Rows [0, n) of s and t (row strides ss, ts; unit stride along the row). w: the weight of
 * JS and the skew kinds (unused by the others). grad (row stride gs) may be NULL for
 * evaluation only. row_scale (NULL: `scale` for every row) multiplies the gradient. scratch:
 * 2 * (v + W) floats. values[i] and flags[i] are written for every row; flags[i] = 1 means
 * the caller must compute row i (its value and gradient row here are unspecified). maps: the
 * student's and the teacher's logit maps, applied to every logit before inv_t (the gradient
 * is with respect to the unmapped student logits), or NULL. */
void kldiv_cpu_rows(int kind, double w, int64_t n, int64_t v, const float *s, int64_t ss,
                    const float *t, int64_t ts, const uint8_t *keep, float inv_t, float *grad,
                    int64_t gs, const float *row_scale, float scale, float *scratch,
                    double *values, uint8_t *flags, const float *maps) {
    /* maps (NULL: none): {mul, cap} of the student's and then the teacher's logit map */
    const lmap ms_ = maps ? (lmap){maps[0], maps[1]} : (lmap){1.0f, 0.0f};
    const lmap mt_ = maps ? (lmap){maps[2], maps[3]} : (lmap){1.0f, 0.0f};
    const int sgrad = ms_.cap > 0 || ms_.mul != 1.0f; /* the gradient needs map_grad */
    const float NEG = -INFINITY;
    float *second = scratch;      /* e_t (KL, mixtures, TV) or d = a - b (reverse KL) */
    float *own = scratch + v + W; /* e_s when there is no gradient row */
    const int skew = kind == SKEW_KL || kind == SKEW_REVERSE_KL;
    const int bad_weight =
        (kind == JS && !(w > 0 && w < 1)) || (skew && !(w >= 0x1p-64 && w < 1));
    for (int64_t i = 0; i < n; i++) {
        const float *si = s + i * ss, *ti = t + i * ts;
        float *gi = grad ? grad + i * gs : own;
        values[i] = 0;
        flags[i] = 0;
        if (keep && !keep[i]) {
            if (grad) memset(gi, 0, (size_t)v * sizeof(float));
            continue;
        }
        if (bad_weight) {
            flags[i] = 1;
            continue;
        }
        /* Rows holding +inf or NaN go to the caller: +inf makes the row maximum +inf, and NaN
         * (which the maximum skips) makes a sum of pass 2 NaN, so this pass is only maxima. */
        vf ms = splat(NEG), mt = splat(NEG);
        for (int64_t j = 0; j < v; j += W) {
            const vf a = load(si, j, v, NEG), b = load(ti, j, v, NEG);
            ms = select(a > ms, a, ms);
            mt = select(b > mt, b, mt);
        }
        /* the maps are increasing: the maximum of the mapped row is the mapped maximum */
        const float m_s = map1(ms_, hmax(ms)) * inv_t, m_t = map1(mt_, hmax(mt)) * inv_t;
        /* With fused multiply-adds, a = s*inv_t - m_s is exact before its one rounding, so
         * at the row maximum it is the rounding error of m_s, up to |m_s|*2^-24, not 0. That
         * is harmless (and more accurate) while it stays small; beyond |s/T| = 2^22 it could
         * reach e^(tens) and overflow, so such rows go to tensor code. (At T = 1 the product
         * is exact.) */
        const int huge = inv_t != 1.0f && (fabsf(m_s) > 0x1p22f || fabsf(m_t) > 0x1p22f);
        if (huge || !isfinite(m_s) || !isfinite(m_t)) {
            flags[i] = 1;
            continue;
        }
        double zs = 0, zt = 0, acc = 0;
        vi inf_terms = (vi){0};
        /* the next row's logits, fetched towards L2 while this row computes: its first pass
         * then reads from cache instead of waiting on memory */
        const int ahead = i + 1 < n && !(keep && !keep[i + 1]);
        for (int64_t j0 = 0; j0 < v; j0 += BLOCK) {
            const int64_t j1 = j0 + BLOCK < v ? j0 + BLOCK : v;
            vf vzs = splat(0), vzt = splat(0), vacc = splat(0);
            for (int64_t j = j0; j < j1; j += W) {
                if (ahead) {
                    __builtin_prefetch(si + ss + j, 0, 2);
                    __builtin_prefetch(ti + ts + j, 0, 2);
                }
                const vf a = map_of(ms_, load(si, j, v, NEG)) * inv_t - m_s;
                const vf b = map_of(mt_, load(ti, j, v, NEG)) * inv_t - m_t;
                const vf es = vexp(a), et = vexp(b);
                vzs += es;
                vzt += et;
                store(gi, j, v, es);
                if (kind == KL) {
                    const vf d = b - a; /* +inf: p > 0 = q; NaN (both -inf): p = 0, dropped */
                    inf_terms |= d == INFINITY;
                    vacc += select(et > 0, et * d, splat(0));
                    store(second, j, v, et);
                } else if (kind == REVERSE_KL) {
                    const vf d = a - b;
                    inf_terms |= d == INFINITY;
                    vacc += select(es > 0, es * d, splat(0));
                    store(second, j, v, d);
                } else {
                    store(second, j, v, et);
                }
            }
            zs += hsum(vzs);
            zt += hsum(vzt);
            acc += hsum(vacc);
        }
        if (!isfinite(zs) || !isfinite(zt)) { /* a NaN logit */
            flags[i] = 1;
            continue;
        }
        const double lzs = log(zs), lzt = log(zt);
        const double sc = (double)inv_t * (row_scale ? row_scale[i] : scale);
        if (kind == KL) {
            values[i] = any(inf_terms) ? INFINITY : acc / zt - lzt + lzs;
            if (!grad) continue;
            const vf cq = splat((float)(sc / zs)), cp = splat((float)(sc / zt));
            for (int64_t j = 0; j < v; j += W) {
                vf g = load(gi, j, v, 0) * cq - load(second, j, v, 0) * cp;
                if (sgrad) g *= map_grad(ms_, load(si, j, v, 0));
                store(gi, j, v, g);
            }
            continue;
        }
        if (kind == REVERSE_KL) {
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
                vf g = select(es > 0, es * cq * (load(second, j, v, 0) - c), splat(0));
                if (sgrad) g *= map_grad(ms_, load(si, j, v, 0));
                store(gi, j, v, g);
            }
            continue;
        }
        terms r;
        double hscale = 1; /* h_j / q_j is hscale times what pass 3 stored */
        if (kind == JS) {
            r = js_terms(si, ti, gi, second, v, inv_t, m_s, m_t, w, zs, zt, ms_, mt_);
            hscale = 1 - w;
        } else if (skew) {
            r = skew_terms(kind == SKEW_REVERSE_KL, gi, second, v, w, zs, zt);
            if (kind == SKEW_KL) hscale = -(1 - w);
        } else {
            r = tv_terms(gi, second, v, zs, zt);
        }
        values[i] = r.value;
        if (!grad) continue;
        /* h_j - q_j sum_k h_k = hscale q_j (x_j - sum_k q_k x_k), x_j the stored stream */
        const vf cq = splat((float)(hscale * sc / zs)), mean = splat((float)r.h);
        for (int64_t j = 0; j < v; j += W) {
            vf g = load(gi, j, v, 0) * cq * (load(second, j, v, 0) - mean);
            if (sgrad) g *= map_grad(ms_, load(si, j, v, 0));
            store(gi, j, v, g);
        }
    }
}

/* ---- Vocabulary slices: the same divergences when a row is split over ranks ----
 *
 * A rank holding columns [c0, c1) of every row cannot normalise on its own. The vocab-parallel
 * losses therefore run three calls around two collectives: kldiv_cpu_slice_stats (the slice's
 * row maxima and log-sums), an all-gather that combines them into the global shift M and
 * log-normaliser lz of each side, kldiv_cpu_slice_rows without `sum_h` (the slice's share of
 * the value and of sum_j h_j), an all-reduce of those two, and kldiv_cpu_slice_rows with the
 * global sum_h, which writes the slice's gradient (h_j - q_j sum_h) / T.
 *
 * Per element, with a = s/T - M_s, b = t/T - M_t (global shifts), lq = a - lz_s, lp = b - lz_t
 * and q = e^lq, p = e^lp the global probabilities, each kind's summand and h_j = q_j df/dq_j as
 * in the row specification (kldiv/_spec.py):
 *   KL        p (lp - lq)                 h = -p
 *   KL(S||T)  q (lq - lp)                 h = q (lq - lp + 1), 0 where p = 0 (an infinite term)
 *   JS        w p log(p/m) + (1-w) q log(q/m),  m = w p + (1-w) q;    h = (1-w) q log(q/m)
 *   skew KL   p log x,  x = p/m,  m = w p + (1-w) q;                  h = -(1-w) q x
 *   skew KL(S||T)  q log x,  x = q/m',  m' = w q + (1-w) p;           h = q (log x - w x)
 *   TV        |p - q| / 2                 h = q sign(q - p) / 2
 * (skew reverse KL leaves out h's term q, as the row kernel does: summed over the whole row it
 * is 1, and it cancels in h_j - q_j sum_h.) Every term is elementwise, TV's sign included, so a
 * slice's share is the sum over its own columns. The logs of the mixtures are clamped at
 * -log w and -log(1-w) (resp. x at 1/w), the bounds a mixture obeys, as in the row kernel.
 *
 * Zero support as in the row kernel and the core: terms with a zero first argument are 0 (and
 * so is h where q = 0); KL (reverse KL) is +inf where lp - lq (lq - lp) is +inf, tested on the
 * log-ratio so that it holds where the positive side underflows; reverse KL's gradient leaves
 * the infinite terms out, as the core does, so those rows are computed here, not flagged.
 * Flagged for the caller's tensor code: rows whose statistics are not finite (+inf or NaN
 * logits somewhere in the row, a row all -inf on a side), rows with a logit above its shift
 * (statistics that do not belong to these logits), NaN logits, |M/T| above 2^22 at T != 1, and
 * every row of a call whose weight is outside (0, 1) (skew: below 2^-64).
 */

/* Rows [0, n) of a slice (row strides ss, ts). stats (column stride sn: [4, sn]) receives
 * stats[0] = max s/T, stats[sn] = log sum exp(s/T - max), stats[2 sn], stats[3 sn] the same for
 * t; a side whose slice is all -inf (or empty, v = 0) gives -inf, -inf. Rows with +inf or NaN,
 * or |max/T| above 2^22 at T != 1, are flagged; skipped rows (keep[i] == 0) get 0s. */
void kldiv_cpu_slice_stats(int64_t n, int64_t v, const float *s, int64_t ss, const float *t,
                           int64_t ts, const uint8_t *keep, float inv_t, float *stats,
                           int64_t sn, uint8_t *flags) {
    const float NEG = -INFINITY;
    for (int64_t i = 0; i < n; i++) {
        const float *si = s + i * ss, *ti = t + i * ts;
        float *st = stats + i;
        flags[i] = 0;
        if (keep && !keep[i]) {
            st[0] = st[sn] = st[2 * sn] = st[3 * sn] = 0;
            continue;
        }
        vf ms = splat(NEG), mt = splat(NEG);
        for (int64_t j = 0; j < v; j += W) {
            const vf a = load(si, j, v, NEG), b = load(ti, j, v, NEG);
            ms = select(a > ms, a, ms);
            mt = select(b > mt, b, mt);
        }
        const float m_s = hmax(ms) * inv_t, m_t = hmax(mt) * inv_t;
        /* (an all -inf side is not huge: it has no probability here) */
        const int huge = inv_t != 1.0f && ((fabsf(m_s) > 0x1p22f && m_s != NEG) ||
                                           (fabsf(m_t) > 0x1p22f && m_t != NEG));
        if (m_s == INFINITY || m_t == INFINITY || huge) {
            flags[i] = 1;
            continue;
        }
        /* an all -inf side: shift by 0, its exps are all 0 (or NaN, which flags the row) */
        const float sh_s = m_s == NEG ? 0.f : m_s, sh_t = m_t == NEG ? 0.f : m_t;
        const int ahead = i + 1 < n && !(keep && !keep[i + 1]);
        double zs = 0, zt = 0;
        for (int64_t j0 = 0; j0 < v; j0 += BLOCK) {
            const int64_t j1 = j0 + BLOCK < v ? j0 + BLOCK : v;
            vf vzs = splat(0), vzt = splat(0);
            for (int64_t j = j0; j < j1; j += W) {
                if (ahead) {
                    __builtin_prefetch(si + ss + j, 0, 2);
                    __builtin_prefetch(ti + ts + j, 0, 2);
                }
                vzs += vexp(load(si, j, v, NEG) * inv_t - sh_s);
                vzt += vexp(load(ti, j, v, NEG) * inv_t - sh_t);
            }
            zs += hsum(vzs);
            zt += hsum(vzt);
        }
        if (!isfinite(zs) || !isfinite(zt)) { /* a NaN logit */
            flags[i] = 1;
            continue;
        }
        st[0] = m_s;
        st[sn] = (float)log(zs); /* log 0 = -inf: an all -inf side */
        st[2 * sn] = m_t;
        st[3 * sn] = (float)log(zt);
    }
}

/* One row of a slice, specialised per kind (the caller's switch passes a constant). Returns 1
 * where the row must be flagged. */
static inline __attribute__((always_inline)) int slice_row(
    const int kind, double w, int64_t v, const float *si, const float *ti, float inv_t,
    float m_s, float lz_s, float m_t, float lz_t, int grad_mode, double sum_h, float *gi,
    float c, double *value, double *hsum_out) {
    const float NEG = -INFINITY;
    const vf one = splat(1.0f), zero = splat(0), half = splat(0.5f);
    const vf wv = splat((float)w), w1 = splat((float)(1 - w));
    const vf cap_p = splat((float)-log(w)), cap_q = splat((float)-log1p(-w));
    const vf cap_x = splat((float)(1 / w));
    /* the log-normalisers' difference, for the log-ratios of KL and reverse KL */
    const vf dz = splat(lz_s - lz_t);
    const vf sh = splat((float)sum_h), cv = splat(c);
    vi bad = (vi){0}, inf_terms = (vi){0};
    double acc = 0, hacc = 0;
    for (int64_t j0 = 0; j0 < v; j0 += BLOCK) {
        const int64_t j1 = j0 + BLOCK < v ? j0 + BLOCK : v;
        vf vv = zero, vh = zero;
        for (int64_t j = j0; j < j1; j += W) {
            const vf a = load(si, j, v, NEG) * inv_t - m_s;
            const vf b = load(ti, j, v, NEG) * inv_t - m_t;
            bad |= ~(a <= one) | ~(b <= one); /* NaN, or a logit above its shift */
            const vf lq = a - lz_s, lp = b - lz_t;
            const vf q = vexp(lq), p = vexp(lp);
            vf term, h;
            if (kind == KL) {
                const vf d = (b - a) + dz; /* lp - lq; +inf: p > 0 = q */
                inf_terms |= d == INFINITY;
                term = select(p > 0, p * d, zero);
                h = -p;
            } else if (kind == REVERSE_KL) {
                const vf d = (a - b) - dz; /* lq - lp */
                inf_terms |= d == INFINITY;
                const vi live = (q > 0) & (lp > NEG);
                term = select(live, q * d, zero);
                h = select(live, q * (d + one), zero);
            } else if (kind == JS) {
                const vf lm = vlog(wv * p + w1 * q);
                const vf tp = select(p > 0, p * vmin(lp - lm, cap_p), zero);
                const vf lqm = select(q > 0, vmin(lq - lm, cap_q), zero);
                h = w1 * q * lqm;
                term = wv * tp + h;
            } else if (kind == SKEW_KL || kind == SKEW_REVERSE_KL) {
                const int rev = kind == SKEW_REVERSE_KL;
                const vf own = rev ? q : p, other = rev ? p : q;
                vf x = own / (wv * own + w1 * other);
                const vi live = x > 0; /* 0 or NaN (0/0): the first argument is 0 */
                x = vmin(x, cap_x);
                const vf lx = vlog(x);
                term = select(live, own * lx, zero);
                h = select(live, rev ? q * (lx - wv * x) : -(w1 * q * x), zero);
            } else { /* TV */
                const vf d = q - p;
                term = half * (vf)((vi)d & 0x7fffffff);
                h = select(d > 0, half * q, select(d < 0, -(half * q), zero));
            }
            vv += term;
            vh += h;
            if (grad_mode) store(gi, j, v, (h - q * sh) * cv);
        }
        acc += hsum(vv);
        hacc += hsum(vh);
    }
    if ((kind == KL || kind == REVERSE_KL) && any(inf_terms)) acc = INFINITY;
    *value = acc;
    *hsum_out = hacc;
    return any(bad) || isnan(acc) || !isfinite(hacc);
}

/* Rows [0, n) of a slice and the global statistics `stats` (as kldiv_cpu_slice_stats writes
 * them, after combining: column stride sn). Writes values[i], the slice's share of the row's
 * divergence, and hsums[i], its share of sum_j h_j. With sum_h (the global sums) and grad, also
 * the slice's gradient (h_j - q_j sum_h[i]) * inv_t * scale (row_scale[i] if given) into grad
 * (row stride gs). flags[i] = 1: the caller computes row i (values and gradient unspecified).
 * Skipped rows (keep[i] == 0) are never read: 0s, and a zero gradient row. */
void kldiv_cpu_slice_rows(int kind, double w, int64_t n, int64_t v, const float *s, int64_t ss,
                          const float *t, int64_t ts, const uint8_t *keep, float inv_t,
                          const float *stats, int64_t sn, const double *sum_h, float *grad,
                          int64_t gs, const float *row_scale, float scale, double *values,
                          double *hsums, uint8_t *flags) {
    const int skew = kind == SKEW_KL || kind == SKEW_REVERSE_KL;
    const int bad_weight =
        (kind == JS && !(w > 0 && w < 1)) || (skew && !(w >= 0x1p-64 && w < 1));
    const int grad_mode = sum_h != NULL && grad != NULL;
    for (int64_t i = 0; i < n; i++) {
        const float *si = s + i * ss, *ti = t + i * ts;
        float *gi = grad_mode ? grad + i * gs : NULL;
        values[i] = 0;
        hsums[i] = 0;
        flags[i] = 0;
        if (keep && !keep[i]) {
            if (gi) memset(gi, 0, (size_t)v * sizeof(float));
            continue;
        }
        const float m_s = stats[i], lz_s = stats[sn + i];
        const float m_t = stats[2 * sn + i], lz_t = stats[3 * sn + i];
        const int huge = inv_t != 1.0f && (fabsf(m_s) > 0x1p22f || fabsf(m_t) > 0x1p22f);
        if (bad_weight || huge || !isfinite(m_s) || !isfinite(lz_s) || !isfinite(m_t) ||
            !isfinite(lz_t) || (grad_mode && !isfinite(sum_h[i]))) {
            flags[i] = 1;
            continue;
        }
        const double sh = grad_mode ? sum_h[i] : 0;
        const float c = inv_t * (row_scale ? row_scale[i] : scale);
        int flag;
        switch (kind) {
        case KL:
            flag = slice_row(KL, w, v, si, ti, inv_t, m_s, lz_s, m_t, lz_t, grad_mode, sh, gi, c,
                             values + i, hsums + i);
            break;
        case REVERSE_KL:
            flag = slice_row(REVERSE_KL, w, v, si, ti, inv_t, m_s, lz_s, m_t, lz_t, grad_mode, sh,
                             gi, c, values + i, hsums + i);
            break;
        case JS:
            flag = slice_row(JS, w, v, si, ti, inv_t, m_s, lz_s, m_t, lz_t, grad_mode, sh, gi, c,
                             values + i, hsums + i);
            break;
        case SKEW_KL:
            flag = slice_row(SKEW_KL, w, v, si, ti, inv_t, m_s, lz_s, m_t, lz_t, grad_mode, sh,
                             gi, c, values + i, hsums + i);
            break;
        case SKEW_REVERSE_KL:
            flag = slice_row(SKEW_REVERSE_KL, w, v, si, ti, inv_t, m_s, lz_s, m_t, lz_t,
                             grad_mode, sh, gi, c, values + i, hsums + i);
            break;
        default:
            flag = slice_row(TV, w, v, si, ti, inv_t, m_s, lz_s, m_t, lz_t, grad_mode, sh, gi, c,
                             values + i, hsums + i);
        }
        flags[i] = (uint8_t)flag;
    }
}
