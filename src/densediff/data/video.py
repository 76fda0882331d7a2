"""Reading and writing videos with PyAV (the optional ``video`` extra: ``pip install
'densediff[video]'``), with one-line errors naming the file.

``predict`` reads a video's frames (:func:`read_frames`) as RGB ``uint8`` arrays and writes the
per-frame pictures of its results as a video (:class:`VideoWriter`: H.264 where the FFmpeg
build has it, else MPEG-4 part 2; frames padded to even sizes, written whole or not at all).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from densediff.errors import DataError, UserError, one_line

__all__ = ["VIDEO_EXTENSIONS", "VideoWriter", "read_frames", "video_info"]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
"""File suffixes ``predict`` takes as videos (case-insensitive)."""

DEFAULT_FPS = 10.0
"""Frame rate of a video written from a folder of frames (``predict --video``)."""


def _av():
    try:
        import av
    except ImportError:
        raise UserError("video files need PyAV: pip install 'densediff[video]' (or: pip install "
                        "av)") from None
    return av


def video_info(path: str | os.PathLike) -> tuple[int | None, float]:
    """``(frame count or None when the container does not say, frames per second)`` of a
    video file, from its header; DataError naming the file when it is no readable video."""
    av = _av()
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise DataError(f"{path}: no video stream in the file")
            s = c.streams.video[0]
            rate = s.average_rate or s.guessed_rate or DEFAULT_FPS
            return (int(s.frames) or None), float(rate)
    except DataError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable video ({one_line(e)})") from None


def read_frames(path: str | os.PathLike) -> Iterator[np.ndarray]:
    """The frames of a video file as RGB ``uint8`` arrays (H x W x 3), in order; DataError
    naming the file (and the frame) on corrupt data."""
    av = _av()
    index = 0
    try:
        with av.open(str(path)) as c:
            for frame in c.decode(video=0):
                yield frame.to_ndarray(format="rgb24")
                index += 1
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot decode frame {index} ({one_line(e)})") from None


class VideoWriter:
    """Write RGB ``uint8`` frames as a video at ``path`` (``.mp4``): into a temporary file
    beside it, renamed over ``path`` by :meth:`close` (a failed or interrupted run leaves no
    half-written video). Frames of odd sizes are padded by one black row / column (YUV 4:2:0
    needs even sizes); every frame must have the first one's size."""

    def __init__(self, path: str | os.PathLike, fps: float):
        self.av = _av()
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.stem}.partial{self.path.suffix}")
        self.fps = fps
        self.container = None
        self.stream = None
        self.size: tuple[int, int] | None = None
        self.frames = 0

    def _open(self, h: int, w: int) -> None:
        from fractions import Fraction

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.container = self.av.open(str(self.tmp), "w", format="mp4")
        rate = Fraction(self.fps).limit_denominator(1001)
        codecs = [c for c in ("libx264", "mpeg4") if c in self.av.codecs_available]
        if not codecs:
            raise UserError("this PyAV build has no H.264 or MPEG-4 encoder to write videos")
        self.stream = self.container.add_stream(codecs[0], rate=rate)
        self.stream.width, self.stream.height = w + w % 2, h + h % 2
        self.stream.pix_fmt = "yuv420p"
        self.size = (h, w)

    def write(self, frame: np.ndarray) -> None:
        """Append one H x W x 3 uint8 frame."""
        h, w = frame.shape[:2]
        if self.container is None:
            self._open(h, w)
        if (h, w) != self.size:
            raise DataError(f"{self.path}: frame {self.frames} is {h}x{w}, the video's frames "
                            f"are {self.size[0]}x{self.size[1]}; frames of one video must have "
                            "one size")
        if h % 2 or w % 2:
            frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)))
        vf = self.av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        for packet in self.stream.encode(vf):
            self.container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        """Flush the encoder and move the finished video to ``path``."""
        if self.container is None:
            return
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
        self.container = None
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Drop the temporary file (after an error)."""
        if self.container is not None:
            try:
                self.container.close()
            except Exception:  # noqa: BLE001 - the original error is the one to report
                pass
            self.container = None
        self.tmp.unlink(missing_ok=True)
