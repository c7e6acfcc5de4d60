"""Self-play with vLLM: the same rows as ``actors.generator.Generator``, from Ray Data LLM stages.

Run for real in the tests on vLLM's CPU backend (``generation.vllm_bundle: {CPU: …}``,
tests/jobs/test_vllm.py); nothing GPU-specific is verified. ``ray.data.llm`` (and through it vLLM) is
imported inside ``vllm_generate``, so importing this module costs nothing where vLLM is not installed.

How it maps self-play onto processors (one engine pool each, one GPU per replica by default):

1. load: each image decoded once to check it (or an ``image_error`` row); rows carry its path, and each
   engine request (and the judge, once) gets the re-encoded pixels as a data URL (``image_url``);
2. describe (greedy) → k duplicated rows per image with distinct seeds (``n > 1`` would keep only the
   first completion; prefix caching shares the image prefill) → ask;
3. ``groupby(image_id)``: de-duplicating needs all k questions of an image, so this is a barrier; its
   result is materialised once so the dropped questions can leave the stream;
4. each kept question becomes ``answers_per_question / 2`` sub-pair rows (seeds and ids per slot);
   answer 1 then answer 2 as two chained stages on the same row (no shuffle, so pairs stream on into
   the judge), then the answer filters.

Prompts are ``stmed.model.prompts``' template of the checkpoint's family (Vicuna, ChatML) rendered here
(chat-template stage off); the OpenAI-style message only carries the image for the multimodal stage.
The model must be a merged checkpoint: vLLM applies LoRA to the language model only. Two engine stages
run at a time (describe with ask, then the answers), each growing to half of ``vllm_concurrency``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import numpy as np

from actors.generator import to_columns
from stmed.data.images import ImageLoadError, image_to_data_url, load_image
from stmed.model import prompts
from stmed.model.generate import Sampling, clean_output
from stmed.selfplay import generation
from stmed.selfplay.generation import GenerationSettings
from stmed.selfplay.preferences import (
    ANSWER_FILTERED,
    IMAGE_ERROR,
    OK,
    OUTPUT_COLUMNS,
    QUESTION_FILTERED,
    make_pair_id,
    make_row,
)

if TYPE_CHECKING:
    import ray.data


@functools.lru_cache(maxsize=16)
def image_url(path: str) -> str:
    """The image at ``path`` as the data URL an engine request carries (re-encoded pixels, as the HF engine
    sees them). Rows carry the path, not this: a full-resolution PNG per row would ride through the
    question fan-out, the barrier and every answer stage. The cache holds the few images a batch is
    about (a batch's rows come from a handful of images), so an image is encoded about once per stage."""
    return image_to_data_url(load_image(path))


def load_images(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Image rows → ``ok`` rows (the image decodes; only its path travels on), or ``image_error`` rows."""
    rows = []
    for image_id, path in zip(batch["image_id"], batch["image_path"]):
        try:
            load_image(str(path))
            rows.append(make_row(str(image_id), str(path)))
        except ImageLoadError as err:
            rows.append(make_row(str(image_id), str(path), IMAGE_ERROR, err.reason))
    return to_columns(rows)


def vllm_request(row: dict, prompt: str, sampling: Sampling, seed: int | None,
                 chat: prompts.ChatFormat = prompts.VICUNA) -> dict[str, Any]:  # fmt: skip
    """One engine request: our rendered prompt, the image as an OpenAI ``image_url`` part, and
    per-row sampling parameters (``seed`` makes a slot reproducible); generation stops at the family's
    end-of-turn token. A row without ``image_data_url`` gets its image from ``image_path``. Sampling is
    explicit and complete (repetition penalty 1): a checkpoint's generation_config.json is not applied."""
    params = {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k or -1,
              "max_tokens": sampling.max_new_tokens, "stop": [chat.eos], "repetition_penalty": 1.0}
    if seed is not None:
        params["seed"] = int(seed)
    url = str(row.get("image_data_url") or "") or image_url(str(row["image_path"]))
    image = {"type": "image_url", "image_url": {"url": url}}
    return {"prompt": prompt, "messages": [{"role": "user", "content": [image]}], "sampling_params": params}


def carry(row: dict) -> dict[str, Any]:
    """The columns that survive a processor stage (its postprocess drops the engine's own)."""
    kept = {name: row[name] for name in OUTPUT_COLUMNS if name in row}
    return kept | ({"description": row["description"]} if "description" in row else {})


def questions_of_image(group: dict[str, np.ndarray], settings: GenerationSettings) -> dict[str, np.ndarray]:
    """All k questions of one image → rows, filtered, de-duplicated and suffixed as the HF path does."""
    order = np.argsort(group["question_index"])
    shown = generation.demonstrations_for(settings, str(group["image_id"][0])) if len(order) else ()
    asked = [q for q, _ in shown]  # a demonstration repeated is a duplicate
    reasons = generation.question_reasons([str(group["question"][i]) for i in order], asked)
    rows = []
    for i, reason in zip(order, reasons):
        image_id, index = str(group["image_id"][i]), int(group["question_index"][i])
        question = str(group["question"][i])
        if reason is None:
            question = settings.closed_suffixed(question, image_id, index)
        status = OK if reason is None else QUESTION_FILTERED
        rows.append(make_row(image_id, str(group["image_path"][i]), status, reason or "", index, question,
                             int(group["question_seed"][i])))
    return to_columns(rows)


def ask_request(row: dict, settings: GenerationSettings,
                chat: prompts.ChatFormat = prompts.VICUNA) -> dict[str, Any]:  # fmt: skip
    """The questioner request of one (image, question slot) row: the HF path's prompt for the image
    (description, then its demonstrations), sampled under the slot's seed."""
    shown = generation.demonstrations_for(settings, str(row["image_id"]))
    prompt = prompts.question_prompt(str(row["description"]) or "An image.", chat=chat, demonstrations=shown)
    return vllm_request(row, prompt, settings.question_sampling, int(row["question_seed"]), chat)


def sub_pairs(row: dict, settings: GenerationSettings) -> list[dict[str, Any]]:
    """A kept question → one row per sub-pair of its answers, with the slot's id and seeds."""
    image_id, index = str(row["image_id"]), int(row["question_index"])
    question_seed = int(row["question_seed"])
    return [row | {"pair_slot": slot, "pair_id": make_pair_id(image_id, index, question_seed, slot),
                   **dict(zip(("seed1", "seed2"), settings.answer_seeds(image_id, index, slot)))}
            for slot in range(settings.pair_slots)]


def finish_pair(row: dict, identical_ok: bool = False) -> dict[str, Any]:
    """A row with both answers → ``ok`` or ``answer_filtered`` (the image leaves with a dropped pair)."""
    reason = generation.answer_pair_reason(str(row["answer1"]), str(row["answer2"]), identical_ok)
    out = carry(row) | {"status": OK if reason is None else ANSWER_FILTERED, "reason": reason or ""}
    # the judge's copy of the image, made here once (rows travel without it)
    out["image_data_url"] = (str(row.get("image_data_url") or "") or image_url(str(row["image_path"]))
                             if reason is None else "")
    return out


def engine_defaults(model_path: str) -> dict[str, Any]:
    """vLLM engine arguments every stmed engine takes (generation, evaluation, serving).

    ``generation_config="vllm"``: a checkpoint's generation_config.json (Qwen2.5-VL-7B-Instruct's repetition
    penalty) is not applied as a default, so vLLM decodes with the parameters stmed passes, as HF does.
    ``limit_mm_per_prompt``: one image and no other input (``Family.mm_limits``). ``max_model_len``: not
    the checkpoint's 128k (Qwen2.5-VL), which start-up would profile and reserve a KV cache for.
    """
    from stmed.model.build import check_checkpoint
    from stmed.model.families import family_of

    limits = dict(family_of(check_checkpoint(model_path)).mm_limits)
    return {"max_model_len": 4096, "limit_mm_per_prompt": limits, "generation_config": "vllm"}


def engine_config(model_path: str, settings: GenerationSettings, concurrency: int | tuple[int, int]):
    """One Ray Data LLM stage's config: our rendered prompt in, generated text out (stages of Ray's own
    chat template, tokenizer and detokenizer off), the image through the multimodal stage."""
    from ray.data.llm import vLLMEngineProcessorConfig

    engine_kwargs = {**engine_defaults(model_path), "enable_prefix_caching": True, **settings.vllm_engine_kwargs}
    placement = {"placement_group_config": {"bundles": [settings.vllm_bundle]}} if settings.vllm_bundle else {}
    return vLLMEngineProcessorConfig(
        model_source=model_path, engine_kwargs=engine_kwargs, batch_size=settings.batch_size,
        concurrency=concurrency, **placement,
        # the base64 image_url → vLLM's multimodal input
        prepare_multimodal_stage={"enabled": True, "num_cpus": settings.vllm_stage_cpus},
        chat_template_stage={"enabled": False},  # the prompt is rendered by stmed.model.prompts
        tokenize_stage={"enabled": False},  # vLLM tokenises the text prompt and expands <image> itself
        detokenize_stage={"enabled": False},  # vLLM returns generated_text
    )  # fmt: skip


def stage_concurrency(settings: GenerationSettings) -> int | tuple[int, int]:
    """Replicas per engine stage. Two stages run at a time (describe with ask, then answer 1 with answer 2,
    the questions' barrier between), so each may grow to half of ``vllm_concurrency``: every GPU works
    in both phases, where one replica per stage would leave half of four GPUs idle."""
    half = max(1, settings.vllm_concurrency // 2)
    return half if half == 1 else (1, half)


def vllm_generate(ds: ray.data.Dataset, model_path: str, settings: GenerationSettings,
                  skip_pair_ids: frozenset[str] = frozenset()) -> ray.data.Dataset:
    """Rows ``image_id, image_path`` → ``stmed.selfplay.preferences.OUTPUT_COLUMNS`` rows (module doc)."""
    from ray.data.llm import build_processor

    config = engine_config(model_path, settings, stage_concurrency(settings))
    # Every host-side step (here and in the stages) at vllm_stage_cpus: on a small node Ray Data would
    # otherwise hold the load back for CPUs the engine stages have reserved.
    host = {"num_cpus": settings.vllm_stage_cpus} if settings.vllm_stage_cpus is not None else {}


    def stage(pre, post):
        return build_processor(config, preprocess=pre, postprocess=post, preprocess_map_kwargs=host,
                               postprocess_map_kwargs=host)

    def text(row: dict) -> str:
        return clean_output(str(row["generated_text"]))

    from stmed.model.build import checkpoint_chat  # deferred: torch and transformers load only here

    chat = checkpoint_chat(model_path)  # the prompts are rendered here, in the checkpoint family's format
    loaded = ds.map_batches(load_images, batch_format="numpy", **host)
    # A stream cannot fork: failed images come from a second, CPU-only pass of the (cheap) load.
    failed = loaded.filter(lambda r: r["status"] != OK, **host)
    described = stage(lambda r: vllm_request(r, prompts.describe_prompt(chat=chat), settings.describe_sampling,
                                             None, chat),
                      lambda r: carry(r) | {"description": text(r) or "An image."},
                      )(loaded.filter(lambda r: r["status"] == OK, **host))
    expanded = described.flat_map(lambda r: [
        carry(r) | {"question_index": j, "question_seed": settings.question_seed(str(r["image_id"]), j)}
        for j in range(settings.questions_per_image)], **host)
    asked = stage(lambda r: ask_request(r, settings, chat),
                  lambda r: carry(r) | {"question": generation.clean_question(text(r))})(expanded)
    # The barrier: de-duplicating needs all k questions of an image. Its rows are small (no image).
    questions = asked.groupby("image_id").map_groups(
        questions_of_image, fn_kwargs={"settings": settings}, batch_format="numpy", **host).materialize()
    pairs = questions.filter(lambda r: r["status"] == OK, **host).flat_map(lambda r: sub_pairs(r, settings), **host)
    for slot, seed_column in (("answer1", "seed1"), ("answer2", "seed2")):
        pairs = stage(lambda r, c=seed_column: vllm_request(
                          r, prompts.answer_prompt(str(r["question"]), chat=chat), settings.answer_sampling,
                          int(r[c]), chat),
                      lambda r, s=slot: carry(r) | {s: text(r)})(pairs)
    dropped = questions.filter(lambda r: r["status"] != OK, **host)
    finish = functools.partial(finish_pair, identical_ok=settings.pair_slots > 1)
    done = pairs.map(finish, **host).union(dropped, failed)
    return done.filter(lambda r: r["pair_id"] not in skip_pair_ids, **host)
