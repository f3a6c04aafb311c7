"""Where things live in a labelgate workspace — declared once. dvc.yaml names the same paths
(tests/test_dvc_deps.py checks that the two agree)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())

    @property
    def params(self) -> Path: return self.root / "params.yaml"
    @property
    def raw(self) -> Path: return self.root / "data" / "raw"
    @property
    def eval(self) -> Path: return self.root / "data" / "eval"
    @property
    def validated(self) -> Path: return self.root / "data" / "validated"
    @property
    def prepared(self) -> Path: return self.root / "data" / "prepared"
    @property
    def review(self) -> Path: return self.root / "data" / "review"
    @property
    def review_ledger(self) -> Path: return self.root / "data" / "review-flags.jsonl"
    @property
    def candidate_model(self) -> Path: return self.root / "models" / "candidate" / "model.safetensors"
    @property
    def candidate_metrics(self) -> Path: return self.root / "models" / "candidate" / "metrics.json"
    @property
    def registry(self) -> Path: return self.root / "models" / "registry"
    @property
    def evaluation(self) -> Path: return self.root / "reports" / "evaluation" / "evaluation.json"
    @property
    def decision(self) -> Path: return self.root / "reports" / "gate" / "decision.json"
    @property
    def report(self) -> Path: return self.root / "reports" / "gate" / "report.md"
    @property
    def report_html(self) -> Path: return self.root / "reports" / "gate" / "report.html"
    @property
    def latency(self) -> Path: return self.root / "reports" / "latency.json"   # not cached by DVC
    @property
    def dvc_lock(self) -> Path: return self.root / "dvc.lock"
    @property
    def state(self) -> Path: return self.root / ".labelgate"       # git-ignored local state
    @property
    def studio(self) -> Path: return self.state / "studio"          # embedded Label Studio
    @property
    def run_lock(self) -> Path: return self.state / "run.lock"
    @property
    def last_run(self) -> Path: return self.state / "last_run.json"
