"""A disk cache of judge replies keyed by the request, so that a rerun never pays for a reply twice.

A key is a sha256 over the model, the temperature, the judge text and a digest of the image
(``image_digest``, the sha256 of its data URL). The judge takes that digest once per pair, so the 7 KB
image is hashed once rather than with every request of the pair, and not at all with the cache off.
(Keys before this layout hashed the whole request JSON; entries written under them are not found and
are requested once again.)
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from stmed.log import get_logger

log = get_logger(__name__)


def image_digest(image_url: str) -> str:
    """The digest a cache key holds for an image: the sha256 of its (data) URL."""
    return hashlib.sha256(image_url.encode()).hexdigest()


@dataclass(frozen=True)
class CachedReply:
    reply: str
    prompt_tokens: int
    completion_tokens: int


class ReplyCache:
    """Parsed-OK replies on disk, one small JSON file per request key (``<dir>/ab/abcd….json``).

    Each file is written to a unique temporary name and renamed into place, so readers never see half
    a file and any number of coroutines or actor processes can share one directory; two writers of
    the same key write the same reply and the last rename wins.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(model: str, text: str, temperature: float, image: str | None) -> str:
        """The key of a request of ``text`` and one image (``image_digest``), or none (None)."""
        request = {"model": model, "temperature": temperature, "text": text, "image": image}
        return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> CachedReply | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            entry = CachedReply(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as err:  # unreadable, not UTF-8, not JSON, not an entry
            log.warning("ignoring unreadable cache entry %s (%s); it will be re-requested", path,
                        type(err).__name__)
            return None
        if not (isinstance(entry.reply, str) and isinstance(entry.prompt_tokens, int)
                and isinstance(entry.completion_tokens, int)):  # fmt: skip
            log.warning("ignoring malformed cache entry %s; it will be re-requested", path)
            return None
        return entry

    def put(self, key: str, entry: CachedReply) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{key}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(asdict(entry)))
        os.replace(tmp, path)
