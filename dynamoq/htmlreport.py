"""A self-contained HTML report of a quantization run (or of an analysis alone): one file, the PNG
plots embedded as base64, no scripts and nothing fetched.

A run directory (written by `dynamoq quantize --out DIR`) may hold:
  dynamoq-run.json   the run record: {"format": "dynamoq-run", "version": 1, "model", "config",
                     "bits_report", "expert_bytes_fp", "timings", "analysis" (a path, relative to
                     the run directory or absolute, or null), ...}
  analysis/          the Analysis the bits were chosen with (when quantize made it)
  eval-*.json        perplexity results, one file per model evaluated (`dynamoq eval --out DIR`):
                     {"format": "dynamoq-eval", "version": 1, "label": "fp" | "uniform-3bit" |
                      "quantized" | ..., "model", "split", "seq_len", "max_tokens", "storage_bits",
                      "results": {domain: {"ppl", "ci_low", "ci_high", "tokens", "top1", ...}}}
A directory holding only an analysis (`dynamoq analyze --out DIR`) gets the analysis sections.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import os
import tempfile
from pathlib import Path

RUN_FILE = "dynamoq-run.json"
RUN_FORMAT = "dynamoq-run"
EVAL_FORMAT = "dynamoq-eval"
FORMAT_VERSION = 1
REPORT_FILE = "report.html"


class ReportError(ValueError):
    """A run directory that cannot be reported on."""


# ---- reading a run directory ------------------------------------------------------------------------
def _read_json(path: Path, fmt: str) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ReportError(f"cannot read {path}: {e}") from e
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        raise ReportError(f"{path} is not a {fmt} file (format {obj.get('format') if isinstance(obj, dict) else None!r})")
    if obj.get("version") != FORMAT_VERSION:
        raise ReportError(f"{path} has {fmt} version {obj.get('version')!r}; this dynamoq reads version {FORMAT_VERSION}")
    return obj


def load_run(run_dir) -> dict | None:
    """The run record of a directory, None if it has none."""
    path = Path(run_dir) / RUN_FILE
    return _read_json(path, RUN_FORMAT) if path.exists() else None


def _label_order(label: str) -> tuple:
    return (0 if label == "fp" else 1 if label.startswith("uniform") else 2, label)


def load_evals(run_dir) -> list[dict]:
    """Every eval-*.json of a directory, FP first, then uniform baselines, then the others."""
    out = [_read_json(p, EVAL_FORMAT) for p in sorted(Path(run_dir).glob("eval*.json"))]
    return sorted(out, key=lambda e: _label_order(str(e.get("label", ""))))


def find_analysis(run_dir, run: dict | None):
    """The Analysis of a run: the record's path, else `analysis/`, else the directory itself."""
    from .analysis import Analysis
    run_dir = Path(run_dir)
    candidates = []
    if run and run.get("analysis"):
        p = Path(run["analysis"])
        candidates.append(p if p.is_absolute() else run_dir / p)
    candidates += [run_dir / "analysis", run_dir]
    for p in candidates:
        if (p / "analysis.json").exists():
            return Analysis.load(p)
    return None


def eval_record(label: str, model: str, results: dict, split: str, seq_len: int, max_tokens: int,
                storage_bits=None) -> dict:
    """The JSON object of one evaluation (what `load_evals` reads). results: {domain: PerplexityResult}."""
    return {"format": EVAL_FORMAT, "version": FORMAT_VERSION, "label": label, "model": model, "split": split,
            "seq_len": seq_len, "max_tokens": max_tokens, "storage_bits": storage_bits,
            "created": _now(), "results": {d: r.as_dict() if hasattr(r, "as_dict") else dict(r)
                                           for d, r in results.items()}}


def write_json(path, obj) -> str:
    """Write JSON atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=_jsonable)
        f.write("\n")
    os.replace(tmp, path)
    return str(path)


def _jsonable(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


# ---- HTML pieces --------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:70em;
     color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.6em;margin-bottom:0.2em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:0.6em 0;font-size:0.92em}
th,td{border:1px solid #ccc;padding:0.25em 0.6em;text-align:right}th{background:#f3f3f3}
td.l,th.l{text-align:left}img{max-width:100%;height:auto;border:1px solid #eee}
.note{color:#666;font-size:0.9em}.better{color:#1a7f37}.worse{color:#b42318}
pre{background:#f7f7f7;padding:0.8em;overflow-x:auto;font-size:0.85em}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _table(header: list[str], rows: list[list], left: int = 1) -> str:
    th = "".join(f'<th class="l">{_e(h)}</th>' if i < left else f"<th>{_e(h)}</th>" for i, h in enumerate(header))
    body = []
    for r in rows:
        body.append("<tr>" + "".join(
            (f'<td class="l">{c}</td>' if i < left else f"<td>{c}</td>") for i, c in enumerate(r)) + "</tr>")
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(path: str, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<p><img alt="{_e(alt)}" src="data:image/png;base64,{data}"></p>'


def _bytes(n) -> str:
    if n is None:
        return "–"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    return str(n)


def _f(x, digits=3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


# ---- sections -----------------------------------------------------------------------------------------
def _summary(run: dict) -> str:
    rep, cfg = run.get("bits_report", {}), run.get("config", {})
    rows = [["model", _e(run.get("model"))],
            ["quantizer", _e(cfg.get("quantizer"))],
            ["allocation", _e(cfg.get("allocation") or ("uniform" if cfg.get("bits") else
                                                         cfg.get("expert_bits") or "explicit per-expert bits"))],
            ["target bits", _e(cfg.get("target_bits") if cfg.get("target_bits") is not None else "–")],
            ["group size", _e(cfg.get("group_size"))],
            ["calibration data", _e(", ".join(cfg.get("data") or []) or "–")],
            ["stored bits per expert weight (codes + scales + zeros)", _f(rep.get("storage_bits"))],
            ["usage-weighted bits", _f(rep.get("usage_bits"))],
            ["switching cache, bits per expert weight", _f(rep.get("cache_bits"))]]
    return "<h2>Summary</h2>" + _table(["", ""], rows)


def _bytes_section(run: dict) -> str:
    rep = run.get("bits_report", {})
    q, cache, fp = rep.get("bytes"), rep.get("cache_bytes") or 0, run.get("expert_bytes_fp")
    half = 2 * rep["weights"] if rep.get("weights") else None      # the usual 16-bit checkpoint
    rows = []
    if fp and fp != half:
        rows.append([f"routed experts as loaded ({_e(run.get('fp_dtype', 'full precision'))})", _bytes(fp)])
    rows += [["routed experts, 16-bit", _bytes(half)],
             ["routed experts, quantized (codes + scales + zeros)", _bytes(q)],
             ["switching cache", _bytes(cache)],
             ["shared experts, dense layers, attention and head, quantized", _bytes(rep.get("other_bytes"))]]
    if half and q is not None:
        saved = half - q - cache
        rows.append(["<b>saved on routed experts against 16-bit</b>",
                     f"<b>{_bytes(saved)} ({100 * saved / half:.1f}%, {half / max(q + cache, 1):.2f}x smaller, "
                     "cache included)</b>"])
    return "<h2>Bytes</h2>" + _table(["", ""], rows)


def _bits_section(run: dict, tmp: Path) -> tuple[str, int]:
    from . import plots
    rep = run.get("bits_report", {})
    experts = {int(k): v for k, v in (rep.get("experts") or {}).items()}
    quantized = {k: v for k, v in experts.items() if v is not None}
    if not quantized:
        return "<h2>Bits per expert</h2><p class='note'>no routed expert is quantized in this run.</p>", 0
    img = _img(plots.bits_heatmap(rep, tmp / "bits.png"), "bits per expert")
    rows = []
    for layer, bits in sorted(quantized.items()):
        hist = {b: bits.count(b) for b in sorted(set(bits))}
        rows.append([str(layer), f"{sum(bits) / len(bits):.2f}", _e(", ".join(f"{n}x{b}" for b, n in hist.items()))])
    return ("<h2>Bits per expert</h2>" + img + _table(["layer", "mean code bits", "experts at each bit-width"], rows),
            1)


def _perplexity_section(evals: list[dict]) -> str:
    if not evals:
        return ("<h2>Perplexity</h2><p class='note'>no evaluation in this directory: run "
                "<code>dynamoq eval MODEL --data NAME --out RUN_DIR</code> on the full-precision model, a uniform "
                "baseline and the quantized model (or <code>dynamoq quantize ... --eval NAME</code>).</p>")
    labels = [str(e.get("label")) for e in evals]
    domains = []
    for e in evals:
        domains += [d for d in e["results"] if d not in domains]
    fp = next((e for e in evals if e.get("label") == "fp"), None)
    header = ["domain"] + [f"{lab}" + (f" ({e['storage_bits']:.2f} bits)" if e.get("storage_bits") else "")
                           for lab, e in zip(labels, evals)]
    rows = []
    for d in domains:
        row = [_e(d)]
        for e in evals:
            r = e["results"].get(d)
            if r is None:
                row.append("–")
                continue
            cell = f"{r['ppl']:.2f} <span class='note'>[{r['ci_low']:.2f}, {r['ci_high']:.2f}]</span>"
            if fp is not None and e is not fp and d in fp["results"]:
                delta = 100 * (r["ppl"] / fp["results"][d]["ppl"] - 1)
                cls = "worse" if delta > 0 else "better"
                cell += f" <span class='{cls}'>{delta:+.1f}%</span>"
            row.append(cell)
        rows.append(row)
    if len(domains) > 1:        # geometric mean over the domains every model has
        common = [d for d in domains if all(d in e["results"] for e in evals)]
        if common:
            row = ["<b>geometric mean</b>"]
            for e in evals:
                g = math.exp(sum(math.log(e["results"][d]["ppl"]) for d in common) / len(common))
                row.append(f"<b>{g:.2f}</b>")
            rows.append(row)
    split = ", ".join(sorted({str(e.get("split")) for e in evals}))
    note = (f"<p class='note'>Perplexity on the {_e(split)} split, windows of "
            f"{_e(', '.join(sorted({str(e.get('seq_len')) for e in evals})))} tokens, 95% bootstrap interval over "
            "windows in brackets" + ("; percentages are the change against full precision (fp)" if fp else "") +
            ".</p>")
    return "<h2>Perplexity</h2>" + _table(header, rows) + note


def _analysis_sections(analysis, tmp: Path) -> tuple[str, int]:
    from . import plots
    out, n = [], 0
    out.append("<h2>Expert significance per dataset</h2>")
    out.append(_img(plots.significance(analysis, tmp / "significance.png"), "expert significance"))
    n += 1
    fallbacks = analysis.fallbacks()
    rows = []
    for d in analysis.datasets:
        ent = []
        for u in analysis.usage(d).values():
            p = u.double()
            p = p[p > 0]
            ent.append(float(-(p * p.log()).sum() / math.log(len(u))) if len(u) > 1 else 1.0)
        rows.append([_e(d), f"{analysis.meta.get('tokens', {}).get(d, 0):,}", f"{sum(ent) / len(ent):.3f}",
                     str(sum(1 for f in fallbacks if f["dataset"] == d))])
    out.append(_table(["dataset", "tokens", "routing entropy (1 = balanced)", "experts short of tokens"], rows))
    if analysis.has_sensitivity:
        out.append("<h2>Loss sensitivity per layer</h2>")
        out.append(_img(plots.sensitivity(analysis, tmp / "sensitivity.png"), "loss sensitivity"))
        n += 1
    out.append("<h2>Routing</h2>")
    out.append(_img(plots.routing(analysis, tmp / "routing.png"), "routing histograms"))
    n += 1
    out.append("<h2>Channel dynamics</h2>")
    out.append(_img(plots.dynamics(analysis, tmp / "dynamics.png"), "channel dynamics"))
    n += 1
    s = plots.dynamics_summary(analysis)
    if s["datasets"] > 1:
        out.append(f"<p>The top {100 * s['fraction']:g}% most dynamic channels carry "
                   f"<b>{100 * s['all']:.1f}%</b> of the cross-dataset change in channel significance "
                   "(the paper reports that about 1% of channels carry it).</p>")
    if fallbacks:
        rows = [[_e(f["dataset"]), str(f["layer"]), str(f["expert"]), str(f["tokens"]), _e(f["fallback"])]
                for f in fallbacks[:200]]
        out.append("<h3>Experts with too few calibration tokens</h3>"
                   "<p class='note'>their channel statistics come from a fallback"
                   + (f" (first 200 of {len(fallbacks)})" if len(fallbacks) > 200 else "") + ".</p>")
        out.append(_table(["dataset", "layer", "expert", "tokens", "fallback"], rows))
    return "".join(out), n


def _timings(run: dict) -> str:
    t = run.get("timings") or {}
    if not t:
        return ""
    rows = [[_e(k), f"{v:.2f} s"] for k, v in t.items() if isinstance(v, (int, float))]
    return "<h2>Timings</h2>" + _table(["step", "time"], rows)


def build(run_dir, out=None) -> dict:
    """Write the HTML report of a run directory (default `RUN_DIR/report.html`); returns
    {"path", "sections", "images"}."""
    from . import __version__
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a directory")
    run = load_run(run_dir)
    evals = load_evals(run_dir)
    analysis = find_analysis(run_dir, run)
    if run is None and analysis is None and not evals:
        raise ReportError(f"{run_dir} holds no {RUN_FILE}, no analysis and no eval-*.json: nothing to report "
                          "(write one with `dynamoq quantize --out DIR` or `dynamoq analyze --out DIR`)")
    title = f"dynamoq report: {run['model']}" if run else f"dynamoq report: {run_dir.name}"
    parts, sections, images = [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if run is not None:
            parts.append(_summary(run))
            sections.append("summary")
            html_bits, n = _bits_section(run, tmp)
            parts.append(html_bits)
            images += n
            sections.append("bits")
            parts.append(_bytes_section(run))
            sections.append("bytes")
        parts.append(_perplexity_section(evals))
        sections.append("perplexity")
        if analysis is not None:
            html_a, n = _analysis_sections(analysis, tmp)
            parts.append(html_a)
            images += n
            sections += ["significance", "routing", "dynamics"]
        else:
            parts.append("<h2>Analysis</h2><p class='note'>no analysis found for this run "
                         "(significance, routing and channel dynamics need one).</p>")
        if run is not None:
            parts.append(_timings(run))
            parts.append("<h2>Configuration</h2><pre>" + _e(json.dumps(run.get("config", {}), indent=2)) + "</pre>")
    doc = ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
           f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
           f"<h1>{_e(title)}</h1><p class='note'>generated {_e(_now())} by dynamoq {_e(__version__)} "
           f"from {_e(run_dir.resolve())}</p>" + "".join(parts) + "</body></html>\n")
    path = Path(out) if out is not None else run_dir / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".{path.name}.tmp")
    tmp_path.write_text(doc, encoding="utf-8")
    os.replace(tmp_path, path)
    return {"path": str(path), "sections": sections, "images": images}
