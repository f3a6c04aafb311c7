"""The promotion review page, rendered: one self-contained HTML page (images inlined, no
scripts, no external requests) and a Markdown version for the Prefect artifact. Pure functions
of the decision and the evaluation (pipelines/records.py) and a context dict (pipelines/report.py,
the stage, gathers it).

Verdict first; then every regression test, the measured latency against its budget, per-class
metrics with 95 % intervals, both confusion matrices, the flipped images (right->wrong and
wrong->right, with both predictions), what changed in the data since production's dataset,
training curves, and links back to Label Studio. Everything that came from annotators or Label
Studio (class names, URLs, reasons) is escaped.
"""
from __future__ import annotations

import base64
import html
import io

from pipelines import images, stats
from pipelines.records import Decision, Evaluation, Metrics, Predictions

FLIPS_SHOWN = 48  # per direction; the counts are always complete
SUSPECTS_SHOWN = 200  # rows of the suspected-label-error table; the count is always complete
THUMB_SIDE = 84   # CSS px: the longer side of a thumbnail as shown (aspect ratio kept)


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _md_cell(text: object) -> str:
    """Annotator-supplied text made safe for a Markdown table cell."""
    return esc(text).replace("|", "&#124;").replace("\n", " ")


def _pct(v: float | None) -> str:
    return "" if v is None else f"{v:.2%}"


def _interval(k: int, n: int) -> str:
    lo, hi = stats.wilson(k, n)
    return f"[{lo:.1%}, {hi:.1%}]"


def task_link(ls: dict | None, task_id: int) -> str | None:
    """A link to the task in Label Studio's data manager (only http(s) origins)."""
    if not ls or not str(ls.get("url", "")).startswith(("http://", "https://")):
        return None
    return f"{ls['url'].rstrip('/')}/projects/{int(ls['project_id'])}/data?task={int(task_id)}"


def _task_html(ls: dict | None, task_id: int) -> str:
    """"task N", linked to Label Studio when its address is known."""
    link = task_link(ls, task_id)
    return (f'<a href="{esc(link)}">task {int(task_id)}</a>' if link
            else f"task {int(task_id)}")


def _thumb_size(width: int, height: int) -> tuple[int, int]:
    """The shown size: the longer side THUMB_SIDE, the aspect ratio kept (at least 1 px)."""
    scale = THUMB_SIDE / max(width, height, 1)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _thumb(data: bytes, *, alt: str, background: tuple[int, int, int] = (0, 0, 0)) -> str:
    """An <img> of an eval image as an annotator sees it: decoded within pipelines.images'
    budgets (a hostile file is a note, not a crash or a minute of decoding), EXIF orientation
    applied, in colour (gray stays gray), transparency on the input spec's background, aspect
    ratio kept. Pixels are at most THUMB_SIDE on the longer side (a JPEG decodes at a reduced
    scale when it can); a smaller image is shown enlarged, pixelated, to the same box."""
    try:
        img = images.decode(data, draft=lambda w, h: _thumb_size(w, h))
        img = images.convert(img, channels=3, background=background)
    except images.BadImage as exc:
        return f'<div class="noimg">(image unreadable: {esc(str(exc)[:120])})</div>'
    shown = _thumb_size(*img.size)
    img.thumbnail(shown)  # never enlarges; the browser does, by the width/height below
    buf = io.BytesIO()
    img.save(buf, "PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return f'<img alt="{esc(alt)}" src="{uri}" width="{shown[0]}" height="{shown[1]}">'


def flips(evaluation: Evaluation, p: Predictions | None) -> tuple[list[dict], list[dict]]:
    """(right->wrong, wrong->right): eval images production got right and the candidate gets
    wrong, and the reverse; one {task_id, image_sha256, label, candidate, candidate_confidence,
    production, production_confidence} per image, class names from `evaluation.classes`."""
    if p is None or p.prod_pred is None:
        return [], []
    names = evaluation.classes

    def row(i: int) -> dict:
        return {"task_id": int(p.task_id[i]), "image_sha256": str(p.image_sha256[i]),
                "label": names[p.truth[i]], "candidate": names[p.cand_pred[i]],
                "candidate_confidence": float(p.cand_conf[i]),
                "production": names[p.prod_pred[i]],
                "production_confidence": float(p.prod_conf[i])}
    right_c, right_p = p.cand_pred == p.truth, p.prod_pred == p.truth
    return ([row(i) for i in (right_p & ~right_c).nonzero()[0]],
            [row(i) for i in (right_c & ~right_p).nonzero()[0]])


def latency_note(latency: dict | None, budget_ms: float | None) -> str:
    """The measured latency against its budget, in words. Shown, not judged: a timing depends
    on the machine and its load, and the verdict must not (the gate judges compute per image)."""
    if not latency:
        return "latency not measured"
    p95, where = float(latency["p95_ms"]), f"batch 1 on {latency['device']}" + (
        f", {latency['threads']} thread" if latency.get("threads") else "")
    head = (f"p95 {p95:.3f} ms per image (median of {int(latency['repeats'])} runs, {where}; ")
    if budget_ms is None:
        return head + "no budget: gate.max_latency_ms_p95 is null)"
    head += f"budget {budget_ms:g} ms"
    if p95 <= budget_ms:
        return head + f", {budget_ms / max(p95, 1e-9):.0f}x headroom)"
    return (head + "): OVER BUDGET on the machine that measured it. Not part of the verdict; "
            "time it on the serving machine before relying on it")


def _svg_curves(history: list[dict]) -> str:
    """Training curves as an inline SVG: losses (left axis) and val accuracy (0..1, right)."""
    if not history:
        return "<p>No training history.</p>"
    w, h, pad = 520, 220, 36
    n = len(history)
    series = [("train_loss", "#1f77b4"), ("val_loss", "#ff7f0e"), ("val_acc", "#2ca02c")]
    top = max(max(float(r["train_loss"]), float(r["val_loss"])) for r in history) or 1.0

    def pts(key: str) -> str:
        out = []
        for i, r in enumerate(history):
            x = pad + (w - 2 * pad) * (i / max(n - 1, 1))
            v = float(r[key]) / (1.0 if key == "val_acc" else top)
            out.append(f"{x:.1f},{h - pad - (h - 2 * pad) * min(max(v, 0), 1):.1f}")
        return " ".join(out)
    lines = "".join(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="{pts(k)}"/>'
                    for k, c in series)
    legend = "".join(f'<text x="{pad + 150 * i}" y="16" fill="{c}" font-size="12">{k}</text>'
                     for i, (k, c) in enumerate(series))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" '
            f'aria-label="training curves">{legend}'
            f'<rect x="{pad}" y="{pad}" width="{w - 2 * pad}" height="{h - 2 * pad}" '
            f'fill="none" stroke="#ccc"/>{lines}'
            f'<text x="{pad}" y="{h - 8}" font-size="11">epoch 1</text>'
            f'<text x="{w - pad - 50}" y="{h - 8}" font-size="11">epoch {n}</text>'
            f'<text x="2" y="{pad + 4}" font-size="11">{top:.2f}</text></svg>')


def _confusion_html(title: str, classes: tuple[str, ...],
                    confusion: tuple[tuple[int, ...], ...]) -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in classes)
    body = "".join(
        f"<tr><th>{esc(c)}</th>" + "".join(
            f'<td class="{"diag" if i == j else ("off" if v else "")}">{v}</td>'
            for j, v in enumerate(row)) + "</tr>"
        for i, (c, row) in enumerate(zip(classes, confusion)))
    return (f"<figure><figcaption>{esc(title)} (rows: truth, columns: predicted)</figcaption>"
            f"<table class=cm><tr><th></th>{head}</tr>{body}</table></figure>")


def markdown(decision: Decision, evaluation: Evaluation, context: dict) -> str:
    cand, prod = evaluation.candidate, evaluation.production
    lines = [f"# Gate verdict: **{decision.verdict}**", "",
             f"- decision: {_md_cell(decision.action)}",
             f"- candidate `{cand.sha256[:12]}`: accuracy **{cand.accuracy:.4f}** on "
             f"{evaluation.eval_n} fixed eval images (eval set `{evaluation.eval_hash[:12]}`)",
             (f"- production `{_md_cell(prod.id)}`: accuracy {prod.accuracy:.4f}" if prod
              else "- no production model yet: judged on the absolute tests alone"),
             *([f"- margins: {_md_cell(decision.margins_note)}"] if decision.margins_note else []),
             "",
             "## Regression tests", "", "| test | result | value | threshold | p | detail |",
             "|---|---|---|---|---|---|"]
    for t in decision.tests:
        shown = t.result if t.result != "fail" else "**FAIL**"
        lines.append(f"| {_md_cell(t.name)} | {shown} | {t.value:.4f} | "
                     f"{t.threshold:.4f} | {'' if t.p_value is None else t.p_value} | "
                     f"{_md_cell(t.detail)} |")
    lines += ["", f"Latency (measured, not judged): "
              f"{_md_cell(latency_note(context.get('latency'), context.get('latency_budget_ms')))}"]
    lines += ["", "## Per class", "",
              "| class | support | production recall | candidate recall | candidate precision |",
              "|---|---|---|---|---|"]
    for cls in evaluation.classes:  # per_class comes back from JSON in sorted order
        m, p = cand.per_class[cls], prod.per_class[cls].recall if prod else None
        lines.append(f"| {_md_cell(cls)} | {m.support} | {_pct(p)} | {_pct(m.recall)} | "
                     f"{_pct(m.precision)} |")
    worse, better = flips(evaluation, context.get("predictions"))
    lines += ["", f"Flipped eval images: {len(worse)} right -> wrong, {len(better)} wrong -> "
              "right (pictures in report.html)."]
    return "\n".join(lines) + "\n"


CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{margin:0 0 4px} .verdict{padding:14px 18px;border-radius:8px;margin:8px 0 18px}
.PASS{background:#e3f6e6;border:2px solid #2e8b57}.FAIL{background:#fde8e8;border:2px solid #c0392b}
.INCONCLUSIVE{background:#fff6db;border:2px solid #d4a017}
table{border-collapse:collapse;margin:6px 0 18px}td,th{border:1px solid #ddd;padding:3px 7px;
text-align:right;overflow-wrap:anywhere}th{background:#f5f5f5}td.l,th.l{text-align:left}
.r-fail{color:#c0392b;font-weight:600}.r-inconclusive{color:#a67c00;font-weight:600}
.r-pass{color:#2e8b57}.cm td.diag{background:#e3f6e6}.cm td.off{background:#fde8e8}
.gallery{display:flex;flex-wrap:wrap;gap:8px}.card{border:1px solid #ddd;border-radius:6px;
padding:6px;width:150px;font-size:12px;overflow-wrap:anywhere}.card img{image-rendering:pixelated;
display:block;margin:0 auto 4px}.noimg{height:84px;color:#888}
figure{display:inline-block;margin:0 18px 0 0}
"""


def html_page(decision: Decision, evaluation: Evaluation, context: dict) -> str:
    """The self-contained review page. `context` (see `context`): predictions (per image),
    images (sha256 -> bytes of the eval images), history (training curve rows), data (what
    changed), ls ({url, project_id} or None), latency (+ latency_budget_ms), suspects,
    acceptance."""
    cand, prod = evaluation.candidate, evaluation.production
    classes, ls, n_eval = evaluation.classes, context.get("ls"), evaluation.eval_n
    verdict = decision.verdict
    out = [f"<!doctype html><html lang=en><head><meta charset=utf-8>"
           f"<title>labelgate gate report: {esc(verdict)}</title><style>{CSS}</style></head><body>",
           f'<div class="verdict {esc(verdict)}"><h1>Verdict: {esc(verdict)}</h1>'
           f"<div>{esc(decision.action)}</div></div>",
           "<ul>",
           f"<li>candidate <code>{esc(cand.sha256[:12])}</code>"
           f" — accuracy <b>{cand.accuracy:.2%}</b> "
           f"{_interval(round(cand.accuracy * n_eval), n_eval)} on "
           f"{n_eval} fixed eval images</li>",
           (f"<li>production <code>{esc(prod.id)}</code> — accuracy {prod.accuracy:.2%} "
            f"{_interval(round(prod.accuracy * n_eval), n_eval)}"
            f"</li>" if prod else "<li>no production model yet: judged on the absolute tests "
            "alone</li>"),
           f"<li>eval set <code>{esc(evaluation.eval_hash[:16])}</code></li>",
           (f"<li>margins vs production: {esc(decision.margins_note)}</li>"
            if decision.margins_note else ""),
           "</ul>",
           "<h2>Regression tests</h2><table><tr><th class=l>test</th><th>result</th>"
           "<th>value</th><th>threshold</th><th>p</th><th class=l>detail</th></tr>"]
    for t in decision.tests:
        p_value = "" if t.p_value is None else f"{t.p_value:.3g}"
        out.append(f"<tr><td class=l>{esc(t.name)}</td>"
                   f'<td class="r-{esc(t.result.replace(" ", "-"))}">{esc(t.result)}</td>'
                   f"<td>{t.value:.4f}</td><td>{t.threshold:.4f}</td>"
                   f"<td>{p_value}</td>"
                   f"<td class=l>{esc(t.detail)}</td></tr>")
    out.append("</table>")
    out.append(f"<p>Latency (measured, not judged): "
               f"{esc(latency_note(context.get('latency'), context.get('latency_budget_ms')))}"
               "</p>")

    out.append("<h2>Per class (95 % Wilson intervals)</h2><table><tr><th class=l>class</th>"
               "<th>support</th><th>production recall</th><th>candidate recall</th>"
               "<th>production precision</th><th>candidate precision</th></tr>")
    for k, cls in enumerate(classes):
        m = cand.per_class[cls]
        n = m.support

        def cell(model: Metrics | None, kind: str) -> str:
            if model is None:
                return "<td></td>"
            value = getattr(model.per_class[cls], kind)
            if kind == "recall":
                hits, total = round(value * n), n
            else:
                total = sum(row[k] for row in model.confusion)
                hits = model.confusion[k][k]
            return f"<td>{value:.1%} {_interval(hits, total)}</td>"
        out.append(f"<tr><td class=l>{esc(cls)}</td><td>{n}</td>"
                   f"{cell(prod, 'recall')}{cell(cand, 'recall')}"
                   f"{cell(prod, 'precision')}{cell(cand, 'precision')}</tr>")
    out.append("</table><h2>Confusion matrices</h2>")
    if prod:
        out.append(_confusion_html("production", classes, prod.confusion))
    out.append(_confusion_html("candidate", classes, cand.confusion))

    worse, better = flips(evaluation, context.get("predictions"))
    pictures = context.get("images", {})
    background = tuple(context.get("background", (0, 0, 0)))
    for title, group in ((f"Right → wrong: {len(worse)} eval images production got right and "
                          "the candidate gets wrong", worse),
                         (f"Wrong → right: {len(better)} eval images the candidate fixes", better)):
        out.append(f"<h2>{esc(title)}</h2>")
        if not prod:
            out.append("<p>No production model to compare with.</p>")
            continue
        if not group:
            out.append("<p>None.</p>")
            continue
        out.append('<div class="gallery">')
        for r in group[:FLIPS_SHOWN]:
            data = pictures.get(r["image_sha256"])
            img = (_thumb(data, alt=f"eval task {int(r['task_id'])}", background=background)
                   if data else '<div class="noimg">(image unavailable)</div>')
            out.append(f'<div class="card">{img}{_task_html(ls, r["task_id"])}<br>label <b>{esc(r["label"])}</b><br>'
                       f"production {esc(r['production'])} ({r['production_confidence']:.0%})<br>"
                       f"candidate {esc(r['candidate'])} ({r['candidate_confidence']:.0%})</div>")
        out.append("</div>")
        if len(group) > FLIPS_SHOWN:
            out.append(f"<p>… and {len(group) - FLIPS_SHOWN} more (all of them: "
                       "reports/evaluation/predictions.npz).</p>")

    data = context.get("data") or {}
    out.append("<h2>What changed in the data since production's dataset</h2>")
    counts_prod, counts_cand = data.get("production_train_counts"), data.get("candidate_train_counts") or {}
    out.append("<table><tr><th class=l>class</th><th>production trained on</th>"
               "<th>candidate trained on</th><th>change</th></tr>")
    for cls in classes:
        a = None if counts_prod is None else int(counts_prod.get(cls, 0))
        b = int(counts_cand.get(cls, 0))
        out.append(f"<tr><td class=l>{esc(cls)}</td><td>{'' if a is None else a}</td><td>{b}</td>"
                   f"<td>{'' if a is None else f'{b - a:+d}'}</td></tr>")
    out.append("</table><ul>")
    for label, key in (("annotations added since production's dataset", "added"),
                       ("annotations edited (relabeled)", "changed"),
                       ("annotations removed", "removed")):
        if key in data:
            out.append(f"<li>{esc(label)}: {int(data[key])}</li>")
    for kind, n in sorted((data.get("quarantine") or {}).items()):
        out.append(f"<li>quarantined ({esc(kind)}): {int(n)}</li>")
    for label, key in (("excluded: same image as an eval image", "excluded_eval_overlap"),
                       ("excluded: near-duplicate of an eval image", "excluded_near_duplicates"),
                       ("disputed (sent for review, not trained on)", "disputed")):
        if key in data:
            out.append(f"<li>{esc(label)}: {int(data[key])}</li>")
    out.append("</ul>")
    suspects = context.get("suspects")
    if suspects is not None:
        limit = context.get("flag_limit")
        out.append(f"<h2>Suspected label errors: {len(suspects)}</h2>")
        if limit is not None:
            out.append(f"<p>Up to {int(limit)} new ones go to Label Studio for review per run, "
                       "most suspicious first; flags still open from earlier runs stay and do "
                       "not take the new ones' places.</p>")
        if suspects:
            out.append("<table><tr><th class=l>task</th><th class=l>given label</th>"
                       "<th class=l>model suggests</th><th>model's belief in the given label</th>"
                       "</tr>")
            for s in suspects[:SUSPECTS_SHOWN]:
                out.append(f"<tr><td class=l>{_task_html(ls, s['task_id'])}</td><td class=l>{esc(s['label'])}</td>"
                           f"<td class=l>{esc(s['suggested'])}</td>"
                           f"<td>{float(s['label_probability']):.1%}</td></tr>")
            out.append("</table>")
            if len(suspects) > SUSPECTS_SHOWN:
                out.append(f"<p>… and {len(suspects) - SUSPECTS_SHOWN} more (all of them: "
                           "data/review/suspects.jsonl).</p>")
        else:
            out.append("<p>None found.</p>")
    acc = context.get("acceptance")
    if acc is not None:
        out.append("<h2>Pre-annotation acceptance</h2>")
        if not acc["annotations"]:
            out.append("<p>No annotation started from a pre-annotation yet.</p>")
        else:
            unknown = (f"; {acc['unknown']} more started from a suggestion no longer known"
                       if acc["unknown"] else "")
            out.append(f"<p>{acc['accepted']} of {acc['annotations']} pre-annotated answers "
                       f"were submitted unchanged ({acc['accepted'] / acc['annotations']:.0%})"
                       f"{unknown}. A pre-filled answer can bias people: a rate near 100 % for "
                       "one annotator or one class is worth a look.</p>")
            for title, key in (("annotator", "by_annotator"), ("suggested class", "by_class")):
                out.append(f"<table><tr><th class=l>{title}</th><th>pre-annotated</th>"
                           "<th>accepted unchanged</th><th>rate</th></tr>")
                for name, row in acc[key].items():
                    out.append(f"<tr><td class=l>{esc(name)}</td><td>{row['n']}</td>"
                               f"<td>{row['accepted']}</td><td>{row['rate']:.0%}</td></tr>")
                out.append("</table>")
    out.append("<h2>Training curves</h2>")
    out.append(_svg_curves(context.get("history") or []))
    out.append("</body></html>")
    return "\n".join(out)
