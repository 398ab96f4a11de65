"""Pointing game: does a subtype's heat map peak on that bleed? Every (layer, method) of raysys.explain.VARIANTS
in one run.

On --studies held-out phantom studies (the demo's prevalence and 256 px matrix, --seed 3: training uses 1 and 2),
written with their bleed masks (raysys.synthetic.read_masks), for each positive (slice, label) pair: each subtype
that bleeds on the slice, and `any` (the union of the slice's bleeds, scored on the `any` map):

  hit     the heat map's argmax lies in the bleed's mask on the model's input grid (mask_to_input: every input
          pixel the bleed overlaps), dilated by a disc of --tolerance x the input size (2%: 2 px at 96, 5 at 256).
          A map flat at its peak (Mixed_7c's single cell at 96 px, or no positive evidence at all) scores the
          share of its tied pixels that hit: a uniform tie-break, as an expectation.
  chance  the same dilated mask's share of the head (inside the inner table, on the input grid): the expected hit
          of a uniformly random point in the head, averaged over the same pairs (not a draw).

Per label and (layer, method): pairs, hit_rate, chance_rate, in_head_rate (the argmax inside the head at all),
flat (pairs whose map peaks on a plateau: a single cell, an edge cell's border band, or an all-zero map), and
the hit rate over the pairs the model detects (probability >= 0.5). `best` names the (layer, method)
with the highest hit rate per label. --untrained scores a randomly initialised network of the checkpoint's size
and preprocessing instead of its weights (a sanity floor).

    .venv/bin/python benchmarks/pointing_game.py --checkpoint DIR [--studies 40] [--seed 3] [--untrained]
        [--batch-size 16] [--threads N] [--out result.json]

Plain torch on this machine's CPU, no Ray. Prints one JSON line to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from _common import emit, local_cores, log, machine

PHANTOM_SIZE = 256  # the demo's phantom matrix (raysys.demo writes its studies at 256 px)
DETECTED = 0.5  # probability from which a pair counts as detected


def load_model(checkpoint: str, untrained: bool):
    """(model in eval mode on the CPU, the CNN's meta.json): a sequence checkpoint gives its CNN."""
    import torch

    from raysys.model import build_model, load_checkpoint

    ckpt = load_checkpoint(checkpoint, "cpu")
    if not untrained:
        return ckpt.model, ckpt.meta
    torch.manual_seed(0)
    model = build_model(image_size=ckpt.meta["image_size"], neighbors=ckpt.meta.get("neighbors", 0))
    return model.eval(), ckpt.meta


def decode_inputs(frame, meta: dict) -> np.ndarray:
    """(N, C, S, S) uint8 model inputs of `frame`'s rows, as training and serving build them (2.5D included)."""
    from raysys.presets import dicom_to_image

    windows, size, neighbors = meta["windows"], meta["image_size"], meta.get("neighbors", 0)
    if not neighbors:
        return np.stack([dicom_to_image(p, windows, size)[0] for p in frame["path"]])
    from raysys.data import neighbor_paths  # imports ray (the module only): the 2.5D stacking rule lives there

    index = frame.reset_index()[["image_id", "path", "series_id"]].assign(position=frame["z"].to_numpy())
    return np.stack([np.concatenate([dicom_to_image(p, windows, size)[0] for p in stack])
                     for stack in neighbor_paths(index, index, neighbors)])


def disc(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def targets(data: Path, frame, size: int, radius: int) -> tuple[list[dict], list[np.ndarray], list[dict]]:
    """Per image, on the input grid: {label: its dilated bleed mask}, the head mask, {label: chance of a random
    head point}."""
    from raysys.synthetic import HEAD_MASK, mask_to_input, read_masks

    kernel, masks, heads, chance = disc(radius), [], [], []
    for image_id in frame.index:
        native = read_masks(data, image_id)
        head = mask_to_input(native.pop(HEAD_MASK), size)
        dilated = {label: cv2.dilate(mask_to_input(m, size).astype(np.uint8), kernel).astype(bool)
                   for label, m in native.items()}
        masks.append(dilated)
        heads.append(head)
        chance.append({label: float(m[head].sum() / head.sum()) for label, m in dilated.items()})
    return masks, heads, chance


def score(model, images: np.ndarray, masks: list[dict], heads: list[np.ndarray], layer: str, method: str,
          batch_size: int) -> list[dict]:
    """Per image: {label: (expected hit, flat peak, probability, expected peak in the head)} of one (layer, method)."""
    import torch

    from raysys.explain import explain
    from raysys.labels import LABELS

    out = []
    for start in range(0, len(images), batch_size):
        probs, maps = explain(model, images[start : start + batch_size], torch.device("cpu"), layer=layer,
                              method=method)
        for p, heat, image_masks, head in zip(probs, maps, masks[start : start + batch_size],
                                              heads[start : start + batch_size]):
            row = {}
            for label, mask in image_masks.items():
                c = LABELS.index(label)
                peak = heat[c] == heat[c].max()  # every pixel at the maximum: a uniform tie-break among them
                row[label] = (float(mask[peak].mean()), bool(peak.sum() > 1), float(p[c]), float(head[peak].mean()))
            out.append(row)
    return out


def summarise(scores: list[dict], chance: list[dict]) -> dict:
    from raysys.labels import LABELS

    result = {}
    for label in LABELS:
        pairs = [(s[label], c[label]) for s, c in zip(scores, chance) if label in s]
        if not pairs:
            result[label] = {"pairs": 0}
            continue
        hits = np.array([s[0] for s, _ in pairs])
        detected = np.array([s[2] >= DETECTED for s, _ in pairs])
        result[label] = {
            "pairs": len(pairs),
            "hit_rate": float(hits.mean()),
            "chance_rate": float(np.mean([c for _, c in pairs])),
            "in_head_rate": float(np.mean([s[3] for s, _ in pairs])),
            "flat": int(sum(s[1] for s, _ in pairs)),
            "detected": int(detected.sum()),
            "hit_rate_detected": float(hits[detected].mean()) if detected.any() else None,
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a CNN or sequence-stage checkpoint directory")
    parser.add_argument("--studies", type=int, default=40, help="held-out phantom studies (the demo holds out 40)")
    parser.add_argument("--seed", type=int, default=3, help="phantom seed; the demo trains on 1 and tests on 2")
    parser.add_argument("--tolerance", type=float, default=0.02, help="mask dilation, share of the input size")
    parser.add_argument("--untrained", action="store_true", help="random weights at the checkpoint's size")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=local_cores(), help="torch CPU threads")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()

    import torch

    from raysys.demo import PREVALENCE_SCALE
    from raysys.explain import VARIANTS
    from raysys.labels import LABELS
    from raysys.synthetic import RSNA_PREVALENCE, PhantomConfig, write_dataset

    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    model, meta = load_model(args.checkpoint, args.untrained)
    size = meta["image_size"]
    radius = max(1, round(args.tolerance * size))
    tmp = Path(tempfile.mkdtemp(prefix="pointing-game-"))
    try:
        prevalence = {name: p * PREVALENCE_SCALE for name, p in RSNA_PREVALENCE.items()}
        config = PhantomConfig(studies=args.studies, size=PHANTOM_SIZE, seed=args.seed, prevalence=prevalence,
                               masks=True)
        frame = write_dataset(tmp, config)
        positives = frame[frame["any"] == 1]
        log(f"wrote {args.studies} phantom studies with masks under {tmp}: {len(frame)} slices, "
            f"{len(positives)} with a bleed")
        images = decode_inputs(positives, meta)
        masks, heads, chance = targets(tmp, positives, size, radius)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    prepared_s = time.perf_counter() - began

    results, wall = {}, {}
    for layer, method in VARIANTS:
        start = time.perf_counter()
        scores = score(model, images, masks, heads, layer, method, args.batch_size)
        results[f"{layer}/{method}"] = summarise(scores, chance)
        wall[f"{layer}/{method}"] = round(time.perf_counter() - start, 1)
        rates = {label: round(r["hit_rate"], 2) for label, r in results[f"{layer}/{method}"].items() if r["pairs"]}
        log(f"{layer}/{method}: {wall[f'{layer}/{method}']}s, hit rates {rates}")
    best = {label: max(results, key=lambda combo: results[combo][label]["hit_rate"])
            for label in LABELS if results[next(iter(results))][label]["pairs"]}

    emit({
        "benchmark": "pointing_game",
        "machine": machine(),
        "torch_threads": args.threads,
        "setup": {
            "checkpoint": Path(args.checkpoint).resolve().name, "checkpoint_path": str(Path(args.checkpoint).resolve()),
            "untrained": args.untrained, "epochs": None if args.untrained else meta.get("epoch"),
            "image_size": size, "windows": meta["windows"], "neighbors": meta.get("neighbors", 0),
            "studies": args.studies, "seed": args.seed, "phantom_size": PHANTOM_SIZE,
            "prevalence_scale": PREVALENCE_SCALE, "slices": len(frame), "positive_slices": len(positives),
            "tolerance": args.tolerance, "tolerance_px": radius, "detected_from": DETECTED,
        },
        "results": results,
        "best": best,
        "wall_s": {"prepare": round(prepared_s, 1), "per_combination": wall,
                   "total": round(time.perf_counter() - began, 1)},
    }, args.out)


if __name__ == "__main__":
    main()
