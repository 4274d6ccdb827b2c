"""Settings: one object, documented field by field in .env.example."""

import re
from pathlib import Path

import main

ROOT = Path(__file__).resolve().parent.parent


def test_env_example_lists_every_setting_with_its_default_and_description():
    text = (ROOT / ".env.example").read_text()
    documented = dict(re.findall(r"^([A-Z_]+)=(.*)$", text, re.M))
    fields = main.Settings.model_fields
    assert set(documented) == {name.upper() for name in fields}
    for name, field in fields.items():
        default = ("1" if field.default else "0") if isinstance(field.default, bool) else str(field.default)
        assert documented[name.upper()] == default
        assert f"# {field.description}\n{name.upper()}=" in text


def test_settings_read_dotenv_file_and_environment(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("PORT=4321\nMAX_VIDEO_FRAMES=8\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MAX_VIDEO_FRAMES", "4")
    settings = main.Settings()
    assert settings.port == 4321 and settings.max_video_frames == 4
    assert settings.model_repo_id == "Qwen/Qwen3-VL-2B-Thinking"
    assert settings.buffer_events == settings.max_tokens + 16
