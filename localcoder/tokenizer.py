"""Byte-level BPE tokenizer (Qwen2/Qwen3 family) built from GGUF metadata alone.

The BPE merges are run by the ``tokenizers`` library (NFC normalizer, the qwen2 Split regex, ByteLevel
without its own regex), configured with NO added tokens.  Special tokens are matched by this module
itself, on the raw text, before the BPE sees it:

* ``parse_special=True``: every CONTROL (type 3) and USER_DEFINED (type 4) token is matched, leftmost-longest
  (what HF's added-token trie, tiktoken's ``allowed_special="all"`` and llama.cpp's ``parse_special=true`` do).
* ``parse_special=False``: CONTROL tokens (``<|im_start|>``, ``<|im_end|>``, ``<|fim_prefix|>`` ...) are
  NOT matched and become their plain BPE pieces; USER_DEFINED tokens (``<think>``, ``<tool_call>`` ...) are
  still matched, as llama.cpp does with ``parse_special=false`` (and HF does for its non-special added tokens).

UNUSED (type 5, ``[PAD...]``) tokens are never matched in text.

Decoding does not use ``tokenizers``: each id maps to its bytes (GPT-2 byte-to-unicode map reversed for
normal tokens, the UTF-8 text itself for control/user-defined tokens), and the bytes are decoded as UTF-8.
"""

from __future__ import annotations

import bisect
import codecs
import re
from typing import Any, Mapping, Sequence

from localcoder.errors import GGUFError

__all__ = ["Tokenizer", "StreamDecoder", "QWEN2_PRE_REGEX", "bytes_to_unicode"]

# llama.cpp LLAMA_VOCAB_PRE_TYPE_QWEN2 / HF Qwen2 tokenizer.json Split pattern.
QWEN2_PRE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_PRE_REGEXES = {"qwen2": QWEN2_PRE_REGEX}
_SURROGATE = re.compile("[\ud800-\udfff]")  # never in valid text


def as_text(s: str) -> str:
    """s with each lone surrogate as U+FFFD: bytes that were not UTF-8 (argv, stdin, terminals and file names
    are decoded with surrogateescape) or a bad JSON escape, which cannot be written as UTF-8 (as in a file read
    with errors="replace")."""
    return _SURROGATE.sub("\ufffd", s)

# GGUF token types (llama.cpp llama_token_type)
TT_NORMAL, TT_UNKNOWN, TT_CONTROL, TT_USER_DEFINED, TT_UNUSED, TT_BYTE = 1, 2, 3, 4, 5, 6

_K_MODEL = "tokenizer.ggml.model"
_K_PRE = "tokenizer.ggml.pre"
_K_TOKENS = "tokenizer.ggml.tokens"
_K_TYPES = "tokenizer.ggml.token_type"
_K_MERGES = "tokenizer.ggml.merges"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_UNICODE_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}


def _byte_level_to_bytes(piece: str) -> bytes:
    """Bytes of a normal BPE token written in GPT-2 byte-to-unicode form (characters outside the map,
    which a well-formed vocab never has, are taken as their UTF-8)."""
    out = bytearray()
    for ch in piece:
        b = _UNICODE_TO_BYTE.get(ch)
        if b is None:
            out += ch.encode("utf-8")
        else:
            out.append(b)
    return bytes(out)


def _opt_int(meta: Mapping[str, Any], key: str, n_vocab: int) -> int | None:
    v = meta.get(key)
    if v is None:
        return None
    try:
        i = int(v)
    except (TypeError, ValueError):
        raise GGUFError(f"tokenizer metadata {key} is not an integer: {v!r}") from None
    if not 0 <= i < n_vocab:
        raise GGUFError(f"tokenizer metadata {key} = {i} is outside the vocabulary (0..{n_vocab - 1})")
    return i


def _as_str(v: Any) -> str:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).decode("utf-8", errors="replace")
    return str(v)


class Tokenizer:
    """Qwen byte-level BPE tokenizer.  Build with :meth:`from_metadata`."""

    def __init__(self, tokens: list[str], token_types: list[int], merges: list[str], pre: str,
                 eos_token_id: int, bos_token_id: int | None = None, pad_token_id: int | None = None,
                 extra_stop_ids: Sequence[int] = (), fim_ids: Sequence[int | None] = (None, None, None)):
        from tokenizers import Regex, Tokenizer as _HFTokenizer, decoders, models, normalizers, pre_tokenizers

        if pre not in _PRE_REGEXES:
            raise GGUFError(f"unsupported pre-tokenizer {pre!r} (supported: {', '.join(sorted(_PRE_REGEXES))})")
        self.vocab_size: int = len(tokens)
        self.eos_token_id: int = eos_token_id
        self.bos_token_id: int | None = bos_token_id
        self.pad_token_id: int | None = pad_token_id
        self._tokens = tokens
        self._types = token_types

        # BPE model: every token string -> lowest id carrying it; only merges can produce multi-char tokens
        # (ignore_merges=False), so control/unused strings in the vocab are never produced by the BPE itself.
        vocab: dict[str, int] = {}
        for i, t in enumerate(tokens):
            vocab.setdefault(t, i)
        merge_pairs = []
        for m in merges:
            a, sep, b = m.partition(" ")
            if not sep or not a or not b:
                raise GGUFError(f"malformed tokenizer merge {m!r} (expected 'left right')")
            merge_pairs.append((a, b))
        try:
            model = models.BPE(vocab, merge_pairs, ignore_merges=False, fuse_unk=False, byte_fallback=False)
        except Exception as e:  # a merge naming a token that is not in the vocab, ...
            raise GGUFError(f"invalid BPE vocabulary/merges in tokenizer metadata: {e}") from None
        tok = _HFTokenizer(model)
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_PRE_REGEXES[pre]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        self._bpe = tok

        # bytes of every id (decode / streaming)
        self._bytes: list[bytes] = [
            t.encode("utf-8") if ty in (TT_CONTROL, TT_USER_DEFINED, TT_UNUSED) else _byte_level_to_bytes(t)
            for t, ty in zip(tokens, token_types)
        ]
        self._skip_ids = frozenset(i for i, ty in enumerate(token_types) if ty in (TT_CONTROL, TT_UNUSED))

        # special-token matchers (leftmost-longest via longest-first alternation)
        control: dict[str, int] = {}
        user: dict[str, int] = {}
        for i, (t, ty) in enumerate(zip(tokens, token_types)):
            if not t:
                continue
            if ty == TT_CONTROL:
                control.setdefault(t, i)
            elif ty == TT_USER_DEFINED:
                user.setdefault(t, i)
        all_special = dict(user)
        for t, i in control.items():
            all_special.setdefault(t, i)
        self._special_all = all_special
        self._special_user = user
        self._re_all = self._alternation(all_special)
        self._re_user = self._alternation(user)

        # end of generation, as llama.cpp's EOG set: the FIM padding, repository and file separator tokens
        # too (a fill-in-the-middle reply ends with one of them or <|endoftext|>)
        stops = {eos_token_id, *extra_stop_ids}
        for name in ("<|im_end|>", "<|endoftext|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"):
            i = all_special.get(name)
            if i is not None:
                stops.add(i)
        self.stop_token_ids: frozenset[int] = frozenset(stops)

        # fill-in-the-middle (prefix, suffix, middle): the GGUF's ids, else the Qwen-Coder tokens by name;
        # None when the vocabulary lacks one of them
        fim = [i if i is not None else all_special.get(name)
               for i, name in zip(fim_ids, ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"))]
        self.fim_ids: tuple[int, int, int] | None = None if None in fim else tuple(fim)

    @staticmethod
    def _alternation(table: Mapping[str, int]) -> re.Pattern | None:
        if not table:
            return None
        return re.compile("|".join(re.escape(t) for t in sorted(table, key=len, reverse=True)))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> "Tokenizer":
        """Build from GGUF metadata (``{key: field.contents()}`` of a ``gguf.GGUFReader``)."""
        model = meta.get(_K_MODEL)
        if model is None:
            raise GGUFError(f"GGUF has no tokenizer ({_K_MODEL} missing)")
        model = _as_str(model)
        if model != "gpt2":
            raise GGUFError(f"unsupported tokenizer model {model!r}: only byte-level BPE ('gpt2', Qwen) is supported")
        pre = meta.get(_K_PRE)
        if pre is None:
            raise GGUFError(f"tokenizer metadata {_K_PRE} missing: cannot tell which pre-tokenizer to use")
        pre = _as_str(pre)
        if pre not in _PRE_REGEXES:
            raise GGUFError(f"unsupported pre-tokenizer {pre!r} (supported: {', '.join(sorted(_PRE_REGEXES))})")
        for key in (_K_TOKENS, _K_TYPES, _K_MERGES):
            v = meta.get(key)
            if v is None or isinstance(v, (str, bytes)) or not hasattr(v, "__len__") or len(v) == 0:
                raise GGUFError(f"tokenizer metadata {key} missing or empty")
        tokens = [_as_str(t) for t in meta[_K_TOKENS]]
        try:
            types = [int(t) for t in meta[_K_TYPES]]
        except (TypeError, ValueError):
            raise GGUFError(f"tokenizer metadata {_K_TYPES} is not a list of integers") from None
        if len(types) != len(tokens):
            raise GGUFError(f"tokenizer metadata has {len(tokens)} tokens but {len(types)} token types")
        merges = [_as_str(m) for m in meta[_K_MERGES]]
        n = len(tokens)
        eos = _opt_int(meta, "tokenizer.ggml.eos_token_id", n)
        bos = _opt_int(meta, "tokenizer.ggml.bos_token_id", n)
        pad = _opt_int(meta, "tokenizer.ggml.padding_token_id", n)
        if eos is None:
            for name in ("<|im_end|>", "<|endoftext|>"):
                if name in tokens:
                    eos = tokens.index(name)
                    break
            else:
                raise GGUFError("tokenizer metadata tokenizer.ggml.eos_token_id missing")
        extra = [i for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id",
                             "tokenizer.ggml.fim_pad_token_id", "tokenizer.ggml.fim_rep_token_id",
                             "tokenizer.ggml.fim_sep_token_id") if (i := _opt_int(meta, k, n)) is not None]
        fim = [_opt_int(meta, f"tokenizer.ggml.fim_{k}_token_id", n) for k in ("pre", "suf", "mid")]
        return cls(tokens, types, merges, pre, eos_token_id=eos, bos_token_id=bos, pad_token_id=pad,
                   extra_stop_ids=extra, fim_ids=fim)

    # ------------------------------------------------------------------ encode
    def _encode_plain(self, text: str, out: list[int]) -> None:
        # the batch call lets go of the GIL (encode() holds it: a 16 MB prompt stalled the server's event loop
        # for 20 s) and skips the character offsets (1.5x faster); same ids
        if text:
            out.extend(self._bpe.encode_batch_fast([text], add_special_tokens=False)[0].ids)

    def encode(self, text: str, parse_special: bool = False, plain: Sequence[tuple[int, int]] = ()) -> list[int]:
        """Token ids of ``text`` (no BOS is added).  See the module docstring for ``parse_special``.
        ``plain``: sorted, disjoint (start, end) character spans of text tokenized as with parse_special=False
        (a chat message's content: a control token's text there is text, as the user wrote it)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() expects str, got {type(text).__name__}")
        if not text.isascii():
            text = as_text(text)
        pat = self._re_all if parse_special else self._re_user
        table = self._special_all if parse_special else self._special_user
        out: list[int] = []
        if pat is None:
            self._encode_plain(text, out)
            return out
        starts = [a for a, _ in plain]
        pos = 0
        for m in pat.finditer(text):
            if plain and m.group() not in self._special_user:
                k = bisect.bisect_left(starts, m.end()) - 1  # the last span starting before the match ends
                if k >= 0 and plain[k][1] > m.start():
                    continue  # inside a plain span: left to the BPE with the text around it
            self._encode_plain(text[pos:m.start()], out)
            out.append(table[m.group()])
            pos = m.end()
        self._encode_plain(text[pos:], out)
        return out

    # ------------------------------------------------------------------ decode
    def _check_id(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
        return i

    def token_bytes(self, i: int) -> bytes:
        """The raw bytes one token stands for (may be part of a UTF-8 sequence)."""
        return self._bytes[self._check_id(i)]

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of ``ids``; invalid UTF-8 becomes U+FFFD.  ``skip_special`` drops control and unused tokens."""
        skip = self._skip_ids if skip_special else ()
        data = b"".join(self._bytes[self._check_id(i)] for i in ids if not (skip and int(i) in skip))
        return data.decode("utf-8", errors="replace")

    def token_to_id(self, s: str) -> int | None:
        """Id of the vocabulary entry spelled ``s`` in the GGUF's own form (normal tokens are in GPT-2
        byte-to-unicode form, e.g. ``"Ġhello"``; special tokens as written, e.g. ``"<|im_end|>"``)."""
        i = self._special_all.get(s)
        if i is not None:
            return i
        return self._bpe.token_to_id(s)

    def id_to_piece(self, i: int) -> str:
        """Decoded text of one token (U+FFFD where the token is only part of a UTF-8 character)."""
        return self.token_bytes(i).decode("utf-8", errors="replace")

    def is_special(self, i: int) -> bool:
        """True for control and unused tokens (the ones ``skip_special`` drops)."""
        return int(i) in self._skip_ids

    def stream_decoder(self, skip_special: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special=skip_special)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token_id})"


class StreamDecoder:
    """Incremental detokenizer: ``add`` returns only complete text; bytes of a character split across
    tokens are held back until the character is complete (invalid bytes become U+FFFD, as in ``decode``)."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tok = tokenizer
        self._skip = tokenizer._skip_ids if skip_special else frozenset()
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        b = self._tok.token_bytes(token_id)
        if self._skip and int(token_id) in self._skip:
            return ""
        return self._dec.decode(b)

    def flush(self) -> str:
        """Text of any held-back bytes (as U+FFFD if they never formed a character); resets the decoder."""
        out = self._dec.decode(b"", final=True)
        self._dec.reset()
        return out
