"""A loss-curve PNG from metrics.jsonl, with no plotting dependency (zlib + a 3x5 digit font).

Training loss per step in blue, validation loss in red; the y axis is labelled with its min and
max, the x axis with the first and last step.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

W, H, M = 640, 400, 48  # size and margin in pixels
FONT = {  # 3x5 glyphs, rows top to bottom, bits left to right
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
}


class Canvas:
    def __init__(self) -> None:
        self.px = bytearray(b"\xff" * (W * H * 3))

    def dot(self, x: int, y: int, rgb: tuple[int, int, int], r: int = 0) -> None:
        for dx in range(-r, r + 1):
            for dy in range(-r, r + 1):
                if 0 <= x + dx < W and 0 <= y + dy < H:
                    i = ((y + dy) * W + x + dx) * 3
                    self.px[i:i + 3] = bytes(rgb)

    def line(self, x0: float, y0: float, x1: float, y1: float, rgb: tuple[int, int, int]) -> None:
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        for k in range(n + 1):
            t = k / n
            self.dot(round(x0 + (x1 - x0) * t), round(y0 + (y1 - y0) * t), rgb)

    def text(self, x: int, y: int, s: str, scale: int = 2) -> None:
        for ch in s:
            glyph = FONT.get(ch)
            if glyph:
                for i, bit in enumerate(glyph):
                    if bit == "1":
                        for sx in range(scale):
                            for sy in range(scale):
                                self.dot(x + (i % 3) * scale + sx, y + (i // 3) * scale + sy, (0, 0, 0))
            x += 4 * scale

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[y * W * 3:(y + 1) * W * 3]) for y in range(H))

        def chunk(tag: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def loss_curve_png(metrics_file: Path, out: Path) -> Path:
    """Draw ``metrics_file``'s loss records into ``out`` (PNG) and return it."""
    recs = [json.loads(x) for x in Path(metrics_file).read_text().splitlines() if x.strip()]
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    pts = train + val
    c = Canvas()
    c.line(M, M // 2, M, H - M, (0, 0, 0))
    c.line(M, H - M, W - M // 2, H - M, (0, 0, 0))
    if pts:
        x_lo, x_hi = min(p[0] for p in pts), max(p[0] for p in pts)
        y_lo, y_hi = min(p[1] for p in pts), max(p[1] for p in pts)
        x_span, y_span = max(x_hi - x_lo, 1), max(y_hi - y_lo, 1e-9)

        def xy(step: float, loss: float) -> tuple[float, float]:
            return (M + (step - x_lo) / x_span * (W - 1.5 * M), H - M - (loss - y_lo) / y_span * (H - 1.5 * M))

        for (s0, l0), (s1, l1) in zip(train, train[1:]):
            c.line(*xy(s0, l0), *xy(s1, l1), (31, 119, 180))
        for s, v in val:
            x, y = xy(s, v)
            c.dot(round(x), round(y), (214, 39, 40), r=3)
        c.text(2, M // 2, f"{y_hi:.2f}")
        c.text(2, H - M - 10, f"{y_lo:.2f}")
        c.text(M, H - M + 8, str(x_lo))
        c.text(W - M - 20, H - M + 8, str(x_hi))
    out.write_bytes(c.png())
    return out
