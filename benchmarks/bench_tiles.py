"""Tiled prediction against whole-image prediction on a photograph larger than the canvas:
COCO AP and AP50, wall time and peak memory, each through the command line in its own
process.

    python benchmarks/bench_tiles.py --neon [--photos DIR] [--work DIR] [--checkpoint RUN] [--big]
    python benchmarks/bench_tiles.py --images DIR --held-out NAME [--tile 416 --overlap 0.25]

``--neon`` trains on the tiles of the large Yellowstone crop of the DeepForest sample
data (``_neon.py`` fetches it) and scores the other Yellowstone crop, 1249 x 1035 with
279 trees, whole: ``lucid-jax eval`` resizes it onto the 416-pixel canvas (trees of
about 20 pixels shrink to about 7), ``lucid-jax eval --tile 416`` cuts it into
416-pixel windows at its own resolution. ``--images DIR`` takes your own VOC pairs
(``NAME.xml`` beside ``NAME.png`` or ``.jpg``), the ``--held-out`` ones scored whole.

The detector is trained here with ``--train`` (the from-scratch recipe of
docs/training.md) unless ``--checkpoint`` names a run. Each mode runs ``--repeats``
times, alternating, each run a fresh process: the time is the median, the peak
memory (the process's maximum resident set) the largest.

``--big`` also predicts an 8000 x 6000 JPEG (the held-out photograph repeated,
mirrored, to that size) with ``lucid-jax predict``: whole, tiled, and each with
``--draw``, at the default ``--draw-max-side`` 2048 and at 0 (the image's own size).

Printed, and written to WORK/tiles.json.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))  # _neon and bench_augment beside this script
import _neon  # noqa: E402
from bench_augment import build_voc, photo_sources, tiles_of, write_voc  # noqa: E402

# The from-scratch recipe of docs/training.md: the mini detector at 416 pixels, GroupNorm,
# torchvision's proposal and RoI counts and no box-head dropout.
TRAIN = (
    "--model faster_rcnn_mini_fpn --image-size 416 --batch-size 2 --steps 600 --norm-mode group --augment flip "
    "--rpn-pre-nms-top-n 2000,1000 --rpn-post-nms-top-n 2000,1000 --box-batch-size-per-image 512 --dropout-rate 0"
)
# Runs lucid-jax in this process and reports its peak resident memory (KiB on Linux) on stderr.
MEASURED = (
    "import resource, sys\n"
    "from lucid_jax import cli\n"
    "code = cli.main(sys.argv[1:])\n"
    "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(code)\n"
)
BIG = (6000, 8000)  # (height, width) of --big's photograph


def parse_args(argv=None):
    p = photo_sources(__doc__.split("\n\n")[0])
    p.add_argument("--work", default=None, help="folder for the VOC data, the run and tiles.json (default: a new one)")
    p.add_argument("--checkpoint", default=None, help="a trained run to score (default: train one with --train)")
    p.add_argument("--train", default=TRAIN, help="the lucid-jax train flags of the run trained here")
    p.add_argument("--tile", type=int, default=416, help="the window's side in pixels (the canvas: no resize)")
    p.add_argument("--overlap", type=float, default=0.25, help="the share of a window shared with its neighbour")
    p.add_argument("--repeats", type=int, default=2, help="runs of each mode, alternating")
    p.add_argument("--big", action="store_true", help="also predict an 8000 x 6000 JPEG")
    return p.parse_args(argv)


def build_neon(photos: Path, root: Path) -> dict:
    """Training tiles of the large Yellowstone crop; the small one whole in ``whole``."""
    from lucid_jax.data import load_image

    photos = _neon.fetch_photos(photos)

    def photo(name):
        boxes, names = _neon.read_voc_boxes(photos / f"{name}.xml")
        return load_image(photos / f"{name}.png"), boxes, names

    return write_voc(
        root,
        {
            "train": list(tiles_of([photo(_neon.YELL_BIG)], "train")),
            "whole": [(_neon.YELL_SMALL, photo(_neon.YELL_SMALL))],
        },
    )


def measured(*args) -> tuple[str, float, float]:
    """``lucid-jax ARGS`` in a fresh process: (stdout, wall seconds, peak resident MiB)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", MEASURED, *map(str, args)], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"lucid-jax {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    peak = [line.split()[1] for line in proc.stderr.splitlines() if line.startswith("peak_rss_kib")]
    return proc.stdout, seconds, int(peak[-1]) / 1024


def alternate(modes: dict, repeats: int) -> dict:
    """Each mode's runs, A B A B: {name: {"seconds": [..], "peak_mib": [..], "stdout": last}}."""
    out = {name: {"seconds": [], "peak_mib": []} for name in modes}
    for r in range(repeats):
        for name, args in modes.items():
            stdout, seconds, peak = measured(*args)
            out[name]["seconds"].append(round(seconds, 1))
            out[name]["peak_mib"].append(round(peak))
            out[name]["stdout"] = stdout
            print(f"  {name} (run {r + 1}): {seconds:.1f} s, peak {peak:.0f} MiB", flush=True)
    return out


def big_photograph(image: np.ndarray, path: Path) -> None:
    """``image`` repeated, alternately mirrored so that seams match, to ``BIG``, as a JPEG."""
    from PIL import Image

    h, w = image.shape[:2]
    rows = [image if i % 2 == 0 else image[::-1] for i in range(-(-BIG[0] // h))]
    column = np.concatenate(rows, 0)
    tiles = [column if j % 2 == 0 else column[:, ::-1] for j in range(-(-BIG[1] // w))]
    Image.fromarray(np.ascontiguousarray(np.concatenate(tiles, 1)[: BIG[0], : BIG[1]])).save(path, quality=92)


def main(argv=None):
    args = parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_tiles_"))
    voc = work / "voc"
    if args.neon:
        counts = build_neon(Path(args.photos or Path.home() / ".cache" / "lucid_jax" / "neon"), voc)
        split = "whole"
    else:
        counts = build_voc(Path(args.images), voc, [n for n in args.held_out.split(",") if n])
        split = "cross_site"
    print(f"# bench_tiles: --tile {args.tile} --overlap {args.overlap}; {args.repeats} run(s) per mode")
    for name, (n, boxes) in counts.items():
        print(f"{name}: {n} image(s), {boxes} boxes")
    run = Path(args.checkpoint) if args.checkpoint else work / "run"
    train_seconds = None
    if not args.checkpoint:
        print(f"training: lucid-jax train {args.train} ...", flush=True)
        start = time.perf_counter()
        measured("train", "--data", f"voc:{voc}", *args.train.split(), "--out", run, "--no-progress")
        train_seconds = round(time.perf_counter() - start)
    scored = ("eval", "--data", f"voc:{voc}", "--split", split, "--checkpoint", run, "--no-progress")
    tiled = ("--tile", args.tile, "--overlap", args.overlap)
    # The whole image holds more trees than the model's 100 detections: also whole with room for them.
    modes = {"whole image": scored, "whole image, --max-detections 1000": (*scored, "--max-detections", 1000)}
    runs = alternate({**modes, "tiled": (*scored, *tiled)}, args.repeats)
    rows = []
    print("\n| prediction | AP | AP50 | detections | time, s | peak memory, MiB |\n|---|---|---|---|---|---|")
    for name, r in runs.items():
        m = json.loads(r.pop("stdout"))
        row = {"mode": name, "AP": m["AP"], "AP50": m["AP50"], "detections": m["num_detections"], **r}
        rows.append(row)
        print(
            f"| {name} | {m['AP']:.3f} | {m['AP50']:.3f} | {m['num_detections']} | "
            f"{statistics.median(r['seconds']):.1f} | {max(r['peak_mib'])} |"
        )
    report: dict = {"counts": counts, "train": args.train, "train_seconds": train_seconds, "eval": rows}
    if args.big:
        from lucid_jax.data import load_image

        names = (voc / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
        photo = work / "big_8000x6000.jpg"
        big_photograph(load_image(voc / "JPEGImages" / f"{names[0]}.png"), photo)
        predict = ("predict", photo, "--checkpoint", run, "--no-progress")
        modes = {
            "whole image": (*predict, "--out", work / "big_whole"),
            "whole image, --draw --draw-max-side 0": (
                *predict,
                "--out",
                work / "big_whole_full",
                "--draw",
                "--draw-max-side",
                0,
            ),
            "whole image, --draw": (*predict, "--out", work / "big_whole_drawn", "--draw"),
            "tiled": (*predict, "--out", work / "big_tiled", *tiled),
            "tiled, --draw": (*predict, "--out", work / "big_tiled_drawn", *tiled, "--draw"),
        }
        print(f"\n{photo} ({BIG[1]} x {BIG[0]}):", flush=True)
        big = alternate(modes, 1)
        print("\n| lucid-jax predict | detections | time, s | peak memory, MiB |\n|---|---|---|---|")
        report["big"] = []
        for name, r in big.items():
            r.pop("stdout")
            out = modes[name][modes[name].index("--out") + 1]
            (entry,) = json.loads((Path(out) / "detections.json").read_text())
            report["big"].append(
                {"mode": name, "detections": len(entry["detections"]), "png": entry["detections_png"], **r}
            )
            print(f"| {name} | {len(entry['detections'])} | {r['seconds'][0]:.1f} | {r['peak_mib'][0]} |")
    (work / "tiles.json").write_text(json.dumps(report, indent=1))
    print(f"\nwrote {work / 'tiles.json'}")
    return report


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
