"""The README's example case is a real case: the file the suite runs, word for word."""

from __future__ import annotations

import re

from tests.conftest import REPO


def test_readme_example_is_cases_test_example() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Writing a case", 1)[1]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m is not None, "README's 'Writing a case' has no python block"
    assert m.group(1) == (REPO / "cases" / "test_example.py").read_text()
