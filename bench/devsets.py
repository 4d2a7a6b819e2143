"""Build longembed's two retrieval development sets from what Debian ships, in the BEIR layout.

    python bench/devsets.py long  [--out DIR] [--limit N]
    python bench/devsets.py short [--out DIR] [--limit N]

Each set is written to `DIR` (default `~/.cache/longembed/devsets/<name>[-<limit>]/`) as `corpus.jsonl`
(`_id`, `title`, `text`), `queries.jsonl` (`_id`, `text`), `qrels/test.tsv` (`query-id`, `corpus-id`,
`score`) and `manifest.json`: where every input came from (package, version, sha256 of the .deb or of the
index file and the signed InRelease that vouches for it, and the sha256 of every file read), the filters and
what each removed, and the sha256 of the three output files. Nothing of the sources is checked in: the
script fetches them with apt (no root, no install) into a temporary directory. Same inputs give the same
bytes (sorted ids, fixed JSON formatting, a `--limit` sample chosen by a hash of the id, not at random).

long -- the Python 3.11 standard library reference (`python3.11-doc`, fetched with `apt-get download` and
    unpacked with `dpkg-deb -x`): one document per `library/*.html` page that documents a module, the query
    is that module's one-line synopsis (the `:synopsis:` Sphinx prints in the module index
    `py-modindex.html`, cross-checked against the page's own heading link), the document is the page's main
    text (heading, prose, signatures, code; no navigation, sidebars, footers or permalink marks) with every
    verbatim occurrence of the synopsis removed, so the query never matches its own words as a whole. A
    page hosting several modules (json and json.tool) is one document, queried by the module its title
    names. Pages whose synopsis is missing or shared with another page are skipped. Many pages exceed
    8,192 tokens.

short -- Debian package descriptions: query = a package's one-line synopsis ("lightweight and flexible
    command-line JSON processor"), document = its long description (a paragraph or three). Chosen because
    it is public, large, maintained by people writing for people who search for software, and each synopsis
    was written for exactly one description -- one relevant document per query, as the held-out short-answer
    sets have -- while it is neither man pages nor an FAQ. The source is the archive's English description
    index (`main/i18n/Translation-en` of the suite this machine's apt uses), fetched by apt itself into a
    private lists directory (`apt-get update -o Dir::State::Lists=...`: apt checks the InRelease signature
    against Debian's keyring and the file's hash; the system's own lists are untouched). Descriptions are
    full of templates (a dozen -dev/-doc/-dbg packages of one source share paragraphs; "transitional dummy
    package"), which would make several documents equally right for one query while only one is judged.
    So: a description is dropped when any of its paragraphs also occurs in another description, when its
    first 12 words begin another description, when it matches a packaging template (transitional, dummy,
    debug symbols, "this package contains the ... files"), when its synopsis occurs for more than one
    package or contains the package name's distinctive part (the query would then be the name, a lexical
    give-away), or when it is under 20 or over 400 words.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

BUILDER_VERSION = 1
DEFAULT_ROOT = Path.home() / ".cache" / "longembed" / "devsets"

# ---------------------------------------------------------------------------------------------------------
# BEIR output


@dataclass(frozen=True)
class Pair:
    """One query with its one relevant document."""

    id: str
    query: str
    title: str
    text: str


def sample(pairs: list[Pair], limit: int | None) -> list[Pair]:
    """The first `limit` pairs by a hash of their id: a deterministic sample spread over the whole set."""
    if limit is None or limit >= len(pairs):
        return sorted(pairs, key=lambda p: p.id)
    chosen = sorted(pairs, key=lambda p: hashlib.sha256(p.id.encode()).hexdigest())[:limit]
    return sorted(chosen, key=lambda p: p.id)


def write_beir(out: Path, pairs: list[Pair], manifest: dict) -> dict:
    """Write corpus, queries, qrels and manifest.json; returns the manifest with the outputs' hashes."""
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    files = {
        "corpus.jsonl": "".join(_jsonl({"_id": p.id, "title": p.title, "text": p.text}) for p in pairs),
        "queries.jsonl": "".join(_jsonl({"_id": p.id, "text": p.query}) for p in pairs),
        "qrels/test.tsv": "query-id\tcorpus-id\tscore\n" + "".join(f"{p.id}\t{p.id}\t1\n" for p in pairs),
    }
    for name, content in files.items():
        (out / name).write_text(content, encoding="utf-8")
    manifest = dict(manifest)
    manifest["counts"] = {"documents": len(pairs), "queries": len(pairs), "qrels": len(pairs)}
    manifest["outputs"] = {name: _sha256(content.encode()) for name, content in files.items()}
    (out / "manifest.json").write_text(
        json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8"
    )
    return manifest


def _jsonl(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# long: the Python library reference


class ModuleIndexParser(HTMLParser):
    """Rows of Sphinx's `py-modindex.html`: (page, anchor, module, synopsis)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[tuple[str, str, str, str]] = []
        self._href: str | None = None
        self._module: list[str] = []
        self._in_code = False
        self._in_em = False
        self._synopsis: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "tr":
            self._flush()
        elif tag == "a" and (a.get("href") or "").count("#module-") == 1:
            self._href, self._module, self._synopsis = a["href"], [], []
        elif tag == "code" and self._href is not None:
            self._in_code = True
        elif tag == "em" and self._href is not None:
            self._in_em = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "code":
            self._in_code = False
        elif tag == "em":
            self._in_em = False
        elif tag in ("tr", "table"):
            self._flush()

    def handle_data(self, data: str) -> None:
        if self._in_code:
            self._module.append(data)
        elif self._in_em:
            self._synopsis.append(data)

    def close(self) -> None:
        super().close()
        self._flush()

    def _flush(self) -> None:
        if self._href is not None:
            page, anchor = self._href.split("#", 1)
            self.rows.append((page, anchor, "".join(self._module).strip(), _squash("".join(self._synopsis))))
        self._href = None


_BLOCK = {
    "p", "div", "section", "h1", "h2", "h3", "h4", "h5", "h6", "li", "ul", "ol", "dl", "dt", "dd", "pre",
    "table", "tr", "blockquote", "hr", "br", "figure", "caption",
}  # fmt: skip
_SKIP = {"script", "style", "head", "title"}


class PageParser(HTMLParser):
    """The main text of one Sphinx page (inside `div role=main`), its h1 title and the h1's module link."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.title = ""
        self.title_link: tuple[str, str] | None = None  # (href anchor, title attribute) of the h1's link
        self._main_depth = 0  # div nesting inside the main div; 0 = outside
        self._skip_depth = 0  # inside something dropped (permalink marks, scripts)
        self._in_h1 = False
        self._pre = 0
        self._blocks: list[str] = []
        self._current: list[str] = []
        self._h1: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if self._main_depth == 0:
            if tag == "div" and a.get("role") == "main":
                self._main_depth = 1
            return
        if self._skip_depth:
            if tag not in _VOID:
                self._skip_depth += 1
            return
        if tag in _SKIP or (tag == "a" and "headerlink" in (a.get("class") or "").split()):
            self._skip_depth = 1
            return
        if tag == "div":
            self._main_depth += 1
        if tag == "h1" and not self.title:
            self._break()
            self._in_h1 = True
        elif self._in_h1 and tag == "a" and self.title_link is None:
            self.title_link = ((a.get("href") or "").lstrip("#"), a.get("title") or "")
        if tag == "pre":
            self._break()
            self._pre += 1
        elif tag in _BLOCK:
            self._break()

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._main_depth and not self._skip_depth and tag in _BLOCK:
            self._break()

    def handle_endtag(self, tag: str) -> None:
        if self._main_depth == 0:
            return
        if self._skip_depth:
            if tag not in _VOID:
                self._skip_depth -= 1
            return
        if tag == "h1" and self._in_h1:
            self._in_h1 = False
            self.title = _squash("".join(self._h1))
            self._current = []
        elif tag == "pre":
            self._pre = max(0, self._pre - 1)
            self._break(verbatim=True)
        elif tag in _BLOCK:
            self._break()
        if tag == "div":
            self._main_depth -= 1

    def handle_data(self, data: str) -> None:
        if self._main_depth == 0 or self._skip_depth:
            return
        if self._in_h1:
            self._h1.append(data)
        else:
            self._current.append(data)

    def text(self) -> str:
        """The page's text without its h1, blocks separated by blank lines."""
        self._break()
        return "\n\n".join(self._blocks)

    def _break(self, verbatim: bool = False) -> None:
        if self._pre and not verbatim:
            return  # markup inside a code block does not split it
        raw = "".join(self._current)
        self._current = []
        block = raw.strip("\n").rstrip() if verbatim else _squash(raw)
        if block.strip():
            self._blocks.append(block)


_VOID = {"br", "hr", "img", "input", "meta", "link", "wbr", "area", "col", "source"}


def _squash(text: str) -> str:
    return " ".join(text.split())


def clean_synopsis(text: str) -> str:
    """A module index synopsis without the reST markup Sphinx leaves in it (":pep:`3119`", "``x``")."""
    text = re.sub(r":pep:`(\d+)`", r"PEP \1", text)
    text = re.sub(r":[\w:]+:`~?([^`<]*?)\s*(<[^`]*>)?`", r"\1", text)
    return _squash(text.replace("``", ""))


def remove_phrase(text: str, phrase: str) -> tuple[str, int]:
    """`text` without any case-insensitive occurrence of `phrase` (with or without its final period)."""
    core = phrase.rstrip(". ")
    if not core:
        return text, 0
    pattern = re.compile(r"\s*".join(re.escape(word) for word in core.split()) + r"\.?", re.IGNORECASE)
    result, n = pattern.subn("", text)
    return result, n


def long_pairs(html_root: Path) -> tuple[list[Pair], dict, dict[str, str]]:
    """Pairs from an unpacked Python HTML documentation tree; also the filter counts and files read."""
    read: dict[str, str] = {}

    def load(path: Path) -> str:
        data = path.read_bytes()
        read[str(path.relative_to(html_root))] = _sha256(data)
        return data.decode("utf-8")

    index = ModuleIndexParser()
    index.feed(load(html_root / "py-modindex.html"))
    index.close()
    by_page: dict[str, dict[str, tuple[str, str]]] = {}
    for page, anchor, module, synopsis in index.rows:
        by_page.setdefault(page, {})[anchor] = (module, synopsis)

    stats: Counter[str] = Counter()
    found: list[tuple[str, str, str, str]] = []  # (page, module, synopsis, title, text)
    for path in sorted((html_root / "library").glob("*.html")):
        page = f"library/{path.name}"
        stats["pages"] += 1
        entries = by_page.get(page)
        if not entries:
            stats["skipped: no module in the module index"] += 1
            continue
        parser = PageParser()
        parser.feed(load(path))
        parser.close()
        text = parser.text()
        module, synopsis = _primary_module(entries, parser.title_link)
        synopsis = clean_synopsis(synopsis)
        if not synopsis:
            stats["skipped: no synopsis"] += 1
            continue
        found.append((module, synopsis, parser.title, text))

    shared = Counter(_squash(s).casefold().rstrip(".") for _, s, _, _ in found)
    pairs: list[Pair] = []
    seen_text: set[str] = set()
    for module, synopsis, title, text in found:
        if shared[_squash(synopsis).casefold().rstrip(".")] > 1:
            stats["skipped: synopsis shared with another page"] += 1
            continue
        title, n_title = remove_phrase(title, synopsis)
        text, n_text = remove_phrase(text, synopsis)
        stats["synopsis occurrences removed from documents"] += n_title + n_text
        if _sha256(text.encode()) in seen_text:
            stats["skipped: duplicate page text"] += 1
            continue
        seen_text.add(_sha256(text.encode()))
        pairs.append(Pair(id=module, query=synopsis, title=_squash(title), text=text))
    stats["pairs"] = len(pairs)
    return pairs, dict(sorted(stats.items())), read


def _primary_module(
    entries: dict[str, tuple[str, str]], title_link: tuple[str, str] | None
) -> tuple[str, str]:
    """The module a page's title names (json on json.html, not json.tool), else its first index entry."""
    if title_link is not None and title_link[0] in entries:
        return entries[title_link[0]]
    first = min(entries)  # "module-json" sorts before "module-json.tool"
    return entries[first]


# ---------------------------------------------------------------------------------------------------------
# short: package descriptions


def parse_translation(text: str) -> Iterator[tuple[str, str, str]]:
    """(package, synopsis, long description) from a Translation-en or Packages index (RFC 822 stanzas)."""
    for stanza in text.split("\n\n"):
        package = ""
        description: list[str] = []
        in_description = False
        for line in stanza.split("\n"):
            if line.startswith((" ", "\t")):
                if in_description:
                    description.append(line[1:])
                continue
            in_description = False
            key, _, value = line.partition(":")
            if key == "Package":
                package = value.strip()
            elif key in ("Description", "Description-en"):
                in_description = True
                description = [value.strip()]
        if package and description:
            yield package, description[0], _long_description(description[1:])


def _long_description(lines: list[str]) -> str:
    """Debian's description markup as text: ' .' is a blank line, lines starting with a space are verbatim."""
    paragraphs: list[list[str]] = [[]]
    for line in lines:
        if line.strip() == ".":
            paragraphs.append([])
        elif line.startswith(" "):
            paragraphs[-1].append("\n" + line.strip())  # a list item or preformatted line keeps its break
        else:
            paragraphs[-1].append(line.strip())
    return "\n\n".join(" ".join(p).replace(" \n", "\n").strip() for p in paragraphs if p)


_TEMPLATE = re.compile(
    r"\b(transitional|dummy) package\b|\bdebug(ging)? symbols\b|\bthis package contains the [\w\s-]{0,40}"
    r"\b(files|headers|library|libraries|documentation|symbols)\b|\bmetapackage\b|\bmeta-package\b",
    re.IGNORECASE,
)


def short_pairs(index_text: str) -> tuple[list[Pair], dict]:
    """Pairs from a description index, with the filters in the module docstring; also the filter counts."""
    stats: Counter[str] = Counter()
    records = {}
    for package, synopsis, description in parse_translation(index_text):
        stats["descriptions"] += 1
        records.setdefault(package, (synopsis, description))  # first stanza of a package wins
    paragraph_count: Counter[str] = Counter()
    synopsis_count: Counter[str] = Counter()
    for synopsis, description in records.values():
        synopsis_count[_key(synopsis)] += 1
        paragraph_count[_opening(description)] += 1
        paragraph_count.update({_key(p) for p in description.split("\n\n") if p.strip()})
    pairs: list[Pair] = []
    for package in sorted(records):
        synopsis, description = records[package]
        reason = _short_reject(package, synopsis, description, synopsis_count, paragraph_count)
        if reason:
            stats[f"skipped: {reason}"] += 1
            continue
        pairs.append(Pair(id=package, query=synopsis, title="", text=description))
    stats["pairs"] = len(pairs)
    return pairs, dict(sorted(stats.items()))


def _short_reject(
    package: str, synopsis: str, description: str, synopsis_count: Counter[str], paragraph_count: Counter[str]
) -> str:
    words = len(description.split())
    if words < 20:
        return "under 20 words"
    if words > 400:
        return "over 400 words"
    if synopsis_count[_key(synopsis)] > 1:
        return "synopsis shared with another package"
    if any(paragraph_count[_key(p)] > 1 for p in description.split("\n\n") if p.strip()):
        return "a paragraph shared with another package"
    if paragraph_count[_opening(description)] > 1:
        return "first 12 words shared with another package"
    if _TEMPLATE.search(synopsis) or _TEMPLATE.search(description):
        return "packaging template"
    if f" {_stem(package)} " in f" {_key(synopsis)} ":
        return "synopsis names the package"
    return ""


def _opening(description: str) -> str:
    # near-duplicates of one template ("This package provides the Foo bindings for ...") begin alike
    return "opening: " + " ".join(_key(description).split()[:12])


def _key(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


def _stem(package: str) -> str:
    # "python3-requests" -> "requests", "libfoo-dev" -> "foo": the part a user would type
    name = re.sub(r"^(lib|python3?-|ruby-|golang-|node-|r-cran-|php-|perl-)", "", package)
    name = re.sub(r"(-dev|-doc|-data|-common|-utils|-tools|-bin)$", "", name)
    return _key(re.sub(r"[\d.]+$", "", name)) or _key(package)


# ---------------------------------------------------------------------------------------------------------
# fetching


def _run(cmd: list[str], cwd: Path) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"devsets: {' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done.stdout


def fetch_deb(package: str, work: Path) -> tuple[dict, Path]:
    """`apt-get download` one package into `work` and unpack it; returns its provenance and the tree."""
    _run(["apt-get", "download", "-q", *_sandbox(), package], work)
    debs = sorted(work.glob(f"{package}_*.deb"))
    if len(debs) != 1:
        sys.exit(f"devsets: expected one {package}_*.deb in {work}, found {len(debs)}")
    deb = debs[0]
    version = _run(["dpkg-deb", "-f", str(deb), "Version"], work).strip()
    tree = work / "tree"
    _run(["dpkg-deb", "-x", str(deb), str(tree)], work)
    info = {"package": package, "version": version, "deb": deb.name, "deb_sha256": _sha256(deb.read_bytes())}
    return info, tree


def fetch_translation(work: Path) -> tuple[dict, str]:
    """The main Translation-en of the Debian suite this machine's apt uses, fetched and verified by apt."""
    lists = work / "lists"
    (lists / "partial").mkdir(parents=True)
    (work / "cache" / "archives" / "partial").mkdir(parents=True)
    options = [
        f"Dir::State::Lists={lists}",
        f"Dir::Cache={work / 'cache'}",
        "Acquire::Languages=en",
        "Acquire::GzipIndexes=false",  # store the index uncompressed: no lz4 module needed to read it
        "Acquire::IndexTargets::deb::Packages::DefaultEnabled=false",
        "Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false",
    ]
    _run(["apt-get", "update", "-q", *_sandbox(), *[arg for o in options for arg in ("-o", o)]], work)
    candidates = sorted(
        p
        for p in lists.glob("*_main_i18n_Translation-en")
        if "-updates_" not in p.name and "-security_" not in p.name
    )
    if not candidates:
        sys.exit(f"devsets: apt fetched no main Translation-en into {lists}")
    path = candidates[0]
    release = lists / (path.name.split("_main_i18n_")[0] + "_InRelease")
    release_text = release.read_text(encoding="utf-8", errors="replace")
    fields = {
        k: v.strip() for k, _, v in (line.partition(":") for line in release_text.splitlines()[:20]) if v
    }
    data = path.read_bytes()
    info = {
        "index": path.name,
        "index_sha256": _sha256(data),
        "inrelease": release.name,
        "inrelease_sha256": _sha256(release.read_bytes()),
        "suite": fields.get("Suite", ""),
        "release_version": fields.get("Version", ""),
        "release_date": fields.get("Date", ""),
        "fetched_by": "apt-get update into a private lists directory (signature and hash checked by apt)",
    }
    return info, data.decode("utf-8")


def _sandbox() -> list[str]:
    # As root apt drops to user _apt to download, who cannot write our temporary directory: stay root.
    # Anyone else downloads as themselves anyway.
    return ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []


# ---------------------------------------------------------------------------------------------------------


def build(name: str, out: Path, limit: int | None) -> dict:
    """Fetch the sources of one set, build it into `out`, return its manifest."""
    with tempfile.TemporaryDirectory(prefix="longembed-devsets-") as tmp:
        work = Path(tmp)
        if name == "long":
            source, tree = fetch_deb("python3.11-doc", work)
            html_root = tree / "usr/share/doc/python3.11/html"
            pairs, stats, read = long_pairs(html_root)
            source["files_read"] = read
        else:
            source, text = fetch_translation(work)
            pairs, stats = short_pairs(text)
    manifest = {
        "name": name,
        "builder": f"bench/devsets.py v{BUILDER_VERSION}",
        "source": source,
        "filters": stats,
        "limit": limit,
    }
    return write_beir(out, sample(pairs, limit), manifest)


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("set", choices=["long", "short"], help="which development set to build")
    parser.add_argument("--out", type=Path, help=f"output folder (default {DEFAULT_ROOT}/<set>[-<limit>])")
    parser.add_argument("--limit", type=int, help="keep a deterministic sample of this many pairs")
    args = parser.parse_args(None if argv is None else list(argv))
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    out = args.out or DEFAULT_ROOT / (args.set + (f"-{args.limit}" if args.limit else ""))
    manifest = build(args.set, out, args.limit)
    counts = manifest["counts"]
    print(f"{args.set}: {counts['documents']} documents, {counts['queries']} queries -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
