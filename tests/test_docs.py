"""The documentation against the code, in-process: README.md and docs/*.md.

- every relative link resolves: the file (or folder), and the `#anchor` where one is given, by
  GitHub's rules for heading anchors;
- every `mpidl …` command line in a fenced shell block parses with the real argument parser
  (`mpidl.cli.build_parser()`, split at `--` as `mpidl.cli.main` does; `scale` and `scale
  predict` with their own parsers, as `mpidl scale` does);
- every ```yaml block validates with its schema: a job spec (`mpidl.spec.load_spec`), a study
  (`mpidl.scaling.study`), a sweep (`mpidl.sweep.plan`) or the resources file of `mpidl submit --
  CMD`; a block whose first line is `# fragment` is a piece of one and is skipped;
- every ```python block compiles;
- docs/jobspec.md is what scripts/jobspec_doc.py makes of the schema today;
- the README starts with `make demo` and `make test`; docs/your-code.md's diff is the examples'
  diff; docs/architecture.md's layout names every module.
"""
from __future__ import annotations

import importlib.util
import re
import shlex
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"", "bash", "sh", "shell", "console"}
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")


@dataclass
class Block:
    page: Path
    line: int  # of the first line inside the fence
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a page."""
    out, open_fence, lang, start, body, indent = [], None, "", 0, [], ""
    for n, line in enumerate(page.read_text().splitlines(), 1):
        m = FENCE.match(line)
        if open_fence is None:
            if m:
                open_fence, lang, start, body = m.group(2), m.group(3).lower(), n + 1, []
                indent = m.group(1)  # a block inside a list item: its lines lose the fence's indent
        elif m and m.group(2).startswith(open_fence) and not m.group(3):
            out.append(Block(page, start, lang, "\n".join(body)))
            open_fence = None
        else:
            body.append(line[len(indent):] if line.startswith(indent) else line)
    assert open_fence is None, f"{page.name}: a code block opened at line {start - 1} is never closed"
    return out


def prose(page: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside code blocks, inline code removed."""
    out, inside = [], None
    for n, line in enumerate(page.read_text().splitlines(), 1):
        m = FENCE.match(line)
        if inside is None and m:
            inside = m.group(2)
            continue
        if inside is not None:
            if m and m.group(2).startswith(inside) and not m.group(3):
                inside = None
            continue
        out.append((n, re.sub(r"(`+)(?:(?!\1).)+\1", "", line)))
    return out


# ---------------------------------------------------------------- links and anchors
def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text (markup dropped) lower-cased, every character that is
    not a letter, digit, space, hyphen or underscore removed, each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").strip().lower()
    keep = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return keep.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor a page has: its headings' (a repeated one gets -1, -2, …) and HTML ids."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose_with_code(page):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
        found.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", line))
    return found


def prose_with_code(page: Path) -> list[tuple[int, str]]:
    """Lines outside code blocks, inline code kept (a heading's `code` is part of its anchor)."""
    keep = {n for n, _ in prose(page)}
    return [(n, line) for n, line in enumerate(page.read_text().splitlines(), 1) if n in keep]


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|^\s*\[[^\]]+\]:\s*(\S+)")


def links() -> list[tuple[str, Path, str]]:
    out = []
    for page in PAGES:
        for n, line in prose(page):
            for m in LINK.finditer(line):
                target = m.group(1) or m.group(2)
                if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                    out.append((f"{page.relative_to(ROOT)}:{n}", page, target))
    return out


LINKS = links()


@pytest.mark.parametrize("where,page,target", LINKS, ids=[f"{w} {t}" for w, _, t in LINKS])
def test_relative_link_resolves(where, page, target):
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    assert dest.exists(), f"{where}: {target}: no such file"
    assert ROOT in dest.parents or dest == ROOT, f"{where}: {target}: outside the repository"
    if anchor:
        assert dest.suffix == ".md", f"{where}: {target}: an anchor into a file that is not Markdown"
        assert anchor in anchors(dest), f"{where}: {target}: {dest.name} has no heading with the anchor #{anchor}"


def test_pages_have_links_checked():
    assert len(PAGES) > 5 and len(LINKS) > 50  # the pages are there, and the collector finds their links


# ---------------------------------------------------------------- mpidl command lines
def command_lines() -> list[tuple[str, list[str]]]:
    """(where, argv after `mpidl`) of every mpidl command in the shell blocks."""
    out = []
    for page in PAGES:
        for b in blocks(page):
            if b.lang not in SHELL:
                continue
            lines, joined, first = b.text.splitlines(), "", None
            for i, line in enumerate(lines):
                first = b.line + i if first is None else first
                if line.rstrip().endswith("\\"):
                    joined += line.rstrip()[:-1] + " "
                    continue
                text, joined = joined + line, ""
                text = re.sub(r"^\s*\$\s+", "", text)
                parts = [text, *re.findall(r"\$\(([^()]*)\)", text)]  # commands inside $(...) too
                for part in parts:
                    for argv in _mpidl_calls(part, f"{b.where.rsplit(':', 1)[0]}:{first}"):
                        out.append((f"{b.where.rsplit(':', 1)[0]}:{first}", argv))
                first = None
    return out


def _mpidl_calls(text: str, where: str) -> list[list[str]]:
    try:
        words = shlex.split(text, comments=True)
    except ValueError as e:
        raise AssertionError(f"{where}: cannot split the shell line {text!r}: {e}") from None
    calls, segment = [], []
    for w in [*words, "&&"]:
        if w in ("&&", "||", "|", ";"):
            for i, word in enumerate(segment):
                if word == "mpidl" or word.endswith("bin/mpidl"):  # mpidl, .venv/bin/mpidl (not cd ~/mpidl)
                    calls.append(_no_redirections(segment[i + 1:]))
                    break
            segment = []
        else:
            segment.append(w)
    return calls


def _no_redirections(words: list[str]) -> list[str]:
    out, skip = [], False
    for w in words:
        if skip:
            skip = False
        elif re.fullmatch(r"\d?>>?|<|&>", w):
            skip = True
        elif not re.match(r"^\d?>>?\S|^<\S|^&>\S", w):
            out.append(w)
    return out


COMMANDS = command_lines()


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[f"{w} {' '.join(a[:2])}" for w, a in COMMANDS])
def test_mpidl_command_parses(where, argv):
    from mpidl.cli import build_parser

    program = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    try:
        args = build_parser().parse_args(argv)
        if args.command == "scale":
            from mpidl.scaling import cli as scaling

            (scaling._predict_parser() if args.study == "predict" else scaling._run_parser()).parse_args(args.rest)
    except SystemExit as e:
        raise AssertionError(f"{where}: mpidl {' '.join(argv)}: the parser refuses it (exit {e.code})") from None
    if program:
        assert hasattr(args, "program"), \
            f"{where}: mpidl {args.command} takes no command after --"


def test_commands_found():
    shown = {argv[0] for _, argv in COMMANDS if argv}
    assert {"train", "submit", "data", "scale", "report"} <= shown, shown


# ---------------------------------------------------------------- YAML: job specs, studies, sweeps
def yaml_blocks() -> list[Block]:
    return [b for page in PAGES for b in blocks(page) if b.lang in ("yaml", "yml")]


YAML = yaml_blocks()


def kind_of(tree: dict) -> str:
    if {"grid", "random", "metric"} & set(tree):
        return "sweep"
    if "sizes" in tree or tree.get("mode") in ("weak", "strong") or "command" in tree:
        return "study"
    if set(tree) <= {"name", "output", "slurm"}:
        return "resources"
    return "job"


@pytest.mark.parametrize("block", YAML, ids=[b.where for b in YAML])
def test_yaml_block_validates(block, tmp_path, monkeypatch):
    from mpidl.errors import BadInput

    if block.text.lstrip().startswith("# fragment"):
        return
    tree = yaml.safe_load(block.text)
    assert isinstance(tree, dict), f"{block.where}: a YAML block that is not a mapping (mark it # fragment)"
    kind = kind_of(tree)
    monkeypatch.chdir(ROOT)  # paths in specs and studies are relative to where mpidl runs
    path = tmp_path / "shown.yaml"
    path.write_text(block.text)
    try:
        if kind == "job":
            from mpidl.spec import load_spec

            load_spec(path)
        elif kind == "resources":
            from mpidl.spec import load_command_spec

            load_command_spec(path)
        elif kind == "study":
            from mpidl.scaling.study import StudySpec, load_study
            from mpidl.spec import _one_line

            if tree.get("job") and (ROOT / tree["job"]).exists():
                load_study(path)  # the study, and its job spec with the study's --set items
            else:
                try:
                    StudySpec.model_validate(tree)
                except Exception as e:  # a pydantic ValidationError: say it as mpidl would
                    raise BadInput(_one_line(e, block.where, tree, StudySpec)) from None
        else:
            from mpidl.spec import _one_line
            from mpidl.sweep.plan import SweepSpec, check_field

            try:
                sweep = SweepSpec.model_validate(tree)
            except Exception as e:
                raise BadInput(_one_line(e, block.where, tree, SweepSpec)) from None
            fields = [*sweep.set, *sweep.grid, *(sweep.random.fields if sweep.random else {})]
            for dotted in fields:
                check_field(dotted, block.where)
    except BadInput as e:
        raise AssertionError(f"this {kind} does not validate: {str(e).replace(str(path), block.where)}") from None


def test_yaml_blocks_found():
    kinds = {kind_of(yaml.safe_load(b.text)) for b in YAML if not b.text.lstrip().startswith("# fragment")}
    assert {"job", "study", "sweep", "resources"} <= kinds, kinds


PYTHON = [b for page in PAGES for b in blocks(page) if b.lang in ("python", "py")]


@pytest.mark.parametrize("block", PYTHON, ids=[b.where for b in PYTHON])
def test_python_block_compiles(block):
    try:
        compile(block.text, block.where, "exec")
    except SyntaxError as e:
        raise AssertionError(f"{block.where}: line {e.lineno}: {e.msg}") from None


# ---------------------------------------------------------------- the generated reference
def _generator():
    spec = importlib.util.spec_from_file_location("jobspec_doc", ROOT / "scripts" / "jobspec_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_jobspec_page_is_the_schema():
    gen = _generator()
    assert (ROOT / "docs" / "jobspec.md").read_text() == gen.render(), \
        "docs/jobspec.md differs from mpidl.spec.JobSpec: run .venv/bin/python scripts/jobspec_doc.py"


def test_jobspec_page_names_every_key():
    from mpidl.spec import JobSpec

    page = (ROOT / "docs" / "jobspec.md").read_text()
    for path, model, _ in _generator().sections(JobSpec):
        for key in model.model_fields:
            assert f"| `{key}` |" in page.split(f"## `{path}`" if path else "## Top level", 1)[1], f"{path}.{key}"


def test_slug_follows_github():
    assert slug("From your PyTorch script to the cluster") == "from-your-pytorch-script-to-the-cluster"
    assert slug("`data.preprocess`") == "datapreprocess"
    assert slug("Sites without PMIx: `slurm.launcher: mpirun`") == "sites-without-pmix-slurmlauncher-mpirun"
    assert slug("What a Run does (and `mpidl train`)") == "what-a-run-does-and-mpidl-train"


def test_readme_starts_with_the_two_commands():
    """CI and newcomers rely on the first lines: `make demo` and `make test`, as the Makefile has them."""
    first = blocks(ROOT / "README.md")[0]
    assert first.line <= 4 and [line.split()[:2] for line in first.text.splitlines()] == \
        [["make", "demo"], ["make", "test"]]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo: setup$", makefile, re.M) and re.search(r"^test: setup$", makefile, re.M)


def test_the_loop_diff_shown_is_the_examples():
    """docs/your-code.md shows the diff of examples/plain_loop.py and examples/mpidl_loop.py (their
    code, below the docstrings): it must be that diff today."""
    import difflib

    def code(name: str) -> list[str]:
        lines = (ROOT / "examples" / name).read_text().splitlines()
        return lines[next(i for i, line in enumerate(lines) if line.startswith("import ")):]

    want = list(difflib.unified_diff(code("plain_loop.py"), code("mpidl_loop.py"), "examples/plain_loop.py",
                                     "examples/mpidl_loop.py", lineterm="", n=30))
    shown = [b for b in blocks(ROOT / "docs" / "your-code.md") if b.lang == "diff"]
    assert len(shown) == 1 and shown[0].text.splitlines() == want, \
        "docs/your-code.md's diff differs from examples/: paste the new one"
    changed = sum(1 for line in want if line.startswith("+") and not line.startswith("+++"))
    said = {9: "Nine"}.get(changed, str(changed))
    assert f"{said} lines differ" in (ROOT / "docs" / "your-code.md").read_text(), f"the page should say {changed}"


def test_architecture_layout_names_every_module():
    """docs/architecture.md's layout is complete: every module of mpidl/ is named there."""
    page = (ROOT / "docs" / "architecture.md").read_text()
    layout = page.split("## Layout", 1)[1].split("\n## ", 1)[0]
    missing = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "mpidl").rglob("*.py"))
               if p.name != "__init__.py" and p.name not in layout]
    assert not missing, f"docs/architecture.md's layout misses {missing}"
