"""Every command the README and the config headers show composes with the real configs.

Commands are read from the README (code blocks and inline code) and from the comment lines of
`configs/**/*.yaml`: `python train.py | eval.py | manipulate.py ...`, `python -m semani.app ...`
and `torchrun ... eval.py ...`, with their `\\` continuation lines. Placeholders (`<run>`) become
a path, `...` is dropped, a multirun (`-m a=1,2 b=x,y`) is composed once per combination.
"""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import pytest

from tests.conftest import CONFIG_DIR, REPO_ROOT, compose

ENTRY = {"train.py": "train", "eval.py": "eval", "manipulate.py": "manipulate",
         "semani.app": "app"}  # fmt: skip
START = re.compile(r"(?:^|\s)((?:OMP_NUM_THREADS=\d+ )?(?:python|torchrun)\s.*)$")


def _comment_lines() -> list[tuple[str, str]]:
    out = []
    for f in sorted(CONFIG_DIR.rglob("*.yaml")):
        lines = [ln[1:].strip() for ln in f.read_text().splitlines() if ln.startswith("#")]
        out.append((str(f.relative_to(REPO_ROOT)), "\n".join(lines)))
    return out


def _readme_snippets() -> list[tuple[str, str]]:
    text = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    inline = re.findall(r"`((?:python|torchrun|OMP_NUM_THREADS)[^`]*)`", text.replace("\n", " "))
    return [("README.md", b) for b in blocks] + [("README.md", i) for i in inline]


def _commands() -> list[tuple[str, str]]:
    """(where, command) for every documented command that runs one of our entry points."""
    found = []
    for where, text in [*_readme_snippets(), *_comment_lines()]:
        lines = text.splitlines()
        i = 0
        while i < len(lines):
            m = START.search(lines[i])
            i += 1
            if not m:
                continue
            cmd = m.group(1)
            while cmd.rstrip().endswith("\\") and i < len(lines):
                cmd = cmd.rstrip()[:-1] + " " + lines[i].strip()
                i += 1
            cmd = re.split(r"\s+#\s", cmd)[0]  # a trailing comment
            if any(e in cmd for e in ENTRY):
                found.append((where, cmd.strip()))
    return sorted(set(found))


COMMANDS = _commands()


# a placeholder that stands for a group option: an option of that group
OPTIONS = {"experiment": "vqgan_shapes", "method": "semani_diff", "data": "cub"}


def _fill(match: re.Match) -> str:
    key = match.group(1)
    return f"{key}={OPTIONS[key]}" if key in OPTIONS else f"{key}=/x"


def _overrides(cmd: str) -> tuple[str, list[list[str]]]:
    """(config name, override lists: one per multirun combination)."""
    cmd = re.sub(r"([\w./]+)=<[^>]*>", _fill, cmd)
    cmd = re.sub(r"<[^>]*>", "/x", cmd).replace("...", " ")
    braces = re.compile(r"(\w+)_\{([\w,]+)\}")  # a_{b,c}: a_b and a_c
    expanded = braces.sub(
        lambda m: ",".join(f"{m.group(1)}_{v}" for v in m.group(2).split(",")), cmd
    )
    tokens = shlex.split(expanded)
    entry = next(e for t in tokens for e in ENTRY if t.endswith(e))
    after = tokens[next(i for i, t in enumerate(tokens) if t.endswith(entry)) + 1 :]
    multirun = "-m" in after or "--multirun" in after or expanded != cmd
    args = [t for t in after if "=" in t and not t.startswith("-")]
    if not multirun:
        return ENTRY[entry], [args]
    choices = [
        [f"{k}={v}" for v in vals.split(",")] for k, vals in (a.split("=", 1) for a in args)
    ]
    return ENTRY[entry], [list(c) for c in itertools.product(*choices)]


def test_commands_are_found() -> None:
    where = {w for w, _ in COMMANDS}
    assert len(COMMANDS) > 40 and "README.md" in where
    assert any("protocol=table1" in c for _, c in COMMANDS)
    assert any(c.startswith("python -m semani.app") for _, c in COMMANDS)


@pytest.mark.parametrize("where, command", COMMANDS)
def test_documented_command_composes(where: str, command: str, tmp_path: Path) -> None:
    config, runs = _overrides(command)
    for overrides in runs:
        overrides = [o for o in overrides if not o.startswith("hydra.")]  # run dirs, launchers
        compose(config, overrides, tmp_path)  # an unknown key or group option raises
