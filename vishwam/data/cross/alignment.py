"""Byte alignment of two tokenizations of one text, for cross-tokenizer distillation (host side, NumPy).

Two tokenizers cut the same UTF-8 bytes differently. A *chunk* is a piece of the coarsest common segmentation: a
chunk boundary sits wherever both tokenizations have a token boundary at the same byte, so every chunk is a byte
range that both sides cover with a whole number of their own tokens, and the chunks tile the text. The loss
(`distill.cross_tokenizer`) then compares the two models' log-likelihoods of each chunk with `segment_sum`s over
the per-token chunk ids made here; nothing `[tokens, chunks]`-shaped exists.

Byte offsets come from the tokenizer's character offsets. Where several tokens share one character span (a
byte-level BPE or a byte-fallback tokenizer splitting a multi-byte character into byte tokens), the span is split
across them by each token's own byte length when that is known (a byte-level token's characters, a `<0xAB>`
byte-fallback token), else they stay one unsplittable group (no boundary inside it, which is coarser, never
wrong). Zero-width tokens (a BOS, an EOS between documents) join the chunk that follows them, as in TRL's
`GOLDTrainer._align_by_byte_offsets`: the walk over boundaries pairs the k-th boundary at a byte on one side with
the k-th at the same byte on the other.

Imports `numpy`, `tokenizers` and `vishwam.errors`.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from tokenizers import Tokenizer

from vishwam.errors import DataError

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte, character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_INFO: dict[int, tuple[Tokenizer, dict]] = {}


def _info(tokenizer: Tokenizer) -> dict:
    """What alignment reads from a tokenizer's serialised form (`byte_level`, `byte_fallback`, `unk`, `forms`),
    parsed once per tokenizer object: the JSON of a 150k vocabulary is megabytes, too much to parse per text."""
    hit = _INFO.get(id(tokenizer))
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    text = tokenizer.to_str()
    serial = json.loads(text)
    info = {"byte_level": '"ByteLevel"' in text, "byte_fallback": '"byte_fallback":true' in text.replace(" ", ""),
            "unk": serial["model"].get("unk_token"), "forms": _unicode_forms(serial.get("normalizer"))}
    if len(_INFO) > 16:
        _INFO.clear()
    _INFO[id(tokenizer)] = (tokenizer, info)  # the tokenizer is kept alive, so its id is not reused
    return info


def _kinds(tokenizer: Tokenizer) -> tuple[bool, bool]:
    """`(byte_level, byte_fallback)` of a tokenizer, read from its serialised form."""
    info = _info(tokenizer)
    return info["byte_level"], info["byte_fallback"]


def token_byte_length(token: str, *, byte_level: bool, byte_fallback: bool) -> int | None:
    """The number of text bytes a token's string stands for, where that is known from the string alone."""
    if byte_fallback and _BYTE_FALLBACK.match(token):
        return 1
    if byte_level:
        alphabet = byte_level_alphabet()
        if token and all(c in alphabet for c in token):
            return len(token)
    return None


def _unicode_forms(node) -> list[str]:
    """The Unicode normal forms (`NFC`, ...) a serialised normalizer applies, in order."""
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        return [f for child in node.get("normalizers", []) for f in _unicode_forms(child)]
    return [node["type"]] if node.get("type") in ("NFC", "NFD", "NFKC", "NFKD") else []


def common_text(text: str, *tokenizers: Tokenizer) -> str:
    """The text both sides are aligned on: `text` put through every Unicode normal form the tokenizers'
    normalizers apply (NFC composes `u` + a combining mark into one character, so the normalizing side's offsets
    would otherwise skip the mark's bytes). NFC is idempotent, so the normalizing side sees the same text."""
    for tokenizer in tokenizers:
        for form in _info(tokenizer)["forms"]:
            text = unicodedata.normalize(form, text)
    return text


@dataclass(frozen=True)
class Encoding:
    """One text tokenized with byte offsets: `ids` `[n]` and `spans` `[n, 2]` (start, end) in UTF-8 bytes."""

    ids: np.ndarray
    spans: np.ndarray


def encode_bytes(tokenizer: Tokenizer, text: str, *, add_special_tokens: bool = False,
                 name: str = "tokenizer") -> Encoding:
    """Tokenize `text` and give each token its byte span; spans that do not tile the text are a `DataError`.

    Tiling: in token order, every token of nonzero width starts where the text so far ends (tokens sharing one
    character span count as one group), and the last ends at the text's end. A tokenizer that drops text (a
    `Whitespace` pre-tokenizer drops spaces) or has no offsets fails it. A text the tokenizer cannot encode (its
    unknown token appears: the likelihood would be of the unknown token, not of the text) is a `DataError` too.
    """
    return _with_bytes(tokenizer, text, tokenizer.encode(text, add_special_tokens=add_special_tokens), name)


def encode_bytes_batch(tokenizer: Tokenizer, texts: list[str], *, names: list[str]) -> list[Encoding]:
    """`encode_bytes` of each of `texts` through one `encode_batch` call (the tokenizer's threads)."""
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    return [_with_bytes(tokenizer, t, e, n) for t, e, n in zip(texts, encodings, names)]


def _with_bytes(tokenizer: Tokenizer, text: str, enc, name: str) -> Encoding:
    unk = _info(tokenizer)["unk"]
    if unk is not None and unk in enc.tokens:
        k = enc.tokens.index(unk)
        start = len(text[: enc.offsets[k][0]].encode("utf-8"))
        raise DataError(f"{name} cannot encode the text: unknown token {unk!r} at byte {start} "
                        f"({text[enc.offsets[k][0]: enc.offsets[k][1]]!r})")
    to_byte = char_to_byte(text)
    offsets = np.asarray(enc.offsets, np.int64).reshape(-1, 2)
    spans = to_byte[offsets] if len(offsets) else offsets
    if not _tiles_plainly(spans, int(to_byte[-1])):  # shared or overlapping spans: the token-by-token path
        byte_level, byte_fallback = _kinds(tokenizer)
        spans = _split_shared_spans(spans, enc.tokens, byte_level=byte_level, byte_fallback=byte_fallback)
        _check_tiling(spans, int(to_byte[-1]), name)
    return Encoding(np.asarray(enc.ids, np.int32), spans)


def char_to_byte(text: str) -> np.ndarray:
    """`[len(text) + 1]` int64: the UTF-8 byte offset of each character offset of `text`."""
    out = np.zeros(len(text) + 1, np.int64)
    points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), "<u4")
    np.cumsum(1 + (points >= 0x80) + (points >= 0x800) + (points >= 0x10000), out=out[1:])
    return out


def _tiles_plainly(spans: np.ndarray, n_bytes: int) -> bool:
    """Whether the spans tile the text with no two tokens sharing or overlapping a span (the common case, checked
    with array operations): each nonzero-width span starts where the one before ends, the first at 0 and the
    last ending at `n_bytes`, and each zero-width token sits inside the last nonzero span before it or at its
    end. `_split_shared_spans` then changes nothing and `_check_tiling` passes."""
    width = spans[:, 1] > spans[:, 0]
    nz = spans[width]
    if len(nz) == 0:
        return n_bytes == 0 and not len(spans)
    if nz[0, 0] != 0 or nz[-1, 1] != n_bytes or np.any(nz[1:, 0] != nz[:-1, 1]):
        return False
    zero = np.flatnonzero(~width)
    if len(zero) == 0:
        return True
    before = np.cumsum(width)[zero] - 1  # the last nonzero span before each zero-width token (-1: none)
    lo = np.where(before >= 0, nz[np.maximum(before, 0), 0], 0)
    hi = np.where(before >= 0, nz[np.maximum(before, 0), 1], 0)
    return bool(np.all((lo <= spans[zero, 0]) & (spans[zero, 0] <= hi)))


def _split_shared_spans(spans: np.ndarray, tokens: list[str], *, byte_level: bool, byte_fallback: bool) -> np.ndarray:
    """Split each run of tokens with one identical nonzero span by the tokens' byte lengths, where they add up."""
    spans = spans.copy()
    i, n = 0, len(spans)
    while i < n:
        j = i + 1
        while j < n and spans[j, 0] == spans[i, 0] and spans[j, 1] == spans[i, 1]:
            j += 1
        start, end = spans[i]
        if j - i > 1 and end > start:
            lengths = [token_byte_length(t, byte_level=byte_level, byte_fallback=byte_fallback) for t in tokens[i:j]]
            if None not in lengths and sum(lengths) == end - start:
                cuts = start + np.cumsum([0] + lengths)
                spans[i:j, 0], spans[i:j, 1] = cuts[:-1], cuts[1:]
        i = j
    # A byte-level token may also hold part of a character and more (its span then overlaps a neighbour's): lay
    # it out from the end of the text so far by its byte length, when that stays inside its character span.
    cursor = 0
    for k in range(n):
        start, end = int(spans[k, 0]), int(spans[k, 1])
        if end == start:
            continue
        overlap = start < cursor or (k + 1 < n and spans[k + 1, 0] < end and spans[k + 1, 1] > spans[k + 1, 0])
        length = token_byte_length(tokens[k], byte_level=byte_level, byte_fallback=byte_fallback) if overlap else None
        if length is not None and max(start, cursor) + length <= end:
            start = max(start, cursor)
            spans[k] = start, start + length
        cursor = max(cursor, int(spans[k, 1]))
    return spans


def _check_tiling(spans: np.ndarray, n_bytes: int, name: str) -> None:
    cursor = group_start = 0  # the text covered so far ends at `cursor`; the current group starts at `group_start`
    for k, (start, end) in enumerate(spans.tolist()):
        if start == end and group_start <= start <= cursor:
            continue  # a zero-width token
        if start == cursor and end > start:
            group_start, cursor = start, end
        elif group_start <= start < cursor and end > start:
            cursor = max(cursor, end)  # overlaps the current group (a shared span that could not be split)
        else:
            raise DataError(f"{name}: byte offsets do not tile the text (token {k} spans bytes {start}-{end}, "
                            f"the text so far ends at byte {cursor})")
    if cursor != n_bytes:
        raise DataError(f"{name}: byte offsets do not tile the text (they end at byte {cursor} of {n_bytes})")


def boundaries(spans: np.ndarray) -> list[tuple[int, int]]:
    """The token boundaries of one tokenization: `(token index, byte)` for each token after which the text can be
    cut, i.e. every token before it ends at or before `byte` and every nonzero-width token after it starts at or
    after it."""
    n = len(spans)
    if n == 0:
        return []
    ends, keep = _boundary_arrays(spans)
    return [(int(i), int(ends[i])) for i in np.flatnonzero(keep)]


def _boundary_arrays(spans: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(ends, keep)`: the text covered after each token, and whether the text can be cut after it."""
    ends = np.maximum.accumulate(spans[:, 1])
    width = spans[:, 1] > spans[:, 0]
    starts = np.where(width, spans[:, 0], np.iinfo(np.int64).max)
    after = np.minimum.accumulate(starts[::-1])[::-1]  # after[i]: the least start of tokens i..n-1
    next_start = np.append(after[1:], np.iinfo(np.int64).max)
    return ends, ends <= next_start


@dataclass(frozen=True)
class Alignment:
    """Chunk ids of each side's tokens (`student_chunk` `[n_student]`, `teacher_chunk` `[n_teacher]`, int32, in
    `0 .. n_chunks-1`, nondecreasing), and `one_to_one` `[n_chunks]`: the chunk is one token on each side and both
    are the same string."""

    student_chunk: np.ndarray
    teacher_chunk: np.ndarray
    one_to_one: np.ndarray

    @property
    def n_chunks(self) -> int:
        return len(self.one_to_one)


def align(student: Encoding, teacher: Encoding, *, student_strings: list[str] | None = None,
          teacher_strings: list[str] | None = None, student_keys: np.ndarray | None = None,
          teacher_keys: np.ndarray | None = None) -> Alignment:
    """Chunk the text at every byte where both tokenizations have a boundary (see the module docstring).

    `one_to_one` says a chunk is one token each side and both are the same string: `student_strings` and
    `teacher_strings` (each token's string in a common form, e.g. its bytes), or `student_keys`/`teacher_keys`
    (int arrays, equal keys for equal strings) decide it; without either it compares spans (the same bytes).

    TRL's walk over the two sides' boundaries, pairing the k-th boundary at a byte on one side with the k-th at
    the same byte on the other, is a join on `(byte, rank among the boundaries at that byte)`.
    """
    sides = []
    for enc in (student, teacher):
        ends, keep = _boundary_arrays(enc.spans) if len(enc.spans) else (np.zeros(0, np.int64), np.zeros(0, bool))
        index = np.flatnonzero(keep)
        byte = ends[index]
        rank = np.arange(len(byte)) - np.searchsorted(byte, byte)  # boundaries come in byte order
        sides.append((index, byte, rank))
    scale = max(len(sides[0][0]), len(sides[1][0])) + 1
    (s_index, s_byte, s_rank), (t_index, t_byte, t_rank) = sides
    _, si, ti = np.intersect1d(s_byte * scale + s_rank, t_byte * scale + t_rank, assume_unique=True,
                               return_indices=True)
    s_cut, t_cut = np.sort(s_index[si]), np.sort(t_index[ti])  # the last token of each matched chunk
    n_s, n_t = len(student.spans), len(teacher.spans)
    s_chunk = np.searchsorted(s_cut, np.arange(n_s), side="left").astype(np.int32)
    t_chunk = np.searchsorted(t_cut, np.arange(n_t), side="left").astype(np.int32)
    last = lambda cut: int(cut[-1]) if len(cut) else -1  # noqa: E731
    tail = last(s_cut) + 1 < n_s or last(t_cut) + 1 < n_t  # tokens after the last common boundary: one more chunk
    chunk = len(s_cut) + bool(tail)
    s_count = np.bincount(s_chunk, minlength=chunk)
    t_count = np.bincount(t_chunk, minlength=chunk)
    one = (s_count == 1) & (t_count == 1)
    if one.any():
        cs = np.flatnonzero(one)
        i, j = np.searchsorted(s_chunk, cs), np.searchsorted(t_chunk, cs)
        if student_keys is not None and teacher_keys is not None:
            one[cs] = student_keys[i] == teacher_keys[j]
        elif student_strings is not None and teacher_strings is not None:
            one[cs] = [student_strings[a] == teacher_strings[b] for a, b in zip(i.tolist(), j.tolist())]
        else:
            one[cs] = np.all(student.spans[i] == teacher.spans[j], axis=1)
    return Alignment(s_chunk, t_chunk, one)


def string_keys(student: list[bytes | None], teacher: list[bytes | None]) -> tuple[np.ndarray, np.ndarray]:
    """Per-id keys of two tokenizers' token strings (`token_bytes`), equal where the strings are equal: `align`'s
    `student_keys`/`teacher_keys` as `keys[ids]`, with no Python per token."""
    index: dict = {}
    keys = [np.asarray([index.setdefault(b, len(index)) for b in table], np.int64) for table in (student, teacher)]
    return keys[0], keys[1]


def token_bytes(tokenizer: Tokenizer) -> list[bytes | None]:
    """Each vocabulary id's bytes where its string says them (byte-level, byte-fallback, `▁` for a space in a
    Metaspace tokenizer, else the string's UTF-8), `None` for special/added tokens. Used to find the shared
    vocabulary (ids of the two tokenizers with the same bytes)."""
    byte_level, byte_fallback = _kinds(tokenizer)
    metaspace = '"Metaspace"' in tokenizer.to_str()
    alphabet = byte_level_alphabet()
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    out: list[bytes | None] = [None] * tokenizer.get_vocab_size(with_added_tokens=True)
    for string, i in tokenizer.get_vocab(with_added_tokens=True).items():
        m = _BYTE_FALLBACK.match(string) if byte_fallback else None
        if m is None and string in special:
            continue
        if m:
            out[i] = bytes([int(m.group(1), 16)])
        elif byte_level and all(c in alphabet for c in string):
            out[i] = bytes(alphabet[c] for c in string)
        else:
            out[i] = (string.replace("▁", " ") if metaspace else string).encode("utf-8")
    return out


def token_byte_lengths(tokenizer: Tokenizer, vocab_size: int | None = None) -> np.ndarray:
    """`[vocab_size]` int32: the UTF-8 bytes each id stands for (0 for special tokens and ids past the tokenizer),
    so that a label's bytes are a table look-up (bits per byte without the text)."""
    table = token_bytes(tokenizer)
    n = len(table) if vocab_size is None else vocab_size
    out = np.zeros(n, np.int32)
    for i, b in enumerate(table[:n]):
        out[i] = 0 if b is None else len(b)
    return out


def shared_vocab(student: Tokenizer, teacher: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """`(student_ids, teacher_ids)`, int32, the pairs of ids whose tokens are the same bytes (specials excluded),
    in the student's id order."""
    t_index = {b: i for i, b in enumerate(token_bytes(teacher)) if b is not None}
    pairs = [(i, t_index[b]) for i, b in enumerate(token_bytes(student)) if b is not None and b in t_index]
    if not pairs:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    s, t = zip(*pairs)
    return np.asarray(s, np.int32), np.asarray(t, np.int32)
