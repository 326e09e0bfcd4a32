"""Tokenizer interface: sentencepiece and HF tokenizer.json behave the same for the engine."""

import json

import pytest

from engine.errors import DataError
from engine.tokenizer import (HFTokenizer, SentencePieceTokenizer, Tokenizer, check_vocab, load_tokenizer,
                              train_sentencepiece)

TEXTS = [f"{a} plus {b} is {a + b}. What is {a}-{b}?" for a in range(30) for b in range(0, 30, 3)]


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory) -> str:
    return train_sentencepiece(TEXTS, str(tmp_path_factory.mktemp("sp") / "tok"), vocab_size=320)


def make_hf(dirpath, config: dict | None = None) -> str:
    """A tiny word-level tokenizer.json (plus an optional tokenizer_config.json) in dirpath."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<unk>", "<|im_end|>", "hello", "world", "plus", "is", "1", "2", "3"]
    tok = HFTok(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    tok.add_special_tokens(["<pad>", "<s>", "</s>", "<|im_end|>"])
    path = dirpath / "tokenizer.json"
    tok.save(str(path))
    if config is not None:
        (dirpath / "tokenizer_config.json").write_text(json.dumps(config))
    return str(path)


def test_sentencepiece_roundtrip_and_ids(sp_path):
    tok = load_tokenizer(sp_path)
    assert isinstance(tok, SentencePieceTokenizer) and isinstance(tok, Tokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert 260 < tok.vocab_size <= 320
    for text in ["3 plus 4 is 7.", "  spaces\tand\nnewlines ", "unseen: é ü 🙂 {}"]:  # byte fallback
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    ids = tok.encode("1+2=", add_bos=True, add_eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and tok.decode(ids) == "1+2="
    # prompt and response encoded apart concatenate back to the exact text
    assert tok.decode(tok.encode("What is 3 plus 4?") + tok.encode(" 7")) == "What is 3 plus 4? 7"


def test_sentencepiece_training_is_deterministic(tmp_path, sp_path):
    again = train_sentencepiece(TEXTS, str(tmp_path / "other"), vocab_size=320)
    assert open(again, "rb").read() == open(sp_path, "rb").read()


def test_hf_tokenizer_same_interface(tmp_path):
    tok = load_tokenizer(make_hf(tmp_path))
    assert isinstance(tok, HFTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 12)
    ids = tok.encode("hello world plus 1", add_bos=True, add_eos=True)
    assert ids == [1, 5, 6, 7, 9, 2]
    assert tok.decode(ids) == "hello world plus 1"


def test_hf_config_names_eos_and_pad_falls_back(tmp_path):
    tok = load_tokenizer(make_hf(tmp_path, {"eos_token": {"content": "<|im_end|>"}, "pad_token": None}))
    assert tok.eos_id == 4 and tok.pad_id == 0  # <pad> is still found by name
    tok = load_tokenizer(make_hf(tmp_path, {"eos_token": "<|im_end|>", "bos_token": None}))
    assert tok.eos_id == 4 and tok.bos_id == 1


def test_directory_paths(tmp_path, sp_path):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    make_hf(hf_dir)
    assert isinstance(load_tokenizer(hf_dir), HFTokenizer)
    sp_dir = tmp_path / "sp"
    sp_dir.mkdir()
    (sp_dir / "tokenizer.model").write_bytes(open(sp_path, "rb").read())
    assert isinstance(load_tokenizer(str(sp_dir)), SentencePieceTokenizer)


def test_bad_paths_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(DataError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="cannot read"):
        load_tokenizer(tmp_path / "junk.model")
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(DataError, match="cannot read"):
        load_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(DataError, match="unknown tokenizer format"):
        load_tokenizer(tmp_path / "vocab.txt")
    with pytest.raises(DataError) as err:
        load_tokenizer(tmp_path / "junk.model")
    assert "\n" not in str(err.value)  # one-line message for the CLI


def test_check_vocab(sp_path):
    tok = load_tokenizer(sp_path)
    check_vocab(tok, tok.vocab_size)
    check_vocab(tok, 1024)
    with pytest.raises(DataError, match="vocab_size"):
        check_vocab(tok, tok.vocab_size - 1)
