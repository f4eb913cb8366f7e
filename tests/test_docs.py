"""The newcomer's view: every script's --help within 100 columns, the README's first screen and its map of docs/,
links that lead somewhere, an install that puts no module of ours into site-packages, and model.py and train.py
short enough to read (issue 30's sizes).

    python -m pytest tests/test_docs.py
"""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from config import fit_text

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.relative_to(REPO).as_posix() for p in REPO.rglob("*.py")
                 if p.parts[len(REPO.parts)] not in ("tests", ".git") and "def main(argv" in (text := p.read_text())
                 and 'if __name__ == "__main__":' in text)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_scripts_help_fits_in_100_columns(script: str, capsys: pytest.CaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Every script with a main(argv): its --help, the module docstring included, as a terminal shows it."""
    name = f"help_of_{script.replace('/', '_')[:-3]}"
    spec = importlib.util.spec_from_file_location(name, REPO / script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    except SystemExit as e:  # an optional extra missing (serve.py without starlette): its own one line
        pytest.skip(f"{script} does not import here: {e}")
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code in (0, None)
    shown = capsys.readouterr().out
    assert "--" in shown and len(shown.splitlines()) > 3, shown
    wide = [line for line in shown.splitlines() if len(line) > 100]
    assert not wide, f"{script} --help has {len(wide)} line(s) over 100 columns: {wide[0]!r}"


def test_fit_text_keeps_what_fits_and_breaks_what_does_not() -> None:
    prose = "word " * 40
    commands = ("    python train.py configs/a.toml" + " " * 50 + "# a comment that is long enough to go over\n"
                "                                                              # and its continuation\n"
                "    python train.py --help  # short\n")
    text = f"Short line.\n\n{prose.strip()}\n\n{commands}"
    fitted = fit_text(text, 80)
    assert all(len(line) <= 80 for line in fitted.splitlines())
    assert fitted.startswith("Short line.\n\n")
    assert " ".join(fitted.split()).count("word") == 40  # nothing lost from the prose
    lines = fitted.splitlines()
    at = lines.index("    python train.py configs/a.toml")
    assert lines[at - 1] == "    # a comment that is long enough to go over and its continuation"
    assert lines[at + 1:at + 3] == ["    # short", "    python train.py --help"]
    long_command = "    torchrun " + " ".join(f"--option_{i}=value" for i in range(8))
    broken = fit_text(long_command, 60).splitlines()
    assert all(len(line) <= 60 for line in broken) and all(line.endswith(" \\") for line in broken[:-1])
    assert " ".join(line.rstrip("\\ ").strip() for line in broken) == long_command.strip()  # the same command
    assert fit_text("fits\n  as it is   # kept", 80) == "fits\n  as it is   # kept"
    quoted = fit_text('    python attention.py --init_from=gpt2 --text="The animal did not cross the street"', 60)
    assert quoted.splitlines()[1] == '        --text="The animal did not cross the street"'  # never inside quotes


def test_readme_first_screen_maps_every_doc() -> None:
    """Install, quick start, the test command and a map in which every docs/*.md has a line of its own."""
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 50
    for heading in ("## Install", "## Quick start", "## Tests", "## Where everything else is"):
        assert heading in readme
    assert "\n    python -m pytest -q\n" in readme
    mapped = re.findall(r"^- \[?(docs/[\w.-]+\.md)", readme, flags=re.M)
    assert sorted(set(mapped)) == sorted(mapped), "a doc mapped twice"
    for doc in sorted(REPO.glob("docs/*.md")):
        assert doc.relative_to(REPO).as_posix() in mapped, f"README's map has no line for {doc.name}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in REPO.glob("docs/*.md"))])
def test_links_lead_somewhere(page: str) -> None:
    """Every relative link of README.md and docs/*.md names a file that exists, and a heading there if it has #."""
    text = (REPO / page).read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (REPO / page).parent / path if path else REPO / page
        assert file.exists(), f"{page}: the link to {target} leads nowhere"
        if anchor and file.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", file.read_text(), flags=re.M)
            assert anchor in {_slug(h) for h in headings}, f"{page}: {target} names no heading of {path or page}"


def test_install_puts_no_module_into_site_packages(tmp_path: Path) -> None:
    """The wheel `pip install .` would install holds metadata only: none of the flat names (model, config, train,
    eval, ...) that would shadow other projects' modules in a shared site-packages. Built from a copy, offline."""
    setuptools = pytest.importorskip("setuptools")
    assert setuptools
    src = tmp_path / "src"
    src.mkdir()
    for path in [REPO / "pyproject.toml", REPO / "README.md", *REPO.glob("*.py")]:
        (src / path.name).write_bytes(path.read_bytes())
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(tmp_path / "wheel"), str(src)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("smallgpt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert names and all(name.startswith("smallgpt-") and ".dist-info/" in name for name in names), names
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Requires-Dist: torch" in metadata and "Provides-Extra: test" in metadata


# What a newcomer reads first stays nanoGPT-sized: issue 30's limits, in lines
READING_LIMITS = {"model.py": 500, "train.py": 650}


def reading_size_problems(name: str, text: str) -> list[str]:
    """Where a file breaks the reading limits: its length, a function over 100 lines, and in model.py the attention
    in the first 200 lines and the plain KV cache under 40."""
    problems = [f"{name} has {len(text.splitlines())} lines, more than {READING_LIMITS[name]}: move a helper to the "
                f"file of its callers (docs/structure.md)"] if len(text.splitlines()) > READING_LIMITS[name] else []
    for node in ast.walk(ast.parse(text)):
        size = node.end_lineno - node.lineno + 1 if hasattr(node, "end_lineno") else 0
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and size > 100:
            problems.append(f"{name}: {node.name} has {size} lines, more than 100")
        if name == "model.py" and isinstance(node, ast.ClassDef):
            if node.name == "CausalSelfAttention" and node.lineno > 200:
                problems.append(f"model.py: the attention starts at line {node.lineno}, after the first 200")
            if node.name == "KVCache" and size > 40:
                problems.append(f"model.py: KVCache has {size} lines, more than 40")
    return problems


@pytest.mark.parametrize("name", sorted(READING_LIMITS))
def test_the_core_files_stay_short_enough_to_read(name: str) -> None:
    assert reading_size_problems(name, (REPO / name).read_text()) == []
