"""The `mlx-gemma-mtp` command as a person uses it: chat in a pseudo-terminal, generate from a pipe,
and mistakes answered with one line."""

from __future__ import annotations

import io
import os
import pathlib
import re
import shutil
import subprocess
import sys
import types

import pexpect
import pytest

from mlx_gemma_mtp import ChatSession, generate, load, load_drafter
from mlx_gemma_mtp.cli import main

REPO = pathlib.Path(__file__).resolve().parents[1]
TURN = "<|turn>user\n{}<turn|>\n<|turn>model\n"  # the fixture template's user turn (Gemma 4 format)
PROMPT = "\r\n>>> "  # the chat prompt, as the terminal shows it after an answer


@pytest.fixture(autouse=True)
def private_home(tmp_path, monkeypatch):
    """The CLI runs in subprocesses: keep their cost measurements ("auto") out of ~/.cache."""
    monkeypatch.setenv("HOME", str(tmp_path))


@pytest.fixture(scope="module")
def model_dir(checkpoints, tmp_path_factory):
    """A target with its drafter beside it as `<name>-assistant`, as Google names them."""
    root = tmp_path_factory.mktemp("cli")
    target, drafter = checkpoints["e2b"]
    shutil.copytree(target, root / "tiny-it")
    shutil.copytree(drafter, root / "tiny-it-assistant")
    return root / "tiny-it"


@pytest.fixture(scope="module")
def pair(model_dir):
    model, tokenizer = load(model_dir)
    return model, tokenizer, load_drafter(f"{model_dir}-assistant", model)


def _run(*args, stdin: str = "", env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlx_gemma_mtp", *args],
        check=False,
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def test_the_commands_run_mlx_cuda_without_graphs_unless_told():
    """The commands' own process turns CUDA graphs off (mlx_gemma_mtp/cuda.py) unless the
    environment chose; importing the package changes nothing."""
    env = {k: v for k, v in os.environ.items() if k != "MLX_USE_CUDA_GRAPHS"}
    show = "import os, sys, mlx_gemma_mtp.cli as c; {} print(os.environ.get('MLX_USE_CUDA_GRAPHS'))"
    run = [sys.executable, "-c", show.format("c.main(['--help']);")]
    assert subprocess.run(run, env=env, cwd=REPO, capture_output=True, text=True).stdout.split()[-1] == "0"
    env["MLX_USE_CUDA_GRAPHS"] = "1"
    assert subprocess.run(run, env=env, cwd=REPO, capture_output=True, text=True).stdout.split()[-1] == "1"
    del env["MLX_USE_CUDA_GRAPHS"]
    imported = [sys.executable, "-c", show.format("")]
    assert subprocess.run(imported, env=env, cwd=REPO, capture_output=True, text=True).stdout.split() == [
        "None"
    ]


def _templated(tokenizer, text: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )


def test_chat_in_a_terminal(model_dir, pair):
    model, tokenizer, drafter = pair
    # What the session answers, to compare with the screen: two turns ...
    expected = ChatSession(model, tokenizer, drafter, max_tokens=200)
    answers = [list(expected.send(text)) for text in ("hello there", "and the water")]
    # ... and a first question whose answer runs long enough to be stopped with Ctrl-C.
    for long_question in ("tell me a long story about the water", "why", "who are you", "say more"):
        if list(ChatSession(model, tokenizer, drafter, max_tokens=200).send(long_question))[-1].finish_reason:
            break
    else:
        pytest.fail("every candidate answer stops early: add a question that runs long")

    chat = pexpect.spawn(
        sys.executable,
        ["-m", "mlx_gemma_mtp", "chat", str(model_dir), "--max-tokens", "200"],
        cwd=REPO,
        env={**os.environ, "TERM": "dumb"},
        encoding="utf-8",
        timeout=90,
        dimensions=(40, 250),
    )
    chat.expect_exact(f"(drafter {model_dir}-assistant)")  # found beside the target as tiny-it-assistant
    chat.expect_exact(">>> ")

    for text, answer in zip(("hello there", "and the water"), answers):
        chat.sendline(text)
        chat.expect_exact(PROMPT)
        shown = chat.before.replace("\r\n", "\n")
        assert shown.startswith(text + "\n" + "".join(r.text for r in answer))

    chat.sendline("/stats")
    chat.expect_exact(PROMPT)
    stats = chat.before
    # The second turn prefilled only its own tokens (and the first answer's last one).
    closing = "\n" if answers[0][-1].finish_reason == "stop" else "<turn|>\n"
    added = tokenizer.encode(closing + TURN.format("and the water"), add_special_tokens=False)
    assert f"prompt {len(added) + 1} tokens" in stats
    for field in ("tok/s", "generation", "acceptance", "mean accepted length", "chosen k", "peak memory"):
        assert field in stats

    chat.sendline("/reset")
    chat.expect_exact("(new conversation)")
    chat.expect_exact(">>> ")
    chat.sendline(long_question)
    chat.expect_exact(long_question + "\r\n")
    chat.expect(r"[^\r\n]{15}")  # the answer is streaming
    chat.sendintr()
    assert chat.expect_exact(["[stopped]", "[interrupted]", "Traceback"]) == 0
    chat.expect_exact(">>> ")
    chat.sendline("/stats")
    chat.expect(r"generation (\d+) tokens")
    assert int(chat.match.group(1)) < 200
    chat.expect_exact(PROMPT)

    # The session goes on after Ctrl-C, prefilling only the new turn (and the cut-off answer's
    # last token): its cache is consistent.
    chat.sendline("why")
    chat.expect_exact(PROMPT)
    chat.sendline("/stats")
    chat.expect(r"prompt (\d+) tokens")
    added = tokenizer.encode("<turn|>\n" + TURN.format("why"), add_special_tokens=False)
    assert int(chat.match.group(1)) == len(added) + 1
    chat.expect_exact(PROMPT)

    chat.sendline("/help")
    chat.expect_exact("/reset")
    chat.expect_exact(PROMPT)
    chat.sendline("/reset")
    chat.expect_exact("(new conversation)")
    chat.expect_exact(">>> ")
    chat.sendeof()
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_generate_reads_stdin(model_dir, pair):
    model, tokenizer, drafter = pair
    out = _run("generate", str(model_dir), "--max-tokens", "24", stdin="the quick brown fox\n")
    assert out.returncode == 0, out.stderr
    expected = generate(
        model, tokenizer, _templated(tokenizer, "the quick brown fox"), 24, draft_model=drafter
    )
    assert out.stdout == expected + "\n"
    lines = out.stderr.strip().splitlines()
    said, stats = lines[0], lines[-1]
    assert said == f"Drafter: {model_dir}-assistant"  # which drafter decodes
    assert "Measuring this device's drafting costs once" in lines[1]  # "auto", the first time
    assert re.search(r"prompt \d+ tokens, [\d.]+ tok/s \| generation \d+ tokens, [\d.]+ tok/s", stats)
    assert re.search(r"acceptance \d+% \(\d+/\d+\)", stats) and "peak memory" in stats


def test_generate_flags(checkpoints, model_dir, pair, capsys, monkeypatch):
    model, tokenizer, drafter = pair
    prompt = "the quick brown fox"
    assert (
        main(["generate", str(model_dir), "-p", prompt, "-m", "16", "--no-chat-template", "--no-draft"]) == 0
    )
    out, err = capsys.readouterr()
    assert out == generate(model, tokenizer, prompt, 16) + "\n"
    assert "no drafting" in err

    sampling = {"temperature": 0.8, "top_p": 0.9, "seed": 3}
    flags = ["--temperature", "0.8", "--top-p", "0.9", "--seed", "3", "-k", "2"]
    monkeypatch.setattr(sys, "stdin", io.StringIO(prompt))
    assert main(["generate", str(model_dir), "-m", "16", *flags]) == 0
    out, err = capsys.readouterr()
    templated = _templated(tokenizer, prompt)
    assert (
        out
        == generate(model, tokenizer, templated, 16, draft_model=drafter, num_draft_tokens=2, **sampling)
        + "\n"
    )
    assert "acceptance" in err

    # A lone target (its drafter is not named `-assistant`): decoded alone, with a note;
    # --draft-model names the drafter.
    target, other_drafter = checkpoints["e2b"]
    assert main(["generate", str(target), "-p", prompt, "-m", "8"]) == 0
    err = capsys.readouterr().err
    assert "No drafter found" in err and "no drafting" in err
    assert main(["generate", str(target), "-p", prompt, "-m", "8", "--draft-model", str(other_drafter)]) == 0
    assert "acceptance" in capsys.readouterr().err


def _one_line_error(err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and all(w in lines[0] for w in words), err


def test_mistakes_get_one_line(tmp_path, model_dir, capsys, monkeypatch):
    cases = [
        (["generate", str(tmp_path / "nowhere"), "-p", "hi"], 1, "no such model directory"),
        (["chat", str(tmp_path / "nowhere")], 1, "no such model directory"),
        (["generate", str(tmp_path), "-p", "hi"], 1, "config.json is missing"),
        (["generate", str(model_dir), "-p", "hi", "-k", "99"], 1, "num_draft_tokens"),
        (["generate", str(model_dir), "-p", "hi", "--temperature", "-1"], 1, "temperature"),
        (["frobnicate"], 2, "unknown command 'frobnicate'"),
    ]
    for argv, code, words in cases:
        assert main(argv) == code, argv
        _one_line_error(capsys.readouterr().err, words)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    for argv, words in [
        (["generate", str(model_dir), "--bogus"], "unrecognized arguments: --bogus"),
        (["generate", str(model_dir), "-m", "0"], "expected a positive int"),
        (["generate", str(model_dir), "-k", "many"], "expected an int, 'auto' or 'heuristic'"),
        (["generate", str(model_dir)], "the prompt is empty"),
        (["chat", "--draft-model", "x", "--no-draft"], "not allowed with"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2, argv
        _one_line_error(capsys.readouterr().err, words)


def test_no_network_gets_one_line():
    """The default model is fetched from the hub; offline and not cached, that is one sentence."""
    out = _run("generate", "-p", "hi", env={"HF_HUB_OFFLINE": "1", "HF_HOME": "/nonexistent/hf-home"})
    assert out.returncode == 1
    _one_line_error(out.stderr, "google/gemma-4-E2B-it", "cannot fetch")


def test_dispatch(capsys, monkeypatch):
    assert main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert all(name in usage for name in ("convert", "generate", "chat", "bench"))
    assert main([]) == 2
    # convert and bench are top-level packages, imported when asked for, given the rest of argv.
    with pytest.raises(SystemExit) as exit_:
        main(["convert", "--help"])
    assert exit_.value.code == 0 and "usage: mlx-gemma-mtp convert" in capsys.readouterr().out
    calls = []
    monkeypatch.setitem(
        sys.modules, "bench", types.SimpleNamespace(main=lambda argv: calls.append(argv) or 7)
    )
    assert main(["bench", "--shapes", "e2b"]) == 7 and calls == [["--shapes", "e2b"]]
    monkeypatch.setitem(sys.modules, "bench", None)  # what an install without it looks like
    assert main(["bench"]) == 1
    _one_line_error(capsys.readouterr().err, "'bench' package is not available")
