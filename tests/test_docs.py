"""The Python examples of README.md and docs/*.md run as written, and their links resolve.

The convention: every ```python block runs. A file's blocks run in order in one
namespace, so a block may use the names of the blocks above it, with a fresh
temporary folder as the working directory. A block that cannot run here is marked
by an HTML comment, on the line right before its fence, that says why:

    <!-- not-run: needs several hosts joined by jax.distributed -->

Other blocks (```bash, ```text) are never run. The files run in two child processes
side by side, each with a JAX compilation cache of its own, so that a program that
several of its pages compile (the small detector's init, say) is compiled once, and
with XLA's backend optimisations off, which cuts the compile times of programs that
run once or twice by about 40%.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"<!-- not-run: (\S.*) -->")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def parse(page: Path) -> tuple[list[tuple[int, str, str, str]], list[str]]:
    """The page's fenced blocks, as (line of the opening fence, language, code, the line above it), and its prose."""
    lines, blocks, prose, i = page.read_text().splitlines(), [], [], 0
    while i < len(lines):
        if lines[i].lstrip().startswith("```"):
            start, language = i, lines[i].strip()[3:]
            i += 1
            while not lines[i].lstrip().startswith("```"):
                i += 1
            code = textwrap.dedent("\n".join(lines[start + 1 : i]))
            blocks.append((start + 1, language, code, lines[start - 1].strip() if start else ""))
        else:
            prose.append(lines[i])
        i += 1
    return blocks, prose


def run_page(path: Path) -> str | None:
    """Run the page's runnable Python blocks; None, or the failure: the page, the block's line, the traceback."""
    namespace: dict = {"__name__": "__docs__"}
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            for line, language, code, above in parse(path)[0]:
                if language == "python" and not NOT_RUN.fullmatch(above):
                    try:
                        exec(compile(code, f"{path.name}:{line}", "exec"), namespace)
                    except BaseException:
                        return f"{path.relative_to(ROOT)}, the python block at line {line}:\n{traceback.format_exc()}"
        finally:
            os.chdir(cwd)
    return None


@pytest.fixture(scope="module")
def failures(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("docs")
    # Each program runs once or twice here: compile it fast rather than well.
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
    children = []
    for k, pages in enumerate((PAGES[::2], PAGES[1::2])):  # two children, one per core
        env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp / f"jax_cache_{k}"), "XLA_FLAGS": flags}
        command = [sys.executable, __file__, str(tmp / f"failures_{k}.json"), *map(str, pages)]
        children.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    found = {}
    try:
        for k, child in enumerate(children):
            output = child.communicate(timeout=900)[0]
            assert child.returncode == 0, output[-5000:]
            found |= json.loads((tmp / f"failures_{k}.json").read_text())
    finally:
        for child in children:
            child.kill()
    return found


@pytest.mark.parametrize("page", [str(p.relative_to(ROOT)) for p in PAGES])
def test_python_blocks_run(failures, page):
    assert failures[page] is None, failures[page]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_markers_and_links(page):
    blocks, prose = parse(page)
    for line, language, _, above in blocks:
        if above.startswith("<!-- not-run"):
            assert language == "python" and NOT_RUN.fullmatch(above), f"{page.name}:{line}: a marker without a reason"
    for target in LINK.findall("\n".join(prose)):
        if not re.match(r"[a-z]+:", target):  # not https: or mailto:
            file, _, anchor = target.partition("#")
            linked = (page.parent / file).resolve() if file else page
            assert linked.is_file(), f"{page.name} links to {target}, which does not exist"
            if anchor and linked.suffix == ".md":
                titles = [ln.lstrip("#").strip() for ln in parse(linked)[1] if ln.startswith("#")]
                slugs = {re.sub(r"[^\w\- ]", "", t.lower()).replace(" ", "-") for t in titles}  # GitHub's anchors
                assert anchor in slugs, f"{page.name} links to {target}, a heading that does not exist"


if __name__ == "__main__":  # a child: python tests/test_docs.py FAILURES.json PAGE...
    out, *pages = sys.argv[1:]
    Path(out).write_text(json.dumps({str(Path(p).relative_to(ROOT)): run_page(Path(p)) for p in pages}))
