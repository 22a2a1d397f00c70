"""What the console serves, checked at rest: templates that could not run script of
their own (the Content-Security-Policy would refuse it and log an error), and the vendored
JavaScript unchanged."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from conveyor.console.web import HERE

TEMPLATES = sorted((HERE / "templates").glob("*.html"))
VENDOR = HERE / "static" / "vendor"


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_no_inline_script_style_or_handler(template: Path) -> None:
    text = template.read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)", text), "inline <script>"
    assert "<style" not in text and not re.search(r"\sstyle=", text), "inline style"
    assert not re.search(r"\son[a-z]+\s*=", text, re.IGNORECASE), "inline event handler"
    assert "javascript:" not in text.lower()
    assert "|safe" not in text.replace(" ", "") and "autoescape false" not in text
    assert not re.search(r"https?://", text), "nothing from another site"


def test_the_vendored_javascript_is_what_its_readme_says() -> None:
    readme = (VENDOR / "README.txt").read_text()
    listed = dict(
        (name, digest)
        for digest, name in re.findall(r"^([0-9a-f]{64})  (\S+)$", readme, re.MULTILINE)
    )
    files = {p.name for p in VENDOR.glob("*.js")}
    assert set(listed) == files
    for name, digest in listed.items():
        assert hashlib.sha256((VENDOR / name).read_bytes()).hexdigest() == digest, name
    base = (HERE / "templates" / "base.html").read_text()
    for name in files:
        assert f'src="/static/vendor/{name}"' in base
