"""Image width and height read from a file's header, before any pixel is decoded.

torchvision's decoders have no size limit and no header-only mode, so a small file
that declares a huge canvas (a 283 KB PNG of 16000 x 16000 pixels decodes to 740 MB)
would be allocated in full before anything could refuse it. PIL can read the size,
but its `Image.open` applies PIL's own process-wide limit (a warning above
`PIL.Image.MAX_IMAGE_PIXELS`, an error above twice that), which would override the
limit the data loader states. The formats the loader accepts keep their size at
fixed, documented places, so reading it here is a few lines per format.
"""

from __future__ import annotations

import struct

# JPEG start-of-frame markers carry the size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM, RST0-7, SOI.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})


def image_size(data: bytes | memoryview) -> tuple[int, int] | None:
    """(width, height) declared by a JPEG, PNG, GIF, BMP or WebP header; None for other or truncated data.

    For GIF this is the logical screen, the canvas every frame is drawn on.
    """
    head = bytes(data[:32])
    try:
        if head.startswith(b"\xff\xd8"):
            return _jpeg_size(data)
        if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
            return struct.unpack(">II", head[16:24])
        if head[:6] in (b"GIF87a", b"GIF89a"):
            return struct.unpack("<HH", head[6:10])
        if head.startswith(b"BM"):
            return _bmp_size(head)
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            return _webp_size(head)
    except struct.error:  # the header is cut short: the decoder will report the file as unreadable
        return None
    return None


def _jpeg_size(data: bytes | memoryview) -> tuple[int, int] | None:
    """Walk the marker segments up to the first start-of-frame; EXIF and ICC segments may come first."""
    position, end = 2, len(data)
    while position + 4 <= end:
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker in _JPEG_STANDALONE:
            position += 2
            continue
        if marker in _JPEG_SOF:
            height, width = struct.unpack(">HH", bytes(data[position + 5 : position + 9]))
            return width, height
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        (length,) = struct.unpack(">H", bytes(data[position + 2 : position + 4]))
        position += 2 + length
    return None


def _bmp_size(head: bytes) -> tuple[int, int]:
    """OS/2 headers (12 bytes) store 16-bit sizes; later ones 32-bit, with a negative height for top-down rows."""
    (header_size,) = struct.unpack("<I", head[14:18])
    if header_size == 12:
        return struct.unpack("<HH", head[18:22])
    width, height = struct.unpack("<ii", head[18:26])
    return abs(width), abs(height)


def _webp_size(head: bytes) -> tuple[int, int] | None:
    """The first chunk decides: VP8 (lossy), VP8L (lossless) or VP8X (extended: alpha, animation)."""
    if len(head) < 30:
        return None
    chunk = head[12:16]
    if chunk == b"VP8 ":
        width, height = struct.unpack("<HH", head[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        (bits,) = struct.unpack("<I", head[21:25])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        width = int.from_bytes(head[24:27], "little") + 1
        height = int.from_bytes(head[27:30], "little") + 1
        return width, height
    return None
