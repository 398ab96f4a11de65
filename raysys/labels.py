"""RSNA label CSV in (`ID_<image>_<subtype>,Label`), Kaggle submission CSV out."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from raysys import storage

# The one canonical label order: model outputs, label arrays and metrics all use it.
LABELS: tuple[str, ...] = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")
ANY = LABELS.index("any")


def read_labels(path: str | Path) -> pd.DataFrame:
    """RSNA `ID,Label` CSV -> frame indexed by image id with the LABELS columns (int8 0/1).

    Exact duplicate rows are dropped (RSNA stage 2 train has a few); conflicting
    duplicates, unknown subtypes, missing subtypes and labels other than 0/1 raise.
    """
    try:
        df = pd.read_csv(storage.open_bytes(path), dtype={"ID": str, "Label": str})
    except pd.errors.ParserError as e:
        raise ValueError(f"{path}: not a CSV file ({e})") from None
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: empty file; expected an ID,Label CSV") from None
    if list(df.columns[:2]) != ["ID", "Label"]:
        raise ValueError(f"{path}: expected columns ID,Label, got {list(df.columns)}")
    df = df[["ID", "Label"]]
    labels = pd.to_numeric(df["Label"], errors="coerce")
    bad = ~labels.isin([0, 1])
    if bad.any():
        row = df[bad].iloc[0]
        raise ValueError(f"{path}: line {_first_line(bad)}: label must be 0 or 1, got {row['Label']!r} for {row['ID']}"
                         f" ({int(bad.sum())} bad rows)")
    parts = df["ID"].str.rsplit("_", n=1, expand=True)
    malformed = parts[1].isna() if parts.shape[1] == 2 else pd.Series(True, index=df.index)
    if malformed.any():
        raise ValueError(f"{path}: line {_first_line(malformed)}: ID {df['ID'][malformed].iloc[0]!r} does not look like"
                         " ID_<image>_<subtype>")
    # Exact duplicates ("0" and "0.0" alike) are dropped after parsing; conflicting ones stay to be caught.
    frame = pd.DataFrame({"image_id": parts[0], "subtype": parts[1], "label": labels.astype(np.int8)}).drop_duplicates()
    unknown = ~frame["subtype"].isin(LABELS)
    if unknown.any():
        raise ValueError(f"{path}: line {_first_line(unknown)}: unknown subtype {frame['subtype'][unknown].iloc[0]!r}"
                         f" (all unknown: {sorted(set(frame['subtype'][unknown]))}); expected {list(LABELS)}")
    conflicts = frame.duplicated(["image_id", "subtype"], keep=False)
    if conflicts.any():
        first = frame[conflicts].iloc[0]
        lines = [int(i) + 2 for i in frame.index[conflicts & (frame["image_id"] == first["image_id"])
                                                 & (frame["subtype"] == first["subtype"])]]
        raise ValueError(f"{path}: lines {', '.join(map(str, lines))}: conflicting labels for "
                         f"{first['image_id']}_{first['subtype']}")
    table = frame.pivot(index="image_id", columns="subtype", values="label")
    missing = [name for name in LABELS if name not in table.columns]
    if missing:
        raise ValueError(f"{path}: no rows at all for subtypes {missing}")
    table = table[list(LABELS)]
    holes = table.isna().any(axis=1)
    if holes.any():
        image = table.index[holes][0]
        lacking = [name for name in LABELS if pd.isna(table.loc[image, name])]
        raise ValueError(f"{path}: {image} lacks subtypes {lacking} ({int(holes.sum())} images incomplete)")
    table = table.astype(np.int8)
    inconsistent = (table[[n for n in LABELS if n != "any"]].max(axis=1) > table["any"])
    if inconsistent.any():
        image = table.index[inconsistent][0]
        raise ValueError(f"{path}: {image} has a subtype labelled 1 but any 0 ({int(inconsistent.sum())} such images); "
                         "`any` is 1 whenever a subtype is")
    table.columns.name = None
    table.index.name = "image_id"
    return table


def _first_line(mask: pd.Series) -> int:
    """The CSV line of the first True row of a mask over the read frame (line 1 is the header)."""
    return int(mask.index[mask.to_numpy()][0]) + 2


def write_labels(path: str | Path, table: pd.DataFrame) -> None:
    """Write a labels frame (index image id, LABELS columns) as an RSNA `ID,Label` CSV."""
    _write_long(path, table.index.to_numpy(), table[list(LABELS)].to_numpy(), "%d")


def submission_frame(
    image_ids: Sequence[str], probabilities: np.ndarray, sample_ids: Sequence[str] | None = None
) -> pd.DataFrame:
    """`ID,Label` rows, 6 per image; in the sample submission's order when one is given.

    Raises when an image repeats, a probability is outside [0, 1] or NaN, or the
    images and the sample's images differ (no padded, dropped or invented rows).
    """
    ids = np.asarray(image_ids, dtype=object)
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.shape != (len(ids), len(LABELS)):
        raise ValueError(f"probabilities have shape {probs.shape}, expected ({len(ids)}, {len(LABELS)})")
    if len(set(ids)) != len(ids):
        dup = pd.Series(ids)[pd.Series(ids).duplicated()].iloc[0]
        raise ValueError(f"image {dup} appears more than once")
    if not np.all((probs >= 0) & (probs <= 1)):
        raise ValueError("probabilities must lie in [0, 1] (found NaN or out-of-range values)")
    frame = pd.DataFrame(
        {
            "ID": [f"{image}_{name}" for image in ids for name in LABELS],
            "Label": probs.reshape(-1),
        }
    )
    if sample_ids is None:
        return frame
    wanted = pd.Index(sample_ids)
    if wanted.has_duplicates:
        raise ValueError("the sample submission repeats IDs")
    have = pd.Index(frame["ID"])
    missing, extra = wanted.difference(have), have.difference(wanted)
    if len(missing) or len(extra):
        raise ValueError(
            f"predictions and sample submission differ: {len(missing)} sample rows without a prediction"
            f" (e.g. {list(missing[:3])}), {len(extra)} predicted rows not in the sample (e.g. {list(extra[:3])})"
        )
    return frame.set_index("ID").loc[wanted].reset_index()


def write_submission(
    path: str | Path, image_ids: Sequence[str], probabilities: np.ndarray, sample_ids: Sequence[str] | None = None
) -> pd.DataFrame:
    """Write the Kaggle submission CSV (see submission_frame) and return its frame."""
    frame = submission_frame(image_ids, probabilities, sample_ids)
    # %.9g: every float32 probability as it is; %.6g wrote 0.9999996 as 1, which the metric clips to 1 - 1e-15.
    storage.write_text(path, frame.to_csv(index=False, float_format="%.9g"))
    return frame


def sample_image_ids(sample_ids: Sequence[str]) -> list[str]:
    """Distinct image ids of a sample submission's `ID_<image>_<subtype>` rows, in order."""
    return list(dict.fromkeys(str(i).rsplit("_", 1)[0] for i in sample_ids))


def _write_long(path: str | Path, ids: np.ndarray, values: np.ndarray, fmt: str) -> None:
    lines = ["ID,Label"] + [f"{image}_{name},{fmt % value}" for image, row in zip(ids, values)
                            for name, value in zip(LABELS, row)]
    storage.write_text(path, "\n".join(lines) + "\n")
