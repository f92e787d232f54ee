"""The built site as a reader sees it.

The site is built once with ``mkdocs build --strict``; the checks read the rendered HTML
of every page: API pages must show docstrings as Google-style sections (no raw Sphinx
roles, one argument per row, Returns parsed as one item, doctest examples as code, no
raw HTML from ``<s>``-like token names), and no page, README, docstring or config comment
may speak of how the project was developed instead of what it does.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings_handlers.python")

ROOT = Path(__file__).resolve().parents[1]

# Tags that the Markdown and mkdocstrings templates produce inside a page's <article>.
# Anything else (``<s>``, ``<image>``, ``<soi>``) is a token name that leaked as HTML.
HTML_TAGS = {
    "a", "abbr", "article", "b", "blockquote", "br", "caption", "code", "col", "colgroup",
    "dd", "details", "div", "dl", "dt", "em", "figcaption", "figure", "h1", "h2", "h3",
    "h4", "h5", "h6", "hr", "i", "img", "kbd", "li", "ol", "p", "path", "pre", "small",
    "span", "strong", "sub", "summary", "sup", "svg", "table", "tbody", "td", "th",
    "thead", "tr", "ul",
}
VOID = {"br", "col", "hr", "img", "input", "link", "meta", "path", "source", "wbr"}
ROLE = re.compile(r"\b(class|meth|func|attr|mod|data|obj|exc|py:\w+):`?<code>")
IDENTIFIER = re.compile(r"[A-Za-z_]\w*")

# Development-process wording that has no place in user-facing text (case-insensitive
# unless the pattern says otherwise).
INTERNAL = [
    r"issue #?\d+",
    r"\b(same|second|first|earlier|later|previous|next|another) session\b",
    r"\blent to\b",
    r"replace this paragraph",
    r"\bwhoever runs\b",
    r"(?-i:\bPlaceholder\b)",
    r"\bengineer",
    r"design notes",
    r"DESIGN\.md",
    r"OFFICIAL_DIFF",
    r"\.\./shared",
]
INTERNAL_RE = re.compile("|".join("(?:" + p.replace(" ", r"\s+") + ")" for p in INTERNAL),
                         flags=re.I)


class Node:
    def __init__(self, tag: str, attrs: dict[str, str | None], parent: Node | None):
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Node | str] = []

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self):
        yield self
        for c in self.children:
            if isinstance(c, Node):
                yield from c.iter()

    def classes(self) -> list[str]:
        return (self.attrs.get("class") or "").split()


class TreeBuilder(HTMLParser):
    """A forgiving DOM: unknown tags nest like any other, end tags close the nearest match."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = self.cur = Node("#root", {}, None)
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        node = Node(tag, dict(attrs), self.cur)
        self.cur.children.append(node)
        if tag not in VOID:
            self.cur = node

    def handle_endtag(self, tag):
        node = self.cur
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.cur = node.parent

    def handle_data(self, data):
        self.cur.children.append(data)


def article(html: str) -> str:
    start, end = html.find("<article"), html.rfind("</article>")
    assert start >= 0 and end > start
    return html[start:end + len("</article>")]


def parse(html: str) -> TreeBuilder:
    builder = TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict[str, str]:
    """{page path: article HTML} of a strict build into a temporary directory."""
    out = tmp_path_factory.mktemp("site")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                          str(out)], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    pages = {str(p.relative_to(out)): article(p.read_text())
             for p in sorted(out.rglob("index.html")) if p.parent.name != "404"}
    assert "api/synchronizer/index.html" in pages and "index.html" in pages
    return pages


def api(site: dict[str, str]) -> dict[str, str]:
    pages = {k: v for k, v in site.items() if k.startswith("api/")}
    assert len(pages) >= 9
    return pages


def section_tables(tree: Node) -> list[tuple[str, Node]]:
    """(section title, table) of every docstring section rendered as a table."""
    out, title = [], None
    for node in tree.iter():
        if "doc-section-title" in node.classes():
            title = node.text().strip().rstrip(":")
        elif node.tag == "table" and title is not None:
            out.append((title, node))
            title = None
    return out


def rows(table: Node) -> tuple[list[str], list[list[str]]]:
    header = [th.text().strip() for th in table.iter() if th.tag == "th"]
    body = [[td.text().strip() for td in tr.children if isinstance(td, Node) and td.tag == "td"]
            for tr in table.iter() if "doc-section-item" in tr.classes()]
    return header, body


# -- defect finders (each returns human-readable findings; the tests assert none) ---------


def raw_roles(pages: dict[str, str]) -> list[str]:
    return [f"{page}: {m.group(0)}" for page, html in pages.items()
            for m in ROLE.finditer(html)]


def combined_arguments(pages: dict[str, str]) -> list[str]:
    bad = []
    for page, html in pages.items():
        for title, table in section_tables(parse(html).root):
            if title in {"Parameters", "Other Parameters", "Attributes"}:
                _, body = rows(table)
                bad += [f"{page}: {title} row {r[0]!r}" for r in body if r and "," in r[0]]
    return bad


def misparsed_returns(pages: dict[str, str]) -> list[str]:
    """A Returns/Yields section is one item; a Name column holds an identifier."""
    bad = []
    for page, html in pages.items():
        for title, table in section_tables(parse(html).root):
            if title not in {"Returns", "Yields"}:
                continue
            header, body = rows(table)
            if len(body) != 1:
                bad.append(f"{page}: {title} with {len(body)} rows: {[r[-1][:40] for r in body]}")
            if header and header[0] == "Name":
                bad += [f"{page}: {title} name {r[0]!r}" for r in body
                        if not IDENTIFIER.fullmatch(r[0]) or r[0] in {"a", "an", "the"}]
    return bad


def raw_html(pages: dict[str, str]) -> list[str]:
    return [f"{page}: <{tag}>" for page, html in pages.items()
            for tag in sorted(set(parse(html).tags) - HTML_TAGS)]


def doctests_as_prose(pages: dict[str, str]) -> list[str]:
    """``>>>`` lines outside a code block turn into nested block quotes; singular
    ``Example:`` sections render as a collapsed admonition instead of code."""
    bad = []
    for page, html in pages.items():
        tree = parse(html).root
        for node in tree.iter():
            if node.tag == "blockquote" and node.parent is not None \
                    and node.parent.tag == "blockquote":
                bad.append(f"{page}: nested block quote {node.text().strip()[:50]!r}")
            if node.tag == "summary" and node.text().strip() == "Example":
                bad.append(f"{page}: 'Example' admonition (use an 'Examples:' section)")
    return bad


def docstrings() -> dict[str, str]:
    """{file:line: text} of every module, class and function docstring in mmlayers."""
    out = {}
    for path in sorted((ROOT / "mmlayers").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef
                          | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node, clean=False)
                if doc:
                    out[f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 1)}"] = doc
    return out


def internal_wording(texts: dict[str, str]) -> list[str]:
    return [f"{where}: {m.group(0)!r}" for where, text in texts.items()
            for m in INTERNAL_RE.finditer(text)]


def yaml_comments(path: Path) -> str:
    return "\n".join(line.split("#", 1)[1] for line in path.read_text().splitlines()
                     if "#" in line)


# -- tests ----------------------------------------------------------------------------


def test_no_raw_sphinx_roles(site):
    bad = raw_roles(api(site))
    assert not bad, "write [`Name`][mmlayers.path] or `Name` instead:\n" + "\n".join(bad)


def test_one_argument_per_row(site):
    bad = combined_arguments(api(site))
    assert not bad, "document each argument on its own line:\n" + "\n".join(bad)


def test_returns_parse_as_one_item(site):
    bad = misparsed_returns(api(site))
    assert not bad, "\n".join(bad)


def test_no_raw_html_from_docstrings(site):
    bad = raw_html(site)
    assert not bad, "wrap token names such as `<s>` in backticks:\n" + "\n".join(bad)


def test_examples_render_as_code(site):
    bad = doctests_as_prose(api(site))
    assert not bad, "\n".join(bad)
    assert any('class="language-pycon' in html or "&gt;&gt;&gt;" in html
               for html in api(site).values())


def test_signatures_are_formatted(site):
    # with ruff installed (docs extra), long signatures are split one argument per line
    html = api(site)["api/synchronizer/index.html"]
    sig = re.search(r'id="mmlayers\.layers\.synchronizer\.FeatureSynchronizer"(.*?)</code>',
                    html, flags=re.S)
    assert sig is not None
    code = re.sub(r"<[^>]+>", "", sig.group(1))
    assert code.count("\n") >= 5, code


def test_no_internal_wording_in_pages(site):
    texts = {page: re.sub(r"<[^>]+>", " ", html) for page, html in site.items()}
    bad = internal_wording(texts)
    assert not bad, "\n".join(bad)


def test_no_internal_wording_in_readme_docstrings_and_configs():
    texts = {"README.md": (ROOT / "README.md").read_text(), **docstrings()}
    texts.update({str(p.relative_to(ROOT)): yaml_comments(p)
                  for p in sorted((ROOT / "recipes" / "configs").glob("*.yaml"))})
    texts.update({str(p.relative_to(ROOT)): p.read_text()
                  for p in sorted((ROOT / "docs").rglob("*.md"))})
    bad = internal_wording(texts)
    assert not bad, "\n".join(bad)


def test_the_finders_find_defects():
    """Each finder flags a hand-made page with the defect it looks for."""
    def page(body: str) -> dict[str, str]:
        return {"p": f"<article>{body}</article>"}

    table = ('<p><span class="doc-section-title">{}:</span></p><table><thead><tr>{}</tr>'
             '</thead><tbody>{}</tbody></table>')
    row = '<tr class="doc-section-item">{}</tr>'
    assert raw_roles(page("see :class:<code>~mmlayers.Foo</code>"))
    assert raw_roles(page("<p>class:<code>Foo</code> to pass</p>"))
    assert not raw_roles(page("a dataclass:<code>x</code>"))
    assert combined_arguments(page(table.format(
        "Parameters", "<th>Name</th>", row.format("<td><code>a, b</code></td>"))))
    assert not combined_arguments(page(table.format(
        "Parameters", "<th>Name</th>", row.format("<td><code>a</code></td>"))))
    two = row.format("<td>x</td><td>first half</td>") + row.format("<td>x</td><td>rest</td>")
    assert misparsed_returns(page(table.format("Returns", "<th>Type</th>", two)))
    assert misparsed_returns(page(table.format(
        "Returns", "<th>Name</th><th>Type</th>", row.format("<td>a</td><td>T</td>"))))
    assert not misparsed_returns(page(table.format(
        "Returns", "<th>Type</th>", row.format("<td>T</td><td>the result</td>"))))
    assert raw_html(page("<p>ids <s> and <image> tokens</p>")) == ["p: <image>", "p: <s>"]
    assert not raw_html(page("<p>ids <code>&lt;s&gt;</code></p>"))
    assert doctests_as_prose(page("<blockquote><blockquote><p>import torch</p>"
                                  "</blockquote></blockquote>"))
    assert doctests_as_prose(page('<details class="example"><summary>Example</summary>'))
    assert internal_wording({"x": "the targets of Issue #12"})
    assert internal_wording({"x": "no GPU was lent to the task"})
    assert internal_wording({"x": "An earlier run in the same session gave"})
    assert internal_wording({"x": "listed in the design\n  notes"})
    assert not internal_wording({"x": "an InterleavedSession keeps the cache; the session"
                                      " appends a placeholder image"})


def long_code_lines(pages: dict[str, str], limit: int = 88) -> list[str]:
    """Lines of fenced code blocks longer than ``limit`` columns (they scroll sideways at
    1280 px); {name: markdown}."""
    bad = []
    for name, text in pages.items():
        for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M):
            bad += [f"{name}: {line[:60]}…" for line in block.splitlines() if len(line) > limit]
    return bad


def test_code_blocks_fit_the_page():
    # the Quickstart repeats the README's two one-line commands verbatim (a test keeps
    # them identical), so it is the one page left out
    pages = {str(p.relative_to(ROOT)): p.read_text()
             for p in sorted((ROOT / "docs").rglob("*.md")) if p.name != "quickstart.md"}
    assert len(pages) > 20
    bad = long_code_lines(pages)
    assert not bad, "wrap these lines (88 columns at most; `\\` in shell):\n" + "\n".join(bad)
    assert long_code_lines({"x": "```bash\n" + "a" * 89 + "\n```\n"})
    assert not long_code_lines({"x": "```bash\n" + "a" * 88 + "\n```\n" + "b" * 100})


def long_doctest_lines(texts: dict[str, str], limit: int = 88) -> list[str]:
    """Example lines (``>>>``, ``...`` and their output) longer than ``limit`` columns,
    counted from the ``>>>`` as the API reference shows them; {where: docstring}."""
    bad = []
    for where, doc in texts.items():
        start = None  # column of the current example's ">>>"
        for line in doc.splitlines():
            code = line.lstrip()
            if code.startswith(">>>"):
                start = len(line) - len(code)
            elif not code:
                start = None
            if start is not None and len(line[start:]) > limit:
                bad.append(f"{where}: {line[start:][:60]}…")
    return bad


def test_docstring_examples_fit_the_page():
    bad = long_doctest_lines(docstrings())
    assert not bad, "wrap these example lines (88 columns at most):\n" + "\n".join(bad)
    example = "Examples:\n    >>> f(1)\n    " + "x" * 89 + "\n\n" + "y" * 100
    assert long_doctest_lines({"x": example}) == [f"x: {'x' * 60}…"]
    assert not long_doctest_lines({"x": example.replace("x" * 89, "x" * 88)})


def undocumented_parameters(package) -> list[str]:
    """Callables whose docstring has an Args section that leaves out a parameter of the
    signature (a class's ``__init__`` parameters belong to the class docstring)."""
    bad, seen = [], set()

    def walk(obj):
        if obj.is_alias or id(obj) in seen:
            return
        seen.add(id(obj))
        fn = obj if obj.is_function else obj.members.get("__init__") if obj.is_class else None
        if fn is not None and not fn.is_alias and obj.docstring is not None:
            sections = obj.docstring.parse("google", warn_unknown_params=False,
                                           warn_missing_types=False)
            documented = {p.name for s in sections if s.kind.value == "parameters"
                          for p in s.value}
            if documented:
                skip = {"variadic positional", "variadic keyword"}
                missing = [p.name for p in fn.parameters if p.name not in ("self", "cls")
                           and p.kind.value not in skip and p.name not in documented]
                if missing:
                    bad.append(f"{obj.path}: {missing}")
        for name, member in obj.members.items():
            if not name.startswith("_") or name == "__call__":
                walk(member)

    walk(package)
    return bad


def test_every_parameter_has_a_row():
    griffe = pytest.importorskip("griffe")
    package = griffe.load("mmlayers", search_paths=[str(ROOT)], resolve_aliases=False)
    bad = undocumented_parameters(package)
    assert not bad, "document these arguments in the Args section:\n" + "\n".join(bad)
    fake = griffe.load("mmlayers", search_paths=[str(ROOT)], resolve_aliases=False)
    sync = fake["layers.synchronizer.FeatureSynchronizer"]
    sync.docstring = griffe.Docstring("Summary.\n\nArgs:\n    dim: width.\n", parent=sync)
    assert any("FeatureSynchronizer" in b and "points" in b
               for b in undocumented_parameters(fake))


def unlinked_images(pages: dict[str, str]) -> list[str]:
    """Images (plots, screenshots) that do not link to their own file (no full size)."""
    bad = []
    for page, html in pages.items():
        for node in parse(html).root.iter():
            if node.tag == "img":
                parent = node.parent
                src = node.attrs.get("src")
                if parent is None or parent.tag != "a" or parent.attrs.get("href") != src:
                    bad.append(f"{page}: {src}")
    return bad


def test_images_open_full_size(site):
    pages = {k: v for k, v in site.items() if "<img" in v}
    assert any(k.startswith("benchmarks") for k in pages)
    bad = unlinked_images(pages)
    assert not bad, "wrap as [![alt](path)](path):\n" + "\n".join(bad)
    assert unlinked_images({"p": '<article><p><img src="a.svg"></p></article>'})
    assert not unlinked_images({"p": '<article><a href="a.svg"><img src="a.svg"></a></article>'})
