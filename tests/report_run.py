"""Helpers shared by the report tests: a small real run folder and an HTML outline parser."""

from __future__ import annotations

import warnings
from html.parser import HTMLParser
from pathlib import Path

import torch

from pipeline.config import Config, load_config
from pipeline.evaluate.classification import run_evaluate_classify
from pipeline.evaluate.segmentation import run_evaluate_segment
from pipeline.infer.classify import run_predict_classify
from pipeline.infer.segment import run_predict_segment
from pipeline.preprocess.stage import run_preprocess
from pipeline.synth import write_cohort
from pipeline.train.classify import run_train_classify
from pipeline.train.segment import run_train_segment

SECTION_TITLES = ("Run summary", "Classifier", "Segmentation", "Predictions")


def build_run(root: Path) -> Config:
    """Every stage on a tiny phantom cohort (1–2 epochs, tiny nets) into ``root/run``; ~15 s."""
    torch.set_num_threads(1)
    manifest = write_cohort(root / "cohort", 24, 0.3, size=64, depth=40, seed=0)
    config = load_config(
        None,
        name="report-test",
        run=str(root / "run"),
        **{
            "data.manifest": str(manifest),
            "preprocess.spacing": [4.0, 4.0, 4.0],
            "preprocess.shape": [32, 32, 32],
            "preprocess.views.mode": "slab",
            "preprocess.views.thickness": 3,
            "classify.epochs": 2,
            "classify.batch_size": 8,
            "classify.features": 4,
            "classify.depth": 2,
            "classify.hidden": 8,
            "classify.n_boot": 50,
            "segment.epochs": 2,
            "segment.size": 32,
            "segment.channels": [4, 8, 16],
            "segment.num_res_units": 0,
            "segment.slices_per_volume": 4,
            "segment.batch_size": 16,
            "segment.infer_batch": 16,
        },
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_preprocess(config)
        run_train_classify(config, progress=False)
        run_evaluate_classify(config)
        run_train_segment(config)
        run_evaluate_segment(config)
        new = write_cohort(root / "new", 3, 0.5, size=64, depth=40, seed=7)
        predict = config.run_dir / "predict"  # the layout of pipeline.workflow: predict/<task>/
        run_predict_classify(config.run_dir / "classify", new.parent / "images", predict / "classify")
        run_predict_segment(config.run_dir / "segment", new.parent / "images", predict / "segment")
    return config


class Outline(HTMLParser):
    """Section headings (h2 text), image sources with their attributes, and link targets."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.headings: list[str] = []
        self.images: list[dict[str, str]] = []
        self.links: list[str] = []
        self.notes: list[str] = []
        self._capture: list[str] | None = None
        self._tag = ""
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = {k: v or "" for k, v in attrs}
        if tag == "img":
            self.images.append(attr)
        elif tag == "a" and "href" in attr:
            self.links.append(attr["href"])
        elif tag == "h2" or (tag == "p" and "note" in attr.get("class", "").split()):
            self._capture, self._tag = [], tag

    def handle_data(self, data: str) -> None:
        if self._capture is not None:
            self._capture.append(data)

    def handle_endtag(self, tag: str) -> None:
        if self._capture is not None and tag == self._tag:
            text = " ".join("".join(self._capture).split())
            (self.headings if tag == "h2" else self.notes).append(text)
            self._capture = None
