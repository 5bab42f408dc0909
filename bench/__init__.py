"""Benchmarks: each prints a table and writes JSON."""


def write_json(path, doc: dict, indent: int = 2) -> None:
    """Write a benchmark's JSON document, making its folder."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=indent))


def machine() -> str:
    """The CPU a figure was measured on, for the JSON."""
    import platform

    return f"{platform.machine()} {platform.processor() or ''}".strip()
