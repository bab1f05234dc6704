from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

from inferplane.common.settings import ServerSettings, load_settings


class Demo(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INFERPLANE_DEMO_", env_nested_delimiter="__")
    server: ServerSettings = ServerSettings(port=1)
    name: str = "default"


def test_file_then_env_then_overrides(tmp_path: Path, monkeypatch) -> None:
    cfg = tmp_path / "s.yaml"
    cfg.write_text("demo:\n  server: {host: 0.0.0.0, port: 1234}\n  name: from-file\n")
    assert load_settings(Demo, config_file=cfg, section="demo").server.port == 1234
    monkeypatch.setenv("INFERPLANE_DEMO_SERVER__PORT", "6001")
    s = load_settings(Demo, config_file=cfg, section="demo")
    assert (s.server.host, s.server.port, s.name) == ("0.0.0.0", 6001, "from-file")  # nested merge
    assert load_settings(Demo, config_file=cfg, section="demo", name="x").name == "x"


def test_defaults_without_file() -> None:
    s = load_settings(Demo)
    assert (s.server.port, s.name) == (1, "default")
