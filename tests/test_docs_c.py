"""docs/c_guide.md stays complete: every public name of the C ABI (cpp/include/pybn/pybn.h) is in
the guide, every field of the two parameter blocks is in the guide's section on that block, and
every relative Markdown link (and in-page anchor) of the guide points at something that exists.

Pure text checks: no compiler, no library, no GPU needed."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]  # tests/ sits next to cpp/ and docs/
HEADER = ROOT / "cpp" / "include" / "pybn" / "pybn.h"
GUIDE = ROOT / "docs" / "c_guide.md"
PARAM_STRUCTS = ("pybn_forward_params", "pybn_backward_params")


def _code(text):
    """The header without its comments (so that names in prose do not count)."""
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def header_functions(code):
    # PYBN_API <return type> name(   -- the return type may itself be pybn_status, const char*, ...
    return sorted(set(re.findall(r"\bPYBN_API\s+[\w\s\*]*?\b(pybn_\w+)\s*\(", code)))


def header_struct_fields(code, name):
    m = re.search(r"typedef\s+struct\s+" + name + r"\s*\{(.*?)\}\s*" + name + r"\s*;", code, re.S)
    assert m, f"struct {name} not found in {HEADER}"
    fields = []
    for decl in m.group(1).split(";"):
        decl = decl.strip()
        if decl:
            fields.append(re.findall(r"\w+", decl)[-1])
    return fields


def header_constants(code):
    """Enum constants (PYBN_X = n inside typedef enum) and the public macros (#define PYBN_X),
    except the include guard."""
    names = set()
    for body in re.findall(r"typedef\s+enum\s+\w*\s*\{(.*?)\}", code, re.S):
        names.update(re.findall(r"\b(PYBN_[A-Z0-9_]+)\s*=", body))
    names.update(re.findall(r"^\s*#\s*define\s+(PYBN_[A-Z0-9_]+)", code, re.M))
    names.update(re.findall(r"defined\((PYBN_[A-Z0-9_]+)\)", code))
    names.discard("PYBN_PYBN_H")
    return sorted(names)


def _mentions(text, name):
    return re.search(r"(?<![\w])" + re.escape(name) + r"(?![\w])", text) is not None


def _guide():
    assert GUIDE.is_file(), f"{GUIDE} is missing"
    return GUIDE.read_text(encoding="utf-8")


def _header_code():
    return _code(HEADER.read_text(encoding="utf-8"))


def test_header_parsing_finds_the_abi():
    """Guards the parser itself: an empty parse would make the completeness tests vacuous."""
    code = _header_code()
    funcs = header_functions(code)
    assert len(funcs) >= 35, funcs
    for must in ("pybn_forward_v2", "pybn_backward_v2", "pybn_status_string", "pybn_cuda_forward_v2",
                 "pybn_cuda_reduce_workspace_size", "pybn_batch_stats", "pybn_merge_stats"):
        assert must in funcs
    for s in PARAM_STRUCTS:
        fields = header_struct_fields(code, s)
        assert fields[0] == "size" and fields[-1] == "virtual_batches", fields
    consts = header_constants(code)
    for must in ("PYBN_SUCCESS", "PYBN_ERROR_INTERNAL", "PYBN_BFLOAT16", "PYBN_ACTIVATION_RELU",
                 "PYBN_ABI_VERSION", "PYBN_FORWARD_PARAMS_INIT", "PYBN_BACKWARD_PARAMS_INIT"):
        assert must in consts


def test_every_public_name_of_the_header_is_in_the_guide():
    code, guide = _header_code(), _guide()
    names = header_functions(code) + header_constants(code)
    names += [f for s in PARAM_STRUCTS for f in header_struct_fields(code, s)] + list(PARAM_STRUCTS)
    names += ["pybn_view", "pybn_status", "pybn_dtype", "pybn_activation"]
    names += header_struct_fields(code, "pybn_view")
    missing = sorted({n for n in names if not _mentions(guide, n)})
    assert not missing, f"docs/c_guide.md does not mention: {', '.join(missing)}"


def _sections(guide):
    """(heading line, body) for every Markdown heading outside code fences."""
    out, current, body, fenced = [], None, [], False
    for line in guide.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and re.match(r"#{1,6} ", line):
            if current is not None:
                out.append((current, "\n".join(body)))
            current, body = line, []
        else:
            body.append(line)
    if current is not None:
        out.append((current, "\n".join(body)))
    return out


def test_every_field_of_each_parameter_block_is_in_its_section():
    """Each block has a section (a heading naming it) whose table lists every field as code:
    `field`."""
    code, guide = _header_code(), _guide()
    problems = []
    for s in PARAM_STRUCTS:
        bodies = [b for h, b in _sections(guide) if s in h]
        if not bodies:
            problems.append(f"no section heading names {s}")
            continue
        body = "\n".join(bodies)
        lacking = [f for f in header_struct_fields(code, s) if f"`{f}`" not in body]
        if lacking:
            problems.append(f"the {s} section lacks `{'`, `'.join(lacking)}`")
    assert not problems, "; ".join(problems)


def _slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"^#+\s*", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _links(guide):
    prose = re.sub(r"```.*?```", "", guide, flags=re.S)
    prose = re.sub(r"`[^`\n]*`", "", prose)
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose)


def _anchors(markdown):
    seen, anchors = {}, set()
    for heading, _ in _sections(markdown):
        slug = _slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_every_relative_link_of_the_guide_exists():
    guide = _guide()
    links = _links(guide)
    assert links, "no links found: the link parser is broken"
    problems = []
    for link in links:
        if re.match(r"[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto: ...
            continue
        path, _, anchor = link.partition("#")
        target = (GUIDE.parent / path).resolve() if path else GUIDE
        if not target.exists():
            problems.append(f"{link}: {target} does not exist")
            continue
        try:
            target.relative_to(ROOT)
        except ValueError:
            problems.append(f"{link}: points outside the repository")
            continue
        if anchor and target.suffix == ".md":
            if anchor not in _anchors(target.read_text(encoding="utf-8")):
                problems.append(f"{link}: no heading with anchor #{anchor} in {target.name}")
    assert not problems, "broken links in docs/c_guide.md:\n" + "\n".join(problems)
