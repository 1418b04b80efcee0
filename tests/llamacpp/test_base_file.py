"""kldiv.llamacpp's base files: against an independent reader and quantizer written here from
the format's description (struct and Python floats, one value at a time), round trips, the
decoded values' error bound, and the one-line errors for foreign, truncated and corrupt files.

The format, as the test reads it: b"_logits_", int32 n_ctx, n_vocab, n_chunk, int32 tokens
[n_chunk·n_ctx], then per window n_ctx − 1 − n_ctx//2 rows of (float32 scale, float32 min,
uint16 × V, uint16 padding when V is odd), all little-endian.
"""

from __future__ import annotations

import math
import re
import struct
from array import array

import numpy as np
import pytest

from kldiv.llamacpp import (
    MAGIC,
    BaseFileError,
    QuantizedRows,
    decode_rows,
    quantize_rows,
    read_base,
    write_base,
)

pytestmark = pytest.mark.seeded

F32 = np.float32
EPS32 = float(np.finfo(np.float32).eps)

# --------------------------------------------------------------------------------------------
# The independent implementation


def ref_parse(path):
    """(n_ctx, n_vocab, n_chunk, tokens, rows) with rows[c][r] = (scale, min, [q...])."""
    data = open(path, "rb").read()
    assert data[:8] == b"_logits_"
    n_ctx, n_vocab, n_chunk = struct.unpack_from("<iii", data, 8)
    off = 20
    tokens = list(struct.unpack_from(f"<{n_ctx * n_chunk}i", data, off))
    off += 4 * n_ctx * n_chunk
    nv = 2 * ((n_vocab + 1) // 2) + 4  # uint16 units per row
    rows = []
    for _ in range(n_chunk):
        chunk = []
        for _ in range(n_ctx - 1 - n_ctx // 2):
            scale, mn = struct.unpack_from("<ff", data, off)
            q = array("H")
            q.frombytes(data[off + 8 : off + 8 + 2 * n_vocab])
            chunk.append((scale, mn, list(q)))
            off += 2 * nv
        rows.append(chunk)
    assert off == len(data)
    return n_ctx, n_vocab, n_chunk, tokens, rows


def ref_quantize_row(row):
    """llama.cpp's quantization of one row, element by element: float32 arithmetic (NumPy
    float32 scalars), exp rounded to float32, the sum in a Python float (float64), log rounded
    to float32, round half to even (Python's round)."""
    x = [F32(v) for v in row]
    hi, lo = max(x), min(x)
    lo = max(lo, F32(hi - F32(16)))
    s = 0.0
    for v in x:
        s += float(F32(math.exp(float(F32(v - hi)))))
    lse = F32(math.log(s))
    mn = F32(F32(lo - hi) - lse)
    scale = F32(F32(hi - lo) / F32(65535))
    if scale == 0:
        return float(scale), float(mn), [0] * len(x)
    inv = F32(F32(1) / scale)
    q = [round(float(F32(inv * F32(v - lo)))) if v > lo else 0 for v in x]
    return float(scale), float(mn), q


def ref_log_softmax(row):
    row = [float(v) for v in row]
    m = max(row)
    lse = m + math.log(math.fsum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def make(rng, n_chunk=2, n_ctx=9, n_vocab=37, spread=4.0):
    tokens = rng.integers(0, n_vocab, size=(n_chunk, n_ctx))
    logits = (rng.standard_normal((n_chunk, n_ctx, n_vocab)) * spread).astype(np.float32)
    return tokens, logits


# --------------------------------------------------------------------------------------------
# Writing and reading against the independent implementation


@pytest.mark.parametrize("n_vocab", [37, 40, 1])  # odd (padded), even, a single entry
@pytest.mark.parametrize("n_ctx", [3, 8, 9])
def test_write_matches_the_format_and_llama_cpp_quantization(tmp_path, rng, n_ctx, n_vocab):
    tokens, logits = make(rng, 3, n_ctx, n_vocab, spread=6.0)
    logits[0, -2, :] = 1.5  # a flat row: scale 0, every q 0
    if n_vocab > 2:
        logits[1, -2, 1] = -np.inf  # a masked entry
    path = tmp_path / "b.kld"
    write_base(path, tokens, logits)
    got_ctx, got_vocab, got_chunk, got_tokens, rows = ref_parse(path)
    assert (got_ctx, got_vocab, got_chunk) == (n_ctx, n_vocab, 3)
    assert got_tokens == tokens.reshape(-1).tolist()
    first = n_ctx // 2
    for c in range(3):
        for r, t in enumerate(range(first, n_ctx - 1)):
            assert rows[c][r] == ref_quantize_row(logits[c, t]), (c, t)


def test_read_decodes_every_value_exactly(tmp_path, rng):
    tokens, logits = make(rng, 2, 10, 301, spread=8.0)  # spread 8: most rows fill 16 nats
    path = tmp_path / "b.kld"
    write_base(path, tokens, logits)
    n_ctx, n_vocab, n_chunk, _, rows = ref_parse(path)
    with read_base(path) as base:
        assert (base.n_ctx, base.n_vocab, base.n_chunk) == (n_ctx, n_vocab, n_chunk)
        assert base.positions.tolist() == list(range(5, 9))
        assert base.n_scored == 4 and base.num_tokens == 8 and len(base) == 2
        np.testing.assert_array_equal(base.tokens, tokens)
        np.testing.assert_array_equal(base.labels, tokens[:, 6:10])
        full_rows = labels_below = 0
        for c, (floor, zero, f32) in enumerate(
            zip(
                base.iter_log_probs(below_window="floor"),
                base.iter_log_probs(keep_labels=False),
                base.iter_log_probs(dtype=np.float32, below_window="floor"),
                strict=True,
            )
        ):
            kept = base.log_probs(c)  # the label's entry keeps its stored value
            assert floor.dtype == np.float64 and f32.dtype == np.float32
            for r, (scale, mn, q) in enumerate(rows[c]):
                # the float64 decoding is exact: scale·q + min in exact arithmetic, by fractions
                from fractions import Fraction

                want = [Fraction(scale) * k + Fraction(mn) for k in q]
                assert [Fraction(float(v)) for v in floor[r]] == want
                # float32: llama.cpp's two roundings
                assert f32[r].tolist() == [float(F32(F32(scale) * F32(k)) + F32(mn)) for k in q]
                full = scale * 65535 >= 16 - 2**-8
                full_rows += full
                want_zero = [
                    -math.inf if (full and k == 0) else float(v)
                    for k, v in zip(q, floor[r], strict=True)
                ]
                assert zero[r].tolist() == want_zero
                label = int(base.labels[c, r])
                want_zero[label] = float(floor[r, label])
                assert kept[r].tolist() == want_zero
                labels_below += full and q[label] == 0
    assert full_rows > 0 and labels_below > 0  # both cases are exercised


def test_decoded_values_are_within_half_a_step(tmp_path, rng):
    # Bound: a stored value is within scale/2 of the float32 log-probability of its entry
    # (the rounding to the grid), plus the float32 rounding of the logits, of min_log_prob
    # and of the differences: 8·eps32·(|logit| + 16 + log V) covers them with margin.
    tokens, logits = make(rng, 2, 12, 500, spread=3.0)
    logits += 20.0  # a shift, invisible to the log-probabilities
    path = tmp_path / "b.kld"
    write_base(path, tokens, logits)
    with read_base(path) as base:
        for c, lp in enumerate(base.iter_log_probs(below_window="floor")):
            rec = base.records(c)
            for r, t in enumerate(base.positions):
                exact = np.array(ref_log_softmax(logits[c, t]))
                inside = logits[c, t] > logits[c, t].max() - 16
                bound = float(rec.scale[r]) / 2 + 8 * EPS32 * (
                    np.abs(logits[c, t]).max() + 16 + math.log(500)
                )
                assert np.abs(lp[r] - exact)[inside].max() <= bound


def test_round_trip_is_byte_exact(tmp_path, rng):
    tokens, logits = make(rng, 3, 11, 53)
    a, b = tmp_path / "a.kld", tmp_path / "b.kld"
    write_base(a, tokens, logits)
    with read_base(a) as base:
        write_base(b, base.tokens, base.iter_records())
    assert a.read_bytes() == b.read_bytes()


def test_stored_rows_handed_to_write_base_are_checked(tmp_path, rng):
    """Rows given as QuantizedRows are checked as read_base checks a file's, and nothing is
    left behind when they are refused."""
    tokens, logits = make(rng, 1, 11, 53)
    a = tmp_path / "a.kld"
    write_base(a, tokens, logits)
    with read_base(a) as base:
        good = base.records(0)
        rows = QuantizedRows(good.scale.copy(), good.min_log_prob.copy(), good.q.copy())
    out = tmp_path / "b.kld"
    bad_scale = rows._replace(scale=np.where(np.arange(rows.scale.size) == 2, -1.0, rows.scale))
    cases = [
        (rows._replace(q=rows.q.astype(np.int32)), TypeError, "dtype uint16"),
        (rows._replace(q=rows.q[:-1]), ValueError, r"5 stored rows .* shape \(4, 53\)"),
        (rows._replace(scale=rows.scale[:-1]), ValueError, "`scale` of window 0"),
        (bad_scale, ValueError, r"row 2: scale = -1.0 is outside what llama.cpp writes"),
        (rows._replace(min_log_prob=rows.min_log_prob + 100), ValueError, "min_log_prob"),
    ]
    for bad, error, message in cases:
        with pytest.raises(error, match=message):
            write_base(out, tokens, [bad])
        assert sorted(f.name for f in tmp_path.iterdir()) == ["a.kld"]
    write_base(out, tokens, [rows])
    assert out.read_bytes() == a.read_bytes()


def test_every_input_layout_writes_the_same_bytes(tmp_path, rng):
    tokens, logits = make(rng, 2, 9, 21)
    first, stop = 9 // 2, 8
    outs = []
    variants = [
        logits,  # [n_chunk, n_ctx, V]
        logits[:, first:stop],  # only the scored positions
        (w for w in logits),  # a generator of windows
        [w[first:stop].astype(np.float64) for w in logits],  # float64: rounded to float32
        [quantize_rows(w[first:stop]) for w in logits],  # stored rows, copied
    ]
    for i, lg in enumerate(variants):
        p = tmp_path / f"{i}.kld"
        write_base(p, tokens, lg)
        outs.append(p.read_bytes())
    assert all(o == outs[0] for o in outs)


def test_log_probabilities_quantize_as_their_logits(tmp_path, rng):
    # the quantization depends on the logits only through float32 differences and the
    # log-sum-exp: log-probabilities (shifted logits) give the same q and scale
    _, logits = make(rng, 1, 9, 64, spread=2.0)
    x = logits[0].astype(np.float64)
    lp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    a, b = quantize_rows(x), quantize_rows(lp)
    # float32 rounding of the shifted values moves q by at most one step
    assert np.abs(a.q.astype(int) - b.q.astype(int)).max() <= 1
    np.testing.assert_allclose(a.min_log_prob, b.min_log_prob, rtol=0, atol=4e-6)


def test_requantizing_decoded_values_stays_within_a_step(tmp_path, rng):
    # Re-quantizing decoded values renormalises them (llama.cpp's quantizer subtracts the
    # log-sum-exp), so it is not the identity; q moves by at most one step and the
    # distributions by far less than the grid allows. The byte-exact path is iter_records().
    tokens, logits = make(rng, 2, 9, 200, spread=2.0)
    p = tmp_path / "a.kld"
    write_base(p, tokens, logits)
    with read_base(p) as base:
        for c in range(2):
            rec = base.records(c)
            again = quantize_rows(base.log_probs(c, below_window="floor"))
            assert np.abs(again.q.astype(int) - rec.q.astype(int)).max() <= 1
            np.testing.assert_allclose(again.scale, rec.scale, rtol=4 * EPS32)


def test_windows_put_bos_first(tmp_path, rng):
    tokens, logits = make(rng, 3, 6, 30)
    p = tmp_path / "a.kld"
    write_base(p, tokens, logits)
    with read_base(p) as base:
        w = base.windows(bos_token_id=7)
        assert w.dtype == np.int64 and w.shape == (3, 6)
        assert (w[:, 0] == 7).all() and (w[:, 1:] == tokens[:, 1:]).all()
        np.testing.assert_array_equal(base.windows(None), tokens)
        np.testing.assert_array_equal(base.tokens, tokens)  # the stored tokens are unchanged
        with pytest.raises(ValueError, match=r"bos_token_id` in \[0, 30\)"):
            base.windows(30)
        with pytest.raises(IndexError, match="out of range"):
            base.records(3)
        np.testing.assert_array_equal(base.log_probs(-1), base.log_probs(2))


def test_chunks_are_fresh_arrays(tmp_path, rng):
    tokens, logits = make(rng, 2, 8, 16)
    p = tmp_path / "a.kld"
    write_base(p, tokens, logits)
    base = read_base(p)
    it = base.iter_log_probs()
    first = next(it)
    assert first.flags.owndata and first.flags.writeable
    rest = list(it)
    base.close()
    assert len(rest) == 1 and first.shape == (3, 16)
    assert float(first.sum()) == float(first.sum())  # still readable after close


def test_torch_and_bfloat16_inputs(tmp_path, rng):
    torch = pytest.importorskip("torch")
    tokens, logits = make(rng, 2, 8, 16)
    a, b = tmp_path / "a.kld", tmp_path / "b.kld"
    bf = torch.from_numpy(logits).to(torch.bfloat16)
    write_base(a, torch.from_numpy(tokens), bf)
    write_base(b, tokens, bf.float().numpy())
    assert a.read_bytes() == b.read_bytes()


# --------------------------------------------------------------------------------------------
# Errors


def one_line(e):
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def written(tmp_path, rng, **kw):
    tokens, logits = make(rng, **kw)
    p = tmp_path / "good.kld"
    write_base(p, tokens, logits)
    return p, p.read_bytes()


def test_foreign_files(tmp_path, rng):
    npy = tmp_path / "x.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(BaseFileError) as e:
        read_base(npy)
    assert one_line(e).startswith(f"{npy}: is not a llama.cpp KL-divergence base file")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(BaseFileError, match="starts with b''"):
        read_base(empty)
    with pytest.raises(BaseFileError, match="no such file"):
        read_base(tmp_path / "missing.kld")
    with pytest.raises(BaseFileError, match="is a directory"):
        read_base(tmp_path)


@pytest.mark.parametrize(
    "cut, what",
    [
        (12, "shorter than the 20-byte header"),
        (20 + 4 * 5, "the tokens are cut short"),
        (-1, "1 of 2 windows are complete"),
        (-600, "0 of 2 windows are complete"),
    ],
)
def test_truncated_files(tmp_path, rng, cut, what):
    p, data = written(tmp_path, rng, n_chunk=2, n_ctx=9, n_vocab=37)
    if cut == -1:  # the last byte of the last window is missing
        cut = len(data) - 1
    elif cut < 0:
        cut = len(data) + cut - 4 * 78 * 2  # into the first window
    t = tmp_path / "t.kld"
    t.write_bytes(data[:cut])
    with pytest.raises(BaseFileError) as e:
        read_base(t)
    msg = one_line(e)
    assert msg.startswith(f"{t}: is truncated")
    assert what in msg


def test_inconsistent_headers_and_trailing_bytes(tmp_path, rng):
    p, data = written(tmp_path, rng, n_chunk=2, n_ctx=9, n_vocab=37)
    t = tmp_path / "t.kld"
    t.write_bytes(data + b"\0\0")
    with pytest.raises(BaseFileError, match="has 2 bytes after the last window"):
        read_base(t)
    t.write_bytes(MAGIC + struct.pack("<iii", 2, 37, 2) + data[20:])
    with pytest.raises(BaseFileError, match=r"invalid header \(n_ctx=2"):
        read_base(t)
    # a header that promises more than the file holds (e.g. a different vocabulary size)
    t.write_bytes(MAGIC + struct.pack("<iii", 9, 40, 2) + data[20:])
    with pytest.raises(BaseFileError, match="needs"):
        read_base(t)


def test_corrupt_tokens_and_rows(tmp_path, rng):
    p, data = written(tmp_path, rng, n_chunk=2, n_ctx=9, n_vocab=37)
    t = tmp_path / "t.kld"
    bad = bytearray(data)
    bad[20 + 4 * 10 : 20 + 4 * 11] = struct.pack("<i", 37)  # window 1, position 1
    t.write_bytes(bytes(bad))
    with pytest.raises(BaseFileError) as e:
        read_base(t)
    assert one_line(e) == (
        f"{t}: token 37 at window 1, position 1 is outside the vocabulary [0, 37) (1 such "
        "tokens); the file is corrupt or not a base file"
    )
    assert read_base(t, check_tokens=False).n_chunk == 2
    bad = bytearray(data)
    row = 2 * (2 * 19 + 4)
    off = 20 + 4 * 18 + 4 * row + row  # window 1, second row: its scale
    bad[off : off + 4] = struct.pack("<f", math.nan)
    t.write_bytes(bytes(bad))
    with read_base(t) as base:
        base.log_probs(0)  # window 0 is fine
        with pytest.raises(BaseFileError) as e:
            base.log_probs(1)
    assert one_line(e) == (
        f"{t}: window 1, position 5 stores scale = nan, which llama.cpp never writes; the file "
        "is corrupt or not a base file"
    )


def test_write_errors_leave_no_file(tmp_path, rng):
    tokens, logits = make(rng, 2, 9, 21)
    p = tmp_path / "out.kld"
    cases = [
        (tokens, logits[:1], "shape [n_chunk=2, L, V]"),
        (tokens, iter([logits[0]]), "Expected 2 windows of logits"),
        (tokens, iter([logits[0], logits[1], logits[1]]), "got more"),
        (tokens, logits[:, :5], "shape [9 or 4, V]"),
        (tokens, [logits[0], logits[1][:, :20]], "Expected 21 vocabulary entries"),
        (tokens + 21, logits, "token ids in [0, 21), got"),
        (tokens[:, :2], logits, "n_ctx >= 3"),
    ]
    nan = logits.copy()
    nan[1, 6, 3] = np.nan
    cases.append((tokens, nan, "Window 1: Expected logits without NaN"))
    for toks, lg, match in cases:
        with pytest.raises(ValueError, match=re.escape(match)):
            write_base(p, toks, lg)
        assert list(tmp_path.iterdir()) == []
    with pytest.raises(TypeError, match="integer token ids"):
        write_base(p, tokens.astype(float), logits)


def test_decode_rows_checks_its_options():
    rows = QuantizedRows(np.ones(1, np.float32), np.zeros(1, np.float32), np.zeros((1, 2), "u2"))
    with pytest.raises(ValueError, match="float64 or float32"):
        decode_rows(rows, dtype=np.float16)
    with pytest.raises(ValueError, match="below_window"):
        decode_rows(rows, below_window="drop")  # type: ignore[arg-type]


def test_module_docstring_example():
    import doctest

    import kldiv.llamacpp

    result = doctest.testmod(kldiv.llamacpp, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 8 and result.failed == 0


def test_quantization_blocks_do_not_change_the_bytes(tmp_path, rng, monkeypatch):
    import kldiv.llamacpp

    tokens, logits = make(rng, 2, 9, 50)
    write_base(tmp_path / "a.kld", tokens, logits)
    monkeypatch.setattr(kldiv.llamacpp, "_BLOCK_ELEMENTS", 64)  # 1 row per block
    write_base(tmp_path / "b.kld", tokens, logits)
    assert (tmp_path / "a.kld").read_bytes() == (tmp_path / "b.kld").read_bytes()


def test_headers_and_rows_llama_cpp_never_writes_are_refused(tmp_path):
    """A vocabulary too wide for a row (no allocation, a one-line error), and stored scales
    or minima outside what llama.cpp writes (0 ≤ scale ≤ 16/65535, min ≥ −16 − log V)."""
    import struct

    from kldiv.llamacpp import MAGIC, BaseFileError

    huge = tmp_path / "huge.kld"
    huge.write_bytes(struct.pack("<8siii", MAGIC, 3, 2**31 - 1, 1))
    with pytest.raises(BaseFileError, match="invalid header") as e:
        read_base(huge)
    assert "\n" not in str(e.value)
    tokens = np.zeros((1, 4), np.int64)
    logits = np.random.default_rng(0).normal(size=(1, 4, 5)).astype(np.float32)
    for field, value in (("scale", 1e30), ("min_log_prob", -1e30)):
        path = tmp_path / f"{field}.kld"
        write_base(path, tokens, logits)
        raw = bytearray(path.read_bytes())
        offset = 20 + 4 * 4 + (0 if field == "scale" else 4)  # header, tokens, first row
        raw[offset : offset + 4] = struct.pack("<f", value)
        path.write_bytes(bytes(raw))
        with read_base(path) as base, pytest.raises(BaseFileError, match=field):
            base.log_probs(0)
