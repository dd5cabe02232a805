"""The README's code blocks marked ``<!-- readme-test: NAME -->`` run as tests, as a user's
own test file would (a fresh pytest process, the installed plugin, no conftest of ours)."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).parents[1] / "README.md"
BLOCK = re.compile(r"<!-- readme-test: (\S+) -->\n```python\n(.*?)```", re.DOTALL)


def blocks() -> dict[str, str]:
    return dict(BLOCK.findall(README.read_text("utf-8")))


def test_the_readme_has_runnable_blocks() -> None:
    assert set(blocks()) >= {"fixture", "faults"}


@pytest.mark.parametrize("name", sorted(blocks()))
def test_a_readme_block_passes_as_a_users_test(name: str, tmp_path: pathlib.Path) -> None:
    (tmp_path / f"test_readme_{name}.py").write_text(blocks()[name], "utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o",
         "asyncio_mode=auto", "-o", "asyncio_default_fixture_loop_scope=function", "-W",
         "error", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
