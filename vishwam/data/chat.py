"""Chat templates: a model's own, rendered the way transformers' `apply_chat_template` renders it, and the
characters and tokens of each assistant turn.

Where a template comes from (`find_template`): the file `data.chat_template`; else `chat_template.jinja` in the
tokenizer's directory (the teacher's, unless `data.tokenizer` names another); else `chat_template` in that
directory's `tokenizer_config.json` (a string, or a list of `{"name", "template"}` of which "default" is used).
transformers saves a tokenizer's template in one of the last two.

Rendering (`ChatTemplate.render`) reproduces `transformers.utils.chat_template_utils`: an
`ImmutableSandboxedEnvironment` with `trim_blocks`, `lstrip_blocks` and the `loopcontrols` extension, its
`tojson` filter (no HTML escaping), the `raise_exception` and `strftime_now` globals, and the tokenizer's named
special tokens (`bos_token`, `eos_token`, ... from `tokenizer_config.json`, else `special_tokens_map.json`) as
variables; the text is then tokenized with no special tokens added, as `apply_chat_template(tokenize=True)` does.
`{% generation %}` blocks (transformers' assistant-mask markers) render their body and mark nothing here.

Assistant turns (`ChatTemplate.assistant_spans`) are found from prefixes, so that any template works without
`{% generation %}` markers: turn `k`'s characters run from the end of `render(messages[:k],
add_generation_prompt=True)` to the end of `render(messages[:k + 1])`, which must each be a prefix of the whole
conversation's rendering (a template that rewrites earlier turns once later ones exist is not prefix-stable, and
its assistant tokens cannot be found this way: a `DataError`). A token is an assistant token when its characters
overlap a turn's (the rule transformers applies to `{% generation %}` spans).
"""

from __future__ import annotations

import dataclasses
import json
import os
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import numpy as np
from tokenizers import Encoding

from vishwam.errors import ConfigError, DataError

ROLES = ("system", "user", "assistant")
#: The named special tokens transformers hands every template (`SPECIAL_TOKENS_ATTRIBUTES`).
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers' assistant-mask marker; renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"cannot read {path}: {error}") from None
    return value if isinstance(value, dict) else {}


def special_tokens(directory: Path) -> dict[str, str]:
    """The named special tokens of the tokenizer in `directory` (`tokenizer_config.json` over
    `special_tokens_map.json`), as strings: a token saved as `{"content": ...}` is its content."""
    found: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (directory / name).is_file():
            for key, value in _read_json(directory / name).items():
                value = value.get("content") if isinstance(value, dict) else value
                if key in SPECIAL_TOKENS and isinstance(value, str):
                    found[key] = value
    return found


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A compiled chat template and the variables transformers renders it with.

    **Fields:** `source` (where it was read from, named in errors), `text` (the template), `variables` (the
    tokenizer's special tokens), `roles` (the roles it renders: system, user, assistant, and tool when the
    template mentions that role).
    """

    source: str
    text: str
    variables: tuple[tuple[str, str], ...] = ()
    template: jinja2.Template = dataclasses.field(init=False, repr=False, compare=False)
    roles: tuple[str, ...] = dataclasses.field(init=False, compare=False)

    def __post_init__(self):
        env = _environment()
        try:
            template = env.from_string(self.text)
            strings = {n.value for n in env.parse(self.text).find_all(jinja2.nodes.Const) if isinstance(n.value, str)}
        except jinja2.TemplateSyntaxError as error:
            raise DataError(f"chat template {self.source} is not valid Jinja (line {error.lineno}: {error.message})") \
                from None
        object.__setattr__(self, "template", template)
        object.__setattr__(self, "roles", ROLES + (("tool",) if "tool" in strings else ()))

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
        """The conversation as text, exactly as `apply_chat_template(messages, tokenize=False)` renders it;
        raises `jinja2.TemplateError` for any error the template meets (its own `raise_exception`, the sandbox's
        `SecurityError`, an undefined call, a Python error such as a division by zero)."""
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]  # as transformers drops None
        try:
            return self.template.render(messages=messages, tools=None, documents=None,
                                        add_generation_prompt=add_generation_prompt, **dict(self.variables))
        except jinja2.TemplateError:
            raise
        except Exception as error:  # Python's own, raised inside the template: {{ 1 // 0 }}, {{ "a" + 1 }}
            raise jinja2.TemplateError(f"{type(error).__name__}: {error}") from error

    def assistant_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """`(text, spans)`: the whole conversation rendered, and the `[start, end)` characters of each assistant
        turn in it (see the module docstring); `ValueError` when the template is not prefix-stable."""
        text = self.render(messages)
        spans = []
        for k, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            before = self.render(messages[:k], add_generation_prompt=True)
            through = self.render(messages[: k + 1])
            if not (text.startswith(through) and through.startswith(before)):
                raise ValueError(f"the rendering of the turns before assistant turn {k} (with the generation prompt) "
                                 f"and through it are not prefixes of the whole conversation's")
            spans.append((len(before), len(through)))
        return text, spans


def token_mask(encoding: Encoding, spans: list[tuple[int, int]]) -> np.ndarray:
    """A `bool [tokens]` mask of the tokens of `encoding` whose characters overlap one of `spans` (sorted)."""
    mask = np.zeros(len(encoding.ids), bool)
    s = 0
    for i, (start, end) in enumerate(encoding.offsets):
        while s < len(spans) and start >= spans[s][1]:
            s += 1
        if s == len(spans):
            break
        mask[i] = end > spans[s][0]
    return mask


def _from_tokenizer_config(path: Path) -> str | None:
    value = _read_json(path).get("chat_template")
    if isinstance(value, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else None


def find_template(chat_template: str | None, tokenizer_dir: Path) -> ChatTemplate | None:
    """The run's chat template (see the module docstring), or None when none is given or beside the tokenizer.

    **Arguments:** `chat_template`: the `data.chat_template` file (a missing one is a `ConfigError`);
    `tokenizer_dir`: the directory of the run's tokenizer, whose `tokenizer_config.json` also gives the special
    tokens."""
    tokenizer_dir = Path(tokenizer_dir)
    variables = tuple(sorted(special_tokens(tokenizer_dir).items()))
    if chat_template is not None:
        if not os.path.isfile(chat_template):
            raise ConfigError(f"config key 'data.chat_template': file not found: {chat_template}")
        try:
            text = Path(chat_template).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"config key 'data.chat_template': cannot read {chat_template}: {error}") from None
        return ChatTemplate(chat_template, text, variables)
    jinja = tokenizer_dir / "chat_template.jinja"
    if jinja.is_file():
        try:
            text = jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"cannot read the chat template {jinja}: {error}") from None
        return ChatTemplate(str(jinja), text, variables)
    config = tokenizer_dir / "tokenizer_config.json"
    text = _from_tokenizer_config(config) if config.is_file() else None
    return None if text is None else ChatTemplate(f"{config} (chat_template)", text, variables)


__all__ = ["ROLES", "ChatTemplate", "find_template", "special_tokens", "token_mask"]
