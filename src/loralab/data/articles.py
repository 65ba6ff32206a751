"""Article records for regression: ``{"id", "title", "content", "labels": [numbers], "dimension_names": [...]}``.

Like classification records, a malformed row is dropped and counted by reason, never raised. The run's dimensions
are ``data.dimension_names`` or, when that is null, those of the first valid training row; rows with other
dimensions are dropped (``dimension_names_mismatch``), since their scores would land in the wrong heads.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from loralab.data.records import MAX_ROW_BYTES, DataError, LoadReport, read_rows
from loralab.data.text import TokenizedTexts

log = logging.getLogger(__name__)


@dataclass
class Article:
    id: str | int
    title: str
    content: str
    labels: list[float]
    dimension_names: list[str]


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def text_of_row(row: dict[str, Any]) -> tuple[str, str] | str:
    """(title, content) of a parsed JSON object, or the reason it is dropped."""
    title, content = row.get("title", ""), row.get("content", "")
    if not isinstance(title, (str, type(None))) or not isinstance(content, (str, type(None))):
        return "text_not_string"
    title, content = title or "", content or ""
    if not (title.strip() or content.strip()):
        return "missing_text"
    return title, content


def article_from_row(row: dict[str, Any]) -> Article | str:
    """An Article from a parsed JSON object (id already checked), or the reason it is dropped."""
    text = text_of_row(row)
    if isinstance(text, str):
        return text
    title, content = text
    labels = row.get("labels")
    if labels is None:
        return "missing_labels"
    if not isinstance(labels, list) or not labels:
        return "labels_not_list"
    if not all(_number(v) for v in labels):
        return "label_not_number"
    if not all(math.isfinite(v) for v in labels):
        return "non_finite_label"  # e.g. 1e999 parses to inf
    dims = row.get("dimension_names")
    if not isinstance(dims, list) or not dims or not all(isinstance(d, str) and d for d in dims):
        return "missing_dimension_names"
    if len(dims) != len(labels):
        return "labels_length_mismatch"
    return Article(id=row["id"], title=title, content=content, labels=[float(v) for v in labels], dimension_names=dims)


def load_articles(
    path: str | Path, dimension_names: Sequence[str] | None, max_row_bytes: int = MAX_ROW_BYTES
) -> tuple[list[Article], LoadReport, list[str]]:
    """Valid rows (first occurrence of an id wins), the per-reason drop report and the dimensions in force."""
    dims: list[str] | None = list(dimension_names) if dimension_names is not None else None

    def parse(row: dict[str, Any]) -> Article | str:
        nonlocal dims
        article = article_from_row(row)
        if isinstance(article, str):
            return article
        dims = dims if dims is not None else list(article.dimension_names)
        return article if article.dimension_names == dims else "dimension_names_mismatch"

    articles, report = read_rows(path, parse, max_row_bytes=max_row_bytes)
    if not articles:
        raise DataError(f"{path}: no valid rows left ({dict(report.dropped)})")
    return articles, report, dims


def article_text(article: Article, template: str) -> str:
    return template.format(title=article.title, content=article.content)


def unlabelled_texts(path: str | Path, template: str) -> list[str]:
    """The texts of a JSONL file of articles that need no labels (pretraining input); bad rows counted, dropped."""
    rows, _ = read_rows(path, text_of_row)  # (title, content) pairs; a str is a drop reason
    return [template.format(title=title, content=content) for title, content in rows]


class TokenizedArticles(TokenizedTexts):
    """Each article's text and its score vector."""

    def __init__(self, articles: Sequence[Article], tokenizer, template: str, max_length: int):
        super().__init__(
            [article_text(a, template) for a in articles],
            [a.id for a in articles],
            [a.labels for a in articles],
            tokenizer,
            max_length,
        )
