"""Settings: one object, documented field by field in .env.example and README.md."""

from pathlib import Path

import httpx

import main
from settings_docs import env_example, readme_table

ROOT = Path(__file__).resolve().parent.parent


def test_env_example_lists_every_setting_with_its_default_and_description():
    assert (ROOT / ".env.example").read_text() == env_example(), "run python tests/settings_docs.py"


def test_readme_settings_table_matches_settings():
    assert readme_table() in (ROOT / "README.md").read_text(), "run python tests/settings_docs.py"


def test_settings_read_dotenv_file_and_environment(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("PORT=4321\nMAX_VIDEO_FRAMES=8\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MAX_VIDEO_FRAMES", "4")
    settings = main.Settings()
    assert settings.port == 4321 and settings.max_video_frames == 4
    assert settings.model_repo_id == "Qwen/Qwen3-VL-2B-Thinking"
    assert settings.buffer_events == settings.max_tokens + 16


def test_dotenv_in_the_checkout_does_not_leak_into_test_servers(tiny_model_dir, tmp_path):
    """A README user who copied .env.example to .env (say with API_KEY set) broke pytest:
    the suite's `python main.py` servers read it. Verified: with a .env holding an API key
    in the checkout, a test server still answers without a key."""
    from helpers import ServerProcess

    dotenv = ROOT / ".env"
    saved = dotenv.read_bytes() if dotenv.exists() else None
    dotenv.write_text("API_KEY=leaked-into-tests\n")
    try:
        server = ServerProcess(tiny_model_dir, tmp_path / "server.log").start()
        try:
            assert httpx.get(server.base_url + "/v1/models").status_code == 200
        finally:
            server.stop()
    finally:
        dotenv.write_bytes(saved) if saved is not None else dotenv.unlink()
