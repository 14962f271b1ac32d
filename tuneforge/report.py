"""report.html: one self-contained page per run (plots as embedded PNGs, the config and the scores as tables), so
a run can be read in any browser, offline, without TensorBoard or W&B."""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import yaml

from tuneforge.config.load import _redact
from tuneforge.config.rules.peft import method_label
from tuneforge.errors import UserError
from tuneforge.files import write_atomic
from tuneforge.models.gguf import gguf_origin
from tuneforge.run.scores import read_scores

# (title, y label, [(metric key, legend label)]) for each plot; a plot with no data is left out.
PLOTS = [
    ("Loss", "loss", [("loss", "train loss"), ("val_loss", "validation loss")]),
    ("Learning rate", "lr", [("lr", "learning rate")]),
    ("Throughput", "tokens / s", [("tokens_per_s", "tokens/s")]),
    ("SQuAD", "%", [("squad_em", "exact match"), ("squad_f1", "F1")]),
    ("Classification", "score", [("val_accuracy", "accuracy"), ("val_macro_f1", "macro-F1")]),
    ("Preference accuracy", "share of pairs", [("rewards/accuracies", "train rewards/accuracies"),
                                               ("val_rewards/accuracies", "held-out rewards/accuracies"),
                                               ("val_logps/accuracies", "held-out chosen likelier")]),
    ("Preference rewards", "reward", [("rewards/chosen", "train rewards/chosen"),
                                      ("rewards/rejected", "train rewards/rejected"),
                                      ("rewards/margins", "train rewards/margins"),
                                      ("val_rewards/margins", "held-out rewards/margins")]),
    ("Reward (online RL)", "reward", [("reward", "train reward (sampled)"), ("reward_std", "train reward std"),
                                      ("val_reward", "held-out reward (greedy)")]),
    ("Online RL: what to watch", "value", [("frac_reward_zero_std", "groups with zero reward std"),
                                           ("entropy", "entropy per token"),
                                           ("completions/clipped_ratio", "completions cut at max length")]),
]

STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.5em}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}.plots{display:flex;flex-wrap:wrap;gap:1em}.plots img{width:520px;border:1px solid #eee}
.num{text-align:right;font-variant-numeric:tabular-nums}"""


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def plot_png(title: str, ylabel: str, lines: list[tuple[str, list[int], list[float]]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # no display: render straight to PNG bytes
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.6), dpi=100)
    for label, steps, values in lines:
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(lines) > 1:
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def build_plots(rows: list[dict]) -> list[tuple[str, bytes]]:
    plots = []
    for title, ylabel, keys in PLOTS:
        lines = [(label, *series(rows, key)) for key, label in keys]
        lines = [line for line in lines if line[1]]
        if lines:
            plots.append((title, plot_png(title, ylabel, lines)))
    return plots


def flatten(node, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(node, dict):
        out = []
        for key, value in node.items():
            out.extend(flatten(value, f"{prefix}{key}."))
        return out or [(prefix.rstrip("."), "{}")]
    return [(prefix.rstrip("."), json.dumps(node) if not isinstance(node, str) else node)]


def final_scores(run_dir: Path, rows: list[dict]) -> list[tuple[str, dict]]:
    """(where, scores) rows: the last logged training and validation values, then `tuneforge eval` results."""
    table = []
    last: dict = {k: None for k in ("loss", "val_loss", "val_perplexity", "squad_em", "squad_f1", "val_accuracy",
                                    "val_macro_f1", "rewards/accuracies", "rewards/margins", "val_rewards/accuracies",
                                    "val_rewards/margins", "reward", "val_reward")}
    for row in rows:
        last.update({k: v for k, v in row.items() if k in last or k.startswith("val_loss/")})
    last = {("perplexity" if k == "val_perplexity" else k): v for k, v in last.items() if v is not None}
    if rows:
        table.append((f"training (step {rows[-1]['step']})", last))
    for base, label in ((False, "tuneforge eval: fine-tuned"), (True, "tuneforge eval: base model")):
        scores = read_scores(run_dir, base)
        if scores:
            table.append((label, {k: v for k, v in scores.items() if k != "model"}))
    return table


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else html.escape(str(value))


def gguf_note(model: str) -> str:
    """' (dequantized from <code>FILE</code>)' when the base is tuneforge's cache of a GGUF file, whose directory
    name (the file's stem and hash) says less than the file the recipe named; else ''."""
    origin = gguf_origin(model)
    return f" (dequantized from <code>{html.escape(origin['gguf_file'])}</code>)" if origin else ""


def render_html(run_dir: Path, config: dict, rows: list[dict], plots: list[tuple[str, bytes]]) -> str:
    name = html.escape(str(config.get("run", {}).get("name", run_dir.name)))
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>tuneforge run {name}</title>"
             f"<style>{STYLE}</style></head><body><h1>tuneforge run: {name}</h1>"]
    model = config.get("model", {}).get("name_or_path", "?")
    method = method_label(config.get("peft"))
    parts.append(f"<p>base model <code>{html.escape(str(model))}</code>{gguf_note(str(model))}, "
                 f"{html.escape(str(method))}; "
                 f"{sum(1 for r in rows if 'loss' in r)} logged training steps.</p>")
    scores = final_scores(run_dir, rows)
    if scores:
        keys = list(dict.fromkeys(k for _, s in scores for k in s))
        parts.append("<h2>Scores</h2><table><tr><th></th>" + "".join(f"<th>{html.escape(k)}</th>" for k in keys)
                     + "</tr>")
        for label, s in scores:
            parts.append(f"<tr><td>{html.escape(label)}</td>"
                         + "".join(f"<td class='num'>{_fmt(s[k]) if k in s else ''}</td>" for k in keys) + "</tr>")
        parts.append("</table>")
    if plots:
        parts.append("<h2>Curves</h2><div class='plots'>")
        for title, png in plots:
            data = base64.b64encode(png).decode("ascii")
            parts.append(f"<img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>")
        parts.append("</div>")
    parts.append("<h2>Config</h2><table><tr><th>key</th><th>value</th></tr>")
    for key, value in flatten(config):
        parts.append(f"<tr><td><code>{html.escape(key)}</code></td><td><code>{html.escape(value)}</code></td></tr>")
    parts.append("</table></body></html>")
    return "\n".join(parts)


def write_report(run_dir: str | Path) -> Path:
    """Write <run>/report.html from config.yaml, metrics.jsonl and eval/*.json (whatever exists)."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise UserError(f"--run {run_dir}: not a tuneforge run directory (no config.yaml)")
    # config.yaml is already redacted when written; redacting again keeps hand-edited files safe too.
    config = _redact(yaml.safe_load(config_path.read_text()) or {})
    rows = read_metrics(run_dir)
    out = run_dir / "report.html"
    write_atomic(out, render_html(run_dir, config, rows, build_plots(rows)))  # replaces the last report whole
    return out
