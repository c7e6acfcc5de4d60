"""Self-play as a Ray Data stage: images in, pairs of sampled answers (and every dropped item) out.

    ds.map_batches(
        Generator,
        fn_constructor_kwargs={"model": model_cfg, "settings": generation_settings},
        compute=ray.data.ActorPoolStrategy(size=2),
        batch_size=4,  # images per call
    )

One input row is one image (``image_id``, ``image_path``). For each image the model describes it,
asks k questions (METHOD §3), and answers every kept question twice under two seeds (or
``answers_per_question`` times, in sub-pairs). Every seed
derives from the global seed and the image id (``GenerationSettings.question_seed``), and the HF
engine samples each row from its own generator, so a rerun gives the same rows whatever the batching.

Output: one row per sampled question and sub-pair (k per image with two answers each) and one per
unreadable image, all with the same columns (the row schema of ``stmed.selfplay.preferences``).
``status`` is ``ok`` for a pair to judge, else ``image_error``, ``question_filtered`` or
``answer_filtered`` with the ``reason``; so counting the stream's statuses counts every filter.
``pair_id`` identifies a row across reruns (resume skips finished ones).

Two engines, one row schema: ``Generator`` here (HF ``generate``, CPU or GPU) and
``actors.vllm_generator.vllm_generate`` (Ray Data LLM processors, GPU only). ``KeptPairJudge`` is the
Judge actor that lets the dropped rows pass, so one stream carries every outcome to the writer.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from actors.judge import VERDICT_COLUMNS, Judge
from stmed.config import ModelConfig, build_config
from stmed.data.images import ImageLoadError, burned_in_annotation, image_to_data_url, load_image
from stmed.log import get_logger
from stmed.model.generate import HFEngine
from stmed.privacy.gate import REFUSED, GateResult, PrivacySettings, TextGate
from stmed.selection.selective import SELECTOR
from stmed.selfplay import generation
from stmed.selfplay.generation import GenerationSettings
from stmed.selfplay.preferences import (
    ANSWER_FILTERED,
    IMAGE_ERROR,
    INPUT_COLUMNS,
    OK,
    OUTPUT_COLUMNS,
    QUESTION_FILTERED,
    make_row,
)

_INT_COLUMNS = {"question_index", "question_seed", "pair_slot", "seed1", "seed2", "gate_regions"}

log = get_logger(__name__)


def to_columns(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Rows → a numpy batch with fixed dtypes, so an empty batch still has typed columns."""
    out = {}
    for name in OUTPUT_COLUMNS:
        values = [row[name] for row in rows]
        if name in _INT_COLUMNS:
            out[name] = np.array(values, dtype=np.int64)
        else:  # object, not fixed-width unicode: data URLs are long and most rows carry none
            out[name] = np.array(values, dtype=object) if values else np.array([], dtype=str)
    return out


def self_play(engine: HFEngine, images: list[tuple[str, str, Any]], settings: GenerationSettings,
              gated: list[GateResult] | None = None) -> list[dict]:
    """Describe → ask k (after the image's demonstrations) → filter/dedupe (→ closed suffix) → answer in
    sub-pairs → filter, for ``(image_id, path, PIL image)``s. Three engine calls for the whole batch, so
    the engine batches across images. A question whose answers all read the same goes to no judge: it
    cannot give a pair.
    ``gated[n]``: the privacy gate's result for image n, whose pixels (masked) go to the judge; the
    model itself sees the original. None: the images go to the judge as they are, ungated."""
    ids, paths, pictures = (list(column) for column in zip(*images))
    descriptions = generation.describe(engine, pictures, settings.describe_sampling)
    q_seeds = [[settings.question_seed(i, j) for j in range(settings.questions_per_image)] for i in ids]
    shown = [generation.demonstrations_for(settings, i) for i in ids]  # few-shot examples, () without a file
    questions = generation.ask_seeded(engine, pictures, descriptions, q_seeds, settings.question_sampling,
                                      shown)
    rows, kept = [], []  # kept: (image number, question index, sub-pair slot)
    for n in range(len(images)):
        asked = [q for q, _ in shown[n]]  # a demonstration repeated is a duplicate
        for j, reason in enumerate(generation.question_reasons(questions[n], asked)):
            if reason is None:
                questions[n][j] = settings.closed_suffixed(questions[n][j], ids[n], j)
                kept += [(n, j, slot) for slot in range(settings.pair_slots)]
            else:
                rows.append(make_row(ids[n], paths[n], QUESTION_FILTERED, reason, j, questions[n][j],
                                     q_seeds[n][j]))
    a_seeds = [settings.answer_seeds(ids[n], j, slot) for n, j, slot in kept]
    answers = generation.answer_twice_seeded(engine, [pictures[n] for n, _, _ in kept],
                                             [questions[n][j] for n, j, _ in kept], a_seeds,
                                             settings.answer_sampling)
    sent = {n: gated[n] if gated else GateResult("", 0, image_to_data_url(pictures[n]), "") for n, _, _ in kept}
    texts: dict[tuple[int, int], set[str]] = {}  # a question's answers as they read
    for (n, j, _), pair in zip(kept, answers):
        texts.setdefault((n, j), set()).update(generation.normalize_text(a) for a in pair)
    for (n, j, slot), pair, seeds in zip(kept, answers, a_seeds):
        reason = generation.answer_pair_reason(*pair, identical_ok=settings.pair_slots > 1)
        if reason is None and len(texts[n, j]) == 1:  # all of its answers alike: no pair, no judge request
            reason = "identical_answers"
        rows.append(make_row(ids[n], paths[n], OK if reason is None else ANSWER_FILTERED, reason or "", j,
                             questions[n][j], q_seeds[n][j], pair, seeds, sent[n].data_url, slot,
                             (sent[n].action, sent[n].regions, sent[n].sent_digest)))
    return rows


LARGE_ON_CPU = 1e9
"""Parameters above which CPU generation is worth a warning (a 7B model there takes minutes a row)."""


class Generator:
    """Holds the model (expensive ``__init__``); ``__call__`` runs self-play on a batch of images."""

    def __init__(self, model: ModelConfig | dict, settings: GenerationSettings | dict,
                 skip_pair_ids: list[str] | frozenset[str] = frozenset(),
                 privacy: PrivacySettings | dict | None = None):
        """``skip_pair_ids``: rows finished by an earlier run (resume); they are generated (the
        image's questions are de-duplicated together) but not emitted. ``privacy``: the burned-in-text
        gate every image passes once, before its questions, so a refused image costs no generation."""
        from stmed.model.build import load_model  # deferred: a process that never generates skips torch init

        if not isinstance(settings, GenerationSettings):
            settings = build_config(GenerationSettings, settings)
        self.settings = settings
        model_cfg = model if isinstance(model, ModelConfig) else build_config(ModelConfig, model)
        device = self.settings.device
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.engine = HFEngine(*load_model(model_cfg), device=device, batch_size=self.settings.batch_size)
        params = self.engine.model.num_parameters()
        if device == "cpu" and params > LARGE_ON_CPU:
            log.warning("generating with a %.1fB-parameter model on the CPU: give the actors a GPU "
                        "(ray.use_gpu=true, pools.generator_gpus=1) or use generation.engine=vllm", params / 1e9)
        self.skip = frozenset(skip_pair_ids)
        privacy = privacy if isinstance(privacy, PrivacySettings) else build_config(PrivacySettings, privacy or {})
        self.gate = TextGate(privacy)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [name for name in INPUT_COLUMNS if name not in batch]
        if missing:
            raise ValueError(f"Generator needs the column(s) {missing}; the batch has {sorted(batch)}")
        rows, loaded = [], []
        for image_id, path in zip(batch["image_id"], batch["image_path"]):
            try:
                loaded.append((str(image_id), str(path), load_image(str(path))))
            except ImageLoadError as err:  # one bad file is a recorded row, not a failed job
                rows.append(make_row(str(image_id), str(path), IMAGE_ERROR, err.reason))
        gated = self.gate.check([img for _, _, img in loaded], [burned_in_annotation(p) for _, p, _ in loaded])
        kept = [n for n, result in enumerate(gated) if result.action != REFUSED]
        for n, result in enumerate(gated):
            if result.action == REFUSED:  # the image leaves self-play here, with the reason
                image_id, path, _ = loaded[n]
                rows.append(make_row(image_id, path, IMAGE_ERROR, result.reason, gate=(REFUSED, result.regions, "")))
        if kept:
            rows += self_play(self.engine, [loaded[n] for n in kept], self.settings, [gated[n] for n in kept])
        return to_columns([row for row in rows if row["pair_id"] not in self.skip])


class KeptPairJudge(Judge):
    """The Judge over a generator's stream: ``ok`` rows are judged, the others pass through with
    empty (null) verdict columns — or, rows the selector labelled (``labelled_by``), with its verdict.
    Output columns = input minus the image, plus the verdict's."""

    async def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray(batch["status"]) == OK
        if "labelled_by" in batch:  # selective judging: the selector's pairs pass with its verdict (actors.selector)
            ok &= np.asarray(batch["labelled_by"], dtype=object) != SELECTOR
        rest = {name: column[~ok] for name, column in batch.items() if name != "image_data_url"}
        rest.update({name: np.full(int((~ok).sum()), None, dtype=object) for name in VERDICT_COLUMNS
                     if name not in batch})
        if self.settings.mode == "batch":  # judged later: pending rows keep their image, the others have none
            rest["image_data_url"] = np.full(int((~ok).sum()), "", dtype=object)
        if not ok.any():
            return rest
        judged = await super().__call__({name: column[ok] for name, column in batch.items()})
        if ok.all():
            return judged
        # object dtype: a verdict column mixes numbers with the passed rows' nulls
        return {name: np.concatenate([np.asarray(judged[name], dtype=object), rest[name].astype(object)])
                for name in judged}
