"""One tokenizer interface over sentencepiece `.model` files and HF `tokenizer.json` files.

Special ids of models trained by `train_sentencepiece`: pad=0, bos=1, eos=2, unk=3, then 256 byte
pieces (byte_fallback, so any text round-trips), then the learned BPE pieces.
"""

import io
import json
import os
from abc import ABC, abstractmethod
from pathlib import Path

from engine.errors import DataError

# Names used by common HF tokenizers, most specific first.
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
_EOS_NAMES = ("</s>", "<|endoftext|>", "<|im_end|>", "<|end_of_text|>", "<eos>", "<|eot_id|>")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


class Tokenizer(ABC):
    """What the engine needs from a tokenizer: ids of special tokens, encode and decode."""

    vocab_size: int  # number of ids the embedding must cover (max id + 1)
    bos_id: int | None  # None when the tokenizer has no begin-of-sequence token
    eos_id: int
    pad_id: int  # falls back to eos_id; padded positions never get a loss anyway

    @abstractmethod
    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`, optionally wrapped in bos/eos (bos is skipped if there is none)."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; special tokens (bos/eos/pad) are dropped."""

    def _known(self, ids) -> list[int]:
        """Drop ids past the tokenizer's vocab: models often pad their embedding beyond it, and a
        sampled padding id is text-less, not an error."""
        return [i for i in ids if 0 <= i < self.vocab_size]

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if add_eos:
            ids = ids + [self.eos_id]
        return ids

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id})")


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `.model` file."""

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as e:  # sentencepiece raises OSError/RuntimeError with multi-line text
            raise DataError(f"cannot read sentencepiece model {path}: {str(e).splitlines()[0]}") from None
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        if self.sp.eos_id() < 0:
            raise DataError(f"sentencepiece model {path} has no eos token")
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return self._wrap(self.sp.encode(text), add_bos, add_eos)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(self._known(ids))  # control tokens decode to ""


class HFTokenizer(Tokenizer):
    """A HF `tokenizer.json` file, read with the `tokenizers` library.

    bos/eos/pad come from a sibling tokenizer_config.json when it names them, else from
    well-known special token names found in the vocabulary.
    """

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as _HFTok

        path = Path(path)
        try:
            self.tok = _HFTok.from_file(str(path))
        except Exception as e:
            raise DataError(f"cannot read tokenizer {path}: {str(e).splitlines()[0]}") from None
        vocab = self.tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1  # ids may have holes; the embedding must cover the max
        config = _read_tokenizer_config(path.parent / "tokenizer_config.json")

        def find(key: str, names: tuple[str, ...]) -> int | None:
            name = config.get(key)
            if isinstance(name, dict):  # {"content": "</s>", ...} in older configs
                name = name.get("content")
            if isinstance(name, str) and name in vocab:
                return vocab[name]
            return next((vocab[n] for n in names if n in vocab), None)

        self.bos_id = find("bos_token", _BOS_NAMES)
        eos_id = find("eos_token", _EOS_NAMES)
        if eos_id is None:
            raise DataError(f"tokenizer {path} has no recognizable eos token (tried {', '.join(_EOS_NAMES)})")
        self.eos_id = eos_id
        pad_id = find("pad_token", _PAD_NAMES)
        self.pad_id = eos_id if pad_id is None else pad_id

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        # add_special_tokens=False: the post-processor template would add its own bos/eos
        return self._wrap(self.tok.encode(text, add_special_tokens=False).ids, add_bos, add_eos)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(self._known(ids), skip_special_tokens=True)


def _read_tokenizer_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    return config if isinstance(config, dict) else {}


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a `.model` file, a `tokenizer.json` file, or a directory holding one of them.

    A directory with both (HF checkpoints often ship both) uses tokenizer.json, which also
    carries the added tokens.
    """
    p = Path(path)
    if p.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (p / name).is_file():
                return load_tokenizer(p / name)
        raise DataError(f"no tokenizer.json or tokenizer.model in directory {p}")
    if not p.is_file():
        raise DataError(f"tokenizer not found: {p}")
    if p.suffix == ".model":
        return SentencePieceTokenizer(p)
    if p.suffix == ".json":
        return HFTokenizer(p)
    raise DataError(f"unknown tokenizer format {p} (expected a sentencepiece .model or a tokenizer.json)")


def train_sentencepiece(texts: list[str], out_prefix: str, vocab_size: int, model_type: str = "bpe",
                        split_digits: bool = True) -> str:
    """Train a sentencepiece model on `texts` and return the path of `<out_prefix>.model`.

    Deterministic: fixed seed, one thread, no sampling of the input. Ids: pad=0, bos=1, eos=2, unk=3.
    Text is kept verbatim (identity normalization, no dummy prefix, spaces kept) so that
    decode(encode(a) + encode(b)) == a + b, which prompt/response concatenation relies on.
    `vocab_size` is an upper bound: a tiny corpus may not support that many pieces.
    Digits are split into single tokens by default, which makes arithmetic much easier to learn.
    """
    import sentencepiece as spm

    if not texts:
        raise DataError("cannot train a tokenizer on zero texts")
    spm.set_random_generator_seed(0)
    model = io.BytesIO()  # not model_prefix: that path would be stored in the file, breaking byte-equality
    with open(os.devnull, "w") as devnull:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, byte_fallback=True, split_digits=split_digits,
            pad_id=0, bos_id=1, eos_id=2, unk_id=3, num_threads=1, hard_vocab_limit=False,
            add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
            max_sentence_length=1 << 16, logstream=devnull)
    path = Path(f"{out_prefix}.model")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return str(path)


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Raise DataError if the tokenizer can emit ids the model's embedding does not have."""
    if tokenizer.vocab_size > model_vocab_size:
        raise DataError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                        f"{model_vocab_size}: wrong tokenizer for this model?")
