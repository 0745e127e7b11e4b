"""The documentation stays true to the tree: links and anchors resolve, the module map in
docs/architecture.md names exactly the modules under serve_app, the settings reference in
docs/configuration.md names exactly the settings of serve_app/config.py with their defaults and
limits, and every path or module the docs name exists. No Ray, no network: plain file reads."""

from __future__ import annotations

import re
import typing
import unicodedata
from pathlib import Path

import pydantic
import pytest
import yaml
from annotated_types import Ge, Gt, Le, Lt

import serve_app.config as config

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "serve_app"
ARCHITECTURE = REPO / "docs" / "architecture.md"
CONFIGURATION = REPO / "docs" / "configuration.md"
# The pages checked: the README, every page under docs/, and the other READMEs that link into them.
PAGES = sorted({REPO / "README.md", *(REPO / "docs").glob("*.md"),
                REPO / "benchmarks" / "README.md", REPO / "tests" / "data" / "README.md"})
# Files whose comments or text name modules and paths too: the configs and the notebook.
MENTIONS = sorted({*PAGES, REPO / "deploy.yaml", *(REPO / "configs").rglob("*.yaml"),
                   *(REPO / "notebooks").glob("*.ipynb")})

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^()\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s+<?(\S+?)>?(?:\s+\".*\")?\s*$")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")
# Paths and dotted module names the docs mention (in prose or in code blocks).
REPO_PATH = re.compile(r"(?<![\w/.~-])(?:serve_app|configs|benchmarks|tests|notebooks|docs)"
                       r"/[\w./-]*[\w/]")
MODULE = re.compile(r"(?<![\w/.-])((?:serve_app|benchmarks)(?:\.\w+)+)")


def split_code(text: str) -> tuple[list[str], list[str]]:
    """The page's lines outside fenced code blocks (prose), and those inside (code); a line of
    the other kind is left empty, so that line numbers stay."""
    prose, code, fence = [], [], None
    for line in text.splitlines():
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)[0] * len(match.group(1))
            prose.append(""), code.append("")
        elif fence is not None:
            if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
                fence = None
            prose.append(""), code.append("" if fence is None else line)
        else:
            prose.append(line), code.append("")
    return prose, code


def heading_text(raw: str) -> str:
    """A heading's text as GitHub renders it: code spans keep their content, links their
    text, emphasis markers go."""
    text = CODE_SPAN.sub(lambda m: m.group(2).strip(), raw)
    text = LINK.sub(lambda m: m.group(1), text)
    return text.replace("*", "")


def slug(text: str) -> str:
    """GitHub's anchor for a heading (github-slugger): lower case, punctuation and symbols
    removed (letters, digits, marks, '_' and '-' kept), each space a '-'."""
    kept = "".join(ch for ch in text.lower()
                   if ch in " -_" or unicodedata.category(ch)[0] in "LNM")
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    prose, _ = split_code(page.read_text(encoding="utf-8"))
    found, seen = set(), {}
    for line in prose:
        found.update(HTML_ANCHOR.findall(line))
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(heading_text(match.group(2)))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link and image outside code."""
    prose, _ = split_code(page.read_text(encoding="utf-8"))
    found = []
    for number, line in enumerate(prose, 1):
        # Code spans hide link-like text, but a link whose text is code stays a link.
        line = CODE_SPAN.sub(lambda m: "c" * len(m.group(0)), line)
        found += [(number, m.group(2)) for m in LINK.finditer(line)]
        found += [(number, m.group(1)) for m in REFERENCE.finditer(line)]
    return found


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def test_pages_exist():
    missing = [rel(page) for page in PAGES if not page.is_file()]
    assert not missing, f"documentation pages missing: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_relative_links_and_anchors_resolve(page: Path):
    broken = []
    for number, target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        where = f"{rel(page)}:{number}: ({target})"
        path_part, _, anchor = target.partition("#")
        path_part = path_part.split("?")[0]
        if path_part.startswith("/"):
            broken.append(f"{where} is absolute: link relative to the page")
            continue
        resolved = (page.parent / path_part).resolve() if path_part else page
        if not resolved.is_relative_to(REPO):
            broken.append(f"{where} leaves the repository")
        elif not resolved.exists():
            broken.append(f"{where}: no such file or folder {rel(resolved)}")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{where}: {rel(resolved)} has no heading with the anchor #{anchor} "
                          f"(its anchors: {sorted(anchors(resolved))})")
    assert not broken, "broken links:\n" + "\n".join(broken)


@pytest.mark.parametrize("page", MENTIONS, ids=rel)
def test_named_paths_and_modules_exist(page: Path):
    """A path such as serve_app/api/ingress.py or a module such as serve_app.tools.kuberay,
    named anywhere in a page, a config or the notebook (code included), exists: a move of a
    module fails here until the docs follow it."""
    stale = []
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        for path in REPO_PATH.findall(line):
            if not (REPO / path).exists():
                stale.append(f"{rel(page)}:{number}: {path}")
        for dotted in MODULE.findall(line):
            if not module_exists(dotted):
                stale.append(f"{rel(page)}:{number}: {dotted}")
    assert not stale, "the docs name paths or modules that do not exist:\n" + "\n".join(stale)


def module_exists(dotted: str) -> bool:
    """serve_app.a.b[.attribute...]: packages down to a module (the rest may be attributes)."""
    where = REPO
    for part in dotted.split("."):
        if (where / f"{part}.py").is_file():
            return True
        if not (where / part / "__init__.py").is_file():
            return False
        where = where / part
    return True


# -- the module map -------------------------------------------------------------------------
def tree_modules() -> set[str]:
    """Every module under serve_app (package markers and __main__ aside), and every folder of
    package data (a folder with files but no __init__.py, such as the web page's)."""
    found = set()
    for path in PACKAGE.rglob("*"):
        if "__pycache__" in path.parts:
            continue
        if path.suffix == ".py" and path.name not in ("__init__.py", "__main__.py"):
            found.add(rel(path))
        elif path.is_dir() and not (path / "__init__.py").exists() and any(
                child.is_file() for child in path.iterdir()):
            found.add(rel(path) + "/")
    return found


def section(page: Path, title: str) -> list[str]:
    """The prose lines of a page under the heading `title`, down to the next heading of the
    same level or above."""
    prose, _ = split_code(page.read_text(encoding="utf-8"))
    lines, level = [], None
    for line in prose:
        match = HEADING.match(line)
        if match and level is not None and len(match.group(1)) <= level:
            break
        if level is not None:
            lines.append(line)
        if match and heading_text(match.group(2)) == title:
            level = len(match.group(1))
    assert level is not None, f"{rel(page)} has no heading {title!r}"
    return lines


def table_rows(lines: list[str]) -> list[list[str]]:
    """The body rows of the markdown tables in these lines, as cells (each table's header row
    and separator left out)."""
    rows, in_table = [], False
    for line in lines:
        if not line.startswith("|"):
            in_table = False
        elif not in_table:
            in_table = True  # the header row
        elif not re.fullmatch(r"\|[\s:|-]+\|", line.strip()):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def test_module_map_lists_exactly_the_modules():
    rows = table_rows(section(ARCHITECTURE, "Module map"))
    listed, malformed = [], []
    for cells in rows:
        match = re.fullmatch(r"`(serve_app/[^`]+)`", cells[0])
        if match and len(cells) >= 2 and cells[1]:
            listed.append(match.group(1))
        else:
            malformed.append("| " + " | ".join(cells) + " |")
    tree = tree_modules()
    missing = sorted(tree - set(listed))
    extra = sorted(set(listed) - tree)
    twice = sorted({name for name in listed if listed.count(name) > 1})
    problems = []
    if missing:
        problems.append("add a row for each (under its package's heading):\n" + "\n".join(
            f"    | `{name}` | <its role in one line> |" for name in missing))
    if extra:
        problems.append("remove the rows of what is not in the tree:\n" + "\n".join(
            f"    `{name}`" for name in extra))
    if twice:
        problems.append(f"rows listed more than once: {twice}")
    if malformed:
        problems.append("rows that are not `| `serve_app/...` | role |` (one module a row, with "
                        "its role):\n" + "\n".join(f"    {row}" for row in malformed))
    assert not problems, ("docs/architecture.md's module map does not match serve_app/:\n"
                          + "\n".join(problems))


# -- the settings reference -----------------------------------------------------------------
def settings_models() -> list[type[pydantic.BaseModel]]:
    """The settings models of serve_app/config.py (their shared base aside), and those it
    takes from the package's own modules (the jobs' settings)."""
    return [value for name, value in vars(config).items()
            if isinstance(value, type) and issubclass(value, pydantic.BaseModel)
            and value.__module__.startswith("serve_app.") and not name.startswith("_")]


def number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def limits(field: pydantic.fields.FieldInfo) -> str:
    """A field's limits as the reference writes them: `≥ 1, ≤ 256`, or its choices."""
    parts = []
    for item in field.metadata:
        for kind, attribute, sign in ((Ge, "ge", "≥"), (Gt, "gt", ">"), (Le, "le", "≤"),
                                      (Lt, "lt", "<")):
            if isinstance(item, kind):
                parts.append(f"{sign} {number(getattr(item, attribute))}")
    if typing.get_origin(field.annotation) is typing.Literal:
        parts.append(", ".join(f"`{choice}`" for choice in typing.get_args(field.annotation)))
    return ", ".join(parts)


def reference_table(model: type[pydantic.BaseModel]) -> list[list[str]]:
    prose, _ = split_code(CONFIGURATION.read_text(encoding="utf-8"))
    titles = [heading_text(m.group(2)) for m in map(HEADING.match, prose) if m]
    named = [title for title in titles if re.search(rf"\({model.__name__}\)$", title)]
    assert len(named) == 1, (
        f"docs/configuration.md needs one heading ending in (`{model.__name__}`) under "
        f"'Settings reference', over a table | setting | default | limits | meaning | of its "
        f"fields {list(model.model_fields)}; found {named}")
    return table_rows(section(CONFIGURATION, named[0]))


@pytest.mark.parametrize("model", settings_models(), ids=lambda model: model.__name__)
def test_settings_reference_matches_the_settings_models(model):
    rows = {}
    problems = []
    for cells in reference_table(model):
        match = re.fullmatch(r"`(\w+)`", cells[0])
        if not match or len(cells) != 4:
            problems.append(f"not | `setting` | default | limits | meaning |: {cells}")
            continue
        rows[match.group(1)] = cells
    fields = model.model_fields
    for name in sorted(set(fields) - set(rows)):
        problems.append(f"add a row: | `{name}` | {documented_default(fields[name])} | "
                        f"{limits(fields[name])} | <meaning> |")
    for name in sorted(set(rows) - set(fields)):
        problems.append(f"remove the row of `{name}`: {model.__name__} has no such setting")
    for name in sorted(set(rows) & set(fields)):
        field, (_, default, bounds, meaning) = fields[name], rows[name]
        if not default_matches(field, default):
            problems.append(f"`{name}`: the default column says {default!r}, the code "
                            f"{documented_default(field)}")
        if bounds != limits(field):
            problems.append(f"`{name}`: the limits column says {bounds!r}, the code "
                            f"{limits(field)!r}")
        if not meaning:
            problems.append(f"`{name}`: say what it means")
    assert not problems, (f"docs/configuration.md's reference for {model.__name__} does not "
                          "match serve_app/config.py:\n" + "\n".join(problems))


def documented_default(field: pydantic.fields.FieldInfo) -> str:
    if field.is_required():
        return "(required)"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, pydantic.BaseModel):  # nested settings: their own table's defaults
        value = value.model_dump(exclude_defaults=True)
    return f"`{yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}`"


def default_matches(field: pydantic.fields.FieldInfo, cell: str) -> bool:
    """`(required)` for a required field; else the cell's first code span, read as YAML (as a
    config would give it), equals the default."""
    if field.is_required():
        return cell == "(required)"
    match = CODE_SPAN.match(cell)
    if not match:
        return False
    given = yaml.safe_load(match.group(2))
    value = field.get_default(call_default_factory=True)
    if isinstance(value, pydantic.BaseModel):
        return isinstance(given, dict) and type(value).model_validate(given) == value
    return (given == value and type(given) is type(value)) or (
        isinstance(value, float) and isinstance(given, int) and given == value)


# -- the checks themselves ------------------------------------------------------------------
def test_slug_follows_github():
    assert slug(heading_text("`POST /v1/predict`")) == "post-v1predict"
    assert slug(heading_text("`GET /health`, `GET /ready`")) == "get-health-get-ready"
    assert slug(heading_text("`GET /`")) == "get-"
    assert slug(heading_text("Rollouts: canary, sticky sessions, shadow")) == \
        "rollouts-canary-sticky-sessions-shadow"
    assert slug(heading_text("The proxy's timeout")) == "the-proxys-timeout"
    assert slug(heading_text("Router settings (`RouterSettings`)")) == \
        "router-settings-routersettings"
    assert slug(heading_text("Walk-through: from A → B")) == "walk-through-from-a--b"
    assert slug(heading_text("max_batch_size and **batching**")) == "max_batch_size-and-batching"


def test_link_parsing_skips_code_and_keeps_code_links(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("See [`GET /`](api.md#get-) and [b](b.md).\n"
                    "`[not](a-link.md)`\n"
                    "```\n[nor](this.md)\n```\n"
                    "[ref]: other.md\n", encoding="utf-8")
    assert links(page) == [(1, "api.md#get-"), (1, "b.md"), (6, "other.md")]


def test_module_map_check_sees_a_new_module(tmp_path, monkeypatch):
    """The map check is not vacuous: a module added to the tree is reported as a missing row."""
    package = tmp_path / "serve_app"
    (package / "api" / "web").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "api" / "__init__.py").write_text("")
    (package / "api" / "web" / "index.html").write_text("")
    (package / "wire.py").write_text("")
    monkeypatch.setattr(f"{__name__}.PACKAGE", package)
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    assert tree_modules() == {"serve_app/wire.py", "serve_app/api/web/"}


# -- the command-line client's flags ----------------------------------------------------------
API = REPO / "docs" / "api.md"
BATCH = REPO / "docs" / "batch.md"
# Where each command's flags are documented: api.md's section of the command, except batch's
# (its page, where they sit beside what they tune).
CLI_PAGES = {"batch": (BATCH, "On a directory")}


def cli_flags() -> dict[str, dict[str, object]]:
    """Every subcommand of `emotion2vec-serve` ("keys new" for nested ones) -> its long
    option flags -> their defaults, read from the argparse parsers themselves."""
    import argparse

    from serve_app.tools.cli import _parser

    found: dict[str, dict[str, object]] = {}

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, subparser in action.choices.items():
                    walk(subparser, f"{name} {sub}".strip())
            elif name and action.option_strings and action.dest != "help":
                flag = max(action.option_strings, key=len)
                found.setdefault(name, {})[flag] = action.default

    walk(_parser(), "")
    return found


def flag_rows(lines: list[str]) -> dict[str, list[str]]:
    """Table rows whose first cell names flags (`--a`, `--b`): flag -> the row's cells."""
    rows = {}
    for cells in table_rows(lines):
        for flag in re.findall(r"`(--[\w-]+)", cells[0]):
            rows[flag] = cells
    return rows


def test_every_cli_flag_is_documented_with_its_default():
    """Each flag of each subcommand has a row in its section of docs/api.md's "The
    command-line client" (batch's: docs/batch.md); a number or word default is the one the
    parser has. A flag added to the CLI fails here until it is documented."""
    problems = []
    flags = cli_flags()
    assert {"predict", "stream", "segments", "batch", "keys new"} <= set(flags), flags
    for command, defaults in sorted(flags.items()):
        page, title = CLI_PAGES.get(command, (API, command))
        rows = flag_rows(section(page, title))
        for flag, default in defaults.items():
            if flag not in rows:
                problems.append(f"{rel(page)}, {title}: add a row for {command} {flag}")
                continue
            if isinstance(default, bool) or default is None or flag == "--api-key":
                continue  # off / the service's / the environment's: said in words
            if isinstance(default, (int, float)):
                default = number(default)
            elif isinstance(default, str) and default.startswith(f"{REPO}/"):
                default = default[len(f"{REPO}/"):]  # a file of the repository
            cell = rows[flag][1] if len(rows[flag]) > 1 else ""
            if not isinstance(default, tuple) and f"`{default}`" not in cell:
                problems.append(f"{rel(page)}, {title}: {command} {flag}'s default is "
                                f"`{default}`, the row says {cell!r}")
    assert not problems, "the CLI's flags and their documentation differ:\n" + "\n".join(problems)


def test_the_flag_check_sees_an_undocumented_flag(monkeypatch):
    """Not vacuous: a flag the parser has and the page lacks is reported."""
    import serve_app.tools.cli as cli

    build = cli._parser

    def with_extra():
        parser = build()
        commands = next(a for a in parser._actions if a.choices and "predict" in a.choices)
        commands.choices["predict"].add_argument("--not-documented", type=int, default=3)
        return parser

    monkeypatch.setattr(cli, "_parser", with_extra)
    with pytest.raises(AssertionError, match="add a row for predict --not-documented"):
        test_every_cli_flag_is_documented_with_its_default()


# -- the measured numbers -------------------------------------------------------------------
def test_results_tables_equal_their_result_files():
    """Every table of measured numbers marked `<!-- results: FILE.json -->` is what
    benchmarks/tables.py renders from benchmarks/results/FILE.json (rewrite them with
    `python -m benchmarks.tables --write`)."""
    from benchmarks import tables

    found, stale = 0, []
    for page in tables.PAGES:
        for name, body in tables.blocks(page.read_text(encoding="utf-8")):
            found += 1
            if body != tables.render(name):
                stale.append(f"{rel(page)}: {name}")
    assert found >= 3, "the CPU tables are rendered from benchmarks/results/"
    assert not stale, ("tables that differ from their results file (python -m benchmarks.tables "
                       "--write):\n" + "\n".join(stale))


def test_results_check_sees_an_edited_number(tmp_path, monkeypatch):
    from benchmarks import tables

    page = tmp_path / "page.md"
    body = tables.render("cpu-stream-hop1-2026-12-01.json")
    page.write_text(f"<!-- results: cpu-stream-hop1-2026-12-01.json -->\n{body}<!-- /results -->\n")
    monkeypatch.setattr(tables, "PAGES", [page])
    assert tables.main([]) == 0
    page.write_text(page.read_text().replace("| 603 |", "| 503 |"))
    assert tables.main([]) == 1
