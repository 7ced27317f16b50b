"""Write docs/cli.md and docs/configuration.md from the code: ``python docs/generate.py``.

Both files are generated, never edited by hand; tests/unit/test_docs.py fails when they differ
from what this script writes.
"""

from __future__ import annotations

import os

from policylong import cli, config

DOCS = os.path.dirname(os.path.abspath(__file__))
GENERATED = {"cli.md": cli.reference_markdown, "configuration.md": config.reference_markdown}


def main() -> None:
    for name, render in GENERATED.items():
        with open(os.path.join(DOCS, name), "w", encoding="utf-8") as f:
            f.write(render())
        print(f"wrote docs/{name}")


if __name__ == "__main__":
    main()
