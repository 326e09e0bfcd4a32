"""JSONL datasets for pretraining ({"text"}) and SFT ({"prompt", "response"}), packed into fixed rows.

A row holds up to seq_len+1 tokens of whole documents: input_ids are the first seq_len of them and
labels[i] is the token at i+1 when it belongs to the same document and carries loss, else -100.
So a document of seq_len+1 tokens fills a row exactly, and its last token is only ever a target.
"""

import json
import os
import warnings
from dataclasses import dataclass

import torch

from engine.errors import DataError
from engine.tokenizer import Tokenizer

IGNORE = -100  # label value skipped by cross-entropy
FIELDS = {"pretrain": ("text",), "sft": ("prompt", "response")}

Doc = tuple[list[int], list[int]]  # (token ids, loss mask: 1 where the token is a training target)


def read_jsonl(path: str | os.PathLike, fields: tuple[str, ...] = ()) -> list[dict]:
    """Records of a JSONL file (blank lines skipped); each must be an object with string `fields`."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError as e:
        raise DataError(f"cannot read dataset {path}: {e.strerror or e}") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise DataError(f"dataset {path} line {n} is not valid JSON: {e}") from None
        if not isinstance(record, dict):
            raise DataError(f"dataset {path} line {n} is not a JSON object")
        _check_fields(record, fields, f"dataset {path} line {n}")
        records.append(record)
    if not records:
        raise DataError(f"dataset {path} is empty")
    return records


def _check_fields(record: dict, fields: tuple[str, ...], where: str) -> None:
    for k in fields:
        if not isinstance(record.get(k), str):
            raise DataError(f"{where} has no string field {k!r}")


def tokenize_documents(records: list[dict], tokenizer: Tokenizer, mode: str,
                       seq_len: int | None = None) -> list[Doc]:
    """Token ids and loss masks per record.

    pretrain: bos? + text + eos, loss on every token. Long documents are kept whole here;
    pack_documents splits them so no text is lost.
    sft: bos? + prompt (mask 0) + response + eos (mask 1). Documents longer than seq_len+1 are
    skipped with a warning (a truncated answer would teach the wrong thing); all skipped -> DataError.
    """
    if mode not in FIELDS:
        raise DataError(f"unknown dataset mode {mode!r} (expected 'pretrain' or 'sft')")
    if not records:
        raise DataError("dataset is empty")
    docs, skipped = [], 0
    for i, r in enumerate(records):
        _check_fields(r, FIELDS[mode], f"record {i}")
        if mode == "pretrain":
            ids = tokenizer.encode(r["text"], add_bos=True, add_eos=True)
            docs.append((ids, [1] * len(ids)))
            continue
        prompt = tokenizer.encode(r["prompt"], add_bos=True)
        response = tokenizer.encode(r["response"], add_eos=True)
        if seq_len is not None and len(prompt) + len(response) > seq_len + 1:
            skipped += 1
            continue
        docs.append((prompt + response, [0] * len(prompt) + [1] * len(response)))
    if skipped:
        if not docs:
            raise DataError(f"all {skipped} sft records are longer than seq_len+1={seq_len + 1} tokens")
        warnings.warn(f"skipped {skipped} of {len(records)} sft records longer than seq_len+1={seq_len + 1} tokens")
    return docs


@dataclass
class PackedData:
    """Packed rows, all [N, S] int64. doc_ids number the documents within a row (0, 1, ...), -1 on padding."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    doc_ids: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def _split(doc: Doc, size: int) -> list[Doc]:
    """Chunks of at most `size` tokens overlapping by one, so every next-token pair stays in some chunk."""
    ids, mask = doc
    if len(ids) <= size:
        return [doc]
    return [(ids[s:s + size], mask[s:s + size]) for s in range(0, len(ids) - 1, size - 1)]


def pack_documents(docs: list[Doc], seq_len: int, pad_id: int) -> PackedData:
    """Greedily pack whole documents, in order, into rows of seq_len+1 tokens (see module docstring).

    Documents longer than seq_len+1 are split into chunks; single-token documents are dropped
    (they have no next-token pair).
    """
    if seq_len < 1:
        raise DataError(f"seq_len must be positive, got {seq_len}")
    chunks = [c for d in docs for c in _split(d, seq_len + 1) if len(c[0]) >= 2]
    if not chunks:
        raise DataError("no documents with at least two tokens to pack")
    rows: list[list[Doc]] = [[]]
    used = 0
    for c in chunks:
        if used + len(c[0]) > seq_len + 1:
            rows.append([])
            used = 0
        rows[-1].append(c)
        used += len(c[0])

    n, S = len(rows), seq_len
    input_ids = torch.full((n, S + 1), pad_id, dtype=torch.long)
    labels = torch.full((n, S + 1), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((n, S + 1), dtype=torch.long)
    doc_ids = torch.full((n, S + 1), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        o = 0
        for d, (ids, mask) in enumerate(row):
            L = len(ids)
            t = torch.tensor(ids, dtype=torch.long)
            input_ids[r, o:o + L] = t
            # target of position i is token i+1 of the same document, if it carries loss
            labels[r, o:o + L - 1] = torch.where(torch.tensor(mask[1:], dtype=torch.bool), t[1:], IGNORE)
            position_ids[r, o:o + L] = torch.arange(L)
            doc_ids[r, o:o + L] = d
            o += L
    # the extra (S+1)-th slot only served as a target
    return PackedData(input_ids[:, :S].contiguous(), labels[:, :S].contiguous(),
                      position_ids[:, :S].contiguous(), doc_ids[:, :S].contiguous())


class StepBatches:
    """An endless stream of optimizer steps, each a list of `num_micro_batches` micro-batch dicts.

    Each epoch is a permutation of the rows drawn from torch.Generator(seed + epoch); each step takes
    the next dp_size * num_micro_batches * micro_batch_size rows of it (an epoch's remainder is
    dropped) and rank dp_rank takes its contiguous share. The stream depends only on the seed and the
    global batch, not on how it is split over DP ranks and micro-batches, so all tensor-parallel ranks
    see the same data and a resumed run may use another layout. `position()` is where the next step
    starts (epoch, row offset in its permutation); a stream built at a position continues from there.
    """

    def __init__(self, data: PackedData, micro_batch_size: int, num_micro_batches: int, seed: int,
                 dp_rank: int = 0, dp_size: int = 1, epoch: int = 0, offset: int = 0):
        self.data, self.micro, self.seed, self.dp_rank = data, micro_batch_size, seed, dp_rank
        self.per_rank = num_micro_batches * micro_batch_size
        self.per_step = dp_size * self.per_rank
        if len(data) < self.per_step:
            raise DataError(f"dataset has {len(data)} packed rows but one step needs {self.per_step} "
                            f"(dp_size * num_micro_batches * micro_batch_size)")
        self.epoch, self.offset, self._perm = epoch, offset, None

    def position(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed}

    def __iter__(self):
        return self

    def __next__(self) -> list[dict[str, torch.Tensor]]:
        if self.offset + self.per_step > len(self.data):
            self.epoch, self.offset = self.epoch + 1, 0
        if self._perm is None or self._perm[0] != self.epoch:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            self._perm = (self.epoch, torch.randperm(len(self.data), generator=g))
        share = self._perm[1][self.offset + self.dp_rank * self.per_rank:][:self.per_rank]
        self.offset += self.per_step
        return [{k: getattr(self.data, k)[idx] for k in ("input_ids", "labels", "position_ids", "doc_ids")}
                for idx in share.split(self.micro)]


def batches(data: PackedData, micro_batch_size: int, num_micro_batches: int, seed: int,
            dp_rank: int = 0, dp_size: int = 1, start_step: int = 0) -> StepBatches:
    """StepBatches from the start, or `start_step` steps into the stream (same global batch)."""
    stream = StepBatches(data, micro_batch_size, num_micro_batches, seed, dp_rank, dp_size)
    epoch, step = divmod(start_step, len(data) // stream.per_step)
    stream.epoch, stream.offset = epoch, step * stream.per_step
    return stream


def attention_mask_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] doc ids -> [B, 1, S, S] bool, True where query i may attend key j.

    Causal, within the same document, never to padding. A padding query attends to itself only,
    so no row of the mask is all False (SDPA would return NaN there).
    """
    S = doc_ids.shape[-1]
    causal = torch.ones(S, S, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    not_pad = (doc_ids >= 0)[:, None, :]
    eye = torch.eye(S, dtype=torch.bool, device=doc_ids.device)
    return ((causal & same & not_pad) | eye)[:, None]


def load_prompts(path: str, tokenizer, max_prompt_len: int) -> tuple[list[dict], list[list[int]], int]:
    """(records, token ids, number skipped for not fitting the context with the response)."""
    records = read_jsonl(path, ("prompt",))
    keep, ids, skipped = [], [], 0
    for r in records:
        t = tokenizer.encode(r["prompt"], add_bos=True)
        if len(t) <= 1 or len(t) > max_prompt_len:
            skipped += 1
            continue
        keep.append(r)
        ids.append(t)
    if not keep:
        raise DataError(f"no prompt in {path} fits the context ({max_prompt_len} prompt tokens at most)")
    return keep, ids, skipped
