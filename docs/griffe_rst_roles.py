"""Griffe extension for the docs build: turn Sphinx roles in docstrings into Markdown.

The package's docstrings follow numpydoc and cross-reference with Sphinx roles
(``:func:`certify```, ``:class:`~matplotlib.figure.Figure```), which mkdocstrings would print
verbatim. This extension rewrites each role, once the package is loaded:

* into a cross-reference link when the target resolves (relative to the object, its class or
  module, or the package root) to a public object of a module listed in ``linked``, i.e. one
  that the API page renders and so gives an anchor;
* into inline code otherwise (external names such as numpy or matplotlib objects).

Configured in ``mkdocs.yml`` under the python handler's ``extensions`` option.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

import griffe

_ROLE = re.compile(
    r":(?:py:)?(?P<role>func|meth|class|mod|attr|data|obj|exc|const|term):"
    r"`(?P<body>[^`]+)`"
)
_TITLED = re.compile(r"^(?P<title>.*?)\s*<(?P<target>[^>]+)>$")


def _walk(obj: griffe.Object) -> Iterator[griffe.Object]:
    yield obj
    for member in obj.members.values():
        if member.is_alias:
            continue
        yield from _walk(member)


class RstRoles(griffe.Extension):
    """Rewrite Sphinx roles in the docstrings of a loaded package.

    Parameters
    ----------
    linked : sequence of str
        Dotted module paths whose public objects are rendered by the API reference; roles
        pointing into them become links, all others inline code.
    """

    def __init__(self, linked: Sequence[str] = ()) -> None:
        super().__init__()
        self.linked = tuple(linked)
        self._public: set[str] = set()

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        objects = list(_walk(pkg))
        self._public = set()
        for obj in objects:
            if obj.is_module and obj.path in self.linked:
                self._public.add(obj.path)
                for name, member in obj.members.items():
                    if name.startswith("_") or (member.is_alias and not obj.is_package):
                        continue
                    if member.is_module and member.path not in self.linked:
                        continue  # submodules are not rendered on their parent's page
                    self._public.add(member.path)
                    if member.is_class and not member.is_alias:
                        self._public.update(
                            m.path for n, m in member.members.items() if not n.startswith("_")
                        )
        for obj in objects:
            if obj.docstring is not None:
                obj.docstring.value = _ROLE.sub(
                    lambda match, obj=obj: self._replace(match, obj), obj.docstring.value
                )

    def _resolve(self, target: str, obj: griffe.Object) -> str | None:
        scopes = [obj.path]
        parent = obj.parent
        while parent is not None:
            scopes.append(parent.path)
            parent = parent.parent
        candidates = [target] + [f"{scope}.{target}" for scope in scopes]
        for candidate in candidates:
            if candidate in self._public:
                return candidate
        return None

    def _replace(self, match: re.Match, obj: griffe.Object) -> str:
        role, body = match["role"], match["body"].strip()
        titled = _TITLED.match(body)
        title, target = (titled["title"], titled["target"]) if titled else (None, body)
        short = target.startswith("~")
        target = target.lstrip("~.")
        if title is None:
            title = target.rsplit(".", 1)[-1] if short else target
            if role in ("func", "meth"):
                title += "()"
        path = self._resolve(target, obj) if role != "term" else None
        return f"[`{title}`][{path}]" if path else f"`{title}`"
