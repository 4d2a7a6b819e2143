"""bench/devsets.py's parsers and writer on small synthetic inputs (no network, no Debian packages)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("devsets", Path(__file__).parents[1] / "bench" / "devsets.py")
devsets = importlib.util.module_from_spec(_SPEC)
sys.modules["devsets"] = devsets  # dataclasses look their module up by name
_SPEC.loader.exec_module(devsets)

MODINDEX = """<html><body><div class="body" role="main"><table class="indextable modindextable">
<tr class="cap"><td></td><td><strong>j</strong></td><td></td></tr>
<tr><td></td><td><a href="library/json.html#module-json"><code class="xref">json</code></a></td><td>
  <em>Encode and decode the JSON format.</em></td></tr>
<tr class="cg-1"><td></td><td>&#160;<a href="library/json.html#module-json.tool">
  <code class="xref">json.tool</code></a></td>
  <td><em>A command line to validate and pretty-print JSON.</em></td></tr>
<tr><td></td><td><a href="library/abc.html#module-abc"><code class="xref">abc</code></a></td><td>
  <em>Abstract base classes according to :pep:`3119`.</em></td></tr>
<tr><td></td><td><a href="library/nosyn.html#module-nosyn"><code class="xref">nosyn</code></a></td><td>
  <em></em></td></tr>
</table></div></body></html>"""

PAGE = """<html><head><title>json — JSON encoder and decoder</title><script>var x = 1;</script></head><body>
<div class="related" role="navigation"><ul><li><a href="index.html">index</a></li>
<li>NAVIGATION</li></ul></div>
<div class="document"><div class="documentwrapper"><div class="bodywrapper"><div class="body" role="main">
<section id="module-json"><h1><a class="reference internal" href="#module-json"
 title="json: Encode and decode the JSON format."><code class="xref"><span class="pre">json</span></code></a>
 — JSON encoder and decoder<a class="headerlink" href="#module-json" title="Permalink">¶</a></h1>
<p><strong>Source code:</strong> <a href="x">Lib/json/__init__.py</a></p><hr class="docutils" />
<p>The json module lets you <em>encode and decode the JSON format</em>. It is
   small.</p>
<div class="highlight"><pre><span class="gp">&gt;&gt;&gt; </span>json.dumps([1,  2])
<span class="go">'[1, 2]'</span>
</pre></div>
<dl><dt class="sig" id="json.dumps">json.dumps(obj)<a class="headerlink" href="#json.dumps">¶</a></dt>
<dd><p>Serialize <em>obj</em>.</p></dd></dl>
<section id="module-json.tool"><h2>Command Line Interface<a class="headerlink" href="#x">¶</a></h2>
<p>A command line to validate and pretty-print JSON.</p></section>
</section></div></div></div>
<div class="sphinxsidebar" role="navigation"><p>SIDEBAR</p></div></div>
<div class="footer">FOOTER &copy; Copyright</div></body></html>"""


def _tree(tmp_path: Path, pages: dict[str, str]) -> Path:
    (tmp_path / "library").mkdir()
    (tmp_path / "py-modindex.html").write_text(MODINDEX, encoding="utf-8")
    for name, content in pages.items():
        (tmp_path / "library" / name).write_text(content, encoding="utf-8")
    return tmp_path


def test_long_pairs_take_the_title_module_synopsis_and_the_main_text_without_it(tmp_path):
    abc = PAGE.replace("json", "abc").replace("module-abc.tool", "x")
    nosyn = PAGE.replace("json", "nosyn")
    chapter = "<html><body><div role='main'><h1>Data formats</h1><p>chapter</p></div></body></html>"
    root = _tree(
        tmp_path, {"json.html": PAGE, "abc.html": abc, "nosyn.html": nosyn, "fileformats.html": chapter}
    )
    pairs, stats, read = devsets.long_pairs(root)

    assert [p.id for p in pairs] == ["abc", "json"]
    json_pair = pairs[1]
    assert json_pair.query == "Encode and decode the JSON format."
    assert pairs[0].query == "Abstract base classes according to PEP 3119."  # reST role rendered as text
    assert json_pair.title == "json — JSON encoder and decoder"
    text = json_pair.text
    # the synopsis is gone (case-insensitive, across the markup), the rest of the sentence stays
    assert "encode and decode the json format" not in text.lower()
    assert "The json module lets you" in text and "It is small." in text
    # navigation, sidebar, footer, scripts and permalink marks are not part of the document
    for junk in ("NAVIGATION", "SIDEBAR", "FOOTER", "var x", "¶", "index"):
        assert junk not in text
    # a code block keeps its line breaks and spacing; blocks are separated by blank lines
    assert ">>> json.dumps([1,  2])\n'[1, 2]'" in text
    assert "json.dumps(obj)\n\nSerialize obj." in text
    # the submodule on the same page is text of the one document, not a query of its own
    assert "Command Line Interface" in text
    assert stats["skipped: no synopsis"] == 1
    assert stats["skipped: no module in the module index"] == 1
    assert set(read) == {"py-modindex.html", "library/json.html", "library/abc.html", "library/nosyn.html"}


def test_long_pairs_drop_pages_that_share_a_synopsis(tmp_path):
    index = MODINDEX.replace(
        "Abstract base classes according to :pep:`3119`.", "Encode and decode the JSON format."
    )
    root = _tree(tmp_path, {"json.html": PAGE, "abc.html": PAGE.replace("json", "abc")})
    (root / "py-modindex.html").write_text(index, encoding="utf-8")
    pairs, stats, _ = devsets.long_pairs(root)
    assert pairs == []
    assert stats["skipped: synopsis shared with another page"] == 2


DESCRIPTION = "a tool that frobnicates widgets quickly, with many options for the careful operator to tune"

TRANSLATION = f"""Package: frob
Description-md5: 0001
Description-en: widget frobnicator for the command line
 Frob is {DESCRIPTION}.
 .
 It reads:
  - plain files
  - standard input

Package: frob-doc
Description-md5: 0002
Description-en: documentation for the widget frobnicator
 This package contains the documentation files for frob, a widget frobnicator with many, many options
 that a careful operator may want to read about before tuning it.

Package: libalpha-dev
Description-md5: 0003
Description-en: alpha library - development files
 Alpha is a library that computes alphas and betas for all kinds of shared widget-shaped data structures.
 .
 This package provides the development headers.

Package: libalpha1
Description-md5: 0004
Description-en: alpha library - runtime
 Alpha is a library that computes alphas and betas for all kinds of shared widget-shaped data structures.
 .
 This package provides the runtime.

Package: tiny
Description-md5: 0005
Description-en: a tiny thing
 Too short to judge.

Package: zapper
Description-md5: 0006
Description-en: zapper removes stale caches
 It walks the cache directories of every user and removes what nothing has read for thirty days, safely
 and quietly, and it reports what it freed.
"""


def test_short_pairs_keep_unique_descriptions_and_drop_templates_and_families():
    pairs, stats = devsets.short_pairs(TRANSLATION)
    assert [p.id for p in pairs] == ["frob"]
    frob = pairs[0]
    assert frob.query == "widget frobnicator for the command line"
    assert frob.text == f"Frob is {DESCRIPTION}.\n\nIt reads:\n- plain files\n- standard input"
    assert stats["skipped: packaging template"] == 1  # frob-doc
    assert stats["skipped: a paragraph shared with another package"] == 2  # the libalpha family
    assert stats["skipped: under 20 words"] == 1
    assert stats["skipped: synopsis names the package"] == 1  # "zapper removes ..."
    assert stats["descriptions"] == 6


def test_written_sets_are_byte_identical_and_the_sample_is_stable(tmp_path):
    pairs = [devsets.Pair(id=f"d{i}", query=f"query {i}", title="", text=f"text {i} é") for i in range(50)]
    first = devsets.write_beir(tmp_path / "a", devsets.sample(pairs, 10), {"name": "t"})
    second = devsets.write_beir(tmp_path / "b", devsets.sample(list(reversed(pairs)), 10), {"name": "t"})
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert first == second and first["counts"]["documents"] == 10
    corpus = [json.loads(line) for line in (tmp_path / "a" / "corpus.jsonl").read_text().splitlines()]
    assert list(corpus[0]) == ["_id", "title", "text"]
    qrels = (tmp_path / "a" / "qrels" / "test.tsv").read_text().splitlines()
    assert qrels[0] == "query-id\tcorpus-id\tscore" and len(qrels) == 11
    assert {p.id for p in devsets.sample(pairs, 5)} <= {p.id for p in devsets.sample(pairs, 10)}


@pytest.mark.parametrize(
    ("phrase", "text", "expected"),
    [
        ("Read ZIP files.", "We read zip\nfiles. Then more.", "We  Then more."),
        ("Read ZIP files.", "Nothing here.", "Nothing here."),
    ],
)
def test_remove_phrase_is_case_and_whitespace_insensitive(phrase, text, expected):
    assert devsets.remove_phrase(text, phrase)[0] == expected
