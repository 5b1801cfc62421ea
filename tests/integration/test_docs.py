"""Docs that cannot rot: every ``python train.py ...``, ``python evaluate.py ...`` and
``scripts/...`` command in README.md and docs/*.md composes (Hydra, in this process, no model
loads), every repository file a command, a code span or a link names exists, links land on a
heading, the quickstart's commands are what CI runs, and no doc names a path of a development
machine."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from relift_pl.cli import compose_config, unknown_override_message

ROOT = Path(__file__).resolve().parents[2]
GUIDES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # docs/results/: study output
ALL_DOCS = [*GUIDES, *sorted((ROOT / "docs" / "results").glob("*.md"))]
ENTRY_POINTS = {"train.py": "train", "evaluate.py": "evaluate"}
HYDRA_SCRIPTS = ("scripts/",)  # their key=value arguments are train.py overrides
# What a run, a benchmark or a GPU preparation writes: not in a fresh clone.
BUILT = ("outputs/", ".cache/", ".trlbench/", ".gpu/", ".venv")
REPO_ENTRIES = sorted(p.name for p in ROOT.iterdir() if not p.name.startswith(".") and p.name not in ("outputs",))
MACHINE_PATH = re.compile(r"(?<![\w.~])/(?:work|tmp|root)/")
PLACEHOLDER = "PLACEHOLDER"


@dataclass(frozen=True)
class Command:
    where: str  # doc:line
    script: str  # train.py, evaluate.py, scripts/..., benchmarks/...
    args: tuple[str, ...]

    @property
    def config(self) -> str | None:
        """The Hydra config its ``key=value`` arguments override (None: not a Hydra script)."""
        name = Path(self.script).name
        if name in ENTRY_POINTS:
            return ENTRY_POINTS[name]
        return "train" if self.script.startswith(HYDRA_SCRIPTS) else None

    @property
    def overrides(self) -> list[str]:
        return [a for a in self.args if not a.startswith("-") and ("=" in a or a.startswith("~"))]


def _code_blocks(text: str, shell_only: bool = False) -> list[tuple[int, str]]:
    """(first line number, body) of each fenced block; ``shell_only``: not ```text blocks (a
    program's output, a file tree)."""
    return [(text.count("\n", 0, m.start(2)) + 1, m.group(2))
            for m in re.finditer(r"^```([a-z]*)\n(.*?)^```", text, re.S | re.M)
            if not shell_only or m.group(1) in ("", "bash", "sh", "shell")]  # fmt: skip


def _snippets(text: str) -> list[tuple[int, str]]:
    """(line, shell text) of each code-block line (continuations joined, comments cut) and each
    inline code span."""
    found = []
    for first, body in _code_blocks(text, shell_only=True):
        joined = re.sub(r"\\\n\s*", " ", body)
        for offset, line in enumerate(joined.splitlines()):
            found.append((first + offset, line))
    prose = re.sub(r"^```[a-z]*\n.*?^```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S | re.M)
    for m in re.finditer(r"`([^`]+)`", prose):
        found.append((prose.count("\n", 0, m.start()) + 1, m.group(1).replace("\n", " ")))
    return found


def _words(shell: str) -> list[list[str]]:
    """The simple commands of a line of shell, placeholders (``<out dir>``) made plain words."""
    shell = re.sub(r"(?:^|(?<=\s))#.*$", "", shell)  # a comment
    shell = re.sub(r"(?:(?<=\s)|^)<[^<>]*>(?=\s|$)", " ", shell)  # a stand-alone placeholder
    shell = re.sub(r"<[^<>]*>", PLACEHOLDER, shell)  # inside a word: outputs/<date>/<time>
    commands = []
    for part in re.split(r"&&|\|\||[;|&]", shell):
        try:
            words = shlex.split(part)
        except ValueError:  # unbalanced quotes: prose in a code span
            continue
        cut = next((i for i, w in enumerate(words) if w in (">", ">>", "2>", "<")), len(words))
        commands.append(words[:cut])
    return commands


def _script_index(words: list[str]) -> int | None:
    for i, word in enumerate(words):
        if Path(word).name in ENTRY_POINTS or word.startswith(("scripts/", "benchmarks/")):
            return i
    return None


def commands_in(text: str, doc: str = "doc") -> list[Command]:
    """Every train.py / evaluate.py / scripts/ / benchmarks/ command in a markdown text."""
    found = []
    for line, shell in _snippets(text):
        for words in _words(shell):
            i = _script_index(words)
            if i is not None:
                found.append(Command(f"{doc}:{line}", words[i], tuple(words[i + 1:])))
    return found


def repo_paths_in(text: str) -> list[tuple[int, str]]:
    """(line, path) of every repository path a code span, a command word or a link names."""
    found = []
    for line, shell in _snippets(text):
        for words in _words(shell):
            for word in words:
                found += [(line, p) for p in re.split(r"[=,]", word) if _is_repo_path(p)]
    return found


def _is_repo_path(word: str) -> bool:
    word = word.strip("'\"():;.")
    return ("/" in word and word.split("/", 1)[0] in REPO_ENTRIES and PLACEHOLDER not in word
            and not any(c in word for c in "*{}$@")) or word in ("train.py", "evaluate.py")  # fmt: skip


def _exists(path: str) -> bool:
    return (ROOT / path.strip("'\"():;.").rstrip("/")).exists()


def compose_problem(command: Command) -> str | None:
    """Why the command's overrides do not compose (None when they do)."""
    if command.config is None:
        return None
    GlobalHydra.instance().clear()
    try:
        compose_config(command.config, command.overrides)
    except (HydraException, OmegaConfBaseException) as err:
        message = unknown_override_message(command.overrides, command.config)
        return message or " ".join(str(err).split())
    return None


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def link_problems(doc: Path, root: Path = ROOT) -> list[str]:
    """Relative links whose file does not exist or whose anchor is no heading there."""
    problems = []
    text = doc.read_text()
    for m in re.finditer(r"\]\(([^)\s]+)\)", text):
        target = m.group(1)
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        line = text.count("\n", 0, m.start()) + 1
        if not path.exists():
            problems.append(f"{doc.relative_to(root)}:{line}: {target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            problems.append(f"{doc.relative_to(root)}:{line}: {target}: no such heading")
    return problems


# -- the docs as they are ---------------------------------------------------------------------
def _all_commands() -> list[Command]:
    return [c for doc in GUIDES for c in commands_in(doc.read_text(), str(doc.relative_to(ROOT)))]


def test_the_docs_have_commands_to_check():
    commands = _all_commands()
    assert len([c for c in commands if c.config]) >= 40, len(commands)
    assert {"train", "evaluate"} <= {c.config for c in commands}


def test_every_command_in_the_docs_composes():
    problems, composed = [], {}
    for c in _all_commands():
        key = (c.config, tuple(c.overrides))  # many commands repeat: compose each once
        if key not in composed:
            composed[key] = compose_problem(c)
        if composed[key]:
            problems.append(f"{c.where}: {c.script} {' '.join(c.args)}: {composed[key]}")
    assert not problems, "\n".join(problems)


def test_every_file_the_docs_name_exists():
    missing = [f"{doc.relative_to(ROOT)}:{line}: {path}" for doc in GUIDES
               for line, path in repo_paths_in(doc.read_text())
               if not path.startswith(BUILT) and not _exists(path)]  # fmt: skip
    missing += [problem for doc in GUIDES for problem in link_problems(doc)]
    assert not missing, "\n".join(missing)


def test_no_doc_names_a_path_of_a_development_machine():
    found = [f"{doc.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}..."
             for doc in ALL_DOCS for text in [doc.read_text()] for m in MACHINE_PATH.finditer(text)]  # fmt: skip
    assert not found, "docs name repository paths only:\n" + "\n".join(found)


def test_ci_runs_the_quickstart_commands_verbatim():
    readme = (ROOT / "README.md").read_text()
    quickstart = readme[readme.index("## Quickstart"):]
    _, block = _code_blocks(quickstart)[0]
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert len(commands) == 2 and all(command in ci for command in commands), commands


# -- that the checks find what they are for ---------------------------------------------------
ROTTEN = """
Resume with `python train.py algorithm.group_sise=4 ckpt_path=last`:

```bash
python evaluate.py run_dir=outputs/<date>/<time> callbacks.evaluaton.k=8   # a typo
torchrun --nnodes 2 train.py trainer=multinode trainer.num_nodez=2 \\
  trainer.devices=8
python scripts/plan_memroy.py experiment=relift_qwen_math_7b
```
"""


def test_a_misspelled_key_or_file_in_a_doc_is_found():
    commands = commands_in(ROTTEN)
    assert [(c.script, c.overrides) for c in commands] == [
        ("evaluate.py", ["run_dir=outputs/PLACEHOLDER/PLACEHOLDER", "callbacks.evaluaton.k=8"]),
        ("train.py", ["trainer=multinode", "trainer.num_nodez=2", "trainer.devices=8"]),
        ("scripts/plan_memroy.py", ["experiment=relift_qwen_math_7b"]),
        ("train.py", ["algorithm.group_sise=4", "ckpt_path=last"]),
    ]
    problems = [compose_problem(c) for c in commands]
    assert problems[0].startswith("callbacks.evaluaton is not a key of callbacks; did you mean evaluation?")
    assert problems[1].startswith("trainer.num_nodez is not a key of trainer; did you mean num_nodes?")
    assert problems[2] is None  # it composes; the file check finds it
    assert problems[3].startswith("algorithm.group_sise is not a key of algorithm; did you mean group_size?")
    missing = [p for _, p in repo_paths_in(ROTTEN) if not p.startswith(BUILT) and not _exists(p)]
    assert missing == ["scripts/plan_memroy.py"]


def test_a_broken_link_and_a_machine_path_are_found(tmp_path):
    doc = tmp_path / "guide.md"
    doc.write_text("# A guide\n\nSee [the recipe](recipe.md#no-such-heading) and [here](#a-guide),\n"
                   "[gone](gone.md); rules in /work/shared/STUDY.md.\n")  # fmt: skip
    (tmp_path / "recipe.md").write_text("# The recipe\n")
    problems = link_problems(doc, root=tmp_path)
    assert problems == ["guide.md:3: recipe.md#no-such-heading: no such heading", "guide.md:4: gone.md: no such file"]
    assert [m.group(0) for m in MACHINE_PATH.finditer(doc.read_text())] == ["/work/"]


@pytest.mark.parametrize(("heading", "anchor"), [
    ("Why vLLM cannot reach 2x on this workload", "why-vllm-cannot-reach-2x-on-this-workload"),
    ("The paper's recipe on 8 GPUs", "the-papers-recipe-on-8-gpus"),
    ("Preemption: SIGTERM and SIGINT", "preemption-sigterm-and-sigint"),
])  # fmt: skip
def test_anchors_follow_githubs_rule(heading, anchor):
    assert _slug(heading) == anchor
