"""A griffe extension for the documentation site: read paramreg's reStructuredText-flavoured
docstrings as the Markdown that mkdocstrings renders, without changing the source.

- ``Example:`` sections become ``Examples:``, so that griffe renders their ``>>>`` lines as
  code (a singular ``Example:`` is an admonition of Markdown, where ``>>>`` reads as a quote);
- Sphinx roles (``:class:`X```, ``:func:`X```, ...) become inline code;
- a line ending in ``::`` (the reStructuredText marker of the indented literal block below it)
  ends in ``:``; the indented block is a Markdown code block as it is.
"""

import re

import griffe

_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`~?([^`]+)`")
_LITERAL = re.compile(r"::$", flags=re.M)
_EXAMPLE = re.compile(r"^(\s*)Example:$", flags=re.M)


def markdown(text: str) -> str:
    text = _ROLE.sub(r"`\1`", text)
    text = _LITERAL.sub(":", text)
    return _EXAMPLE.sub(r"\1Examples:", text)


class RstToMarkdown(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
