"""The docs say what the code does: every excerpt docs/math.md attributes to a source file is in it.

The convention (stated at the top of docs/math.md, and parsed here, so a new excerpt is checked
without a change to this file):

* A fenced block is an excerpt when its info string names source files after the language,
  relative to the repository root: ```` ```python xpnet/layers.py ````. Its text must occur in
  one of those files, whitespace and comments aside; a line ``...`` marks an elision: the parts
  around it must occur in that order, not necessarily adjacent.
* A block of text (a paragraph, a list or a table: lines between blank lines and fences) that
  links a source file (``[layers.py](../xpnet/layers.py)``) attributes its inline code spans to
  the files it links. A span that is a name (``Dense.build``, ``_subtract``,
  ``GradcheckReport.passed()``) must name words of those files (a leading module name such as
  ``layers.`` may be the file's own); any other span must occur verbatim, whitespace normalized,
  in one of them.
* Spans in blocks that link no source file (user code, settings, file names) are not excerpts and
  are not checked, except that a span that reads like library code (``self.x``, ``xp.sum``,
  ``np.matmul``) must be attributed. Math is written as text (Unicode), not in code spans.

README.md is read the same way (only read: its excerpts are fixed in README.md), and the
repository paths it names must exist.
"""

from __future__ import annotations

import contextlib
import io
import re
import tokenize
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
MATH = ROOT / "docs" / "math.md"

_FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*(.*)$")
_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_NAME = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*(?:\(\))?")
_READS_LIKE_CODE = re.compile(r"\b(?:self|xp|np|F)\.\w")
_ELISION = re.compile(r"^\s*\.\.\.\s*$", re.M)


@dataclass
class Excerpt:
    doc: Path
    line: int
    text: str
    files: tuple[Path, ...]  # the source files it is attributed to (empty: not an excerpt)
    block: bool  # a fenced block (else an inline span)
    info: str = ""  # a fenced block's info string


def _normalized(text: str) -> str:
    return " ".join(text.split())


#: What counts as a source file: Python, and the C and CUDA of xpnet/_native.
_SOURCE_SUFFIXES = (".py", ".c", ".h", ".cu")


def _source_files(targets, root: Path) -> tuple[Path, ...]:
    """The source files of the repository at ``root`` among (target, base folder) pairs, each once."""
    files = []
    for target, base in targets:
        path = (base / target.split("#")[0]).resolve()
        if path.suffix in _SOURCE_SUFFIXES and root in path.parents and path not in files:
            files.append(path)
    return tuple(files)


def excerpts(doc: Path, text: str | None = None, root: Path = ROOT) -> list[Excerpt]:
    """Every inline code span and fenced block of ``doc``, with the source files it is attributed to."""
    lines = (doc.read_text(encoding="utf-8") if text is None else text).splitlines()
    found: list[Excerpt] = []
    block: list[tuple[int, str]] = []

    def flush():
        if not block:
            return
        joined = "\n".join(line for _, line in block)
        table = all(line.lstrip().startswith("|") for _, line in block)
        prose = _SPAN.sub(" ", joined)  # a link written inside a code span is not a link
        files = _source_files([(target, doc.parent) for target in _LINK.findall(prose)], root)
        for match in _SPAN.finditer(joined):
            content = match.group(2).replace("\n", " ")
            if table:
                content = content.replace("\\|", "|")
            if content.startswith(" ") and content.endswith(" ") and content.strip():
                content = content[1:-1]
            line = block[0][0] + joined[: match.start()].count("\n")
            found.append(Excerpt(doc, line, content, files, block=False))
        block.clear()

    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence:
            flush()
            marker, info, start, body = fence.group(1), fence.group(2), i + 1, []
            i += 1
            while i < len(lines) and not (lines[i].strip().startswith(marker) and set(lines[i].strip()) == {marker[0]}):
                body.append(lines[i])
                i += 1
            files = _source_files([(word, root) for word in info.split()[1:]], root)
            found.append(Excerpt(doc, start, "\n".join(body), files, block=True, info=info))
        elif lines[i].strip():
            block.append((i + 1, lines[i]))
        else:
            flush()
        i += 1
    flush()
    return found


def _without_comments(path: Path) -> str:
    """The file's text with its Python comments cut out (by the tokenizer: strings keep their #);
    a C or CUDA file without its /* */ comments."""
    if path.suffix != ".py":
        return re.sub(r"/\*.*?\*/", " ", path.read_text(encoding="utf-8"), flags=re.S)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    with path.open(encoding="utf-8") as handle:
        comments = [t.start for t in tokenize.generate_tokens(handle.readline) if t.type == tokenize.COMMENT]
    for row, col in reversed(comments):
        lines[row - 1] = lines[row - 1][:col] + "\n"
    return "".join(lines)


def _strip_comment(line: str) -> str:
    """One line of an excerpt without a trailing # comment (a # inside quotes stays)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#":
            return line[:i]
    return line


def _occurs(excerpt: str, source: str) -> bool:
    """Whether ``excerpt`` is in ``source`` (both whitespace normalized), not inside a longer name."""
    wanted = _normalized(excerpt)
    start = r"(?<![\w.])" if re.match(r"\w", wanted) else ""
    end = r"(?!\w)" if re.search(r"\w$", wanted) else ""
    return re.search(start + re.escape(wanted) + end, source) is not None


def _parts_in_order(parts: list[str], source: str) -> bool:
    position = 0
    for part in parts:
        match = re.search(re.escape(_normalized(part)), source[position:])
        if match is None:
            return False
        position += match.end()
    return True


def problems(found: list[Excerpt], root: Path = ROOT) -> list[str]:
    """What is wrong with the excerpts: one line each, naming the doc's line and the file."""
    spans: dict[Path, str] = {}
    code: dict[Path, str] = {}
    wrong = []

    def text_of(path: Path) -> str:  # for inline spans: the file as it is
        if path not in spans:
            spans[path] = _normalized(path.read_text(encoding="utf-8"))
        return spans[path]

    def code_of(path: Path) -> str:  # for fenced blocks: without comments
        if path not in code:
            code[path] = _normalized(_without_comments(path))
        return code[path]

    for ex in found:
        where = f"{ex.doc.relative_to(root)}:{ex.line}"
        missing = [path for path in ex.files if not path.is_file()]
        if missing:
            wrong.append(f"{where}: links {', '.join(str(p.relative_to(root)) for p in missing)}, which does not exist")
            continue
        names = ", ".join(str(p.relative_to(root)) for p in ex.files)
        if not ex.files:
            if not ex.block and _READS_LIKE_CODE.search(ex.text):
                wrong.append(
                    f"{where}: `{ex.text}` reads like library code but its paragraph links no source file "
                    "(link the file it is quoted from, or write it as math)"
                )
            continue
        if ex.block:
            body = "\n".join(_strip_comment(line) for line in ex.text.splitlines())
            parts = [part for part in _ELISION.split(body) if part.strip()]
            if not parts or not any(_parts_in_order(parts, code_of(path)) for path in ex.files):
                wrong.append(f"{where}: the fenced block is not in {names}:\n{ex.text}")
        elif _NAME.fullmatch(ex.text):
            words = ex.text.removesuffix("()").split(".")
            if len(words) > 1 and words[0] in {path.stem for path in ex.files}:
                words = words[1:]
            text = " ".join(text_of(path) for path in ex.files)
            absent = [w for w in words if not re.search(rf"(?<!\w){re.escape(w)}(?!\w)", text)]
            if absent:
                wrong.append(f"{where}: the name `{ex.text}` is not in {names} (no {', '.join(absent)})")
        elif not any(_occurs(ex.text, text_of(path)) for path in ex.files):
            wrong.append(f"{where}: `{ex.text}` is not in {names}")
    return wrong


def test_math_md_excerpts_occur_in_the_source():
    found = excerpts(MATH)
    checked = [ex for ex in found if ex.files]
    # the parser must keep finding them: a convention it no longer reads would check nothing
    assert len([ex for ex in checked if ex.block]) >= 6 and len(checked) >= 100, len(checked)
    wrong = problems(found)
    assert not wrong, "docs/math.md quotes code that is not in the source:\n" + "\n".join(wrong)


#: The top-level entries of the repository that README.md names paths under.
_TOP = ("xpnet/", "bench/", "docs/", "cli/", "tests/", ".ci/")


def test_readme_excerpts_occur_in_the_source_and_its_paths_exist():
    readme = ROOT / "README.md"
    wrong = problems(excerpts(readme))
    text = readme.read_text(encoding="utf-8")
    words = [w for span in _SPAN.finditer(text) for w in span.group(2).split()] + _LINK.findall(text)
    paths = sorted({w.rstrip(".,;:)") for w in words if w.startswith(_TOP)})
    assert len(paths) >= 5, paths  # it names them: .ci/run, docs/math.md, bench/NOTES.md, ...
    wrong += [f"README.md names {path}, which does not exist" for path in paths if not (ROOT / path).exists()]
    assert not wrong, "README.md says what the code does not:\n" + "\n".join(wrong)


def _session(found) -> Excerpt:
    """§8's session: the one unattributed Python block that imports xpnet."""
    (block,) = [ex for ex in found if ex.block and not ex.files and "from xpnet import" in ex.text]
    return block


def _within_rounding(value: float, written: str) -> bool:
    decimals = len(written.partition(".")[2])
    return abs(value - float(written)) <= 0.5 * 10.0**-decimals + 1e-12


def _claims(session: str) -> list[tuple[str, str, list[str]]]:
    """(kind, code, numbers) for each line of the session with numbers in its comment:
    ``a, b = ...  # 1.0, [[2.0]]`` (one number per name assigned) and ``print(d)  # k 1.0, k 2.0``."""
    claims = []
    for line in session.splitlines():
        code, _, comment = line.partition("  # ")
        if not re.search(r"\d", comment):
            continue
        if code.startswith("print(") and code.endswith(")"):
            claims.append(("print", code[len("print(") : -1], re.findall(r"(\d+\.\w+) (-?\d+\.\d+)", comment)))
        elif "=" in code:
            claims.append(("assign", code.partition("=")[0], re.findall(r"-?\d+\.\d+", comment)))
    return claims


def _check_session(session: str) -> list[str]:
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(session, str(MATH), "exec"), namespace)
    wrong = []
    for kind, code, numbers in _claims(session):
        if kind == "assign":
            names = [name.strip() for name in code.split(",")]
            if len(names) != len(numbers):
                wrong.append(f"{code}: {len(names)} names but {len(numbers)} numbers in the comment")
            pairs = [(name, np.asarray(namespace[name]), n) for name, n in zip(names, numbers)]
        else:
            values = eval(code, namespace)  # the dict printed (nothing after the print changes it)
            if {key for key, _ in numbers} != set(values):
                wrong.append(f"{code}: the comment names {[k for k, _ in numbers]}, the dict has {sorted(values)}")
            pairs = [(key, np.asarray(values[key]), n) for key, n in numbers if key in values]
        for name, value, written in pairs:
            actual = float(value.reshape(-1)[0])
            if not _within_rounding(actual, written):
                wrong.append(f"{code.strip()}: {name} is {actual:.6g}, the comment says {written}")
    return wrong


@pytest.mark.float64
def test_the_session_in_math_md_computes_the_numbers_it_shows():
    session = _session(excerpts(MATH)).text
    claims = _claims(session)
    assert {kind for kind, _, _ in claims} == {"assign", "print"} and sum(len(n) for _, _, n in claims) >= 10
    wrong = _check_session(session)
    assert not wrong, "docs/math.md §8 shows numbers its code does not compute:\n" + "\n".join(wrong)


# ------------------------------------------------------------ the checker itself
#: The checker's own tests read a repository of their own (so they do not change with xpnet's code).
_SOURCE = """\
def softmax(xp, z):
    e = xp.exp(z - xp.max(z, axis=-1, keepdims=True))  # shifted
    return e / xp.sum(e, axis=-1, keepdims=True)


def class_mask(xp, labels, num_classes: int, device):
    classes = xp.arange(num_classes, dtype=labels.dtype, device=device)
    return xp.reshape(labels, (-1, 1)) == classes
"""

_SAMPLE = """\
Text ([functional.py](../xpnet/functional.py)): `e = xp.exp(z - xp.max(z, axis=-1, keepdims=True))`,
a name `functional.softmax`, `class_mask` and math in text: softmax(z)ᵢ.

Unattributed user code: `Sequential([Dense(2, 1)])`, and `[a link](../xpnet/layers.py)` in a span.

```python xpnet/functional.py
classes = xp.arange(num_classes, dtype=labels.dtype, device=device)  # a comment of the doc's own
return xp.reshape(labels, (-1, 1)) == classes
```
"""


@pytest.fixture
def sample_root(tmp_path) -> Path:
    (tmp_path / "xpnet").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "xpnet" / "functional.py").write_text(_SOURCE)
    (tmp_path / "xpnet" / "layers.py").write_text("def relu(xp, z):\n    return xp.maximum(z, 0.0)\n")
    return tmp_path.resolve()


def _sample_problems(root, text):
    return problems(excerpts(root / "docs" / "sample.md", text, root), root)


def test_the_checker_reads_the_convention(sample_root):
    found = excerpts(sample_root / "docs" / "sample.md", _SAMPLE, sample_root)
    assert [(ex.text, ex.block, [p.name for p in ex.files]) for ex in found] == [
        ("e = xp.exp(z - xp.max(z, axis=-1, keepdims=True))", False, ["functional.py"]),
        ("functional.softmax", False, ["functional.py"]),
        ("class_mask", False, ["functional.py"]),
        ("Sequential([Dense(2, 1)])", False, []),
        ("[a link](../xpnet/layers.py)", False, []),
        (
            "classes = xp.arange(num_classes, dtype=labels.dtype, device=device)  # a comment of the doc's own\n"
            "return xp.reshape(labels, (-1, 1)) == classes",
            True,
            ["functional.py"],
        ),
    ]
    assert _sample_problems(sample_root, _SAMPLE) == []


@pytest.mark.parametrize(
    "old, new, complaint",
    [
        ("axis=-1, keepdims=True))`", "axis=0, keepdims=True))`", "is not in xpnet/functional.py"),
        ("`functional.softmax`", "`functional.softmax_v2`", "no softmax_v2"),
        ("`class_mask`", "`class_mask(xp)`", "`class_mask(xp)` is not in"),
        ("== classes\n", "!= classes\n", "the fenced block is not in"),
        ("(labels, (-1, 1))", "(labels,\n   (-1,   1))", None),  # whitespace is no difference
        ("device=device)  #", "device=device)\n...\n#", None),  # an elision
        ("return xp.reshape", "...\nreturn xp.nothing\n...\nreturn xp.reshape", "the fenced block"),
        ("```python xpnet/functional.py", "```python xpnet/layers.py", "the fenced block is not in xpnet/layers"),
        ("(../xpnet/functional.py)", "(../xpnet/functions.py)", "which does not exist"),
        ("user code: `Sequential(", "user code: `self.layers(", "reads like library code"),
        ("user code: `Sequential(", "user code: `F.softmax(", "reads like library code"),
        ("`e = xp.exp(z -", "`e = xp.exp(xz -", "is not in"),  # not inside a longer name
    ],
)
def test_an_edited_excerpt_is_reported(sample_root, old, new, complaint):
    assert old in _SAMPLE
    wrong = _sample_problems(sample_root, _SAMPLE.replace(old, new, 1))
    if complaint is None:
        assert wrong == []
    else:
        assert wrong and all(complaint in line for line in wrong), wrong


def test_a_wrong_number_in_the_session_is_reported():
    session = _session(excerpts(MATH)).text
    assert "0.W -0.14836" in session and "0.22042" in session
    (complaint,) = _check_session(session.replace("0.W -0.14836", "0.W -0.14863"))
    assert complaint.startswith("model.named_gradients(): 0.W is -0.14836") and "says -0.14863" in complaint
    assert len(_check_session(session.replace("0.22042", "0.2205"))) == 1
