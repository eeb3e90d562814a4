"""Models loaded and freed from the page: only by the operator, only from the models folder or the Hub, and a
failed load leaves the current model serving."""

from __future__ import annotations

import shutil

import pytest

import app
from llm_backends.serving import ModelRegistry
from test_contract import FakeRequest


@pytest.fixture()
def models(tmp_path, qwen3_dir):
    root = tmp_path / "models"
    root.mkdir()
    shutil.copytree(qwen3_dir, root / "tiny-qwen3")
    (root / "small.gguf").write_bytes(b"GGUF")
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "config.json").write_text("{}")
    (root / "escape").symlink_to(tmp_path / "secret", target_is_directory=True)
    return root


def test_the_page_loads_only_from_the_models_folder_or_the_hub(models, qwen3_dir):
    assert app.page_source("small.gguf", str(models)) == str(models / "small.gguf")
    assert app.page_source(" Qwen/Qwen3-0.6B ", str(models)) == "Qwen/Qwen3-0.6B"
    assert app.page_source("Qwen/Qwen3-0.6B", None) == "Qwen/Qwen3-0.6B"
    refused = [
        "../secret",
        str(models / "small.gguf"),  # absolute, even inside
        "/etc/passwd",
        "escape",  # a link out of the folder
        "openai:http://169.254.169.254/#x",
        "mlx:tiny-qwen3",
        "a/b/c",
        "",
        ".",
    ]
    for text in refused:
        with pytest.raises(ValueError):
            app.page_source(text, str(models))
    with pytest.raises(ValueError, match="--models-dir"):
        app.page_source("tiny-qwen3", None)


def test_the_models_folder_and_hub_cache_are_listed(models, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    assert app.available_models(str(models)) == ["small.gguf", "tiny-qwen3"], "no link out of the folder"


def test_who_is_the_operator():
    logins = app.AppConfig(auth=[("ann", "pw"), ("bob", "pw")], admins=["ann"], host="0.0.0.0")
    assert app.is_operator(FakeRequest("t", "ann"), logins)
    assert not app.is_operator(FakeRequest("t", "bob"), logins)
    assert not app.is_operator(FakeRequest("t", None), logins)
    assert app.is_operator(FakeRequest("t"), app.AppConfig()), "the one person at a local server"
    assert not app.is_operator(FakeRequest("t"), app.AppConfig(host="0.0.0.0", insecure_no_auth=True))
    assert not app.is_operator(FakeRequest("t"), app.AppConfig(on_spaces=True))


def test_admin_flags_name_logins(tmp_path):
    with pytest.raises(SystemExit, match="--auth"):
        app.parse_args(["--admin", "ann"], env={})
    with pytest.raises(SystemExit, match="no login"):
        app.parse_args(["--auth", "ann:pw", "--admin", "bob"], env={})
    with pytest.raises(SystemExit, match="not a folder"):
        app.parse_args(["--models-dir", str(tmp_path / "missing")], env={})
    config = app.parse_args([], env={"LLM_AUTH": "ann:pw", "LLM_ADMINS": "ann", "LLM_MODELS_DIR": str(tmp_path)})
    assert config.admins == ["ann"] and config.models_dir == str(tmp_path)


def handler(demo, name):
    return next(fn.fn for fn in demo.fns.values() if getattr(fn.fn, "__name__", "") == name)


def test_only_the_operator_loads_and_a_failed_load_keeps_the_current_model(models, qwen3_dir, gemma3_dir):
    registry = ModelRegistry([str(gemma3_dir)], max_cache_bytes=2**26)
    registry.switch(registry.ids[0])
    config = app.AppConfig(auth=[("ann", "pw"), ("bob", "pw")], admins=["ann"], models_dir=str(models))
    demo = app.build_app(registry, config)
    load_page, unload = handler(demo, "load"), handler(demo, "unload")

    def load(text, request):
        return load_page(text, request, progress=lambda *args, **kwargs: None)

    serving = registry.current_id

    load("tiny-qwen3", FakeRequest("t", "bob"))
    assert registry.current_id == serving and len(registry.ids) == 1, "someone else cannot load"
    unload(FakeRequest("t", "bob"))
    assert registry.model is not None, "nor free"

    out = load("small.gguf", FakeRequest("t", "ann"))  # not a real GGUF: the load fails
    assert registry.current_id == serving and registry.ids == [serving], "the failed entry is forgotten"
    assert out[0]["value"] == serving
    load("../secret", FakeRequest("t", "ann"))
    assert registry.current_id == serving

    out = load("tiny-qwen3", FakeRequest("t", "ann"))
    assert registry.get().info.family == "qwen3" and registry.current_id in registry.ids
    assert out[0]["value"] == registry.current_id and "qwen3" in out[-2]

    unload(FakeRequest("t", "ann"))
    assert registry.model is None and registry.unloaded
    assert "No model is loaded" in app.info_text(registry)
    with pytest.raises(RuntimeError, match="choose one"):
        registry.wait_ready(timeout=30)
    registry.switch(registry.ids[0])
    assert registry.wait_ready(timeout=1) is registry.model and not registry.unloaded


def test_the_registry_adds_each_source_once(qwen3_dir):
    registry = ModelRegistry([str(qwen3_dir)])
    assert registry.add(str(qwen3_dir)) == registry.ids[0]
    added = registry.add("Qwen/Qwen3-0.6B")
    assert registry.ids == [registry.ids[0], added]
    registry.remove(added)
    assert len(registry.ids) == 1


def test_a_repo_id_that_names_a_local_folder_is_refused(tmp_path, monkeypatch):
    (tmp_path / "org" / "model").mkdir(parents=True)
    (tmp_path / "org" / "model" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError):
        app.page_source("org/model", None)


def test_what_the_models_folder_holds_reaches_only_the_operator(models, gemma3_dir):
    import json

    registry = ModelRegistry([str(gemma3_dir)])
    demo = app.build_app(registry, app.AppConfig(models_dir=str(models)))
    page_config = json.dumps(demo.get_config_file(), default=str)
    assert "tiny-qwen3" not in page_config and str(models) not in page_config


@pytest.fixture()
def with_broken(qwen3_dir, tmp_path) -> ModelRegistry:
    """Serving the tiny Qwen 3, with a second configured entry whose load fails (a config without weights)."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "qwen3"}')
    registry = ModelRegistry([str(qwen3_dir), str(broken)], max_cache_bytes=2**26)
    registry.switch(registry.ids[0])
    return registry


def test_a_failed_load_of_a_configured_model_keeps_it_listed(with_broken, tmp_path):
    registry = with_broken
    config = app.AppConfig(models_dir=str(tmp_path))
    load = handler(app.build_app(registry, config), "load")
    load("broken", FakeRequest("t"), progress=lambda *args, **kwargs: None)
    assert len(registry.ids) == 2 and registry.get().info.family == "qwen3"


def test_after_a_free_a_failed_load_does_not_leave_replies_waiting(with_broken):
    import time

    registry = with_broken
    registry.unload()
    with pytest.raises(Exception):  # noqa: B017 (whatever the loader raises)
        registry.switch(registry.ids[1])
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="choose one"):
        registry.wait_ready(timeout=30)
    assert time.monotonic() - started < 2


def test_a_model_cannot_be_freed_while_another_loads(with_broken):
    registry = with_broken
    registry.loading = registry.ids[1]  # a load under way
    with pytest.raises(RuntimeError, match="is loading"):
        registry.unload()
    registry.loading = None
    assert registry.unload() == registry.ids[0]


def test_only_the_operator_switches_models_for_everyone(qwen3_dir, gemma3_dir):
    registry = ModelRegistry([str(qwen3_dir), str(gemma3_dir)], max_cache_bytes=2**26)
    registry.switch(registry.ids[0])
    config = app.AppConfig(auth=[("ann", "pw"), ("bob", "pw")], admins=["ann"])
    demo = app.build_app(registry, config)
    switch = handler(demo, "switch_model")
    show = handler(demo, "show_operator")
    out = switch(registry.ids[1], FakeRequest("t", "bob"), progress=lambda *args, **kwargs: None)
    assert registry.current_id == registry.ids[0] and out[0]["value"] == registry.ids[0], "it frees everyone's caches"
    assert show(FakeRequest("t", "bob"))[2]["interactive"] is False, "the dropdown is not offered to bob"
    switch(registry.ids[1], FakeRequest("t", "ann"), progress=lambda *args, **kwargs: None)
    assert registry.current_id == registry.ids[1]
