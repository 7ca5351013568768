"""The support matrix, generated from the registered converters (so the docs cannot drift)."""
from __future__ import annotations


def support_rows() -> list[dict]:
    from converters import all_converters

    rows = []
    for c in all_converters():
        rows.extend(c.support())
    return rows


def support_table() -> str:
    rows = support_rows()
    cols = ["format", "bits", "group_size", "sym", "dequant", "notes"]
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    line = lambda r: "  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols).rstrip()  # noqa: E731
    out = [line({c: c for c in cols}), "  ".join("-" * widths[c] for c in cols)]
    out += [line(r) for r in rows]
    return "\n".join(out)
