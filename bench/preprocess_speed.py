"""Preprocessing speed on a full-size chest CT: medpipe vs a MONAI chain vs the bare SimpleITK floor.

Generates a 512x512x300 int16 synthetic CT (``pipeline.synth``), then times, each method in its own
fresh process (so peak RSS and thread pools do not mix), the median of ``--repeats`` runs after one
warm-up:

- medpipe: ``read_volume`` + ``preprocess_volume`` (RAS, 1.5 mm, foreground crop, three views), and
  the same plus writing the cache entry;
- MONAI: ``LoadImage -> EnsureChannelFirst -> Orientation(RAS) -> Spacing(1.5 mm)``;
- SimpleITK floor: ``ReadImage`` + ``Resample`` of the whole scan to 1.5 mm.

Goal (issue 2): at least 5x faster than the MONAI chain, within 2x of the SimpleITK floor, peak RSS
under 3 GB.

Usage: python bench/preprocess_speed.py [--repeats 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPACING = 1.5


def timed(fn, repeats: int) -> list[float]:
    """Run fn once to warm up, then ``repeats`` times; return the timings."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def method_medpipe(path: Path, out: Path, write: bool):
    from pipeline.config import PreprocessConfig
    from pipeline.io import read_volume
    from pipeline.preprocess.cache import save_entry
    from pipeline.preprocess.stage import preprocess_volume

    # 256 x 256 x 224 at 1.5 mm holds a whole chest (384 x 384 x 336 mm) after the body crop.
    cfg = PreprocessConfig(spacing=(SPACING,) * 3, shape=(256, 256, 224), fit="pad")

    def run():
        arrays, stats = preprocess_volume(read_volume(path), None, cfg)
        if write:
            save_entry(out / "case.npz", arrays, {"stats": stats})

    return run


def method_monai(path: Path, out: Path, write: bool):
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation, Spacing

    chain = Compose(
        [
            LoadImage(image_only=True),
            EnsureChannelFirst(),
            Orientation(axcodes="RAS"),
            Spacing(pixdim=SPACING),
        ]
    )
    return lambda: chain(str(path))


def method_sitk(path: Path, out: Path, write: bool):
    import SimpleITK as sitk

    def run():
        image = sitk.ReadImage(str(path))
        size = [round(n * s / SPACING) for n, s in zip(image.GetSize(), image.GetSpacing(), strict=True)]
        sitk.Resample(
            image,
            size,
            sitk.Transform(),
            sitk.sitkLinear,
            image.GetOrigin(),
            (SPACING,) * 3,
            image.GetDirection(),
        )

    return run


METHODS = {
    "medpipe": lambda p, o: method_medpipe(p, o, write=False),
    "medpipe+write": lambda p, o: method_medpipe(p, o, write=True),
    "monai": lambda p, o: method_monai(p, o, write=False),
    "sitk_floor": lambda p, o: method_sitk(p, o, write=False),
}


def child(method: str, path: Path, repeats: int) -> None:
    """Time one method in this process and print a JSON line."""
    with tempfile.TemporaryDirectory() as tmp:
        times = timed(METHODS[method](path, Path(tmp)), repeats)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"method": method, "times": times, "peak_rss_mb": rss_mb}))


def make_volume(folder: Path) -> Path:
    from pipeline.io import save_nifti
    from pipeline.synth import generate_case

    path = folder / "ct_512x512x300.nii.gz"
    if not path.exists():
        case = generate_case(7, positive=True, size=512, depth=300)
        save_nifti(path, case.image, case.affine)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="folder for the generated CT (default: a temp folder)")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), args.repeats)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        path = make_volume(folder)
        import nibabel as nib

        img = nib.load(path)
        zooms = tuple(round(float(z), 3) for z in img.header.get_zooms())
        print(
            f"volume: {path.name} shape {img.shape} spacing {zooms} {nib.aff2axcodes(img.affine)} "
            f"{path.stat().st_size / 1e6:.0f} MB on disk"
        )
        results = {}
        for method in METHODS:
            proc = subprocess.run(
                [sys.executable, __file__, "--repeats", str(args.repeats), "--child", method, str(path)],
                capture_output=True,
                text=True,
                check=True,
            )
            results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\n{'method':<16}{'median s':>10}{'min s':>8}{'peak RSS MB':>13}")
    for method, r in results.items():
        print(
            f"{method:<16}{statistics.median(r['times']):>10.3f}{min(r['times']):>8.3f}{r['peak_rss_mb']:>13.0f}"
        )
    med = {m: statistics.median(r["times"]) for m, r in results.items()}
    print(f"\nspeed-up over the MONAI chain: {med['monai'] / med['medpipe']:.1f}x (goal >= 5x)")
    print(f"medpipe / SimpleITK floor:     {med['medpipe'] / med['sitk_floor']:.2f}x (goal <= 2x)")
    print(f"with the cache write:          {med['medpipe+write'] / med['sitk_floor']:.2f}x of the floor")
    print(f"medpipe peak RSS:              {results['medpipe']['peak_rss_mb'] / 1024:.2f} GB (goal < 3 GB)")


if __name__ == "__main__":
    main()
