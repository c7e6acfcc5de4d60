"""jobs.serve: config rules (no Ray), and the real entry point serving a merged checkpoint folder on
loopback with auth off, answering the openai SDK, writing its config and summary, then stopping."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from jobs.serve import ServeConfig, main, read_api_key
from stmed.config import ConfigError, build_config, load_config, read_yaml
from stmed.data.images import image_to_data_url
from stmed.runs import read_summary

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "jobs" / "configs" / "local" / "serve.yaml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_config(*overrides: str) -> ServeConfig:
    return build_config(ServeConfig, read_yaml(LOCAL), ["output_dir=unused", *overrides])


# ----------------------------------------------------------------------------- config (no Ray)


def test_both_yaml_configs_load():
    cluster = build_config(ServeConfig, read_yaml(REPO / "jobs" / "configs" / "serve.yaml"))
    assert cluster.engine == "vllm" and cluster.replica.num_gpus == 1 and cluster.autoscaling.max_replicas > 1
    assert cluster.served_name == "stllava-med-7b"
    local = local_config()
    assert local.http.host == "127.0.0.1" and local.model.preset == "tiny" and local.served_name == "stmed-tiny"


def test_beyond_loopback_needs_a_key():
    with pytest.raises(ConfigError, match="beyond loopback"):
        local_config("http.host=vqa.example.org")
    # with a key configured the host is accepted (nothing is bound by building a config)
    assert local_config("http.host=vqa.example.org", "api_key_env=STMED_TEST_KEY").api_key_env


def test_a_configured_key_must_be_in_the_environment(monkeypatch: pytest.MonkeyPatch):
    cfg = local_config("api_key_env=STMED_TEST_KEY")
    monkeypatch.delenv("STMED_TEST_KEY", raising=False)
    with pytest.raises(ConfigError, match="STMED_TEST_KEY"):
        read_api_key(cfg)
    monkeypatch.setenv("STMED_TEST_KEY", "s3cret")
    digest = read_api_key(cfg)
    assert digest and "s3cret" not in digest and len(digest) == 64
    assert read_api_key(local_config()) is None


def test_vllm_engine_rules():
    with pytest.raises(ConfigError, match="model.name_or_path"):
        local_config("engine=vllm")
    # the vLLM router checks the bearer key as the HF deployment does, so a key and a public host are allowed
    cfg = local_config("engine=vllm", "model.preset=null", "model.name_or_path=/m", "api_key_env=K",
                       "http.host=vqa.example.org")
    assert cfg.api_key_env == "K"


def test_command_line_mistake_exits_2(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exit_info:
        load_config(ServeConfig, ["--config", str(LOCAL), "output_dir=x", "http.prot=1"])
    assert exit_info.value.code == 2
    assert "http.prot" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the real job


@pytest.fixture(scope="module")
def merged_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain HF checkpoint folder, as merge_and_export writes one (here: the untrained tiny model)."""
    from stmed.model.build import build_tiny

    model, processor = build_tiny(seed=3)
    out = tmp_path_factory.mktemp("dpo") / "merged"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def test_main_serves_a_merged_folder_then_stops(ray_session, merged_dir: Path, tmp_path: Path):
    from PIL import Image

    port = free_port()
    cfg = build_config(ServeConfig, read_yaml(LOCAL), [
        f"output_dir={tmp_path / 'serve'}", "model.preset=null", f"model.name_or_path={merged_dir}",
        f"http.port={port}", "blocking=false", "limits.default_max_tokens=3", "ray.num_cpus=2"])
    result = main(cfg)
    try:
        assert result.url == f"http://127.0.0.1:{port}" and result.model_name == "merged"
        summary = read_summary(tmp_path / "serve")
        assert summary["url"] == result.url and summary["model"] == "merged" and summary["auth"] is False
        assert "POST /v1/vqa" in summary["routes"] and "POST /v1/chat/completions" in summary["routes"]
        written = yaml.safe_load((tmp_path / "serve" / "config.yaml").read_text())
        assert written["model"]["name_or_path"] == str(merged_dir) and written["http"]["host"] == "127.0.0.1"

        # auth off on loopback: the SDK's placeholder key is ignored, and so is no key at all
        client = openai.OpenAI(base_url=f"{result.url}/v1", api_key="unused", max_retries=0)
        image = image_to_data_url(Image.new("RGB", (80, 60), (10, 120, 200)))
        completion = client.chat.completions.create(model="merged", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "Which organ?"}]}])
        assert completion.model == "merged" and completion.usage.completion_tokens <= 3
        assert isinstance(completion.choices[0].message.content, str)
        health = httpx.get(f"{result.url}/healthz", timeout=30)
        models = httpx.get(f"{result.url}/v1/models", timeout=30)
        assert health.json()["status"] == "ok" and models.json()["data"][0]["id"] == "merged"
    finally:
        result.stop()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{result.url}/healthz", timeout=5)
