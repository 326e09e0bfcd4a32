"""Datasets: reading, tokenizing, packing, batching and the document attention mask."""

import json
from pathlib import Path

import pytest
import torch

from engine.data import (IGNORE, PackedData, attention_mask_from_doc_ids, batches, pack_documents, read_jsonl,
                         tokenize_documents)
from engine.errors import DataError
from engine.tokenizer import load_tokenizer, train_sentencepiece

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
TEXTS = [f"{a} plus {b} is {a + b}." for a in range(40) for b in range(0, 40, 4)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(train_sentencepiece(TEXTS, str(tmp_path_factory.mktemp("sp") / "tok"), 300))


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def check_labels(data: PackedData):
    """Every non-ignored label is the next token of the same document; rows hold the docs' tokens."""
    for r in range(len(data)):
        ids, lab, pos, doc = data.input_ids[r], data.labels[r], data.position_ids[r], data.doc_ids[r]
        for i in range(len(ids)):
            if doc[i] < 0:
                assert lab[i] == IGNORE and pos[i] == 0
                continue
            # positions restart at 0 at each document and count up by one inside it
            assert pos[i] == (0 if i == 0 or doc[i - 1] != doc[i] else pos[i - 1] + 1)
            if lab[i] != IGNORE and i + 1 < len(ids):
                assert doc[i + 1] == doc[i] and lab[i] == ids[i + 1]


def test_read_jsonl_errors(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        read_jsonl(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        read_jsonl(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b"\n')
    with pytest.raises(DataError, match="line 2"):
        read_jsonl(tmp_path / "bad.jsonl")
    path = write_jsonl(tmp_path / "f.jsonl", [{"text": "a"}, {"prompt": "b"}])
    with pytest.raises(DataError, match="line 2 has no string field 'text'"):
        read_jsonl(path, fields=("text",))
    assert read_jsonl(path) == [{"text": "a"}, {"prompt": "b"}]


def test_pretrain_packing_respects_documents(tok):
    docs = tokenize_documents([{"text": t} for t in TEXTS[:50]], tok, "pretrain")
    assert all(ids[0] == tok.bos_id and ids[-1] == tok.eos_id and all(mask) for ids, mask in docs)
    data = pack_documents(docs, seq_len=32, pad_id=tok.pad_id)
    assert data.input_ids.shape == data.labels.shape == data.doc_ids.shape == (len(data), 32)
    assert data.input_ids.dtype == data.labels.dtype == torch.int64
    check_labels(data)
    # every next-token pair of every document is trained exactly once
    n_pairs = sum(len(ids) - 1 for ids, _ in docs)
    assert (data.labels != IGNORE).sum() == n_pairs
    assert (data.input_ids[data.doc_ids < 0] == tok.pad_id).all()


def test_long_document_is_split_without_losing_pairs(tok):
    ids = list(range(10, 60))
    data = pack_documents([(ids, [1] * len(ids))], seq_len=16, pad_id=0)
    check_labels(data)
    pairs = {(int(a), int(b)) for a, b in zip(data.input_ids.flatten(), data.labels.flatten()) if b != IGNORE}
    assert pairs == set(zip(ids, ids[1:]))


def test_doc_filling_row_exactly_uses_extra_slot():
    data = pack_documents([(list(range(1, 10)), [1] * 9)], seq_len=8, pad_id=0)
    assert len(data) == 1
    assert data.labels[0].tolist() == list(range(2, 10))


def test_sft_loss_only_on_response(tok):
    records = [{"prompt": f"{a} plus {a}?", "response": f" {2 * a}"} for a in range(20)]
    docs = tokenize_documents(records, tok, "sft", seq_len=64)
    data = pack_documents(docs, seq_len=64, pad_id=tok.pad_id)
    check_labels(data)
    for r in range(len(data)):
        for d in range(int(data.doc_ids[r].max()) + 1):
            where = data.doc_ids[r] == d
            ids, lab = data.input_ids[r][where].tolist(), data.labels[r][where].tolist()
            targets = [t for t in lab if t != IGNORE]
            assert tok.decode(targets) == f" {2 * int(tok.decode(ids).split()[0])}"
            assert targets[-1] == tok.eos_id


def test_sft_skips_long_and_errors_when_all_skipped(tok):
    records = [{"prompt": "1 plus 1?", "response": " 2"}, {"prompt": "1 plus 1 is 2. " * 20, "response": " 2"}]
    with pytest.warns(UserWarning, match="skipped 1 of 2"):
        assert len(tokenize_documents(records, tok, "sft", seq_len=16)) == 1
    with pytest.raises(DataError, match="all 1 sft records"):
        tokenize_documents(records[1:], tok, "sft", seq_len=16)
    with pytest.raises(DataError, match="record 0 has no string field 'response'"):
        tokenize_documents([{"prompt": "x"}], tok, "sft")


def toy_data(n: int, seq_len: int = 4) -> PackedData:
    """Rows whose first token is the row index, so batches can be traced back to rows."""
    ids = torch.arange(n)[:, None].repeat(1, seq_len)
    zeros = torch.zeros_like(ids)
    return PackedData(ids, ids.clone(), zeros, zeros.clone())


def take(it, n):
    return [next(it) for _ in range(n)]


def rows(step) -> list[int]:
    return [int(r) for mb in step for r in mb["input_ids"][:, 0]]


def test_batches_deterministic_and_dp_disjoint():
    data = toy_data(50)
    a = take(batches(data, micro_batch_size=2, num_micro_batches=3, seed=7), 20)
    b = take(batches(data, micro_batch_size=2, num_micro_batches=3, seed=7), 20)
    assert [rows(s) for s in a] == [rows(s) for s in b]
    assert len(a[0]) == 3 and set(a[0][0]) == {"input_ids", "labels", "position_ids", "doc_ids"}
    assert a[0][0]["input_ids"].shape == (2, 4)
    c = take(batches(data, micro_batch_size=2, num_micro_batches=3, seed=8), 20)
    assert [rows(s) for s in a] != [rows(s) for s in c]
    # an epoch (8 steps of 6 rows) never repeats a row
    epoch = sum((rows(s) for s in a[:8]), [])
    assert len(set(epoch)) == 48

    ranks = [take(batches(data, 2, 2, seed=3, dp_rank=r, dp_size=3), 16) for r in range(3)]
    for step in range(16):
        per_rank = [rows(ranks[r][step]) for r in range(3)]
        assert len(set(sum(per_rank, []))) == 12  # 3 ranks x 2 micro-batches x 2 rows, all different
    # the global stream is the same as one rank doing all the work
    single = take(batches(data, 2, 6, seed=3), 16)
    assert [sum((rows(ranks[r][s]) for r in range(3)), []) for s in range(16)] == [rows(s) for s in single]


def test_batches_resume_and_too_small():
    data = toy_data(20)
    full = take(batches(data, 2, 2, seed=1), 12)
    resumed = take(batches(data, 2, 2, seed=1, start_step=7), 5)
    assert [rows(s) for s in full[7:]] == [rows(s) for s in resumed]
    with pytest.raises(DataError, match="needs 24"):
        next(batches(data, 4, 3, seed=0, dp_size=2))


def test_attention_mask():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1]])
    mask = attention_mask_from_doc_ids(doc_ids)
    assert mask.shape == (1, 1, 8, 8) and mask.dtype == torch.bool
    m = mask[0, 0]
    for i in range(8):
        for j in range(8):
            if doc_ids[0, i] < 0:
                assert m[i, j] == (i == j)  # padding sees only itself: no all-masked (NaN) rows
            else:
                assert m[i, j] == (j <= i and doc_ids[0, i] == doc_ids[0, j])
    # SDPA with the mask matches attending to each document on its own
    q = k = v = torch.randn(1, 1, 8, 4)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert not out.isnan().any()
    alone = torch.nn.functional.scaled_dot_product_attention(q[..., 3:5, :], k[..., 3:5, :], v[..., 3:5, :],
                                                             is_causal=True)
    torch.testing.assert_close(out[..., 3:5, :], alone)


def test_generated_data_files_load():
    """The committed arithmetic task parses and fits its tokenizer."""
    tok = load_tokenizer(DATA_DIR)
    for name, mode in [("arith_sft", "sft"), ("pretrain", "pretrain")]:
        records = read_jsonl(DATA_DIR / f"{name}.jsonl")
        docs = tokenize_documents(records[:100], tok, mode, seq_len=64)
        assert len(docs) == 100 and max(max(ids) for ids, _ in docs) < tok.vocab_size
