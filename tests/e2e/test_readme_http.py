"""README's HTTP examples (the curl line and the `openai` snippet beside grpcurl's), run as printed
against `llmos up` on the demo knowledge base. The code comes from README.md itself, so the
documentation cannot drift from what works; only the gateway's address is the test stack's own
port instead of 8080."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, NatsServer, free_port, platform_environment
from tests.e2e.test_stack_cli import llmos

pytestmark = pytest.mark.e2e

SECTION = "The same platform over HTTP"
README_GATEWAY = "http://127.0.0.1:8080"
README_KEY = "dev-key"


def readme_http_blocks() -> tuple[str, str]:
    """(the bash block, the python block) that follow the README's HTTP paragraph."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(SECTION):]
    section = section[:section.index("\n## ")]
    [shell] = re.findall(r"^```bash\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL)
    [snippet] = re.findall(r"^```python\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL)
    return shell, snippet


def test_the_readme_http_examples_answer_with_citations_as_printed(models_home: Path, tmp_path: Path) -> None:
    shell, snippet = readme_http_blocks()
    assert README_GATEWAY in shell and README_GATEWAY in snippet and README_KEY in snippet
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(models_home / "models", target_is_directory=True)
    env = platform_environment(NatsServer(f"nats://127.0.0.1:{free_port()}", free_port(), tmp_path), home)
    env["LLMOS_NATS_MONITOR_PORT"] = str(free_port())
    # The README's key, as .env defines it: an administrator of the demo tenant.
    env["LLMOS_API_KEYS"] += f",{README_KEY}=dev:demo:admin"
    gateway = f"http://{env['LLMOS_GATEWAY_ADDR']}"
    up = llmos(env, tmp_path, "up", "--detach")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        ingested = llmos(env, REPO, "ingest", "demo/kb/", "--api-key", README_KEY, timeout=300)
        assert ingested.returncode == 0, ingested.stdout + ingested.stderr

        curl = subprocess.run(
            ["bash", "-c", shell.replace(README_GATEWAY, gateway)], cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
        )
        assert curl.returncode == 0, curl.stdout + curl.stderr
        completion = json.loads(curl.stdout)
        answer = completion["choices"][0]["message"]["content"]
        assert "gift card" in answer.lower(), answer
        assert any("Gift cards" in citation["title"] for citation in completion["citations"]), completion["citations"]

        (tmp_path / "client.py").write_text(snippet.replace(README_GATEWAY, gateway))
        printed = subprocess.run(
            [sys.executable, str(tmp_path / "client.py")], cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
        )
        assert printed.returncode == 0, printed.stdout + printed.stderr
        assert "Returns and refunds" in printed.stdout, printed.stdout
    finally:
        down = llmos(env, tmp_path, "down", timeout=60)
    assert down.returncode == 0, down.stdout + down.stderr
