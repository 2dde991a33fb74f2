"""What ``sdjax eval`` returns: typed values over the ``report.json`` record it writes.

``EvalResult`` is also a read-only mapping of that record (``result["recipes"]`` is the JSON list),
so code written against the file reads the returned value the same way."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True)
class RecipeResult:
    """One recipe's line of the report."""
    name: str
    family: str
    avg_bits: float              # stored bits per UNet conv/linear weight (float layers at 16)
    avg_bits_candidates: float   # the same over the mixed-bit candidate layers only
    bytes: dict                  # {component: stored bytes}
    metrics: dict                # {metric: value}; None not measured, inf identical, nan non-finite
    finite: bool                 # False when an output held NaN/Inf
    nonfinite: str | None        # what was non-finite, when not finite
    path: str                    # "simulated" (dequantized weights) or "quantized" (integer compute)
    recipe: dict                 # the rules applied (sdjax's format, or Apple's {layer: nbits})
    chosen_for: str | None = None  # why a generated mixed-bit recipe was chosen
    finetune_seconds: float | None = None  # a fine-tuned recipe's training time (every session's)

    @classmethod
    def from_json(cls, d: dict) -> "RecipeResult":
        return cls(name=d["name"], family=d.get("family", ""), avg_bits=d["avg_bits"],
                   avg_bits_candidates=d.get("avg_bits_candidates", d["avg_bits"]), bytes=dict(d.get("bytes") or {}),
                   metrics=dict(d.get("metrics") or {}), finite=bool(d.get("finite", True)),
                   nonfinite=d.get("nonfinite"), path=d.get("path", ""), recipe=d.get("recipe"),
                   chosen_for=d.get("chosen_for"), finetune_seconds=d.get("finetune_seconds"))


@dataclasses.dataclass(frozen=True)
class TargetResult:
    """One line of the report's target section."""
    name: str
    want: str
    got: str
    passed: bool

    @classmethod
    def from_json(cls, d: dict) -> "TargetResult":
        return cls(d["name"], d["want"], d["got"], bool(d["pass"]))


@dataclasses.dataclass(frozen=True, eq=False)
class EvalResult(Mapping):
    """The run's results: ``recipes`` and ``targets`` typed, ``files`` written, ``record`` the JSON."""
    record: dict
    recipes: tuple = ()
    targets: tuple = ()
    files: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_json(cls, record: dict) -> "EvalResult":
        return cls(record, tuple(RecipeResult.from_json(r) for r in record.get("recipes") or ()),
                   tuple(TargetResult.from_json(t) for t in record.get("targets") or ()),
                   dict(record.get("files") or {}))

    def recipe(self, name) -> RecipeResult:
        for r in self.recipes:
            if r.name == name:
                return r
        raise KeyError(f"no recipe {name!r} in these results; present: {[r.name for r in self.recipes]}")

    def __getitem__(self, key):
        return self.record[key]

    def __iter__(self):
        return iter(self.record)

    def __len__(self):
        return len(self.record)
