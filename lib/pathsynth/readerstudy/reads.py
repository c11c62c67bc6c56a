"""Reading the reader-study CSVs back, strictly: every problem is an error naming the file and the row (rows
counted as a spreadsheet shows them, the header being row 1), and nothing is silently dropped.

A reads CSV has the columns ``READS_COLUMNS`` (reader_id, packet_id, image_id, answer, confidence, time_s) and
optionally ``tissue``; the page exports exactly these, the machine readers of fid_umap_coverage the first six.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..data.dataset import DataError
from ..metrics.readers import READS_COLUMNS

ANSWERS = ("real", "synthetic")
TISSUES = ("", "healthy", "cancer")


def read_reads_file(path: Path, key: pd.DataFrame) -> pd.DataFrame:
    """One CSV checked against the packet's key (columns packet_id, image_id, truth, ...)."""
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise DataError(f"{path}: not a readable CSV ({str(err).splitlines()[0]})") from None
    missing = [c for c in READS_COLUMNS if c not in df.columns]
    extra = [c for c in df.columns if c not in (*READS_COLUMNS, "tissue")]
    if missing or extra:
        raise DataError(f"{path}: columns must be {READS_COLUMNS} (+ optional 'tissue'); "
                        f"missing {missing}, unexpected {extra}")
    if df.empty:
        raise DataError(f"{path}: no reads (only a header)")
    if "tissue" not in df:
        df["tissue"] = ""
    packets = set(key["packet_id"].astype(str))
    known = set(key["image_id"].astype(str))
    seen: dict[tuple[str, str], int] = {}
    conf = np.zeros(len(df), int)
    times = np.full(len(df), np.nan)
    for i, r in enumerate(df.itertuples(index=False)):
        row = i + 2
        where = f"{path}, row {row}"
        if not r.reader_id.strip():
            raise DataError(f"{where}: empty reader_id")
        if r.packet_id not in packets:
            raise DataError(f"{where}: packet '{r.packet_id}' is not this study's packet ({', '.join(sorted(packets))})")
        if r.image_id not in known:
            raise DataError(f"{where}: unknown image id '{r.image_id}' (not in packet {r.packet_id})")
        if r.answer not in ANSWERS:
            raise DataError(f"{where}: answer '{r.answer}' is not one of {list(ANSWERS)}")
        try:
            conf[i] = int(r.confidence)
        except ValueError:
            raise DataError(f"{where}: confidence '{r.confidence}' is not a whole number from 1 to 5") from None
        if not 1 <= conf[i] <= 5:
            raise DataError(f"{where}: confidence {conf[i]} is outside 1 to 5")
        if r.time_s.strip():
            try:
                times[i] = float(r.time_s)
            except ValueError:
                raise DataError(f"{where}: time_s '{r.time_s}' is not a number") from None
        if r.tissue not in TISSUES:
            raise DataError(f"{where}: tissue '{r.tissue}' is not one of {list(TISSUES)}")
        k = (r.reader_id, r.image_id)
        if k in seen:
            raise DataError(f"{path}, rows {seen[k]} and {row}: reader '{r.reader_id}' answered image '{r.image_id}' twice")
        seen[k] = row
    df["confidence"], df["time_s"], df["file"] = conf, times, path.name
    for reader, g in df.groupby("reader_id"):
        unanswered = sorted(known - set(g["image_id"]))
        if unanswered:
            raise DataError(f"{path}: reader '{reader}' did not answer {len(unanswered)} of the packet's {len(known)} "
                            f"images (e.g. {unanswered[:3]}); a reading session must be complete")
    return df


def read_reads(folder: Path, key: pd.DataFrame) -> pd.DataFrame:
    """Every ``*.csv`` in ``folder`` (none: an empty table); a reader found in two files is an error."""
    files = sorted(Path(folder).glob("*.csv")) if Path(folder).is_dir() else []
    frames = [read_reads_file(f, key) for f in files]
    if not frames:
        return pd.DataFrame(columns=[*READS_COLUMNS, "tissue", "file"])
    reads = pd.concat(frames, ignore_index=True)
    dup = reads.groupby("reader_id")["file"].nunique()
    if (dup > 1).any():
        r = dup[dup > 1].index[0]
        raise DataError(f"{folder}: reader '{r}' has reads in several files "
                        f"({sorted(reads.loc[reads.reader_id == r, 'file'].unique())})")
    return reads


def with_truth(reads: pd.DataFrame, key: pd.DataFrame) -> pd.DataFrame:
    """reads joined with the key: truth (real / synthetic), set and index per read."""
    return reads.merge(key[["packet_id", "image_id", "truth", "set", "index"]], on=["packet_id", "image_id"], how="left",
                       validate="many_to_one")
