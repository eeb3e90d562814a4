"""load_model: family from the config, clear errors for every way a load can fail, quantization on CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llm_backends import ModelLoadError, fp16_weights, int8_weights, load_model

ROOT = Path(__file__).resolve().parent.parent
HELLO = [{"role": "user", "content": "Hello, how are you today?"}]


def test_model_info_describes_the_model(gemma3, qwen3):
    info = gemma3.get_model_info()
    assert info["family"] == "gemma3" and info["backend"] == "transformers"
    # On a CPU the default keeps weights as int8 with fp32 arithmetic (int8_weights.py); in CI it must build.
    assert int8_weights.available() or not os.environ.get("CI")
    expected = "int8" if int8_weights.available() else "fp16" if fp16_weights.available() else "none"
    assert info["quantization"] == expected and info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["parameters"] > 100_000 and info["memory_footprint_bytes"] > 0 and info["context_length"] == 4096
    assert qwen3.get_model_info()["family"] == "qwen3"


def test_family_comes_from_the_config_not_the_path(qwen3_dir, tmp_path):
    misleading = tmp_path / "gemma-3-looking-name"
    shutil.copytree(qwen3_dir, misleading)
    assert load_model(str(misleading)).family.name == "qwen3"


def test_unsupported_family_lists_the_supported_ones(qwen3_dir, tmp_path):
    folder = tmp_path / "llama"
    shutil.copytree(qwen3_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="unsupported model type 'llama'.*gemma3.*qwen3"):
        load_model(str(folder))


def test_missing_folder_and_missing_config_are_explained(tmp_path):
    with pytest.raises(ModelLoadError, match="neither an existing file or folder"):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_corrupt_weights_are_explained(qwen3_dir, tmp_path):
    folder = tmp_path / "corrupt"
    shutil.copytree(qwen3_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="corrupt|could not load"):
        load_model(str(folder))


def test_missing_weights_are_explained(qwen3_dir, tmp_path):
    folder = tmp_path / "noweights"
    shutil.copytree(qwen3_dir, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError):
        load_model(str(folder))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"quantization": "q3"}, "quantization"),
        ({"backend": "onnx"}, "backend"),
        ({"device": "tpu"}, "device"),
        ({"dtype": "float8"}, "dtype"),
        ({"max_cache_bytes": 0}, "max_cache_bytes"),
    ],
)
def test_bad_load_arguments_raise_value_error(qwen3_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_model(str(qwen3_dir), **kwargs)


def test_hub_repo_without_network_says_how_to_pass_a_local_folder(tmp_path):
    code = (
        "from llm_backends import load_model, ModelLoadError\n"
        "try:\n    load_model('someone/some-model')\nexcept ModelLoadError as e:\n    print(e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert "Hugging Face Hub" in out.stdout and "local folder" in out.stdout, out.stdout + out.stderr


def test_nf4_on_cpu_streams_and_reuse_stays_exact(qwen3_dir):
    model = load_model(str(qwen3_dir), quantization="nf4")
    info = model.get_model_info()
    assert info["quantization"] == "nf4" and info["device"] == "cpu"
    messages = list(HELLO)
    for turn in ("Tell me about the sea.", "And the sky?"):
        reused = list(model.stream_chat(messages, session_id="nf4", temperature=0, max_new_tokens=10))
        fresh = list(model.stream_chat(messages, temperature=0, max_new_tokens=10))
        assert [c.reasoning for c in reused] == [c.reasoning for c in fresh]
        messages += [
            {"role": "assistant", "content": "".join(c.text for c in reused)},
            {"role": "user", "content": turn},
        ]
    assert reused[-1].stats.cached_tokens > 0


def test_the_transformers_path_never_imports_mlx(qwen3_dir):
    code = (
        "import sys\nfrom llm_backends import load_model\n"
        f"load_model({str(qwen3_dir)!r}, backend='auto')\nprint('mlx' in sys.modules, 'mlx_lm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False False", out.stderr


@pytest.mark.skipif(not fp16_weights.available() and not os.environ.get("CI"), reason="needs an x86 torch (FBGEMM)")
def test_packed_fp16_weights_halve_the_linear_bytes_and_keep_answers_stable(gemma3_dir):
    fp16 = load_model(str(gemma3_dir), quantization="fp16", max_cache_bytes=2**26)
    full = load_model(str(gemma3_dir), quantization="none", max_cache_bytes=2**26)
    small, big = (m.get_model_info()["memory_footprint_bytes"] for m in (fp16, full))
    assert small < 0.6 * big, (small, big)
    assert fp16.get_model_info()["parameters"] == full.get_model_info()["parameters"]
    assert fp16.get_model_info()["quantization"] == "fp16" and fp16.get_model_info()["dtype"] == "float32"
    with pytest.raises(ValueError, match="float32"):
        load_model(str(gemma3_dir), quantization="fp16", dtype="bfloat16")


def test_importing_the_package_keeps_openmp_spinning_between_ops_unless_the_user_chose(tmp_path):
    code = "import os, llm_backends; print(os.environ['OMP_WAIT_POLICY'], os.environ['GOMP_SPINCOUNT'])"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["ACTIVE", "100000"], out.stderr
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.split()[0] == "PASSIVE", out.stderr


def test_the_package_installs_with_its_kernel_source_and_requirements(tmp_path):
    import zipfile

    # Built from a copy, so the build leaves nothing in the working tree.
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "test-output", "__pycache__"))
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q"]
    out = subprocess.run(command + ["-w", str(tmp_path / "wheel")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "llm_backends/kernels/cpu_ops.cpp" in names and "llm_backends/families/gemma3.py" in names
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Requires-Dist: transformers" in metadata and "Requires-Dist: gradio" in metadata
