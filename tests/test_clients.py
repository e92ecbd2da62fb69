"""The clients faiss users run, holding an IndexRQMoE: LangChain's FAISS store and LlamaIndex's
FaissVectorStore, with the real packages (the ``clients`` extra), offline.

Each store over an IndexRQMoE is compared with the same store over a plain faiss index holding the
vectors the codec decodes, with the same documents: the codec's answers are then exact, so both stores
must return the same documents in the same order, with scores equal to float32 rounding (rtol 1e-4).
The codec searches exhaustively here (flat, nshort >= ntotal) and the data have no two vectors with one
code (checked), so exact ties cannot reorder results.
"""
import re
import warnings
import zlib
from pathlib import Path

import faiss
import numpy as np
import pytest

import faiss_rqmoe

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # langchain-community announces its successors
    community = pytest.importorskip("langchain_community.vectorstores")
from langchain_community.docstore.in_memory import InMemoryDocstore  # noqa: E402
from langchain_core.embeddings import Embeddings  # noqa: E402

FAISS = community.FAISS
D = 32
SCORE_RTOL = 1e-4
CENTERS = np.random.default_rng(0).standard_normal((40, D)).astype(np.float32) * 3
CLIENTS_DOC = Path(__file__).resolve().parent.parent / "docs" / "clients.md"


class TopicEmbeddings(Embeddings):
    """A deterministic stand-in for an embedding model: each text maps to one of 40 cluster centres plus
    noise, both drawn from a generator seeded by the text's CRC32; no model, no network."""

    def __init__(self, d=D, centers=CENTERS, noise=1.0):
        self.d, self.centers, self.noise = d, centers, noise

    def vector(self, text: str) -> np.ndarray:
        rng = np.random.default_rng(zlib.crc32(text.encode()))
        centre = self.centers[rng.integers(len(self.centers))]
        return (centre + self.noise * rng.standard_normal(self.d)).astype(np.float32)

    def embed_documents(self, texts):
        return [self.vector(t).tolist() for t in texts]

    def embed_query(self, text):
        return self.vector(text).tolist()


EMBEDDINGS = TopicEmbeddings()
TEXTS = [f"note {i}" for i in range(60)]
QUERIES = [f"question {j}" for j in range(12)] + TEXTS[:3] + TEXTS[45:47]


@pytest.fixture(scope="module")
def codec():
    """A trained, empty flat codec for the embeddings (about 3 s on two cores)."""
    index = faiss_rqmoe.index_factory(D, "RQMoE4x6_N1L1H8", max_epochs=1, progress=False, device="cpu")
    train = np.array(EMBEDDINGS.embed_documents([f"training text {i}" for i in range(3000)]), dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a one-epoch codec may keep its RQ start: that is fine here
        index.train(train)
    index.nshort = 1000  # exhaustive re-ranking: answers are exact over the decoded vectors
    probe = faiss_rqmoe.clone_index(index)
    probe.add(np.array(EMBEDDINGS.embed_documents(TEXTS), dtype=np.float32))
    assert len(np.unique(probe.reconstruct_n(0, probe.ntotal), axis=0)) == probe.ntotal, "two documents share a code"
    return index


# ----------------------------------------------------------------- LangChain
def new_store(index):
    return FAISS(EMBEDDINGS, index, InMemoryDocstore(), {})


def add_both(ours, reference, texts, start):
    """add_texts on our store; the reference gets the same documents under the same ids, with the
    vectors our codec decoded."""
    metadatas = [{"n": start + i} for i in range(len(texts))]
    ids = [f"doc-{start + i}" for i in range(len(texts))]
    n0 = ours.index.ntotal
    assert ours.add_texts(texts, metadatas=metadatas, ids=ids) == ids
    decoded = ours.index.reconstruct_n(n0, len(texts))
    reference.add_embeddings(list(zip(texts, decoded.tolist())), metadatas=metadatas, ids=ids)


def answers(store, k=5, mmr=True):
    """Per query: similarity_search_with_score, MMR with scores (unless mmr=False), or the exception a
    search raised."""
    out = []
    for query in QUERIES:
        try:
            parts = [store.similarity_search_with_score(query, k=k)]
            if mmr:
                parts.append(store.max_marginal_relevance_search_with_score_by_vector(
                    EMBEDDINGS.embed_query(query), k=3, fetch_k=8))
        except Exception as exc:  # noqa: BLE001 -- compared between the two stores
            out.append(("raised", type(exc).__name__))
            continue
        out.append([[(doc.id, doc.page_content, doc.metadata) for doc, _ in part] +
                    [np.array([score for _, score in part], dtype=np.float64)] for part in parts])
    return out


def assert_same_answers(mine, theirs):
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs):
        if isinstance(a, tuple) or isinstance(b, tuple):
            assert a == b
            continue
        for part_a, part_b in zip(a, b):
            assert part_a[:-1] == part_b[:-1]
            np.testing.assert_allclose(part_a[-1], part_b[-1], rtol=SCORE_RTOL)


def test_langchain_store_answers_as_over_a_flat_faiss_index(codec):
    ours, reference = new_store(faiss_rqmoe.clone_index(codec)), new_store(faiss.IndexFlatL2(D))
    add_both(ours, reference, TEXTS[:40], 0)
    add_both(ours, reference, TEXTS[40:], 40)
    assert ours.index.ntotal == reference.index.ntotal == len(TEXTS)
    assert_same_answers(answers(ours), answers(reference))
    docs = ours.similarity_search("note 7", k=2)
    assert docs[0].page_content == "note 7" and docs == reference.similarity_search("note 7", k=2)
    assert ours.get_by_ids(["doc-3"]) == reference.get_by_ids(["doc-3"])


def test_langchain_save_load_and_bytes_keep_the_codec(codec, tmp_path):
    store = new_store(faiss_rqmoe.clone_index(codec))
    store.add_texts(TEXTS, ids=[f"doc-{i}" for i in range(len(TEXTS))])
    store.save_local(str(tmp_path / "store"))
    index_file = tmp_path / "store" / "index.faiss"
    assert index_file.read_bytes()[:4] == b"PK\x03\x04"  # the package's file, not a faiss one
    assert isinstance(faiss_rqmoe.read_index(index_file), faiss_rqmoe.IndexRQMoE)
    loaded = FAISS.load_local(str(tmp_path / "store"), EMBEDDINGS, allow_dangerous_deserialization=True)
    unpickled = FAISS.deserialize_from_bytes(store.serialize_to_bytes(), EMBEDDINGS,
                                             allow_dangerous_deserialization=True)
    expected = answers(store)
    for other in (loaded, unpickled):
        assert isinstance(other.index, faiss_rqmoe.IndexRQMoE) and other.index is not store.index
        got = answers(other)
        assert [a[0][:-1] + a[1][:-1] for a in got] == [a[0][:-1] + a[1][:-1] for a in expected]
        for a, b in zip(got, expected):  # the same index: scores agree bit for bit
            assert np.array_equal(a[0][-1], b[0][-1]) and np.array_equal(a[1][-1], b[1][-1])
    with pytest.raises(RuntimeError, match="could not open"):  # as faiss.write_index refuses the same path
        faiss.write_index(store.index, str(tmp_path / "absent" / "index.faiss"))


class IVFFlatMergeDefault(faiss.IndexIVFFlat):
    """faiss.IndexIVFFlat with merge_from's add_id defaulting to 0, as in faiss's C++ Index::merge_from
    (the Python binding of IndexIVF.merge_from requires it, so LangChain's merge_from(target) stops
    there with a TypeError)."""

    def merge_from(self, other, add_id=0):
        super().merge_from(other, add_id)


def ivf1_over(d):
    """A plain faiss IVF index with one list: exact search, and ids kept through remove and merge."""
    index = IVFFlatMergeDefault(faiss.IndexFlatL2(d), d, 1)
    index.quantizer.add(np.zeros((1, d), dtype=np.float32))
    index.is_trained = True
    return index


def test_langchain_delete_and_merge_from_keep_ids_as_over_a_faiss_ivf_index(codec):
    """IndexRQMoE keeps ids through remove_ids and merge_from as faiss's IVF indexes do; LangChain's
    delete and merge_from renumber documents by position, which only faiss's flat indexes follow. So
    after them the store answers as it does over a faiss IVF index (wrong documents or KeyError), and
    docs/clients.md says so."""
    ours, reference = new_store(faiss_rqmoe.clone_index(codec)), new_store(ivf1_over(D))
    add_both(ours, reference, TEXTS[:40], 0)
    # no MMR here: it reconstructs, which faiss's IVF indexes do only with a direct map, and that map
    # cannot be merged
    assert_same_answers(answers(ours, mmr=False), answers(reference, mmr=False))
    assert ours.delete(["doc-3", "doc-17"]) and reference.delete(["doc-3", "doc-17"])
    assert ours.index.ntotal == reference.index.ntotal == 38
    after_delete = answers(ours, mmr=False)
    assert_same_answers(after_delete, answers(reference, mmr=False))
    other_ours, other_reference = new_store(faiss_rqmoe.clone_index(codec)), new_store(ivf1_over(D))
    add_both(other_ours, other_reference, TEXTS[40:], 40)
    ours.merge_from(other_ours)
    reference.merge_from(other_reference)
    assert ours.index.ntotal == reference.index.ntotal == 58 and other_ours.index.ntotal == 0
    assert_same_answers(answers(ours, mmr=False), answers(reference, mmr=False))
    # the documented consequence: over faiss's flat index, LangChain answers otherwise after a delete
    flat = new_store(faiss.IndexFlatL2(D))
    add_both(new_store(faiss_rqmoe.clone_index(codec)), flat, TEXTS[:40], 0)
    flat.delete(["doc-3", "doc-17"])
    assert answers(flat, mmr=False) != after_delete


def clients_example() -> str:
    text = CLIENTS_DOC.read_text()
    match = re.search(r"^<!-- langchain example -->\n```python\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)
    assert match, "docs/clients.md lost its example: a ```python block right after <!-- langchain example -->"
    return match.group(1)


def test_the_documented_langchain_example_runs(tmp_path, monkeypatch):
    """docs/clients.md's example, verbatim, with a pretrained codec; `embeddings` and `texts` stand for
    the reader's own (128-d, SIFT-like: what the codec was trained for)."""
    rng = np.random.default_rng(0)
    sift_like = TopicEmbeddings(128, rng.integers(0, 60, (40, 128)).astype(np.float32) * 2, noise=30.0)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__clients__", "embeddings": sift_like, "texts": TEXTS}
    exec(compile(clients_example(), str(CLIENTS_DOC) + ":example", "exec"), namespace)
    store = namespace["store"]
    assert isinstance(store.index, faiss_rqmoe.IndexRQMoE) and store.index.ntotal == len(TEXTS)
    assert namespace["docs"][0].page_content == TEXTS[0]
    assert (tmp_path / "my_store" / "index.faiss").is_file()


# ---------------------------------------------------------------- LlamaIndex
def test_llamaindex_store_answers_as_over_a_flat_faiss_index(codec, tmp_path):
    vector_stores = pytest.importorskip("llama_index.vector_stores.faiss")
    from llama_index.core.schema import TextNode
    from llama_index.core.vector_stores.types import VectorStoreQuery

    Store = vector_stores.FaissVectorStore
    ours = Store(faiss_index=faiss_rqmoe.clone_index(codec))
    nodes = [TextNode(text=t, embedding=EMBEDDINGS.embed_query(t)) for t in TEXTS[:30]]
    assert ours.add(nodes) == [str(i) for i in range(30)]  # one vector a call, ids by ntotal
    decoded = ours.client.reconstruct_n(0, 30)
    reference = Store(faiss_index=faiss.IndexFlatL2(D))
    reference.add([TextNode(text=n.text, embedding=v.tolist()) for n, v in zip(nodes, decoded)])

    def query(store):
        results = [store.query(VectorStoreQuery(query_embedding=EMBEDDINGS.embed_query(q), similarity_top_k=4))
                   for q in QUERIES]
        return [r.ids for r in results], np.array([r.similarities for r in results], dtype=np.float64)

    ids, scores = query(ours)
    ref_ids, ref_scores = query(reference)
    assert ids == ref_ids
    np.testing.assert_allclose(scores, ref_scores, rtol=SCORE_RTOL)
    path = tmp_path / "persisted" / "vector_store.json"  # persist creates the folder, then faiss.write_index
    ours.persist(persist_path=str(path))
    loaded = Store.from_persist_path(str(path))
    assert isinstance(loaded.client, faiss_rqmoe.IndexRQMoE)
    loaded_ids, loaded_scores = query(loaded)
    assert loaded_ids == ids and np.array_equal(loaded_scores, scores)
