"""What a user coming from mlx-lm tries first: its flags and keywords, bad input, silent limits."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import sys

import mlx.core as mx
import pexpect
import pytest

from mlx_gemma_mtp import (
    ChatSession,
    batch_generate,
    generate,
    load,
    load_drafter,
    load_pair,
    stream_generate,
)
from mlx_gemma_mtp.chat import drafter_warning, stats_line
from mlx_gemma_mtp.cli import main, setup_chat_parser, setup_generate_parser
from mlx_gemma_mtp.config import ConfigError
from mlx_gemma_mtp.engine import ContextError
from mlx_gemma_mtp.generate import DEFAULT_MAX_TOKENS
from tests.test_cli import REPO, TURN

CONTEXT = 96  # the small-context copy's max_position_embeddings


@pytest.fixture(autouse=True)
def private_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))


@pytest.fixture(scope="module")
def small(checkpoints, tmp_path_factory):
    """The e2b pair with a 96-token context, the drafter beside it as `<name>-assistant`."""
    root = tmp_path_factory.mktemp("small")
    target, drafter = checkpoints["e2b"]
    shutil.copytree(target, root / "small-it")
    shutil.copytree(drafter, root / "small-it-assistant")
    for directory in (root / "small-it", root / "small-it-assistant"):
        config = json.loads((directory / "config.json").read_text())
        config.get("text_config", config)["max_position_embeddings"] = CONTEXT
        (directory / "config.json").write_text(json.dumps(config))
    return root / "small-it"


def test_a_bad_seed_is_a_clear_error_everywhere(small, capsys):
    model, tokenizer = load(small)
    for seed in (-1, 2**70):
        with pytest.raises(ValueError, match=r"seed must be an int in 0..2\*\*64-1"):
            stream_generate(model, tokenizer, "hi", temperature=1.0, seed=seed)
        for command in ("generate", "chat"):
            argv = [command, str(small), "--seed", str(seed)] + (
                ["-p", "hi"] if command == "generate" else []
            )
            assert main(argv) == 1
            err = capsys.readouterr().err.strip()
            assert "\n" not in err and "seed must be an int" in err and "Traceback" not in err


def test_prompts_past_the_context_are_refused_and_generation_ends_with_it(small, capsys):
    model, tokenizer, drafter = load_pair(small)
    with pytest.raises(
        ContextError, match=f"prompt of {CONTEXT + 4} tokens does not fit the model's context of {CONTEXT}"
    ):
        stream_generate(model, tokenizer, [5] * (CONTEXT + 4), draft_model=drafter)
    out = list(
        stream_generate(
            model, tokenizer, [2] + [5] * (CONTEXT - 11), 500, draft_model=drafter, num_draft_tokens=3
        )
    )
    assert len(out) <= 10 and (out[-1].finish_reason == "stop" or len(out) == 10)
    assert main(["generate", str(small), "-p", "word " * CONTEXT, "--no-chat-template", "-k", "3"]) == 1
    err = capsys.readouterr().err
    assert f"does not fit the model's context of {CONTEXT}" in err and "Traceback" not in err


def test_chat_survives_bad_input_and_keeps_its_conversation(small):
    _, tokenizer = load(small)
    added = tokenizer.encode("<turn|>\n" + TURN.format("why"), add_special_tokens=False)
    chat = pexpect.spawn(
        sys.executable, ["-m", "mlx_gemma_mtp", "chat", "--model", str(small), "--max-tokens", "8", "-k", "3"],
        cwd=REPO, env={**os.environ, "TERM": "dumb"}, encoding="utf-8", timeout=90, dimensions=(40, 250),
    )  # fmt: skip
    chat.expect_exact(">>> ")
    chat.sendline("hello there")
    chat.expect_exact("\r\n>>> ")
    chat.sendline("water " * CONTEXT)
    chat.expect_exact("(the conversation is full")
    chat.expect_exact(">>> ")
    chat.sendline("/nonsense")
    chat.expect_exact("unknown command /nonsense")
    chat.expect_exact(">>> ")
    chat.sendline("why")  # the conversation goes on: only the new turn is prefilled
    chat.expect_exact("\r\n>>> ")
    chat.sendline("/stats")
    chat.expect(r"prompt (\d+) tokens")
    assert int(chat.match.group(1)) == len(added) + 1  # and the cut-off answer's last token
    chat.expect_exact(">>> ")
    chat.sendline("/reset")
    chat.expect_exact("(new conversation)")
    chat.sendeof()
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0 and "Traceback" not in chat.before


def test_a_foreign_drafter_is_named_when_it_agrees_on_nothing(checkpoints, random_checkpoints, capsys):
    model, tokenizer = load(checkpoints["e2b"][0])
    foreign = load_drafter(random_checkpoints["e2b"][1], model)  # the same shapes, trained on nothing
    last = list(stream_generate(model, tokenizer, "hello", 60, draft_model=foreign, num_draft_tokens=3))[-1]
    assert last.drafted >= 32 and last.accepted == 0
    assert "no draft accepted: the drafter may not be this target's" in stats_line(last)
    warning = drafter_warning(last.drafted, last.accepted, foreign)
    assert str(random_checkpoints["e2b"][1]) in warning
    session = ChatSession(model, tokenizer, foreign, max_tokens=60, num_draft_tokens=3)
    list(session.send("hello"))
    assert session.drafter_warning() == warning.replace(str(last.drafted), str(session.drafted))
    assert session.drafter_warning() is None  # once
    own = load_drafter(checkpoints["e2b"][1], model)
    good = list(stream_generate(model, tokenizer, "hello", 60, draft_model=own, num_draft_tokens=3))[-1]
    assert good.accepted and drafter_warning(good.drafted, good.accepted, own) is None
    argv = ["generate", str(checkpoints["e2b"][0]), "-p", "hello", "-m", "60", "-k", "3"]
    assert main([*argv, "--draft-model", str(random_checkpoints["e2b"][1])]) == 0
    err = capsys.readouterr().err
    assert f"Drafter: {random_checkpoints['e2b'][1]}" in err and "warning: none of" in err


def test_mlx_lm_flags(small, capsys):
    model, tokenizer, drafter = load_pair(small)
    prompt = "the quick brown fox"
    flags = ["-m", "6", "-k", "3"]
    assert (
        main(["generate", "--model", str(small), "--prompt", prompt, *flags, "--ignore-chat-template"]) == 0
    )
    out, err = capsys.readouterr()
    expected = generate(model, tokenizer, prompt, 6, draft_model=drafter, num_draft_tokens=3)
    assert out == expected + "\n" and "generation 6 tokens" in err
    assert (
        main(
            [
                "generate",
                str(small),
                "-p",
                prompt,
                *flags,
                "--system-prompt",
                "Be brief.",
                "--verbose",
                "False",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    templated = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}],
        add_generation_prompt=True, tokenize=False,
    )  # fmt: skip
    expected = generate(model, tokenizer, templated, 6, draft_model=drafter, num_draft_tokens=3)
    assert out == expected + "\n" and "generation" not in err
    with pytest.raises(SystemExit):
        main(["generate", str(small), "--model", "other", "-p", prompt])
    assert "two models named" in capsys.readouterr().err


def test_mlx_lm_keywords(small, capsys):
    model, tokenizer, drafter = load_pair(small)
    assert [r.token for r in stream_generate(model, tokenizer, "hi", 5)] == (
        [r.token for r in stream_generate(model, tokenizer, "hi", max_tokens=5)]
    )
    text = generate(model, tokenizer, "hi", 5, draft_model=drafter, num_draft_tokens=3, verbose=True)
    assert text and "generation 5 tokens" in capsys.readouterr().out
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['temprature'\\]"):
        stream_generate(model, tokenizer, "hi", temprature=0.5)


def test_load_takes_dtype_names_and_quantizes_in_memory(small, tmp_path):
    model, _ = load(small, dtype="bfloat16")
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of bfloat16, float16, float32"):
        load(small, dtype="int8")
    model, tokenizer, drafter = load_pair(small, q_bits=8, q_group_size=32)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"
    assert type(drafter.pre_projection).__name__ == "QuantizedLinear"
    assert list(stream_generate(model, tokenizer, "hi", 4, draft_model=drafter, num_draft_tokens=2))
    with pytest.raises(ValueError, match="quantization bits must be one of"):
        load(small, q_bits=3)
    from convert import convert

    out = convert(small, out=tmp_path / "q", quantize=True, q_group_size=32, quiet=True)
    with pytest.raises(ConfigError, match="is already quantized \\(4-bit\\)"):
        load(out, q_bits=4)


def test_cli_quantizes_in_memory(small, capsys):
    argv = [
        "generate",
        str(small),
        "-p",
        "hi",
        "-m",
        "4",
        "-k",
        "2",
        "-q",
        "--q-bits",
        "8",
        "--q-group-size",
        "32",
    ]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip()


def test_one_default_length_everywhere():
    defaults = [
        inspect.signature(stream_generate).parameters["max_tokens"].default,
        inspect.signature(generate).parameters["max_tokens"].default,
        inspect.signature(ChatSession).parameters["max_tokens"].default,
        setup_generate_parser().get_default("max_tokens"),
        setup_chat_parser().get_default("max_tokens"),
    ]
    assert defaults == [DEFAULT_MAX_TOKENS] * 5
    from mlx_gemma_mtp.generate import stream_batch_generate

    assert inspect.signature(stream_batch_generate).parameters["max_tokens"].default == DEFAULT_MAX_TOKENS
    assert batch_generate is not None


def test_a_turn_cancelled_before_its_first_token_stays_in_the_conversation(small):
    model, tokenizer, drafter = load_pair(small)
    session = ChatSession(model, tokenizer, drafter, max_tokens=8, num_draft_tokens=2)
    stream = session.send("hello there")
    session.cancel()  # before the stream began: it ends before its first token
    assert list(stream) == []
    assert session.last is None
    assert session.history == [
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": ""},
    ]
    answer = list(session.send("why"))  # and the conversation goes on
    assert answer and session.last == answer[-1]


def test_the_readme_chat_session_example_runs(small, capsys):
    """README's ChatSession example, on the small fixture: the stop button pressed before the
    first token leaves the session usable and the print guarded."""
    readme = (REPO / "README.md").read_text()
    block = next(b for b in readme.split("```python")[1:] if "ChatSession(" in b).split("```")[0]
    assert '"gemma-4-E2B-it-mtp-4bit"' in block
    code = block.replace('"gemma-4-E2B-it-mtp-4bit"', repr(str(small)))
    code = code.replace('system="Be brief.")', 'system="Be brief.", max_tokens=8, num_draft_tokens=2)')
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    session = namespace["session"]
    assert session.history[-2] == {"role": "user", "content": "Why is the sky blue?"}
    assert list(session.send("and the sea?"))  # the conversation goes on
