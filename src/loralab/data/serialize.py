"""How a record becomes the text the model reads: ``conf/serialize`` picks a serializer.

A serializer is fitted on the training split only; its state is plain JSON saved with the model (``loralab.json``,
``checkpoint_best``) and rebuilt from there by predict/evaluate (``load_serializer``), so every text is made the
same way in training and at inference. Tokens per record are most of a step's cost, so the compact forms are also
the fast ones.

- ``json``: ``json.dumps(features, sort_keys=True)`` — the plain JSON form, byte for byte.
- ``kv``: ``key=value`` pairs, sorted keys, numbers to ``digits`` significant digits, booleans 1/0.
- ``bins``: every number as its per-feature bin, one character each (``0`` … ``9``, then ``a`` … ``z`` above ten
  bins; edges from the training split): one token per number whatever the bin count; booleans 1/0; categories
  as written. The edges are quantiles, or
  (``cuts: tree``) the cut points a small decision tree on that feature alone finds against the training labels,
  so a threshold a rule uses becomes a bin edge instead of falling inside a bin.

Meanings the model can rely on: a missing value (``null`` under ``data.allow_null``, or a key the record lacks)
reads as ``?`` in ``kv`` and ``bins`` (``null``/absent in ``json``, as the record has it). In ``bins`` a category
not seen in training, or a value of another type than the feature had in training, also reads as ``?`` (unknown:
nothing was learnt about it), a number beyond the training range falls into the first or last bin, and a key not
seen in training is left out. ``json`` and ``kv`` write whatever the record holds.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
from sklearn.tree import DecisionTreeClassifier

from loralab.data.records import Record

log = logging.getLogger(__name__)

UNKNOWN = "?"  # missing, unseen or mistyped value (kv, bins)
# One character per bin, so a bin is one token in every tokenizer that splits digits (Qwen's, and the one trained
# on the data): bin 12 as "12" would be the tokens "1" "2", sharing "1" with bin 1.
BIN_SYMBOLS = "0123456789abcdefghijklmnopqrstuvwxyz"
BASE36, DECIMAL = "base36", "decimal"  # how a fitted Bins writes a bin: BIN_SYMBOLS, or as a number (older models)


def serialize(features: dict[str, Any], template: str = "{features}") -> str:
    """Feature text the model reads. Sorted keys make the text independent of the writer's key order."""
    return template.format(features=json.dumps(features, sort_keys=True, ensure_ascii=True))


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def short_number(v: float, digits: int | None) -> str:
    """``digits`` significant digits, never in exponent notation (``1065``, ``0.07871``, ``12350``)."""
    if isinstance(v, int):
        return str(v)
    if digits is None:
        return repr(v)
    return np.format_float_positional(v, precision=digits, unique=True, fractional=False, trim="-")


def flag(v: bool) -> str:
    return "1" if v else "0"


def text_value(v: str) -> str:
    """A category without whitespace, so pairs stay one-space separated."""
    return "_".join(v.split()) or "_"


class Serializer:
    """Features -> text inside ``template``. Stateless unless ``fit`` learns something from the training split."""

    kind: ClassVar[str]

    def __init__(self, template: str = "{features}"):
        self.template = template

    def fit(self, records: Sequence[Record]) -> Serializer:
        return self

    def body(self, features: Mapping[str, Any]) -> str:
        raise NotImplementedError

    def __call__(self, features: Mapping[str, Any]) -> str:
        return self.template.format(features=self.body(features))

    def params(self) -> dict[str, Any]:
        return {"template": self.template}

    def fitted(self) -> dict[str, Any]:
        return {}

    def load_fitted(self, fitted: Mapping[str, Any]) -> None:
        pass

    def state(self) -> dict[str, Any]:
        """Everything needed to rebuild this serializer, as JSON-able values (saved with the model)."""
        return {"kind": self.kind, "params": self.params(), "fitted": self.fitted()}


class Json(Serializer):
    """Today's form: the record's features as sorted JSON (``null`` stays ``null``)."""

    kind = "json"

    def body(self, features: Mapping[str, Any]) -> str:
        return json.dumps(features, sort_keys=True, ensure_ascii=True)


class KeyValue(Serializer):
    """``atr=1.234 session=london wave_strength=0.55``: no quotes, braces or commas."""

    kind = "kv"

    def __init__(self, template: str = "{features}", digits: int | None = 4):
        super().__init__(template)
        self.digits = digits

    def params(self) -> dict[str, Any]:
        return {**super().params(), "digits": self.digits}

    def value(self, v: Any) -> str:
        if v is None:
            return UNKNOWN
        if isinstance(v, bool):
            return flag(v)
        if is_number(v):
            return short_number(v, self.digits)
        return text_value(str(v))

    def body(self, features: Mapping[str, Any]) -> str:
        return " ".join(f"{k}={self.value(features[k])}" for k in sorted(features))


class Bins(Serializer):
    """``atr=7 session=london wave_strength=c``: numbers as their training-split bin, one character each.

    A number with at most ``n_bins`` distinct training values gets one bin per value (edges half-way between
    them: ``ext_dir`` -1/1 reads 0/1). Any other gets at most ``n_bins`` bins: equal-count ones (``cuts:
    quantile``, fewer where ties merge edges), or (``cuts: tree``) those of a decision tree fitted on that feature
    alone against the training labels, every bin holding at least a quantile bin's rows and at least 5 (a
    feature the tree cannot cut at all keeps its quantile bins).
    """

    kind = "bins"

    def __init__(self, template: str = "{features}", n_bins: int = 10, cuts: str = "quantile"):
        super().__init__(template)
        self.n_bins, self.cuts = n_bins, str(cuts)
        self.features: dict[str, dict[str, Any]] = {}  # per key: {"type": number|bool|category, edges|values}
        self._known: dict[str, frozenset[str]] = {}
        self.symbols = BASE36

    def params(self) -> dict[str, Any]:
        return {**super().params(), "n_bins": self.n_bins, "cuts": self.cuts}

    def fit(self, records: Sequence[Record]) -> Bins:
        values: dict[str, list[tuple[Any, Any]]] = {}
        for r in records:
            for k, v in r.features.items():
                if v is not None:
                    values.setdefault(k, []).append((v, r.label))
        features = {k: self._fit_one(*zip(*pairs)) for k, pairs in sorted(values.items())}
        self.load_fitted({"features": features, "symbols": BASE36})
        return self

    def _fit_one(self, vs: Sequence[Any], labels: Sequence[Any]) -> dict[str, Any]:
        if all(isinstance(v, bool) for v in vs):
            return {"type": "bool"}
        if all(is_number(v) for v in vs):
            x = np.asarray(vs, dtype=np.float64)
            distinct = np.unique(x)
            if len(distinct) <= self.n_bins:
                edges = (distinct[:-1] + distinct[1:]) / 2
            else:
                edges = self._tree_edges(x, labels) if self.cuts == "tree" else np.array([])
                if not len(edges):
                    edges = np.unique(np.quantile(x, np.arange(1, self.n_bins) / self.n_bins))
            return {"type": "number", "edges": [float(e) for e in edges]}
        return {"type": "category", "values": sorted({str(v) for v in vs})}

    def _tree_edges(self, x: np.ndarray, labels: Sequence[Any]) -> np.ndarray:
        """Supervised discretisation: the thresholds of a best-first tree with ``n_bins`` leaves on ``x`` alone."""
        if any(y is None for y in labels) or len(set(labels)) < 2:
            return np.array([])  # nothing to cut against: quantiles
        # No bin smaller than a decile's rows (and >= 5): the cuts move to where the labels change, they do not get
        # finer. Half a decile isolated too few rows on 124-row wine (3 seeds: 0.950 vs 0.965 mean macro-F1).
        min_rows = max(5, len(x) // self.n_bins)
        tree = DecisionTreeClassifier(max_leaf_nodes=self.n_bins, min_samples_leaf=min_rows, random_state=0)
        tree.fit(x[:, None], [str(y) for y in labels])
        cuts = np.unique(tree.tree_.threshold[tree.tree_.feature >= 0])
        # The tree compares in float32: put each cut half-way between the float64 training values it separates.
        distinct = np.unique(x)
        above = np.searchsorted(distinct.astype(np.float32), cuts.astype(np.float32), side="right")
        return np.unique((distinct[above - 1] + distinct[above]) / 2)

    def fitted(self) -> dict[str, Any]:
        return {"features": self.features, "symbols": self.symbols}

    def load_fitted(self, fitted: Mapping[str, Any]) -> None:
        self.features = {k: dict(spec) for k, spec in fitted["features"].items()}
        self._known = {k: frozenset(spec.get("values", ())) for k, spec in self.features.items()}
        # A model saved without its symbols wrote bins as decimal numbers ("12"): it keeps reading them that way.
        self.symbols = fitted.get("symbols", DECIMAL)

    def bin_index(self, key: str, v: Any) -> int | None:
        """The bin of ``v`` under number feature ``key`` (0 … n_bins-1); None where it reads as unknown."""
        if not is_number(v) or not math.isfinite(v):
            return None
        return int(np.searchsorted(self.features[key]["edges"], v, side="right"))

    def value(self, key: str, v: Any) -> str:
        spec = self.features[key]
        kind = spec["type"]
        if kind == "bool":
            return flag(v) if isinstance(v, bool) else UNKNOWN
        if kind == "number":
            b = self.bin_index(key, v)
            if b is None:
                return UNKNOWN
            return BIN_SYMBOLS[b] if self.symbols == BASE36 else str(b)
        if v is None or isinstance(v, bool) or str(v) not in self._known[key]:
            return UNKNOWN
        return text_value(str(v))

    def body(self, features: Mapping[str, Any]) -> str:
        if not self.features:
            raise RuntimeError("serialize=bins: fit() on the training records before serializing")
        return " ".join(f"{k}={self.value(k, features.get(k))}" for k in self.features)


SERIALIZERS: dict[str, type[Serializer]] = {c.kind: c for c in (Json, KeyValue, Bins)}


def load_serializer(state: Mapping[str, Any]) -> Serializer:
    """The serializer a model was trained with, from its saved ``state``. Only the shipped kinds are built (a
    model file never names code to run)."""
    kind = state.get("kind")
    if kind not in SERIALIZERS:
        raise ValueError(f"serializer kind {kind!r}: unknown (known: {', '.join(SERIALIZERS)})")
    serializer = SERIALIZERS[kind](**state.get("params", {}))
    serializer.load_fitted(state.get("fitted", {}))
    return serializer


def serialize_records(
    records: Sequence[Record], serializer: Callable[[Mapping[str, Any]], str] | str = "{features}"
) -> list[str]:
    """The text of each record: what a tokenizer is trained on, what continued pretraining reads, what the
    classifier sees. ``serializer`` is a fitted serializer, or a template for the ``json`` form."""
    if isinstance(serializer, str):
        serializer = Json(serializer)
    return [serializer(r.features) for r in records]
