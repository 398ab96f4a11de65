"""index.html, a run's report as one page: self-contained, escaped, its numbers those of the metrics; written by the
real `raysys evaluate` beside its PNGs, and opened from disk by a real headless Chromium."""

import json
import logging
import math
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from raysys.cli import main as cli_main  # noqa: E402
from raysys.config import Config  # noqa: E402
from raysys.labels import LABELS  # noqa: E402
from raysys.model import save_checkpoint  # noqa: E402
from raysys.report import Table, write_index  # noqa: E402
from raysys.synthetic import PhantomConfig, write_dataset  # noqa: E402
from raysys.testing import untrained_cnn  # noqa: E402

SIZE = 80
HOSTILE = '<script>alert("x")</script>'


class Page(HTMLParser):
    """What the tests read from a page: every attribute value, the <img> sources, the <title>, and each table's
    rows as lists of cell texts, by the table's class."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.attributes, self.images, self.tables, self.title = [], [], {}, ""
        self._table = self._row = self._cell = None
        self._in_title = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.attributes += [value or "" for _, value in attrs]
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "table":
            self._table = self.tables.setdefault(attrs.get("class", ""), [])
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "title":
            self._in_title = True

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "tr":
            self._table.append(self._row)
        elif tag == "title":
            self._in_title = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._in_title:
            self.title += data


def _png(path: Path, color: str) -> None:
    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot([0, 1], [0, 1], color=color)
    fig.savefig(path, format="png", dpi=50)
    plt.close(fig)


def _four(value) -> str:
    """How the test expects a metric written: 4 decimals, a missing one (NaN or JSON null) as n/a."""
    return "n/a" if value is None or math.isnan(value) else "%.4f" % value


def _assert_self_contained(page_text: str, page: Page, folder: Path) -> None:
    for url in ("http://", "https://"):
        assert url not in page_text
    assert not [a for a in page.attributes if a.startswith("//")]
    assert "<script" not in page_text.lower()
    assert page.images
    for src in page.images:
        name = unquote(src)
        assert name == Path(name).name, src  # a bare file name: the folder opens wherever it is moved
        assert (folder / name).is_file(), src


def test_page_is_self_contained_escaped_and_shows_the_metrics(tmp_path):
    _png(tmp_path / "roc.png", "red")
    _png(tmp_path / "sweep of lr.png", "blue")  # a space: the src must still name the file
    (tmp_path / "metrics.json").write_text("{}")
    aucs = [0.91234, float("nan"), 0.5, 0.66666, 0.7, 0.83333]
    metrics = {
        "n_images": 42, "weighted_log_loss": 0.23456789, "prior_weighted_log_loss": 0.34567, "prior_source": "training split",
        "per_class_log_loss": {name: 0.01 + 0.05 * j for j, name in enumerate(LABELS)},
        "per_class_auc": dict(zip(LABELS, aucs)), "positives": {name: 3 * j for j, name in enumerate(LABELS)},
        "cnn": {"n_images": 42, "weighted_log_loss": 0.31, "per_class_log_loss": {name: 0.2 for name in LABELS},
                "per_class_auc": {name: 0.6 + 0.01 * j for j, name in enumerate(LABELS)}},
        "sequence_vs_cnn": 0.23456789 / 0.31,
    }
    title = f"run {HOSTILE}"
    path = write_index(tmp_path, title, facts={"checkpoint": f"ck{HOSTILE}", "images": 42}, metrics=metrics,
                       tables=[Table("Trials", ["trial", "lr"], [[HOSTILE, 0.00123456]])],
                       figures=[("roc.png", f"ROC {HOSTILE}"), ("sweep of lr.png", "the sweep")], files=["metrics.json"])
    assert Path(path) == tmp_path / "index.html"
    text = Path(path).read_text()
    page = Page(text)
    _assert_self_contained(text, page, tmp_path)
    assert sorted(unquote(s) for s in page.images) == ["roc.png", "sweep of lr.png"]

    # Data strings are escaped, and read back as they were written.
    assert page.title == title
    assert "&lt;script&gt;" in text
    assert ["checkpoint", f"ck{HOSTILE}"] in page.tables["facts"]
    assert page.tables["data"] == [["trial", "lr"], [HOSTILE, "0.001235"]]

    # The metrics table, the sequence stage beside its CNN alone, expected strings computed here.
    rows = page.tables["metrics"]
    assert rows[0] == ["label", "log loss (with sequence stage)", "log loss (CNN alone)", "AUC (with sequence stage)",
                       "AUC (CNN alone)", "positives"]
    assert rows[1] == ["weighted log loss", "0.2346", "0.3100", "", "", ""]
    assert rows[2] == ["prior baseline", "0.3457", "", "", "", ""]
    for j, name in enumerate(LABELS):
        expected = [name, "%.4f" % (0.01 + 0.05 * j), "0.2000", _four(aucs[j]), "%.4f" % (0.6 + 0.01 * j), str(3 * j)]
        assert rows[3 + j] == expected
    assert rows[4][3] == "n/a"  # a label with one class has no AUC

    # Figures and files must be plain names of files already in the folder.
    with pytest.raises(ValueError, match="missing.png is not in"):
        write_index(tmp_path, "t", facts={}, figures=[("missing.png", "")])
    with pytest.raises(ValueError, match="not a plain file name"):
        write_index(tmp_path, "t", facts={}, figures=[("../roc.png", "")])


# --- the real `raysys evaluate` -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated(ray_session, tmp_path_factory):
    """`raysys evaluate` run in-process on phantom DICOMs (one unreadable) with an untrained CNN checkpoint."""
    root = tmp_path_factory.mktemp("report_index")
    frame = write_dataset(root / "data", PhantomConfig(studies=3, slices_per_study=(4, 5), size=128, seed=7,
                                                       quirks=True, quirk_files=1))
    model = untrained_cnn(frame.loc[frame["quirk"] != "truncated", "path"], SIZE)  # answers that differ by image
    model.logit_offset.copy_(torch.tensor([-3.0, -2, -2, -2, -2, -1]))
    ck = save_checkpoint(root / "runs" / "ck", model, config=Config().replace(**{"data.image_size": SIZE}).to_dict(),
                         epoch=1, metrics={}, extra_meta={"label_prior": [0.01, 0.05, 0.04, 0.05, 0.06, 0.14]})
    out = root / "evaluation"
    lines = _Lines()
    logging.getLogger("raysys").addHandler(lines)
    try:
        cli_main(["evaluate", "--checkpoint", str(ck), "--data", str(root / "data" / "dicoms"), "--labels",
                  str(root / "data" / "labels.csv"), "--out", str(out), "--batch-size", "4", "--actors", "1"])
    finally:
        logging.getLogger("raysys").removeHandler(lines)
    return {"root": root, "out": out, "log": lines.messages}


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_evaluate_writes_the_page_beside_its_pngs(evaluated):
    out = evaluated["out"]
    index = out / "index.html"
    assert [m for m in evaluated["log"] if m.startswith("report: ")] == [f"report: {index}"]
    text = index.read_text()
    page = Page(text)
    _assert_self_contained(text, page, out)
    assert page.images == ["roc.png", "calibration.png"]
    assert 'href="metrics.json"' in text and 'href="errors.csv"' in text
    assert str(evaluated["root"]) not in text  # names of the checkpoint and data, not the machine's folders

    metrics = json.loads((out / "metrics.json").read_text())
    rows = {row[0]: row[1:] for row in page.tables["metrics"]}
    assert rows["label"] == ["log loss", "AUC", "positives"]
    assert rows["weighted log loss"][0] == "%.4f" % metrics["weighted_log_loss"]
    assert rows["prior baseline"][0] == "%.4f" % metrics["prior_weighted_log_loss"]
    for name in LABELS:
        assert rows[name] == [_four(metrics["per_class_log_loss"][name]), _four(metrics["per_class_auc"][name]),
                              str(metrics["positives"][name])]
    facts = dict(row for row in page.tables["facts"])
    assert facts["command"] == "raysys evaluate" and facts["checkpoint"] == "runs/ck"
    assert facts["images scored"] == str(metrics["n_images"]) and facts["unreadable files"] == "1"


def test_the_page_opens_from_disk_in_a_real_browser_after_the_folder_moves(evaluated, tmp_path):
    from browser import chromium
    from selenium.webdriver.common.by import By

    moved = tmp_path / "moved"
    shutil.copytree(evaluated["out"], moved)  # the folder alone, elsewhere: nothing may point back
    with chromium(window=(1280, 2000)) as driver:
        driver.get((moved / "index.html").as_uri())
        images = driver.execute_script("return Array.from(document.images).map(i => [i.getAttribute('src'), "
                                       "i.complete, i.naturalWidth, i.getBoundingClientRect().width]);")
        assert [src for src, *_ in images] == ["roc.png", "calibration.png"]
        for src, complete, natural_width, shown_width in images:
            assert complete and natural_width > 0 and shown_width > 0, src
        table = driver.find_element(By.CSS_SELECTOR, "table.metrics")
        assert table.is_displayed() and table.size["height"] > 0
        assert "weighted log loss" in table.text and "prior baseline" in table.text
        shot = tmp_path / "index.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 0
