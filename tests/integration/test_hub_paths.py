"""Local path versus Hub id: a missing path fails at once without touching the network; a repo id
that is neither a local folder nor a Hub repo says both, after one request (no retry storm), and
HF_HUB_OFFLINE is named only when it is set. The Hub is a local HTTP server counting requests."""

from __future__ import annotations

import http.server
import threading

import pytest

from dgrepair.cli import main


class _Hub(http.server.BaseHTTPRequestHandler):
    status = 404
    error_code = "RepoNotFound"
    hits: list[str] = []

    def _answer(self) -> None:
        type(self).hits.append(self.path)
        self.send_response(self.status)
        if self.error_code:
            self.send_header("X-Error-Code", self.error_code)
        self.send_header("Content-Type", "application/json")
        body = b'{"error": "Repository not found"}'
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_HEAD = _answer

    def log_message(self, *args) -> None:  # quiet
        pass


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants

    handler = type("Hub", (_Hub,), {"hits": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "")
    yield handler
    server.shutdown()


@pytest.mark.parametrize("spec", ["./work/bse", "/nonexistent/ckpt", "~/no-such-ckpt-dir", "work/a/bse"])
def test_a_missing_path_is_no_such_directory_without_network(hub, spec, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "--base", spec, "--ft", spec]) == 2
    err = capsys.readouterr().err
    assert f"base checkpoint {spec}: no such directory." in err
    assert "Traceback" not in err and "Hub" not in err and "HF_HUB_OFFLINE" not in err
    assert hub.hits == []


def test_an_existing_local_folder_is_a_path_even_when_it_looks_like_a_repo_id(hub, pair, capsys, monkeypatch):
    monkeypatch.chdir(pair.base.parent)
    assert main(["plan", "--base", "base", "--ft", "ft"]) == 0
    (pair.base.parent / "org").mkdir()
    (pair.base.parent / "org" / "name").symlink_to(pair.base)
    assert main(["plan", "--base", "org/name", "--ft", "ft"]) == 0
    assert hub.hits == []


def test_a_typo_that_could_be_a_repo_id_names_both_and_asks_once(hub, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "--base", "work/bse", "--ft", "work/bse"]) == 2
    err = capsys.readouterr().err
    assert "base checkpoint work/bse: no local folder work/bse and no Hub repo work/bse" in err
    assert "HF_HUB_OFFLINE" not in err and "Traceback" not in err
    assert [h for h in hub.hits if "/models/" in h] == ["/api/models/work/bse"]  # one lookup, no retries


def test_an_unreachable_hub_fails_after_one_request(hub, capsys, tmp_path, monkeypatch):
    hub.status, hub.error_code = 503, None
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "--base", "org/model", "--ft", "org/model"]) == 2
    err = capsys.readouterr().err
    assert "no local folder org/model, and the Hugging Face Hub could not be asked about repo org/model" in err
    assert "HF_HUB_OFFLINE" not in err
    assert [h for h in hub.hits if "/models/" in h] == ["/api/models/org/model"]


def test_offline_mode_is_named_when_it_is_set(hub, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "--base", "org/model", "--ft", "org/model"]) == 2
    err = capsys.readouterr().err
    assert "no local folder org/model, and repo org/model is not in the local Hugging Face cache " \
           "(HF_HUB_OFFLINE is set); download it first or unset HF_HUB_OFFLINE." in err
    assert hub.hits == []
