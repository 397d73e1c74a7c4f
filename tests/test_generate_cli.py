"""`python -m vishwam.generate`: completions equal transformers' (tokenizer and `generate`) on the demo teacher,
rows in input order, a file that `data.train` reads, and one-line errors that write nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from hf_fixtures import hf_greedy_completions

import vishwam
from vishwam.data.text import load_token_stream
from vishwam.generate import main

ROOT = Path(__file__).resolve().parents[1]
DEMO_TEACHER = ROOT / "vishwam" / "assets" / "demo" / "teacher"
PROMPTS = ["Seven plus five is", "Mira went to the market with her friend Kai. She", "One, two,"]


def _write_prompts(path: Path, prompts=PROMPTS) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def _reference(prompts, max_new_tokens):
    return hf_greedy_completions(DEMO_TEACHER, DEMO_TEACHER, prompts, max_new_tokens)


def test_completions_equal_transformers_and_feed_data_train(tmp_path):
    out = tmp_path / "seqkd.jsonl"
    # batch size 2: prompts of different lengths batched, the last batch filled by repetition
    assert main(["--model", str(DEMO_TEACHER), "--prompts", str(_write_prompts(tmp_path / "p.jsonl")),
                 "--max-new-tokens", "24", "--batch-size", "2", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [r["completion"] for r in rows] == _reference(PROMPTS, 24)
    assert all(r["text"] == r["prompt"] + r["completion"] for r in rows)
    # The file is a training dataset as it is (sequence-level KD): its text tokenized and joined by EOS.
    stream = load_token_stream(str(out), str(DEMO_TEACHER), eos_id=0, vocab_size=512)
    tok = transformers.AutoTokenizer.from_pretrained(DEMO_TEACHER)
    expected = sum(([*tok(r["text"], add_special_tokens=False)["input_ids"], 0] for r in rows), [])
    np.testing.assert_array_equal(stream[:len(expected)], expected[:len(stream)])


def test_one_prompt_printed(capsys):
    assert main(["--model", str(DEMO_TEACHER), "--prompt", PROMPTS[0], "--max-new-tokens", "8"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["completion"] == _reference(PROMPTS[:1], 8)[0]


@pytest.mark.parametrize("args,message", [
    ([], "exactly one of --prompt"),
    (["--prompt", "x", "--prompts", "y.jsonl"], "exactly one of --prompt"),
    (["--prompts", "missing.jsonl"], "prompts file not found: missing.jsonl"),
    (["--prompts", "BAD"], "bad.jsonl:2: a row needs a non-empty string field 'prompt'"),
    (["--prompt", "x", "--chat"], "has no chat template"),
    (["--prompt", "x", "--temperature", "-1"], "--temperature >= 0"),
    (["--prompt", "x", "--max-new-token", "3"], "--max-new-token"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"completion": "no prompt"}\n')
    args = [str(tmp_path / "bad.jsonl") if a == "BAD" else a for a in args]
    out = tmp_path / "out.jsonl"
    proc = subprocess.run([sys.executable, "-m", "vishwam.generate", "--model", str(DEMO_TEACHER), *args, "--out",
                           str(out)], capture_output=True, text=True, cwd=tmp_path,
                          env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not out.exists()


def test_vishwam_generate_is_the_function_after_the_command_module_is_imported():
    import vishwam.generate as command  # the module shares the function's name

    assert callable(vishwam.generate) and callable(command)
    assert vishwam.generation.sampler.generate.__name__ == "generate"


def test_chat_prompts_are_user_turns_rendered_as_transformers_does(tmp_path):
    """`--chat` on the chat demo teacher: each prompt rendered by `apply_chat_template(add_generation_prompt=True)`
    and continued by transformers' greedy `generate` gives the same completion; the rows are chat data."""
    chat_teacher = ROOT / "vishwam" / "assets" / "demo" / "chat_teacher"
    questions = ["What is seven plus five?", "Count from two to six.", "Which is bigger, nine or four?"]
    out = tmp_path / "chat.jsonl"
    assert main(["--model", str(chat_teacher), "--prompts", str(_write_prompts(tmp_path / "q.jsonl", questions)), "--chat",
                 "--max-new-tokens", "24", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    tok = transformers.AutoTokenizer.from_pretrained(chat_teacher)
    model = transformers.AutoModelForCausalLM.from_pretrained(chat_teacher, attn_implementation="eager").eval()
    for question, row in zip(questions, rows):
        ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True, return_tensors="pt")
        with torch.no_grad():
            new = model.generate(**ids, max_new_tokens=24, do_sample=False, eos_token_id=0, pad_token_id=1)
        expected = tok.decode(new[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        assert row["completion"] == expected and row["prompt"] == question
        assert row["messages"] == [{"role": "user", "content": question},
                                   {"role": "assistant", "content": expected}]
