"""Commands in the chat: a user message starting with the prefix (`!/help`, `!/models`,
`!/model(NAME)`, `!/set(name=value)`, `!/usage`) is for llproxy, not the model. llproxy
keeps no state: a conversation's settings and model are the commands found in its own
history, which the client sends back each turn; those messages and llproxy's answers to
them (their first line is MARK) are taken out of what the model sees.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ProxyError
from .keys import ApiKey
from .registry import Model

# The first line of every answer llproxy gives to a command: how it finds them again in
# the history a client sends back.
MARK = "[llproxy]"

# The settings a conversation may set, and the values each takes. The answer stages read
# the first three ("true"/"false"); core/toolloop.py reads `tool-loops`.
BOOLEAN = ("true", "false")
SETTINGS: Mapping[str, tuple[str, ...]] = {
    "tool-repair": BOOLEAN,
    "thinking": BOOLEAN,
    "loop-detection": BOOLEAN,
    "tool-loops": ("off", "warn", "break"),
}
# Commands of one message answered: each answer may be long (help, a usage query), so a
# message of a million `!/usage` must not become a million queries and a gigabyte reply.
MAX_COMMANDS = 8

_SYNONYMS = {"on": "true", "yes": "true", "1": "true", "off": "false", "no": "false", "0": "false"}

_REMINDER = "<system-reminder>"
_REMINDER_END = "</system-reminder>"
# Settings apart: a separator only where a run of them starts (the lookbehind), so a long
# run is read once, not once from each of its characters (quadratic).
_SETTINGS_SPLIT = re.compile(r"(?<![,;\s])[,;\s]+(?=[^=,;\s]+\s*=)")
_COMMAND = re.compile(r"([A-Za-z][A-Za-z_-]*)\s*(?:\((.*)\))?", re.DOTALL)
_HELP = (
    ("help", "what you are reading"),
    ("models", "the models this key may use"),
    ("model(NAME)", "this conversation goes to NAME from now on; `model` alone says which"),
    ("set(name=value, …)", "a setting of this conversation; `set` alone lists them"),
    ("usage", "this key's requests and tokens today"),
)


@dataclass(frozen=True, slots=True)
class Command:
    name: str  # lower case, as typed after the prefix
    argument: str | None  # what the parentheses held; None without them


def parse(text: str, prefix: str) -> list[Command] | None:
    """The commands a text holds (one or more, each starting with the prefix), or None
    when it does not start with the prefix. A piece that is no command is one named ""."""
    # A look at the text's start first: most messages are long and no command.
    if not _starts(text, prefix):
        # Claude Code puts reminders of its own in the user's message, beside what was
        # typed (its dialect joins the blocks into one text): they are not the user's.
        if _REMINDER not in text:
            return None
        text = _without_reminders(text)
        if not _starts(text, prefix):
            return None
    stripped = text.strip()
    commands = []
    for piece in stripped[len(prefix) :].split(prefix):
        match = _COMMAND.fullmatch(piece.strip())
        if match is None:
            commands.append(Command("", piece.strip()))
        else:
            argument = match.group(2)
            commands.append(
                Command(match.group(1).lower(), None if argument is None else argument.strip())
            )
    return commands


def _without_reminders(text: str) -> str:
    """The text without its reminder blocks, each up to the first end tag after it. A
    scan with find, not a lazy regex: with many openers and no end tag, the regex read the
    rest of the text from each opener (quadratic, seconds for a few hundred kB)."""
    kept: list[str] = []
    at = 0
    while (start := text.find(_REMINDER, at)) >= 0:
        end = text.find(_REMINDER_END, start + len(_REMINDER))
        if end < 0:
            break
        kept.append(text[at:start])
        at = end + len(_REMINDER_END)
    kept.append(text[at:])
    return "".join(kept)


def _starts(text: str, prefix: str) -> bool:
    return text[:256].lstrip().startswith(prefix)


def texts(message: Mapping[str, Any]) -> list[str]:
    """A chat message's text parts (its content as a string, or the text parts of a list)."""
    content = message.get("content")
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [p["text"] for p in content if isinstance(p, dict) and _is_text(p)]
    return []


def _is_text(part: Mapping[str, Any]) -> bool:
    return isinstance(part.get("text"), str)


def settings_of(argument: str) -> tuple[dict[str, str], list[str]]:
    """`name=value, …` as settings (values made canonical), and what is wrong with the
    rest (a name or value not known)."""
    chosen: dict[str, str] = {}
    problems: list[str] = []
    for pair in filter(None, (p.strip() for p in _SETTINGS_SPLIT.split(argument))):
        name, equals, value = (part.strip() for part in pair.partition("="))
        name, value = name.lower(), value.lower().strip("'\"")
        value = _SYNONYMS.get(value, value) if SETTINGS.get(name) == BOOLEAN else value
        if name not in SETTINGS:
            problems.append(f"unknown setting '{name}' (known: {', '.join(SETTINGS)})")
        elif not equals or value not in SETTINGS[name]:
            problems.append(f"{name} takes {' or '.join(SETTINGS[name])}, not '{value}'")
        else:
            chosen[name] = value
    return chosen, problems


@dataclass(slots=True)
class History:
    """What a conversation's messages say for llproxy."""

    messages: list[Any]  # what the model sees: without commands and llproxy's answers
    changed: bool = False  # whether any message was taken out
    settings: dict[str, str] = field(default_factory=dict)  # the last value of each wins
    models: list[str] = field(default_factory=list)  # the `model(NAME)` names, in order
    # The last message's commands, when it is one: llproxy answers them itself.
    command: list[Command] | None = None


def read(messages: list[Any], prefix: str) -> History:
    """The history's commands, and its messages without them and their answers (the
    same list when there are none: this runs for every chat turn)."""
    history = History(messages)
    dropped: set[int] = set()
    # A text that starts with neither the prefix, nor llproxy's mark, nor an agent's
    # reminder, nor white space is neither a command nor an answer to one: most
    # messages, told by their first character without reading them further.
    leads = (prefix[:1], MARK[:1], _REMINDER[:1])
    for index, message in enumerate(messages):
        if type(message) is not dict:
            continue
        content = message.get("content")
        if type(content) is str and (lead := content[:1]) not in leads and not lead.isspace():
            continue
        role = message.get("role")
        if role == "assistant":
            if _answered(message):
                dropped.add(index)
            continue
        found = _commands(message, prefix) if role == "user" else None
        if found is None:
            continue
        dropped.add(index)
        for command in found:
            if command.name == "set" and command.argument:
                history.settings.update(settings_of(command.argument)[0])
            elif command.name == "model" and command.argument:
                history.models.append(command.argument)
        if index == len(messages) - 1:
            history.command = found
    if dropped:
        history.changed = True
        history.messages = [m for i, m in enumerate(messages) if i not in dropped]
    return history


def _commands(message: Mapping[str, Any], prefix: str) -> list[Command] | None:
    """A user message's commands: its first text part that starts with the prefix
    (agents such as Claude Code put reminders of their own before what was typed)."""
    content = message.get("content")
    if isinstance(content, str):
        return parse(content, prefix)
    if isinstance(content, list):
        for part in content:
            text = part.get("text") if isinstance(part, dict) else None
            if isinstance(text, str) and (found := parse(text, prefix)) is not None:
                return found
    return None


def _answered(message: Mapping[str, Any]) -> bool:
    """Whether an assistant message is llproxy's answer to a command."""
    content = message.get("content")
    if isinstance(content, str):
        return _starts(content, MARK)
    parts = texts(message)
    return bool(parts) and _starts(parts[0], MARK)


# What a command answer may ask of the rest of llproxy, for the client's key.
Listing = Callable[[ApiKey | None], list[Mapping[str, Any]]]
Resolve = Callable[[str, ApiKey | None], Model]
# This client's usage today: rows of model, requests, prompt and completion tokens; None
# when the usage database cannot be read.
UsageToday = Callable[[str], Awaitable[list[dict[str, Any]] | None]]


class Commands:
    """Commands as one process answers them."""

    def __init__(
        self,
        prefix: str,
        disabled_keys: Sequence[str],
        listing: Listing,
        resolve: Resolve,
        usage: UsageToday,
    ) -> None:
        self.prefix = prefix
        self.disabled_keys = tuple(disabled_keys)
        self.listing = listing
        self.resolve = resolve
        self.usage = usage

    def enabled_for(self, key: ApiKey | None) -> bool:
        if key is None or not self.disabled_keys:
            return True
        return not any(fnmatch.fnmatchcase(key.name, g) for g in self.disabled_keys)

    def model(self, history: History, key: ApiKey | None) -> str | None:
        """The conversation's own model: the last `model(NAME)` this key may use (one it
        may not, or unknown, was answered so and changed nothing)."""
        for name in reversed(history.models):
            try:
                self.resolve(name, key)
            except ProxyError:
                continue
            return name
        return None

    async def answer(
        self, history: History, key: ApiKey | None, client: str, asked: str | None
    ) -> str:
        """llproxy's answer to the last message's commands, MARK its first line."""
        assert history.command is not None
        asked_for = history.command[:MAX_COMMANDS]
        pieces = [await self._one(c, history, key, client, asked) for c in asked_for]
        if len(history.command) > MAX_COMMANDS:
            pieces.append(f"Only the first {MAX_COMMANDS} commands of a message are answered.")
        return "\n\n".join([MARK, *pieces])

    async def _one(
        self,
        command: Command,
        history: History,
        key: ApiKey | None,
        client: str,
        asked: str | None,
    ) -> str:
        name, argument = command.name, command.argument
        if name == "help":
            return self._help()
        if name == "models":
            current = self.model(history, key) or asked
            rows = [
                f"- {entry['id']}" + ("  ← this conversation" if entry["id"] == current else "")
                for entry in sorted(self.listing(key), key=lambda e: str(e.get("id")))
            ]
            return "Models this key may use:\n" + ("\n".join(rows) or "(none right now)")
        if name == "model":
            return self._model(argument, history, key, asked)
        if name == "set":
            return self._set(argument, history)
        if name == "usage":
            return _usage(await self.usage(client))
        shown = f"{self.prefix}{name}" if name else f"{self.prefix}{argument or ''}"
        return f"Unknown command `{shown.strip()}`.\n\n{self._help()}"

    def _help(self) -> str:
        p = self.prefix
        lines = [f"- `{p}{usage}`: {what}" for usage, what in _HELP]
        settings = ", ".join(f"{n} ({'/'.join(v)})" for n, v in SETTINGS.items())
        return (
            f"Commands for llproxy (nothing you type after `{p}` reaches the model):\n"
            + "\n".join(lines)
            + f"\nSettings: {settings}."
        )

    def _model(
        self, argument: str | None, history: History, key: ApiKey | None, asked: str | None
    ) -> str:
        if not argument:
            current = self.model(history, key)
            if current is None:
                asks = asked or "the default"
                return f"This conversation goes to the model it asks for ({asks})."
            return f"This conversation goes to {current} (set with `{self.prefix}model`)."
        try:
            model = self.resolve(argument, key)
        except ProxyError as error:
            names = ", ".join(sorted(str(e.get("id")) for e in self.listing(key))) or "none"
            return (
                f"Not switched: {error.message}. This key may use: {names}. The conversation "
                "goes on with the model it had."
            )
        served = "" if model.name == argument else f" (served by {model.name})"
        return f"This conversation goes to {argument}{served} from now on."

    def _set(self, argument: str | None, history: History) -> str:
        if not argument:
            values = "\n".join(
                f"- {name}: {history.settings.get(name, 'default')}" for name in SETTINGS
            )
            return f"This conversation's settings:\n{values}"
        chosen, problems = settings_of(argument)
        lines = [f"{name} = {value} for this conversation." for name, value in chosen.items()]
        # Each problem repeats the known names: a few are told, not one per pair typed.
        told = [f"Not set: {p}." for p in problems[:MAX_COMMANDS]]
        if len(problems) > MAX_COMMANDS:
            told.append(f"({len(problems) - MAX_COMMANDS} more not set.)")
        return "\n".join([*lines, *told])


def _usage(rows: Sequence[Mapping[str, Any]] | None) -> str:
    if rows is None:
        return "This key's usage cannot be read right now (the usage database failed)."
    if not rows:
        return "No requests today for this key."
    columns = ("requests", "prompt_tokens", "completion_tokens")
    total = [sum(int(r.get(k) or 0) for r in rows) for k in columns]
    lines = [
        f"- {r['model']}: {r['requests']} requests, {r.get('prompt_tokens') or 0} prompt tokens, "
        f"{r.get('completion_tokens') or 0} completion tokens"
        for r in rows
    ]
    return (
        f"This key today: {total[0]} requests, {total[1]} prompt tokens, "
        f"{total[2]} completion tokens.\n" + "\n".join(lines)
    )
