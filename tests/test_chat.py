"""Chat templates and chat data: rendering and token ids equal transformers' `apply_chat_template`, assistant
masks equal its `return_assistant_tokens_mask` on `{% generation %}` templates, and every bad row is one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import transformers
from tokenizers import AddedToken, Tokenizer

from vishwam.data.chat import find_template
from vishwam.data.chat_rows import encode_rows, is_chat
from vishwam.errors import ConfigError, DataError

DEMO = Path(__file__).resolve().parents[1] / "vishwam" / "assets" / "demo" / "teacher"
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
           "<|eot_id|>"]

# Qwen2.5's ChatML, shortened (a default system turn, raise_exception on a bad role, loopcontrols, tojson).
CHATML = """{%- if messages[0]['role'] != 'system' %}
{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}
        {{- raise_exception('Unknown role: ' + message['role']) }}
    {%- endif %}
    {%- if message['role'] == 'tool' %}
        {{- '<|im_start|>user\\n<tool_response>\\n' + message['content'] | tojson }}
        {{- '\\n</tool_response><|im_end|>\\n' }}
        {%- continue %}
    {%- endif %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] }}
    {%- if message.tool_calls is defined %}
        {{- '\\n<tool_call>' + message.tool_calls | tojson + '</tool_call>' }}
    {%- endif %}
    {{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
# ChatML with transformers' assistant markers around each assistant turn's text and end; indented block tags.
CHATML_GENERATION = """{% for message in messages %}
    {% if message['role'] == 'assistant' %}
{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>\\n' }}{% endgeneration %}
    {% else %}
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}
"""
# Plain-text turns, no control tokens but EOS: the completion's first token (" Four") starts in the prompt's space.
PLAIN_GENERATION = """{% for m in messages %}
{% if m.role == 'assistant' %}
Assistant: {% generation %}{{ m.content + eos_token + '\\n' }}{% endgeneration %}
{% else %}
{{ m.role | capitalize }}: {{ m.content }}
{% endif %}
{% endfor %}
{% if add_generation_prompt %}Assistant: {% endif %}"""
# Meta-Llama-3-8B-Instruct's template, as it ships (block whitespace left to trim_blocks / lstrip_blocks).
LLAMA3 = """{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = \
'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}\
{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}\
{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"""
# Shortens past assistant turns once a later turn exists (as Qwen3's drops past reasoning): not prefix-stable.
UNSTABLE = """{% for m in messages %}{{ m['role'] }}: \
{{ m['content'] if loop.last or m['role'] != 'assistant' else '...' }}\n{% endfor %}\
{% if add_generation_prompt %}assistant: {% endif %}"""

CONVERSATIONS = {
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Two plus two?"},
               {"role": "assistant", "content": "Four."}],
    "multi_turn": [{"role": "user", "content": "Hello there, who are you?"},
                   {"role": "assistant", "content": "A small model.\nI count birds.", "tool_calls": None},
                   {"role": "user", "content": "  How many birds?  "},
                   {"role": "assistant", "content": "Eleven birds, then two more."}],
    "ends_with_user": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Say hi."},
                       {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Again?"}],
}
TOOL = [{"role": "user", "content": "Weather in Pune?"}, {"role": "assistant", "content": "Calling the tool."},
        {"role": "tool", "content": "{\"city\": \"Pune\", \"sky\": \"<sunny> & 31°C\"}"},
        {"role": "assistant", "content": "Sunny, 31°C."}]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The demo teacher's byte-level BPE with the templates' control tokens added."""
    d = tmp_path_factory.mktemp("tok")
    tok = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|im_end|>", "pad_token": "<|pad|>"}))
    return d


def _with_template(tokenizer_dir: Path, tmp_path: Path, template: str) -> Path:
    d = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, d)
    (d / "chat_template.jinja").write_text(template)
    return d


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("template, conversation", [(t, c) for t in ("chatml", "llama3") for c in sorted(CONVERSATIONS)]
                         + [("chatml", "tool")])
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_render_and_ids_equal_apply_chat_template(tokenizer_dir, tmp_path, template, conversation,
                                                  generation_prompt):
    d = _with_template(tokenizer_dir, tmp_path, {"chatml": CHATML, "llama3": LLAMA3}[template])
    hf = transformers.AutoTokenizer.from_pretrained(d)
    messages = TOOL if conversation == "tool" else CONVERSATIONS[conversation]
    ours = find_template(None, d)
    text = ours.render(messages, add_generation_prompt=generation_prompt)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    ids = Tokenizer.from_file(str(d / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    want = hf.apply_chat_template(messages, tokenize=True, return_dict=False, add_generation_prompt=generation_prompt)
    assert ids == list(want)
    assert any(t in text for t in ("<|begin_of_text|>", "<|im_start|>system"))  # bos / default system rendered
    if not generation_prompt:  # a data row: the same ids through the loader
        rows = encode_rows(str(_write_rows(tmp_path / "c.jsonl", [{"messages": messages}])),
                           Tokenizer.from_file(str(d / "tokenizer.json")), ours, loss_on="all", eos_id=None)
        assert rows[0][0].tolist() == list(want) and rows[0][1].all()


@pytest.mark.parametrize("template", ["chatml", "plain"])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_assistant_tokens_equal_transformers_generation_mask(tokenizer_dir, tmp_path, template, conversation):
    d = _with_template(tokenizer_dir, tmp_path, {"chatml": CHATML_GENERATION, "plain": PLAIN_GENERATION}[template])
    hf = transformers.AutoTokenizer.from_pretrained(d)
    messages = CONVERSATIONS[conversation]
    want = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    rows = encode_rows(str(_write_rows(tmp_path / "c.jsonl", [{"messages": messages}])),
                       Tokenizer.from_file(str(d / "tokenizer.json")), find_template(None, d), loss_on="assistant",
                       eos_id=None)
    ids, targets = rows[0]
    assert ids.tolist() == list(want["input_ids"])
    assert targets.astype(int).tolist() == list(want["assistant_masks"])
    assert 0 < targets.sum() < len(targets)


def test_template_lookup_order(tokenizer_dir, tmp_path):
    d = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, d)
    assert find_template(None, d) is None
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    assert find_template(None, d).text == "D"
    (d / "chat_template.jinja").write_text("J")
    assert find_template(None, d).text == "J"
    (tmp_path / "mine.jinja").write_text("M")
    (d / "special_tokens_map.json").write_text(json.dumps({"unk_token": {"content": "<|pad|>", "lstrip": False}}))
    found = find_template(str(tmp_path / "mine.jinja"), d)
    assert found.text == "M" and dict(found.variables) == {
        "bos_token": "<|begin_of_text|>", "eos_token": "<|im_end|>", "pad_token": "<|pad|>", "unk_token": "<|pad|>"}
    with pytest.raises(ConfigError, match="data.chat_template.*not found: .*missing.jinja"):
        find_template(str(tmp_path / "missing.jinja"), d)


BAD_ROWS = {
    "unknown role": ([{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "ok"}],
                     CHATML, r"c.jsonl:2: message 0 has role 'robot'"),
    "no assistant": ([{"role": "user", "content": "hi"}], CHATML, r"c.jsonl:2: .*no assistant turn"),
    "raise_exception": (CONVERSATIONS["system"],
                        "{% for m in messages %}{% if m.role == 'system' %}"
                        "{{ raise_exception('no system turns, please') }}{% endif %}{{ m.content }}{% endfor %}",
                        r"c.jsonl:2: the chat template .*chat_template.jinja fails to render the row: no system turns"),
    "undefined": (CONVERSATIONS["system"], "{% for m in messages %}{% if m.role == 'system' %}{{ m.content.nope() }}"
                  "{% endif %}{{ m.content }}{% endfor %}", r"c.jsonl:2: the chat template .* fails to render"),
    "not prefix-stable": (CONVERSATIONS["multi_turn"], UNSTABLE,
                          r"c.jsonl:2: the chat template .* is not prefix-stable \(.*assistant turn 1"),
    "content": ([{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "ok"}], CHATML,
                r"c.jsonl:2: message 0: 'content' must be a string"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_a_bad_row_is_one_line_naming_file_and_row(tokenizer_dir, tmp_path, case):
    messages, template, message = BAD_ROWS[case]
    d = _with_template(tokenizer_dir, tmp_path, template)
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path = _write_rows(tmp_path / "c.jsonl", [good, {"messages": messages}])
    with pytest.raises(DataError, match=message) as error:
        encode_rows(str(path), Tokenizer.from_file(str(d / "tokenizer.json")), find_template(None, d),
                    loss_on="assistant", eos_id=None)
    assert "\n" not in str(error.value)


def test_no_template_and_mixed_files_are_errors(tokenizer_dir, tmp_path):
    path = _write_rows(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "a"}]}])
    with pytest.raises(DataError, match=r"c.jsonl:1: a 'messages' row needs a chat template.*data.chat_template"):
        encode_rows(str(path), Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")), None, loss_on="all",
                    eos_id=None)
    text = _write_rows(tmp_path / "t.jsonl", [{"text": "plain"}])
    assert is_chat([str(path)]) and not is_chat([str(text)])
    with pytest.raises(DataError, match=r"mixes chat rows \(.*c.jsonl\) and text \(.*t.jsonl\)"):
        is_chat([str(path), str(text)])


def test_prompt_completion_rows_are_plain_text_with_eos(tokenizer_dir, tmp_path):
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    path = _write_rows(tmp_path / "p.jsonl", [{"prompt": "Seven plus five is", "completion": " twelve."}])
    for loss_on in ("assistant", "all"):
        (ids, targets), = encode_rows(str(path), tok, None, loss_on=loss_on, eos_id=0)
        prompt = tok.encode("Seven plus five is", add_special_tokens=False).ids
        completion = tok.encode(" twelve.", add_special_tokens=False).ids
        assert ids.tolist() == prompt + completion + [0]
        want = [loss_on == "all"] * len(prompt) + [True] * (len(completion) + 1)
        assert targets.tolist() == want
