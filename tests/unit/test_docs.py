"""The generated references in docs/ match the code, and every config field is documented."""

from __future__ import annotations

import os
from dataclasses import fields

import pytest

from policylong import cli, config

DOCS = os.path.join(os.path.dirname(__file__), "..", "..", "docs")


@pytest.mark.parametrize(
    "name, render",
    [("cli.md", cli.reference_markdown), ("configuration.md", config.reference_markdown)],
)
def test_generated_docs_are_current(name, render):
    path = os.path.join(DOCS, name)
    committed = open(path, encoding="utf-8").read() if os.path.isfile(path) else None
    assert committed == render(), f"docs/{name} is out of date: run `python docs/generate.py`"


def test_every_config_field_has_a_docstring():
    docs = config._field_docs()
    sections = [("", config.Config), *config._SECTIONS.items()]
    missing = [
        f"{key + '.' if key else ''}{f.name} ({cls.__name__})"
        for key, cls in sections
        for f in fields(cls)
        if f.name not in config._SECTIONS and not docs.get(cls.__name__, {}).get(f.name)
    ]
    assert not missing, f"config fields without a docstring in policylong/config.py: {missing}"
