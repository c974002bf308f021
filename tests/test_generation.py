"""Sampling, stop handling and text streaming."""

import numpy as np
import pytest

import localcoder
from localcoder.errors import LocalcoderError
from localcoder.generate import GenerationStats, TextStream
from localcoder.sampling import greedy, make_sampler


def test_greedy_is_argmax():
    logits = np.array([0.1, 3.0, 2.9, -1.0])
    assert greedy()(logits) == 1


def test_same_seed_same_tokens():
    logits = np.random.default_rng(0).normal(size=1000)
    s1, s2 = make_sampler(seed=7), make_sampler(seed=7)
    assert [s1(logits) for _ in range(50)] == [s2(logits) for _ in range(50)]


def test_top_k_top_p_min_p_restrict_support():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    draws = lambda s: {s(logits) for _ in range(300)}  # noqa: E731
    assert draws(make_sampler(top_k=1, seed=0)) == {0}
    assert draws(make_sampler(top_k=0, top_p=0.75, seed=0)) == {0, 1}
    assert draws(make_sampler(top_k=0, top_p=1.0, min_p=0.4, seed=0)) == {0, 1}
    assert draws(make_sampler(top_k=0, top_p=1.0, seed=0)) == {0, 1, 2, 3}


def test_repeat_penalty_discourages_history():
    logits = np.array([2.0, 1.9, 0.0])
    s = make_sampler(temperature=0, repeat_penalty=1.5)
    assert s(logits, history=[0]) == 1


def test_frequency_and_presence_penalties_follow_llamacpp():
    """logit -= count * frequency + presence for each token in the last repeat_last_n of the history, after
    the repeat penalty (llama.cpp's penalties sampler); tokens outside the window are left alone."""
    logits = np.array([2.0, 1.9, -1.0, 0.5])
    s = make_sampler(temperature=0, repeat_penalty=2.0, frequency_penalty=0.25, presence_penalty=0.5,
                     repeat_last_n=4)
    history = [3, 0, 0, 2, 0]  # the window holds 0, 0, 2, 0: token 3 is out of it
    np.testing.assert_allclose(s.penalize(logits, history),
                               [2.0 / 2 - 3 * 0.25 - 0.5, 1.9, -1.0 * 2 - 0.25 - 0.5, 0.5])
    assert s(logits, history) == 1
    assert make_sampler(temperature=0)(logits, history) == 0  # no penalties: argmax
    # a negative presence penalty favours what is already there (OpenAI allows [-2, 2])
    assert make_sampler(temperature=0, presence_penalty=-2.0)(np.array([1.0, 2.0]), [0]) == 0
    # before top-k, as in llama.cpp: the one candidate left is the best after the penalties
    s = make_sampler(top_k=1, frequency_penalty=2.0, seed=0)
    assert {s(np.array([0.0, -3.0]), [0, 0, 0]) for _ in range(20)} == {1}


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=-0.1), dict(top_p=1.5), dict(min_p=1.0), dict(top_k=-2),
                                dict(frequency_penalty=2.5), dict(presence_penalty=-3.0),
                                dict(frequency_penalty=float("nan")), dict(presence_penalty=float("inf"))])
def test_bad_options_are_one_line_errors(kw):
    with pytest.raises(LocalcoderError) as e:
        make_sampler(**kw)
    assert list(kw)[0] in str(e.value)


class FakeTok:
    """Pieces by id, to test the text layer alone."""

    def __init__(self, pieces):
        self.pieces = pieces

    def stream_decoder(self, skip_special=False):
        tok = self

        class D:
            def add(self, i):
                return tok.pieces[i]

            def flush(self):
                return ""

        return D()


def test_text_stream_holds_back_possible_stop_prefix():
    tok = FakeTok(["Hello", " wor", "ld", "<|", "END", "|> tail"])
    ts = TextStream(tok, stop=["<|END|>"])
    out = [ts.add(i) for i in range(6)]
    assert "".join(out) == "Hello world" and ts.stopped
    assert out[3] == ""  # "<|" was held back


def test_text_stream_releases_when_not_a_stop():
    tok = FakeTok(["a<", "b"])
    ts = TextStream(tok, stop=["<|x"])
    assert ts.add(0) == "a" and ts.add(1) == "<b"


def test_the_earliest_stop_string_wins_whatever_their_order():
    for stop in (["c", "b"], ["b", "c"]):
        ts = TextStream(FakeTok(["xy", " abc", "d"]), stop=stop)
        assert ts.add(0) + ts.add(1) == "xy a" and ts.stopped


def test_repeat_last_n_zero_disables_and_minus_one_covers_everything():
    logits, history = np.array([2.0, 1.0, 0.5, 0.0]), [0, 1]
    penalized = lambda n: make_sampler(temperature=0, repeat_penalty=10.0, repeat_last_n=n).penalize(logits, history)  # noqa: E731
    np.testing.assert_allclose(penalized(0), logits)
    np.testing.assert_allclose(penalized(1), [2.0, 0.1, 0.5, 0.0])
    np.testing.assert_allclose(penalized(-1), [0.2, 0.1, 0.5, 0.0])
    # a window longer than the history covers all of it (64 is llama.cpp's default, longer than most prompts)
    for n in (2, 3, 64):
        np.testing.assert_allclose(penalized(n), [0.2, 0.1, 0.5, 0.0])
    for bad in (dict(repeat_last_n=-2), dict(repeat_last_n=1.5), dict(top_k=2.5)):
        with pytest.raises(LocalcoderError, match=list(bad)[0]):
            make_sampler(**bad)


def test_reset_draws_again_from_the_seed():
    logits = np.random.default_rng(0).normal(size=1000)
    s = make_sampler(seed=11)
    first = [s(logits) for _ in range(20)]
    s.reset()
    assert [s(logits) for _ in range(20)] == first


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    return localcoder.load(fixtures_dir / "qwen3next-tiny" / "gguf" / "qwen3next-tiny-Q4_K_M.gguf", backend="numpy")


def test_generation_stops_on_stop_string_and_max_tokens(tiny):
    ids = [750, 282, 579, 263, 580, 66, 72]
    stats = GenerationStats()
    full = "".join(tiny.stream(ids, 24, greedy(), stats=stats))
    assert stats.finish_reason in ("length", "stop") and stats.generated_tokens <= 24
    if len(full) > 6:
        stop = full[3:6]
        stats2 = GenerationStats()
        cut = "".join(tiny.stream(ids, 24, greedy(), stop=[stop], stats=stats2))
        assert cut == full[: full.find(stop)] and stats2.finish_reason == "stop"


def test_seeded_generation_reproducible(tiny):
    ids = [750, 282, 579, 263]
    a = list(tiny.generate(ids, 16, make_sampler(seed=3)))
    b = list(tiny.generate(ids, 16, make_sampler(seed=3)))
    assert a == b


def test_python_api(tiny):
    assert tiny.config.n_layer == 4
    ids = tiny.tokenizer.encode("def f(x): return x")
    assert tiny.tokenizer.decode(ids) == "def f(x): return x"
    text = tiny.render_chat([{"role": "user", "content": "hi"}])
    assert text.endswith("<|im_start|>assistant\n")
    assert tiny.logits(ids).shape == (len(ids), tiny.config.n_vocab)


def test_f16_kv_cache_greedy_matches_f32(fixtures_dir):
    path = fixtures_dir / "qwen3next-tiny" / "gguf" / "qwen3next-tiny-BF16.gguf"
    ids = [750, 282, 579, 263, 580, 66, 72]
    a = list(localcoder.load(path, backend="numpy").generate(ids, 8, greedy()))
    m16 = localcoder.load(path, backend="numpy", kv_type="f16")
    assert m16.new_cache().layers[3].k.dtype == np.float16
    assert list(m16.generate(ids, 8, greedy())) == a
    with pytest.raises(LocalcoderError, match="f32 or f16"):
        localcoder.load(path, backend="numpy", kv_type="q8")


def test_negative_max_tokens_runs_to_the_context_end(fixtures_dir):
    m = localcoder.load(fixtures_dir / "qwen3next-tiny" / "gguf" / "qwen3next-tiny-Q4_K_M.gguf", backend="numpy",
                        n_ctx=20)
    stats = GenerationStats()
    tokens = list(m.generate([750, 282, 579, 263], -1, greedy(), stats=stats))
    assert stats.finish_reason == "length" and len(tokens) == 16  # 4 prompt tokens + 16 fill the 20


def test_a_cache_broken_by_an_interrupted_forward_is_refused_until_restored(tiny):
    cache = tiny.new_cache()
    tiny.forward([750, 282, 579], cache)
    snap = cache.snapshot()
    cache.broken = True  # as Model.forward leaves it when a step is interrupted half-way
    with pytest.raises(LocalcoderError, match="interrupted forward pass"):
        tiny.forward([263], cache)
    cache.restore(snap)
    assert not cache.broken
    np.testing.assert_allclose(tiny.forward([263], cache), tiny.logits([750, 282, 579, 263])[-1:], atol=1e-5)


def test_context_zero_is_refused(fixtures_dir):
    with pytest.raises(LocalcoderError, match="context 0"):
        localcoder.load(fixtures_dir / "qwen3next-tiny" / "gguf" / "qwen3next-tiny-Q4_K_M.gguf", backend="numpy",
                        n_ctx=0)
