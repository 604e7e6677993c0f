"""An executable's docopt usage, taken apart: its patterns, and the help of one `coi`
command cut out of it.

Every executable has one docstring for all its verbs (`coi-slot next ... end ... list
...`). A person who typed `coi list --help` wants `coi list` only: its usage lines with
`coi` as the program, what it does (its `Commands:` entry), its flags (their `Options:`
entries, defaults included) and its examples. Argument errors (coi_common.entry) pick
the command the same way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final, NamedTuple

USAGE_WIDTH: Final = 100
COMMAND_WORD: Final = re.compile(r"(\[)?(?P<word>[a-z][a-z0-9-]*)(?(1)\])")
"""A command word of a usage pattern, required (`list`) or optional (`[network]`)."""
OPTION_VALUE: Final = re.compile(r"[A-Z][A-Z0-9_]*(=[A-Z][A-Z0-9_]*)?")
OPTION_NAME: Final = re.compile(r"(?<![\w<-])(--?[A-Za-z][\w-]*)")
ENTRY: Final = re.compile(r"  (?P<key>\S+(?: \S+)*?)(?:  +(?P<text>\S.*))?$")
"""The first line of a section's entry: two spaces, the key, two or more, its text."""
HELP_FLAGS: Final = ("-h", "--help")
COMMON_FLAGS: Final = ("  -q --quiet        Only results and errors: no progress, no notes.",
                       "  -v --verbose      Say every step and every wait, however short.",
                       "  --remote NAME     Act on this remote of the incus client (COI_REMOTE;"
                       " docs/remote.md).",
                       "  --target MEMBER   On a cluster: place new containers on this member"
                       " (COI_TARGET).",
                       "  -h --help         Show this help.")


class Pattern(NamedTuple):
    """One usage pattern split for analysis: the command words argv matched, the rest.
    (Not a dataclass: importing dataclasses costs every coi process ~15 ms.)"""

    words: tuple[str, ...]
    items: tuple[str, ...]


def patterns_of(doc: str) -> tuple[str, list[str]]:
    """The program name and each usage pattern (whitespace collapsed) of a docopt doc."""
    words = usage_body(doc).split()
    if not words:
        return "", []
    program = words[0]
    patterns: list[list[str]] = []
    for word in words:
        if word == program:
            patterns.append([])
        else:
            patterns[-1].append(word)
    return program, [" ".join(p) for p in patterns]


def usage_body(doc: str) -> str:
    """Text after `Usage:` up to the first blank line."""
    match = re.search(r"usage:(.*?)(\n\s*\n|\Z)", doc, re.IGNORECASE | re.DOTALL)
    return match.group(1) if match else ""


def items_of(text: str) -> list[str]:
    """Top-level items of a pattern: words, <args>, [groups], (groups), each with its
    `...`; an option and its VALUE placeholder stay one item."""
    items: list[str] = []
    depth, current = 0, ""
    for char in text:
        if char.isspace() and depth == 0:
            if current:
                items.append(current)
            current = ""
            continue
        depth += (char in "([") - (char in ")]")
        current += char
    if current:
        items.append(current)
    merged: list[str] = []
    for item in items:
        if item == "...":
            merged[-1] += item
        elif merged and merged[-1].startswith("-") and OPTION_VALUE.fullmatch(item):
            merged[-1] += f" {item}"
        else:
            merged.append(item)
    return merged


def closest(patterns: Sequence[str], argv: Sequence[str]) -> list[Pattern]:
    """The patterns whose leading command words match the most of argv's leading words
    (at least one); for each, the words matched and the items after them."""
    leading = leading_words(argv)
    scored: list[tuple[int, Pattern]] = []
    for text in patterns:
        items = items_of(text)
        matched: list[str] = []
        position = 0
        while items and (word := COMMAND_WORD.fullmatch(items[0])):
            optional = items[0].startswith("[")
            if position < len(leading) and leading[position] == word["word"]:
                matched.append(word["word"])
                position += 1
            elif not optional:
                break
            items = items[1:]
        scored.append((len(matched), Pattern(tuple(matched), tuple(items))))
    best = max((score for score, _ in scored), default=0)
    return [pattern for score, pattern in scored if score == best] if best else []


def next_words(patterns: Sequence[Pattern], *, alone: bool = False) -> list[str]:
    """When every pattern goes on with a required command word (`coi tmux` then list,
    send or capture), those words in order; otherwise none. A single pattern's word
    counts only when `alone` (`coi config` then show)."""
    words: list[str] = []
    for pattern in patterns:
        word = COMMAND_WORD.fullmatch(pattern.items[0]) if pattern.items else None
        if word is None or pattern.items[0].startswith("["):
            return []
        words.append(word["word"])
    return list(dict.fromkeys(words)) if len(patterns) > 1 or alone else []


def leading_words(argv: Sequence[str]) -> list[str]:
    words = []
    for arg in argv:
        if arg.startswith("-"):
            break
        words.append(arg)
    return words


def render_usage(base: str, patterns: Sequence[Pattern], *, lead: str = "usage: ",
                 then: str | None = None) -> list[str]:
    """`usage: coi kill (<name>... | --all) ...`, wrapped at USAGE_WIDTH between items;
    `then` leads the second and later patterns (default: spaces as wide as `lead`)."""
    lines: list[str] = []
    for number, pattern in enumerate(patterns):
        first = lead if number == 0 else (then if then is not None else " " * len(lead))
        command = " ".join([base, *pattern.words])
        indent = " " * (len(first) + len(command) + 1)
        line = first + command
        for item in pattern.items:
            if len(line) + 1 + len(item) > USAGE_WIDTH and line.strip() != command:
                lines.append(line)
                line = indent + item
            else:
                line += f" {item}"
        lines.append(line)
    return lines


# -- the help of one command ----------------------------------------------------------------


def wants_help(argv: Sequence[str]) -> bool:
    """-h or --help before any `--` (after it they belong to the command `coi run` runs)."""
    words = argv[:argv.index("--")] if "--" in argv else argv
    return any(word in HELP_FLAGS for word in words)


def bare_group(doc: str, argv: Sequence[str]) -> bool:
    """argv names a group of commands and nothing more (`coi image`, `coi tmux`)."""
    _, patterns = patterns_of(doc)
    chosen = closest(patterns, argv)
    rest = [word for word in argv if word != "--debug"]
    return bool(chosen) and bool(next_words(chosen, alone=True)) and \
        len(rest) == len(chosen[0].words)


def command_help(doc: str, argv: Sequence[str], base: str = "coi") -> str:
    """The help of the command argv names, in `base` terms: what it does, its usage,
    its flags and examples; for a group, its usage and its commands."""
    _, patterns = patterns_of(doc)
    chosen = closest(patterns, [w for w in argv if w not in HELP_FLAGS])
    if not chosen:
        return doc.strip()
    words = chosen[0].words
    entries = section(doc, "Commands")
    name = " ".join([base, *words])
    group = next_words(chosen, alone=True)
    if group:
        described = [(word, _first_sentence(_entry(entries, (*words, word)))) for word in group]
        width = max(len(word) for word, _ in described)
        body = ["Commands:", *(f"  {word:<{width}}  {text}".rstrip() for word, text in described),
                "", f"Run '{name} COMMAND --help' for a command's flags and an example."]
        return _page(name, _summary(words, ""), chosen, base, body)
    text = _entry(entries, words)
    body = [*("  " + line for line in text), ""] if text else []
    flags = _flags(doc, chosen)
    if flags:
        body += ["Options:", *flags, ""]
    body += ["Every command also takes:", *COMMON_FLAGS, ""]
    examples = [line for line in section_lines(doc, "Examples")
                if f"{line.strip().removeprefix('sudo ')} ".startswith(f"{name} ")]
    body += ["Examples:", *examples] if examples else []
    return _page(name, _summary(words, _first_sentence(text)), chosen, base, body)


def _page(name: str, summary: str, chosen: Sequence[Pattern], base: str,
          body: list[str]) -> str:
    head = f"{name}: {summary}" if summary else name
    usage = render_usage(base, chosen, lead="  ")
    return "\n".join([head, "", "Usage:", *usage, "", *body]).rstrip()


def _summary(words: Sequence[str], fallback: str) -> str:
    """A top-level command's summary from the register, else `fallback`."""
    from coi_common.commands import BY_NAME  # noqa: PLC0415 - help only: ~1 ms to import

    command = BY_NAME.get(words[0]) if len(words) == 1 else None
    return f"{command.summary}." if command is not None else fallback


def _entry(entries: dict[str, list[str]], words: Sequence[str]) -> list[str]:
    """The Commands entry of `words`, or of its tail (`session save` is `save`)."""
    for start in range(len(words)):
        found = entries.get(" ".join(words[start:]))
        if found is not None:
            return found
    return []


def _first_sentence(lines: Sequence[str]) -> str:
    """Up to the first full stop outside brackets (`coi's images (--all: every...).`)."""
    text = " ".join(line.strip() for line in lines)
    depth = 0
    for index, char in enumerate(text):
        depth += (char in "([") - (char in ")]")
        if char == "." and depth <= 0 and text[index + 1:index + 2] in ("", " "):
            return text[:index + 1]
    return text


def _flags(doc: str, chosen: Sequence[Pattern]) -> list[str]:
    """The Options entries of every flag the patterns take, in the doc's order, as the
    doc words them (defaults included)."""
    used = {name for pattern in chosen for name in OPTION_NAME.findall(" ".join(pattern.items))}
    lines: list[str] = []
    for key, text in section(doc, "Options").items():
        if used & set(OPTION_NAME.findall(key)):
            lines += [f"  {key:<16}  {text[0].strip() if text else ''}".rstrip(),
                      *(" " * 20 + line.strip() for line in text[1:])]
    return lines


def section(doc: str, title: str) -> dict[str, list[str]]:
    """Entries of a section (`Commands:`, `Options:`): key -> its text lines. An entry
    is a line of two spaces, the key, two or more spaces and text, then its more
    indented lines; a two-space line without that gap is a note, not an entry."""
    entries: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in section_lines(doc, title):
        entry = ENTRY.match(line) if not line.startswith("   ") else None
        if entry is not None and entry["text"] is not None:
            current = entries.setdefault(entry["key"], [entry["text"]])
        elif entry is not None and OPTION_NAME.match(entry["key"]):
            current = entries.setdefault(entry["key"], [])  # a flag with its text below
        elif line.startswith("   ") and current is not None:
            current.append(line.strip())
        else:
            current = None
    return entries


def section_lines(doc: str, title: str) -> list[str]:
    """The lines of `title:` up to the next unindented line."""
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == f"{title}:")
    except StopIteration:
        return []
    found = []
    for line in lines[start + 1:]:
        if line and not line.startswith(" "):
            break
        found.append(line)
    return found
