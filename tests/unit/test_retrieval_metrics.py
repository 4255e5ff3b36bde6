"""The retrieval evaluation's arithmetic and file handling (llmos_cli.kb)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from llmos.v1 import common_pb2, retrieval_pb2
from llmos_cli.kb import collect_files, documents_by_best_chunk, load_beir, ndcg_at_k, recall_at_k

pytestmark = pytest.mark.unit


def test_ndcg_matches_a_hand_computed_value() -> None:
    relevant = {"a": 1, "b": 1}
    assert ndcg_at_k(["a", "b", "c"], relevant, 10) == pytest.approx(1.0)
    expected = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert ndcg_at_k(["x", "a"], relevant, 10) == pytest.approx(expected)
    assert ndcg_at_k(["x"] * 10 + ["a"], relevant, 10) == 0.0
    assert ndcg_at_k(["a"], {}, 10) == 0.0


def test_recall_counts_relevant_documents_within_k() -> None:
    assert recall_at_k(["a", "x", "b"], {"a": 1, "b": 1}, 2) == 0.5
    assert recall_at_k(["a", "x", "b"], {"a": 1, "b": 1}, 3) == 1.0


def test_documents_rank_by_their_best_chunk() -> None:
    hits = [retrieval_pb2.ScoredChunk(chunk=common_pb2.Chunk(document_id=d)) for d in ("b", "a", "b", "c")]
    assert documents_by_best_chunk(hits) == ["b", "a", "c"]


def test_beir_folder_keeps_judged_queries_only(tmp_path: Path) -> None:
    (tmp_path / "corpus.jsonl").write_text(json.dumps({"_id": "d1", "title": "T", "text": "x"}) + "\n")
    (tmp_path / "queries.jsonl").write_text("\n".join(json.dumps({"_id": q, "text": q}) for q in ("1", "2")) + "\n")
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n1\td1\t1\n")
    data = load_beir(tmp_path)
    assert list(data.queries) == ["1"] and data.qrels == {"1": {"d1": 1}} and data.corpus[0]["_id"] == "d1"
    (tmp_path / "qrels.tsv").unlink()
    with pytest.raises(FileNotFoundError, match="qrels.tsv"):
        load_beir(tmp_path)


def test_collect_files_walks_folders_and_names_documents(tmp_path: Path) -> None:
    (tmp_path / "kb" / "faq").mkdir(parents=True)
    (tmp_path / "kb" / "faq" / "returns.md").write_text("# Returns")
    (tmp_path / "kb" / "page.html").write_text("<p>x</p>")
    (tmp_path / "kb" / "image.png").write_bytes(b"")
    found = collect_files([str(tmp_path / "kb")])
    assert [(f.document_id, f.mime_type) for f in found] == [("faq/returns", "text/markdown"), ("page", "text/html")]
    with pytest.raises(RuntimeError, match="unsupported"):
        collect_files([str(tmp_path / "kb" / "image.png")])
