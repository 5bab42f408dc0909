"""Training text for learned scorers: the docstrings of Python's standard library.

Real English prose that every machine with Python has, offline, and that the quality
benchmark never reads (it owns CPython's pydoc topics, Lib/pydoc_data/topics.py, the
language reference; these are the library modules' own docstrings). Each module gives one
corpus: its docstring, then every public class and function with its docstring and its
methods' docstrings, in name order, so the same Python version gives the same text.
"""

from __future__ import annotations

import importlib
import inspect

MODULES = (
    "argparse", "asyncio.base_events", "asyncio.streams", "base64", "bdb", "calendar", "cmd", "codecs",
    "collections", "concurrent.futures._base", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "doctest", "email.message", "email.utils", "enum", "filecmp",
    "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "heapq", "hmac",
    "html.parser", "http.client", "http.cookiejar", "http.server", "imaplib", "inspect", "io",
    "ipaddress", "json", "locale", "logging", "logging.handlers", "lzma", "mailbox", "mimetypes",
    "multiprocessing.pool", "netrc", "numbers", "operator", "optparse", "os", "pathlib", "pdb", "pickle",
    "pickletools", "plistlib", "poplib", "pprint", "queue", "random", "re", "sched", "secrets",
    "selectors", "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver", "sqlite3", "ssl",
    "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit",
    "tokenize", "trace", "traceback", "types", "typing", "unittest.case", "unittest.mock",
    "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile", "zipimport",
)


def module_text(name: str) -> str:
    """One module's documentation as plain text ('' when the module cannot be imported)."""
    try:
        mod = importlib.import_module(name)
    except Exception:  # an optional stdlib module missing on this build: skip it
        return ""
    parts = [f"{name}\n\n{inspect.cleandoc(mod.__doc__ or '')}"]
    for attr in sorted(n for n in vars(mod) if not n.startswith("_")):
        obj = getattr(mod, attr)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)) or getattr(obj, "__module__", None) != mod.__name__:
            continue
        doc = inspect.getdoc(obj)
        if doc:
            parts.append(f"{attr}\n{doc}")
        if inspect.isclass(obj):
            for meth in sorted(n for n in vars(obj) if not n.startswith("_")):
                mdoc = inspect.getdoc(vars(obj)[meth]) if callable(vars(obj)[meth]) else None
                if mdoc:
                    parts.append(f"{attr}.{meth}\n{mdoc}")
    return "\n\n".join(p.strip() for p in parts if p.strip())


def training_documents(tokenizer, count: int, min_tokens: int = 700, max_tokens: int = 1600) -> list[str]:
    """`count` documents, each a run of about 700-1,600 tokens of one module's text, cut at a line end.

    Lengths cycle through [min_tokens, max_tokens] so the scorer sees short and long segments;
    modules are visited in order, a long module gives several documents.
    """
    docs: list[str] = []
    lengths = [min_tokens + (max_tokens - min_tokens) * i // 7 for i in range(8)]
    for name in MODULES:
        text = module_text(name)
        ids = tokenizer(text, add_special_tokens=False).input_ids if text else []
        at = 0
        while len(ids) - at >= min_tokens and len(docs) < count:
            n = lengths[len(docs) % len(lengths)]
            cut = tokenizer.decode(ids[at : at + n])
            if "\n" in cut[len(cut) // 2 :]:
                cut = cut[: cut.rfind("\n")]
            docs.append(cut.strip())
            at += len(tokenizer(cut, add_special_tokens=False).input_ids)
        if len(docs) >= count:
            break
    return docs
