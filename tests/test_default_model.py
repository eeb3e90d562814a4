"""The embedded default is converted once; concurrent first runs neither corrupt nor repeat the work."""

from __future__ import annotations

import threading
import time

from llm_backends import default_model


def test_concurrent_first_runs_convert_once_and_never_expose_a_partial_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(default_model.CACHE_ENV, str(tmp_path))
    conversions = []
    seen_partial = []

    def slow_convert(target, progress):
        conversions.append(target)
        staged = target.parent / "staged"
        staged.mkdir()
        (staged / "config.json").write_text("{}")
        time.sleep(0.3)
        (staged / "model.safetensors").write_bytes(b"weights")
        staged.rename(target)

    monkeypatch.setattr(default_model, "_convert", slow_convert)

    def watch():
        end = time.time() + 1.0
        while time.time() < end:
            folder = tmp_path / default_model.FOLDER
            if folder.exists() and not (folder / "model.safetensors").exists():
                seen_partial.append(folder)

    results = []
    threads = [threading.Thread(target=lambda: results.append(default_model.default_checkpoint())) for _ in range(3)]
    watcher = threading.Thread(target=watch)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads + [watcher]:
        t.join()
    assert len(conversions) == 1
    assert len(set(results)) == 1 and (results[0] / "model.safetensors").read_bytes() == b"weights"
    assert not seen_partial


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(default_model.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_model.cache_root() == tmp_path / "llm-chat"
    monkeypatch.setenv(default_model.CACHE_ENV, str(tmp_path / "x"))
    assert default_model.cache_root() == tmp_path / "x"
