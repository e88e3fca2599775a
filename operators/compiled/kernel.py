"""The compiled per-device step: one call runs every device's whole run of readings of a batch (numba).

The maths is :func:`~liquidstream.operators.fused_step.run_wave`'s, reading by reading instead of wave by wave:
forecast at the real gap, the anomaly likelihoods, the alert state machine and its lifecycle, the statistics,
the cell step and the forecast at the usual gap, all in float32 like the tensor path (``fastmath`` off, every
constant cast to float32 first), so the two agree to float32 rounding (the order of the sums inside a matrix
product differs).  Matrix-vector products run as ``out += W^T[k] * v[k]`` over a ``[in, out]`` weight, whose
inner loop is independent per output and vectorises without reassociating any sum.

``tanh`` and the logistic function run as a rational approximation (Eigen's ``ptanh`` for float32, relative
error below 4e-7, against torch's own vectorised float32 ``tanh`` of about 6e-8): the libm calls cost 20 ns each,
a quarter of the step, where the approximation vectorises like the matrix products.  ``error_model="numpy"``
(IEEE division, no Python ``ZeroDivisionError`` check) is what lets those loops vectorise.

Everything numba compiles lives in this one module: numba's on-disk cache (``cache=True``) is checked against
this file's timestamp only, so a kernel split over modules could run stale code after an edit.  For the same
reason no constant is imported: :mod:`~liquidstream.operators.compiled.path` passes them in ``fset`` / ``iset``
(indices ``F_*`` / ``I_*`` below) and the field offsets in ``off`` (``O_*``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar, cast

import numpy as np
from numba import njit

F32 = np.float32
_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def cached_jit(fn: _Fn) -> _Fn:
    """numba's ``njit`` with its on-disk cache, or without it where no cache folder is writable (a read-only
    install: numba refuses ``cache=True`` at decoration then, and the kernel compiles in memory on first use)."""
    try:
        return cast(_Fn, njit(cache=True, error_model="numpy")(fn))
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return cast(_Fn, njit(error_model="numpy")(fn))
# fset (float64, cast to float32 once per call): settings and the step's constants.
(F_STATS_ALPHA, F_MAX_GAP, F_THRESHOLD, F_LOG10_CALM, F_TIME_SCALE, F_MIN_STD, F_CLIP_Z, F_SHORT_ALPHA,
 F_LONG_ALPHA, F_S2_FLOOR, F_S2_CLIP, F_CAL_P, F_CAL_ALPHA, F_CAL_FLOOR, F_LOG10_CAL_P, F_GAP_ALPHA,
 F_CALIB_CLAMP, F_CALIB_MIN, F_DEFAULT_GAP, F_SCORE_HALF, F_STD_SHIFT, F_LOG10_K, F_LTC_EPS, F_SIZE) = range(24)
# iset (int64): settings, switches and the AlertReason codes.
(I_COMMISSIONING, I_WARMUP, I_STUCK_AFTER, I_EXIT_AFTER, I_MAX_ALERT, I_COOLDOWN, I_STUCK_RULE, I_LEVEL_RULE,
 I_MIN_READINGS, I_CELL, I_LECUN, I_R_LIK, I_R_STUCK, I_R_LEVEL, I_LTC_UNFOLDS, I_SIZE) = range(16)
# off (int64): column of each field in its dtype's block (float32 / int32 / bool / int16).
(O_H, O_X_LAST, O_MEAN, O_VAR, O_GAP, O_CALIB, O_PEAK, O_LIK_N, O_COMM, O_AGE, O_COOLDOWN, O_CALM, O_OPEN,
 O_REPEATS, O_REASON, O_STUCK, O_SIZE) = range(17)
#: Cell kinds (iset[I_CELL]).
CELL_CFC, CELL_LIQUID, CELL_LTC = 0, 1, 2


@cached_jit
def _affine(wt: np.ndarray, v: np.ndarray, out: np.ndarray, accumulate: bool) -> None:
    """out (+)= wt^T v, wt [len(v), len(out)] float32.  Four weight rows per pass over ``out`` (a quarter of the
    loads and stores of out); each out[j] still adds its terms one at a time in k order, so the sums round
    exactly as a plain loop over k would."""
    if not accumulate:
        out[:] = F32(0.0)
    kk, jj = v.shape[0], out.shape[0]
    k = 0
    while k + 4 <= kk:
        a0, a1, a2, a3 = v[k], v[k + 1], v[k + 2], v[k + 3]
        w0, w1, w2, w3 = wt[k], wt[k + 1], wt[k + 2], wt[k + 3]
        for j in range(jj):
            out[j] = out[j] + w0[j] * a0 + w1[j] * a1 + w2[j] * a2 + w3[j] * a3
        k += 4
    while k < kk:
        a0, w0 = v[k], wt[k]
        for j in range(jj):
            out[j] += w0[j] * a0
        k += 1


# Eigen's float32 tanh: x p(x^2) / q(x^2) on [-_TANH_CLAMP, _TANH_CLAMP], x itself below 4e-4.
_TA = (F32(-2.76076847742355e-16), F32(2.00018790482477e-13), F32(-8.60467152213735e-11), F32(5.12229709037114e-08),
       F32(1.48572235717979e-05), F32(6.37261928875436e-04), F32(4.89352455891786e-03))
_TB = (F32(1.19825839466702e-06), F32(1.18534705686654e-04), F32(2.26843463243900e-03), F32(4.89352518554385e-03))
_TANH_CLAMP = F32(7.90531110763549805)


@cached_jit
def _tanh(v: np.float32) -> np.float32:
    x = min(max(v, -_TANH_CLAMP), _TANH_CLAMP)
    x2 = x * x
    p = x2 * _TA[0] + _TA[1]
    p = x2 * p + _TA[2]
    p = x2 * p + _TA[3]
    p = x2 * p + _TA[4]
    p = x2 * p + _TA[5]
    p = x2 * p + _TA[6]
    q = x2 * _TB[0] + _TB[1]
    q = x2 * q + _TB[2]
    q = x2 * q + _TB[3]
    return v if abs(v) < F32(0.0004) else x * p / q


@cached_jit
def _sigmoid(v: np.float32) -> np.float32:
    return F32(0.5) + F32(0.5) * _tanh(F32(0.5) * v)


@cached_jit
def _log_ndtr(x: float) -> float:
    """log of the standard normal CDF at x (float64): erfc down to -30, the asymptotic series below."""
    if x > -30.0:
        return math.log(0.5 * math.erfc(-x / math.sqrt(2.0)))
    x2 = 1.0 / (x * x)
    series = 1.0 - x2 * (1.0 - 3.0 * x2 * (1.0 - 5.0 * x2 * (1.0 - 7.0 * x2 * (1.0 - 9.0 * x2))))
    return -0.5 * x * x - math.log(-x) - 0.5 * math.log(2.0 * math.pi) + math.log(series)


@cached_jit
def _features(v: np.ndarray, t: np.float32, feat: np.ndarray) -> None:
    """feat = [v; log1p(max(t, 0)); 1] (the model's input features with the bias row)."""
    c = v.shape[0]
    feat[:c] = v
    feat[c] = F32(math.log1p(max(t, F32(0.0))))
    feat[c + 1] = F32(1.0)


@cached_jit
def _head_base(h: np.ndarray, x_in: np.ndarray, hh: np.ndarray, hx: np.ndarray, base: np.ndarray) -> None:
    """The forecast head's first layer without its gap feature: hh^T h + hx[:C]^T x_in + bias.  Both forecasts
    of a reading's neighbourhood share it: the one at the usual gap after reading i and the one at the real gap
    before reading i + 1 read the same state and the same normalised reading (only the gap differs)."""
    c = x_in.shape[0]
    _affine(hh, h, base, False)
    _affine(hx[:c], x_in, base, True)
    for j in range(base.shape[0]):
        base[j] += hx[c + 1, j]


@cached_jit
def _head(base: np.ndarray, x_in: np.ndarray, t: np.float32, hx: np.ndarray, ho: np.ndarray, min_std: np.float32,
          shift: np.float32, act: np.ndarray, out: np.ndarray, mu: np.ndarray, sd: np.ndarray,
          ab: np.ndarray) -> None:
    """Forecaster.forecast_columns_all for one device from :func:`_head_base`: mean, std and the absolute forecast
    (if ``ho`` has 3C columns) of the reading ``t`` model-time units after ``x_in``."""
    c, units = x_in.shape[0], base.shape[0]
    feature = F32(math.log1p(max(t, F32(0.0))))
    for j in range(units):
        a = base[j] + hx[c, j] * feature
        act[j] = a * _sigmoid(a)  # SiLU
    act[units] = F32(1.0)
    _affine(ho, act, out, False)  # the last row of ho is the bias
    for k in range(c):
        mu[k] = x_in[k] + out[k]
        s = out[c + k] + shift
        sd[k] = min_std + (s if s > F32(20.0) else F32(math.log1p(F32(math.exp(s)))))  # softplus
        if out.shape[0] > 2 * c:
            ab[k] = out[2 * c + k]


@cached_jit
def _synapses(pre: np.ndarray, syn: np.ndarray, num: np.ndarray, den: np.ndarray) -> None:
    """LTC synapses into every neuron: num = sum_pre s w erev, den = sum_pre s w with s = sigmoid(offset + pre
    sigma); ``syn`` [4, pre, post] = sigma | offset | w erev | w (ltc._synapses)."""
    num[:] = F32(0.0)
    den[:] = F32(0.0)
    for i in range(pre.shape[0]):
        p = pre[i]
        for j in range(num.shape[0]):
            s = _sigmoid(syn[1, i, j] + p * syn[0, i, j])
            num[j] += s * syn[2, i, j]
            den[j] += s * syn[3, i, j]


@cached_jit
def _ltc(h: np.ndarray, feat: np.ndarray, t: np.float32, lsyn: np.ndarray, lsens: np.ndarray, lvec: np.ndarray,
         lmap: np.ndarray, unfolds: int, eps: np.float32, o: np.ndarray) -> None:
    """LTCCell.forward in place on ``h``: ``lvec`` [3, H] = cm | gleak | vleak, ``lmap`` [2, in] the input
    mapping's scale and shift (1 and 0 where the mapping has none)."""
    n, n_in = h.shape[0], lsens.shape[1]
    a0, g0, num, den = o[:n], o[n:2 * n], o[2 * n:3 * n], o[3 * n:4 * n]
    pre = feat[:n_in].copy()
    for i in range(n_in):
        pre[i] = feat[i] * lmap[0, i] + lmap[1, i]
    _synapses(pre, lsens, num, den)
    for j in range(n):
        a0[j] = lvec[1, j] * lvec[2, j] + num[j]
        g0[j] = lvec[1, j] + den[j]
    e = max(t, F32(0.0)) / F32(unfolds)
    for _ in range(unfolds):
        _synapses(h, lsyn, num, den)  # at the current v, for every neuron, before any moves
        for j in range(n):
            g = g0[j] + den[j]
            h[j] = h[j] + e * (a0[j] + num[j] - g * h[j]) / (lvec[0, j] + e * g + eps)


@cached_jit
def _advance(h: np.ndarray, x_n: np.ndarray, t: np.float32, cell: int, lecun: bool, c0h: np.ndarray,
             c0x: np.ndarray, cmid: np.ndarray, chead: np.ndarray, ctau: np.ndarray, lsyn: np.ndarray,
             lsens: np.ndarray, lvec: np.ndarray, lmap: np.ndarray, unfolds: int, eps: np.float32,
             feat: np.ndarray, v1: np.ndarray, v2: np.ndarray, o: np.ndarray) -> None:
    """The cell step in place on ``h``: CfCCell.serve_columns (default mode), LiquidCell or LTCCell.forward."""
    n = h.shape[0]
    _features(x_n, t, feat)
    if cell == CELL_LTC:
        _ltc(h, feat, t, lsyn, lsens, lvec, lmap, unfolds, eps, o)
        return
    u = c0h.shape[1]
    if cell == CELL_LIQUID:  # f = tanh(U h + W x + b); h += (f - h) * (1 - exp(-dt / tau))
        _affine(c0h, h, o[:n], False)
        _affine(c0x, feat, o[:n], True)  # the last row of c0x is the bias
        tt = max(t, F32(0.0))
        for j in range(n):
            gain = -F32(math.expm1(-(tt / ctau[j])))
            h[j] = h[j] + (_tanh(o[j]) - h[j]) * gain
        return
    _affine(c0h, h, v1[:u], False)
    _affine(c0x, feat, v1[:u], True)
    _activate(v1, u, lecun)
    a, b = v1, v2
    for layer in range(cmid.shape[0]):
        _affine(cmid[layer], a, b[:u], False)
        _activate(b, u, lecun)
        a, b = b, a
    _affine(chead, a, o, False)
    tt = max(t, F32(0.0))
    for j in range(2 * n):
        o[j] = _tanh(o[j])
    for j in range(n):
        ff1, ff2 = o[j], o[n + j]
        gate = _sigmoid(o[3 * n + j] + o[2 * n + j] * tt)
        h[j] = ff1 + gate * (ff2 - ff1) if gate < F32(0.5) else ff2 - (ff2 - ff1) * (F32(1.0) - gate)  # torch.lerp


@cached_jit
def _activate(v: np.ndarray, u: int, lecun: bool) -> None:
    """The backbone's activation on v[:u] (LeCun's scales are folded into the weights), and the bias row v[u] = 1."""
    if lecun:
        for j in range(u):
            v[j] = _tanh(v[j])
    else:
        for j in range(u):
            v[j] = v[j] * _sigmoid(v[j])
    v[u] = F32(1.0)


@cached_jit
def _scale(mean: np.float32, var: np.float32) -> np.float32:
    """normalization.scale: sqrt(var + (1e-3 (|mean| + 1))^2)."""
    floor = F32(1e-3) * (abs(mean) + F32(1.0))
    return F32(math.sqrt(var + floor * floor))


@cached_jit
def run_devices(starts: np.ndarray, rows: np.ndarray, pos: np.ndarray, xs: np.ndarray, dts: np.ndarray,
                cnts: np.ndarray, resets: np.ndarray, fb: np.ndarray, ib: np.ndarray, bb: np.ndarray,
                sb: np.ndarray, off: np.ndarray, lik: np.ndarray, fset: np.ndarray, iset: np.ndarray,
                c0h: np.ndarray, c0x: np.ndarray, cmid: np.ndarray, chead: np.ndarray, ctau: np.ndarray,
                lsyn: np.ndarray, lsens: np.ndarray, lvec: np.ndarray, lmap: np.ndarray, hh: np.ndarray,
                hx: np.ndarray, ho: np.ndarray, out_f: np.ndarray, out_b: np.ndarray) -> None:
    """Every device's run of readings: device ``d`` owns readings ``starts[d]:starts[d + 1]`` (event order) and
    store row ``rows[d]``; reading ``e`` writes column ``pos[e]`` of ``out_f`` float32 [3C + 6, M] and ``out_b``
    int8 [4, M] (layout.OutputRows and the FLAG_* rows).  ``xs`` float32 [M, C] raw values, ``dts`` float32
    seconds since the previous applied reading, ``cnts`` int64 readings applied before, ``resets`` bool.
    ``fb``/``ib``/``bb``/``sb`` are the store's float32/int32/bool/int16 blocks, updated in place; ``lik``
    int64 [K, 6]: per likelihood scored (in the tensor path's order) the columns of its s2, m, mu, v, cal and
    its residual (0 delta, 1 absolute, 2 level).  Cell weights are transposed ``[in, out]`` with the bias as the
    last row: ``c0h``/``c0x`` the first layer's h and feature parts, ``cmid`` [L - 1, U + 1, U], ``chead``;
    ``ctau`` the liquid cell's time constants; ``lsyn``/``lsens``/``lvec``/``lmap`` the LTC cell's (see
    :func:`_ltc`); ``hh``/``hx``/``ho`` the forecast head's.  The cells' unused arrays are placeholders."""
    c, n, k_lik = xs.shape[1], lvec.shape[1], lik.shape[0]
    alpha, max_gap, thr = F32(fset[F_STATS_ALPHA]), F32(fset[F_MAX_GAP]), F32(fset[F_THRESHOLD])
    log10_calm, tscale, min_std = F32(fset[F_LOG10_CALM]), F32(fset[F_TIME_SCALE]), F32(fset[F_MIN_STD])
    clip, short, long_a = F32(fset[F_CLIP_Z]), F32(fset[F_SHORT_ALPHA]), F32(fset[F_LONG_ALPHA])
    s2_floor, s2_clip, cal_p = F32(fset[F_S2_FLOOR]), F32(fset[F_S2_CLIP]), F32(fset[F_CAL_P])
    cal_alpha, cal_floor, log10_cal_p = F32(fset[F_CAL_ALPHA]), F32(fset[F_CAL_FLOOR]), F32(fset[F_LOG10_CAL_P])
    gap_alpha, calib_clamp, calib_min = F32(fset[F_GAP_ALPHA]), F32(fset[F_CALIB_CLAMP]), F32(fset[F_CALIB_MIN])
    default_gap, half, shift = F32(fset[F_DEFAULT_GAP]), F32(fset[F_SCORE_HALF]), F32(fset[F_STD_SHIFT])
    log10_k, ln10, one, zero = F32(fset[F_LOG10_K]), F32(math.log(10.0)), F32(1.0), F32(0.0)
    warmup, stuck_after, min_readings = iset[I_WARMUP], iset[I_STUCK_AFTER], iset[I_MIN_READINGS]
    settle_at = max(warmup // 2, 2)
    stuck_cap, repeat_at = min(stuck_after, 32767), max(stuck_after // 2, 2)
    stuck_rule, level_rule, lecun, cell = iset[I_STUCK_RULE] != 0, iset[I_LEVEL_RULE] != 0, iset[I_LECUN] != 0, \
        iset[I_CELL]
    oh, oxl, omean, ovar, ocal, ostuck, orep = off[O_H], off[O_X_LAST], off[O_MEAN], off[O_VAR], off[O_CALIB], \
        off[O_STUCK], off[O_REPEATS]
    feat, act, hout = np.empty(c + 2, F32), np.empty(hx.shape[1] + 1, F32), np.empty(ho.shape[1], F32)
    base = np.empty(hx.shape[1], F32)
    unfolds, eps = iset[I_LTC_UNFOLDS], F32(fset[F_LTC_EPS])
    u = c0h.shape[1]
    v1, v2, o = np.empty(u + 1, F32), np.empty(u + 1, F32), np.empty(max(chead.shape[1], 4 * n), F32)
    scratch = np.empty((11, c), F32)
    sc, last_z, last_in, mu, sd, ab = scratch[0], scratch[1], scratch[2], scratch[3], scratch[4], scratch[5]
    x_z, x_s, x_n, mu2, sd2 = scratch[6], scratch[7], scratch[8], scratch[9], scratch[10]
    stuck_ch = np.empty(c, np.bool_)
    r, q = np.empty((k_lik, c), F32), np.empty((k_lik, c), F32)
    m_new, raw, lp = np.empty(k_lik, F32), np.empty(k_lik, F32), np.empty(k_lik, F32)
    for d in range(starts.shape[0] - 1):
        row = rows[d]
        f, i32, bl, s16 = fb[row], ib[row], bb[row], sb[row]
        h = f[oh:oh + n]
        have_base = False  # base holds the head's first layer at (h, x_n) of the device's previous reading
        for e in range(starts[d], starts[d + 1]):
            x, dt, cnt, p = xs[e], dts[e], cnts[e], pos[e]
            first = cnt == 0
            # 1. forecast this reading from the state before it, at the real gap
            for k in range(c):
                sc[k] = _scale(f[omean + k], f[ovar + k])
                last_z[k] = (f[oxl + k] - f[omean + k]) / sc[k]
                last_in[k] = min(max(last_z[k], -clip), clip)
            if not have_base:  # (else last_in is the previous reading's x_n, bit for bit: same values, same ops)
                _head_base(h, last_in, hh, hx, base)
            _head(base, last_in, dt / tscale, hx, ho, min_std, shift, act, hout, mu, sd, ab)
            for k in range(c):
                mu[k] = mu[k] + (last_z[k] - last_in[k])
                x_z[k] = (x[k] - f[omean + k]) / sc[k]
            comm = i32[off[O_COMM]]
            n_comm = comm if comm >= 0 else iset[I_COMMISSIONING]
            in_comm, settled = cnt < n_comm, cnt >= settle_at
            warm = cnt >= warmup and not in_comm
            # 2. anomaly likelihoods, combined with a Bonferroni correction
            lik_n = i32[off[O_LIK_N]]
            best = zero
            for j in range(k_lik):
                s2o, mo, muo, vo, calo, kind = lik[j, 0], lik[j, 1], lik[j, 2], lik[j, 3], lik[j, 4], lik[j, 5]
                qmax = F32(-np.inf)
                for k in range(c):
                    r[j, k] = x_z[k] - (mu[k] if kind == 0 else ab[k] if kind == 1 else zero)
                    q[j, k] = r[j, k] * r[j, k] / f[s2o + k]
                    qmax = max(qmax, q[j, k])
                a = F32(math.log1p(qmax))  # = max_k log1p(q_k): log1p is monotone
                m = a if lik_n == 0 else f[mo] + short * (a - f[mo])
                m_new[j] = m if settled else f[mo]
                z = (m_new[j] - f[muo]) / F32(math.sqrt(f[vo] + F32(1e-12)))
                raw[j] = F32(_log_ndtr(-z)) / ln10
                lp[j] = min(raw[j] + F32(math.log10(max(f[calo], cal_floor))), zero) if lik_n >= min_readings \
                    else zero
                best = lp[j] if j == 0 else min(best, lp[j])
            log10_p = min(best + log10_k, zero) if k_lik > 1 else best
            for k in range(c):  # OutputRows.expected / expected_std: per channel, the residual that sets its z
                jb = 0
                for j in range(1, k_lik):
                    if q[j, k] > q[jb, k]:
                        jb = j
                if k_lik > 0:
                    out_f[3 * c + 6 + k, p] = x[k] - r[jb, k] * sc[k]
                    out_f[4 * c + 6 + k, p] = F32(math.sqrt(f[lik[jb, 0] + k])) * sc[k]
            if first:
                log10_p = F32(np.nan)
            any_stuck = False
            for k in range(c):
                run = min(s16[ostuck + k] + 1, stuck_cap) if x[k] == f[oxl + k] and not first else 0
                s16[ostuck + k] = run
                bl[orep + k] = bl[orep + k] or (in_comm and run >= repeat_at)
                stuck_ch[k] = run >= stuck_after and not bl[orep + k]
                any_stuck = any_stuck or stuck_ch[k]
            condition = stuck_rule and any_stuck and not in_comm
            if condition:
                log10_p = min(zero if math.isnan(log10_p) else log10_p, -thr)
            # 3. alert state machine
            was_open, age0, cd0 = bl[off[O_OPEN]], i32[off[O_AGE]], i32[off[O_COOLDOWN]]
            opened = (log10_p < -thr or condition) and not was_open and warm and cd0 <= 0
            is_open = was_open or opened
            calm = i32[off[O_CALM]] + 1 if is_open and log10_p > log10_calm and not condition and not opened else 0
            age = age0 + 1 if is_open and not opened else 0
            closing = is_open and not opened and (calm >= iset[I_EXIT_AFTER] or age >= iset[I_MAX_ALERT])
            in_alert = is_open and not closing
            i32[off[O_COOLDOWN]] = iset[I_COOLDOWN] if closing else max(cd0 - 1, 0)
            i32[off[O_AGE]], i32[off[O_CALM]] = (0, 0) if closing else (age, calm)
            bl[off[O_OPEN]] = in_alert
            closed = is_open and not in_alert
            learn_ok = not is_open or in_comm
            # 4. statistics learn
            lik_learn = learn_ok and settled
            nf = F32(lik_n)
            al = max(one / (nf + one), long_a)
            ac = max(one / (nf + one), cal_alpha)
            for j in range(k_lik):
                s2o, mo, muo, vo, calo = lik[j, 0], lik[j, 1], lik[j, 2], lik[j, 3], lik[j, 4]
                if lik_learn:
                    for k in range(c):
                        s2 = f[s2o + k]
                        r2 = min(r[j, k] * r[j, k], s2_clip * s2)
                        f[s2o + k] = max(s2 + al * (r2 - s2), s2_floor)
                    dm = m_new[j] - f[muo]
                    f[muo] = f[muo] + al * dm
                    f[vo] = one if lik_n == 0 else (one - al) * (f[vo] + al * dm * dm)
                    if lik_n >= min_readings:
                        hit = one / cal_p if raw[j] < log10_cal_p else zero
                        f[calo] = f[calo] + ac * (hit - f[calo])
                f[mo] = m_new[j]
            i32[off[O_LIK_N]] = lik_n + (1 if lik_learn else 0)
            w = max(one / (F32(cnt) + one), alpha)
            var_learn = learn_ok and (n_comm <= 0 or in_comm)
            n_settled = max(F32(cnt - settle_at + 1), one)
            w_cal = max(one / n_settled, alpha)
            for k in range(c):
                mean, var = f[omean + k], f[ovar + k]
                delta = x[k] - mean
                if learn_ok:
                    f[omean + k] = mean + w * delta
                if var_learn:
                    f[ovar + k] = (one - w) * (var + w * delta * delta)
                zr = (x_z[k] - mu[k]) / sd[k]
                raw_z2 = min(zr * zr, calib_clamp)
                cb = f[ocal + k]
                f[ocal + k] = max(cb + w_cal * (raw_z2 - cb) if learn_ok and settled else cb, calib_min)
            # 5. fold the reading into the hidden state
            if resets[e]:
                h[:] = zero
            for k in range(c):
                sc[k] = _scale(f[omean + k], f[ovar + k])
                x_s[k] = (x[k] - f[omean + k]) / sc[k]
                x_n[k] = min(max(x_s[k], -clip), clip)
            _advance(h, x_n, dt / tscale, cell, lecun, c0h, c0x, cmid, chead, ctau, lsyn, lsens, lvec, lmap, unfolds,
                     eps, feat, v1, v2, o)
            gap0, gap_dt = f[off[O_GAP]], min(dt, max_gap)
            gap = default_gap if first else gap0 if dt <= zero else gap_dt if cnt == 1 else \
                gap0 + gap_alpha * (gap_dt - gap0)
            f[off[O_GAP]] = gap
            # 6. forecast the next reading at the usual gap, back in raw units
            _head_base(h, x_n, hh, hx, base)
            have_base = True
            _head(base, x_n, gap / tscale, hx, ho, min_std, shift, act, hout, mu2, sd2, ab)
            for k in range(c):
                out_f[k, p] = f[omean + k] + (mu2[k] + (x_s[k] - x_n[k])) * sc[k]
                out_f[c + k, p] = sd2[k] * sc[k] * F32(math.sqrt(f[ocal + k]))
                qk = q[0, k]
                for j in range(1, k_lik):
                    qk = max(qk, q[j, k])
                out_f[2 * c + k, p] = F32(np.inf) if stuck_ch[k] else F32(math.sqrt(qk))
                f[oxl + k] = x[k]
            score = -log10_p + zero
            out_f[3 * c, p], out_f[3 * c + 1, p], out_f[3 * c + 2, p] = gap, score, thr
            out_f[3 * c + 3, p] = score / (score + half)
            reason = iset[I_R_LIK]
            if level_rule and lp[k_lik - 1] <= best:
                reason = iset[I_R_LEVEL]
            if condition:
                reason = iset[I_R_STUCK]
            live = in_alert or closed
            alert_reason = reason if opened else s16[off[O_REASON]]
            s_now = zero if math.isnan(score) else score
            peak = s_now if opened else max(f[off[O_PEAK]], s_now) if live else zero
            out_f[3 * c + 4, p] = peak
            out_f[3 * c + 5, p] = 1 if opened else age0 + 2 if live else 0
            out_b[0, p], out_b[1, p], out_b[3, p] = 1 if in_alert else 0, 1 if opened else 0, 1 if closed else 0
            out_b[2, p] = reason if opened or not live else alert_reason
            f[off[O_PEAK]] = peak if in_alert else zero
            s16[off[O_REASON]] = alert_reason if in_alert else 0
