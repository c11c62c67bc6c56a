"""A blinded reader-study packet: one self-contained offline HTML page and its answer key apart.

The packet mixes real test patches and synthetic patches, balanced (as many real as synthetic), in a seeded
random order under anonymous random ids. Every image is embedded as a lossless PNG of its native pixels (real
and synthetic encoded alike, so the file format gives nothing away) and shown magnified with visible pixels.
The page (``page.html``) keeps the reader's answers in the browser's localStorage under the packet id, so a
reload or a browser restart loses nothing, and exports them as a CSV (``READS_COLUMNS`` + ``tissue``). The
answer key (image id -> truth, set, index) is written to a separate file and is never in the page: the ids are
random tokens, the order is shuffled, and no file name, attribute or metadata of the page carries the truth.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.dataset import DataError, ImageSet

TEMPLATE = Path(__file__).with_name("page.html")
KEY_COLUMNS = ["packet_id", "image_id", "truth", "set", "index", "label"]


@dataclass
class Packet:
    packet_id: str
    key: pd.DataFrame  # KEY_COLUMNS, in the order the page shows the images
    images: np.ndarray  # uint8 [N, H, W, 3], the same order


def make_packet(real: ImageSet, synthetic: dict[str, ImageSet], n_per_set: int, seed: int, name: str) -> Packet:
    """``n_per_set`` images of each synthetic set and as many real images in all (n_per_set x sets), each drawn
    without replacement by a seeded generator; the packet id names the study and a hash of the content."""
    n_sets = len(synthetic)
    if n_sets == 0:
        raise DataError("reader_stats.sets: no synthetic set named; a packet needs at least one")
    n_real = n_per_set * n_sets
    short = {s: len(ds) for s, ds in synthetic.items() if len(ds) < n_per_set}
    if short:
        raise DataError(f"reader_stats.n_per_set {n_per_set}: these synthetic sets have fewer images: {short}")
    if len(real) < n_real:
        raise DataError(f"reader_stats: a balanced packet of {n_per_set} x {n_sets} synthetic images needs {n_real} real "
                        f"test images; the real test split has {len(real)}")
    sizes = {s: ds.image_size for s, ds in synthetic.items() if ds.image_size != real.image_size}
    if sizes:
        raise DataError(f"reader_stats: synthetic sets {sizes} are not {real.image_size} px like the real test images")
    rng = np.random.default_rng(seed)
    rows, images = [], []
    pick = np.sort(rng.choice(len(real), n_real, replace=False))
    rows += [("real", "real_test", int(i), int(real.y[i])) for i in pick]
    images.append(real.x[pick])
    for s, ds in synthetic.items():
        pick = np.sort(rng.choice(len(ds), n_per_set, replace=False))
        rows += [("synthetic", s, int(i), int(ds.y[i])) for i in pick]
        images.append(ds.x[pick])
    images = np.concatenate(images)
    order = rng.permutation(len(rows))
    digest = hashlib.sha256(images[order].tobytes()).hexdigest()[:8]
    packet_id = f"{name}-{digest}"
    ids, taken = [], set()
    while len(ids) < len(rows):  # anonymous ids: random tokens, unrelated to set, order or truth
        token = f"{int(rng.integers(0, 16 ** 6)):06x}"
        if token not in taken:  # (kept in the order drawn: a set's order would change with the hash seed)
            taken.add(token)
            ids.append(token)
    key = pd.DataFrame([{"packet_id": packet_id, "image_id": ids[k], "truth": rows[j][0], "set": rows[j][1],
                         "index": rows[j][2], "label": rows[j][3]} for k, j in enumerate(order)], columns=KEY_COLUMNS)
    return Packet(packet_id, key, images[order])


def png_data_uri(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def render_page(packet: Packet, display_px: int = 384) -> str:
    """The reader's page: the template with the packet id and the images (id and pixels only) filled in."""
    size = int(packet.images.shape[1])
    scale = max(1, display_px // size)
    data = {"packet_id": packet.packet_id,
            "images": [{"id": i, "src": png_data_uri(x)} for i, x in zip(packet.key["image_id"], packet.images)]}
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    html = TEMPLATE.read_text()
    for k, v in {"__PACKET_ID__": packet.packet_id, "__N__": str(len(packet.key)), "__SCALE__": str(scale),
                 "__DISPLAY__": str(scale * size)}.items():
        html = html.replace(k, v)
    return html.replace("__DATA__", payload)


def write_packet(packet: Packet, folder: Path, display_px: int = 384) -> tuple[Path, Path]:
    """``<folder>/<packet_id>.html`` and ``<folder>/<packet_id>.key.csv`` (written whole, then renamed)."""
    folder.mkdir(parents=True, exist_ok=True)
    page, key = folder / f"{packet.packet_id}.html", folder / f"{packet.packet_id}.key.csv"
    for path, text in ((page, render_page(packet, display_px)), (key, packet.key.to_csv(index=False))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return page, key
