"""GQA questions (``*_balanced_questions.json``, ``*_all_questions.json``, ``submission_all_questions.json``)
-> LXMERT's GQA items, as the original's ``process_data.py``::

    {"img_id": "2354786", "label": {"yes": 1.0}, "question_id": "02930152", "sent": "Is the sky dark?"}

``question_id`` is the file's key (a string: ids may have leading zeros), ``img_id`` its ``imageId``; files
without answers (test, challenge, submission) give items without ``label``. Items keep the file order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tasks.data.jsonio import DataFormatError

__all__ = ["convert_gqa"]


def convert_gqa(questions: Any, source: str = "questions") -> list[dict[str, Any]]:
    """Convert one GQA questions dict ``{questionId: {imageId, question, answer?, ...}}``.

    Raises:
        DataFormatError: not a dict, or an entry without a string ``imageId`` / ``question`` or with a
            non-string ``answer`` (naming the question id).
    """
    if not isinstance(questions, Mapping):
        raise DataFormatError(
            f"{source}: not a GQA questions file (an object {{questionId: question}}, e.g. "
            "testdev_balanced_questions.json)"
        )
    items = []
    for qid, q in questions.items():
        if not isinstance(q, Mapping):
            raise DataFormatError(f"{source}: question {qid}: not an object")
        for key in ("imageId", "question"):
            if not isinstance(q.get(key), str):
                raise DataFormatError(
                    f"{source}: question {qid}: {key!r} must be a string (got {q.get(key)!r:.100})"
                )
        item: dict[str, Any] = {"img_id": q["imageId"], "question_id": str(qid), "sent": q["question"]}
        if "answer" in q:
            if not isinstance(q["answer"], str):
                raise DataFormatError(
                    f"{source}: question {qid}: 'answer' must be a string (got {q['answer']!r:.100})"
                )
            item["label"] = {q["answer"]: 1.0}
        items.append(item)
    return items
