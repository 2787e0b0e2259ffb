"""The results figures (`scripts/scale_figure.py`, `scripts/method_figure.py`) from committed-style rows: a PNG per
batch size, and a one-line error naming the file and run when a row is missing."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _row(name: str, n: int, kl: float, rel: float) -> dict:
    summary = {"kl_nats_per_token": kl, "reliability_gen_qa": rel, "generalization_gen_qa_contains": rel / 2,
               "perplexity_increase_pct": 100 * kl}
    return {"run": {"name": name}, "data": "cf", "n": n, "n_judged": min(n, 100), "summary": summary}


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / script), *args], capture_output=True, text=True,
                          timeout=120)


def test_method_figure_draws_one_panel_per_batch_size(tmp_path):
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([_row("a", 100, 0.04, 0.97), _row("b", 100, 0.03, 0.1), _row("a", 1000, 1.2, 0.36)]))
    png = tmp_path / "fig.png"
    res = _run("method_figure.py", "--png", str(png), "--point", "A", f"{rows}:a", "--point", "B", f"{rows}:b")
    assert res.returncode == 0, res.stderr[-800:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image
    width, height = Image.open(png).size
    assert width > 1.6 * height  # two panels side by side: 100 and 1,000 edits


def test_figures_name_the_missing_row_in_one_line(tmp_path):
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([_row("a", 100, 0.04, 0.97)]))
    for script, args in (("method_figure.py", ["--point", "A", f"{rows}:nope"]),
                         ("scale_figure.py", ["--series", "S", f"{rows}:nope"])):
        res = _run(script, "--png", str(tmp_path / "x.png"), *args)
        assert res.returncode != 0, script
        assert f"{rows}: no row with run name 'nope' on data 'cf'" in res.stderr, (script, res.stderr[-500:])
        assert "Traceback" not in res.stderr, script
        assert not (tmp_path / "x.png").exists(), script
