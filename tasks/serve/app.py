"""The routes of ``lxmert-serve`` (FastAPI).

- ``GET /``: the page (one HTML file, no CDN: it works offline);
- ``POST /api/answer``: multipart form ``image`` (a file) or ``example`` (a name from ``/api/examples``) or
  ``image_id`` (an earlier upload's id), ``question`` (repeatable), ``top_k``, ``draw``; answers
  ``{"image_id", "results": [lxmert-answer --json object, ...], "errors": [...], "timing": {...}, "picture"?}``;
- ``GET /api/health``, ``GET /api/model``, ``GET /api/examples``, ``GET /api/examples/{name}``.

Bad input is a 4xx with ``{"detail": message}`` and the server goes on: 400 malformed (no image, empty file),
413 too large (bytes or pixels), 415 not an image, 422 no / empty / over-long question.
"""

from __future__ import annotations

import asyncio
import time
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from tasks.answer.results import AnswerResult
from tasks.serve.uploads import ImageStore, UploadError
from tasks.serve.worker import AnswerWorker, Job, data_url

__all__ = ["create_app"]


def create_app(
    worker: AnswerWorker, store: ImageStore, model_info: dict[str, Any], examples: dict[str, Path]
) -> FastAPI:
    """The app over a running :class:`AnswerWorker`, an :class:`ImageStore` and the bundled ``examples``."""
    app = FastAPI(title="lxmert-serve", docs_url="/api/docs", redoc_url=None)
    limits = store.limits
    page = resources.files("tasks.serve").joinpath("page.html").read_text(encoding="utf-8")
    started = time.time()

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/api/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "queued": worker.busy, "uptime_s": round(time.time() - started, 1)}

    @app.get("/api/model")
    async def model() -> dict[str, Any]:
        return model_info | {"max_batch": worker.max_batch, "limits": limits.__dict__}

    @app.get("/api/examples")
    async def list_examples() -> list[dict[str, str]]:
        return [{"name": name, "url": f"/api/examples/{name}"} for name in examples]

    @app.get("/api/examples/{name}")
    async def example(name: str) -> FileResponse:
        if name not in examples:  # a name from the table, never a path
            raise HTTPException(404, f"no example {name!r}; GET /api/examples lists them")
        return FileResponse(examples[name])

    @app.post("/api/answer")
    async def answer(
        question: Annotated[list[str], Form()] = [],  # noqa: B006 - FastAPI copies form defaults
        image: Annotated[UploadFile | None, File()] = None,
        example: Annotated[str | None, Form()] = None,
        image_id: Annotated[str | None, Form()] = None,
        top_k: Annotated[int, Form(ge=1, le=50)] = 5,
        draw: Annotated[bool, Form()] = False,
    ) -> JSONResponse:
        start = time.perf_counter()
        questions = _checked_questions(question, limits.max_question_chars, limits.max_questions)
        name, image_id, path = await _the_image(store, examples, image, example, image_id, limits.max_bytes)
        job = Job(path, questions, top_k=top_k, draw=draw)
        done = await asyncio.wrap_future(worker.submit(job))
        results, errors = [], []
        for q, r in zip(questions, done.results):
            if isinstance(r, AnswerResult):
                results.append(r.to_dict() | {"image": name, "extract_s": r.extract_s, "model_s": r.model_s})
            else:
                errors.append({"question": q, "error": str(r).replace(str(path), name)})
        if not results:
            raise HTTPException(422, "; ".join(e["error"] for e in errors))
        body: dict[str, Any] = {
            "image": name,
            "image_id": image_id,
            "results": results,
            "errors": errors,
            "timing": {
                "total_s": round(time.perf_counter() - start, 4),
                "queued_s": round(done.queued_s, 4),
                "extract_s": round(max(r["extract_s"] for r in results), 4),
                "model_s": round(results[0]["model_s"], 4),
                "batch_questions": done.batch_questions,
            },
        }
        if done.picture is not None:
            body["picture"] = data_url(done.picture)
        return JSONResponse(body)

    return app


def _checked_questions(questions: list[str], max_chars: int, max_count: int) -> list[str]:
    questions = [q.strip() for q in questions]
    if not questions or not all(questions):
        raise HTTPException(
            422, "give a question (form field 'question'; it may be repeated), not an empty one"
        )
    if len(questions) > max_count:
        raise HTTPException(422, f"{len(questions)} questions in one request; at most {max_count}")
    long = next((q for q in questions if len(q) > max_chars), None)
    if long is not None:
        raise HTTPException(422, f"a question of {len(long)} characters; at most {max_chars}")
    return questions


async def _the_image(
    store: ImageStore,
    examples: dict[str, Path],
    upload: UploadFile | None,
    example: str | None,
    image_id: str | None,
    max_bytes: int,
) -> tuple[str, str, Path]:
    """``(shown name, image id, the server's own file)`` of the request's image."""
    given = [x for x in (upload, example, image_id) if x]
    if len(given) != 1:
        raise HTTPException(400, "give exactly one of: an image file ('image'), 'example' or 'image_id'")
    if example:
        if example not in examples:
            raise HTTPException(404, f"no example {example!r}; GET /api/examples lists them")
        return example, f"example:{example}", examples[example]
    if image_id:
        path = store.get(image_id)
        if path is None:
            raise HTTPException(
                404, f"image_id {image_id[:16]}... is not (or no longer) on the server; upload it"
            )
        return image_id[:12], image_id, path
    assert upload is not None
    data = await upload.read(max_bytes + 1)
    name = Path(upload.filename or "upload").name[:100]
    try:
        image_id, path = await run_in_threadpool(store.add, data, name)
    except UploadError as e:
        raise HTTPException(e.status, str(e)) from None
    return name, image_id, path
