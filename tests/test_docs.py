"""The user's pages stay true: docs/spec.md is the spec's own descriptions, every link and every
test a page names exists, and the README stays a page a user reads (at most 200 lines)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel

from lora_dist import specdoc
from lora_dist.spec import JobSpec

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
TEST_REF = re.compile(r"(test_\w+\.py)::(test_\w+)")


def test_spec_page_is_generated_from_the_field_descriptions():
    page = (REPO / "docs" / "spec.md").read_text(encoding="utf-8")
    assert page == specdoc.render(), ("docs/spec.md differs from the field descriptions in lora_dist/spec.py: "
                                      "run `python -m lora_dist.specdoc > docs/spec.md`")


def test_every_spec_field_has_a_description():
    sections = [(f"{k}.", f.annotation) for k, f in JobSpec.model_fields.items()
                if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)]
    missing = [f"{prefix}{k}" for prefix, model in [("", JobSpec), *sections]
               for k, f in model.model_fields.items() if not (f.description or "").strip()]
    assert not missing, f"spec fields without a description: {missing}"


def test_the_spec_page_lists_every_key_with_its_default():
    page = specdoc.render()
    assert "| `lora.r` | integer >= 1, <= 4096 | `8` |" in page
    assert "| `name` | string | `required` |" in page
    assert "| `lora.targets` | a name or a list of names | `[q_proj, v_proj]` |" in page
    assert "| `cluster.zero_stage` | `auto` or `1` or `2` or `3` | `auto` |" in page
    assert "| `data.path` | a path, or null | `null` |" in page


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+\s+(.+?)\s*$", page.read_text(encoding="utf-8"), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_every_relative_link_points_to_an_existing_file_and_heading():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+:", target):
                continue  # http(s), mailto: not checked offline
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_test_a_page_names_exists_where_it_says():
    missing = []
    for page in PAGES:
        for module, name in TEST_REF.findall(page.read_text(encoding="utf-8")):
            source = REPO / "tests" / module
            if not source.is_file() or not re.search(rf"^def {name}\(", source.read_text(), flags=re.M):
                elsewhere = [p.name for p in (REPO / "tests").glob("test_*.py")
                             if re.search(rf"^def {name}\(", p.read_text(), flags=re.M)]
                missing.append(f"{page.relative_to(REPO)}: {module}::{name} (defined in: {elsewhere or 'none'})")
    assert not missing, "pages name tests that are not where they say:\n" + "\n".join(missing)


def test_readme_is_a_page_a_user_reads():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; details belong in docs/"


def test_nothing_points_outside_the_repository():
    needle = "../" + "shared"  # the notes outside the repository that the docs once deferred to
    found = [f"{p.relative_to(REPO)}" for top in ("README.md", "docs", "lora_dist", "tests", "bench", "jobs",
                                                   "deploy", ".ci")
             for p in ([REPO / top] if (REPO / top).is_file() else (REPO / top).rglob("*"))
             if p.is_file() and p.suffix in ("", ".md", ".py", ".yaml", ".yml", ".sh", ".toml")
             and needle in p.read_text(encoding="utf-8", errors="replace")]
    assert not found, f"files that refer to {needle}: {found}"


def test_the_readme_test_command_is_what_ci_runs():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    command = next(line.strip() for line in readme.splitlines()
                   if line.strip().startswith("python3 -m venv") and "pytest" in line)
    steps = [step.strip() for step in command.split("&&")]
    tests = [step for step in steps if step.startswith("python -m pytest")]
    assert len(tests) == 2 and "-m \"not slow\"" in tests[0] and "-m slow" in tests[1]  # both tiers: everything
    for step in steps:
        if step.startswith("pip install"):
            assert step.removeprefix("pip install").strip() in ci, f".ci/run lacks `{step}`"
    for step in tests:
        assert f"\n{step}\n" in ci, f".ci/run lacks `{step}`"


def test_the_spec_page_is_made_without_torch_or_ray():
    code = ("import sys\nfor m in ('torch', 'ray', 'deepspeed', 'transformers'): sys.modules[m] = None\n"
            "from lora_dist import specdoc\nprint(len(specdoc.render()) > 0)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr[-3000:]


def test_the_readme_sdk_example_is_python():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks and "from lora_dist import Client" in blocks[0]
    assert len(blocks[0].strip().splitlines()) <= 10
    compile(blocks[0], "README.md", "exec")
