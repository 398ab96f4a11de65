import numpy as np
import pandas as pd
import pytest

from raysys.labels import LABELS, read_labels, sample_image_ids, submission_frame, write_labels, write_submission


def _csv(tmp_path, rows, name="labels.csv"):
    path = tmp_path / name
    path.write_text("ID,Label\n" + "".join(f"{i},{v}\n" for i, v in rows))
    return path


def _rows(image, values):
    return [(f"{image}_{name}", v) for name, v in zip(LABELS, values)]


def test_read_labels_pivots_to_canonical_order(tmp_path):
    # Rows in a scrambled order, as in the real CSV: the frame must come out in LABELS order.
    rows = _rows("ID_a", [0, 1, 0, 0, 0, 1])[::-1] + _rows("ID_b", [0, 0, 0, 0, 0, 0])
    table = read_labels(_csv(tmp_path, rows))
    assert list(table.columns) == list(LABELS)
    assert table.loc["ID_a"].tolist() == [0, 1, 0, 0, 0, 1]
    assert table.loc["ID_b"].sum() == 0
    assert table.index.name == "image_id"


def test_exact_duplicates_are_dropped(tmp_path):
    rows = _rows("ID_a", [1, 0, 0, 0, 0, 1])
    table = read_labels(_csv(tmp_path, rows + rows[:3] + [("ID_a_any", "1.0")]))
    assert len(table) == 1


@pytest.mark.parametrize(
    "rows, message",
    [
        (_rows("ID_a", [1, 0, 0, 0, 0, 1]) + [("ID_a_epidural", 0)], "lines 2, 8: conflicting labels for ID_a_epidural"),
        (_rows("ID_a", [1, 0, 0, 0, 0, 1])[:5] + _rows("ID_b", [0] * 6), "ID_a lacks subtypes \\['any'\\]"),
        (_rows("ID_a", [0] * 6) + _rows("ID_b", [2, 0, 0, 0, 0, 1]), "line 8: label must be 0 or 1, got '2' for ID_b_epidural"),
        (_rows("ID_a", [0] * 6) + [("ID_a_hematoma", 0)], "line 8: unknown subtype 'hematoma'"),
        (_rows("ID_a", [0] * 6) + _rows("ID_b", [0, 0, 1, 0, 0, 0]), "ID_b has a subtype labelled 1 but any 0"),
        (_rows("ID_a", [0] * 6) + [("nounderscore", 0)], "line 8: ID 'nounderscore' does not look like"),
    ],
)
def test_bad_label_files_raise(tmp_path, rows, message):
    with pytest.raises(ValueError, match=message):
        read_labels(_csv(tmp_path, rows))


def test_empty_and_garbled_files_name_the_file(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match=f"{empty}: empty file"):
        read_labels(empty)
    garbled = tmp_path / "garbled.csv"
    garbled.write_text('ID,Label\nID_a_any,0\n"ID_b_any,1\n')  # an unclosed quote
    with pytest.raises(ValueError, match=f"{garbled}: not a CSV file"):
        read_labels(garbled)


def test_write_labels_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    table = pd.DataFrame(rng.integers(0, 2, (5, 6)), index=[f"ID_{i:03x}" for i in range(5)], columns=list(LABELS))
    table["any"] = table[list(LABELS[:-1])].max(axis=1)  # `any` is 1 whenever a subtype is
    write_labels(tmp_path / "l.csv", table)
    back = read_labels(tmp_path / "l.csv")
    assert (back.loc[table.index].to_numpy() == table.to_numpy()).all()


def test_submission_has_six_rows_per_image_in_sample_order(tmp_path):
    ids = ["ID_x", "ID_y", "ID_z"]
    probs = np.arange(18).reshape(3, 6) / 20
    sample = [f"{i}_{n}" for i in ["ID_z", "ID_x", "ID_y"] for n in LABELS]
    frame = write_submission(tmp_path / "s.csv", ids, probs, sample_ids=sample)
    back = pd.read_csv(tmp_path / "s.csv")
    assert back["ID"].tolist() == sample
    assert back.loc[back.ID == "ID_x_subdural", "Label"].item() == pytest.approx(probs[0, 4])
    assert len(frame) == 18
    assert sample_image_ids(sample) == ["ID_z", "ID_x", "ID_y"]


def test_submission_keeps_every_float32_probability_as_it_is(tmp_path):
    """A probability just under 1 (or over 0) is written as itself, not rounded to 1, which the metric would clip
    to 1 - 1e-15: 34.5 for a negative instead of 14.7."""
    probs = np.array([[0.9999996, 1e-7, 0.123456789, 0.5, 0.99999994, 0.0]], dtype=np.float32)
    write_submission(tmp_path / "s.csv", ["ID_a"], probs)
    back = pd.read_csv(tmp_path / "s.csv")["Label"].to_numpy()
    np.testing.assert_array_equal(back.astype(np.float32), probs[0])


def test_submission_refuses_missing_extra_duplicate_or_invalid():
    probs = np.full((2, 6), 0.5)
    with pytest.raises(ValueError, match="sample rows without a prediction"):
        submission_frame(["ID_a", "ID_b"], probs, [f"ID_c_{n}" for n in LABELS])
    with pytest.raises(ValueError, match="more than once"):
        submission_frame(["ID_a", "ID_a"], probs)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        submission_frame(["ID_a", "ID_b"], probs * 3)
    with pytest.raises(ValueError, match="shape"):
        submission_frame(["ID_a"], probs)
