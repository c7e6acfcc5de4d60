"""The benchmark answerer as a Ray Data actor: one model per actor, greedy answers for a batch of questions.

    ds.map_batches(
        Answerer,
        fn_constructor_kwargs={"model": model_cfg, "system": "sq", "max_new_tokens": 128},
        compute=ray.data.ActorPoolStrategy(size=2),
        batch_size=8,
    )

Rows in: ``question_id``, ``image_path``, ``question`` (as asked, options suffix included) and
``answer_type``; any other column (the job's ``position``, ``benchmark``) passes through. Rows out add
``text`` (the cleaned answer, "" when there is none), ``error`` ("" or why the image could not be used)
and ``gen_s`` (this row's share of the batch's generation time). An unreadable image is a row with an
``error``, never an exception: one bad file must not end a 7k-question run.

Two engines, one row schema (the ``engine: hf|vllm`` key, as in ``jobs.generate``): ``Answerer`` holds
``stmed.model.generate.HFEngine`` (CPU, or a GPU without vLLM); ``vllm_answer`` maps a dataset through a
Ray Data LLM processor like ``actors.vllm_generator.vllm_generate``. vLLM is imported only when asked for,
runs in the tests on its CPU backend (unverified on GPUs) and needs merged weights (``model.name_or_path``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from stmed.config import ModelConfig, build_config
from stmed.data.images import ImageLoadError, image_to_data_url, load_image
from stmed.model import prompts

if TYPE_CHECKING:
    import ray.data

# stmed.model.build / .generate (torch, transformers: seconds) are imported where a model is built or
# used: the evaluation job's driver only names ``Answerer``, its actors import them.

INPUT_COLUMNS = ("question_id", "image_path", "question", "answer_type")
SYSTEMS = {"sq": prompts.SYSTEM_SQ, "plain": prompts.SYSTEM_PLAIN}


def system_prompt(name: str) -> str:
    if name not in SYSTEMS:
        raise ValueError(f"system must be one of {sorted(SYSTEMS)}, got {name!r}")
    return SYSTEMS[name]


class Answerer:
    """Loads its model once (``__init__``); answers every batch greedily in one ``generate`` call."""

    def __init__(self, model: ModelConfig | dict[str, Any], system: str = "sq", max_new_tokens: int = 128,
                 device: str = "cpu", batch_size: int = 8):
        from stmed.model.build import load_model
        from stmed.model.generate import GREEDY, HFEngine

        cfg = model if isinstance(model, ModelConfig) else build_config(ModelConfig, model)
        self.system = system_prompt(system)
        self.sampling = dataclasses.replace(GREEDY, max_new_tokens=max_new_tokens)
        # One Ray batch is one engine call: the engine's own chunking is set to the batch size.
        self.engine = HFEngine(*load_model(cfg), device=device, batch_size=batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [name for name in INPUT_COLUMNS if name not in batch]
        if missing:
            raise ValueError(f"Answerer needs the column(s) {missing}; the batch has {sorted(batch)}")
        size = len(batch["question_id"])
        texts, errors = [""] * size, [""] * size
        images: dict[int, Image.Image] = {}
        for i, path in enumerate(batch["image_path"]):
            try:
                images[i] = load_image(str(path))
            except ImageLoadError as err:
                errors[i] = str(err)
        from stmed.model.generate import answer

        start = time.perf_counter()
        if images:
            rows = sorted(images)
            questions = [str(batch["question"][i]) for i in rows]
            answers = answer(self.engine, [images[i] for i in rows], questions, self.sampling,
                             system=self.system)
            for i, text in zip(rows, answers):
                texts[i] = text
        seconds = time.perf_counter() - start
        out = dict(batch)
        out["text"] = np.array(texts, dtype=object)
        out["error"] = np.array(errors, dtype=object)
        out["gen_s"] = np.full(size, seconds / size, dtype=np.float64)
        return out


# ----------------------------------------------------------------------------- the vLLM engine (GPU)


def _with_image_url(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Adds ``image_data_url`` (re-encoded pixels, what the multimodal stage decodes) or an ``error``."""
    urls, errors = [], []
    for path in batch["image_path"]:
        try:
            urls.append(image_to_data_url(load_image(str(path))))
            errors.append("")
        except ImageLoadError as err:
            urls.append("")
            errors.append(str(err))
    return {**batch, "image_data_url": np.array(urls, dtype=object), "error": np.array(errors, dtype=object)}


def _result(row: dict[str, Any], text: str, carry: tuple[str, ...]) -> dict[str, Any]:
    # gen_s 0: vLLM serves requests concurrently, so no per-row share of engine time exists.
    keep = {k: row[k] for k in (*INPUT_COLUMNS, *carry, "error")}
    return {**keep, "text": text, "gen_s": 0.0}


def vllm_answer(ds: ray.data.Dataset, model_path: str, system: str = "sq", max_new_tokens: int = 128,
                batch_size: int = 16, concurrency: int = 1, carry: tuple[str, ...] = (),
                engine_kwargs: dict[str, Any] | None = None,
                bundle: dict[str, float] | None = None) -> ray.data.Dataset:  # fmt: skip
    """The vLLM path: the same output rows as ``Answerer``, from vLLM engines in a Ray Data LLM processor.

    Follows ``actors.vllm_generator.vllm_generate``: our own rendered prompt (chat template, tokenize and
    detokenize stages off) plus an OpenAI-style message that only carries the image, the engine defaults
    every stmed vLLM engine takes (``engine_defaults``) under ``engine_kwargs``. ``model_path`` must be
    merged weights (vLLM applies LoRA to the LLM only). ``bundle``: one replica's placement bundle (None:
    a GPU; ``{"CPU": 1}`` on vLLM's CPU backend, where the tests run it). ``carry``: input columns besides
    ``INPUT_COLUMNS`` that the output rows keep.
    """
    system_text = system_prompt(system)
    from ray.data.expressions import col
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from actors.vllm_generator import engine_defaults, vllm_request
    from stmed.model.build import checkpoint_chat

    chat = checkpoint_chat(model_path)  # the checkpoint family's chat format (Vicuna, ChatML)

    placement = {"placement_group_config": {"bundles": [bundle]}} if bundle else {}
    host = {"num_cpus": 0.25} if bundle and not bundle.get("GPU") else {}  # small CPU nodes: stages side by side
    config = vLLMEngineProcessorConfig(
        model_source=model_path, engine_kwargs={**engine_defaults(model_path), **(engine_kwargs or {})},
        batch_size=batch_size, concurrency=concurrency, accelerator_type=None, **placement,
        prepare_multimodal_stage={"enabled": True, **host}, chat_template_stage={"enabled": False},
        tokenize_stage={"enabled": False}, detokenize_stage={"enabled": False},
    )  # fmt: skip

    from stmed.model.generate import GREEDY, clean_output

    sampling = dataclasses.replace(GREEDY, max_new_tokens=max_new_tokens)

    def request(row: dict[str, Any]) -> dict[str, Any]:  # the input columns ride along to the postprocess
        prompt = prompts.answer_prompt(str(row["question"]), system=system_text, chat=chat)
        return {**row, **vllm_request(row, prompt, sampling, seed=None, chat=chat)}

    loaded = ds.map_batches(_with_image_url, batch_format="numpy", **host)
    processor = build_processor(
        config, preprocess=request, preprocess_map_kwargs=host, postprocess_map_kwargs=host,
        postprocess=lambda row: _result(row, clean_output(str(row["generated_text"])), carry))
    answered = processor(loaded.filter(expr=col("error") == ""))
    failed = loaded.filter(expr=col("error") != "").map(lambda row: _result(row, "", carry), **host)
    return answered.union(failed)
