"""The README's train-and-use walkthrough, run literally against a server started as `make run` starts it.

The commands are read from README.md (the bash block of "Train and use an adapter" and the Python
block after it), so the README cannot drift from what works: on the random-weights distilgpt2 base,
on CPU, the adapter it trains must answer with the sentence of ``examples/fixed_sentence.jsonl``.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from testing.server import running_server

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
BIN = Path(sys.executable).parent


def _section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else None]


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def _taught_sentence() -> str:
    rows = [json.loads(line) for line in (REPO / "examples/fixed_sentence.jsonl").read_text().splitlines()]
    (sentence,) = {row["response"] for row in rows}
    return sentence


def _make_run_flags() -> list[str]:
    """The flags `make run` gives the server (besides its folders)."""
    makefile = (REPO / "Makefile").read_text()
    recipe = re.search(r"^run:.*\n\t(.+)$", makefile, re.M).group(1)
    flags = shlex.split(recipe.split("-m service", 1)[1])
    return [f for f in flags if f.startswith("--") and not f.endswith("-dir")]


def test_the_readme_walkthrough_teaches_the_sentence(tmp_path: Path) -> None:
    section = _section("Train and use an adapter")
    (bash,) = _blocks(section, "bash")
    commands = [line.split("  #")[0].strip() for line in bash.splitlines() if line.strip()]
    assert len(commands) == 3 and all(c.startswith(".venv/bin/loraserve ") for c in commands), commands
    (expected,) = _blocks(section, "text")
    sentence = _taught_sentence()
    assert expected.strip() == sentence  # the README says what the user will see

    flags = _make_run_flags()
    assert flags == ["--allow-random-weights"], flags  # what this test mirrors; update both together
    # `make run` serves the default base ("distilgpt2"): unreachable here, so random weights of its shape.
    with running_server("distilgpt2", tmp_path / "adapters", tmp_path / "data", args=flags) as srv:
        env = {"LORASERVE_URL": srv.url, "PATH": f"{BIN}:/usr/bin:/bin", "NO_COLOR": "1"}
        outputs, seconds = [], []
        for command in commands:
            argv = shlex.split(command)
            argv[0] = str(BIN / Path(argv[0]).name)  # the venv the tests run in (.venv under make test)
            started = time.monotonic()
            done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
            seconds.append(time.monotonic() - started)
            assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-3000:])
            outputs.append(done.stdout)
        print(
            f"README walkthrough on the random distilgpt2 base: train {seconds[0]:.0f} s, "
            f"generate {seconds[1]:.1f} s"
        )
        assert outputs[1].strip() == sentence, outputs[1]
        assert "demo" in outputs[2]

        # The Python block: the same job through the client package, against this server.
        (python,) = _blocks(section, "python")
        assert '"http://127.0.0.1:8000"' in python
        script = python.replace('"http://127.0.0.1:8000"', json.dumps(srv.url))
        done = subprocess.run(
            [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=900
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.strip().splitlines()[-1].strip() == sentence, done.stdout[-2000:]
