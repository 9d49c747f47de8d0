"""IncrementalDetokenizer: streamed text equals one tokenizer.decode, stop strings, hold-back."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tokenmill.engine.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer
from tokenmill.engine.model_loader import default_model_gguf_path, ensure_converted_gguf, resolve_cache_dir

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today? I'm fine, thanks.",
    "naïve café, déjà vu, Straße, smörgåsbord",
    "日本語のテキストと中文文本 and emoji 😀🤗🚀 mixed in.",
    "def main():\n    return [x * 2 for x in range(10)]\n",
    "Numbers 12345 and symbols #$%&*()[]{} <tags> too.",
] * 4


@pytest.fixture(scope="module")
def default_tokenizer():
    # The default model's tokenizer, from the shared conversion cache (converted once per cache).
    folder = ensure_converted_gguf(default_model_gguf_path(), resolve_cache_dir(None))
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


@pytest.fixture(scope="module")
def gpt2_style_tokenizer():
    """Byte-level BPE like GPT-2, with one special and one non-special added token."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(CORPUS, trainer)
    tk.add_tokens(["<tool>"])
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def llama_style_tokenizer():
    """SentencePiece-like BPE: '▁' for spaces, byte-fallback tokens <0xNN>, first space stripped on decode."""
    trained = Tokenizer(models.BPE())
    trained.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, limit_alphabet=40))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for token in sorted(trained.get_vocab(), key=trained.get_vocab().get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in _merges_of(trained)]  # str: older format
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = trained.normalizer
    tk.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tk.add_special_tokens(["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _merges_of(tokenizer: Tokenizer) -> list:
    return json.loads(tokenizer.to_str())["model"]["merges"]


def stream(tokenizer, ids, **kwargs) -> tuple[IncrementalDetokenizer, list[str]]:
    detok = IncrementalDetokenizer(tokenizer, [1, 2, 3], **kwargs)
    deltas = []
    for token_id in ids:
        if detok.append(token_id) is not None:
            break  # a stop string ended the text
        deltas.append(detok.take_delta(finished=False))
    deltas.append(detok.take_delta(finished=True))
    return detok, deltas


def check_random_ids(tokenizer, vocab_size: int, seed: int, num_trials: int, low_ids: int) -> None:
    """Random id sequences (biased to low ids: bytes and specials) stream to exactly decode(ids)."""
    rng = random.Random(seed)
    for _ in range(num_trials):
        ids = [
            rng.randrange(vocab_size) if rng.random() < 0.6 else rng.randrange(low_ids)
            for _ in range(rng.randint(1, 30))
        ]
        for skip in (True, False):
            detok, deltas = stream(tokenizer, ids, skip_special_tokens=skip)
            expected = tokenizer.decode(ids, skip_special_tokens=skip)
            assert "".join(deltas) == expected, (ids, skip)
            assert detok.text == expected, (ids, skip)
            assert all(not d.endswith(REPLACEMENT_CHAR) for d in deltas[:-1]), (ids, skip)


def test_random_ids_default_tokenizer(default_tokenizer):
    check_random_ids(default_tokenizer, len(default_tokenizer), seed=0, num_trials=150, low_ids=300)


def test_random_ids_gpt2_style_tokenizer(gpt2_style_tokenizer):
    check_random_ids(gpt2_style_tokenizer, len(gpt2_style_tokenizer), seed=1, num_trials=150, low_ids=260)


def test_random_ids_llama_style_tokenizer(llama_style_tokenizer):
    check_random_ids(llama_style_tokenizer, len(llama_style_tokenizer), seed=2, num_trials=150, low_ids=260)


@pytest.mark.parametrize("fixture", ["default_tokenizer", "gpt2_style_tokenizer", "llama_style_tokenizer"])
def test_multibyte_text_roundtrip(fixture, request):
    tokenizer = request.getfixturevalue(fixture)
    text = "Grüße 😀 from 東京! Ünïcödé 🤗🚀 ok"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok, deltas = stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == detok.text
    assert REPLACEMENT_CHAR not in "".join(deltas)


def test_incomplete_character_is_held_back_until_completed(default_tokenizer):
    emoji_ids = default_tokenizer.encode(" 😀", add_special_tokens=False)
    assert len(emoji_ids) >= 2  # the emoji's bytes span several tokens
    detok = IncrementalDetokenizer(default_tokenizer, [])
    detok.append(emoji_ids[0])
    assert detok.text.endswith(REPLACEMENT_CHAR)  # text so far shows the partial character
    assert REPLACEMENT_CHAR not in detok.take_delta(finished=False)
    for token_id in emoji_ids[1:]:
        detok.append(token_id)
    assert detok.take_delta(finished=False) == " 😀"


def test_unfinished_character_released_at_finish(default_tokenizer):
    ids = default_tokenizer.encode("ab 😀", add_special_tokens=False)[:-1]  # cut inside the emoji
    detok, deltas = stream(default_tokenizer, ids)
    assert deltas[-1].endswith(REPLACEMENT_CHAR)
    assert "".join(deltas) == default_tokenizer.decode(ids) == detok.text


def test_special_tokens_skipped_or_kept(default_tokenizer):
    im_end = default_tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = default_tokenizer.encode("Hi there", add_special_tokens=False) + [im_end]
    ids += default_tokenizer.encode(" more", add_special_tokens=False)
    _, skipped = stream(default_tokenizer, ids, skip_special_tokens=True)
    _, kept = stream(default_tokenizer, ids, skip_special_tokens=False)
    assert "".join(skipped) == "Hi there more"
    assert "".join(kept) == "Hi there<|im_end|> more"


def test_llama_style_leading_space_after_skipped_special(llama_style_tokenizer):
    tok = llama_style_tokenizer
    words = tok("Hello world", add_special_tokens=False)["input_ids"]
    for ids in ([tok.eos_token_id] + words, words[:1] + [tok.eos_token_id] + words[1:], words + [tok.eos_token_id]):
        for skip in (True, False):
            _, deltas = stream(tok, ids, skip_special_tokens=skip)
            assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)


class CountingTokenizer:
    """Forwards decode to a tokenizer and records the length of every id window decoded."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.window_sizes: list[int] = []

    def decode(self, ids, **kwargs):
        self.window_sizes.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)


def test_decodes_small_windows_only(default_tokenizer):
    text = " ".join(CORPUS)
    ids = default_tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > 200
    counting = CountingTokenizer(default_tokenizer)
    detok, deltas = stream(counting, ids)
    assert "".join(deltas) == default_tokenizer.decode(ids)
    assert max(counting.window_sizes) <= 6  # never the whole output
    assert len(counting.window_sizes) <= 2 * len(ids) + 2


class CharTokenizer:
    """One token per character (id = code point): makes stop-string positions easy to control."""

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return "".join(chr(i) for i in ids)


def feed(detok: IncrementalDetokenizer, text: str) -> tuple[list[str], str | None]:
    deltas = []
    for ch in text:
        stop = detok.append(ord(ch))
        deltas.append(detok.take_delta(finished=stop is not None))
        if stop is not None:
            return deltas, stop
    return deltas, None


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_truncates(include):
    detok = IncrementalDetokenizer(CharTokenizer(), [], stop=("STOP",), include_stop_str_in_output=include)
    deltas, stop = feed(detok, "abc STOP and more")
    assert stop == "STOP" and detok.stop_str == "STOP"
    expected = "abc STOP" if include else "abc "
    assert detok.text == expected
    assert "".join(deltas) == expected
    with pytest.raises(RuntimeError, match="after stop string"):
        detok.append(ord("x"))


def test_stop_tail_is_held_back_while_streaming():
    detok = IncrementalDetokenizer(CharTokenizer(), [], stop=("STOP", "xy"))
    deltas, stop = feed(detok, "abc ST")
    assert stop is None
    assert "".join(deltas) == "abc"  # 'STOP' is 4 chars: the last 3 might still become a stop string
    assert detok.text == "abc ST"
    assert detok.take_delta(finished=True) == " ST"


def test_stop_inside_one_token_and_earliest_match_wins():
    # A token can carry several characters; matches may start in earlier text.
    class WordTokenizer:
        words = ["Hello", " wor", "ld. The", " end"]

        def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
            return "".join(self.words[i] for i in ids)

    for stop, include, expected in [
        (("world",), False, "Hello "),
        (("world",), True, "Hello world"),
        (("The", "lo wor"), False, "Hel"),  # 'lo wor' spans tokens and starts first
        (("ld.", "d. T"), True, "Hello world."),  # both complete in one token: the earlier wins
        (("nothing",), False, "Hello world. The end"),
    ]:
        detok = IncrementalDetokenizer(WordTokenizer(), [], stop=stop, include_stop_str_in_output=include)
        deltas, matched = [], None
        for token_id in range(4):
            matched = detok.append(token_id)
            deltas.append(detok.take_delta(finished=matched is not None))
            if matched is not None:
                break
        deltas.append(detok.take_delta(finished=True))
        assert detok.text == expected, stop
        assert "".join(deltas) == expected, stop
        assert (matched is None) == (stop == ("nothing",))


def test_stop_string_with_real_tokenizer(default_tokenizer):
    ids = default_tokenizer.encode("The answer is 42.\nQuestion: next", add_special_tokens=False)
    detok, deltas = stream(default_tokenizer, ids, stop=("\nQuestion:",))
    assert detok.stop_str == "\nQuestion:"
    assert detok.text == "".join(deltas) == "The answer is 42."


def test_invalid_stop_rejected(default_tokenizer):
    with pytest.raises(ValueError, match="stop="):
        IncrementalDetokenizer(default_tokenizer, [], stop=("",))
