"""lxmert-serve: the HTTP API against the answerer (answers equal lxmert-answer's), bad inputs answered with a 4xx
while the server goes on, concurrent requests answered in micro batches, /api/health during a slow batch, the page
in a real headless browser (with a screenshot)."""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn
import websocket
from answer_model import SMALL, build_answer_model, make_image
from fastapi.testclient import TestClient
from PIL import Image

from extract.runner import ExtractConfig
from tasks.answer.answerer import Answerer
from tasks.serve.app import create_app
from tasks.serve.cli import main as serve_main
from tasks.serve.cli import model_info
from tasks.serve.uploads import ImageStore, UploadLimits
from tasks.serve.worker import AnswerWorker

QUESTION = "What is the man holding?"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("serve")
    built = build_answer_model(root)
    examples = root / "examples"
    examples.mkdir()
    for k in range(3):
        make_image(examples / f"ex{k}.png", 50 + 10 * k, 70, seed=10 + k)
    built["examples"] = examples
    return built


@pytest.fixture(scope="module")
def answerer(built: dict) -> Answerer:
    config = ExtractConfig(out="", weights=str(built["weights"]), config="vg_tiny", device="cpu", **SMALL)
    return Answerer.load(built["model_dir"], config)


def _server(answerer: Answerer, built: dict, limits: UploadLimits | None = None, **worker_kw):
    worker = AnswerWorker(answerer, **worker_kw)
    store = ImageStore(limits or UploadLimits())
    examples = {p.name: p for p in sorted(built["examples"].iterdir())}
    return create_app(worker, store, model_info(answerer, str(built["model_dir"])), examples), worker, store


@pytest.fixture()
def client(answerer: Answerer, built: dict):
    app, worker, store = _server(answerer, built, UploadLimits(max_bytes=200_000, max_pixels=200 * 200))
    with TestClient(app) as c:
        yield c
    worker.close()
    store.close()


def _png(path: Path) -> bytes:
    return Path(path).read_bytes()


# ------------------------------------------------------------------------------------------------ the API
def test_answers_equal_lxmert_answer_and_regions_are_reused(client, answerer: Answerer, built: dict) -> None:
    r = client.post(
        "/api/answer",
        data={"question": QUESTION, "top_k": "3", "draw": "true"},
        files={"image": ("photo.png", _png(built["image"]), "image/png")},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    want = answerer.answer(built["image"], QUESTION, top_k=3).to_dict()  # what lxmert-answer --json prints
    got = body["results"][0]
    assert got["image"] == "photo.png" and got["question"] == QUESTION
    assert [a["answer"] for a in got["answers"]] == [a["answer"] for a in want["answers"]]
    assert [a["prob"] for a in got["answers"]] == pytest.approx(
        [a["prob"] for a in want["answers"]], abs=1e-6
    )
    assert [g["box"] for g in got["regions"]] == [g["box"] for g in want["regions"]]
    assert body["timing"]["extract_s"] > 0
    picture = Image.open(io.BytesIO(base64.b64decode(body["picture"].split(",", 1)[1])))
    assert picture.format == "PNG" and max(picture.size) >= 64
    # a second question about the same image: its regions are reused (by id, or by sending the file again)
    again = client.post("/api/answer", data={"question": "what color?", "image_id": body["image_id"]})
    assert again.status_code == 200, again.text
    assert again.json()["timing"]["extract_s"] == 0.0
    resent = client.post(
        "/api/answer",
        data={"question": "and now?"},
        files={"image": ("x.png", _png(built["image"]), "image/png")},
    )
    assert resent.json()["image_id"] == body["image_id"] and resent.json()["timing"]["extract_s"] == 0.0
    assert "/" not in got["image"]  # the server's own file path never leaves it


def test_several_questions_examples_model_and_health(client, built: dict) -> None:
    r = client.post("/api/answer", data={"question": ["what is it?", "is it red?"], "example": "ex1.png"})
    assert r.status_code == 200, r.text
    assert [x["question"] for x in r.json()["results"]] == ["what is it?", "is it red?"]
    assert client.get("/api/examples").json()[0] == {"name": "ex0.png", "url": "/api/examples/ex0.png"}
    assert client.get("/api/examples/ex2.png").content == _png(built["examples"] / "ex2.png")
    info = client.get("/api/model").json()
    assert info["answers"] == 7 and info["extractor"]["config"] == "vg_tiny" and info["max_batch"] == 8
    assert client.get("/api/health").json()["status"] == "ok"
    page = client.get("/")
    assert page.status_code == 200 and "<title>lxmert-serve</title>" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from a CDN: works offline


@pytest.mark.parametrize(
    ("data", "files", "status", "message"),
    [
        (
            {"question": QUESTION},
            {"image": ("notes.png", b"not an image at all", "image/png")},
            415,
            "notes.png",
        ),
        (
            {"question": QUESTION},
            {"image": ("big.png", b"\x89PNG" + b"0" * 300_000, "image/png")},
            413,
            "limit",
        ),
        ({"question": QUESTION}, "huge", 413, "pixels"),
        ({"question": QUESTION}, {"image": ("empty.png", b"", "image/png")}, 400, "empty"),
        ({"question": "   "}, "photo", 422, "empty"),
        ({"question": "why " * 100}, "photo", 422, "characters"),
        ({}, "photo", 422, "question"),
        ({"question": QUESTION}, None, 400, "exactly one"),
        ({"question": QUESTION, "example": "../../etc/passwd"}, None, 404, "no example"),
        ({"question": QUESTION, "image_id": "deadbeef"}, None, 404, "upload it"),
        ({"question": QUESTION, "top_k": "0"}, "photo", 422, ""),
    ],
)
def test_bad_input_gets_a_4xx_and_the_server_goes_on(
    client, built: dict, tmp_path: Path, data, files, status, message
) -> None:
    if files == "photo":
        files = {"image": ("photo.png", _png(built["image"]), "image/png")}
    elif files == "huge":
        Image.new("RGB", (300, 300), (9, 9, 9)).save(
            tmp_path / "huge.png"
        )  # 90,000 pixels > the 40,000 limit
        files = {"image": ("huge.png", _png(tmp_path / "huge.png"), "image/png")}
    r = client.post("/api/answer", data=data, files=files)
    assert r.status_code == status, r.text
    assert message.lower() in str(r.json()["detail"]).lower()
    ok = client.post("/api/answer", data={"question": QUESTION, "example": "ex0.png"})
    assert ok.status_code == 200


# ------------------------------------------------------------------------------------------------ concurrency
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Running:
    """A real uvicorn server on 127.0.0.1 in a thread."""

    def __init__(self, app) -> None:
        self.port = _free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return f"http://127.0.0.1:{self.port}"
            time.sleep(0.05)
        raise RuntimeError("the test server did not start")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def test_concurrent_requests_are_all_answered_in_micro_batches(answerer: Answerer, built: dict) -> None:
    app, worker, store = _server(answerer, built, max_batch=4, max_wait_s=0.3)
    names = sorted(p.name for p in built["examples"].iterdir())
    jobs = [(names[k % 3], f"question {k}?") for k in range(10)]
    expected = {(n, q): answerer.answer(built["examples"] / n, q).answers[0].answer for n, q in jobs}
    with _Running(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        with ThreadPoolExecutor(len(jobs)) as pool:
            replies = list(
                pool.map(lambda j: http.post("/api/answer", data={"example": j[0], "question": j[1]}), jobs)
            )
    worker.close()
    store.close()
    assert [r.status_code for r in replies] == [200] * len(jobs)
    for (name, q), r in zip(jobs, replies):
        assert r.json()["results"][0]["answers"][0]["answer"] == expected[(name, q)]
    assert sum(worker.batches) == len(jobs) and max(worker.batches) > 1 and max(worker.batches) <= 4


def test_health_answers_while_a_slow_batch_runs(answerer: Answerer, built: dict, monkeypatch) -> None:
    release = threading.Event()
    slow = answerer.answer_batch

    def blocked(pairs, top_k=5):
        release.wait(30)
        return slow(pairs, top_k)

    app, worker, store = _server(answerer, built)
    monkeypatch.setattr(answerer, "answer_batch", blocked)
    with _Running(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(http.post, "/api/answer", data={"example": "ex0.png", "question": QUESTION})
            time.sleep(0.3)
            health = http.get("/api/health")
            assert health.status_code == 200 and health.json()["status"] == "ok"
            assert not pending.done()  # the answer is still waiting on the device thread
            release.set()
            assert pending.result().status_code == 200
    worker.close()
    store.close()


def test_cli_refuses_bad_arguments_before_loading(built: dict, capsys) -> None:
    assert serve_main(["--model", str(built["model_dir"]), "--max-batch", "0"]) == 2
    assert "--max-batch must be > 0" in capsys.readouterr().err
    assert serve_main(["--model", str(built["model_dir"]), "--random-weights", "--port", "70000"]) == 2
    assert "is not a port number" in capsys.readouterr().err
    assert (
        serve_main(["--model", str(built["root"] / "nope"), "--random-weights", "--config", "vg_tiny"]) == 2
    )
    assert "no such folder or file" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ the page
def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


class _DevTools:
    """The smallest Chrome DevTools Protocol client: one page, commands by id."""

    def __init__(self, ws_url: str) -> None:
        self.ws = websocket.create_connection(ws_url, timeout=60)
        self.next_id = 0

    def __call__(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def js(self, expression: str):
        return self("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, seconds: float = 60) -> None:
        end = time.time() + seconds
        while not self.js(expression):
            if time.time() > end:
                raise AssertionError(f"the page never reached: {expression}")
            time.sleep(0.1)


@pytest.mark.slow
def test_the_page_in_a_headless_browser(answerer: Answerer, built: dict, tmp_path: Path) -> None:
    """A real Chromium opens the page, uploads an image, asks, and shows the answers and the drawn picture; the
    screenshot is kept in runs/screenshots/lxmert-serve.png (beside tmp_path's copy)."""
    browser = _chromium()
    if browser is None:
        pytest.skip(
            "no Chromium here (Debian: apt-get install chromium); tests/run.sh installs it where it can"
        )
    app, worker, store = _server(answerer, built)
    want = [a.answer for a in answerer.answer(built["image"], QUESTION).answers]
    profile = tmp_path / "profile"
    with _Running(app) as url:
        proc = subprocess.Popen(
            [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--remote-debugging-port=0",
             f"--user-data-dir={profile}", "--window-size=1200,900", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            port_file = profile / "DevToolsActivePort"
            for _ in range(300):
                if port_file.is_file() and port_file.read_text().strip():
                    break
                time.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            targets = httpx.get(f"http://127.0.0.1:{port}/json", timeout=30).json()
            page = _DevTools(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"])
            page("Page.enable")
            page("Page.navigate", url=url + "/")
            page.wait_for(
                "document.readyState === 'complete' && document.querySelectorAll('#examples img').length === 3"
            )
            root = page("DOM.getDocument")["root"]["nodeId"]
            file_input = page("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
            page("DOM.setFileInputFiles", files=[str(built["image"])], nodeId=file_input)
            page.wait_for("!document.getElementById('preview').hidden")
            page.js(f"document.getElementById('question').value = {json.dumps(QUESTION)};"
                    "document.getElementById('go').click(); true")  # fmt: skip
            page.wait_for(
                "!document.getElementById('result').hidden && "
                "document.getElementById('picture').src.startsWith('data:image/png') && "
                "document.getElementById('picture').complete"
            )
            shown = page.js("[...document.querySelectorAll('.answer-text')].map(e => e.textContent)")
            timing = page.js("document.getElementById('timing').textContent")
            looked = page.js("document.querySelectorAll('#regions li').length")
            shot = base64.b64decode(page("Page.captureScreenshot", format="png")["data"])
        finally:
            proc.kill()
            proc.wait()
    worker.close()
    store.close()
    assert shown == want and "s in all" in timing and looked == 5
    (tmp_path / "lxmert-serve.png").write_bytes(shot)
    keep = Path(__file__).resolve().parents[2] / "runs" / "screenshots"
    keep.mkdir(parents=True, exist_ok=True)
    (keep / "lxmert-serve.png").write_bytes(shot)
    width, height = Image.open(io.BytesIO(shot)).size
    assert width == 1200 and height > 600
