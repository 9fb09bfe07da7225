"""Where the alerts' `runbook_url` annotations point.

deploy/prometheus/rules/alerts.yml names each alert's section of docs/runbook.md with a path
relative to the repository (`docs/runbook.md#<anchor>`), which is right for someone reading the
rules next to the code but is no link an on-call engineer can open from Alertmanager or Grafana.
Where the documentation is published, the rules are rendered with that site's address instead
(`RUNBOOK_BASE_URL`): only the base changes, the anchors stay the headings of docs/runbook.md.
The rules are rewritten as text, not loaded and dumped again, so their comments and layout survive.
"""

from __future__ import annotations

import json
import re

# The base the committed rules use: the page's path in the repository.
DEFAULT_BASE = "docs/runbook.md"
# The environment variable a renderer reads the published runbook's address from.
RUNBOOK_BASE_URL = "RUNBOOK_BASE_URL"

# `runbook_url: BASE#ANCHOR`, plain or quoted, as a YAML mapping entry of its own line.
_ANNOTATION = re.compile(
    r"""^(?P<key>[ \t]*(?:-[ \t]+)?runbook_url:[ \t]*)
    (?P<quote>["']?)(?P<base>[^"'\#\s]*)\#(?P<anchor>[\w-]+)(?P=quote)[ \t]*$""",
    re.MULTILINE | re.VERBOSE,
)
# A value YAML reads back as the same plain string: no spaces, no indicator character first.
_PLAIN = re.compile(r"[A-Za-z0-9._~/][\w.~:/?&=%+@!$;,()#-]*")


def runbook_url(anchor: str, base: str = DEFAULT_BASE) -> str:
    """The link to one alert's section: `base#anchor`."""
    _check_base(base)
    return f"{base}#{anchor}"


def with_base(rules_text: str, base: str) -> str:
    """The rules file's text with every `runbook_url` pointing at `base` instead of its current base.

    `base` is the runbook page's address, without an anchor: `https://docs.example.org/runbook/`
    gives `https://docs.example.org/runbook/#tornadohigh5xxratio`. Every other line is kept as it
    is, and DEFAULT_BASE gives the committed text back. Raises ValueError when `base` is empty or
    holds a `#` or whitespace, or when the text has no `runbook_url` at all (a renamed annotation
    would otherwise leave the links silently unrewritten).
    """
    _check_base(base)
    rewritten, count = _ANNOTATION.subn(lambda match: _line(match, base), rules_text)
    if not count:
        raise ValueError("no runbook_url annotation to rewrite")
    return rewritten


def anchors(rules_text: str) -> list[str]:
    """The anchor of every `runbook_url` in the rules file's text, in file order."""
    return [match["anchor"] for match in _ANNOTATION.finditer(rules_text)]


def _line(match: re.Match[str], base: str) -> str:
    url = f"{base}#{match['anchor']}"
    if match["quote"] or not _PLAIN.fullmatch(url):
        url = json.dumps(url)  # a JSON string is a YAML double-quoted scalar
    return f"{match['key']}{url}"


def _check_base(base: str) -> None:
    if not base or "#" in base or any(char.isspace() for char in base):
        raise ValueError(f"runbook base must be a page address without an anchor or spaces: {base!r}")
