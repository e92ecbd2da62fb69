"""README.md's example runs exactly as written, and the commands CI relies on stay in place."""
import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
    """The fenced python block right after the line ``<!-- example -->``."""
    match = re.search(r"^<!-- example -->\n```python\n(.*?)^```$", README.read_text(), re.MULTILINE | re.DOTALL)
    assert match, "README.md lost its example: a ```python block right after a line <!-- example -->"
    return match.group(1)


def test_readme_example_runs_verbatim(tmp_path, monkeypatch, capsys):
    source = readme_example()
    assert len(source.strip().splitlines()) <= 20, "the README example should stay about 15 lines"
    monkeypatch.chdir(tmp_path)  # it writes example.rqmoe in the working directory
    namespace = {"__name__": "__readme__"}
    exec(compile(source, str(README) + ":example", "exec"), namespace)
    assert re.search(r"recall@1 = [01]\.\d\d with \d+-byte codes", capsys.readouterr().out)
    assert (tmp_path / "example.rqmoe").is_file()
    x_rec = namespace["x_rec"]
    assert x_rec.shape == (10, 128) and x_rec.dtype == np.float32
    # decoded vectors are close to the originals: well under the vectors' own mean squared norm
    xb = namespace["ds"].xb[:10]
    assert ((x_rec - xb) ** 2).sum(1).mean() < 0.5 * (xb ** 2).sum(1).mean()


def test_readme_keeps_the_two_commands():
    text = README.read_text()
    section = text[text.index("## The two commands"):]
    assert ('pip install torch==2.13.0 && pip install -e ".[data]" && python -m faiss_rqmoe demo --quick'
            in section)
    assert 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q' in section
    assert "\n## Results\n" in text
