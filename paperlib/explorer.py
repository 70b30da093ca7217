"""A self-contained HTML page to browse SAE latents: the companion's counterpart of paper B's dashboard.

``write_explorer`` writes one file with the data as inline JSON and a small inline script and style
sheet: no network, no CDN, no server (open it in any browser, attach it to a report). Each latent
shows its top contexts (activating token marked), its meta-latent decomposition (click a
meta-latent to see which other latents use it) and its nearest latents in other SAEs. All text is
inserted with ``textContent``, never as HTML, so contexts cannot inject markup.

Schema (checked, errors name the item and the key):

* ``latents``: list of dicts with ``id`` (int), ``label`` (str: e.g. its top tokens), ``frequency``
  (float: fraction of tokens; None when unknown, e.g. decoder weights only), ``contexts`` (list of
  str, activating token between « and »; may be empty); optional
  ``parts`` (list of [meta-latent id, weight]), ``cosine`` (float: cosine of the latent's direction
  with its meta-SAE reconstruction), ``neighbours`` (list of dicts with ``sae``, ``latent``, ``cos``,
  ``label``), ``tags`` (list of str, e.g. "example").
* ``meta_latents``: dict id -> dict with ``label`` (str), ``frequency`` (float: fraction of latents)
  and optional ``members`` (list of [latent id, weight, label]) and ``neighbours`` (as above).

``write_consistency_explorer`` builds the second page on the same machinery: the latents of one run
of a consistency document (``paperlib.metrics.consistency_json``), most stable first, each with its matched
partner and cosine in every other run, tagged stable / below chance, with the chance level.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from paperlib.atomic import write_text

_NEIGHBOUR_KEYS = ("sae", "latent", "cos", "label")

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;display:flex;height:100vh;color:#222}
#side{width:320px;border-right:1px solid #ccc;display:flex;flex-direction:column}
#side input{margin:8px;padding:6px;font:inherit}
#list{overflow-y:auto;flex:1}
#list div{padding:4px 8px;cursor:pointer;border-bottom:1px solid #eee;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
#list div:hover,#list div.on{background:#e8f0fe}
#main{flex:1;overflow-y:auto;padding:12px 20px}
h1{font-size:18px;margin:0 0 4px} h2{font-size:15px;margin:16px 0 4px}
.ctx{font-family:ui-monospace,monospace;font-size:12.5px;margin:2px 0;white-space:pre-wrap}
mark{background:#ffd54f;padding:0 1px} .tag{background:#c8e6c9;border-radius:3px;padding:0 4px;font-size:11px;margin-left:4px}
table{border-collapse:collapse} td,th{padding:2px 8px;border-bottom:1px solid #eee;text-align:left}
a{color:#1a56c4;cursor:pointer;text-decoration:underline} .note{color:#666;font-size:12px}
"""

_SCRIPT = r"""
const D = JSON.parse(document.getElementById('data').textContent);
const byId = new Map(D.latents.map(l => [l.id, l]));
const el = (tag, text, cls) => { const e = document.createElement(tag); if (text !== undefined) e.textContent = text; if (cls) e.className = cls; return e; };
const pct = f => f === null ? '\u2013' : (100 * f).toPrecision(3) + '%';
function context(text) {
  const div = el('div', undefined, 'ctx'); let rest = text;
  while (true) { const a = rest.indexOf('\u00ab'), b = rest.indexOf('\u00bb', a + 1);
    if (a < 0 || b < 0) { div.append(rest); break; }
    div.append(rest.slice(0, a)); div.append(el('mark', rest.slice(a + 1, b))); rest = rest.slice(b + 1); }
  return div;
}
function table(head, rows) {
  const t = el('table'), h = el('tr'); head.forEach(x => h.append(el('th', x))); t.append(h);
  rows.forEach(r => { const tr = el('tr'); r.forEach(c => { const td = el('td'); if (c instanceof Node) td.append(c); else td.textContent = c; tr.append(td); }); t.append(tr); });
  return t;
}
function link(text, go) { const a = el('a', text); a.onclick = go; return a; }
function neighbours(list) {
  return table(['SAE', 'latent', 'cosine', 'label'], list.map(n => [n.sae, String(n.latent), n.cos.toFixed(3), n.label]));
}
let current;  // the latent shown, kept highlighted when the filter redraws the list
function showLatent(id) {
  const l = byId.get(id), m = document.getElementById('main'); m.replaceChildren(); current = id;
  document.querySelectorAll('#list div').forEach(d => d.classList.toggle('on', d.dataset.id == String(id)));
  const h = el('h1', 'latent ' + l.id + ': ' + l.label); (l.tags || []).forEach(t => h.append(el('span', t, 'tag'))); m.append(h);
  m.append(el('div', (l.frequency === null ? 'firing frequency not known (decoder weights only)' : 'fires on ' + pct(l.frequency) + ' of held-out tokens') + (l.cosine === undefined || l.cosine === null ? '' : '; meta-SAE reconstruction cosine ' + l.cosine.toFixed(3)), 'note'));
  if (l.parts && l.parts.length) { m.append(el('h2', 'decomposition into meta-latents'));
    m.append(table(['meta-latent', 'weight', 'label', 'fires on'], l.parts.map(([k, w]) => { const q = D.meta_latents[k] || {label: '?', frequency: NaN};
      return [link('#' + k, () => showMeta(k)), w.toFixed(3), q.label, pct(q.frequency) + ' of latents']; }))); }
  if (l.contexts.length) { m.append(el('h2', 'top contexts (held-out tokens)')); l.contexts.forEach(c => m.append(context(c))); }
  if (l.neighbours && l.neighbours.length) { m.append(el('h2', D.neighbour_heading)); m.append(neighbours(l.neighbours)); }
}
function showMeta(k) {
  const q = D.meta_latents[k], m = document.getElementById('main'); m.replaceChildren();
  m.append(el('h1', 'meta-latent ' + k + ': ' + q.label));
  m.append(el('div', 'fires on ' + pct(q.frequency) + ' of the latents', 'note'));
  if (q.members && q.members.length) { m.append(el('h2', 'latents that use it most'));
    m.append(table(['latent', 'weight', 'label'], q.members.map(([id, w, lab]) => [byId.has(id) ? link(String(id), () => showLatent(id)) : String(id), w.toFixed(3), lab]))); }
  if (q.neighbours && q.neighbours.length) { m.append(el('h2', 'nearest latents of SAEs (decoder cosine)')); m.append(neighbours(q.neighbours)); }
}
function fill(filter) {
  const list = document.getElementById('list'); list.replaceChildren(); const f = filter.toLowerCase();
  D.latents.filter(l => !f || (l.id + ' ' + l.label + ' ' + (l.tags || []).join(' ')).toLowerCase().includes(f)).forEach(l => {
    const d = el('div', l.id + ' \u00b7 ' + l.label + ' \u00b7 ' + pct(l.frequency)); d.dataset.id = l.id; if (l.id === current) d.className = 'on'; d.onclick = () => showLatent(l.id); list.append(d); });
}
document.getElementById('filter').oninput = e => fill(e.target.value);
fill(''); if (D.latents.length) showLatent(D.latents[0].id);
"""


def _need(item: Mapping, key: str, kind: type | tuple, where: str) -> Any:
    if not isinstance(item, Mapping) or key not in item:
        raise ValueError(f"{where} has no {key!r}; every entry needs it (see paperlib.explorer's docstring)")
    value = item[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{where}[{key!r}] must be {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _neighbours(items: Any, where: str) -> list[dict]:
    out = []
    for i, n in enumerate(items or []):
        for key in _NEIGHBOUR_KEYS:
            _need(n, key, (str, int, float), f"{where}[{i}]")
        out.append(
            {
                "sae": str(n["sae"]),
                "latent": int(n["latent"]),
                "cos": _number(n["cos"], f"{where}[{i}]['cos']"),
                "label": str(n["label"]),
            }
        )
    return out


def _check(latents: Sequence[Mapping], meta_latents: Mapping[int, Mapping], neighbour_heading: str) -> dict:
    if not latents:
        raise ValueError("the explorer needs at least one latent")
    clean, seen = [], set()
    for i, item in enumerate(latents):
        where = f"latents[{i}]"
        lid = _need(item, "id", int, where)
        if lid in seen:
            raise ValueError(f"{where}: latent id {lid} appears twice; list each latent once")
        seen.add(lid)
        contexts = _need(item, "contexts", (list, tuple), where)
        if not all(isinstance(c, str) for c in contexts):
            raise ValueError(f"{where}['contexts'] must be a list of strings")
        frequency = _need(item, "frequency", (int, float, type(None)), where)
        entry = {
            "id": lid,
            "label": _need(item, "label", str, where),
            "frequency": None if frequency is None else _number(frequency, f"{where}['frequency']"),
            "contexts": list(contexts),
            "tags": [str(t) for t in item.get("tags", [])],
            "neighbours": _neighbours(item.get("neighbours"), f"{where}['neighbours']"),
        }
        parts = item.get("parts") or []
        for j, part in enumerate(parts):
            if len(part) != 2 or int(part[0]) not in meta_latents:
                raise ValueError(
                    f"{where}['parts'][{j}] must be [meta-latent id, weight] with an id of meta_latents, got {part!r}"
                )
        entry["parts"] = [[int(k), _number(w, f"{where}['parts']")] for k, w in parts]
        if item.get("cosine") is not None:
            entry["cosine"] = _number(item["cosine"], f"{where}['cosine']")
        clean.append(entry)
    metas = {}
    for k, item in meta_latents.items():
        where = f"meta_latents[{k}]"
        members = [[int(m[0]), _number(m[1], f"{where}['members']"), str(m[2])] for m in item.get("members", [])]
        metas[str(int(k))] = {
            "label": _need(item, "label", str, where),
            "frequency": _number(_need(item, "frequency", (int, float), where), f"{where}['frequency']"),
            "members": members,
            "neighbours": _neighbours(item.get("neighbours"), f"{where}['neighbours']"),
        }
    return {"latents": clean, "meta_latents": metas, "neighbour_heading": neighbour_heading}


def write_explorer(
    path: str | Path,
    title: str,
    notes: str,
    latents: Sequence[Mapping],
    *,
    meta_latents: Mapping[int, Mapping] | None = None,
    neighbour_heading: str = "nearest latents in other SAEs (decoder cosine)",
) -> Path:
    """Write the explorer page to ``path`` atomically (see the module docstring for the schema);
    ``notes`` is shown under the title as plain text (what the SAEs are, how the page was made)."""
    data = _check(latents, meta_latents or {}, neighbour_heading)
    # Every "<" as \u003c: "</script>" would end the data block early, and "<!--<script>" would make the
    # HTML parser swallow the page's own script (a blank page); "<" only occurs inside JSON strings.
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head>\n"
        f'<body><div id="side"><div style="padding:8px"><b>{html.escape(title)}</b>'
        f'<div class="note">{html.escape(notes)}</div></div>'
        f'<input id="filter" placeholder="filter: id, token, tag">'
        f'<div id="list"></div></div><div id="main"></div>\n'
        f'<script type="application/json" id="data">{payload}</script>\n'
        f"<script>{_SCRIPT}</script></body></html>\n"
    )
    return write_text(path, page)


def write_consistency_explorer(
    path: str | Path,
    document: Mapping,
    *,
    run: int = 0,
    title: str | None = None,
    labels: Sequence[str] | None = None,
    frequencies: Sequence[float] | None = None,
    contexts: Sequence[Sequence[str]] | None = None,
) -> Path:
    """The consistency explorer of run ``run`` of a consistency document: its latents sorted by their
    mean matched cosine in the other runs, each with its partner in every other run. Optional, per
    latent of that run: ``labels`` (e.g. top tokens), ``frequencies`` (fraction of held-out tokens)
    and ``contexts``. Tags: "stable" (cosine >= the document's highest threshold in every other
    run), "below chance" (mean matched cosine under the chance MCC of random dictionaries), "left
    out" (a dead latent that ``drop_dead`` kept out of the matchings)."""
    runs, pairs = document["runs"], document["pairs"]
    if not 0 <= run < len(runs):
        raise ValueError(f"run must index the document's {len(runs)} runs, got {run}")
    n = runs[run]["n_latents"]
    for name, given in (("labels", labels), ("frequencies", frequencies), ("contexts", contexts)):
        if given is not None and len(given) != n:
            raise ValueError(f"{name} must have one entry per latent of run {run} ({n}), got {len(given)}")
    partner = {}  # other run -> latent of `run` -> (partner latent, cosine)
    for p in pairs:
        if run in (p["a"], p["b"]):
            own, other = ("rows", "cols") if p["a"] == run else ("cols", "rows")
            partner[p["b"] if p["a"] == run else p["a"]] = {i: (j, c) for i, j, c in zip(p[own], p[other], p["cosine"])}
    cosines = document["stability"]["latents"][run]
    chance = document["chance"]["mean"] if document["chance"] else None
    stable_at = max(document["stability"]["thresholds"])
    names = [f"[{r + 1}] {runs[r]['path']}" for r in range(len(runs))]

    live = [[c for c in row if c is not None] for row in cosines]  # None: left out of the matchings
    mean = [sum(v) / len(v) if v else -math.inf for v in live]
    latents = []
    for i in sorted(range(n), key=lambda i: (-mean[i], i)):
        tags = (
            ["left out"]
            if not live[i]
            else (["stable"] if min(live[i]) >= stable_at else [])
            + (["below chance"] if chance is not None and mean[i] < chance else [])
        )
        label = labels[i] if labels is not None else (f"mean cos {mean[i]:.3f}" if live[i] else "dead")
        neighbours = [
            {"sae": names[r], "latent": j, "cos": c, "label": _verdict(c, stable_at, chance)}
            for r in sorted(partner)
            if i in partner[r]
            for j, c in [partner[r][i]]
        ]
        latents.append(
            {
                "id": i,
                "label": label,
                "tags": tags,
                "neighbours": neighbours,
                "frequency": None if frequencies is None else float(frequencies[i]),
                "contexts": [] if contexts is None else list(contexts[i]),
            }
        )
    pw = f"PW-MCC {document['pw_mcc']:.3f} ± {document['pw_mcc_std']:.3f}"
    notes = (
        f"{pw}" + (f" (chance {chance:.3f})" if chance is not None else "") + f" over {len(runs)} runs "
        f"({document['cosine']} cosine, d_model {document['d_model']}). Latents of {names[run]}, most stable first; "
        f"'stable': cosine >= {stable_at:g} in every other run; 'below chance': mean matched cosine under the "
        "chance level."
    )
    return write_explorer(
        path,
        title or "Consistency explorer",
        notes,
        latents,
        neighbour_heading="matched partner in each other run (decoder cosine)",
    )


def _verdict(cos: float, stable_at: float, chance: float | None) -> str:
    if cos >= stable_at:
        return "reappears"
    return "below chance" if chance is not None and cos < chance else ""
