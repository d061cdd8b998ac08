"""Settings: defaults, parsing from the environment, and clear start-up failures."""

from __future__ import annotations

import pytest

from service.settings import ConfigurationError, Settings, get_settings, load_settings
from tests.support.api_process import ApiProcess, ApiProcessError


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REDIS_URL", "SD_API_KEYS", "SD_MAX_QUEUE_DEPTH"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.api_keys == ()
    assert (settings.max_queue_depth, settings.max_prompt_chars, settings.max_num_images) == (100, 2000, 8)
    assert (settings.min_size, settings.max_size, settings.max_pixels) == (64, 1024, 1024 * 1024)
    assert (settings.result_ttl_s, settings.job_timeout_s, settings.job_retries) == (3600, 600, 1)
    assert (settings.default_steps, settings.default_guidance_scale) == (50, 7.5)


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://example:6380/2")
    monkeypatch.setenv("SD_API_KEYS", " a , b,,c ")
    monkeypatch.setenv("SD_MAX_SIZE", "768")
    settings = load_settings()
    assert settings.redis_url == "redis://example:6380/2"
    assert settings.api_keys == ("a", "b", "c")
    assert settings.max_size == 768


def test_get_settings_is_cached_and_clearable(monkeypatch: pytest.MonkeyPatch) -> None:
    get_settings.cache_clear()
    monkeypatch.setenv("SD_MAX_QUEUE_DEPTH", "5")
    assert get_settings() is get_settings()
    assert get_settings().max_queue_depth == 5
    get_settings.cache_clear()


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"SD_MAX_QUEUE_DEPTH": "0"}, "SD_MAX_QUEUE_DEPTH: Input should be greater than or equal to 1"),
        ({"SD_MAX_QUEUE_DEPTH": "many"}, "SD_MAX_QUEUE_DEPTH: Input should be a valid integer"),
        ({"SD_MIN_SIZE": "2048"}, "SD_MIN_SIZE=2048 must be <= SD_MAX_SIZE=1024"),
        ({"SD_MAX_SIZE": "1020"}, "SD_MAX_SIZE=1020 must be a multiple of 8"),
        ({"SD_DEFAULT_MODEL": "../models/x"}, "SD_DEFAULT_MODEL: model name '../models/x' is not valid"),
        ({"REDIS_URL": "http://localhost"}, "REDIS_URL: must start with redis://"),
        ({"SD_LOG_LEVEL": "LOUD"}, "SD_LOG_LEVEL: must be one of"),
    ],
)
def test_invalid_settings_name_the_variable(monkeypatch: pytest.MonkeyPatch, env: dict, words: str) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError, match="invalid configuration") as error:
        load_settings()
    assert words in str(error.value)


def test_api_keys_are_not_echoed_in_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SD_API_KEYS", "super-secret")
    monkeypatch.setenv("SD_MAX_QUEUE_DEPTH", "-1")
    with pytest.raises(ConfigurationError) as error:
        load_settings()
    assert "super-secret" not in str(error.value)


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValueError):
        settings.max_queue_depth = 3  # type: ignore[misc]


def test_api_process_stops_at_start_up_with_the_message(redis_url: str) -> None:
    api = ApiProcess({"REDIS_URL": redis_url, "SD_MAX_SIZE": "1020"})
    try:
        with pytest.raises(ApiProcessError) as error:
            api.start()
        message = str(error.value)
        assert "exited with code 1" in message
        assert "sd-api: invalid configuration: settings: SD_MAX_SIZE=1020 must be a multiple of 8" in message
        assert "Traceback" not in message
    finally:
        api.cleanup()
