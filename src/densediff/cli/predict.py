"""``densediff predict`` on image inputs: files, folders (``--recursive``), globs and videos,
predicted in batches (``--batch-size``) behind a progress bar.

Output names mirror the input tree: ``in/a/b.png`` (given ``in``) writes ``<out>/a/b_*``; two
inputs of one stem in one folder (``a.png``, ``a.jpg``) write ``a_png_*`` and ``a_jpg_*``
(:func:`output_stems`). A video ``v.mp4`` writes ``v_overlay.mp4`` (each result's
``video_frame()``: the segmentation overlay, depth beside the image) and the per-frame files in
``v_frames/`` (``000000_mask.png`` ...); with ``--video`` the images of each output folder are the
frames of one video too (``overlay.mp4`` there, at ``--fps``).
"""

from __future__ import annotations

import glob
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from densediff.errors import UserError

__all__ = ["list_inputs", "output_stems", "predict_images"]


@dataclass
class Job:
    """One input file and where its results go."""

    path: Path
    out_dir: Path
    stem: str
    video: bool = False
    frames: int | None = None  # videos: frame count from the header (None: unknown)
    fps: float = 0.0


def output_stems(files: list[Path]) -> list[str]:
    """Output name stems, one per input and no two alike (every output suffix is one word
    after the last ``_``, so distinct stems give distinct files): the stem, or where two
    inputs share it ``<stem>_<ext>`` (a.png, a.jpg -> a_png, a_jpg), or where that clashes
    too the full file name, or (the same name from two input folders) ``<name>~<i>``
    (:func:`~densediff.utils.fs.injective_names`)."""
    from densediff.utils.fs import injective_names

    names = [f.name for f in files]
    return injective_names([[f.stem, f"{f.stem}_{f.suffix.lstrip('.')}", f.name]
                            + ([f"{f.name}~{i}"] if names.count(f.name) > 1 else [])
                            for i, f in enumerate(files)])


def _inside(path: Path, folder: Path) -> bool:
    p, f = os.path.realpath(path), os.path.realpath(folder)
    return p != f and os.path.commonpath([p, f]) == f


def _skip_note(p: Path) -> None:
    from densediff.utils.checks import path_kind

    print(f"note: skipping {p}: {path_kind(p)}", file=sys.stderr)


def _glob_base(pattern: str) -> Path:
    """The leading folders of ``pattern`` without wildcards (``in/**/*.png`` -> ``in``)."""
    parts = []
    for part in Path(pattern).parts:
        if glob.has_magic(part):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def list_inputs(inputs: list[str], recursive: bool, out: Path) -> list[tuple[Path, str]]:
    """``(file, its output folder relative to --out)`` of every input: a file as itself; the
    image and video files in a folder (``recursive``: at any depth, mirrored below --out;
    the --out folder itself skipped when it lies inside); the files a glob matches (``**``:
    any depth), mirrored below the glob's fixed leading folders. Entries that are not readable
    files are skipped with a note; every header is read first, so a corrupt or oversized image
    or an unreadable video stops the command before any prediction."""
    from densediff.data.io import IMAGE_EXTENSIONS, image_size
    from densediff.data.video import VIDEO_EXTENSIONS, video_info

    kinds = IMAGE_EXTENSIONS + VIDEO_EXTENSIONS
    found: list[tuple[Path, str]] = []
    listed: set[Path] = set()  # files found in folders or by globs (not named by the user)
    for given in inputs:
        path = Path(given)
        if glob.has_magic(given) and not path.exists():
            base = _glob_base(given)
            matches = sorted(Path(m) for m in glob.glob(given, recursive=True))
            files = [m for m in matches if m.suffix.lower() in kinds]
            for m in files:
                if not m.is_file():
                    _skip_note(m)
            files = [m for m in files if m.is_file() and not _inside(m, out)]
            if not files:
                raise UserError(f"{given}: no image or video files ({', '.join(kinds)}) match")
            found += [(m, m.parent.relative_to(base).as_posix()) for m in files]
            listed.update(files)
        elif path.is_dir():
            try:
                entries = sorted(path.rglob("*") if recursive else path.iterdir())
            except OSError as e:
                raise UserError(f"{path}: cannot list the folder ({e.strerror or e})") from None
            files = []
            for p in entries:
                if p.suffix.lower() not in kinds or _inside(p, out):
                    continue
                if p.is_file():
                    files.append(p)
                elif not p.is_dir() or not recursive:
                    _skip_note(p)
            if not files:
                where = "folder (or below it)" if recursive else "folder"
                raise UserError(f"{path}: no images or videos ({', '.join(kinds)}) in {where}"
                                + ("" if recursive else "; --recursive looks into subfolders"))
            found += [(p, p.parent.relative_to(path).as_posix()) for p in files]
            listed.update(files)
        elif path.is_file():
            found.append((path, "."))
        elif path.is_symlink() and not path.exists():
            raise UserError(f"{path}: a broken or looping symbolic link")
        elif path.exists():
            from densediff.utils.checks import path_kind

            raise UserError(f"{path}: is {path_kind(path)}, not an image file or folder")
        else:
            raise UserError(f"{path}: no such file or folder")
    if not _have_pyav():  # videos met in folders are skipped; one named is an error
        videos = [f for f, _ in found if f.suffix.lower() in VIDEO_EXTENSIONS and f in listed]
        for f in videos:
            print(f"note: skipping {f}: a video (pip install 'densediff[video]' to predict "
                  "videos)", file=sys.stderr)
        found = [(f, rel) for f, rel in found if f not in set(videos)]
        if not found:
            raise UserError(f"{inputs[0]}: only videos, and PyAV is not installed: pip install "
                            "'densediff[video]' (or: pip install av)")
    for f, _ in found:
        if f.suffix.lower() in VIDEO_EXTENSIONS:
            video_info(f)  # header only: DataError naming the file (UserError without PyAV)
        else:
            image_size(f)
    return found


def _have_pyav() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def plan_jobs(found: list[tuple[Path, str]], out: Path) -> list[Job]:
    """The :class:`Job` of every input, names unique per output folder (:func:`output_stems`)."""
    from densediff.data.video import VIDEO_EXTENSIONS, video_info

    groups: dict[str, list[int]] = {}
    for i, (_, rel) in enumerate(found):
        groups.setdefault(rel, []).append(i)
    jobs: list[Job | None] = [None] * len(found)
    for rel, idx in groups.items():
        stems = output_stems([found[i][0] for i in idx])
        for i, stem in zip(idx, stems):
            f = found[i][0]
            job = Job(f, out / rel, stem, video=f.suffix.lower() in VIDEO_EXTENSIONS)
            if job.video:
                job.frames, job.fps = video_info(f)
            jobs[i] = job
    return jobs  # type: ignore[return-value]


def _check_no_overwrite(jobs: list[Job], suffixes: list[str], frame_videos: bool) -> None:
    """UserError when a result would overwrite an input file (checked before any work)."""
    inputs = {os.path.realpath(j.path) for j in jobs}
    for j in jobs:
        if j.video:
            targets = [j.out_dir / f"{j.stem}_overlay.mp4"]
            frames_dir = j.out_dir / f"{j.stem}_frames"
            if any(_inside(Path(p), frames_dir) for p in inputs):
                raise UserError(f"{frames_dir}: writing the frames of {j.path} there would "
                                "overwrite input files; choose another --out")
        else:
            targets = [j.out_dir / f"{j.stem}_{k}" for k in suffixes]
            if frame_videos:
                targets.append(j.out_dir / "overlay.mp4")
        for t in targets:
            if os.path.realpath(t) in inputs:
                raise UserError(f"{t}: writing results there would overwrite an input file; "
                                "choose another --out")


def _check_frame_sizes(jobs: list[Job]) -> None:
    """``--video``: the images of one output folder are one video's frames: one size."""
    from densediff.data.io import image_size

    first: dict[Path, tuple[Path, tuple[int, int]]] = {}
    for j in jobs:
        if j.video:
            continue
        size = image_size(j.path)
        ref = first.setdefault(j.out_dir, (j.path, size))
        if ref[1] != size:
            raise UserError(f"{j.path}: --video: frame size {size[0]}x{size[1]} differs from "
                            f"{ref[0]} ({ref[1][0]}x{ref[1][1]}); the frames of one video must "
                            "have one size")


def predict_images(args, predictor, out: Path, options: dict, suffixes: list[str]) -> int:
    """``predict`` on image and video inputs (the image tasks): list and check every input,
    then predict ``--batch-size`` inputs (images or video frames) per forward pass."""
    from tqdm import tqdm

    from densediff.data.video import DEFAULT_FPS, VideoWriter, read_frames

    found = list_inputs(list(args.input), args.recursive, out)
    jobs = plan_jobs(found, out)
    _check_no_overwrite(jobs, suffixes, args.video)
    if args.video:
        _check_frame_sizes(jobs)
    out.mkdir(parents=True, exist_ok=True)
    known = all(j.frames is not None for j in jobs if j.video)
    total = sum((j.frames or 0) if j.video else 1 for j in jobs) if known else None
    # on a terminal only (None: tqdm's test), so that logs and errors stay one line each
    bar = tqdm(total=total, unit="img", desc="predict", disable=True if args.quiet else None,
               file=sys.stderr, dynamic_ncols=True)
    writers: dict[Path, VideoWriter] = {}  # open videos: a video file's, or a frame folder's
    seed = args.seed or 0

    def units():
        """(job, frame index, item): every image, then every frame of each video, then
        (job, None, None) when a video ends."""
        for j in jobs:
            if not j.video:
                yield j, 0, j.path
                continue
            for i, frame in enumerate(read_frames(j.path)):
                yield j, i, frame
            yield j, None, None

    def run(batch: list) -> None:
        preds = predictor.predict([item for _, _, item in batch], aug=args.aug_test,
                                  steps=args.steps, seed=seed)
        for (j, i, _), pred in zip(batch, preds):
            if j.video:
                pred.save(j.out_dir / f"{j.stem}_frames", f"{i:06d}", **options)
                key = j.out_dir / f"{j.stem}_overlay.mp4"
                writers.setdefault(key, VideoWriter(key, j.fps)).write(pred.video_frame())
            else:
                written = pred.save(j.out_dir, j.stem, **options)
                bar.write(f"{j.path} -> {j.out_dir / (j.stem + '_{' + ','.join(written) + '}')}",
                          file=sys.stdout)
                if args.video:
                    key = j.out_dir / "overlay.mp4"
                    writers.setdefault(key, VideoWriter(key, args.fps or DEFAULT_FPS)
                                       ).write(pred.video_frame())
        bar.update(len(batch))

    batch: list = []
    try:
        for j, i, item in units():
            if i is not None:
                batch.append((j, i, item))
                if len(batch) < args.batch_size:
                    continue
            if batch:
                run(batch)
                batch = []
            if i is None:  # a video ended: its files are complete
                key = j.out_dir / f"{j.stem}_overlay.mp4"
                writer = writers.pop(key, None)
                if writer is not None:
                    writer.close()
                    bar.write(f"{j.path} -> {key}, {j.out_dir / (j.stem + '_frames')}/ "
                              f"({writer.frames} frames)", file=sys.stdout)
        if batch:
            run(batch)
        for key, writer in writers.items():
            writer.close()
            bar.write(f"frames of {key.parent} -> {key} ({writer.frames} frames, "
                      f"{writer.fps:g} fps)", file=sys.stdout)
        writers.clear()
    finally:
        for writer in writers.values():
            writer.abort()
        bar.close()
    return 0
