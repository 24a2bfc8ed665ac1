"""NLTK's tokeniser, tagger and lemmatiser, as the reference scorers call them.

OPERA's ``chair.py`` (CHAIR) and AMBER's ``inference.py`` read captions with
``nltk.word_tokenize``, ``nltk.pos_tag`` and ``WordNetLemmatizer().lemmatize``. Their numbers
are reproduced only with the same models, so this module loads exactly those three NLTK data
packages and nothing else, once per process:

- ``punkt_tab`` (``tokenizers/punkt_tab/english/``), the sentence splitter of
  ``word_tokenize``;
- ``averaged_perceptron_tagger_eng`` (``taggers/averaged_perceptron_tagger_eng/``);
- ``wordnet`` (``corpora/wordnet``, zipped or not).

These are the names NLTK >= 3.9 reads (3.8 read pickles, ``punkt`` and
``averaged_perceptron_tagger``, and tokenises some captions differently). Nothing is ever
downloaded here: a missing package is an :class:`~pykvsmooth.eval.coco.EvalError` that says
how to get it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .coco import EvalError, PathLike

# NLTK data package name -> the paths nltk.data.find may find it at (WordNet is read
# zipped, as NLTK's downloader installs it, or unpacked)
RESOURCES: dict[str, tuple[str, ...]] = {
    "punkt_tab": ("tokenizers/punkt_tab/english/",),
    "averaged_perceptron_tagger_eng": ("taggers/averaged_perceptron_tagger_eng/",),
    "wordnet": ("corpora/wordnet/", "corpora/wordnet.zip/wordnet/"),
}
MIN_NLTK = (3, 9)
DOWNLOAD_COMMAND = "python -m nltk.downloader " + " ".join(RESOURCES)


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _import_nltk() -> Any:
    try:
        import nltk
    except ImportError:
        raise EvalError(
            "this protocol reads captions with NLTK, which is not installed: "
            "pip install 'pykvsmooth[eval]' (or pip install 'nltk>=3.9.1')"
        ) from None
    if _version(nltk.__version__) < MIN_NLTK:
        raise EvalError(
            f"NLTK {nltk.__version__} is too old: the reference protocols need NLTK >= 3.9 "
            "(its punkt_tab and averaged_perceptron_tagger_eng models); "
            "pip install -U 'nltk>=3.9.1'"
        )
    return nltk


def _found(nltk: Any, resource: str) -> bool:
    try:
        nltk.data.find(resource)
    except LookupError:
        return False
    return True


class NltkPipeline:
    """``word_tokenize``, ``pos_tag`` and ``WordNetLemmatizer.lemmatize`` with the data loaded once.

    ``nltk.pos_tag`` builds a new tagger (reading its 5 MB model) on every call in NLTK 3.9;
    here one tagger is built and its ``tag`` called, which is what ``pos_tag`` does inside.
    ``data_dir`` is put first on NLTK's search path (the ``NLTK_DATA`` environment variable
    and NLTK's default folders are searched after it).
    """

    def __init__(self, data_dir: PathLike | None = None) -> None:
        nltk = _import_nltk()
        if data_dir is not None:
            folder = Path(data_dir)
            if not folder.is_dir():
                raise EvalError(f"--nltk-data {folder}: no such folder")
            if str(folder) not in nltk.data.path:
                nltk.data.path.insert(0, str(folder))
        missing = []
        for name, paths in RESOURCES.items():
            if not any(_found(nltk, path) for path in paths):
                missing.append(name)
        if missing:
            searched = os.pathsep.join(str(p) for p in nltk.data.path)
            raise EvalError(
                f"NLTK data {', '.join(missing)} not found (searched {searched}); "
                f"download it with: {DOWNLOAD_COMMAND}  "
                "(or point NLTK_DATA / --nltk-data at a folder that has it)"
            )
        from nltk.stem import WordNetLemmatizer
        from nltk.tag.perceptron import PerceptronTagger

        self._nltk = nltk
        try:
            self._tagger = PerceptronTagger()
            self._lemmatizer = WordNetLemmatizer()
            self._lemmatizer.lemmatize("dogs")  # opens WordNet now, not mid-evaluation
        except (LookupError, OSError, ValueError) as e:
            raise EvalError(
                f"NLTK data is incomplete or unreadable ({e}); download it again with: "
                f"{DOWNLOAD_COMMAND}"
            ) from None

    def tokenize(self, text: str) -> list[str]:
        return list(self._nltk.word_tokenize(text))

    def tag(self, tokens: Sequence[str]) -> list[tuple[str, str]]:
        return [(str(w), str(t)) for w, t in self._tagger.tag(list(tokens))]

    def lemmatize(self, word: str, pos: str = "n") -> str:
        return str(self._lemmatizer.lemmatize(word, pos=pos))


_PIPELINES: dict[str, NltkPipeline] = {}


def pipeline(data_dir: PathLike | None = None) -> NltkPipeline:
    """The process's pipeline for ``data_dir`` (built on first use)."""
    key = "" if data_dir is None else str(Path(data_dir).resolve())
    if key not in _PIPELINES:
        _PIPELINES[key] = NltkPipeline(data_dir)
    return _PIPELINES[key]
