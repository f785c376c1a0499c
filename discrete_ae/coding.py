"""Entropy coding: what the integers cost, and the bytes themselves (no `nn` here; discrete_ae/priors.py
holds the models that give the probabilities).

A bottleneck describes its integers to the coder as a list of `Table`s, one per group of symbols
(a stream): the values' offset, their probabilities and whether an escape is needed; a context
prior gives `SequentialTables`, each group's table computed from the groups before it. The same
tables give the ideal code length (`ideal_bits`), one range-coded stream over a whole split
(`Stream`, `stream_bits`) and one byte string per image (`compress` / `decompress`), so the three
rates can never disagree about the model. The range coder is constriction's (Bamler,
"Understanding Entropy Coding With Asymmetric Numeral Systems (ANS): a Statistician's
Perspective", 2022).

Per-image byte string, format version 4 (a 3-byte header, then the payload):

    byte  0     MAGIC (high 4 bits) and FORMAT_VERSION (low 4 bits)
    bytes 1-2   CRC-16/CCITT of (the model's fingerprint, the seed, the decoded integers)
    bytes 3-    the range coder's 32-bit words, big-endian, cut after the last byte the decoder
                needs (it reads missing bytes as zeros; the cut is checked by decoding)

The checksum covers what the decoder produces, not the bytes it read: a truncated or corrupted
string, one written by another model or prior, or one decoded with another seed fails it and raises
`BitstreamError`, except with probability about 2^-16 (a 16-bit check: about 1 damaged string in
65,536 decodes to other integers and passes; docs/reliability.md). Strings are independent: any
subset, in any order, decodes to the same images.
"""
import binascii
import functools
import hashlib
from typing import Callable, NamedTuple

import numpy as np
import torch

from discrete_ae.errors import BitstreamError

ESCAPE_BITS = 16  # a value outside an open alphabet's support is sent raw in 16 bits
ESCAPE_OFFSET = 2 ** (ESCAPE_BITS - 1)  # raw values are sent as value + offset in [0, 2^16)
MAGIC = 0xD  # 4 bits: a random string passes this test 1 time in 16 and then the checksum 1 in 65,536
FORMAT_VERSION = 4  # 4 bits; 2: the DDCL dither no longer depends on a string's place in its batch; 3: context
# tables from the integer network (discrete_ae/exact.py), DDCL's in a window around the prediction; 4: context
# groups in wavefront order (priors.coding_order)
HEADER_BYTES = 3
CUT_GUESS = 2  # bytes _shortest_payload first tries to drop: about the median it drops (docs/codec.md)


# ----------------------------------------------------------------------------- tables

class Table(NamedTuple):
    """How one group (stream) of `count` symbols per image is coded.

    The values lo .. lo + K - 1 (lo .. lo + K - 2 when `open`) have probabilities `probs`, a float64
    array (B or 1, count or 1, K) whose rows sum to 1 and hold no zero: one row for every image and
    position, or one shared row. `lo` is an integer, or an int64 array (B or 1, count) with each
    row's own first value (a window that follows the prediction). With `open`, the last column is
    an escape symbol, after which the value itself follows in ESCAPE_BITS raw bits."""
    lo: int
    probs: np.ndarray
    open: bool
    count: int

    def row(self, i):
        """The table of image i alone."""
        lo = self.lo[i:i + 1] if np.ndim(self.lo) and len(self.lo) > 1 else self.lo
        return self._replace(lo=lo, probs=self.probs[i:i + 1] if self.probs.shape[0] > 1 else self.probs)


class SequentialTables(NamedTuple):
    """The tables of a context model, computed in steps: each step a span of consecutive groups
    whose tables depend only on the integers of the groups before it, which a decoder has read by
    then, so each step's tables come from one network call. make(start, stop, previous (B, start,
    count) int64) -> the Tables of groups start .. stop - 1; make_all(values (B, G, count)) -> every
    group's Table at once, the same bits as make (the encoder's one pass), or None; steps: the
    steps' lengths in groups (None: one group a step).

    The encoder computes every table from the values it sends (`materialise`), the decoder from
    the values it has decoded (`read_batch`, `decode_payloads`): the same function of the same
    integers, so the two agree bit for bit as long as `make` computes each image's table
    independently of the other images in the batch (discrete_ae/exact.py says how)."""
    groups: int
    count: int
    make: Callable
    make_all: Callable = None
    steps: tuple = None


def step_ranges(tables):
    """[(start, stop)] of the groups whose tables are computed together: a context model's steps,
    or all the groups of a list at once."""
    if not isinstance(tables, SequentialTables):
        return [(0, len(tables))]
    bounds = np.cumsum((0,) + tuple(tables.steps or (1,) * tables.groups))
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


def step_tables(tables, start, stop, decoded):
    """The Tables of groups start .. stop - 1: from the list, or computed from the groups before
    them (`decoded` (B, >= start, n))."""
    if isinstance(tables, SequentialTables):
        return tables.make(start, stop, decoded[:, :start])
    return tables[start:stop]


def materialise(tables, values):
    """A list of Tables for `values` (B, G, n): context tables computed from the values before each
    group, as the decoder will compute them; a plain list is returned as it is."""
    if isinstance(tables, SequentialTables):
        if tables.make_all is not None:
            return tables.make_all(values)
        return [t for start, stop in step_ranges(tables) for t in tables.make(start, stop, values[:, :start])]
    return tables


def _shape(tables):
    """(groups, values per group) of a list of Tables or of SequentialTables."""
    if isinstance(tables, SequentialTables):
        return tables.groups, tables.count
    return len(tables), tables[0].count if tables else 0


def _symbols(values, table):
    """values (B, n) int64 -> (symbol ids (B, n) int32, the escaped values in order)."""
    size = table.probs.shape[-1] - table.open
    ids = values - table.lo
    outside = (ids < 0) | (ids >= size)
    if outside.any():
        if not table.open:
            raise ValueError(f"value outside the closed alphabet of {size} values from {np.min(table.lo)}")
        if np.abs(values[outside]).max() >= ESCAPE_OFFSET:
            raise BitstreamError(f"a value of {int(np.abs(values[outside]).max())} is beyond the +-{ESCAPE_OFFSET - 1} "
                                 "that the coder sends: the latent diverged (in training: lower --lr)")
    return np.where(outside, size, ids).astype(np.int32), values[outside]


def ideal_bits(values, tables):
    """(B,) ideal code length of `values` (B, G, n) under `tables` (one per group): -log2 p plus
    ESCAPE_BITS per escaped value."""
    values = np.asarray(values, dtype=np.int64)
    bits = np.zeros(values.shape[0])
    for g, table in enumerate(materialise(tables, values)):
        ids, _ = _symbols(values[:, g], table)
        probs = np.broadcast_to(table.probs, (len(values), table.count, table.probs.shape[-1]))
        p = np.take_along_axis(probs, ids[..., None].astype(np.int64), axis=-1)[..., 0]
        bits += -np.log2(p).sum(1) + ESCAPE_BITS * (ids == table.probs.shape[-1] - 1).sum(1) * table.open
    return bits


class _Coder:
    """constriction models for `tables` over `batch` images, prepared once and reused by every
    encode and decode: a fixed categorical where a table is one shared row, the categorical family
    with one contiguous row per symbol otherwise. When every table has per-symbol rows of one size,
    they are also kept as one block (G, batch, count, K), so that values with no escape are coded
    in one call instead of one per group: the same symbols in the same order, the same bits."""

    def __init__(self, tables, batch):
        import constriction

        model = constriction.stream.model
        self.queue = constriction.stream.queue
        self.tables, self.batch = tables, batch
        self.escape = model.Uniform(2 ** ESCAPE_BITS)
        self.family = model.Categorical(perfect=False)
        self.models = []  # (model, () or (rows (batch * count, K),)) per table
        for t in tables:
            if t.probs.shape[:2] == (1, 1):
                self.models.append((model.Categorical(t.probs[0, 0], perfect=False), ()))
            else:
                shape = (batch, t.count, t.probs.shape[-1])
                rows = (t.probs if t.probs.shape == shape else np.broadcast_to(t.probs, shape)).reshape(-1, shape[-1])
                self.models.append((self.family, (np.ascontiguousarray(rows),)))

    @functools.cached_property
    def block(self):
        """(rows (G, batch, count, K), first values (G, batch or 1, count or 1), sizes (G, 1, 1)) when
        every table has per-symbol rows of one size, else None (built when first asked for: a copy)."""
        sizes = {rows[0].shape[-1] if rows else None for _, rows in self.models}
        if not self.tables or None in sizes or len(sizes) > 1:
            return None
        count = self.tables[0].count
        rows = np.concatenate([rows[0] for _, rows in self.models]).reshape(len(self.tables), self.batch, count, -1)
        if all(np.ndim(t.lo) == 0 for t in self.tables):  # one first value a table: broadcast, not copied
            lo = np.array([t.lo for t in self.tables], dtype=np.int64)[:, None, None]
        else:
            lo = np.stack([np.broadcast_to(t.lo, (self.batch, t.count)) for t in self.tables])
        return rows, lo, np.array([t.probs.shape[-1] - t.open for t in self.tables])[:, None, None]

    def row(self, i):
        """The coder of image i alone."""
        return _ImageCoder(self, i)

    def block_ids(self, values):
        """values (batch, G, n) -> their symbol ids (G, batch, n) in the block, or None when a value
        needs an escape (or there is no block): then the groups are coded one by one."""
        if self.block is None:
            return None
        _, lo, sizes = self.block
        ids = values.transpose(1, 0, 2) - lo
        return ids if (ids >= 0).all() and (ids < sizes).all() else None

    @functools.cached_property
    def block_rows(self):
        """The block's rows (G batch count, K), contiguous, as the coder reads them (a copy for one
        image's slice: made once, however many trial decodes read it)."""
        return np.ascontiguousarray(self.block[0]).reshape(-1, self.block[0].shape[-1])

    def encode(self, encoder, values):
        """Append `values` (batch, G, n) to `encoder`, group by group, escaped values after their group."""
        ids = self.block_ids(values)
        if ids is not None:
            encoder.encode(ids.astype(np.int32).ravel(), self.family, self.block_rows)
            return
        for g, (table, (model, rows)) in enumerate(zip(self.tables, self.models)):
            ids, escaped = _symbols(values[:, g], table)
            encoder.encode(ids.ravel(), model, *rows)
            if len(escaped):
                encoder.encode((escaped + ESCAPE_OFFSET).astype(np.int32), self.escape)

    def decodes_ids(self, decoder, ids):
        """Whether `decoder` reads the block ids `ids` (from block_ids): values with no escape."""
        return np.array_equal(decoder.decode(self.family, self.block_rows), ids.ravel())

    def decode_group(self, decoder, g, i):
        """Group g's (n,) values of image i alone, read from its own decoder (per-image strings)."""
        table, (model, rows) = self.tables[g], self.models[g]
        n = table.count
        ids = (decoder.decode(model, rows[0][i * n:(i + 1) * n]) if rows else decoder.decode(model, n)).astype(np.int64)
        values = ids + (table.lo[min(i, len(table.lo) - 1)] if np.ndim(table.lo) else table.lo)
        if table.open:
            escaped = ids == table.probs.shape[-1] - 1
            if escaped.any():
                values[escaped] = decoder.decode(self.escape, int(escaped.sum())).astype(np.int64) - ESCAPE_OFFSET
        return values

    def decode(self, decoder):
        """(batch, G, n) values read from `decoder` in the order `encode` wrote them."""
        if not any(t.open for t in self.tables) and self.block is not None:  # closed: no escape follows a group
            ids = decoder.decode(self.family, self.block_rows).astype(np.int64).reshape(self.block[0].shape[:3])
            return (ids + self.block[1]).transpose(1, 0, 2)
        count = self.tables[0].count if self.tables else 0
        out = np.empty((self.batch, len(self.tables), count), dtype=np.int64)
        for g, (table, (model, rows)) in enumerate(zip(self.tables, self.models)):
            ids = decoder.decode(model, *rows) if rows else decoder.decode(model, self.batch * table.count)
            ids = ids.reshape(-1, count)
            out[:, g] = ids + table.lo  # lo: a number or (batch or 1, count)
            if table.open:
                escaped = ids == table.probs.shape[-1] - 1
                if escaped.any():
                    raw = decoder.decode(self.escape, int(escaped.sum())).astype(np.int64)
                    out[:, g][escaped] = raw - ESCAPE_OFFSET
        return out


class _ImageCoder(_Coder):
    """The coder of image i of a batch: the block sliced at once (the common path), the per-group
    tables and models (fixed models shared, per-symbol rows sliced) when first needed."""

    def __init__(self, coder, i):
        self.queue, self.escape, self.family, self.batch = coder.queue, coder.escape, coder.family, 1
        if coder.block is not None:
            rows, lo, sizes = coder.block
            self.block = (rows[:, i:i + 1], lo[:, i:i + 1] if lo.shape[1] > 1 else lo, sizes)
        else:
            self.block = None
        self._coder, self._i = coder, i

    @functools.cached_property
    def tables(self):
        return [t.row(self._i) for t in self._coder.tables]

    @functools.cached_property
    def models(self):
        i = self._i
        return [(m, tuple(r[i * t.count:(i + 1) * t.count] for r in rows)) for (m, rows), t in zip(self._coder.models, self.tables)]


class Stream:
    """One range-coded stream over many batches (a whole split): `add` each batch's values (B, G, n)
    with their tables, read `bits_per_image`, then `decodes_back` with the same tables in the same
    order. The tables are passed again rather than kept: per-symbol tables of a whole split would
    not fit in memory."""

    def __init__(self):
        import constriction

        self.encoder = constriction.stream.queue.RangeEncoder()
        self.decoder_type = constriction.stream.queue.RangeDecoder
        self.values = []

    def add(self, values, tables):
        values = np.asarray(values, dtype=np.int64)
        _Coder(materialise(tables, values), len(values)).encode(self.encoder, values)
        self.values.append(values)

    def bits_per_image(self):
        return self.encoder.get_compressed().size * 32.0 / max(1, sum(len(v) for v in self.values))

    def decoder(self):
        """A decoder of the whole stream, for `read_batch` batch by batch."""
        return self.decoder_type(self.encoder.get_compressed())

    def decodes_back(self, tables_per_batch):
        decoder = self.decoder()
        return all(np.array_equal(read_batch(decoder, tables, len(want))[0], want)
                   for tables, want in zip(tables_per_batch, self.values))


def read_batch(decoder, tables, batch):
    """((batch, G, n) values of `batch` images read from one decoder, the list of Tables they were
    read with): group by group (each group of all the images, then its escaped values: the order
    `_Coder.encode` wrote), a context model's tables computed from the values decoded before each
    step, as a receiver computes them."""
    groups, count = _shape(tables)
    out, read = np.zeros((batch, groups, count), dtype=np.int64), []
    for start, stop in step_ranges(tables):
        read += step_tables(tables, start, stop, out)
        out[:, start:stop] = _Coder(read[start:stop], batch).decode(decoder)
    return out, read


def stream_bits(values, tables):
    """(bits per image of one range-coded stream of `values` (B, G, n), whether it decodes back)."""
    stream = Stream()
    stream.add(values, tables)
    return stream.bits_per_image(), stream.decodes_back([tables])


# ----------------------------------------------------------------------------- per-image byte strings

def _checksum(key, values):
    """CRC-16/CCITT of the stream key (model fingerprint and seed) and one image's values."""
    return binascii.crc_hqx(np.ascontiguousarray(values, dtype="<i8").tobytes(), binascii.crc_hqx(key, 0))


def _checksum_matches(key, values, string):
    """Whether `string`'s header holds the checksum of `key` and the values (G, n) it should decode to."""
    return _checksum(key, values) == int.from_bytes(string[1:HEADER_BYTES], "big")


def _words(payload):
    """Big-endian bytes, zero-padded to whole words -> uint32 words."""
    padded = payload + b"\0" * (-len(payload) % 4)
    return np.frombuffer(padded, dtype=">u4").astype(np.uint32)


def _decodes_to(coder, payload, values, ids=None):
    """Whether `payload` decodes to `values`; with their block ids (no escape), in one call."""
    try:
        decoder = coder.queue.RangeDecoder(_words(payload))
        return coder.decodes_ids(decoder, ids) if ids is not None else np.array_equal(coder.decode(decoder), values)
    except Exception:  # constriction refuses data it cannot decode
        return False


def _shortest_payload(coder, words, values):
    """The coder's words as bytes, cut after the last byte the decoder needs. A range coder's final
    word carries more precision than the message needs (a measured ~15 bits per image here);
    dropping the last d bytes, or dropping them and rounding the byte before up, keeps the decoded
    values when the remaining number still lies in the final interval: checked by decoding. A cut
    that decodes leaves every smaller cut decoding (the number it leaves lies between the cut one
    and the whole one, all in the interval), so the search starts at CUT_GUESS bytes and walks up
    or down from there: fewer trial decodes than dropping a byte at a time."""
    payload, ids = words.astype(">u4").tobytes().rstrip(b"\0"), coder.block_ids(values)

    def cut(d):  # the payload less its last d bytes, truncated or rounded up, that decodes; else None
        shorter = payload[:len(payload) - d]
        rounded = (int.from_bytes(shorter, "big") + 1).to_bytes(len(shorter), "big") if shorter and shorter != b"\xff" * len(shorter) else None
        return next((c for c in (rounded, shorter) if c is not None and _decodes_to(coder, c, values, ids)), None)

    d = min(CUT_GUESS, len(payload))
    best = cut(d) if d else payload
    if best is None:  # fewer than the guess: the first cut below it that decodes
        return next((c for c in map(cut, range(d - 1, 0, -1)) if c is not None), payload)
    while d < len(payload) and (longer := cut(d + 1)) is not None:
        best, d = longer, d + 1
    return best


def _keys(key, count):
    return list(key) if isinstance(key, (list, tuple)) else [key] * count


def encode_payloads(values, tables):
    """(B, G, n) integer values -> B range-coded payloads, one per image, each cut after the last
    byte its decoder needs (no header: `compress` adds this repo's, codec.py a file's)."""
    import constriction

    values = np.asarray(values, dtype=np.int64)
    coder, payloads = _Coder(materialise(tables, values), len(values)), []
    for i in range(len(values)):
        one = coder.row(i)
        encoder = constriction.stream.queue.RangeEncoder()
        one.encode(encoder, values[i:i + 1])
        payloads.append(_shortest_payload(one, encoder.get_compressed(), values[i:i + 1]))
    return payloads


def encode_batch(values, tables):
    """(B, G, n) values of B images -> one payload holding them all (group by group, as `Stream`),
    cut after the last byte the decoder needs: codec.py's one stream for the blocks of a photo."""
    import constriction

    values = np.asarray(values, dtype=np.int64)
    coder = _Coder(materialise(tables, values), len(values))
    encoder = constriction.stream.queue.RangeEncoder()
    coder.encode(encoder, values)
    # cuts are checked with the tables of the values sent: a receiver's tables equal them while it
    # decodes those values, so a cut decodes right for both or diverges at the same symbol for both
    return _shortest_payload(coder, encoder.get_compressed(), values)


def decode_batch(payload, tables, batch):
    """`encode_batch`'s payload -> ((B, G, n) values, whether it decoded)."""
    import constriction

    try:
        return read_batch(constriction.stream.queue.RangeDecoder(_words(payload)), tables, batch)[0], True
    except Exception:  # constriction refuses data it cannot decode
        groups, count = _shape(tables)
        return np.zeros((batch, groups, count), dtype=np.int64), False


def compress(values, tables, key):
    """(B, G, n) integer values -> B byte strings (header + payload), one per image.

    key: bytes both sides know (the model's fingerprint and the seed), or one per image; it enters
    the checksum."""
    values = np.asarray(values, dtype=np.int64)
    keys = _keys(key, len(values))
    return [bytes([MAGIC << 4 | FORMAT_VERSION]) + _checksum(k, v).to_bytes(2, "big") + p
            for k, v, p in zip(keys, values, encode_payloads(values, tables))]


def decompress(strings, tables, key):
    """B byte strings from `compress` with the same tables and key -> (B, G, n) values.
    Raises BitstreamError, naming the string, when one is not what `compress` wrote."""
    payloads = [_payload(i, s) for i, s in enumerate(strings)]
    keys = _keys(key, len(strings))
    values, readable = decode_payloads(payloads, tables)
    for i, s in enumerate(strings):
        if not readable[i] or not _checksum_matches(keys[i], values[i], s):
            raise BitstreamError(f"string {i} fails its checksum: it is truncated or corrupted, or was written by "
                                 "another model (or prior), or with another seed than the one passed to decompress")
    return values


def strings_read_back(strings, read, key, values):
    """(B,) whether each string from `compress` decompresses to `values` (B, G, n), given `read`: the
    list of Tables those values are coded with, as a receiver computes them (read_batch). A string
    decodes group by group under tables computed from its own earlier groups; while it agrees with
    `values` those are `read`'s tables, so it decompresses to `values` exactly when it decodes to
    them under `read`: one decode call per string where no value escapes, not one per group."""
    coder, keys = _Coder(read, len(values)), _keys(key, len(strings))
    ok = np.zeros(len(strings), dtype=bool)
    for i, s in enumerate(strings):
        try:
            payload = _payload(i, s)
        except BitstreamError:
            continue
        one = coder.row(i)
        ok[i] = (_checksum_matches(keys[i], values[i], s)
                 and _decodes_to(one, payload, values[i:i + 1], one.block_ids(values[i:i + 1])))
    return ok


def _payload(i, s):
    """String i's payload after its header is checked."""
    if not isinstance(s, (bytes, bytearray)):
        raise BitstreamError(f"string {i} is a {type(s).__name__}, not bytes")
    if len(s) < HEADER_BYTES:
        raise BitstreamError(f"string {i} has {len(s)} bytes, fewer than the {HEADER_BYTES}-byte header: truncated")
    if s[0] >> 4 != MAGIC:
        raise BitstreamError(f"string {i} does not start with this repo's magic 0x{MAGIC:X} "
                             f"(got 0x{s[0] >> 4:X}): not written by model.compress")
    if s[0] & 0xF != FORMAT_VERSION:
        raise BitstreamError(f"string {i} is bitstream format version {s[0] & 0xF}; this code reads version "
                             f"{FORMAT_VERSION}: decode it with the version of this repo that wrote it")
    return bytes(s[HEADER_BYTES:])


def decode_payloads(payloads, tables):
    """Per-image payloads -> ((B, G, n) values, (B,) whether each image decoded). Group by group
    across the images, so that a context model computes each group's tables once for the batch."""
    import constriction

    groups, count = _shape(tables)
    out = np.zeros((len(payloads), groups, count), dtype=np.int64)
    readable = np.ones(len(payloads), dtype=bool)
    decoders = [constriction.stream.queue.RangeDecoder(_words(p)) for p in payloads]
    for start, stop in step_ranges(tables):
        coder = _Coder(step_tables(tables, start, stop, out), len(payloads))
        for i, decoder in enumerate(decoders):
            for g in range(start, stop):
                if readable[i]:
                    try:
                        out[i, g] = coder.decode_group(decoder, g - start, i)
                    except Exception:  # constriction refuses data it cannot decode
                        readable[i] = False
    return out, readable


def fingerprint(module):
    """8 bytes that change with any tensor or setting in `module`'s state_dict (fitted prior included)."""
    h = hashlib.sha256()

    def feed(obj):
        if isinstance(obj, torch.Tensor):
            h.update(str((obj.dtype, tuple(obj.shape))).encode())
            h.update(obj.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if obj.numel() else b"")
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                h.update(str(k).encode())
                feed(obj[k])
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                feed(v)
        else:
            h.update(repr(obj).encode())

    feed(module.state_dict())
    return h.digest()[:8]
