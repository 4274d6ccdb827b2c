"""Regenerate .env.example and README's settings table from main.Settings.

Run `python tests/settings_docs.py` after changing a setting; test_settings.py checks
that both documents match the code.
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import main  # noqa: E402


def default_text(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (list, tuple)):  # comma lists
        return ",".join(str(v) for v in value)
    return str(value)


def env_example() -> str:
    lines = ["# Settings for main.py; every variable is optional. Copy to .env and edit.",
             "# The same fields, defaults and descriptions as main.Settings.", ""]
    for name, field in main.Settings.model_fields.items():
        lines += [f"# {field.description}", f"{name.upper()}={default_text(field.default)}", ""]
    return "\n".join(lines)


def readme_table() -> str:
    rows = ["| Variable | Default | Meaning |", "| --- | --- | --- |"]
    rows += [f"| `{name.upper()}` | `{default_text(f.default)}` | {f.description} |"
             for name, f in main.Settings.model_fields.items()]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    (ROOT / ".env.example").write_text(env_example())
    readme = (ROOT / "README.md").read_text()
    table = re.compile(r"\| Variable \| Default \| Meaning \|\n(\|.*\|\n)+")
    (ROOT / "README.md").write_text(table.sub(lambda _: readme_table(), readme, count=1))
