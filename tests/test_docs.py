"""The docs hold together: the configuration reference is what the code says, every relative link in the README
and `docs/` leads somewhere, and the README stays a front page with the set-up commands as the contract gives them.

Nothing here runs a model; the reference is rendered from the config dataclasses' source (`vishwam.config.reference`).
"""

from __future__ import annotations

import re
from pathlib import Path

from vishwam.config import reference

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200
SETUP = """\
```bash
pip install -e ".[dev]"                        # set-up on a fresh machine (CPU; no network beyond the package index)
python run.py --config configs/distill.yaml    # the main job, on the embedded demo teacher + data, CPU, minutes
pytest                                          # the tests (.ci/run calls this same command)
```
"""

_FENCE = re.compile(r"^(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """`(line number, line)` outside fenced code blocks."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: links reduced to their text, lower case, every character but letters,
    digits, `_`, `-` and spaces dropped, spaces to `-`."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a markdown file's headings, duplicates numbered as GitHub numbers them (`-1`, `-2`)."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in _prose_lines(path.read_text()):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """`(line number, target)` of every markdown link and image outside code."""
    out = []
    for number, line in _prose_lines(path.read_text()):
        line = _CODE_SPAN.sub("code", line)
        out += [(number, m.group(1)) for m in _LINK.finditer(line)]
    return out


def broken_links(paths: list[Path], root: Path = ROOT) -> list[str]:
    bad = []
    for path in paths:
        for number, target in links(path):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not checked here
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(root)}:{number}: {target}"
            if not dest.exists():
                bad.append(f"{where} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{where} (no heading with that anchor in {dest.relative_to(root)})")
    return bad


def test_config_reference_is_what_the_code_says():
    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == reference.render(), (
        "docs/config.md differs from the config dataclasses' docstrings: run python -m vishwam.config.reference")


def test_the_reference_lists_every_key_with_its_docstring():
    keys = reference.keys()
    dotted = {k.dotted for k in keys}
    for key in ("distillation.teacher_model.path", "training.max_steps", "distillation_params.kd_weight",
                "distillation_params.eplb.probe_tokens", "distillation_params.on_policy.beta",
                "distillation_params.temperature.schedule", "tracking.aim"):
        assert key in dotted, key
    undocumented = [k.dotted for k in keys if not k.doc]
    assert not undocumented, f"config fields without a docstring: {undocumented}"
    assert reference.field_docs(reference.RunConfig)["training"][1] == "Optimisation loop, logging, evaluation and checkpointing."
    by_key = {k.dotted: k for k in keys}
    assert by_key["training.learning_rate"].default == "0.0003"
    assert by_key["distillation.teacher_model.path"].default == "required"
    assert by_key["distillation_params.kd_loss"].type == "'forward_kl' | 'reverse_kl' | 'jsd' | 'tv'"


def test_every_relative_link_resolves():
    assert sum(len(links(p)) for p in DOCS) > 50  # the links were found
    bad = broken_links(DOCS)
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_the_link_check_sees_a_broken_link(tmp_path):
    (tmp_path / "a.md").write_text("# Top\n\n## The flagship's size\n\n[ok](#the-flagships-size) [ok](a.md#top)\n"
                                   "`[code](nowhere.md)`\n[file](missing.md) [anchor](#nope)\n")
    assert broken_links([tmp_path / "a.md"], root=tmp_path) == [
        "a.md:7: missing.md (no such file)", "a.md:7: #nope (no heading with that anchor in a.md)"]


def test_the_readme_is_a_front_page_with_the_contract_commands():
    text = (ROOT / "README.md").read_text()
    assert SETUP in text
    lines = len(text.splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; reference material belongs in docs/"
