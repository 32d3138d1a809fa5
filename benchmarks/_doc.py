"""Writing one benchmark's section of docs/benchmarks.md without touching the others."""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def replace_section(heading: str, text: str, path: Path = DOC) -> None:
    """Replace the section that starts with the line `heading` (or append it), keeping the rest.

    A section runs from its `## ` heading line to the next `## ` heading or the end of the file.
    `text` must start with `heading`.
    """
    existing = path.read_text() if path.is_file() else "# Benchmarks\n"
    lines = existing.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    if start is None:
        updated = existing.rstrip("\n") + "\n\n" + text
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        tail = "".join(lines[end:])
        updated = "".join(lines[:start]) + text + ("\n" + tail if tail else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(updated)
