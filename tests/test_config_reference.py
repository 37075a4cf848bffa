"""docs/configuration.md's key tables are generated from i2v/config/schema.py and kept current."""

import dataclasses
import subprocess
import sys
from pathlib import Path

from i2v.config import reference
from i2v.config.schema import Config

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "configuration.md"


def test_committed_page_is_current():
    assert reference.main(["--check", str(PAGE)]) == 0, \
        "docs/configuration.md is stale: run python -m i2v.config.reference --write docs/configuration.md"


def test_every_field_has_help():
    missing = [key for key, f in reference.all_fields() if not f.metadata.get("help", "").strip()]
    assert missing == [], f"fields without help text in i2v/config/schema.py: {missing}"


def test_every_leaf_key_has_one_row():
    rows = [line.split("`")[1] for line in reference.render().splitlines() if line.startswith("| `")]
    leaves = [k for k, f in reference.all_fields() if not dataclasses.is_dataclass(reference._default(f))]
    assert sorted(rows) == sorted(leaves) and len(rows) == len(set(rows))
    assert "train.lr" in rows and "precompute.vae.pretrained" in rows and "model.lora.rank" in rows


def test_prose_outside_the_markers_is_kept(tmp_path):
    page = tmp_path / "configuration.md"
    page.write_text(f"# Title\n\nhand-written\n\n{reference.BEGIN}\nold tables\n{reference.END}\n\nafter\n")
    assert reference.main(["--write", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# Title\n\nhand-written\n\n") and text.endswith("\n\nafter\n")
    assert "old tables" not in text and "| `run.seed` | `int` | `0` |" in text


def _stale_check(tmp_path, edit):
    page = tmp_path / "configuration.md"
    page.write_text(edit(PAGE.read_text()))
    return subprocess.run([sys.executable, "-m", "i2v.config.reference", "--check", str(page)],
                          cwd=ROOT, capture_output=True, text=True)


def test_a_deleted_row_is_stale(tmp_path):
    row = next(line for line in PAGE.read_text().splitlines() if line.startswith("| `train.lr` |"))
    r = _stale_check(tmp_path, lambda text: text.replace(row + "\n", ""))
    assert r.returncode == 1
    assert "stale" in r.stderr and "python -m i2v.config.reference --write" in r.stderr


def test_a_changed_help_is_stale(tmp_path):
    help = next(f.metadata["help"] for f in dataclasses.fields(Config().train) if f.name == "lr")
    r = _stale_check(tmp_path, lambda text: text.replace(help, help + " Changed."))
    assert r.returncode == 1 and "stale" in r.stderr


def test_missing_markers_say_what_to_add(tmp_path):
    r = _stale_check(tmp_path, lambda text: text.split(reference.BEGIN)[0])
    assert r.returncode != 0 and reference.BEGIN in r.stderr
