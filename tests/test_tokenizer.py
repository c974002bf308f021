"""Tokenizer built from GGUF metadata alone vs. tiktoken / HF reference ids."""

import json

import pytest

from conftest import gguf_metadata

from localcoder.errors import GGUFError
from localcoder.tokenizer import StreamDecoder, Tokenizer, bytes_to_unicode

FULL_GGUF = "qwen-tokenizer/qwen3-tokenizer-vocab.gguf"
TINY_GGUF = "qwen3next-tiny/gguf/qwen3next-tiny-Q4_K_M.gguf"


@pytest.fixture(scope="module")
def full_meta(request, fixtures_dir):
    return gguf_metadata(fixtures_dir / FULL_GGUF)


@pytest.fixture(scope="module")
def tok(full_meta):
    return Tokenizer.from_metadata(full_meta)


@pytest.fixture(scope="module")
def tiny_meta(request, fixtures_dir):
    return gguf_metadata(fixtures_dir / TINY_GGUF)


@pytest.fixture(scope="module")
def tiny_tok(tiny_meta):
    return Tokenizer.from_metadata(tiny_meta)


@pytest.fixture(scope="module")
def reference(fixtures_dir):
    with open(fixtures_dir / "qwen-tokenizer" / "tiktoken_reference.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert len(rows) == 483
    return rows


def _mismatches(rows, got):
    return [(r["text"][:60], r["ids"][:12], g[:12]) for r, g in zip(rows, got) if r["ids"] != g]


# ---------------------------------------------------------------------------------------------- full vocab


def test_metadata_fields(tok):
    assert tok.vocab_size == 151936
    assert tok.eos_token_id == 151645
    assert tok.bos_token_id == 151643
    assert tok.pad_token_id == 151643
    # <|im_end|>, <|endoftext|>, and llama.cpp's FIM end-of-generation tokens <|fim_pad|>, <|repo_name|>,
    # <|file_sep|>
    assert tok.stop_token_ids == frozenset({151645, 151643, 151662, 151663, 151664})
    assert isinstance(tok.stop_token_ids, frozenset)


def test_fim_ids(full_meta, tok):
    """<|fim_prefix|>, <|fim_suffix|>, <|fim_middle|> by name; the GGUF's fim_*_token_id win when present;
    None when the vocabulary lacks them."""
    assert tok.fim_ids == (151659, 151661, 151660)
    meta = dict(full_meta, **{"tokenizer.ggml.fim_pre_token_id": 151665, "tokenizer.ggml.fim_mid_token_id": 7})
    assert Tokenizer.from_metadata(meta).fim_ids == (151665, 151661, 7)
    tokens = [t.replace("fim_suffix", "fim_after") for t in full_meta["tokenizer.ggml.tokens"]]
    assert Tokenizer.from_metadata(dict(full_meta, **{"tokenizer.ggml.tokens": tokens})).fim_ids is None


def test_reference_ids(tok, reference):
    got = [tok.encode(r["text"], parse_special=True) for r in reference]
    bad = _mismatches(reference, got)
    assert not bad, f"{len(bad)}/{len(reference)} mismatches, first: {bad[:3]}"


def test_decode_round_trip(tok, reference):
    for r in reference:
        assert tok.decode(r["ids"]) == r["text"]
        assert tok.decode(tok.encode(r["text"], parse_special=False)) == r["text"]


def test_parse_special_false_does_not_match_control_tokens(tok, reference):
    assert tok.encode("<|im_end|>", parse_special=True) == [151645]
    plain = tok.encode("<|im_end|>")
    assert 151645 not in plain and len(plain) > 1
    assert tok.decode(plain) == "<|im_end|>"
    assert tok.encode("a<|im_start|>user\nhi<|endoftext|>") == tok.encode("a<|im_start|>user\nhi<|endoftext|>",
                                                                           parse_special=False)
    control = {i for i in range(151643, 151669) if tok.is_special(i)}
    assert control == set(range(151643, 151657)) | set(range(151659, 151665))
    for r in reference:
        ids = tok.encode(r["text"])
        assert not control.intersection(ids), r["text"][:60]
        if not any(tok.id_to_piece(i) in r["text"] for i in control):
            assert ids == r["ids"], r["text"][:60]


def test_user_defined_tokens_always_matched(tok):
    # llama.cpp parse_special=false semantics: USER_DEFINED tokens (<think>, <tool_call>, ...) are plain vocabulary
    assert tok.encode("<think>\n\n</think>") == [151667, 271, 151668]
    assert tok.encode("<tool_call>") == [151657]
    assert tok.token_to_id("<tool_response>") == 151665


def test_unused_tokens_never_matched(tok):
    assert tok.id_to_piece(151669) == "[PAD151669]"
    for special in (False, True):
        ids = tok.encode("[PAD151669][PAD151935]", parse_special=special)
        assert all(i < 151643 for i in ids)
        assert tok.decode(ids) == "[PAD151669][PAD151935]"


def test_token_lookup(tok):
    assert tok.token_to_id("<|im_end|>") == 151645
    assert tok.token_to_id("<|endoftext|>") == 151643
    hello = tok.token_to_id("Ġhello")
    assert hello is not None and tok.id_to_piece(hello) == " hello"
    assert tok.token_to_id("definitely not a token") is None
    assert tok.id_to_piece(151645) == "<|im_end|>"
    assert tok.id_to_piece(198) == "\n"
    with pytest.raises(ValueError):
        tok.id_to_piece(151936)


def test_decode_skip_special(tok):
    ids = tok.encode("<|im_start|>assistant\n<think>x</think>ok<|im_end|>", parse_special=True)
    assert tok.decode(ids) == "<|im_start|>assistant\n<think>x</think>ok<|im_end|>"
    assert tok.decode(ids, skip_special=True) == "assistant\n<think>x</think>ok"


def test_empty(tok):
    assert tok.encode("") == []
    assert tok.encode("", parse_special=True) == []
    assert tok.decode([]) == ""


def _stream(tok, ids, **kw):
    dec = tok.stream_decoder(**kw)
    assert isinstance(dec, StreamDecoder)
    pieces = [dec.add(i) for i in ids]
    pieces.append(dec.flush())
    return pieces


def test_stream_decoder_matches_full_decode(tok, reference):
    split_chars = 0  # tokens that are not valid UTF-8 on their own (a character spread over tokens)
    for r in reference:
        full = tok.decode(r["ids"])
        assert full == r["text"]
        out = ""
        for piece in _stream(tok, r["ids"]):
            out += piece
            assert full.startswith(out), r["text"][:60]  # never a U+FFFD (or anything) the full text lacks
        assert out == full
        split_chars += sum("\ufffd" in tok.id_to_piece(i) for i in r["ids"])
    assert split_chars > 50  # the reference really exercises split multi-byte characters


def test_stream_decoder_emoji_split(tok):
    text = "ok 🙂👩‍💻 done"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.id_to_piece(i) for i in ids)  # at least one emoji spans tokens
    pieces = _stream(tok, ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stream_decoder_invalid_bytes(tok):
    b2u = bytes_to_unicode()
    lone = tok.token_to_id(b2u[0x80])  # a lone continuation byte
    lead = tok.token_to_id(b2u[0xF0])  # the lead byte of a 4-byte sequence
    a = tok.token_to_id("a")
    ids = [a, lone, a, lead]
    assert tok.decode(ids) == "a\ufffda\ufffd"
    pieces = _stream(tok, ids)
    assert "".join(pieces) == "a\ufffda\ufffd"
    assert pieces[-2] == "" and pieces[-1] == "\ufffd"  # the truncated sequence only shows up on flush


def test_stream_decoder_skip_special(tok):
    ids = tok.encode("<|im_start|>hi<|im_end|>", parse_special=True)
    assert "".join(_stream(tok, ids, skip_special=True)) == "hi"


# ---------------------------------------------------------------------------------------------- tiny vocab


def test_tiny_vocab_prompts(tiny_tok, fixtures_dir):
    assert tiny_tok.vocab_size == 2176
    assert tiny_tok.eos_token_id == 2050
    assert tiny_tok.stop_token_ids == frozenset({2050, 2048, 2067, 2068, 2069})
    with open(fixtures_dir / "qwen3next-tiny" / "ref" / "prompts.json", encoding="utf-8") as f:
        prompts = json.load(f)
    assert set(prompts) >= {"p7", "p64", "p300"}
    for name, p in prompts.items():
        ids = tiny_tok.encode(p["text"], parse_special=True)
        assert ids[: len(p["ids"])] == p["ids"], name  # the stored ids are truncated to 7/64/300 tokens
        assert tiny_tok.decode(ids) == p["text"]
    assert tiny_tok.encode("<|im_end|>") != [2050]


def test_tiny_vocab_vs_hf_tokenizer_json(tiny_tok, reference, fixtures_dir):
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer.from_file(str(fixtures_dir / "qwen3next-tiny" / "hf" / "tokenizer.json"))
    texts = [r["text"] for r in reference]
    want = [hf.encode(t, add_special_tokens=False).ids for t in texts]
    got = [tiny_tok.encode(t, parse_special=True) for t in texts]
    bad = [(t[:60], w[:12], g[:12]) for t, w, g in zip(texts, want, got) if w != g]
    assert not bad, f"{len(bad)} mismatches, first: {bad[:3]}"


# ---------------------------------------------------------------------------------------------- bad metadata


@pytest.mark.parametrize("change, match", [
    ({"tokenizer.ggml.tokens": None}, "tokens"),
    ({"tokenizer.ggml.merges": None}, "merges"),
    ({"tokenizer.ggml.token_type": None}, "token_type"),
    ({"tokenizer.ggml.model": None}, "tokenizer"),
    ({"tokenizer.ggml.model": "llama"}, "llama"),
    ({"tokenizer.ggml.pre": "llama-bpe"}, "llama-bpe"),
    ({"tokenizer.ggml.pre": None}, "pre"),
    ({"tokenizer.ggml.eos_token_id": 10**6}, "eos"),
    ({"tokenizer.ggml.token_type": [1, 1, 1]}, "token types"),
    ({"tokenizer.ggml.merges": ["nospace"]}, "merge"),
])
def test_bad_metadata(tiny_meta, change, match):
    meta = dict(tiny_meta)
    for k, v in change.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    with pytest.raises(GGUFError, match=match) as ei:
        Tokenizer.from_metadata(meta)
    assert "\n" not in str(ei.value)


def test_no_tokenizer_at_all():
    with pytest.raises(GGUFError):
        Tokenizer.from_metadata({"general.architecture": "qwen3next"})


def test_lone_surrogates_become_replacement_characters(tok):
    """Bytes that were not UTF-8 reach encode() as lone surrogates (argv, stdin, a JSON "\\ud800"): they are
    encoded as U+FFFD, like a file read with errors="replace"."""
    import os
    assert tok.encode("a\ud800b") == tok.encode("a\ufffdb")
    assert tok.encode(os.fsdecode(b"x\xffy")) == tok.encode("x\ufffdy")


def test_plain_spans_keep_control_tokens_as_text(tok):
    """encode(..., plain=spans): control tokens inside a span (a chat message's content) are text, those
    outside are control tokens; user-defined ones are matched everywhere, as parse_special=False does."""
    text = "<|im_start|>user\nA<|im_end|>B<tool_call>C<|im_end|>\n"
    a, b = text.index("A"), text.index("C") + 1
    ids = tok.encode(text, parse_special=True, plain=[(a, b)])
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert ids.count(im_start) == 1 and ids.count(im_end) == 1 and ids[-2] == im_end
    assert tok.token_to_id("<tool_call>") in ids
    assert tok.decode(ids) == text
    assert tok.encode(text, parse_special=True, plain=[]) == tok.encode(text, parse_special=True)
    assert tok.encode(text, parse_special=True, plain=[(0, len(text))]).count(im_end) == 0
    # a span that covers part of a control token's text leaves it text too
    assert tok.encode(text, parse_special=True, plain=[(b + 2, b + 3)]).count(im_end) == 1
