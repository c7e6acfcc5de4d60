"""A small byte-level BPE tokenizer trained locally, for the tiny preset model.

The tiny model must be buildable with no download, so its tokenizer is trained in a fraction of a second
on the project's own texts (prompt templates + synthetic data vocabulary) and shipped with the package
(``stmed/model/tiny_tokenizer.json``, read by :func:`load_tokenizer`). It behaves like a Llama/Vicuna
tokenizer in the ways the rest of the code relies on:

- special tokens ``<unk> <s> </s> <pad> <image>``; ``</s>`` and ``<image>`` written inside a text encode
  to their own single ids (the Vicuna template writes ``</s>`` as plain text after every answer);
- ``<s>`` is prepended when ``add_special_tokens=True`` (the default);
- offsets work (``return_offsets_mapping=True``), which the label masks are computed from.

Byte-level BPE means any text is encodable (no ``<unk>`` in practice), so prompts the corpus never saw
still round-trip.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

UNK, BOS, EOS, PAD, IMAGE = "<unk>", "<s>", "</s>", "<pad>", "<image>"
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD, IMAGE]
"""In id order: ``<unk>``=0, ``<s>``=1, ``</s>``=2, ``<pad>``=3, ``<image>``=4."""
TINY_TOKENIZER = Path(__file__).with_name("tiny_tokenizer.json")
"""The tiny preset's tokenizer: byte-level BPE trained on every text the project renders
(``stmed.data.synthetic.tiny_tokenizer_corpus``); ``python -m stmed.data.synthetic --write-tiny-tokenizer``
writes it anew after a template changes (a test says when it is due)."""


def train_tokenizer(corpus: list[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``corpus`` and wrap it for ``transformers``.

    Deterministic for a given corpus (the BPE trainer breaks ties by order, not randomly).
    """
    if not corpus:
        raise ValueError("train_tokenizer: corpus is empty; pass at least one text")
    # 256 byte symbols + the specials are the floor; below that BPE has nothing to merge.
    floor = 256 + len(SPECIAL_TOKENS)
    if vocab_size < floor:
        raise ValueError(f"train_tokenizer: vocab_size must be >= {floor}, got {vocab_size}")

    bpe = Tokenizer(models.BPE(unk_token=UNK))
    # add_prefix_space=False: "ASSISTANT:" after "</s>" must not grow a space the template never wrote,
    # otherwise character offsets and token boundaries disagree.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)

    bos_id = bpe.token_to_id(BOS)
    # trim_offsets=False: a token's offsets cover exactly the characters it encodes, its leading space
    # included, so character spans map onto tokens without gaps. Then <s> is prepended.
    bpe.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    return _wrap(bpe)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, path: str | Path) -> Path:
    """Write the BPE model of a :func:`train_tokenizer` result as one JSON file."""
    path = Path(path)
    tokenizer.backend_tokenizer.save(str(path))
    return path


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """A tokenizer written by :func:`save_tokenizer`, wrapped exactly as :func:`train_tokenizer` wraps it."""
    return _wrap(Tokenizer.from_file(str(path)))


def _wrap(bpe: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="right",
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )


def load_checkpoint_tokenizer(name_or_path: str | Path):
    """A checkpoint's tokenizer, converted the way its release's ``tokenizer.json`` was made.

    A SentencePiece-only checkpoint (``tokenizer.model``, no ``tokenizer.json``) goes through the class its
    ``tokenizer_config.json`` names: transformers 5.16's ``AutoTokenizer`` converts it to a generic backend
    that leaves out Llama's leading "▁" (so "A lesion" starts with the id of "A", not of "▁A") and every
    prompt would tokenize unlike the published tokenizer. Anything else loads through ``AutoTokenizer``."""
    from transformers import AutoTokenizer
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    folder = Path(name_or_path)
    config = folder / "tokenizer_config.json"
    if (folder / "tokenizer.model").is_file() and not (folder / "tokenizer.json").is_file() and config.is_file():
        named = json.loads(config.read_text()).get("tokenizer_class")
        cls = tokenizer_class_from_name(named) if named else None
        if cls is not None:
            return cls.from_pretrained(folder, trust_remote_code=False)
    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
