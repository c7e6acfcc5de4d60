from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from stmed.config import (
    REDACTED,
    ConfigError,
    LoRAConfig,
    ModelConfig,
    RayConfig,
    build_config,
    load_config,
    read_yaml,
    write_config,
)


@dataclass(frozen=True)
class OptimGroup:
    lr: float = 1e-3
    steps: int = 10
    cosine: bool = True


@dataclass(frozen=True)
class JobConfig:
    output_dir: str
    model: ModelConfig = field(default_factory=lambda: ModelConfig(preset="tiny"))
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    optim: OptimGroup = field(default_factory=OptimGroup)
    engine: Literal["hf", "vllm"] = "hf"
    benchmarks: list[str] = field(default_factory=list)
    api_key: str | None = None


def test_yaml_and_typed_overrides():
    data = {"output_dir": "out", "optim": {"lr": "2e-4"}, "model": {"preset": "tiny"}}
    cfg = build_config(
        JobConfig,
        data,
        ["optim.steps=7", "optim.lr=2e-4", "optim.cosine=false", "ray.num_workers=4",
         "benchmarks=[a, b]", "engine=vllm", "lora.llm_targets=q_proj,v_proj", "ray.address=auto"],
    )
    assert cfg.optim.lr == pytest.approx(2e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.steps == 7 and cfg.optim.cosine is False
    assert cfg.ray.num_workers == 4 and cfg.ray.address == "auto"
    assert cfg.benchmarks == ["a", "b"]
    assert cfg.lora.llm_targets == ["q_proj", "v_proj"]
    assert cfg.engine == "vllm"
    # the other groups keep their defaults, the paper's LoRA ranks among them
    assert cfg.lora.llm_r == 128 and cfg.lora.vit_r == 32


def test_int_given_to_float_field_is_a_float():
    cfg = build_config(JobConfig, {"output_dir": "o"}, ["optim.lr=1"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr'.*'lr'"):
        build_config(JobConfig, {"output_dir": "o"}, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"unknown key 'outptu_dir'.*'output_dir'"):
        build_config(JobConfig, {"outptu_dir": "o"})


def test_wrong_type_names_key_type_and_value():
    with pytest.raises(ConfigError, match=r"optim.steps: expected int, got 'many'"):
        build_config(JobConfig, {"output_dir": "o"}, ["optim.steps=many"])
    with pytest.raises(ConfigError, match=r"engine: expected one of 'hf', 'vllm', got 'tgi'"):
        build_config(JobConfig, {"output_dir": "o"}, ["engine=tgi"])
    with pytest.raises(ConfigError, match=r"optim.cosine: expected bool"):
        build_config(JobConfig, {"output_dir": "o", "optim": {"cosine": "maybe"}})


def test_missing_required_key():
    with pytest.raises(ConfigError, match="missing required key 'output_dir'"):
        build_config(JobConfig, {})


def test_group_validation_names_the_flag():
    with pytest.raises(ConfigError, match="model.preset"):
        build_config(JobConfig, {"output_dir": "o", "model": {"preset": None}})
    with pytest.raises(ConfigError, match="ray.num_workers"):
        build_config(JobConfig, {"output_dir": "o"}, ["ray.num_workers=0"])


def test_frozen():
    cfg = build_config(JobConfig, {"output_dir": "o"})
    with pytest.raises(AttributeError):
        cfg.output_dir = "x"  # type: ignore[misc]


def test_written_config_redacts_secrets_and_round_trips(tmp_path):
    cfg = build_config(JobConfig, {"output_dir": str(tmp_path)}, ["api_key=sk-live-123"])
    path = write_config(cfg, tmp_path)
    text = path.read_text()
    assert "sk-live-123" not in text
    written = yaml.safe_load(text)
    assert written["api_key"] == REDACTED
    written.pop("api_key")
    assert build_config(JobConfig, written) == build_config(JobConfig, {"output_dir": str(tmp_path)})


def test_load_config_reads_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: x\noptim:\n  lr: 3.0e-5\n")
    cfg = load_config(JobConfig, ["--config", str(path), "optim.steps=3"])
    assert cfg.optim.lr == pytest.approx(3e-5) and cfg.optim.steps == 3


def test_user_mistake_exits_2_without_traceback(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: x\n")
    code = (
        "import sys; from stmed.config import load_config;"
        "from tests.stmed.test_config import JobConfig;"
        "load_config(JobConfig, sys.argv[1:])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "--config", str(path), "optim.stepz=3"],
        capture_output=True, text=True, cwd=str(__import__("pathlib").Path(__file__).parents[2]),
    )
    assert proc.returncode == 2
    assert "unknown key 'optim.stepz'" in proc.stderr and "Traceback" not in proc.stderr
    missing = subprocess.run(
        [sys.executable, "-c", code, "--config", str(tmp_path / "nope.yaml")],
        capture_output=True, text=True, cwd=str(__import__("pathlib").Path(__file__).parents[2]),
    )
    assert missing.returncode == 2 and "config file not found" in missing.stderr


def test_import_stmed_does_not_import_ray_or_vllm():
    code = (
        "import sys, stmed, stmed.config, stmed.log, stmed.runs\n"
        "import importlib, pkgutil\n"
        "for m in pkgutil.walk_packages(stmed.__path__, 'stmed.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'vllm')]\n"
        "print(','.join(bad))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=str(__import__("pathlib").Path(__file__).parents[2]))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


def test_clear_run_logs_keeps_everything_but_the_old_runs_logs(tmp_path):
    from stmed.runs import MetricsLog, clear_run_logs, read_summary, write_summary

    from stmed.runs import claim_output_dir

    claim_output_dir(tmp_path, "sft", ("metrics.jsonl", "summary.json", "merged"))
    MetricsLog(tmp_path / "metrics.jsonl").write({"step": 1})
    write_summary(tmp_path, {"steps": 1})
    (tmp_path / ".fault_injected_step3").touch()
    (tmp_path / "merged").mkdir()
    clear_run_logs(tmp_path, ("metrics.jsonl",))
    assert MetricsLog(tmp_path / "metrics.jsonl").read() == [] and read_summary(tmp_path) is None
    assert not list(tmp_path.glob(".fault_injected_step*")) and (tmp_path / "merged").is_dir()


def test_a_local_checkpoint_path_becomes_absolute_and_a_hub_id_does_not(tmp_path, monkeypatch):
    (tmp_path / "runs" / "merged").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    local = build_config(ModelConfig, {"name_or_path": "runs/merged"})
    assert local.name_or_path == str(tmp_path / "runs" / "merged")
    hub = build_config(ModelConfig, {"name_or_path": "llava-hf/llava-1.5-7b-hf"})
    assert hub.name_or_path == "llava-hf/llava-1.5-7b-hf"


def test_metrics_log_keeps_the_latest_row_of_a_rerun_step(tmp_path):
    from stmed.runs import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step, loss in [(1, 5.0), (2, 4.0), (3, 3.0), (3, 2.5), (4, 2.0)]:  # step 3 ran again after a restart
        log.write({"step": step, "loss": loss})
    assert [(r["step"], r["loss"]) for r in log.read_steps()] == [(1, 5.0), (2, 4.0), (3, 2.5), (4, 2.0)]


def alias_bomb(levels: int = 9) -> str:
    """An ~800-byte YAML list whose aliases expand to 9**levels strings (a "billion laughs")."""
    rows = ['[&l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    rows += [f"&l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return ", ".join(rows) + "]"


def test_a_yaml_alias_bomb_in_a_config_file_is_refused_naming_its_key(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(f"output_dir: x\noptim:\n  lr: {alias_bomb()}\n")
    assert len(path.read_bytes()) < 1000
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"bomb.yaml: optim.lr: the value expands to over 1,000,000") as err:
        read_yaml(path)
    assert time.perf_counter() - started < 2 and "\n" not in str(err.value)


def test_an_alias_bomb_or_a_self_reference_in_an_override_is_refused():
    with pytest.raises(ConfigError, match=r"^optim.lr: the value expands"):
        build_config(JobConfig, {"output_dir": "x"}, [f"optim.lr={alias_bomb()}"])
    with pytest.raises(ConfigError, match=r"^benchmarks: the value refers to itself"):
        build_config(JobConfig, {"output_dir": "x"}, ["benchmarks=&a [*a]"])
    shared = build_config(JobConfig, {"output_dir": "x"}, ["benchmarks=[&a vqa_rad, *a]"])
    assert shared.benchmarks == ["vqa_rad", "vqa_rad"]  # a small alias is still fine
