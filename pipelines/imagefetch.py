"""Task image downloads through Label Studio, and the check every fetched image passes.

`pull.py` runs them beside the export; bucket images take `bucketfetch.py` instead.
"""
from __future__ import annotations

import sys
from concurrent.futures import Future, ThreadPoolExecutor

from tqdm import tqdm

from pipelines.labelstudio import ImageFetchError, LabelStudioError, Studio
from pipelines.staging import Staging

FETCH_WORKERS = 2  # concurrent image downloads: Label Studio's server peaks at 2 (~100 images/s)

# What the versioned store may hold: bytes that start like an image in a format validate
# accepts (images.ALLOWED_FORMATS; tests/test_pull.py holds the two lists together). Anything
# else -- an HTML error page, a JSON answer, a token -- is refused at the door and never stored.
IMAGE_SIGNATURES = {
    "PNG": (b"\x89PNG\r\n\x1a\n",), "JPEG": (b"\xff\xd8\xff",), "GIF": (b"GIF87a", b"GIF89a"),
    "BMP": (b"BM",), "TIFF": (b"II*\x00", b"MM\x00*"), "WEBP": (b"RIFF",),
}


def looks_like_image(data: bytes) -> bool:
    if data[:4] == b"RIFF":
        return data[8:12] == b"WEBP"
    return any(data.startswith(sig) for sigs in IMAGE_SIGNATURES.values() for sig in sigs)


def not_an_image(data: bytes) -> str:
    return (f"not an image: the {len(data)} bytes served do not start like any accepted "
            "image format (an error page or API answer?); not stored")


def bar(iterable=None, **kw) -> tqdm:
    # on a terminal only (disable=None): logs and CI stay clean
    return tqdm(iterable, disable=None, leave=False, file=sys.stderr, **kw)


class StudioFetcher:
    """Image downloads through Label Studio into the staging folder, running beside the
    export: each export call's new image URLs are queued at once (Label Studio serves an
    export and images in parallel), and finished downloads are staged between export calls, so
    a kill loses at most those in flight. One image that keeps failing -- even with HTTP 500,
    as Label Studio answers a path-traversal URL -- is that task's quarantine reason; only a
    Label Studio that stops answering altogether stops the pull."""

    def __init__(self, studio: Studio, stage: Staging, *, max_bytes: int) -> None:
        self.studio, self.stage, self.max_bytes = studio, stage, max_bytes
        self.failed: dict[str, str] = {}  # url -> reason
        self._pool = ThreadPoolExecutor(max_workers=FETCH_WORKERS)
        self._pending: dict[str, Future] = {}
        self._queued: set[str] = set()

    def _one(self, url: str) -> bytes | str:
        try:
            data = self.studio.fetch_image(url, max_bytes=self.max_bytes)
        except ImageFetchError as exc:
            return str(exc)
        except LabelStudioError as exc:
            if not self.studio.alive():
                raise
            return f"this image kept failing while Label Studio answered: {exc}"
        return data if looks_like_image(data) else not_an_image(data)

    def queue(self, urls: list[str]) -> None:
        for url in urls:
            if url not in self._queued and url not in self.stage.images():
                self._queued.add(url)
                self._pending[url] = self._pool.submit(self._one, url)

    def drain(self, *, wait: bool = False) -> None:
        """Stage what has finished (all of it with `wait`); raises what a download raised."""
        urls = list(self._pending)
        for url in bar(urls, desc="images", unit="img") if wait else urls:
            future = self._pending[url]
            if not wait and not future.done():
                continue
            got = future.result()
            del self._pending[url]
            if isinstance(got, bytes):
                self.stage.save_image(url, got)  # main thread only: the staging index is not shared
            else:
                self.failed[url] = got

    def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pool.shutdown(wait=True)
